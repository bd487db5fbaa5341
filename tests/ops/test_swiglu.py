"""SwiGLU and GeGLU: the reference against HF's ``LlamaMLP`` and ``Gemma2MLP``, the Triton kernel against the
reference and those MLPs.

The Triton kernel runs on CPU only under ``TRITON_INTERPRET=1``, which must be set before triton is first
imported, so when this process was not started with it one test runs this file's ``interp`` cases in a child
pytest with the variable set (see ``run_in_triton_interpreter`` in tests/conftest.py).
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import Gemma2Config, LlamaConfig
from transformers.models.gemma2.modeling_gemma2 import Gemma2MLP
from transformers.models.llama.modeling_llama import LlamaMLP

from lit_accel.ops.recompute import recompute_recipe, request_recompute
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


def _gemma_mlp(hidden: int, inter: int, dtype: torch.dtype) -> Gemma2MLP:
    cfg = Gemma2Config(
        hidden_size=hidden,
        intermediate_size=inter,
        hidden_activation="gelu_pytorch_tanh",
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=hidden,
    )
    mlp = Gemma2MLP(cfg).to(dtype)
    with torch.no_grad():
        for p in mlp.parameters():
            # Wide enough pre-activations that GELU's negative tail and its cubic term matter.
            p.normal_(0.0, 2 * hidden**-0.5)
    return mlp


def _ours_mlp(mlp: Any, x: torch.Tensor, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    out: torch.Tensor = mlp.down_proj(fn(mlp.gate_proj(x), mlp.up_proj(x)))
    return out


GELU = functools.partial(swiglu, activation="gelu_tanh")
GELU_REF = functools.partial(swiglu_reference, activation="gelu_tanh")


def _mlp_grads(mlp: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
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


@pytest.mark.parametrize(("rows", "hidden", "inter"), [(1, 16, 24), (7, 24, 88), (33, 64, 172)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gelu_reference_matches_hf_gemma2_mlp(rows: int, hidden: int, inter: int, dtype: torch.dtype) -> None:
    mlp = _gemma_mlp(hidden, inter, dtype)
    x = torch.randn(2, rows, hidden, dtype=dtype, requires_grad=True)
    y_hf = mlp(x)
    y = _ours_mlp(mlp, x, GELU_REF)
    # The same operations as HF's act_fn(gate) * up: bit for bit.
    torch.testing.assert_close(y, y_hf, rtol=0, atol=0)
    g = torch.randn_like(y)
    for got, exp in zip(_mlp_grads(mlp, x, y, g), _mlp_grads(mlp, x, y_hf, g)):
        torch.testing.assert_close(got, exp, rtol=0, atol=0)


def test_gelu_reference_against_closed_form_gradient() -> None:
    gate = torch.randn(4, 19, dtype=torch.float64, requires_grad=True)
    up = torch.randn(4, 19, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(GELU_REF, (gate, up))
    y = GELU_REF(gate, up)
    # 0.5 g (1 + tanh(z)) = g sigmoid(2 z), z = sqrt(2 / pi) (g + 0.044715 g^3): the form the kernel computes.
    a = 2 * (2 / torch.pi) ** 0.5 * (gate + 0.044715 * gate**3)
    torch.testing.assert_close(y, gate * torch.sigmoid(a) * up)
    g = torch.randn_like(y)
    dg, du = torch.autograd.grad(y, [gate, up], g)
    sig = torch.sigmoid(a)
    da = 2 * (2 / torch.pi) ** 0.5 * (1 + 3 * 0.044715 * gate**2)
    torch.testing.assert_close(dg, g * up * (sig + gate * sig * (1 - sig) * da))
    torch.testing.assert_close(du, g * gate * sig)


def test_unknown_activation_raises_naming_the_argument() -> None:
    gate = torch.randn(3, 8)
    for fn in (swiglu, swiglu_reference, swiglu_fallback_reason, swiglu_kernel_available):
        with pytest.raises(ValueError, match=r"activation must be one of \('silu', 'gelu_tanh'\), got 'gelu'"):
            fn(gate, gate, activation="gelu")  # type: ignore[arg-type]


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
    assert torch.equal(GELU(gate, up, use_kernel=False), F.gelu(gate, approximate="tanh") * up)


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


def _check_kernel(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> None:
    assert swiglu_kernel_available(gate, up, activation)  # type: ignore[arg-type]
    y = swiglu(gate, up, activation=activation)  # type: ignore[arg-type]
    assert isinstance(y.grad_fn, SwiGLUFunction._backward_cls)  # type: ignore[attr-defined]
    ref = swiglu_reference(gate, up, activation)  # type: ignore[arg-type]
    assert y.shape == ref.shape and y.dtype == ref.dtype
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    # PyTorch's fp32 tanh-GELU backward loses its 1 - tanh(z)^2 to cancellation around g = -5 (it returns 0 where
    # the gradient is ~1e-6 * up * dy); the kernel's sigmoid form keeps it, hence the wider atol for the gradients.
    grad_atol = 1e-6 if activation == "silu" else 1e-5
    g = torch.randn_like(y)
    inputs = [t for t in (gate, up) if t.requires_grad]
    for got, exp in zip(torch.autograd.grad(y, inputs, g), torch.autograd.grad(ref, inputs, g)):
        assert got.dtype == exp.dtype and got.shape == exp.shape
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=grad_atol)


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

    @pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # numpy, by design
    @pytest.mark.parametrize("shape", [(1, 1), (7, 64), (2, 17, 200), (3, 5, 37)])
    def test_interp_gelu_kernel_matches_reference(shape: tuple[int, ...]) -> None:
        gate = (3 * torch.randn(shape)).requires_grad_()  # into GELU's negative tail and its cubic range
        up = torch.randn(shape, requires_grad=True)
        _check_kernel(gate, up, "gelu_tanh")

    @pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # numpy, by design
    def test_interp_gelu_kernel_extreme_gate_values() -> None:
        # sigmoid(a) saturates: exp(-a) or exp(a) overflows for |g| >> 1, which must give act -> -0 / g and no NaN.
        gate = torch.tensor([[-200.0, -90.0, -20.0, -5.0, -1e-4, 0.0, 1e-4, 5.0, 20.0, 90.0, 200.0]])
        up = torch.linspace(-2, 2, 11)[None].requires_grad_()
        _check_kernel(gate.requires_grad_(), up, "gelu_tanh")

    @pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
    def test_interp_gelu_kernel_closer_to_float64_than_torch_fp32() -> None:
        gate = (4 * torch.randn(64, 96)).requires_grad_()
        up = torch.randn(64, 96, requires_grad=True)
        g = torch.randn(64, 96)
        g64, u64 = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
        exact = GELU_REF(g64, u64)
        dexact = torch.autograd.grad(exact, [g64, u64], g.double())
        ours, torch32 = GELU(gate, up), GELU_REF(gate, up)
        for a, b, e in zip(torch.autograd.grad(ours, [gate, up], g), torch.autograd.grad(torch32, [gate, up], g),
                           dexact):  # fmt: skip
            assert _rel(a, e) < 1e-6 and _rel(a, e) <= _rel(b, e) * 1.5
        assert _rel(ours, exact) < 1e-6

    @pytest.mark.parametrize(("rows", "hidden", "inter"), [(1, 16, 24), (13, 24, 88)])
    def test_interp_gelu_kernel_in_gemma2_mlp_matches_hf(rows: int, hidden: int, inter: int) -> None:
        mlp = _gemma_mlp(hidden, inter, torch.float32)
        x = torch.randn(2, rows, hidden, requires_grad=True)
        y_hf = mlp(x)
        y = _ours_mlp(mlp, x, GELU)
        torch.testing.assert_close(y, y_hf, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(y)
        for got, exp in zip(_mlp_grads(mlp, x, y, g), _mlp_grads(mlp, x, y_hf, g)):
            torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-5)

    def test_interp_gelu_kernel_fused_halves_one_grad_and_no_grad() -> None:
        fused = torch.randn(2, 9, 2 * 70, requires_grad=True)
        gate, up = fused[..., :70], fused[..., 70:]
        y, ref = GELU(gate, up), GELU_REF(gate, up)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
        g = torch.randn_like(y)
        (got,) = torch.autograd.grad(y, [fused], g)
        (exp,) = torch.autograd.grad(ref, [fused], g)
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)
        _check_kernel(3 * torch.randn(6, 40), torch.randn(6, 40, requires_grad=True), "gelu_tanh")
        _check_kernel(torch.randn(40, 6).t().requires_grad_(), torch.randn(6, 40), "gelu_tanh")
        with torch.no_grad():
            torch.testing.assert_close(GELU(gate, up), ref, rtol=1e-5, atol=1e-6)

    def test_interp_recompute_recipe_per_activation() -> None:
        # A consumer rebuilding the output (the down projection's LoRA layer) gets the same bits; the fused
        # low-rank reduction, which rebuilds SiLU only, is offered for SwiGLU alone.
        consumer = type("Consumer", (), {})()
        request_recompute(consumer)
        gate = torch.randn(5, 48, requires_grad=True)
        up = torch.randn(5, 48, requires_grad=True)
        for activation, has_reduce in (("silu", True), ("gelu_tanh", False)):
            y = swiglu(gate, up, activation=activation)  # type: ignore[arg-type]
            recipe = recompute_recipe(y)
            assert recipe is not None and (recipe.reduce is not None) == has_reduce
            assert torch.equal(recipe.run(*recipe.inputs), y)
        del consumer

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


@pytest.mark.gpu
@pytest.mark.parametrize(("rows", "inter"), [(16384, 9216)])  # Gemma 2 2B: intermediate 9216
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_gelu_kernel_real_shapes(rows: int, inter: int, dtype: torch.dtype) -> None:
    gate = (3 * torch.randn(rows, inter, device="cuda")).to(dtype).requires_grad_()
    up = torch.randn(rows, inter, device="cuda", dtype=dtype, requires_grad=True)
    assert swiglu_kernel_available(gate, up, "gelu_tanh")
    y = GELU(gate, up)
    assert y.dtype == dtype
    g = torch.randn_like(y)
    dg, du = torch.autograd.grad(y, [gate, up], g)
    g32, u32 = gate.detach().float().requires_grad_(), up.detach().float().requires_grad_()
    ref = GELU_REF(g32, u32)
    edg, edu = torch.autograd.grad(ref, [g32, u32], g.float())
    rtol, atol = (2**-8, 1e-5) if dtype == torch.bfloat16 else (1e-5, 1e-5)
    torch.testing.assert_close(y.float(), ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(dg.float(), edg, rtol=rtol, atol=max(atol, 1e-4))
    torch.testing.assert_close(du.float(), edu, rtol=rtol, atol=atol)
    if dtype == torch.bfloat16:
        # HF's bf16 composition (gelu rounded to bf16, then the product) is no closer to fp32 than we are.
        hf = F.gelu(gate.detach(), approximate="tanh") * up.detach()
        assert _rel(y, ref) <= _rel(hf, ref) + 1e-4


@pytest.mark.gpu
def test_gpu_gemma2_mlp_under_autocast_matches_hf() -> None:
    mlp = _gemma_mlp(2304, 9216, torch.float32).cuda()  # Gemma 2 2B
    x = torch.randn(4, 512, 2304, device="cuda", requires_grad=True)
    g = torch.randn(4, 512, 2304, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_hf = mlp(x)
        y = _ours_mlp(mlp, x, GELU)
    assert y.dtype == y_hf.dtype == torch.bfloat16
    assert _rel(y, y_hf) < 1e-2
    for got, exp in zip(_mlp_grads(mlp, x, y, g), _mlp_grads(mlp, x, y_hf, g)):
        assert _rel(got, exp) < 2e-2
