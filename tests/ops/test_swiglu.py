"""SwiGLU: the reference against HF's ``LlamaMLP``, the Triton kernel against the reference.

The Triton kernel runs on CPU only under ``TRITON_INTERPRET=1``, which must be set before triton is first
imported, so when this process was not started with it one test runs this file's ``interp`` cases in a child
pytest with the variable set (see ``run_in_triton_interpreter`` in tests/conftest.py).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from lit_accel.ops.swiglu import (
    SwiGLUFunction,
    swiglu,
    swiglu_fallback_reason,
    swiglu_kernel_available,
    swiglu_reference,
)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Reference vs HF: the same operations, so only summation-free elementwise differences (none expected); the
# tolerances still scale with the dtype so a change of op order would show as a real failure, not noise.
_TOL = {torch.float32: (1e-6, 1e-6), torch.bfloat16: (1.6e-2, 1e-3), torch.float16: (1e-3, 1e-4)}


def _mlp(hidden: int, inter: int, dtype: torch.dtype) -> LlamaMLP:
    cfg = LlamaConfig(
        hidden_size=hidden, intermediate_size=inter, hidden_act="silu", num_attention_heads=1, num_key_value_heads=1
    )
    mlp = LlamaMLP(cfg).to(dtype)
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(0.0, hidden**-0.5)
    return mlp


def _ours_mlp(mlp: LlamaMLP, x: torch.Tensor, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    out: torch.Tensor = mlp.down_proj(fn(mlp.gate_proj(x), mlp.up_proj(x)))
    return out


def _mlp_grads(mlp: LlamaMLP, x: torch.Tensor, y: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(y, [x, *mlp.parameters()], g))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------------------------
# Reference vs Hugging Face
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("rows", "hidden", "inter"), [(1, 16, 24), (7, 24, 88), (300, 20, 37), (33, 64, 172)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_matches_hf_llama_mlp(rows: int, hidden: int, inter: int, dtype: torch.dtype) -> None:
    mlp = _mlp(hidden, inter, dtype)
    x = torch.randn(2, rows, hidden, dtype=dtype, requires_grad=True)
    y_hf = mlp(x)
    y = _ours_mlp(mlp, x, swiglu_reference)
    rtol, atol = _TOL[dtype]
    torch.testing.assert_close(y, y_hf, rtol=rtol, atol=atol)
    g = torch.randn_like(y)
    for got, exp in zip(_mlp_grads(mlp, x, y, g), _mlp_grads(mlp, x, y_hf, g)):
        torch.testing.assert_close(got, exp, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_hf_act_fn_on_gate_and_up(dtype: torch.dtype) -> None:
    mlp = _mlp(16, 24, dtype)
    gate = torch.randn(5, 24, dtype=dtype, requires_grad=True)
    up = torch.randn(5, 24, dtype=dtype, requires_grad=True)
    y, y_hf = swiglu_reference(gate, up), mlp.act_fn(gate) * up
    assert y.dtype == y_hf.dtype == dtype
    rtol, atol = _TOL[dtype]
    torch.testing.assert_close(y, y_hf, rtol=rtol, atol=atol)
    g = torch.randn_like(y)
    for got, exp in zip(torch.autograd.grad(y, [gate, up], g), torch.autograd.grad(y_hf, [gate, up], g)):
        torch.testing.assert_close(got, exp, rtol=rtol, atol=atol)


def test_reference_against_closed_form_gradient() -> None:
    gate = torch.randn(4, 19, dtype=torch.float64, requires_grad=True)
    up = torch.randn(4, 19, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu_reference, (gate, up))
    y = swiglu_reference(gate, up)
    g = torch.randn_like(y)
    dg, du = torch.autograd.grad(y, [gate, up], g)
    sig = torch.sigmoid(gate)
    torch.testing.assert_close(dg, g * up * sig * (1 + gate * (1 - sig)))
    torch.testing.assert_close(du, g * gate * sig)


def test_output_dtype_is_the_promotion() -> None:
    gate = torch.randn(3, 8, dtype=torch.bfloat16)
    up = torch.randn(3, 8, dtype=torch.float32)
    assert swiglu(gate, up).dtype == torch.float32
    assert swiglu(up, gate).dtype == torch.float32
    assert swiglu(gate, gate).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------------------------
# Dispatch and bad input (CPU, no interpreter)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(INTERPRET, reason="checks the plain-CPU dispatch")
def test_cpu_dispatch_takes_the_reference_and_says_why() -> None:
    gate, up = torch.randn(3, 8), torch.randn(3, 8)
    assert not swiglu_kernel_available(gate, up)
    reason = swiglu_fallback_reason(gate, up)
    assert reason is not None and ("cpu" in reason or "triton" in reason)
    assert torch.equal(swiglu(gate, up), swiglu_reference(gate, up))
    with pytest.raises(ValueError, match="use_kernel=True"):
        swiglu(gate, up, use_kernel=True)


def test_use_kernel_false_is_the_reference() -> None:
    gate, up = torch.randn(3, 8), torch.randn(3, 8)
    assert torch.equal(swiglu(gate, up, use_kernel=False), swiglu_reference(gate, up))


def test_bad_input_raises_naming_the_argument() -> None:
    with pytest.raises(ValueError, match=r"same shape.*\(3, 8\).*\(3, 9\)"):
        swiglu(torch.randn(3, 8), torch.randn(3, 9))
    with pytest.raises(TypeError, match="gate must be a torch.Tensor, got list"):
        swiglu([1.0], torch.randn(1))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"up must be a floating-point tensor, got dtype torch.int64"):
        swiglu(torch.randn(2), torch.arange(2))
    with pytest.raises(ValueError, match="same shape"):
        swiglu_fallback_reason(torch.randn(2, 2), torch.randn(4))


# ---------------------------------------------------------------------------------------------------------------
# Triton kernel under the CPU interpreter
# ---------------------------------------------------------------------------------------------------------------


def _check_kernel(gate: torch.Tensor, up: torch.Tensor) -> None:
    assert swiglu_kernel_available(gate, up)
    y = swiglu(gate, up)
    assert isinstance(y.grad_fn, SwiGLUFunction._backward_cls)  # type: ignore[attr-defined]
    ref = swiglu_reference(gate, up)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    inputs = [t for t in (gate, up) if t.requires_grad]
    for got, exp in zip(torch.autograd.grad(y, inputs, g), torch.autograd.grad(ref, inputs, g)):
        assert got.dtype == exp.dtype and got.shape == exp.shape
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)


if not INTERPRET:

    @pytest.mark.skipif(sys.platform != "linux", reason="triton is Linux-only")
    def test_triton_interpreter_cases_in_subprocess(run_in_triton_interpreter: Callable[[str, float], None]) -> None:
        run_in_triton_interpreter(str(Path(__file__)), 300)

else:

    @pytest.mark.parametrize("shape", [(1, 1), (1, 130), (7, 64), (2, 17, 200), (3, 5, 37)])
    def test_interp_kernel_matches_reference(shape: tuple[int, ...]) -> None:
        gate = torch.randn(shape, requires_grad=True)
        up = torch.randn(shape, requires_grad=True)
        _check_kernel(gate, up)

    @pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # numpy, by design
    def test_interp_kernel_extreme_gate_values() -> None:
        # sigmoid saturates: exp(-g) overflows to inf for g << 0, which must give silu -> -0 and no NaN.
        gate = torch.tensor([[-200.0, -90.0, -20.0, -1e-4, 0.0, 1e-4, 20.0, 90.0, 200.0]], requires_grad=True)
        up = torch.linspace(-2, 2, 9)[None].requires_grad_()
        _check_kernel(gate, up)

    def test_interp_kernel_reads_halves_of_a_fused_projection_without_copy() -> None:
        # gate/up as the two halves of one [.., 2N] output (fused gate_up projections): row stride 2N.
        fused = torch.randn(2, 9, 2 * 70, requires_grad=True)
        gate, up = fused[..., :70], fused[..., 70:]
        y = swiglu(gate, up)
        ref = swiglu_reference(gate, up)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
        g = torch.randn_like(y)
        (got,) = torch.autograd.grad(y, [fused], g)
        (exp,) = torch.autograd.grad(ref, [fused], g)
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)

    def test_interp_kernel_non_unit_column_stride_and_only_one_grad() -> None:
        gate = torch.randn(40, 6).t().requires_grad_()  # column stride 6: copied to rows once
        up = torch.randn(6, 40)  # no grad: only dgate is produced
        _check_kernel(gate, up)
        gate2 = torch.randn(6, 40)
        up2 = torch.randn(6, 40, requires_grad=True)
        _check_kernel(gate2, up2)

    def test_interp_backward_saves_only_gate_and_up() -> None:
        # The memory claim: HF's composition keeps gate, silu(gate) and up for backward; the kernel keeps two.
        def saved_elems(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> int:
            gate = torch.randn(5, 48, requires_grad=True)
            up = torch.randn(5, 48, requires_grad=True)
            sizes: list[int] = []

            def pack(t: torch.Tensor) -> torch.Tensor:
                sizes.append(t.numel())
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                fn(gate, up)
            return sum(sizes)

        assert saved_elems(swiglu) == 2 * 5 * 48
        assert saved_elems(lambda g, u: F.silu(g) * u) == 3 * 5 * 48

    @pytest.mark.parametrize(("rows", "hidden", "inter"), [(1, 16, 24), (13, 24, 88)])
    def test_interp_kernel_in_llama_mlp_matches_hf(rows: int, hidden: int, inter: int) -> None:
        mlp = _mlp(hidden, inter, torch.float32)
        x = torch.randn(2, rows, hidden, requires_grad=True)
        y_hf = mlp(x)
        y = _ours_mlp(mlp, x, swiglu)
        torch.testing.assert_close(y, y_hf, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(y)
        for got, exp in zip(_mlp_grads(mlp, x, y, g), _mlp_grads(mlp, x, y_hf, g)):
            torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-5)

    def test_interp_dispatch_rules() -> None:
        gate = torch.randn(2, 8)
        assert swiglu_kernel_available(gate, gate)
        half = gate.half()
        reason = swiglu_fallback_reason(half, half)
        assert reason is not None and "float16" in reason
        assert torch.equal(swiglu(half, half), swiglu_reference(half, half))
        with pytest.raises(ValueError, match="use_kernel=True.*float16"):
            swiglu(half, half, use_kernel=True)
        empty = torch.randn(0, 8)
        assert not swiglu_kernel_available(empty, empty)
        assert swiglu(empty, empty).shape == (0, 8)


# ---------------------------------------------------------------------------------------------------------------
# GPU: real shapes
# ---------------------------------------------------------------------------------------------------------------

# llama-1b: 16384 tokens x intermediate 5632; llama-125m: 32768 tokens x intermediate 2048.
_GPU_SHAPES = [(16384, 5632), (32768, 2048)]


@pytest.mark.gpu
@pytest.mark.parametrize(("rows", "inter"), _GPU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_kernel_real_shapes(rows: int, inter: int, dtype: torch.dtype) -> None:
    gate = torch.randn(rows, inter, device="cuda", dtype=dtype, requires_grad=True)
    up = torch.randn(rows, inter, device="cuda", dtype=dtype, requires_grad=True)
    assert swiglu_kernel_available(gate, up)
    y = swiglu(gate, up)
    assert y.dtype == dtype
    g = torch.randn_like(y)
    dg, du = torch.autograd.grad(y, [gate, up], g)
    # fp32 math on the same (exactly representable) inputs: the kernel rounds once, so bf16 results are
    # within half a bf16 ulp (2**-9 relative) of it, plus fp32 noise.
    g32, u32 = gate.detach().float().requires_grad_(), up.detach().float().requires_grad_()
    ref = swiglu_reference(g32, u32)
    edg, edu = torch.autograd.grad(ref, [g32, u32], g.float())
    rtol, atol = (2**-8, 1e-5) if dtype == torch.bfloat16 else (1e-5, 1e-6)
    torch.testing.assert_close(y.float(), ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(dg.float(), edg, rtol=rtol, atol=atol)
    torch.testing.assert_close(du.float(), edu, rtol=rtol, atol=atol)
    if dtype == torch.bfloat16:
        # and HF's own bf16 composition (two roundings) is no closer to fp32 than we are
        hf = F.silu(gate.detach()) * up.detach()
        assert _rel(y, ref) <= _rel(hf, ref) + 1e-4


@pytest.mark.gpu
def test_gpu_llama_mlp_under_autocast_matches_hf() -> None:
    mlp = _mlp(2048, 5632, torch.float32).cuda()
    x = torch.randn(4, 512, 2048, device="cuda", requires_grad=True)
    g = torch.randn(4, 512, 2048, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_hf = mlp(x)
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        assert swiglu_kernel_available(gate, up)
        y = mlp.down_proj(swiglu(gate, up))
    assert y.dtype == y_hf.dtype == torch.bfloat16
    assert _rel(y, y_hf) < 1e-2
    for got, exp in zip(_mlp_grads(mlp, x, y, g), _mlp_grads(mlp, x, y_hf, g)):
        assert _rel(got, exp) < 2e-2
