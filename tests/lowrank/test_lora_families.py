"""LoRA on every model family: which linears are adapted (Phi-3's fused projections whole, a mixture of experts'
attention only), outputs and gradients equal to PEFT's, our PEFT files loaded by PEFT (and PEFT's by us) with the
same logits, merges equal to PEFT's, and the shared-input groups."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
from lora_helpers import copy_adapters_to_peft, logits, peft_adapter_grads, peft_model, randomize_adapters
from torch import nn
from torch.utils.data import DataLoader

import lit_accel.lowrank.lora_groups as groups_mod
from lit_accel.lowrank import LoRA
from lit_accel.lowrank.lora import LoRALinear, apply_lora, group_shared_inputs, lora_layers, lora_parameters
from lit_accel.lowrank.lora_io import load_peft_adapter, merged_state_dict, read_peft_adapter, save_peft_adapter
from lit_accel.models import CausalLM

pytest.importorskip("peft")

MOE_ONLY = "attention only (MoE experts stay dense)"
LORA_SUPPORT: dict[str, str] = {family: MOE_ONLY if family in MOE_FAMILIES else "yes" for family in FAMILIES}
"""Family -> what these tests assert about LoRA on it. ``"yes"``: every decoder linear (``all-linear``; Phi-3's
fused ``qkv_proj`` / ``gate_up_proj`` whole) gets an adapter; outputs and adapter gradients equal PEFT's; our adapter
files load in PEFT with equal logits and PEFT's in ours; the merge equals PEFT's. ``MOE_ONLY``: the same on the
attention linears; the experts (3-D tensors) and the router get no adapter and stay frozen, with one warning per
call, and ``targets="mlp"`` on Mixtral is refused. (Qwen3-MoE's dense ``mlp_only_layers`` MLPs are adapted as in
any dense family, but PEFT with transformers >= 5 re-targets their names to the experts, so writing them as a PEFT
adapter is refused; the tiny preset has one such block, real Qwen3-MoE checkpoints none.)"""

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))
PARAMS = pytest.mark.parametrize("family", list(FAMILIES))


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with one_intra_op_thread():
        yield


def base(family: str) -> nn.Module:
    """The family's tiny model in eval mode; two calls give the same weights."""
    return tiny_family(family, seed=0).eval()


def adapt(family: str, model: nn.Module, targets: str = "all-linear", **kwargs: Any) -> dict[str, LoRALinear]:
    with moe_warning(family, mlp=targets != "attention"):
        return apply_lora(model, **{"targets": targets, "r": 4, "alpha": 8, **kwargs})


# ------------------------------------------------------------------ which linears


@PARAMS
def test_all_linear_adapts_every_dense_linear_and_nothing_else(family: str) -> None:
    model = base(family)
    before = logits(model, IDS)
    layers = adapt(family, model)
    assert set(layers) == expected_family_linears(family, model)
    # Only the adapters train: the experts, the router, norms and embeddings stay frozen.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{x}" for n in layers for x in "AB"}
    if family == "phi3":
        qkv = layers["model.layers.0.self_attn.qkv_proj"]
        gate_up = layers["model.layers.0.mlp.gate_up_proj"]
        assert qkv.lora_B.shape == (256, 4) and gate_up.lora_B.shape == (768, 4)  # [q|k|v] and [gate|up] rows
    if family in MOE_FAMILIES:
        moe_blocks = [b for b in model.model.layers if hasattr(b.mlp, "experts")]
        assert moe_blocks and all(not any(isinstance(m, LoRALinear) for m in b.mlp.modules()) for b in moe_blocks)
    torch.testing.assert_close(logits(model, IDS), before, rtol=0, atol=0)  # B = 0: unchanged


@PARAMS
def test_presets_and_roles_resolve(family: str) -> None:
    attn = base(family)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the attention never mentions experts
        assert set(apply_lora(attn, targets="attention", r=2, alpha=4)) == expected_family_linears(
            family, attn, ("attention",)
        )
    roles = ["qkv", "gate_up"] if family == "phi3" else ["q", "k", "v", "gate", "up"]
    model = base(family)
    if family == "mixtral":
        with pytest.raises(ValueError, match=r"LoRA: targets='mlp'.*model_type 'mixtral'.*mixture of experts"):
            apply_lora(model, targets="mlp", r=2, alpha=4)
        assert not lora_layers(model)
        return
    with moe_warning(family):
        mlp = apply_lora(model, targets="mlp", r=2, alpha=4)
    assert set(mlp) == expected_family_linears(family, model, ("mlp",))
    with moe_warning(family):
        chosen = apply_lora(base(family), targets=roles, r=2, alpha=4)
    suffixes = {n.rsplit(".", 1)[1] for n in chosen}
    assert suffixes == (
        {"qkv_proj", "gate_up_proj"} if family == "phi3" else {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
    )


# ------------------------------------------------------------------ equality with PEFT


def _peft_for(family: str, layers: dict[str, LoRALinear], **kwargs: Any) -> Any:
    """PEFT's LoRA on a fresh base of the same weights, on the modules we adapted (PEFT names them by suffix)."""
    targets = sorted({n.rsplit(".", 1)[1] for n in layers})
    ref = peft_model(base(family), r=4, lora_alpha=8, target_modules=targets, **kwargs)
    assert set(peft_adapter_grads(ref)) == set(layers)
    return ref


def peft_targets(family: str) -> str:
    """What PEFT can load on ``family``: everything except Qwen3-MoE's dense MLPs (see :data:`LORA_SUPPORT`)."""
    return "attention" if family == "qwen3_moe" else "all-linear"


@PARAMS
def test_outputs_and_adapter_gradients_equal_peft(family: str) -> None:
    ours = base(family)
    layers = adapt(family, ours, targets=peft_targets(family))
    ref = _peft_for(family, layers)
    assert len(layers) == len(
        expected_family_linears(family, ours, ("attention",) if family == "qwen3_moe" else ("attention", "mlp"))
    )
    randomize_adapters(ours)
    copy_adapters_to_peft(ours, ref)
    emb = ours.get_input_embeddings()(IDS).detach()
    x_ours, x_ref = emb.clone().requires_grad_(True), emb.clone().requires_grad_(True)
    out_ours = ours(inputs_embeds=x_ours).logits
    out_ref = ref(inputs_embeds=x_ref).logits
    torch.testing.assert_close(out_ours, out_ref, rtol=1e-5, atol=1e-5)
    weights = torch.randn(out_ours.shape, generator=torch.Generator().manual_seed(2))
    (out_ours * weights).sum().backward()
    (out_ref * weights).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    ref_grads = peft_adapter_grads(ref)
    for name, layer in layers.items():
        assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
        assert float(layer.lora_B.grad.abs().sum()) > 0
        torch.testing.assert_close(layer.lora_A.grad, ref_grads[name][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.lora_B.grad, ref_grads[name][1], rtol=1e-5, atol=1e-6)


@PARAMS
def test_peft_round_trip_and_merge_equal_peft(family: str, tmp_path: Path) -> None:
    from peft import PeftModel

    model = base(family)
    if family == "qwen3_moe":
        with moe_warning(family):
            apply_lora(model, targets="all-linear", r=4, alpha=8)
        with pytest.raises(ValueError, match=r"mixture of experts.*re-targets.*model\.layers\.1\.mlp\.gate_proj"):
            save_peft_adapter(model, tmp_path / "refused")
        assert not (tmp_path / "refused").exists()
        model = base(family)
    layers = adapt(family, model, targets=peft_targets(family))
    randomize_adapters(model)
    expected = logits(model, IDS)
    out = save_peft_adapter(model, tmp_path / "ours")
    config, modules = read_peft_adapter(out)
    assert set(modules) == set(layers)
    if family == "phi3":
        assert sorted(config["target_modules"]) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    # Our files in PEFT, on a fresh base of the same weights: the same logits.
    loaded = PeftModel.from_pretrained(base(family), str(out)).eval()
    assert set(peft_adapter_grads(loaded)) == set(layers)
    torch.testing.assert_close(logits(loaded, IDS), expected, rtol=1e-6, atol=1e-6)
    # Our merge equals PEFT's: the merged state dict (model unchanged) and the in-place merge.
    theirs = loaded.merge_and_unload().state_dict()
    merged = merged_state_dict(model)
    for name in layers:
        torch.testing.assert_close(merged[f"{name}.weight"], theirs[f"{name}.weight"], rtol=1e-6, atol=1e-7)
    fresh = base(family)
    fresh.load_state_dict(merged)
    torch.testing.assert_close(logits(fresh, IDS), expected, rtol=1e-5, atol=1e-5)
    # PEFT's files (its own save) load into ours with the same logits.
    (tmp_path / "peft").mkdir()
    loaded_again = PeftModel.from_pretrained(base(family), str(out)).eval()
    loaded_again.save_pretrained(str(tmp_path / "peft"))
    into_ours = base(family)
    with moe_warning(family, mlp=False):  # exact module names: nothing points at the experts
        load_peft_adapter(into_ours, tmp_path / "peft")
    assert set(lora_layers(into_ours)) == set(layers)
    torch.testing.assert_close(logits(into_ours, IDS), expected, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ shared-input groups and the fused path


@PARAMS
def test_groups_skip_fused_projections_and_equal_the_per_layer_path(
    family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = base(family)
    adapt(family, model)
    randomize_adapters(model)
    # fp64 makes the comparison tight; the experts' grouped matmul (torch._grouped_mm) takes fp32 at most.
    moe = family in MOE_FAMILIES
    model.to(torch.float32 if moe else torch.float64).train()
    groups = group_shared_inputs(model)
    dense_mlps = len({n.rsplit(".", 1)[0] for n in expected_family_linears(family, model, ("mlp",))})
    if family == "phi3":
        assert groups == []  # qkv_proj and gate_up_proj are one linear each: nothing to group
    else:
        assert [g.roles for g in groups].count(("q", "k", "v")) == model.config.num_hidden_layers
        assert [g.roles for g in groups].count(("gate", "up")) == dense_mlps
        assert len(groups) == model.config.num_hidden_layers + dense_mlps
    per_layer = _loss_and_grads(model)
    assert all(torch.isfinite(g).all() for g in per_layer[1])
    monkeypatch.setattr(groups_mod, "_GROUP_DEVICES", ("cuda", "cpu"))  # run the groups on the CPU
    grouped = _loss_and_grads(model)
    torch.testing.assert_close(grouped[0], per_layer[0], rtol=1e-5 if moe else 1e-12, atol=1e-6 if moe else 1e-12)
    for a, b in zip(grouped[1], per_layer[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4 if moe else 1e-9, atol=1e-6 if moe else 1e-12)


@PARAMS
def test_fused_path_equals_the_peft_path(family: str) -> None:
    """``use_kernel=True`` runs the fused per-layer path (CUDA's) on the CPU, in fp32."""
    model = base(family).train()
    adapt(family, model)
    randomize_adapters(model)
    peft_path = _loss_and_grads(model)
    for layer in lora_layers(model).values():
        layer.use_kernel = True
    fused = _loss_and_grads(model)
    torch.testing.assert_close(fused[0], peft_path[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(fused[1], peft_path[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _loss_and_grads(model: nn.Module) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    loss = model(input_ids=IDS, labels=IDS).loss
    return loss.detach(), torch.autograd.grad(loss, lora_parameters(model))


def test_peft_adapter_on_the_experts_is_refused_with_the_reason(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    ref = get_peft_model(base("mixtral"), LoraConfig(r=2, lora_alpha=4, target_parameters=["experts.down_proj"]))
    ref.save_pretrained(str(tmp_path / "experts"))
    model = base("mixtral")
    with pytest.raises(ValueError, match=r"experts of a mixture of experts.*3-D tensors.*linears only"):
        load_peft_adapter(model, tmp_path / "experts")
    assert not lora_layers(model)


def test_callback_refuses_a_peft_export_peft_could_not_load_before_training(tmp_path: Path) -> None:
    data = DataLoader([{"input_ids": x} for x in torch.randint(0, 256, (2, 16))], batch_size=2)  # type: ignore[arg-type]
    module = CausalLM("qwen3-moe-tiny", config_overrides={"vocab_size": 256}, warmup_steps=0)
    cb = LoRA(targets="all-linear", r=2, alpha=4, export_dir=str(tmp_path / "out"), export="both")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the experts' warning, tested above
        with pytest.raises(ValueError, match=r"LoRA export='both'.*re-targets.*targets='attention'"):
            quiet_trainer(max_steps=1, callbacks=[cb]).fit(module, data)
    assert not (tmp_path / "out").exists()
