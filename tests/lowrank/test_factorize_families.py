"""SVD factorisation on every model family: each family's linears (Phi-3's fused projections whole, a mixture of
experts' attention only) factorised at full rank keep the logits; at a fixed rank the reports, the model's
parameter count and its matmul FLOPs agree with ``r * (in + out)``; the factors train; merging gives a plain model
with the factorised logits."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from _helpers import FAMILIES, MOE_FAMILIES, expected_family_linears, moe_warning, one_intra_op_thread, tiny_family
from torch import nn

from lit_accel.lowrank.factorize import apply_factorization, merge_factorization
from lit_accel.lowrank.factorize_layer import LowRankLinear, factorization_ranks, model_matmul_flops_per_token

MOE_ONLY = "attention only (MoE experts stay dense)"
FACTORIZE_SUPPORT: dict[str, str] = {family: MOE_ONLY if family in MOE_FAMILIES else "yes" for family in FAMILIES}
"""Family -> what these tests assert about SVD factorisation on it. ``"yes"``: every decoder linear (``all-linear``;
Phi-3's fused ``qkv_proj`` / ``gate_up_proj`` whole) is factorised; at full rank the logits stay within 1e-4; at
rank 8 each report's and the model's parameter and FLOP counts equal ``r * (in + out)`` accounting, the factors
get finite gradients, and merging back gives plain linears with the factorised logits. ``MOE_ONLY``: the same on
the attention linears (and Qwen3-MoE's dense ``mlp_only_layers`` MLPs); the experts (3-D tensors) and the router
are left dense, with one warning per call, and ``targets="mlp"`` on Mixtral is refused."""

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(7))
PARAMS = pytest.mark.parametrize("family", list(FAMILIES))


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with one_intra_op_thread():
        yield


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@PARAMS
def test_full_rank_keeps_the_logits(family: str) -> None:
    model = tiny_family(family).eval()
    ref = logits(model)
    with moe_warning(family, "SVD factorisation: "):
        reports = apply_factorization(model, "all-linear", energy=1.0, skip_if_not_smaller=False)
    assert {r.name for r in reports} == expected_family_linears(family, model) and all(r.factorized for r in reports)
    assert all(r.rank == min(r.in_features, r.out_features) and (r.rel_error or 0.0) < 1e-5 for r in reports)
    torch.testing.assert_close(logits(model), ref, atol=1e-4, rtol=1e-4)
    if family in MOE_FAMILIES:  # the experts and the router are untouched
        assert not any(".mlp.experts" in n or n.endswith(".mlp.gate") for n in factorization_ranks(model))


@PARAMS
def test_parameter_and_flop_counts_at_a_fixed_rank(family: str) -> None:
    model = tiny_family(family).eval()
    params_before = sum(p.numel() for p in model.parameters())
    flops_before = model_matmul_flops_per_token(model)
    r = 8
    with moe_warning(family, "SVD factorisation: "):
        reports = apply_factorization(model, "all-linear", rank=r)
    assert {rep.name for rep in reports} == expected_family_linears(family, model) and all(
        rep.factorized for rep in reports
    )
    for rep in reports:
        bias = rep.out_features if rep.bias else 0
        assert rep.params_before == rep.in_features * rep.out_features + bias
        assert rep.params_after == r * (rep.in_features + rep.out_features) + bias
        assert rep.flops_after == 2 * r * (rep.in_features + rep.out_features)
    if family == "phi3":
        shapes = {rep.name.rsplit(".", 1)[1]: rep.shape for rep in reports}
        assert shapes["qkv_proj"] == (256, 128) and shapes["gate_up_proj"] == (768, 128)  # [q|k|v], [gate|up]
    saved = sum(rep.params_before - rep.params_after for rep in reports)
    assert sum(p.numel() for p in model.parameters()) == params_before - saved
    assert model_matmul_flops_per_token(model) == flops_before - sum(
        rep.flops_before - rep.flops_after for rep in reports
    )
    assert factorization_ranks(model) == {rep.name: r for rep in reports}

    # The factors train: finite loss, finite gradients on every factor.
    model.train()
    loss = model(input_ids=IDS, labels=IDS).loss
    assert torch.isfinite(loss)
    loss.backward()
    for name in factorization_ranks(model):
        layer = model.get_submodule(name)
        assert isinstance(layer, LowRankLinear)
        for p in (layer.down.weight, layer.up.weight):
            assert p.grad is not None and torch.isfinite(p.grad).all() and float(p.grad.abs().sum()) > 0, name

    # Merged back: plain linears again, the same logits as factorised, the original parameter count.
    model.eval()
    factorised = logits(model)
    assert set(merge_factorization(model)) == expected_family_linears(family, model)
    assert not factorization_ranks(model) and sum(p.numel() for p in model.parameters()) == params_before
    torch.testing.assert_close(logits(model), factorised, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_mlp_targets_on_a_mixture_of_experts(family: str) -> None:
    model = tiny_family(family).eval()
    if family == "mixtral":
        with pytest.raises(ValueError, match=r"SVD factorisation: targets='mlp'.*model_type 'mixtral'.*3-D tensors"):
            apply_factorization(model, "mlp", rank=8)
        assert not factorization_ranks(model)
    else:  # only the dense MLPs of mlp_only_layers
        with moe_warning(family, "SVD factorisation: "):
            reports = apply_factorization(model, "mlp", rank=8)
        assert {r.name for r in reports} == expected_family_linears(family, model, ("mlp",))
