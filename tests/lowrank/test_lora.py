"""LoRA functional core: equality with PEFT (outputs, gradients, dropout, PiSSA), merge, PEFT files, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from lora_helpers import (
    MODELS,
    VOCAB,
    copy_adapters_to_peft,
    logits,
    peft_adapter_grads,
    peft_model,
    randomize_adapters,
    tiny_gpt2,
    tiny_llama,
)
from torch import nn
from transformers.pytorch_utils import Conv1D

import lit_accel.lowrank.lora as lora_mod
from lit_accel.lowrank.lora import (
    LoRALinear,
    apply_lora,
    lora_layers,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    remove_lora,
    unmerge_lora,
)
from lit_accel.lowrank.lora_io import load_peft_adapter, merged_state_dict, save_peft_adapter
from lit_accel.models.structure import is_linear

pytest.importorskip("peft")

IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}


# ------------------------------------------------------------------ structure


def test_apply_wraps_freezes_and_keeps_keys_readable() -> None:
    model = tiny_llama()
    before = logits(model, IDS)
    n_params = sum(p.numel() for p in model.parameters())
    layers = apply_lora(model, targets="all-linear", r=4, alpha=8)
    assert len(layers) == 2 * 7 and all(isinstance(m, LoRALinear) for m in layers.values())
    keys = set(model.state_dict())
    assert "model.layers.0.self_attn.q_proj.base_layer.weight" in keys
    assert {"model.layers.0.self_attn.q_proj.lora_A", "model.layers.0.mlp.down_proj.lora_B"} <= keys
    assert "lm_head.weight" in keys and not any("lm_head.lora" in k for k in keys)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{x}" for n in layers for x in "AB"}
    assert set(map(id, lora_parameters(model))) == {id(p) for p in model.parameters() if p.requires_grad}
    q = layers["model.layers.0.self_attn.q_proj"]
    assert q.lora_A.shape == (4, 64) and q.lora_B.shape == (64, 4) and q.lora_A.dtype == torch.float32
    assert q.scaling == 2.0 and not q.merged
    assert is_linear(q)  # the structure still sees one linear under the original name
    # gaussian (PEFT default) init: B = 0 so the model is unchanged; A kaiming-uniform(a=sqrt(5)) bound 1/sqrt(in)
    torch.testing.assert_close(logits(model, IDS), before, rtol=0, atol=0)
    assert float(q.lora_B.abs().sum()) == 0 and 0 < float(q.lora_A.abs().max()) <= 1 / math.sqrt(64) + 1e-7
    # idempotent: a second call keeps the layers and their values
    a = q.lora_A.detach().clone()
    again = apply_lora(model, targets="all-linear", r=4, alpha=8)
    assert again["model.layers.0.self_attn.q_proj"] is q and torch.equal(q.lora_A, a)
    assert sum(p.numel() for p in model.parameters()) == n_params + sum(p.numel() for p in lora_parameters(model))
    state = lora_state_dict(model)
    assert set(state) == {f"{n}.lora_{x}" for n in layers for x in "AB"}


def test_targets_presets_roles_and_rslora() -> None:
    model = tiny_llama(layers=1)
    layers = apply_lora(model, targets="mlp", r=4, alpha=8, use_rslora=True)
    assert sorted(n.rsplit(".", 1)[1] for n in layers) == ["down_proj", "gate_proj", "up_proj"]
    assert next(iter(layers.values())).scaling == pytest.approx(8 / 2)
    gpt2 = tiny_gpt2(layers=1)
    layers = apply_lora(gpt2, targets=["qkv"], r=2, alpha=2)
    assert list(layers) == ["transformer.h.0.attn.c_attn"]
    assert isinstance(layers["transformer.h.0.attn.c_attn"].base_layer, Conv1D)
    assert layers["transformer.h.0.attn.c_attn"].lora_B.shape == (192, 2)


# ------------------------------------------------------------------ equality with PEFT


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_outputs_and_gradients_equal_peft(arch: str, use_rslora: bool) -> None:
    ours = MODELS[arch]()
    ref = peft_model(MODELS[arch](), r=4, lora_alpha=8, target_modules=TARGETS[arch], use_rslora=use_rslora)
    layers = apply_lora(ours, targets=TARGETS[arch], r=4, alpha=8, use_rslora=use_rslora)
    assert len(layers) == len(peft_adapter_grads(ref))
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
        torch.testing.assert_close(layer.lora_A.grad, ref_grads[name][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.lora_B.grad, ref_grads[name][1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dropout_equals_peft_under_the_same_seed(arch: str) -> None:
    ours = MODELS[arch]()
    ref = peft_model(MODELS[arch](), r=4, lora_alpha=8, target_modules=TARGETS[arch], lora_dropout=0.3)
    layers = apply_lora(ours, targets=TARGETS[arch], r=4, alpha=8, dropout=0.3)
    randomize_adapters(ours)
    copy_adapters_to_peft(ours, ref)
    ours.train()
    ref.train()
    torch.manual_seed(11)
    out_ours = ours(input_ids=IDS).logits
    torch.manual_seed(11)
    out_ref = ref(input_ids=IDS).logits
    torch.testing.assert_close(out_ours, out_ref, rtol=1e-5, atol=1e-5)
    out_ours.square().mean().backward()
    out_ref.square().mean().backward()
    ref_grads = peft_adapter_grads(ref)
    for name, layer in layers.items():
        torch.testing.assert_close(layer.lora_A.grad, ref_grads[name][0], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(layer.lora_B.grad, ref_grads[name][1], rtol=1e-5, atol=1e-7)
    # dropout really acts in training and not in eval
    ours.eval()
    torch.manual_seed(11)
    assert not torch.allclose(ours(input_ids=IDS).logits, out_ours)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pissa_init_keeps_the_output_and_equals_peft(arch: str) -> None:
    base = MODELS[arch]()
    before = logits(base, IDS)
    ref = peft_model(MODELS[arch](), r=4, lora_alpha=8, target_modules=TARGETS[arch], init_lora_weights="pissa")
    layers = apply_lora(base, targets=TARGETS[arch], r=4, alpha=8, init="pissa")
    torch.testing.assert_close(logits(base, IDS), before, rtol=1e-4, atol=1e-5)
    for name, layer in layers.items():
        target = ref.base_model.model.get_submodule(name)
        torch.testing.assert_close(layer.lora_A, target.lora_A["default"].weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.lora_B, target.lora_B["default"].weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.base_layer.weight, target.base_layer.weight, rtol=1e-5, atol=1e-6)
        assert float(layer.lora_B.abs().sum()) > 0
    torch.testing.assert_close(logits(base, IDS), logits(ref, IDS), rtol=1e-5, atol=1e-5)
    # remove without merging gives the original model back
    remove_lora(base, merge=False)
    torch.testing.assert_close(logits(base, IDS), before, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ merge


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_unmerge_round_trip_and_remove(arch: str) -> None:
    model = MODELS[arch]()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, targets="all-linear", r=4, alpha=8)
    randomize_adapters(model)
    unmerged = logits(model, IDS)
    base_w = {n: m.base_layer.weight.detach().clone() for n, m in lora_layers(model).items()}
    merge_lora(model)
    assert all(m.merged for m in lora_layers(model).values())
    torch.testing.assert_close(logits(model, IDS), unmerged, rtol=1e-5, atol=1e-5)
    merge_lora(model)  # a second merge is a no-op
    unmerge_lora(model)
    for n, m in lora_layers(model).items():
        torch.testing.assert_close(m.base_layer.weight, base_w[n], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, IDS), unmerged, rtol=1e-6, atol=1e-6)
    # the merged plain state dict loads into a fresh HF model with the same logits, without changing ours
    fresh = MODELS[arch]()
    fresh.load_state_dict(merged_state_dict(model))
    assert not any(m.merged for m in lora_layers(model).values())
    torch.testing.assert_close(logits(fresh, IDS), unmerged, rtol=1e-5, atol=1e-5)
    # remove_lora(merge=True) gives a plain HF model with the fine-tuned weights
    plain = remove_lora(model, merge=True)
    assert not lora_layers(plain) and set(plain.state_dict()) == set(original)
    torch.testing.assert_close(logits(plain, IDS), unmerged, rtol=1e-5, atol=1e-5)


def test_base_dtype_bf16_keeps_fp32_adapters() -> None:
    model = tiny_llama(layers=1)
    layers = apply_lora(model, targets="attention", r=4, alpha=8, base_dtype="bfloat16")
    randomize_adapters(model)
    q = layers["model.layers.0.self_attn.q_proj"]
    assert q.base_layer.weight.dtype == torch.bfloat16 and q.lora_A.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=IDS).logits
    out.float().square().mean().backward()
    assert q.lora_A.grad is not None and q.lora_A.grad.dtype == torch.float32
    # without autocast the bf16 base computes in the activations' dtype
    assert model(input_ids=IDS).logits.dtype == torch.float32


# ------------------------------------------------------------------ PEFT files


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_our_adapter_loads_in_peft(arch: str, tmp_path: Path) -> None:
    from peft import PeftModel

    model = MODELS[arch]()
    apply_lora(model, targets=TARGETS[arch], r=4, alpha=8, use_rslora=True, dropout=0.1)
    randomize_adapters(model)
    expected = logits(model, IDS)
    out = save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path="base-dir")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["r"] == 4
    assert config["lora_alpha"] == 8 and config["use_rslora"] is True and config["lora_dropout"] == 0.1
    assert sorted(config["target_modules"]) == sorted(TARGETS[arch])
    assert config["fan_in_fan_out"] is (arch == "gpt2") and config["base_model_name_or_path"] == "base-dir"
    loaded = PeftModel.from_pretrained(MODELS[arch](), str(out)).eval()
    torch.testing.assert_close(logits(loaded, IDS), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(FileExistsError, match="not empty"):
        save_peft_adapter(model, out)
    save_peft_adapter(model, out, overwrite=True)


def test_partial_targets_use_a_regex_in_peft(tmp_path: Path) -> None:
    from peft import PeftModel

    model = tiny_llama()
    apply_lora(model, targets=r"layers\.1\.self_attn\.q_proj", r=2, alpha=4)
    randomize_adapters(model)
    save_peft_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert isinstance(config["target_modules"], str)
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a")).eval()
    assert len(peft_adapter_grads(loaded)) == 1
    torch.testing.assert_close(logits(loaded, IDS), logits(model, IDS), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_adapter_loads_into_ours(arch: str, tmp_path: Path) -> None:
    ref = peft_model(MODELS[arch](), r=4, lora_alpha=16, target_modules=TARGETS[arch])
    with torch.no_grad():
        for p in ref.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    expected = logits(ref.eval(), IDS)
    ref.save_pretrained(str(tmp_path / "peft"))
    fresh = MODELS[arch]()
    load_peft_adapter(fresh, tmp_path / "peft")  # applies LoRA with the adapter's settings
    layers = lora_layers(fresh)
    assert len(layers) == len(peft_adapter_grads(ref)) and next(iter(layers.values())).scaling == 4.0
    torch.testing.assert_close(logits(fresh, IDS), expected, rtol=1e-5, atol=1e-5)
    # into a model that already has LoRA layers: the values are replaced
    applied = MODELS[arch]()
    apply_lora(applied, targets=TARGETS[arch], r=4, alpha=16)
    load_peft_adapter(applied, tmp_path / "peft")
    torch.testing.assert_close(logits(applied, IDS), expected, rtol=1e-5, atol=1e-5)


def test_pissa_adapter_is_saved_as_plain_lora_for_the_original_base(tmp_path: Path) -> None:
    from peft import PeftModel

    model = tiny_llama()
    apply_lora(model, targets="attention", r=4, alpha=8, init="pissa")
    with torch.no_grad():  # "training" moved the adapters away from their init
        for p in lora_parameters(model):
            p.add_(torch.randn_like(p) * 0.05)
    expected = logits(model, IDS)
    save_peft_adapter(model, tmp_path / "pissa")
    config = json.loads((tmp_path / "pissa" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["init_lora_weights"] is True
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "pissa")).eval()
    torch.testing.assert_close(logits(loaded, IDS), expected, rtol=1e-4, atol=1e-5)
    ours = tiny_llama()
    load_peft_adapter(ours, tmp_path / "pissa")
    torch.testing.assert_close(logits(ours, IDS), expected, rtol=1e-4, atol=1e-5)


def test_bad_adapter_and_bad_arguments(tmp_path: Path) -> None:
    model = tiny_llama()
    with pytest.raises(ValueError, match="no LoRA layer"):
        save_peft_adapter(model, tmp_path / "empty")
    assert not (tmp_path / "empty").exists()
    ref = peft_model(tiny_llama(), r=4, lora_alpha=8, target_modules=["q_proj"])
    ref.save_pretrained(str(tmp_path / "peft"))
    other = tiny_gpt2()
    with pytest.raises(ValueError, match="does not have"):
        load_peft_adapter(other, tmp_path / "peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(
        LlamaConfig(hidden_size=96, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB)
    )
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj.*\(4, 64\).*in=96, out=96"):
        load_peft_adapter(wider, tmp_path / "peft")
    with pytest.raises(ValueError, match="not a PEFT adapter"):
        load_peft_adapter(model, tmp_path)
    for kwargs, match in [
        ({"r": 0}, "r=0"),
        ({"alpha": 0}, "alpha=0"),
        ({"dropout": 1.0}, r"dropout=1.0.*\[0, 1\)"),
        ({"init": "olora"}, "init='olora'.*gaussian"),
        ({"base_dtype": "int8"}, "base_dtype='int8'"),
        ({"r": 65}, r"r=65 .*model.layers.0.self_attn.q_proj.*in=64, out=64"),
        ({"targets": "nothing_here"}, r"matches no linear.*q_proj"),
    ]:
        with pytest.raises(ValueError, match=match):
            apply_lora(tiny_llama(layers=1), **kwargs)  # type: ignore[arg-type]
    # a failed apply leaves the model untouched
    untouched = tiny_llama(layers=1)
    with pytest.raises(ValueError):
        apply_lora(untouched, targets="all-linear", r=80)
    assert all(p.requires_grad for p in untouched.parameters()) and not lora_layers(untouched)


def test_lora_linear_rejects_non_linears() -> None:
    with pytest.raises(TypeError, match="Embedding"):
        LoRALinear(nn.Embedding(4, 4), r=1, alpha=1)  # type: ignore[arg-type]


def test_lora_linear_validates_its_settings_at_construction() -> None:
    with pytest.raises(ValueError, match=r"dropout=1.0.*\[0, 1\)"):
        LoRALinear(nn.Linear(8, 8), r=2, alpha=4, dropout=1.0)
    with pytest.raises(ValueError, match="alpha=inf"):
        LoRALinear(nn.Linear(8, 8), r=2, alpha=float("inf"))


# ------------------------------------------------------------------ choice of path


def _took_fused_path(y: torch.Tensor) -> bool:
    node = y.grad_fn
    return node is not None and any("LoRALinearFunction" in type(f).__name__ for f, _ in node.next_functions)


def test_layer_decides_its_path_once_per_input_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool | None] = []
    real = lora_mod.lora_linear_uses_fused

    def counting(*args: object, **kwargs: object) -> bool:
        calls.append(None)  # a call that raises stays None
        calls[-1] = fused = real(*args, **kwargs)  # type: ignore[arg-type]
        return fused

    monkeypatch.setattr(lora_mod, "lora_linear_uses_fused", counting)
    layer = LoRALinear(nn.Linear(16, 8).requires_grad_(False), r=2, alpha=4)
    x = torch.randn(3, 16, requires_grad=True)
    for _ in range(3):
        layer(x)
    layer(torch.randn(2, 5, 16))  # other leading dims: the same signature
    assert calls == [False]  # checked and decided once; the CPU default is PEFT's computation
    with torch.no_grad():
        layer(x)
    layer(x.double())
    assert len(calls) == 3  # another grad mode, another dtype
    layer.use_kernel = True  # a setting the choice depends on
    y = layer(x)
    assert calls[-1] is True and _took_fused_path(y) and len(calls) == 4
    torch.testing.assert_close(y, layer.base_layer(x), rtol=0, atol=0)  # B = 0 at construction
    layer(x)
    assert len(calls) == 4
    # A wrong width is reported on every call, never remembered as a path.
    for _ in range(2):
        with pytest.raises(ValueError, match="in_features=16"):
            layer(torch.randn(3, 15))
    assert len(calls) == 6


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fused_path_in_a_model_matches_the_peft_path(arch: str) -> None:
    """``use_kernel=True`` runs the fused path on the CPU, layer by layer; another model in the process keeps PEFT's."""
    peft_path = MODELS[arch]()
    apply_lora(peft_path, targets="all-linear", r=4, alpha=8)
    randomize_adapters(peft_path)
    fused = MODELS[arch]()
    apply_lora(fused, targets="all-linear", r=4, alpha=8)
    randomize_adapters(fused)
    for layer in lora_layers(fused).values():
        layer.use_kernel = True
    results = []
    for model in (peft_path, fused):
        out = model.train()(input_ids=IDS).logits
        params = lora_parameters(model)
        results.append((out, torch.autograd.grad(out.square().mean(), params)))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    for got, exp in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-6)
    # Each layer keeps its own choice: the first model's layers still take PEFT's computation.
    x = torch.randn(2, 64, requires_grad=True)
    first, twin = (next(iter(lora_layers(m).values())) for m in (peft_path, fused))
    assert not _took_fused_path(first(x)) and _took_fused_path(twin(x))
