"""RMSNorm: the reference against Hugging Face's ``LlamaRMSNorm`` (and the Qwen3, OLMo 2, Gemma 2 and Gemma 3 norms,
including the per-head ``q_norm``/``k_norm``), the Triton kernels against the reference and those modules.

The Triton kernels run on CPU only under ``TRITON_INTERPRET=1``, and that variable must be set before triton is
first imported (torch/lightning import it early), so when this process was not started with it, one test runs
this file's interpreter cases in a child pytest with the variable set.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.mistral.modeling_mistral import MistralRMSNorm
from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from lit_accel.ops.recompute import recompute_recipe, request_recompute
from lit_accel.ops.rms_norm import (
    RMSNormFunction,
    rms_norm,
    rms_norm_fallback_reason,
    rms_norm_kernel_available,
    rms_norm_reference,
)

# By module path: the package re-exports the function under the module's name.
rms_module = importlib.import_module("lit_accel.ops.rms_norm")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
EPS = 1e-6

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# (x dtype, weight dtype): plain fp32/bf16/fp16 models, and Lightning bf16-mixed (fp32 weight, bf16 residual).
DTYPE_PAIRS = [(F32, F32), (BF16, BF16), (F16, F16), (BF16, F32)]


def _make(
    shape: tuple[int, ...],
    x_dtype: torch.dtype = F32,
    w_dtype: torch.dtype = F32,
    device: str = "cpu",
    x_grad: bool = True,
    w_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random input with a per-row scale (so rstd varies) and a non-trivial weight around 1."""
    n = shape[-1]
    scale = torch.rand(*shape[:-1], 1, device=device) * 3 + 0.1
    x = (torch.randn(*shape, device=device) * scale).to(x_dtype).requires_grad_(x_grad)
    w = (1.0 + 0.2 * torch.randn(n, device=device)).to(w_dtype).requires_grad_(w_grad)
    return x, w


def _hf(
    x: torch.Tensor, w: torch.Tensor, cls: type[torch.nn.Module] = LlamaRMSNorm
) -> tuple[torch.Tensor, torch.nn.Parameter]:
    """HF's module with ``w``'s values as its weight: ``(output, the module's weight parameter)``."""
    mod = cls(w.shape[0], eps=EPS)
    mod.weight = torch.nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
    return mod(x), mod.weight


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.detach().double(), b.detach().double()
    return float((a64 - b64).norm() / b64.norm().clamp_min(1e-30))


def _grads(y: torch.Tensor, inputs: list[torch.Tensor], g: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(y, inputs, g))


# Per result dtype (rtol, atol) for the kernel against the reference: fp32 differs only by summation order;
# half-precision results may differ by a rounding flip of the normalised value or of the product (1-2 ulp).
_TOL = {F32: (1e-5, 1e-5), BF16: (1.6e-2, 2e-2), F16: (2e-3, 2e-3)}


def _out_tol(x_dtype: torch.dtype, y_dtype: torch.dtype) -> tuple[float, float]:
    """Output tolerance: the normalised value is rounded to x's dtype, so an fp32 result of a bf16 input can
    differ by a bf16 ulp where rstd's last bit moves it across a rounding boundary."""
    coarser = max((x_dtype, y_dtype), key=lambda d: torch.finfo(d).eps)
    return _TOL[coarser]


# Relative-norm bounds for gradients when any half-precision rounding is involved, per gradient dtype.
_GRAD_REL = {F32: 1e-2, BF16: 1e-2, F16: 2e-3}

GEMMA: dict[str, Any] = {"weight_offset": 1.0, "cast_mode": "gemma"}
# How each family's norm is selected, and the input it normalises: Qwen3's and Gemma 3's q_norm/k_norm work per head
# on (B, S, heads, head_dim) views of the projection; OLMo 2's over the whole (B, S, heads * head_dim) projection;
# Gemma 2's pre-norms over the hidden size.
FAMILIES = [
    pytest.param(Qwen3RMSNorm, {}, (2, 5, 4, 16), id="qwen3-qk-norm"),
    pytest.param(Olmo2RMSNorm, {"cast_mode": "gemma"}, (2, 5, 4 * 16), id="olmo2-qk-norm"),
    pytest.param(Gemma2RMSNorm, GEMMA, (2, 5, 48), id="gemma2"),
    pytest.param(Gemma3RMSNorm, GEMMA, (2, 5, 3, 32), id="gemma3-qk-norm"),
]


def _family(
    cls: type[torch.nn.Module],
    kwargs: dict[str, Any],
    shape: tuple[int, ...],
    x_dtype: torch.dtype,
    w_dtype: torch.dtype,
    device: str = "cpu",
) -> tuple[torch.Tensor, Any]:
    """``(x, HF's norm module in w_dtype)``: a random input and random non-zero weights (Gemma's around 0, as its
    ``(1 + weight)`` is; the others' around 1). For per-head shapes ``x`` is a view of a projection's output."""
    n = shape[-1]
    heads = shape[-2] if len(shape) == 4 else 1
    scale = torch.rand(*shape[:2], heads, 1, device=device) * 3 + 0.1
    x = torch.randn(*shape[:2], heads, n, device=device) * scale
    x = x.reshape(*shape[:2], heads * n).view(shape).to(x_dtype).requires_grad_()
    mod = cls(n, eps=EPS).to(device)
    center = 0.0 if kwargs.get("weight_offset") else 1.0
    mod.weight = torch.nn.Parameter((center + 0.2 * torch.randn(n, device=device)).to(w_dtype))
    return x, mod


def _check_family(
    cls: type[torch.nn.Module],
    kwargs: dict[str, Any],
    shape: tuple[int, ...],
    x_dtype: torch.dtype,
    w_dtype: torch.dtype,
    device: str = "cpu",
    use_kernel: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rms_norm`` (the kernel or the reference) against HF's module: output and its dtype, dx and dweight.
    Returns both outputs ``(ours, HF's)``."""
    x, mod = _family(cls, kwargs, shape, x_dtype, w_dtype, device)
    assert not use_kernel or rms_norm_kernel_available(x, mod.weight, **kwargs)
    y_hf = mod(x)
    y = rms_norm(x, mod.weight, EPS, use_kernel=use_kernel, **kwargs)
    assert y.dtype == y_hf.dtype and y.shape == y_hf.shape == x.shape
    g = torch.randn_like(y_hf)
    got, exp = _grads(y, [x, mod.weight], g), _grads(y_hf, [x, mod.weight], g)
    if not use_kernel:
        # Operation for operation: bit for bit.
        torch.testing.assert_close(y, y_hf, rtol=0, atol=0)
        for a, e in zip(got, exp):
            torch.testing.assert_close(a, e, rtol=0, atol=0)
        return y, y_hf
    rtol, atol = _out_tol(x_dtype, y.dtype)
    torch.testing.assert_close(y, y_hf, rtol=rtol, atol=atol)
    for t, a, e in zip((x, mod.weight), got, exp):
        assert a.dtype == e.dtype == t.dtype
        if x_dtype == w_dtype == F32:
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)
        else:
            assert _rel(a, e) < _GRAD_REL[t.dtype]
    return y, y_hf


# ---------------------------------------------------------------------------------------------------------------
# Reference vs Hugging Face (operation for operation, so exact)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 40), (3, 7, 100), (257, 768), (2, 16, 2048), (5, 4096), (4, 1)])
@pytest.mark.parametrize(("x_dtype", "w_dtype"), DTYPE_PAIRS)
def test_reference_equals_hf_forward_backward(
    shape: tuple[int, ...], x_dtype: torch.dtype, w_dtype: torch.dtype
) -> None:
    x, w = _make(shape, x_dtype, w_dtype)
    y = rms_norm_reference(x, w, EPS)
    x_hf = x.detach().clone().requires_grad_()
    y_hf, w_hf = _hf(x_hf, w)
    assert y.dtype == y_hf.dtype == torch.promote_types(x_dtype, w_dtype)
    assert y.shape == x.shape
    torch.testing.assert_close(y, y_hf, rtol=0, atol=0)
    g = torch.randn_like(y)
    dx, dw = _grads(y, [x, w], g)
    dx_hf, dw_hf = _grads(y_hf, [x_hf, w_hf], g)
    assert dx.dtype == x_dtype and dw.dtype == w_dtype
    torch.testing.assert_close(dx, dx_hf, rtol=0, atol=0)
    torch.testing.assert_close(dw, dw_hf, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [LlamaRMSNorm, MistralRMSNorm, Qwen2RMSNorm])
def test_reference_equals_other_hf_families(cls: type[torch.nn.Module]) -> None:
    x, w = _make((9, 96), BF16, F32)
    torch.testing.assert_close(rms_norm_reference(x, w, EPS), _hf(x, w, cls)[0], rtol=0, atol=0)


@pytest.mark.parametrize(("x_dtype", "w_dtype", "out_dtype"), [(BF16, F32, BF16), (F32, F32, BF16), (F16, F16, F32)])
def test_reference_out_dtype_casts_hf_result(
    x_dtype: torch.dtype, w_dtype: torch.dtype, out_dtype: torch.dtype
) -> None:
    x, w = _make((6, 48), x_dtype, w_dtype)
    y = rms_norm_reference(x, w, EPS, out_dtype=out_dtype)
    assert y.dtype == out_dtype
    torch.testing.assert_close(y, _hf(x, w)[0].to(out_dtype), rtol=0, atol=0)
    # Gradients flow through the cast.
    dx, dw = _grads(y, [x, w], torch.ones_like(y))
    assert dx.dtype == x_dtype and dw.dtype == w_dtype and torch.isfinite(dx).all()


@pytest.mark.parametrize(("cls", "kwargs", "shape"), FAMILIES)
@pytest.mark.parametrize(("x_dtype", "w_dtype"), DTYPE_PAIRS)
def test_reference_equals_qk_norm_and_gemma_families(
    cls: type[torch.nn.Module],
    kwargs: dict[str, Any],
    shape: tuple[int, ...],
    x_dtype: torch.dtype,
    w_dtype: torch.dtype,
) -> None:
    _check_family(cls, kwargs, shape, x_dtype, w_dtype, use_kernel=False)


@pytest.mark.parametrize(("x_dtype", "w_dtype"), [(BF16, F32), (BF16, BF16), (F16, F16)])
def test_cast_modes_differ_where_hf_rounds_differently(x_dtype: torch.dtype, w_dtype: torch.dtype) -> None:
    # The same math; in half precision OLMo 2 (fp32 product, one rounding to x's dtype) is not LLaMA (x_hat rounded
    # first, product in the promoted dtype), and each mode is bit-exact only for its own family.
    x, w = _make((16, 256), x_dtype, w_dtype, x_grad=False, w_grad=False)
    olmo2, _ = _hf(x, w, Olmo2RMSNorm)
    llama, _ = _hf(x, w, LlamaRMSNorm)
    gemma_mode = rms_norm_reference(x, w, EPS, cast_mode="gemma")
    llama_mode = rms_norm_reference(x, w, EPS)
    assert gemma_mode.dtype == x_dtype and llama_mode.dtype == torch.promote_types(x_dtype, w_dtype)
    torch.testing.assert_close(gemma_mode, olmo2, rtol=0, atol=0)
    torch.testing.assert_close(llama_mode, llama, rtol=0, atol=0)
    assert not torch.equal(gemma_mode.to(llama_mode.dtype), llama_mode)
    # In fp32 nothing rounds: the two modes agree, and weight_offset is the same as adding it to the weight.
    x32, w32 = x.float(), w.float()
    torch.testing.assert_close(rms_norm_reference(x32, w32, EPS, cast_mode="gemma"),
                               rms_norm_reference(x32, w32, EPS), rtol=1e-6, atol=1e-6)  # fmt: skip
    torch.testing.assert_close(rms_norm_reference(x32, w32 - 1.0, EPS, weight_offset=1.0, cast_mode="gemma"),
                               rms_norm_reference(x32, w32, EPS), rtol=1e-6, atol=1e-6)  # fmt: skip


def test_reference_gemma_out_dtype_casts_hf_result() -> None:
    x, mod = _family(Gemma2RMSNorm, GEMMA, (2, 3, 48), F32, F32)
    y = rms_norm_reference(x, mod.weight, EPS, out_dtype=BF16, **GEMMA)
    assert y.dtype == BF16
    torch.testing.assert_close(y, mod(x).to(BF16), rtol=0, atol=0)


def test_reference_matches_float64_math() -> None:
    x, w = _make((4, 3, 40), F32, F32, x_grad=False, w_grad=False)
    x64 = x.double()
    exp = w.double() * x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + EPS)
    torch.testing.assert_close(rms_norm_reference(x, w, EPS).double(), exp, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Entry point on CPU without the interpreter: dispatch, fallback reasons, argument errors
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(INTERPRET, reason="CPU inputs take the kernel under the interpreter")
@pytest.mark.parametrize(("x_dtype", "w_dtype"), DTYPE_PAIRS)
def test_cpu_entry_point_is_the_reference(x_dtype: torch.dtype, w_dtype: torch.dtype) -> None:
    x, w = _make((2, 5, 100), x_dtype, w_dtype)
    assert not rms_norm_kernel_available(x, w)
    reason = rms_norm_fallback_reason(x, w)
    assert reason is not None and "cpu" in reason
    y = rms_norm(x, w, EPS)
    torch.testing.assert_close(y, rms_norm_reference(x, w, EPS), rtol=0, atol=0)
    with pytest.raises(ValueError, match="cannot use the Triton kernel: x is on cpu"):
        rms_norm(x, w, EPS, use_kernel=True)


def test_use_kernel_false_is_the_reference() -> None:
    x, w = _make((3, 48), BF16, F32)
    y = rms_norm(x, w, EPS, out_dtype=BF16, use_kernel=False)
    torch.testing.assert_close(y, rms_norm_reference(x, w, EPS, out_dtype=BF16), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"x": [1.0, 2.0]}, TypeError, "x must be a torch.Tensor, got list"),
        ({"weight": None}, TypeError, "weight must be a torch.Tensor, got NoneType"),
        (
            {"x": torch.ones(2, 8, dtype=torch.int64)},
            TypeError,
            "x must be a floating-point tensor, got dtype torch.int64",
        ),
        ({"weight": torch.ones(8, dtype=torch.int32)}, TypeError, "weight must be a floating-point tensor"),
        (
            {"weight": torch.ones(7)},
            ValueError,
            r"weight must have shape \[hidden=8\] \(x's last dim\), got shape \(7,\)",
        ),
        ({"weight": torch.ones(1, 8)}, ValueError, r"got shape \(1, 8\)"),
        ({"x": torch.ones(())}, ValueError, r"x must have at least one dimension.*got shape \(\)"),
        ({"x": torch.ones(3, 0), "weight": torch.ones(0)}, ValueError, r"non-empty last dim, got shape \(3, 0\)"),
        ({"eps": -1e-6}, ValueError, "eps must be a finite float >= 0, got -1e-06"),
        ({"eps": float("nan")}, ValueError, "eps must be a finite float >= 0, got nan"),
        ({"eps": "1e-6"}, TypeError, "eps must be a float, got str '1e-6'"),
        ({"eps": True}, TypeError, "eps must be a float, got bool"),
        (
            {"out_dtype": torch.int8},
            TypeError,
            "out_dtype must be None or a floating-point torch.dtype, got torch.int8",
        ),
        ({"out_dtype": "bf16"}, TypeError, "out_dtype must be None or a floating-point torch.dtype, got 'bf16'"),
        ({"weight": torch.ones(8, device="meta")}, ValueError, "same device, got x on cpu and weight on meta"),
    ],
)
@pytest.mark.parametrize("fn", [rms_norm, rms_norm_reference])
def test_bad_arguments_raise(
    fn: Callable[..., torch.Tensor], kwargs: dict[str, object], exc: type[Exception], match: str
) -> None:
    args: dict[str, object] = {"x": torch.ones(2, 8), "weight": torch.ones(8), "eps": 1e-6, **kwargs}
    out_dtype = args.pop("out_dtype", None)
    with pytest.raises(exc, match=match):
        fn(args["x"], args["weight"], args["eps"], out_dtype=out_dtype)


def test_fallback_reason_checks_arguments_too() -> None:
    with pytest.raises(ValueError, match="weight must have shape"):
        rms_norm_fallback_reason(torch.ones(2, 8), torch.ones(9))


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"cast_mode": "olmo"}, ValueError, r"cast_mode must be one of \('llama', 'gemma'\), got 'olmo'"),
        ({"weight_offset": 1.0}, ValueError, "weight_offset=1.0 needs cast_mode='gemma'"),
        ({"weight_offset": 1.0, "cast_mode": "llama"}, ValueError, "cast_mode='llama' takes only weight_offset=0.0"),
        ({"weight_offset": True, "cast_mode": "gemma"}, TypeError, "weight_offset must be a float, got bool"),
        ({"weight_offset": "1", "cast_mode": "gemma"}, TypeError, "weight_offset must be a float, got str '1'"),
        ({"weight_offset": float("inf"), "cast_mode": "gemma"}, ValueError, "weight_offset must be finite, got inf"),
    ],
)
@pytest.mark.parametrize(
    "fn", [rms_norm, rms_norm_reference, lambda x, w, eps, **kw: rms_norm_fallback_reason(x, w, **kw)]
)
def test_bad_cast_arguments_raise(
    fn: Callable[..., Any], kwargs: dict[str, Any], exc: type[Exception], match: str
) -> None:
    with pytest.raises(exc, match=match):
        fn(torch.ones(2, 8), torch.ones(8), EPS, **kwargs)


def test_gemma_mode_result_dtype_is_the_input_dtype() -> None:
    x, w = _make((3, 40), BF16, F32, x_grad=False, w_grad=False)
    assert rms_norm(x, w, EPS).dtype == F32  # llama: the promoted dtype
    assert rms_norm(x, w, EPS, cast_mode="gemma").dtype == BF16  # gemma: type_as(x)
    assert rms_norm(x, w, EPS, out_dtype=F16, **GEMMA).dtype == F16
    assert rms_norm_kernel_available(x, w, cast_mode="gemma") == rms_norm_kernel_available(x, w)


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels under the CPU interpreter
# ---------------------------------------------------------------------------------------------------------------


def _check_kernel(
    shape: tuple[int, ...],
    x_dtype: torch.dtype,
    w_dtype: torch.dtype,
    out_dtype: torch.dtype | None = None,
    x_grad: bool = True,
    w_grad: bool = True,
    device: str = "cpu",
    x: torch.Tensor | None = None,
) -> None:
    """Kernel (``use_kernel=True``) vs reference: output, dtype, and the gradient of every input needing one."""
    if x is None:
        x, w = _make(shape, x_dtype, w_dtype, device, x_grad, w_grad)
    else:
        _, w = _make(shape, x_dtype, w_dtype, device, x_grad, w_grad)
    y = rms_norm(x, w, EPS, out_dtype=out_dtype, use_kernel=True)
    ref = rms_norm_reference(x, w, EPS, out_dtype=out_dtype)
    assert y.dtype == ref.dtype and y.shape == ref.shape
    rtol, atol = _out_tol(x.dtype, y.dtype)
    torch.testing.assert_close(y, ref, rtol=rtol, atol=atol)
    inputs = [t for t in (x, w) if t.requires_grad]
    if not inputs:
        assert not y.requires_grad
        return
    g = torch.randn_like(y)
    for t, got, exp in zip(inputs, _grads(y, inputs, g), _grads(ref, inputs, g)):
        assert got.dtype == t.dtype and got.shape == t.shape
        if x.dtype == w.dtype == y.dtype == F32:
            torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-4)
        else:
            # The reference rounds dy * weight to the input dtype before the normalisation's backward, the kernel
            # does not: element-wise that is a few ulp, after cancellation in g - n * mean(g n) possibly more.
            # dweight sums dy * n rounded to x's dtype, where rstd's last bit can flip a rounding in some rows.
            assert _rel(got, exp) < _GRAD_REL[t.dtype]


if not INTERPRET:

    @pytest.mark.skipif(sys.platform != "linux", reason="triton is Linux-only")
    def test_triton_interpreter_cases_in_subprocess(run_in_triton_interpreter: Callable[[str, float], None]) -> None:
        run_in_triton_interpreter(str(Path(__file__)), 600)

else:

    @pytest.mark.parametrize("shape", [(1, 40), (3, 5, 100), (33, 48), (7, 768), (6, 1), (2, 2, 3, 24)])
    def test_interp_kernel_matches_reference_fp32(shape: tuple[int, ...]) -> None:
        _check_kernel(shape, F32, F32)

    @pytest.mark.parametrize(
        ("x_dtype", "w_dtype", "out_dtype"),
        [(F16, F32, None), (F16, F16, None), (F32, F16, None), (F32, F32, F16), (F16, F32, F16), (F16, F16, F32)],
    )
    def test_interp_kernel_half_and_mixed_dtypes(
        x_dtype: torch.dtype, w_dtype: torch.dtype, out_dtype: torch.dtype | None
    ) -> None:
        # fp16 stands in for bf16: the interpreter's numpy back end has no bfloat16 (bf16 runs in the GPU tests).
        _check_kernel((19, 100), x_dtype, w_dtype, out_dtype)

    def test_interp_kernel_half_output_is_hf_bitwise_for_one_row() -> None:
        # One row, small width: rstd's summation order rarely matters; the roundings must be HF's.
        x, w = _make((1, 8), F16, F16)
        torch.testing.assert_close(rms_norm(x, w, EPS), _hf(x, w)[0], rtol=0, atol=0)

    @pytest.mark.parametrize("prefetch", [True, False])
    def test_interp_many_rows_persistent_backward(prefetch: bool, monkeypatch: pytest.MonkeyPatch) -> None:
        # 300 row blocks over 3 programs of 128 iterations (the last partly and then fully masked); the dweight
        # partial sums of the 3 programs are reduced after the kernel.
        monkeypatch.setattr(rms_module, "_BWD_PREFETCH", prefetch)
        _check_kernel((300, 48), F32, F32)
        _check_kernel((301, 24), F16, F32)

    @pytest.mark.parametrize(("x_grad", "w_grad"), [(True, False), (False, True), (False, False)])
    def test_interp_grads_only_where_required(x_grad: bool, w_grad: bool) -> None:
        _check_kernel((13, 40), F32, F32, x_grad=x_grad, w_grad=w_grad)

    def test_interp_no_grad_forward() -> None:
        x, w = _make((5, 100), F16, F32)
        with torch.no_grad():
            y = rms_norm(x, w, EPS)
        assert not y.requires_grad
        torch.testing.assert_close(y, rms_norm_reference(x.detach(), w.detach(), EPS), rtol=1e-5, atol=1e-5)

    def test_interp_non_contiguous_inputs() -> None:
        base = torch.randn(12, 2, 80)
        # Row-strided view: passed with its row stride, no copy.
        x_rows = base[:, 0, :].requires_grad_()
        _check_kernel((12, 80), F32, F32, x=x_rows)
        # Last dim not unit-stride: copied to contiguous first.
        x_cols = torch.randn(40, 7).t().requires_grad_()
        assert x_cols.stride(-1) != 1
        _check_kernel((7, 40), F32, F32, x=x_cols)
        # Non-contiguous incoming gradient (expanded).
        x, w = _make((4, 3, 24), F32, F32)
        g = torch.randn(1, 1, 24).expand(4, 3, 24)
        got = _grads(rms_norm(x, w, EPS, use_kernel=True), [x, w], g)
        exp = _grads(rms_norm_reference(x, w, EPS), [x, w], g)
        for a, b in zip(got, exp):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    def test_interp_default_dispatch_takes_kernel_for_supported_cpu_inputs() -> None:
        x, w = _make((3, 40), F32, F32)
        assert rms_norm_kernel_available(x, w)
        assert rms_norm_fallback_reason(x, w) is None
        xb, wb = _make((3, 40), BF16, F32)
        reason = rms_norm_fallback_reason(xb, wb)
        assert reason is not None and "x dtype bfloat16 is not supported" in reason
        assert "output dtype bfloat16" in str(rms_norm_fallback_reason(x, w, out_dtype=BF16))
        with pytest.raises(ValueError, match="cannot use the Triton kernel: x dtype bfloat16"):
            rms_norm(xb, wb, EPS, use_kernel=True)
        # Unsupported: the reference, bit for bit.
        torch.testing.assert_close(rms_norm(xb, wb, EPS), rms_norm_reference(xb, wb, EPS), rtol=0, atol=0)
        assert "x is empty" in str(rms_norm_fallback_reason(torch.ones(0, 40), w))
        assert rms_norm(torch.ones(0, 40), w, EPS).shape == (0, 40)

    @pytest.mark.parametrize(("cls", "kwargs", "shape"), FAMILIES)
    @pytest.mark.parametrize(("x_dtype", "w_dtype"), [(F32, F32), (F16, F16), (F16, F32)])
    def test_interp_kernel_matches_qk_norm_and_gemma_families(
        cls: type[torch.nn.Module],
        kwargs: dict[str, Any],
        shape: tuple[int, ...],
        x_dtype: torch.dtype,
        w_dtype: torch.dtype,
    ) -> None:
        # fp16 stands in for bf16 (the interpreter has no bfloat16): it exercises each mode's roundings.
        _check_family(cls, kwargs, shape, x_dtype, w_dtype)

    @pytest.mark.parametrize(
        ("x_dtype", "w_dtype", "out_dtype", "x_grad", "w_grad"),
        [(F32, F32, None, True, True), (F16, F32, None, True, True), (F16, F16, F32, True, True),
         (F32, F32, F16, True, True), (F16, F32, None, True, False), (F16, F16, None, False, True)],
    )  # fmt: skip
    def test_interp_gemma_mode_matches_reference(
        x_dtype: torch.dtype, w_dtype: torch.dtype, out_dtype: torch.dtype | None, x_grad: bool, w_grad: bool
    ) -> None:
        # 19 row blocks over 3 programs: the persistent backward loops, its dweight partial sums unrounded.
        x, w = _make((37, 24), x_dtype, w_dtype, x_grad=x_grad, w_grad=w_grad)
        w = (w.detach() - 1.0).requires_grad_(w_grad)  # Gemma's weights are stored around 0
        y = rms_norm(x, w, EPS, out_dtype=out_dtype, use_kernel=True, **GEMMA)
        ref = rms_norm_reference(x, w, EPS, out_dtype=out_dtype, **GEMMA)
        assert y.dtype == ref.dtype == (out_dtype or x_dtype)
        rtol, atol = _out_tol(x_dtype, y.dtype)
        torch.testing.assert_close(y, ref, rtol=rtol, atol=atol)
        inputs = [t for t in (x, w) if t.requires_grad]
        g = torch.randn_like(y)
        for t, a, e in zip(inputs, _grads(y, inputs, g), _grads(ref, inputs, g)):
            assert a.dtype == t.dtype
            # The reference's backward is fp32 throughout too: only the summation order differs.
            assert _rel(a, e) < (1e-5 if t.dtype == F32 else 1e-3)

    def test_interp_gemma_mode_no_grad_and_recompute_recipe() -> None:
        x, mod = _family(Gemma3RMSNorm, GEMMA, (4, 6, 2, 32), F16, F32)
        with torch.no_grad():
            y0 = rms_norm(x, mod.weight, EPS, **GEMMA)
        torch.testing.assert_close(y0, mod(x).detach(), rtol=2e-3, atol=2e-3)
        # A consumer that rebuilds the output from the saved inputs (a LoRA layer) gets the same bits; the fused
        # low-rank reduction, which rebuilds the llama roundings only, is not offered for the gemma mode.
        consumer = type("Consumer", (), {})()
        request_recompute(consumer)
        y = rms_norm(x, mod.weight, EPS, **GEMMA)
        recipe = recompute_recipe(y)
        assert recipe is not None and recipe.reduce is None
        assert torch.equal(recipe.run(*recipe.inputs), y) and torch.equal(y, y0)
        y_llama = rms_norm(x, mod.weight, EPS)
        recipe_llama = recompute_recipe(y_llama)
        assert recipe_llama is not None and recipe_llama.reduce is not None
        assert torch.equal(recipe_llama.run(*recipe_llama.inputs), y_llama)
        del consumer  # no consumer left: the kernels record nothing again

    def test_interp_function_apply_direct() -> None:
        x, w = _make((2, 3, 48), F32, F32)
        y = RMSNormFunction.apply(x, w, EPS, F32)
        ref = rms_norm_reference(x, w, EPS)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(ref)
        for a, b in zip(_grads(y, [x, w], g), _grads(ref, [x, w], g)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        # The Gemma arguments by position.
        y = RMSNormFunction.apply(x, w, EPS, F32, 1.0, "gemma")
        ref = rms_norm_reference(x, w, EPS, **GEMMA)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        for a, b in zip(_grads(y, [x, w], g), _grads(ref, [x, w], g)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# GPU: real shapes (llama-1b hidden 2048 x 16384 tokens; llama-125m hidden 768 x 32768 tokens)
# ---------------------------------------------------------------------------------------------------------------

GPU_SHAPES = [(16384, 2048), (32768, 768)]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize(
    ("x_dtype", "w_dtype", "out_dtype"),
    [(BF16, BF16, None), (BF16, F32, None), (F32, F32, None), (BF16, F32, BF16), (F16, F16, None)],
)
def test_gpu_kernel_vs_hf(
    shape: tuple[int, int], x_dtype: torch.dtype, w_dtype: torch.dtype, out_dtype: torch.dtype | None
) -> None:
    x, w = _make(shape, x_dtype, w_dtype, device="cuda")
    assert rms_norm_kernel_available(x, w, out_dtype), rms_norm_fallback_reason(x, w, out_dtype)
    y = rms_norm(x, w, EPS, out_dtype=out_dtype)
    x_hf = x.detach().clone().requires_grad_()
    y_hf, w_hf = _hf(x_hf, w)
    if out_dtype is not None:
        y_hf = y_hf.to(out_dtype)
    assert y.dtype == y_hf.dtype
    rtol, atol = _out_tol(x_dtype, y.dtype)
    torch.testing.assert_close(y, y_hf, rtol=rtol, atol=atol)
    if x_dtype != F32:
        # Almost all outputs equal HF's bit for bit: the rounding of the normalised value to x's dtype absorbs
        # rstd's last-bit differences except where they cross a rounding boundary. (In fp32 they show directly.)
        assert (y == y_hf).float().mean() > 0.99
    g = torch.randn_like(y)
    dx, dw = _grads(y, [x, w], g)
    dx_hf, dw_hf = _grads(y_hf, [x_hf, w_hf], g)
    assert dx.dtype == x_dtype and dw.dtype == w_dtype
    # The gradient of HF's exact math in float64 (rounding of the normalised value kept, as in HF and ours).
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    n64 = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS)
    n_rounded = n64 + (n64.detach().to(x_dtype).double() - n64.detach())  # straight-through rounding
    dx64, dw64 = _grads(w64 * n_rounded, [x64, w64], g.double())
    half = x_dtype != F32 or w_dtype != F32
    tol = 1e-2 if half else 1e-5
    assert _rel(dx, dx64) < tol and _rel(dw, dw64) < tol
    # fp32 math throughout: at least as close to the exact gradient as HF's own backward.
    assert _rel(dx, dx64) <= 1.05 * _rel(dx_hf, dx64) + 1e-6
    assert _rel(dw, dw64) <= 1.05 * _rel(dw_hf, dw64) + 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gpu_frozen_weight_and_odd_shapes(shape: tuple[int, int]) -> None:
    # Frozen weight (LoRA): only dx; leading dims and a row-strided view.
    m, n = shape
    _check_kernel((4, m // 4, n), BF16, F32, w_grad=False, device="cuda")
    _check_kernel((m, n), BF16, BF16, x_grad=False, device="cuda")
    big = torch.randn(m, 2 * n, device="cuda", dtype=BF16)
    _check_kernel((m, n), BF16, F32, x=big[:, :n].requires_grad_(), device="cuda")
    for odd in [(1, 40), (3, 100), (1000, 4096), (5, 5632), (7, 65536)]:
        _check_kernel(odd, BF16, F32, device="cuda")


@pytest.mark.gpu
def test_gpu_saves_only_rstd_beyond_x() -> None:
    m, n = GPU_SHAPES[0]
    x, w = _make((m, n), BF16, F32, device="cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    y = rms_norm(x, w, EPS, out_dtype=BF16)
    ours = torch.cuda.memory_allocated() - before
    del y
    before = torch.cuda.memory_allocated()
    y_hf = _hf(x, w)[0].to(BF16)
    theirs = torch.cuda.memory_allocated() - before
    del y_hf
    out_bytes = m * n * 2
    # Output + fp32 rstd per row (+ allocator rounding), where HF holds several full-size fp32 tensors.
    assert ours <= out_bytes + m * 4 + 2**20
    # HF: an fp32 copy of x, the bf16-rounded normalised value, the fp32 product and its bf16 cast.
    assert theirs > 3 * out_bytes


@pytest.mark.gpu
@pytest.mark.parametrize(("cls", "kwargs", "shape"), FAMILIES)
@pytest.mark.parametrize(("x_dtype", "w_dtype"), [(BF16, F32), (BF16, BF16)])
def test_gpu_kernel_vs_qk_norm_and_gemma_families(
    cls: type[torch.nn.Module],
    kwargs: dict[str, Any],
    shape: tuple[int, ...],
    x_dtype: torch.dtype,
    w_dtype: torch.dtype,
) -> None:
    # At real shapes: 8 x 2048 tokens; Qwen3 32 heads of 128, OLMo 2 16 x 128, Gemma 2 2304 wide, Gemma 3 8 x 256.
    real = {Qwen3RMSNorm: (8, 2048, 32, 128), Olmo2RMSNorm: (8, 2048, 2048), Gemma2RMSNorm: (8, 2048, 2304),
            Gemma3RMSNorm: (8, 2048, 8, 256)}[cls]  # fmt: skip
    y, y_hf = _check_family(cls, kwargs, real, x_dtype, w_dtype, device="cuda")
    # HF's roundings: all but a few outputs (rstd's last bit across a rounding boundary) equal bit for bit.
    assert (y == y_hf).float().mean() > 0.99
