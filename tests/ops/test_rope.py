"""RoPE: the reference against HF's ``apply_rotary_pos_emb`` with a real ``LlamaRotaryEmbedding`` (default and
Llama 3 frequency scaling) and Phi-3's partial rotary one, the Triton kernel against the reference and HF.

The Triton kernel runs on CPU only under ``TRITON_INTERPRET=1``, which must be set before triton is first
imported, so when this process was not started with it one test runs this file's ``interp`` cases in a child
pytest with the variable set (see ``run_in_triton_interpreter`` in tests/conftest.py).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, Phi3Config
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
from transformers.models.phi3 import modeling_phi3

from lit_accel.ops.rope import (
    RoPEFunction,
    apply_rope,
    apply_rope_reference,
    rope_fallback_reason,
    rope_kernel_available,
)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Reference vs HF: the same operations; tolerances per result dtype.
_TOL = {torch.float32: (1e-6, 1e-6), torch.bfloat16: (1.6e-2, 1e-3), torch.float16: (1e-3, 1e-4)}


def _cos_sin(
    b: int, s: int, d: int, dtype: torch.dtype, device: str = "cpu", per_batch: bool = False, theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin from a real LlamaRotaryEmbedding: (1, S, D), or (B, S, D) with a different offset per sequence."""
    cfg = LlamaConfig(hidden_size=d, num_attention_heads=1, num_key_value_heads=1, head_dim=d,
                      rope_parameters={"rope_type": "default", "rope_theta": theta})  # fmt: skip
    rope = LlamaRotaryEmbedding(cfg).to(device)
    pos = torch.arange(s, device=device)[None]
    if per_batch:
        pos = pos + 37 * torch.arange(b, device=device)[:, None]
    x = torch.empty(1, device=device, dtype=dtype)  # only its dtype/device matter
    cos, sin = rope(x, pos)
    return cos, sin


LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip


def _llama3_cos_sin(
    b: int, s: int, d: int, dtype: torch.dtype, rope_parameters: dict[str, Any] = LLAMA3, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin from a LlamaRotaryEmbedding with Llama 3 frequency scaling, per-sequence positions past the original
    context (where the scaled frequencies differ from the default ones)."""
    cfg = LlamaConfig(hidden_size=d, num_attention_heads=1, num_key_value_heads=1, head_dim=d,
                      max_position_embeddings=8 * 64, rope_parameters=dict(rope_parameters))  # fmt: skip
    rope = LlamaRotaryEmbedding(cfg).to(device)
    pos = 300 + torch.arange(s, device=device)[None] + 100 * torch.arange(b, device=device)[:, None]
    cos, sin = rope(torch.empty(1, device=device, dtype=dtype), pos)
    return cos, sin


def _phi3_cos_sin(
    b: int, s: int, h: int, d: int, factor: float, dtype: torch.dtype, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``(B, S, R)`` from a Phi3RotaryEmbedding with ``partial_rotary_factor``: ``R = int(d * factor)``."""
    cfg = Phi3Config(hidden_size=h * d, num_attention_heads=h, num_key_value_heads=h,
                     partial_rotary_factor=factor, pad_token_id=0)  # type: ignore[call-arg]  # fmt: skip
    rope = modeling_phi3.Phi3RotaryEmbedding(cfg).to(device)
    pos = torch.arange(s, device=device)[None] + 11 * torch.arange(b, device=device)[:, None]
    cos, sin = rope(torch.empty(1, device=device, dtype=dtype), pos)
    assert cos.shape == (b, s, int(d * factor))
    return cos, sin


def _qk(
    b: int, s: int, hq: int, hkv: int, d: int, dtype: torch.dtype, device: str = "cpu", hf_layout: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """q/k as HF makes them: ``proj(x).view(B, S, H, D).transpose(1, 2)`` (non-contiguous), leaf tensors."""
    if hf_layout:
        q = torch.randn(b, s, hq * d, device=device, dtype=dtype).view(b, s, hq, d).transpose(1, 2)
        k = torch.randn(b, s, hkv * d, device=device, dtype=dtype).view(b, s, hkv, d).transpose(1, 2)
    else:
        q = torch.randn(b, hq, s, d, device=device, dtype=dtype)
        k = torch.randn(b, hkv, s, d, device=device, dtype=dtype)
    return q.requires_grad_(), k.requires_grad_()


def _grads(
    outs: tuple[torch.Tensor, torch.Tensor], ins: list[torch.Tensor], gs: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(outs, ins, gs)


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same strides wherever they matter (a size-1 dim's stride is arbitrary)."""
    return a.shape == b.shape and all(n == 1 or sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------------------------
# Reference vs Hugging Face
# ---------------------------------------------------------------------------------------------------------------

_SHAPES = [(1, 1, 1, 1, 32), (2, 7, 4, 2, 40), (3, 33, 6, 6, 64), (1, 130, 4, 1, 128)]
# (q/k dtype, cos/sin dtype): the last two are bf16-mixed (fp32 hidden states -> fp32 cos, bf16 projections).
_DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
           (torch.bfloat16, torch.float32)]  # fmt: skip


@pytest.mark.parametrize(("b", "s", "hq", "hkv", "d"), _SHAPES)
@pytest.mark.parametrize(("dtype", "cs_dtype"), _DTYPES)
@pytest.mark.parametrize("per_batch", [False, True])
def test_reference_matches_hf(
    b: int, s: int, hq: int, hkv: int, d: int, dtype: torch.dtype, cs_dtype: torch.dtype, per_batch: bool
) -> None:
    q, k = _qk(b, s, hq, hkv, d, dtype)
    cos, sin = _cos_sin(b, s, d, cs_dtype, per_batch=per_batch)
    assert cos.shape == ((b if per_batch else 1), s, d) and cos.dtype == cs_dtype
    got = apply_rope_reference(q, k, cos, sin)
    exp = apply_rotary_pos_emb(q, k, cos, sin)
    out_dtype = torch.promote_types(dtype, cs_dtype)
    rtol, atol = _TOL[out_dtype]
    for a, e in zip(got, exp):
        assert a.dtype == e.dtype == out_dtype
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol)
    gs = (torch.randn_like(got[0]), torch.randn_like(got[1]))
    for a, e in zip(_grads(got, [q, k], gs), _grads(exp, [q, k], gs)):
        assert a.dtype == e.dtype == dtype
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol)


def test_reference_unsqueeze_dim_2_and_out_dtype() -> None:
    q = torch.randn(2, 9, 4, 32, requires_grad=True)  # (B, S, H, D)
    k = torch.randn(2, 9, 2, 32, requires_grad=True)
    cos, sin = _cos_sin(2, 9, 32, torch.float32, per_batch=True)
    got = apply_rope_reference(q, k, cos, sin, unsqueeze_dim=2)
    exp = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
    for a, e in zip(got, exp):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    qb, kb = apply_rope(q, k, cos, sin, unsqueeze_dim=2, out_dtype=torch.bfloat16)
    assert qb.dtype == kb.dtype == torch.bfloat16
    torch.testing.assert_close(qb, exp[0].to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize(("dtype", "cs_dtype"), _DTYPES)
@pytest.mark.parametrize(("d", "factor"), [(32, 0.5), (64, 0.25), (48, 0.75)])
def test_reference_partial_rotary_matches_hf_phi3(
    d: int, factor: float, dtype: torch.dtype, cs_dtype: torch.dtype
) -> None:
    q, k = _qk(2, 7, 4, 2, d, dtype)
    cos, sin = _phi3_cos_sin(2, 7, 4, d, factor, cs_dtype)
    got = apply_rope_reference(q, k, cos, sin)
    exp = modeling_phi3.apply_rotary_pos_emb(q, k, cos, sin)
    rot = cos.shape[-1]
    for a, e, x in zip(got, exp, (q, k)):
        assert a.dtype == e.dtype == torch.promote_types(dtype, cs_dtype)
        torch.testing.assert_close(a, e, rtol=0, atol=0)
        assert torch.equal(a[..., rot:], x[..., rot:].to(a.dtype))  # pass-through channels
        assert not torch.equal(a[..., :rot], x[..., :rot].to(a.dtype))
    gs = (torch.randn_like(got[0]), torch.randn_like(got[1]))
    for a, e, gy in zip(_grads(got, [q, k], gs), _grads(exp, [q, k], gs), gs):
        assert a.dtype == dtype
        torch.testing.assert_close(a, e, rtol=0, atol=0)
        assert torch.equal(a[..., rot:], gy[..., rot:].to(dtype))  # the gradient passes through unchanged


@pytest.mark.parametrize(("dtype", "cs_dtype"), [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
def test_reference_llama3_scaled_tables_match_hf(dtype: torch.dtype, cs_dtype: torch.dtype) -> None:
    q, k = _qk(2, 40, 4, 2, 64, dtype)
    cos, sin = _llama3_cos_sin(2, 40, 64, cs_dtype)
    default_cos, default_sin = _llama3_cos_sin(2, 40, 64, cs_dtype, {"rope_type": "default", "rope_theta": 500000.0})
    # The scaling changes the tables' low frequencies: visibly so at these positions.
    assert (cos - default_cos).abs().max() > 0.1 and (sin - default_sin).abs().max() > 0.1
    got = apply_rope_reference(q, k, cos, sin)
    exp = apply_rotary_pos_emb(q, k, cos, sin)
    for a, e in zip(got, exp):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    gs = (torch.randn_like(got[0]), torch.randn_like(got[1]))
    for a, e in zip(_grads(got, [q, k], gs), _grads(exp, [q, k], gs)):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_reference_is_a_rotation_whose_backward_is_the_inverse() -> None:
    # With HF's cos/sin the map is orthogonal: the gradient of <y, g> is R^T g, i.e. rotating g back.
    q, k = _qk(2, 11, 3, 1, 64, torch.float64)
    cos, sin = _cos_sin(2, 11, 64, torch.float64)
    qe, _ = apply_rope_reference(q, k, cos, sin)
    torch.testing.assert_close(qe.norm(dim=-1), q.norm(dim=-1))
    gq = torch.randn_like(qe)
    (dq,) = torch.autograd.grad(qe, [q], gq)
    back, _ = apply_rope_reference(gq, gq, cos, -sin)  # rotation by -angle
    torch.testing.assert_close(dq, back)
    q3, c3, s3 = q[:1, :1, :3].detach().requires_grad_(), cos[:, :3].clone().requires_grad_(), sin[:, :3]
    assert torch.autograd.gradcheck(lambda a, c: apply_rope_reference(a, a, c, s3)[0], (q3, c3))


# ---------------------------------------------------------------------------------------------------------------
# Dispatch and bad input (CPU, no interpreter)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(INTERPRET, reason="checks the plain-CPU dispatch")
def test_cpu_dispatch_takes_the_reference_and_says_why() -> None:
    q, k = _qk(1, 4, 2, 1, 16, torch.float32)
    cos, sin = _cos_sin(1, 4, 16, torch.float32)
    assert not rope_kernel_available(q, k, cos, sin)
    reason = rope_fallback_reason(q, k, cos, sin)
    assert reason is not None and ("cpu" in reason or "triton" in reason)
    for a, e in zip(apply_rope(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)):
        assert torch.equal(a, e)
    with pytest.raises(ValueError, match="use_kernel=True"):
        apply_rope(q, k, cos, sin, use_kernel=True)


def test_bad_input_raises_naming_the_argument() -> None:
    q, k = _qk(2, 5, 4, 2, 16, torch.float32)
    cos, sin = _cos_sin(2, 5, 16, torch.float32)
    with pytest.raises(ValueError, match="unsqueeze_dim must be 1 .* or 2 .*, got 3"):
        apply_rope(q, k, cos, sin, unsqueeze_dim=3)
    with pytest.raises(ValueError, match=r"q must be 4-D .*got \(2, 4, 5\)"):
        apply_rope(q[:, :, :, 0], k, cos, sin)
    with pytest.raises(ValueError, match=r"q and k must agree.*\(2, 2, 5, 8\)"):
        apply_rope(q, k[..., :8], cos, sin)
    with pytest.raises(ValueError, match=r"cos/sin must have shape \(2, 5, 16\) or \(1, 5, 16\).*got \(1, 6, 16\)"):
        c6, s6 = _cos_sin(1, 6, 16, torch.float32)
        apply_rope(q, k, c6, s6)
    with pytest.raises(ValueError, match="cos and sin must have the same shape"):
        apply_rope(q, k, cos, sin[:, :4])
    with pytest.raises(TypeError, match="sin must be a torch.Tensor, got NoneType"):
        apply_rope(q, k, cos, None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="k must be a floating-point tensor, got dtype torch.int64"):
        apply_rope(q, torch.zeros(2, 2, 5, 16, dtype=torch.long), cos, sin)
    with pytest.raises(TypeError, match="out_dtype must be None or a floating-point torch.dtype, got torch.int32"):
        apply_rope(q, k, cos, sin, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="unsqueeze_dim"):
        rope_kernel_available(q, k, cos, sin, unsqueeze_dim=0)
    # Partial rotary takes a narrower cos/sin, never a wider one.
    wide = torch.randn(2, 5, 18)
    with pytest.raises(ValueError, match=r"or a last dim R with 0 < R < 16 for partial rotary, got \(2, 5, 18\)"):
        apply_rope(q, k, wide, wide)
    with pytest.raises(ValueError, match=r"got \(2, 5, 0\)"):
        apply_rope(q, k, wide[..., :0], wide[..., :0])


def test_cos_requiring_grad_gets_its_gradient_from_the_reference() -> None:
    q, k = _qk(1, 3, 2, 1, 8, torch.float64)
    cos, sin = _cos_sin(1, 3, 8, torch.float64)
    cos.requires_grad_()
    qe, ke = apply_rope(q, k, cos, sin)
    (dcos,) = torch.autograd.grad((qe.sum() + ke.sum()), [cos])
    torch.testing.assert_close(dcos[0], (q.sum(1) + k.sum(1))[0])


# ---------------------------------------------------------------------------------------------------------------
# Triton kernel under the CPU interpreter
# ---------------------------------------------------------------------------------------------------------------


def _check_kernel(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    unsqueeze_dim: int = 1,
    hf: Callable[..., tuple[torch.Tensor, torch.Tensor]] = apply_rotary_pos_emb,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel against HF's ``hf`` (LLaMA's ``apply_rotary_pos_emb`` by default): values, the documented output
    layout, and the gradients of whichever of ``q``/``k`` require one."""
    assert rope_kernel_available(q, k, cos, sin, unsqueeze_dim)
    got = apply_rope(q, k, cos, sin, unsqueeze_dim)
    assert isinstance(got[0].grad_fn, RoPEFunction._backward_cls) or unsqueeze_dim == 2  # type: ignore[attr-defined]
    exp = hf(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    for a, e, x in zip(got, exp, (q, k)):
        assert a.dtype == e.dtype and a.shape == e.shape
        assert _same_layout(a, x)  # the documented output layout: the input's strides
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    need = [x.requires_grad for x in (q, k)]
    ins = [x for x, n in zip((q, k), need) if n]
    gs = [torch.randn_like(e) for e, n in zip(exp, need) if n]
    got_g = torch.autograd.grad([a for a, n in zip(got, need) if n], ins, gs)
    exp_g = torch.autograd.grad([e for e, n in zip(exp, need) if n], ins, gs)
    for a, e, x in zip(got_g, exp_g, ins):
        assert _same_layout(a, x)  # gradients in the input's layout: HF's view/transpose undo for free
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    return got


if not INTERPRET:

    @pytest.mark.skipif(sys.platform != "linux", reason="triton is Linux-only")
    def test_triton_interpreter_cases_in_subprocess(run_in_triton_interpreter: Callable[[str, float], None]) -> None:
        run_in_triton_interpreter(str(Path(__file__)), 300)

else:

    @pytest.mark.parametrize(
        ("b", "s", "hq", "hkv", "d"),
        [(1, 1, 1, 1, 32), (2, 7, 4, 2, 40), (1, 9, 8, 2, 64), (2, 5, 3, 3, 128), (1, 3, 40, 8, 128)],
    )
    @pytest.mark.parametrize("per_batch", [False, True])
    def test_interp_kernel_matches_hf(b: int, s: int, hq: int, hkv: int, d: int, per_batch: bool) -> None:
        # (1, 3, 40, 8, 128): 40 heads x 64-wide halves exceed one head tile, so the head loop runs twice.
        q, k = _qk(b, s, hq, hkv, d, torch.float32)
        cos, sin = _cos_sin(b, s, d, torch.float32, per_batch=per_batch)
        _check_kernel(q, k, cos, sin)

    def test_interp_kernel_contiguous_bhsd_inputs_and_random_cos() -> None:
        # Contiguous (B, H, S, D) inputs, and cos/sin whose halves differ (nothing assumes cat(freqs, freqs)).
        q, k = _qk(2, 6, 4, 2, 48, torch.float32, hf_layout=False)
        cos, sin = torch.randn(2, 6, 48), torch.randn(2, 6, 48)
        _check_kernel(q, k, cos, sin)

    def test_interp_kernel_unsqueeze_dim_2() -> None:
        q = torch.randn(2, 5, 4, 32, requires_grad=True)  # (B, S, H, D)
        k = torch.randn(2, 5, 1, 32, requires_grad=True)
        cos, sin = _cos_sin(2, 5, 32, torch.float32)
        _check_kernel(q, k, cos, sin, unsqueeze_dim=2)

    def test_interp_kernel_only_q_needs_grad_and_broadcast_grads() -> None:
        q, k = _qk(1, 4, 2, 1, 16, torch.float32)
        k = k.detach()
        cos, sin = _cos_sin(1, 4, 16, torch.float32)
        _check_kernel(q, k, cos, sin)
        # .sum() hands backward stride-0 (expanded) gradients; the kernel reads them through their strides.
        qe, ke = apply_rope(q, k, cos, sin)
        (dq,) = torch.autograd.grad(qe.sum() + 2 * ke.sum(), [q])
        qr, _ = apply_rotary_pos_emb(q, k, cos, sin)
        (exp,) = torch.autograd.grad(qr.sum(), [q])
        torch.testing.assert_close(dq, exp, rtol=1e-5, atol=1e-6)

    def test_interp_backward_saves_no_activations() -> None:
        q, k = _qk(2, 8, 4, 2, 32, torch.float32)
        cos, sin = _cos_sin(2, 8, 32, torch.float32)
        saved: list[torch.Tensor] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            apply_rope(q, k, cos, sin)
        # only cos and sin (batch-expanded views of HF's shared tensors: no new memory)
        assert len(saved) == 2
        assert {t.untyped_storage().data_ptr() for t in saved} == {
            cos.untyped_storage().data_ptr(),
            sin.untyped_storage().data_ptr(),
        }

    def test_interp_kernel_out_dtype_and_fallbacks() -> None:
        q, k = _qk(1, 3, 2, 2, 16, torch.float32)
        cos, sin = _cos_sin(1, 3, 16, torch.float32)
        assert rope_kernel_available(q, k, cos, sin, out_dtype=torch.float32)
        reason = rope_fallback_reason(q, k, cos, sin, out_dtype=torch.float16)
        assert reason is not None and "out_dtype" in reason
        qe, _ = apply_rope(q, k, cos, sin, out_dtype=torch.float16)  # reference path
        assert qe.dtype == torch.float16
        q_odd, k_odd = _qk(1, 3, 2, 2, 15, torch.float32)
        c_odd, s_odd = torch.randn(1, 3, 15), torch.randn(1, 3, 15)
        reason = rope_fallback_reason(q_odd, k_odd, c_odd, s_odd)
        assert reason is not None and "head_dim=15" in reason
        for a, e in zip(apply_rope(q_odd, k_odd, c_odd, s_odd), apply_rotary_pos_emb(q_odd, k_odd, c_odd, s_odd)):
            assert torch.equal(a, e)
        cos_g = cos.clone().requires_grad_()
        reason = rope_fallback_reason(q, k, cos_g, sin)
        assert reason is not None and "cos/sin require grad" in reason
        with pytest.raises(ValueError, match="use_kernel=True.*cos/sin require grad"):
            apply_rope(q, k, cos_g, sin, use_kernel=True)

    @pytest.mark.parametrize(
        ("b", "s", "hq", "hkv", "d", "factor"),
        # (rot, pass): (16, 16), (16, 48) with a pass tile wider than the halves, (36, 12) with non-power-of-two
        # halves, 40 heads of 128 (96 rotated) spanning two head tiles.
        [(2, 5, 4, 2, 32, 0.5), (1, 6, 3, 1, 64, 0.25), (2, 3, 2, 2, 48, 0.75), (1, 2, 40, 8, 128, 0.75)],
    )
    def test_interp_partial_rotary_kernel_matches_hf_phi3(
        b: int, s: int, hq: int, hkv: int, d: int, factor: float
    ) -> None:
        q, k = _qk(b, s, hq, hkv, d, torch.float32)
        cos, sin = _phi3_cos_sin(b, s, hq, d, factor, torch.float32)
        _check_kernel(q, k, cos, sin, hf=modeling_phi3.apply_rotary_pos_emb)

    def test_interp_partial_rotary_unsqueeze_dim_2_only_q_grad_and_out_dtype() -> None:
        q = torch.randn(2, 5, 4, 32, requires_grad=True)  # (B, S, H, D)
        k = torch.randn(2, 5, 1, 32)
        cos, sin = _phi3_cos_sin(2, 5, 4, 32, 0.5, torch.float32)
        _check_kernel(q, k, cos, sin, unsqueeze_dim=2, hf=modeling_phi3.apply_rotary_pos_emb)
        # Contiguous (B, H, S, D) inputs and random tables whose halves differ.
        q2, k2 = _qk(2, 6, 4, 2, 48, torch.float32, hf_layout=False)
        c2, s2 = torch.randn(1, 6, 20), torch.randn(1, 6, 20)
        _check_kernel(q2, k2, c2, s2, hf=modeling_phi3.apply_rotary_pos_emb)
        # Without autograd, and an odd rotary width, which the kernel does not take: the reference.
        with torch.no_grad():
            qe, ke = apply_rope(q2, k2, c2, s2)
        for a, e in zip((qe, ke), modeling_phi3.apply_rotary_pos_emb(q2, k2, c2, s2)):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
        c_odd, s_odd = torch.randn(1, 6, 21), torch.randn(1, 6, 21)
        reason = rope_fallback_reason(q2, k2, c_odd, s_odd)
        assert reason is not None and "rotary width 21 (cos.shape[-1]) is odd" in reason
        for a, e in zip(apply_rope(q2, k2, c_odd, s_odd), modeling_phi3.apply_rotary_pos_emb(q2, k2, c_odd, s_odd)):
            assert torch.equal(a, e)

    def test_interp_kernel_llama3_scaled_tables_match_hf() -> None:
        q, k = _qk(2, 9, 4, 2, 64, torch.float32)
        cos, sin = _llama3_cos_sin(2, 9, 64, torch.float32)
        _check_kernel(q, k, cos, sin)

    def test_interp_kernel_in_attention_matches_hf_projection_grads() -> None:
        # q/k/v projections -> RoPE -> SDPA (GQA) -> loss: weight gradients through our kernel equal HF's.
        b, s, hq, hkv, d, hidden = 2, 6, 4, 2, 16, 64
        wq = (torch.randn(hq * d, hidden) / hidden**0.5).requires_grad_()
        wk = (torch.randn(hkv * d, hidden) / hidden**0.5).requires_grad_()
        wv = torch.randn(hkv * d, hidden) / hidden**0.5
        x = torch.randn(b, s, hidden)
        cos, sin = _cos_sin(b, s, d, torch.float32)

        def attn(rope: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
            q = (x @ wq.t()).view(b, s, hq, d).transpose(1, 2)
            k = (x @ wk.t()).view(b, s, hkv, d).transpose(1, 2)
            v = (x @ wv.t()).view(b, s, hkv, d).transpose(1, 2)
            q, k = rope(q, k, cos, sin)
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            return o.transpose(1, 2).reshape(b, s, hq * d)

        g = torch.randn(b, s, hq * d)
        got, exp = attn(apply_rope), attn(apply_rotary_pos_emb)
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)
        for a, e in zip(torch.autograd.grad(got, [wq, wk], g), torch.autograd.grad(exp, [wq, wk], g)):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# GPU: real shapes
# ---------------------------------------------------------------------------------------------------------------

# llama-1b: B=8, S=2048, 32 query heads / 4 KV heads of 64; llama-125m: B=16, S=2048, 12 heads of 64.
_GPU_SHAPES = [(8, 2048, 32, 4, 64), (16, 2048, 12, 12, 64)]
_GPU_DTYPES = [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)]


@pytest.mark.gpu
@pytest.mark.parametrize(("b", "s", "hq", "hkv", "d"), _GPU_SHAPES)
@pytest.mark.parametrize(("dtype", "cs_dtype"), _GPU_DTYPES)
def test_gpu_kernel_real_shapes(
    b: int, s: int, hq: int, hkv: int, d: int, dtype: torch.dtype, cs_dtype: torch.dtype
) -> None:
    q, k = _qk(b, s, hq, hkv, d, dtype, device="cuda")
    cos, sin = _cos_sin(b, s, d, cs_dtype, device="cuda")
    assert rope_kernel_available(q, k, cos, sin)
    got = apply_rope(q, k, cos, sin)
    out_dtype = torch.promote_types(dtype, cs_dtype)
    gs = (torch.randn_like(got[0]), torch.randn_like(got[1]))
    grads = _grads(got, [q, k], gs)
    # fp64 reference on the same inputs: the kernel computes in fp32 and rounds once to the output dtype.
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    exp = apply_rope_reference(q64, k64, cos.double(), sin.double())
    egrads = _grads(exp, [q64, k64], (gs[0].double(), gs[1].double()))
    rtol, atol = (2**-8, 1e-5) if out_dtype == torch.bfloat16 else (1e-5, 1e-5)
    for a, e, x in zip(got, exp, (q, k)):
        assert a.dtype == out_dtype and _same_layout(a, x)
        torch.testing.assert_close(a.double(), e, rtol=rtol, atol=atol)
    g_rtol, g_atol = (2**-8, 1e-5) if dtype == torch.bfloat16 else (1e-5, 1e-5)
    for a, e, x in zip(grads, egrads, (q, k)):
        assert a.dtype == dtype and _same_layout(a, x)
        torch.testing.assert_close(a.double(), e, rtol=g_rtol, atol=g_atol)
    # and HF in its own dtype is no closer to the exact result than we are
    hf = apply_rotary_pos_emb(q.detach(), k.detach(), cos, sin)
    assert _rel(got[0], exp[0]) <= _rel(hf[0], exp[0]) + 1e-6


@pytest.mark.gpu
def test_gpu_unsqueeze_dim_2_and_per_batch_positions() -> None:
    b, s, hq, hkv, d = 4, 1000, 16, 4, 128
    q = torch.randn(b, s, hq, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, s, hkv, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cos, sin = _cos_sin(b, s, d, torch.float32, device="cuda", per_batch=True)
    got = apply_rope(q, k, cos, sin, unsqueeze_dim=2, out_dtype=torch.bfloat16)
    exp = apply_rope_reference(q.float(), k.float(), cos, sin, unsqueeze_dim=2)
    for a, e in zip(got, exp):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), e, rtol=2**-8, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_partial_rotary_real_shapes(dtype: torch.dtype) -> None:
    # Phi-4-mini's attention: 24 query / 8 KV heads of 128, 96 channels rotated; fp32 tables as under bf16-mixed.
    b, s, hq, hkv, d = 4, 2048, 24, 8, 128
    q, k = _qk(b, s, hq, hkv, d, dtype, device="cuda")
    cos, sin = _phi3_cos_sin(b, s, hq, d, 0.75, torch.float32, device="cuda")
    assert rope_kernel_available(q, k, cos, sin)
    got = apply_rope(q, k, cos, sin, out_dtype=dtype)
    gs = (torch.randn_like(got[0]), torch.randn_like(got[1]))
    grads = _grads(got, [q, k], gs)
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    exp = modeling_phi3.apply_rotary_pos_emb(q64, k64, cos.double(), sin.double())
    egrads = _grads(exp, [q64, k64], (gs[0].double(), gs[1].double()))
    rtol, atol = (2**-8, 1e-5) if dtype == torch.bfloat16 else (1e-5, 1e-5)
    for a, e, x in zip(got, exp, (q, k)):
        assert a.dtype == dtype and _same_layout(a, x)
        torch.testing.assert_close(a.double(), e, rtol=rtol, atol=atol)
        assert torch.equal(a[..., 96:], x[..., 96:])  # pass-through, bit for bit
    for a, e, gy in zip(grads, egrads, gs):
        torch.testing.assert_close(a.double(), e, rtol=rtol, atol=atol)
        assert torch.equal(a[..., 96:], gy[..., 96:])


@pytest.mark.gpu
def test_gpu_llama3_scaled_tables() -> None:
    b, s, hq, hkv, d = 4, 2048, 32, 8, 64
    q, k = _qk(b, s, hq, hkv, d, torch.bfloat16, device="cuda")
    cos, sin = _llama3_cos_sin(b, s, d, torch.float32, device="cuda")
    got = apply_rope(q, k, cos, sin)
    exp = apply_rope_reference(q.detach().double(), k.detach().double(), cos.double(), sin.double())
    for a, e in zip(got, exp):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-5)
