"""2:4 sparsity on every model family: the functional core (``sparsify_linears`` + ``set_24_masks``) on each
family's linears (Phi-3's fused projections whole, a mixture of experts' attention only), the masked forward equal
to a dense model holding ``W * M``, a CPU training step with finite loss and gradients, masks that keep the 2:4
pattern, and the callback's refusal on Mixtral's MoE-only MLP."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from _helpers import (
    FAMILIES,
    MOE_FAMILIES,
    expected_family_linears,
    moe_warning,
    one_intra_op_thread,
    quiet_trainer,
    tiny_family,
)
from torch.utils.data import DataLoader

from lit_accel.models import CausalLM
from lit_accel.ops.sparse24_gemm import check_gemm_shape
from lit_accel.sparsity import SemiStructuredSparsity, SparseLinear, masked_decay_, set_24_masks, sparsify_linears

MOE_ONLY = "attention only (MoE experts stay dense)"
SPARSE24_SUPPORT: dict[str, str] = {family: MOE_ONLY if family in MOE_FAMILIES else "yes" for family in FAMILIES}
"""Family -> what these tests assert about 2:4 sparsity on it. ``"yes"``: every decoder linear (``all-linear``;
Phi-3's fused ``qkv_proj`` / ``gate_up_proj`` whole) becomes a ``SparseLinear`` whose transposable 2:4 mask holds
through a CPU training step with finite loss and gradients, the masked model computing as a dense one with
``W * M``; every such weight's dims are multiples of 16 (cuSPARSELt). ``MOE_ONLY``: the same on the attention
linears (and Qwen3-MoE's dense ``mlp_only_layers`` MLPs); the experts (3-D tensors) and the router stay dense and
train, with one warning per call, and ``targets="mlp"`` on Mixtral is refused (functional core and callback)."""

IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
PARAMS = pytest.mark.parametrize("family", list(FAMILIES))


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with one_intra_op_thread():
        yield


def is_transposable_24(mask: torch.Tensor) -> bool:
    rows, cols = mask.shape
    blocks = mask.reshape(rows // 4, 4, cols // 4, 4).int()
    return bool((blocks.sum(1) == 2).all() and (blocks.sum(3) == 2).all())


@PARAMS
def test_masks_hold_through_a_training_step(family: str) -> None:
    model = tiny_family(family).train()
    params_before = {id(p) for p in model.parameters()}
    with moe_warning(family, "2:4 sparsity: "):
        layers, skipped = sparsify_linears(model, "all-linear")
    assert not skipped and set(layers) == expected_family_linears(family, model)
    assert all(type(model.get_submodule(n)) is SparseLinear for n in layers)
    assert {id(p) for p in model.parameters()} == params_before  # the same Parameter objects
    for layer in layers.values():
        assert check_gemm_shape(layer.out_features, layer.in_features) is None  # the sparse tensor cores' shapes
    masks = set_24_masks(layers)
    assert all(is_transposable_24(m) and layers[n].mask is m for n, m in masks.items())

    # The masked forward is a dense model holding W * M.
    dense = tiny_family(family).train()
    with torch.no_grad():
        for name, mask in masks.items():
            dense.get_submodule(name).weight.mul_(mask)
    torch.manual_seed(0)
    loss = model(input_ids=IDS, labels=IDS).loss
    torch.manual_seed(0)
    torch.testing.assert_close(loss, dense(input_ids=IDS, labels=IDS).loss, rtol=1e-5, atol=1e-5)

    # A training step: finite loss and gradients everywhere (the dense experts and the router too), masks kept.
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
    for name, layer in layers.items():
        assert layer.weight.grad is not None and float(layer.weight.grad.abs().sum()) > 0, name
        pruned_before = layer.weight.grad[~masks[name]].clone()
        masked_decay_(layer.weight.grad, layer.weight, masks[name], 2e-4)
        assert not torch.equal(layer.weight.grad[~masks[name]], pruned_before)  # the dense dW reaches pruned weights
    if family in MOE_FAMILIES:
        experts = [p for n, p in model.named_parameters() if ".experts." in n or ".mlp.gate." in n]
        assert experts and all(p.grad is not None and p.dim() in (2, 3) for p in experts)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    assert all(layers[n].mask is m and is_transposable_24(m) for n, m in masks.items())
    assert torch.isfinite(model(input_ids=IDS, labels=IDS).loss)
    # Refreshed from the updated weights, the masks keep the pattern; the surgery is idempotent.
    assert all(is_transposable_24(m) for m in set_24_masks(layers).values())
    with moe_warning(family, "2:4 sparsity: "):
        again, _ = sparsify_linears(model, "all-linear")
    assert all(again[n] is layers[n] for n in layers)


def test_phi3_fused_projections_are_masked_as_their_parts() -> None:
    """A transposable mask tiles 4x4 blocks: on [q | k | v] (boundaries multiples of 4) it is the masks of q, k and v
    stacked, so masking the fused linear equals masking the projections apart; the same for [gate | up]."""
    model = tiny_family("phi3")
    layers, _ = sparsify_linears(model, ["qkv", "gate_up"])
    masks = set_24_masks(layers)
    qkv = layers["model.layers.0.self_attn.qkv_proj"].weight.detach()
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    q_out, kv_out = model.config.num_attention_heads * head_dim, model.config.num_key_value_heads * head_dim
    assert q_out + 2 * kv_out == qkv.shape[0]
    parts = torch.split(qkv, [q_out, kv_out, kv_out])
    single = set_24_masks(_as_layers(parts))
    assert torch.equal(masks["model.layers.0.self_attn.qkv_proj"], torch.cat([single[str(i)] for i in range(3)]))
    gate_up = layers["model.layers.0.mlp.gate_up_proj"].weight.detach()
    halves = _as_layers(gate_up.chunk(2))
    single = set_24_masks(halves)
    assert torch.equal(masks["model.layers.0.mlp.gate_up_proj"], torch.cat([single["0"], single["1"]]))


def _as_layers(weights: tuple[torch.Tensor, ...]) -> dict[str, SparseLinear]:
    out = {}
    for i, w in enumerate(weights):
        layer = SparseLinear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            layer.weight.copy_(w)
        out[str(i)] = layer
    return out


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_mlp_targets_on_a_mixture_of_experts(family: str) -> None:
    model = tiny_family(family)
    if family == "mixtral":
        with pytest.raises(ValueError, match=r"2:4 sparsity: targets='mlp'.*model_type 'mixtral'.*router is never"):
            sparsify_linears(model, "mlp")
        assert not any(isinstance(m, SparseLinear) for m in model.modules())
    else:  # only the dense MLPs of mlp_only_layers
        with moe_warning(family, "2:4 sparsity: "):
            layers, _ = sparsify_linears(model, "mlp")
        assert set(layers) == expected_family_linears(family, model, ("mlp",))


def test_callback_refuses_mlp_targets_on_mixtral_and_sparsifies_its_attention() -> None:
    data = DataLoader([{"input_ids": x} for x in torch.randint(0, 256, (4, 16))], batch_size=2)  # type: ignore[arg-type]

    def lm() -> CausalLM:
        return CausalLM("mixtral-tiny", config_overrides={"vocab_size": 256}, learning_rate=1e-3, warmup_steps=0)

    with pytest.raises(ValueError, match=r"targets='mlp'.*mixture of experts"):
        quiet_trainer(max_steps=1, callbacks=[SemiStructuredSparsity()]).fit(lm(), data)
    cb = SemiStructuredSparsity(targets="all-linear", mask_refresh_every=1)
    with pytest.warns(UserWarning, match=r"model_type 'mixtral'.*3-D tensors"):
        quiet_trainer(max_steps=2, callbacks=[cb]).fit(module := lm(), data)
    assert set(cb.layers) == expected_family_linears("mixtral", module.model) and not cb.skipped
    assert cb.refreshes == 2 and all(is_transposable_24(m) for m in cb.masks.values())
