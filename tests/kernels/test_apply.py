"""``apply_kernels`` / ``FusedKernels``: patched models compute what Hugging Face computes, alone and composed.

On CPU the patched forwards run the kernels' PyTorch references; the ``interp`` tests run the whole patched model
through the Triton kernels under ``TRITON_INTERPRET=1`` (in a child pytest) against the unpatched model.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import lightning as L
import pytest
import torch
from kernel_helpers import assert_same as _assert_same
from kernel_helpers import batch as _batch
from kernel_helpers import loss_and_grads as _loss_and_grads
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from lit_accel.callbacks import FusedKernels
from lit_accel.kernels import apply_kernels, kernels_applied, remove_kernels
from lit_accel.models import CausalLM

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


_M = TypeVar("_M", bound=nn.Module)


def _llama(tied: bool = False, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=80,
        tie_word_embeddings=tied,
    )
    return _randomize_norms(LlamaForCausalLM(cfg))


def _randomize_norms(model: _M) -> _M:
    with torch.no_grad():  # fresh RMSNorm weights are all ones, which would hide a weight applied wrongly
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _qwen2() -> Qwen2ForCausalLM:
    cfg = Qwen2Config(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=80,
        tie_word_embeddings=False,
    )
    return Qwen2ForCausalLM(cfg)


@pytest.mark.parametrize("tied", [False, True])
def test_patched_llama_matches_hf_loss_gradients_and_eval_logits(tied: bool) -> None:
    model = _llama(tied=tied)
    patched = copy.deepcopy(model)
    report = apply_kernels(patched)
    assert report.counts() == {"rms_norm": 5, "swiglu": 2, "rope": 2, "linear_cross_entropy": 1}
    assert report.skipped == {}
    _assert_same(model, patched)


def test_training_forward_with_labels_returns_no_logits_and_without_labels_returns_logits() -> None:
    model = _llama()
    apply_kernels(model)
    ids, labels = _batch()
    out = model(input_ids=ids, labels=labels)
    assert out.logits is None and out.loss.ndim == 0
    assert model(ids, labels=labels).logits is None  # input_ids by position takes the fused path too
    out = model(input_ids=ids)
    assert out.logits.shape == (2, 12, 80) and out.loss is None


def test_qwen2_is_patched_and_matches() -> None:
    model = _qwen2()
    patched = copy.deepcopy(model)
    assert apply_kernels(patched).counts()["rope"] == 2
    _assert_same(model, patched)


def _mistral() -> nn.Module:
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=80,
        sliding_window=None,
    )
    torch.manual_seed(0)
    return _randomize_norms(MistralForCausalLM(cfg))


def test_mistral_is_patched_and_matches() -> None:
    model = _mistral()
    patched = copy.deepcopy(model)
    assert apply_kernels(patched).counts() == {"rms_norm": 5, "swiglu": 2, "rope": 2, "linear_cross_entropy": 1}
    _assert_same(model, patched)


def test_idempotent_and_removable() -> None:
    model = _llama()
    apply_kernels(model)
    apply_kernels(model)
    assert kernels_applied(model) == {"rms_norm": 5, "swiglu": 2, "rope": 2, "linear_cross_entropy": 1}
    remove_kernels(model)
    assert kernels_applied(model) == {}
    assert all("forward" not in m.__dict__ for m in model.modules())
    ids, labels = _batch()
    assert model.train()(input_ids=ids, labels=labels).logits is not None


def test_kernels_can_be_chosen_one_by_one() -> None:
    model = _llama()
    report = apply_kernels(model, rms_norm=False, linear_cross_entropy=False)
    assert report.counts() == {"swiglu": 2, "rope": 2}
    with pytest.raises(TypeError, match="rope must be True or False"):
        apply_kernels(model, rope="yes")  # type: ignore[arg-type]


def test_rope_dispatcher_leaves_unpatched_models_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    patched, other = _llama(), _llama(seed=1)
    apply_kernels(patched)
    ids, _ = _batch()
    with torch.no_grad():
        other(input_ids=ids)
    import lit_accel.kernels.apply as apply_mod

    assert not apply_mod._rope_active()
    seen = []
    real = apply_mod._rope_active
    monkeypatch.setattr(apply_mod, "_rope_active", lambda: seen.append(real()) or real())
    with torch.no_grad():
        other(input_ids=ids)
    assert seen and not any(seen)
    seen.clear()
    with torch.no_grad():
        patched(input_ids=ids)
    assert seen and all(seen)


def test_unsupported_architecture_warns_or_raises() -> None:
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=16))
    with pytest.warns(UserWarning, match="model_type='gpt2' is not supported"):
        report = apply_kernels(gpt2)
    assert report.counts() == {}
    with pytest.raises(ValueError, match="cannot apply rms_norm: config.model_type='gpt2'"):
        apply_kernels(gpt2, strict=True)


def test_non_silu_mlp_skips_swiglu_with_reason() -> None:
    model = _llama()
    model.config.hidden_act = "gelu"
    with pytest.warns(UserWarning, match="hidden_act='gelu'"):
        report = apply_kernels(model)
    assert "swiglu" in report.skipped and "swiglu" not in report.patched
    with pytest.raises(ValueError, match="swiglu"):
        apply_kernels(_llama_with_act("gelu"), strict=True)


def _llama_with_act(act: str) -> LlamaForCausalLM:
    model = _llama()
    model.config.hidden_act = act
    return model


def test_head_replaced_after_patching_falls_back_to_its_own_forward() -> None:
    model = _llama()
    reference = copy.deepcopy(model)
    apply_kernels(model)

    class Scaled(nn.Module):
        def __init__(self, inner: nn.Linear) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2.0 * self.inner(x)

    model.lm_head = Scaled(model.lm_head)
    reference.lm_head = Scaled(reference.lm_head)
    ids, labels = _batch()
    with pytest.warns(UserWarning, match="lm_head is now a Scaled"):
        loss = model.train()(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(loss, reference.train()(input_ids=ids, labels=labels).loss)


def test_composes_with_lora() -> None:
    from lit_accel.lowrank import apply_lora

    model = _llama()
    patched = copy.deepcopy(model)
    apply_kernels(patched)  # kernels first, adapters after (the order CausalLM + the LoRA callback give)
    for m in (model, patched):
        torch.manual_seed(3)
        apply_lora(m, "all-linear", r=4, alpha=8)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)  # B = 0 at init would make the adapters invisible
    _assert_same(model, patched)


def test_composes_with_pruning_masks() -> None:
    from lit_accel.pruning.apply import apply_masks
    from lit_accel.pruning.masks import L0Masks

    model = _llama()
    patched = copy.deepcopy(model)
    apply_kernels(patched)
    masks = L0Masks(model, keep={"layers": 2, "heads": 1, "intermediate": 50, "hidden": 40}).eval()
    with apply_masks(model, masks), apply_masks(patched, masks):
        _assert_same(model, patched)


def test_composes_with_dropbp() -> None:
    from lit_accel.dropbp.functional import apply_dropbp

    model = _llama()
    patched = copy.deepcopy(model)
    apply_kernels(patched)
    controllers = [apply_dropbp(m) for m in (model, patched)]
    mask = torch.tensor([True, False, False, True])
    for c in controllers:
        c.set_mask(mask)
    ids, labels = _batch()
    loss_ref, grads_ref = _loss_and_grads(model.train(), ids, labels)
    loss, grads = _loss_and_grads(patched.train(), ids, labels)
    torch.testing.assert_close(loss, loss_ref)
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-5, msg=name)


# --------------------------------------------------------------------------------------------------------------
# CausalLM default and the callback
# --------------------------------------------------------------------------------------------------------------


def test_causal_lm_kernels_default_off_on_cpu_and_explicit_on() -> None:
    module = CausalLM("llama-tiny")
    module.configure_model()
    assert kernels_applied(module.model) == {}
    module = CausalLM("llama-tiny", kernels=True)
    module.configure_model()
    assert kernels_applied(module.model)["rms_norm"] > 0


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, vocab: int) -> None:
        self.data = torch.randint(0, vocab, (16, 16))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.data[i]}


def test_fused_kernels_callback_in_a_trainer(tmp_path: Path) -> None:
    module = CausalLM("llama-tiny", learning_rate=1e-2, warmup_steps=0)
    callback = FusedKernels()
    trainer = L.Trainer(
        max_steps=4,
        accelerator="cpu",
        callbacks=[callback],
        logger=L.pytorch.loggers.CSVLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        limit_val_batches=0,
    )
    vocab = module.config.vocab_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, torch.utils.data.DataLoader(_Tokens(vocab), batch_size=4))
    assert kernels_applied(module.model)["linear_cross_entropy"] == 1
    assert trainer.callback_metrics["kernels/rms_norm"] > 0
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


@pytest.mark.parametrize("key", ["rms_norm", "swiglu", "rope", "linear_cross_entropy", "strict"])
def test_fused_kernels_rejects_non_bool(key: str) -> None:
    with pytest.raises(ValueError, match=f"{key} must be true or false"):
        FusedKernels(**{key: "no"})  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------------
# The whole patched model through the Triton kernels (CPU interpreter)
# --------------------------------------------------------------------------------------------------------------


def test_triton_interpreter_cases_in_subprocess(run_in_triton_interpreter: Callable[[str, float], None]) -> None:
    if INTERPRET:
        pytest.skip("already under the interpreter")
    run_in_triton_interpreter(str(Path(__file__)), 600)


@pytest.mark.skipif(not INTERPRET, reason="runs under TRITON_INTERPRET=1 (see the subprocess test)")
@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_interp_patched_model_through_triton_matches_hf(arch: str) -> None:
    model = _llama() if arch == "llama" else _mistral()
    patched = copy.deepcopy(model)
    apply_kernels(patched, strict=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="lit_accel kernels")  # a fallback to the reference would warn
        _assert_same(model, patched, rtol=1e-4, atol=1e-5)


def _lora_on_kernels(recompute: bool, dropout: float = 0.0) -> nn.Module:
    from lit_accel.lowrank import apply_lora

    model = _llama()
    apply_kernels(model, strict=True)
    torch.manual_seed(3)
    apply_lora(model, "all-linear", r=4, alpha=8, dropout=dropout, recompute_inputs=recompute)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # B = 0 at init would make dA zero
    return model.train()


@pytest.fixture
def fused_lora_path(monkeypatch: pytest.MonkeyPatch) -> Any:
    """LoRA layers on the CPU take the fused path, as on CUDA (by default they run the PEFT-exact reference there);
    yields the lowrank.lora_groups module for further patches."""
    import lit_accel.lowrank.lora_groups as lora_module
    from lit_accel.lowrank.lora import LoRALinear

    monkeypatch.setattr(LoRALinear, "use_kernel", True)
    return lora_module


@pytest.mark.skipif(not INTERPRET, reason="runs under TRITON_INTERPRET=1 (see the subprocess test)")
@pytest.mark.parametrize("groups", [False, True])
def test_interp_lora_recompute_inputs_same_gradients_without_keeping_the_inputs(
    monkeypatch: pytest.MonkeyPatch, fused_lora_path: Any, groups: bool
) -> None:
    from lit_accel.lowrank.lora import lora_layers

    lora_module = fused_lora_path
    # With groups, the q/k/v and gate/up shared-input groups CUDA runs.
    monkeypatch.setattr(lora_module, "_GROUP_DEVICES", ("cuda", "cpu") if groups else ("cuda",))
    ids, labels = _batch()
    results = {}
    for recompute in (False, True):
        model = _lora_on_kernels(recompute)
        # The inputs are held here so that no freed storage is reused (and its address matched) by a saved tensor.
        inputs: dict[str, torch.Tensor] = {}
        for name, layer in lora_layers(model).items():
            layer.register_forward_pre_hook(lambda m, args, name=name, inputs=inputs: inputs.__setitem__(name, args[0]))
        saved: set[int] = set()

        def pack(t: torch.Tensor, saved: set[int] = saved) -> torch.Tensor:
            saved.add(t.untyped_storage().data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, grads = _loss_and_grads(model, ids, labels)
        kept = {name for name, x in inputs.items() if x.untyped_storage().data_ptr() in saved}
        results[recompute] = (loss, grads, kept)
        # The producers forget their outputs in their own backward: nothing is left registered after a step.
        from lit_accel.ops import recompute as registry

        assert not registry._REGISTRY
    # Same loss and the same gradients bit for bit: the inputs are rebuilt by the kernels that made them. Only dA of
    # the adapters fed by a fused kernel differs, by summation order: it is s u^T x with x rebuilt tile by tile inside
    # the reduction (lowrank_reduce) instead of written out and read back by a matmul.
    torch.testing.assert_close(results[True][0], results[False][0], rtol=0, atol=0)
    assert results[True][1].keys() == results[False][1].keys() and any("lora_A" in k for k in results[True][1])
    for name, g in results[False][1].items():
        exact = "lora_A" not in name or name.endswith("o_proj.lora_A")
        tol = 0 if exact else 1e-5
        torch.testing.assert_close(results[True][1][name], g, rtol=tol, atol=tol, msg=name)
    # Without recompute every adapter keeps its input. With it, o_proj still does (the attention output comes from
    # no fused kernel), and so do block 0's q/k/v: with the embeddings frozen nothing before that norm trains, so it
    # runs without autograd and saves nothing to rebuild from. The other norm outputs (q, k, v, gate, up) and the
    # SwiGLU outputs (down) are freed after the forward.
    assert len(results[False][2]) == 14
    first_qkv = {f"model.layers.0.self_attn.{p}_proj" for p in "qkv"}
    assert results[True][2] == {f"model.layers.{i}.self_attn.o_proj" for i in range(2)} | first_qkv


@pytest.mark.skipif(not INTERPRET, reason="runs under TRITON_INTERPRET=1 (see the subprocess test)")
def test_interp_lora_shared_input_groups_match_the_per_layer_path(
    monkeypatch: pytest.MonkeyPatch, fused_lora_path: Any
) -> None:
    lora_module = fused_lora_path
    calls: list[int] = []
    real = lora_module.lora_linear_group_kernel

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(lora_module, "lora_linear_group_kernel", counting)
    ids, labels = _batch()
    results = []
    for groups in (False, True):
        monkeypatch.setattr(lora_module, "_GROUP_DEVICES", ("cuda", "cpu") if groups else ("cuda",))
        results.append(_loss_and_grads(_lora_on_kernels(recompute=True), ids, labels))
        assert len(calls) == (4 if groups else 0)  # q/k/v and gate/up of both blocks, only with groups
    # Not bit for bit: a group adds the low-rank term and the base product in another order, and reduces its dA
    # over the rebuilt input in one product.
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    assert results[1][1].keys() == results[0][1].keys()
    for name, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], g, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.skipif(not INTERPRET, reason="runs under TRITON_INTERPRET=1 (see the subprocess test)")
def test_interp_lora_recompute_inputs_with_dropout_and_checkpointing(fused_lora_path: Any) -> None:
    ids, labels = _batch()
    results = []
    for recompute in (False, True):
        model = _lora_on_kernels(recompute, dropout=0.2)
        # Non-reentrant checkpointing reruns each block's forward (norms, dropout draws) inside the backward.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(11)
        results.append(_loss_and_grads(model, ids, labels))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    assert results[1][1].keys() == results[0][1].keys()
    for name, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], g, rtol=0, atol=0, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_recompute_recipes_rebuild_the_outputs_bit_for_bit(dtype: torch.dtype) -> None:
    from lit_accel.ops.recompute import recompute_recipe, request_recompute
    from lit_accel.ops.rms_norm import rms_norm
    from lit_accel.ops.swiglu import swiglu

    consumer = torch.nn.Identity()  # the kernels record their outputs only while a consumer asked for recipes
    request_recompute(consumer)
    x = torch.randn(4, 333, 2048, device="cuda", requires_grad=True)
    w = torch.rand(2048, device="cuda") + 0.5
    y = rms_norm(x, w, 1e-6, out_dtype=dtype)
    gate = torch.randn(4, 333, 5632, device="cuda", dtype=dtype, requires_grad=True)
    s = swiglu(gate, torch.randn_like(gate))
    for out in (y, s):
        recipe = recompute_recipe(out)
        assert recipe is not None
        assert torch.equal(recipe.run(*recipe.inputs), out)


@pytest.mark.gpu
def test_gpu_lora_recompute_inputs_same_results_under_bf16_autocast() -> None:
    ids, labels = _batch()
    out = []
    for recompute in (False, True):
        model = _lora_on_kernels(recompute).cuda()
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids.cuda(), labels=labels.cuda()).loss
        loss.backward()
        out.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    # The rebuilt inputs are the kernels' own outputs again; cuBLAS may pick another algorithm between the two
    # models, so allow bf16 rounding rather than bit equality.
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-3, atol=1e-3)
    assert out[1][1].keys() == out[0][1].keys()
    for name, g in out[0][1].items():
        rel = (out[1][1][name].float() - g.float()).norm() / g.float().norm().clamp_min(1e-12)
        assert rel < 1e-2, f"{name}: relative gradient difference {rel:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["llama-tiny", "llama-20m"])
def test_gpu_patched_model_matches_hf_under_bf16_autocast(preset: str) -> None:
    module = CausalLM(preset, kernels=False)
    module.configure_model()
    model = module.model.cuda()
    patched = copy.deepcopy(model)
    apply_kernels(patched, strict=True)
    ids = torch.randint(0, model.config.vocab_size, (4, 256), device="cuda")
    losses, grads = [], []
    for m in (model, patched):
        m.train().zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach().float())
        grads.append({n: p.grad.float() for n, p in m.named_parameters()})
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-3, atol=2e-3)
    for name, ref in grads[0].items():
        rel = (grads[1][name] - ref).norm() / ref.norm().clamp_min(1e-12)
        assert rel < 3e-2, f"{name}: relative gradient error {rel:.3g}"
