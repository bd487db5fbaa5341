"""``apply_kernels`` on every model family: the patched model computes Hugging Face's loss, gradients and logits.

On CPU the patched forwards run the kernels' PyTorch references; the ``interp`` tests run the whole patched model
through the Triton kernels under ``TRITON_INTERPRET=1`` (in a child pytest). Each family brings its own numerics:
Gemma's ``(1 + w)`` RMSNorm rounded after the product (OLMo 2 rounds after the product too), GeGLU (gelu-tanh) MLPs,
per-head (Qwen3, Gemma 3) or whole-projection (OLMo 2) q/k norms, post-norms, Phi-3's fused ``gate_up_proj`` and
partial rotary embedding, Gemma 2's final-logit soft-cap inside the fused loss, and the router's load-balancing
loss of the mixture-of-experts models. ``KERNELS_SUPPORT`` states what the tests assert per family.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from _helpers import FAMILIES, MOE_FAMILIES, tiny_family
from kernel_helpers import assert_same as _assert_same
from torch import nn

from lit_accel.kernels import apply_kernels, kernels_applied, remove_kernels

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

KERNELS_SUPPORT: dict[str, str] = {
    "llama": "yes",
    "qwen3": "yes (q/k norms too)",
    "gemma2": "yes (Gemma norm, GeGLU, logit soft-cap in the fused loss)",
    "gemma3": "yes (Gemma norm, GeGLU, q/k norms)",
    "phi3": "yes (fused gate_up, partial rotary)",
    "olmo2": "yes (post-norms, q/k norms)",
    "mixtral": "norms, RoPE, fused loss + router loss; experts keep HF's forward",
    "qwen3_moe": "norms, RoPE, fused loss + router loss; experts keep HF's forward",
}
"""Family -> what the tests below assert for it."""

# Per family: modules patched per kernel in the tiny model (2 blocks).
COUNTS: dict[str, dict[str, int]] = {
    "llama": {"rms_norm": 5, "swiglu": 2, "rope": 2, "linear_cross_entropy": 1},
    "qwen3": {"rms_norm": 9, "swiglu": 2, "rope": 2, "linear_cross_entropy": 1},
    "gemma2": {"rms_norm": 9, "swiglu": 2, "rope": 2, "linear_cross_entropy": 1},
    "gemma3": {"rms_norm": 13, "swiglu": 2, "rope": 2, "linear_cross_entropy": 1},
    "phi3": {"rms_norm": 5, "swiglu": 2, "rope": 2, "linear_cross_entropy": 1},
    "olmo2": {"rms_norm": 9, "swiglu": 2, "rope": 2, "linear_cross_entropy": 1},
    "mixtral": {"rms_norm": 5, "rope": 2, "linear_cross_entropy": 1},
    "qwen3_moe": {"rms_norm": 9, "swiglu": 1, "rope": 2, "linear_cross_entropy": 1},  # block 1 is dense
}


def _model(family: str, seed: int = 0, **overrides: Any) -> nn.Module:
    # Gemma 2 with its real soft-cap (the tiny preset has HF's default, 30); the MoE models train their router with
    # the load-balancing loss, as MoE training does.
    extra: dict[str, Any] = {"output_router_logits": True} if family in MOE_FAMILIES else {}
    if family == "gemma2":
        extra["final_logit_softcapping"] = 30.0
    return tiny_family(family, seed=seed, **extra, **overrides)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_is_patched_and_matches_hf(family: str) -> None:
    model = _model(family)
    patched = copy.deepcopy(model)
    report = apply_kernels(patched, strict=True)
    assert report.counts() == COUNTS[family] and not report.skipped
    assert bool(report.notes) == (family in MOE_FAMILIES)
    _assert_same(model, patched, rtol=1e-5, atol=1e-6)
    assert remove_kernels(patched).counts() == COUNTS[family] and kernels_applied(patched) == {}


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_training_loss_includes_the_router_loss(family: str) -> None:
    model = _model(family)
    apply_kernels(model, strict=True)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    out = model(input_ids=ids, labels=ids)
    assert out.logits is None and out.aux_loss is not None and float(out.aux_loss) > 0
    plain = model(input_ids=ids, labels=ids, output_router_logits=False)
    coef = model.config.router_aux_loss_coef
    torch.testing.assert_close(out.loss, plain.loss + coef * out.aux_loss, rtol=1e-6, atol=1e-6)


def test_gemma2_softcap_changes_the_loss_and_is_kept() -> None:
    capped = _model("gemma2")
    capped.config.final_logit_softcapping = 0.01  # a cap this low squashes every logit into +-0.01
    uncapped = copy.deepcopy(capped)
    uncapped.config.final_logit_softcapping = None
    for m in (capped, uncapped):
        apply_kernels(m, strict=True)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        a, b = capped(input_ids=ids, labels=ids).loss, uncapped(input_ids=ids, labels=ids).loss
    log_v = float(torch.log(torch.tensor(256.0)))
    assert abs(float(a) - log_v) < 0.02 < abs(float(b) - log_v)  # capped logits are all near 0: loss = log V


# --------------------------------------------------------------------------------------------------------------
# The whole patched model through the Triton kernels (CPU interpreter)
# --------------------------------------------------------------------------------------------------------------


def test_triton_interpreter_cases_in_subprocess(run_in_triton_interpreter: Callable[[str, float], None]) -> None:
    if INTERPRET:
        pytest.skip("already under the interpreter")
    run_in_triton_interpreter(str(Path(__file__)), 600)


@pytest.mark.skipif(not INTERPRET, reason="runs under TRITON_INTERPRET=1 (see the subprocess test)")
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llama"])
def test_interp_every_family_through_triton_matches_hf(family: str) -> None:
    # Interpreted Triton runs numpy per program: the smallest shapes that still have GQA and several blocks per row.
    small = dict(hidden_size=64, intermediate_size=96, vocab_size=128, num_hidden_layers=1)
    if family not in ("phi3", "olmo2", "mixtral"):
        small["head_dim"] = 16
    if family == "qwen3_moe":
        small.update(moe_intermediate_size=32, mlp_only_layers=[])
    model = _model(family, **small)
    patched = copy.deepcopy(model)
    apply_kernels(patched, strict=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="lit_accel kernels")  # a fallback to the reference would warn
        _assert_same(model, patched, rtol=1e-4, atol=1e-5, seq=8)


# --------------------------------------------------------------------------------------------------------------
# GPU: bf16 autocast at a real head size
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llama"])
def test_gpu_every_family_matches_hf_under_bf16_autocast(family: str) -> None:
    model = _model(family, seed=1).cuda()
    patched = copy.deepcopy(model)
    apply_kernels(patched, strict=True)
    ids = torch.randint(0, 256, (4, 64), device="cuda")
    losses, grads = [], []
    for m in (model, patched):
        m.train()
        m.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16), warnings.catch_warnings():
            warnings.filterwarnings("error", message="lit_accel kernels")
            loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(float(loss))
        grads.append(torch.cat([p.grad.float().flatten() for p in m.parameters() if p.grad is not None]))
    assert abs(losses[1] - losses[0]) <= 1e-2 * abs(losses[0])
    assert float((grads[1] - grads[0]).norm() / grads[0].norm()) <= 5e-2
