"""RMSNorm as Hugging Face computes it for LLaMA (also Mistral, Qwen2/3) and Gemma (also OLMo 2), fused in Triton.

Two roundings of the same math, chosen by ``cast_mode`` (HF's comment in ``Gemma2RMSNorm``: "Llama does
x.to(float16) * w whilst Gemma2 is (x * w).to(float16)"):

* ``"llama"`` (default), ``LlamaRMSNorm``: ``y = weight * (x_f32 * rsqrt(mean(x_f32^2) + eps)).to(x.dtype)``. The
  normalised value is rounded to the input dtype *before* the weight multiply, and the product has the promoted
  dtype of ``weight`` and ``x`` (fp32 under Lightning's bf16-mixed, where the weight is an fp32 parameter). Also
  ``MistralRMSNorm``, ``Qwen2RMSNorm`` and ``Qwen3RMSNorm`` (its per-head ``q_norm``/``k_norm`` too).
* ``"gemma"``, ``Gemma2RMSNorm``/``Gemma3RMSNorm`` with ``weight_offset=1.0``:
  ``y = (x_f32 * rsqrt(mean(x_f32^2) + eps) * (weight_offset + weight.float())).to(x.dtype)``. The product is
  taken in fp32 and rounded once, to the *input* dtype. ``Olmo2RMSNorm`` (its ``q_norm``/``k_norm`` over the whole
  ``heads * head_dim`` projection too) is this mode with ``weight_offset=0.0``. The gradient w.r.t. ``weight`` is
  ``sum_rows(dy * normalised)`` as in the llama mode, with the normalised value not rounded; ``dx`` uses
  ``weight_offset + weight``.

In fp32 the two modes give the same result; they differ by the roundings in half precision.

Three layers, as every op in :mod:`lit_accel.ops`:

* :func:`rms_norm_reference` - plain PyTorch, operation for operation ``LlamaRMSNorm.forward`` or
  ``Gemma2RMSNorm.forward`` (plus an optional final cast to ``out_dtype``); the tests compare it with transformers,
  and CPU runs use it.
* :class:`RMSNormFunction` - the ``torch.autograd.Function`` over the two Triton kernels below.
* :func:`rms_norm` - the entry point: the kernels on CUDA for supported inputs (see
  :func:`rms_norm_fallback_reason`), else the reference.

Numerics. Sums of squares, ``rstd``, the weight multiply and the whole backward run in fp32 registers whatever the
storage dtypes. The forward rounds exactly where HF does (llama: ``x * rstd`` to ``x.dtype``, then the product to
the promoted dtype; gemma: the fp32 product to ``x.dtype``), so outputs agree with HF up to the last-bit effect of a
differently ordered fp32 sum on ``rstd``. In the llama mode the backward does not repeat HF's intermediate roundings
of the incoming gradient (``dy * weight`` rounded to ``x.dtype`` when that is bf16), so it is closer to the exact
gradient than HF's; ``dweight`` uses the same rounded normalised value the forward multiplied, as HF's autograd
does. In the gemma mode HF's backward runs in fp32 throughout, as the kernel's does.

Memory. The forward saves only ``x`` (the tensor the caller already holds: no copy when its rows are
unit-stride) and one fp32 ``rstd`` per row, 4 bytes a row. HF's module, under autograd, keeps an fp32 copy of a
bf16 ``x`` and the normalised value rounded to bf16: ``6 * hidden`` bytes a row (192 MiB per norm at 16384 x
2048), which the kernel path does not allocate at all.

Kernels. The forward reads each row once and writes it once; narrow rows (``hidden < 4096``) are packed
several to a program (``[BLOCK_M, BLOCK_N]`` tiles of about 4096 elements) so that each program moves enough
bytes to hide memory latency; wide rows take one program each. The backward recomputes ``x * rstd`` from ``x``
and the saved ``rstd`` and writes ``dx``; for ``dweight`` it runs a persistent grid of about two programs per SM,
each striding over row blocks (loading the next block while it reduces the current one) and accumulating its
share of ``sum_rows(dy * normalised)`` in fp32 registers, written once as one row of a ``[programs, hidden]``
fp32 buffer that a single ``sum(0)`` reduces (programs ~256, so that reduction reads under 1% of the bytes the
kernel moves at llama shapes). ``dx`` or ``dweight`` is skipped (compile-time flag) when ``x`` or ``weight``
does not require grad, e.g. a weight frozen under LoRA.

The kernel runs near the memory bandwidth (it moves the minimum traffic once); the figures against HF, torch's
``F.rms_norm`` and Liger-Kernel are in ``benchmarks/RESULTS.md`` (result ``kernels/rms_norm``).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal

import torch

from lit_accel.ops._triton import HAS_TRITON as _HAS_TRITON
from lit_accel.ops._triton import interpret as _interpret
from lit_accel.ops._triton import tl, triton
from lit_accel.ops.lowrank_reduce import lowrank_reduce
from lit_accel.ops.recompute import forget_recompute, register_recompute

__all__ = [
    "CAST_MODES",
    "CastMode",
    "RMSNormFunction",
    "rms_norm",
    "rms_norm_fallback_reason",
    "rms_norm_kernel_available",
    "rms_norm_reference",
]

CastMode = Literal["llama", "gemma"]
"""Where the result is rounded: see the module docstring."""
CAST_MODES: tuple[str, ...] = ("llama", "gemma")
"""The values ``cast_mode`` takes."""

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The CPU interpreter runs on numpy, which has no bfloat16; fp16 works there and exercises the rounding paths.
_INTERP_DTYPES = (torch.float32, torch.float16)
# A whole row lives in registers: 65536 fp32 values over 16 warps is 128 a thread per live tensor, already
# spilling in the backward; wider rows fall back to the reference.
_MAX_HIDDEN = 65536
# Elements per [BLOCK_M, BLOCK_N] tile for narrow rows: at 8 warps that is 16 values a thread (two 16-byte loads
# in bf16), enough bytes in flight per program for HBM3 without spilling.
_TILE_ELEMS = 4096
# Persistent backward grid: programs per SM. Several resident programs keep loads in flight while one reduces;
# the dweight partial buffer grows with it (programs x hidden x 4 bytes).
_BWD_PROGRAMS_PER_SM = 2
# Load the next row block while reducing and storing the current one (two tiles in flight per program).
_BWD_PREFETCH = True


# --------------------------------------------------------------------------------------------------------------
# Argument checks and dispatch
# --------------------------------------------------------------------------------------------------------------


def _check_args(
    x: Any, weight: Any, eps: Any, out_dtype: Any, weight_offset: Any = 0.0, cast_mode: Any = "llama"
) -> None:
    """Raises TypeError/ValueError naming the argument for inputs that neither path can take."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got dtype {weight.dtype}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have at least one dimension with a non-empty last dim, got shape {tuple(x.shape)}")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"weight must have shape [hidden={x.shape[-1]}] (x's last dim), got shape {tuple(weight.shape)}"
        )
    if x.device != weight.device:
        raise ValueError(f"x and weight must be on the same device, got x on {x.device} and weight on {weight.device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__} {eps!r}")
    if not (math.isfinite(eps) and eps >= 0.0):
        raise ValueError(f"eps must be a finite float >= 0, got {eps}")
    if out_dtype is not None and (not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point):
        raise TypeError(f"out_dtype must be None or a floating-point torch.dtype, got {out_dtype!r}")
    if cast_mode not in CAST_MODES:
        raise ValueError(f"cast_mode must be one of {CAST_MODES}, got {cast_mode!r}")
    if isinstance(weight_offset, bool) or not isinstance(weight_offset, (int, float)):
        raise TypeError(f"weight_offset must be a float, got {type(weight_offset).__name__} {weight_offset!r}")
    if not math.isfinite(weight_offset):
        raise ValueError(f"weight_offset must be finite, got {weight_offset}")
    if weight_offset != 0.0 and cast_mode != "gemma":
        raise ValueError(
            f"weight_offset={weight_offset} needs cast_mode='gemma' (Gemma's (1 + weight) in fp32); "
            f"cast_mode={cast_mode!r} takes only weight_offset=0.0"
        )


def _result_dtype(
    x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype | None, cast_mode: str = "llama"
) -> torch.dtype:
    if out_dtype is not None:
        return out_dtype
    return x.dtype if cast_mode == "gemma" else torch.promote_types(weight.dtype, x.dtype)


def _unsupported_reason(
    x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype | None, cast_mode: str = "llama"
) -> str | None:
    """Why the Triton path cannot take these (already checked) inputs, or None when it can."""
    if not _HAS_TRITON:
        return "triton is not installed"
    interp = _interpret()
    if not x.is_cuda and not (interp and x.device.type == "cpu"):
        return f"x is on {x.device}; the kernel needs CUDA (or TRITON_INTERPRET=1 for CPU tests)"
    allowed = _FLOAT_DTYPES if x.is_cuda else _INTERP_DTYPES
    result = _result_dtype(x, weight, out_dtype, cast_mode)
    for name, dt in (("x", x.dtype), ("weight", weight.dtype), ("output", result)):
        if dt not in allowed:
            names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
            return f"{name} dtype {str(dt).removeprefix('torch.')} is not supported (allowed: {names})"
    if x.shape[-1] > _MAX_HIDDEN:
        return f"hidden size {x.shape[-1]} exceeds the kernel's limit {_MAX_HIDDEN}"
    if x.numel() == 0:
        return "x is empty"
    return None


def rms_norm_fallback_reason(
    x: torch.Tensor,
    weight: torch.Tensor,
    out_dtype: torch.dtype | None = None,
    *,
    weight_offset: float = 0.0,
    cast_mode: CastMode = "llama",
) -> str | None:
    """Why :func:`rms_norm` would run the reference instead of the Triton kernel for these inputs.

    For the integration layer's one-time warning (``f"{module_name}: RMSNorm kernel not used: {reason}"``).

    Args:
        x: Input ``[..., hidden]``.
        weight: Scale ``[hidden]``.
        out_dtype: As for :func:`rms_norm`.
        weight_offset: As for :func:`rms_norm` (checked only; the kernel takes any).
        cast_mode: As for :func:`rms_norm` (it decides the result dtype when ``out_dtype`` is None).

    Returns:
        A short reason, or None when the kernel would be used.

    Raises:
        TypeError, ValueError: As :func:`rms_norm` for invalid inputs.

    Example:
        >>> rms_norm_fallback_reason(torch.randn(2, 8, device="meta"), torch.ones(8, device="meta"))
        'x is on meta; the kernel needs CUDA (or TRITON_INTERPRET=1 for CPU tests)'
    """
    _check_args(x, weight, 0.0, out_dtype, weight_offset, cast_mode)
    return _unsupported_reason(x, weight, out_dtype, cast_mode)


def rms_norm_kernel_available(
    x: torch.Tensor,
    weight: torch.Tensor,
    out_dtype: torch.dtype | None = None,
    *,
    weight_offset: float = 0.0,
    cast_mode: CastMode = "llama",
) -> bool:
    """Whether :func:`rms_norm` would use the Triton kernel for these inputs.

    True on CUDA for fp32/bf16/fp16 inputs and outputs with ``hidden <= 65536``; on CPU only under
    ``TRITON_INTERPRET=1`` (tests) for fp32/fp16. The same for both cast modes.

    Args:
        x: Input ``[..., hidden]``.
        weight: Scale ``[hidden]``.
        out_dtype: As for :func:`rms_norm`.
        weight_offset: As for :func:`rms_norm`.
        cast_mode: As for :func:`rms_norm`.

    Returns:
        True when the kernel would run.

    Example:
        >>> rms_norm_kernel_available(torch.randn(2, 8, device="meta"), torch.ones(8, device="meta"))
        False
    """
    return rms_norm_fallback_reason(x, weight, out_dtype, weight_offset=weight_offset, cast_mode=cast_mode) is None


# --------------------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------------------


def rms_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    out_dtype: torch.dtype | None = None,
    weight_offset: float = 0.0,
    cast_mode: CastMode = "llama",
) -> torch.Tensor:
    """RMSNorm in plain PyTorch, exactly as ``LlamaRMSNorm.forward`` (or ``Gemma2RMSNorm.forward``) computes it.

    Args:
        x: Input ``[..., hidden]``, any float dtype.
        weight: Scale ``[hidden]``, any float dtype.
        eps: Added to the mean square before the reciprocal square root.
        out_dtype: None returns HF's result in its dtype (llama: ``torch.promote_types(weight.dtype, x.dtype)``;
            gemma: ``x.dtype``); a dtype casts that result to it.
        weight_offset: Added to the weight in fp32 before the multiply: 1.0 for Gemma's ``(1 + weight)``.
            Nonzero only with ``cast_mode="gemma"``.
        cast_mode: ``"llama"`` or ``"gemma"``, where HF rounds (see the module docstring).

    Returns:
        llama: ``weight * (x_f32 * rsqrt(mean(x_f32^2, -1) + eps)).to(x.dtype)``; gemma:
        ``(x_f32 * rsqrt(mean(x_f32^2, -1) + eps) * (weight_offset + weight.float())).to(x.dtype)``; of ``x``'s
        shape.

    Raises:
        TypeError, ValueError: On invalid arguments (see :func:`rms_norm`).

    Example:
        >>> x = torch.tensor([[3.0, 4.0]])
        >>> rms_norm_reference(x, torch.tensor([1.0, 2.0]), eps=0.0)
        tensor([[0.8485, 2.2627]])
        >>> rms_norm_reference(x, torch.tensor([0.0, 1.0]), eps=0.0, weight_offset=1.0, cast_mode="gemma")
        tensor([[0.8485, 2.2627]])
    """
    _check_args(x, weight, eps, out_dtype, weight_offset, cast_mode)
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    if cast_mode == "gemma":
        y = (h * (weight_offset + weight.float())).to(input_dtype)
    else:
        y = weight * h.to(input_dtype)
    return y if out_dtype is None else y.to(out_dtype)


# --------------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------------


def _rms_norm_fwd_body(
    x_ptr,  # [M, N] rows of stride stride_xm, unit column stride
    w_ptr,  # [N]
    y_ptr,  # [M, N] contiguous
    rstd_ptr,  # [M] fp32, written when STORE_RSTD
    M,
    N,
    stride_xm,
    eps,
    offset,  # added to the weight in fp32 (Gemma's 1 + weight); 0 in the llama mode
    ROUND_N: tl.constexpr,  # llama: round the normalised value to x's dtype before the weight multiply
    # 0: the product stays fp32, 1: round it to bf16, 2: to fp16 (llama: HF's promoted dtype; gemma: x's dtype)
    PROD_ROUND: tl.constexpr,
    STORE_RSTD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    ok = row_ok[:, None] & col_ok[None, :]
    # int64 offsets: M * stride exceeds 2^31 for long sequences of wide rows.
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    # Masked lanes are 0, so the sum over BLOCK_N is the sum over the N real columns.
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)
    n = x * rstd[:, None]
    if ROUND_N:
        # LLaMA rounds the normalised value to the input dtype before the weight multiply ...
        n = n.to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32) + offset
    y = w[None, :] * n
    # ... and multiplies in the promoted dtype (Gemma: in fp32, then casts to the input dtype), i.e. rounds the
    # product there before any cast to out_dtype.
    if PROD_ROUND == 1:
        y = y.to(tl.bfloat16).to(tl.float32)
    elif PROD_ROUND == 2:
        y = y.to(tl.float16).to(tl.float32)
    tl.store(y_ptr + rows64[:, None] * N + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)
    if STORE_RSTD:
        tl.store(rstd_ptr + rows, rstd, mask=row_ok)


def _rms_norm_bwd_body(
    dy_ptr,  # [M, N] rows of stride stride_dym
    x_ptr,  # [M, N] rows of stride stride_xm
    w_ptr,  # [N]
    rstd_ptr,  # [M] fp32
    dx_ptr,  # [M, N] contiguous, written when COMPUTE_DX
    dw_ptr,  # [programs, N] fp32 partial sums, written when COMPUTE_DW
    M,
    N,
    stride_dym,
    stride_xm,
    offset,  # as in the forward
    ROUND_N: tl.constexpr,  # as in the forward
    BLOCKS_PER_PROG: tl.constexpr,  # a power of two, so few variants compile as M changes
    PREFETCH: tl.constexpr,
    COMPUTE_DX: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    n_progs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32) + offset
    # Per-lane partial sums; reduced over the BLOCK_M rows once at the end instead of every iteration.
    dw_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Strided assignment: at each step the programs together read one contiguous stretch of rows. Blocks past
    # M (the ragged last step, and the prefetch after it) are fully masked and move no memory.
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    step = n_progs * BLOCK_M
    if PREFETCH:
        ok = (rows < M)[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)
        x_nxt = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=ok, other=0.0)
        dy_nxt = tl.load(dy_ptr + rows64[:, None] * stride_dym + cols[None, :], mask=ok, other=0.0)
    for _ in range(0, BLOCKS_PER_PROG):
        row_ok = rows < M
        ok = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)
        if PREFETCH:
            # Issue the next block's loads before this block's reductions and stores: one program keeps two
            # tiles in flight, which the single-pass loop cannot (its loads wait on the previous store).
            x = x_nxt.to(tl.float32)
            dy = dy_nxt.to(tl.float32)
            nxt = rows + step
            ok_n = (nxt < M)[:, None] & col_ok[None, :]
            nxt64 = nxt.to(tl.int64)
            x_nxt = tl.load(x_ptr + nxt64[:, None] * stride_xm + cols[None, :], mask=ok_n, other=0.0)
            dy_nxt = tl.load(dy_ptr + nxt64[:, None] * stride_dym + cols[None, :], mask=ok_n, other=0.0)
        else:
            x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + rows64[:, None] * stride_dym + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        n = x * rstd[:, None]
        if COMPUTE_DW:
            # The gradient uses the value the forward multiplied the weight by: n rounded to x's dtype (llama) or
            # n itself (gemma).
            if ROUND_N:
                dw_acc += dy * n.to(x_ptr.dtype.element_ty).to(tl.float32)
            else:
                dw_acc += dy * n
        if COMPUTE_DX:
            # d/dx of x * rstd(x): rstd * (g - n * mean(g * n)), g the gradient w.r.t. the normalised value.
            g = dy * w[None, :]
            c = tl.sum(g * n, axis=1) / N
            dx = (g - n * c[:, None]) * rstd[:, None]
            tl.store(dx_ptr + rows64[:, None] * N + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=ok)
        rows += step
    if COMPUTE_DW:
        tl.store(dw_ptr + pid.to(tl.int64) * N + cols, tl.sum(dw_acc, axis=0), mask=col_ok)


@functools.cache
def _kernels() -> tuple[Any, Any]:
    # Built at first use so that importing this module never needs triton (CPU-only installs use the reference).
    return triton.jit(_rms_norm_fwd_body), triton.jit(_rms_norm_bwd_body)


@functools.cache
def _launch_params(n: int, interpret: bool, tile_elems: int) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps)`` for rows of width ``n``."""
    block_n = triton.next_power_of_2(n)
    if interpret:
        # Several rows per program even for the tiny test widths, so the 2-D tile and row masks are exercised.
        return max(1, min(4, 64 // block_n)), block_n, 1
    block_m = max(1, tile_elems // block_n)
    # ~16 elements a thread: one row of 8192 fills 16 warps, narrower tiles use 4-8.
    num_warps = min(16, max(4, block_m * block_n // 512))
    return block_m, block_n, num_warps


@functools.cache
def _sm_count(device_index: int) -> int:
    return int(torch.cuda.get_device_properties(device_index).multi_processor_count)


def _rows_2d(t: torch.Tensor, n: int) -> torch.Tensor:
    """``[M, n]`` view of ``t`` with unit column stride; copies only when no such view exists."""
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(1) == 1 or n == 1 else t2.contiguous()


def _prod_round(x_dtype: torch.dtype, w_dtype: torch.dtype, cast_mode: str) -> int:
    """Rounding code of the weight product: HF's promoted dtype (llama) or the input dtype (gemma)."""
    dtype = x_dtype if cast_mode == "gemma" else torch.promote_types(x_dtype, w_dtype)
    return {torch.bfloat16: 1, torch.float16: 2}.get(dtype, 0)


def _forward(
    x2: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype,
    out_shape: torch.Size,
    store_rstd: bool,
    weight_offset: float = 0.0,
    cast_mode: str = "llama",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(y of out_shape, rstd [M] or None)`` for ``x2`` ``[M, N]``."""
    m, n = x2.shape
    interpret = _interpret()
    block_m, block_n, num_warps = _launch_params(n, interpret, _TILE_ELEMS)
    y = torch.empty(out_shape, device=x2.device, dtype=out_dtype)
    rstd = torch.empty((m,), device=x2.device, dtype=torch.float32) if store_rstd else None
    fwd, _ = _kernels()
    fwd[(triton.cdiv(m, block_m),)](
        x2,
        weight,
        y,
        rstd if rstd is not None else y,  # dummy pointer, never written when STORE_RSTD is off
        m,
        n,
        x2.stride(0),
        float(eps),
        float(weight_offset),
        ROUND_N=cast_mode != "gemma",
        PROD_ROUND=_prod_round(x2.dtype, weight.dtype, cast_mode),
        STORE_RSTD=store_rstd,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return y, rstd


def _backward(
    dy2: torch.Tensor,
    x2: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    x_shape: torch.Size,
    need_dx: bool,
    need_dw: bool,
    weight_offset: float = 0.0,
    cast_mode: str = "llama",
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(dx of x_shape or None, dweight or None)`` for ``dy2``, ``x2`` ``[M, N]``."""
    m, n = x2.shape
    interpret = _interpret()
    block_m, block_n, num_warps = _launch_params(n, interpret, _TILE_ELEMS)
    n_blocks = triton.cdiv(m, block_m)
    if not need_dw:
        target = n_blocks  # nothing to reduce across rows: one block per program, no loop
    elif interpret:
        target = 3  # a ragged persistent loop on the small test shapes
    else:
        index = x2.device.index
        target = _BWD_PROGRAMS_PER_SM * _sm_count(index if index is not None else torch.cuda.current_device())
    # Power-of-two trip counts: a handful of compiled variants however M varies; programs lands in
    # (target / 2, target].
    blocks_per_prog = triton.next_power_of_2(triton.cdiv(n_blocks, min(target, n_blocks)))
    programs = triton.cdiv(n_blocks, blocks_per_prog)
    dx = torch.empty(x_shape, device=x2.device, dtype=x2.dtype) if need_dx else None
    dw_part = torch.empty((programs, n), device=x2.device, dtype=torch.float32) if need_dw else None
    dummy = rstd  # never written when its flag is off
    _, bwd = _kernels()
    bwd[(programs,)](
        dy2,
        x2,
        weight,
        rstd,
        dx if dx is not None else dummy,
        dw_part if dw_part is not None else dummy,
        m,
        n,
        dy2.stride(0),
        x2.stride(0),
        float(weight_offset),
        ROUND_N=cast_mode != "gemma",
        BLOCKS_PER_PROG=blocks_per_prog,
        PREFETCH=_BWD_PREFETCH and blocks_per_prog > 1,
        COMPUTE_DX=need_dx,
        COMPUTE_DW=need_dw,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
    dw = dw_part.sum(0).to(weight.dtype) if dw_part is not None else None
    return dx, dw


def _recompute_forward(
    eps: float,
    out_dtype: torch.dtype,
    x_shape: torch.Size,
    x2: torch.Tensor,
    w: torch.Tensor,
    _rstd: torch.Tensor,
    *,
    weight_offset: float = 0.0,
    cast_mode: str = "llama",
) -> torch.Tensor:
    """The forward's ``y`` again, bit for bit: the same compiled kernel (``rstd`` stored too, as in the forward)
    and launch on the same saved inputs."""
    return _forward(x2, w, eps, out_dtype, x_shape, True, weight_offset, cast_mode)[0]


def _recompute_reduce(
    eps: float,
    out_dtype: torch.dtype,
    x_shape: torch.Size,
    x2: torch.Tensor,
    w: torch.Tensor,
    rstd: torch.Tensor,
    *,
    u: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``scale * u^T y`` (fp32) from the saved ``x2``, ``w`` and ``rstd``, ``y`` rebuilt in registers only. The
    reduction kernel rebuilds the llama mode's roundings: registered for that mode only."""
    return lowrank_reduce(u, "rms_norm", (x2, w, rstd), scale, out_dtype, torch.promote_types(x2.dtype, w.dtype))


class RMSNormFunction(torch.autograd.Function):
    """Autograd function over the Triton RMSNorm kernels.

    ``apply(x, weight, eps, out_dtype, weight_offset=0.0, cast_mode="llama")`` with ``x`` ``[..., hidden]`` on CUDA
    (or CPU under ``TRITON_INTERPRET=1``), ``weight`` ``[hidden]`` and ``out_dtype`` a torch dtype (use
    ``torch.promote_types(weight.dtype, x.dtype)`` for HF's llama result, ``x.dtype`` for its gemma one);
    ``weight_offset`` and ``cast_mode`` as for :func:`rms_norm`, unchecked. Saves ``x`` (a row-strided view, copied
    only when its last dim is not unit-stride) and an fp32 ``rstd`` per row. Gradients: ``dx`` in ``x``'s dtype,
    ``dweight`` in ``weight``'s, each only when required. Prefer :func:`rms_norm`, which checks inputs and picks the
    path.

    Example:
        >>> # on CUDA, or on CPU under TRITON_INTERPRET=1
        >>> x, w = torch.randn(4, 48, requires_grad=True), torch.ones(48, requires_grad=True)
        >>> y = RMSNormFunction.apply(x, w, 1e-6, torch.float32)  # doctest: +SKIP
        >>> y.sum().backward()  # doctest: +SKIP
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        out_dtype: torch.dtype,
        weight_offset: float = 0.0,
        cast_mode: str = "llama",
    ) -> torch.Tensor:
        n = x.shape[-1]
        x2 = _rows_2d(x, n)
        w = weight.contiguous()
        y, rstd = _forward(x2, w, eps, out_dtype, x.shape, True, weight_offset, cast_mode)
        ctx.save_for_backward(x2, w, rstd)
        ctx.x_shape = x.shape
        ctx.weight_offset = weight_offset
        ctx.cast_mode = cast_mode
        # A consumer (a LoRA layer) may rebuild y from the x2 and w saved here instead of keeping y.
        assert rstd is not None  # store_rstd=True
        if cast_mode == "gemma":
            run: Any = functools.partial(_recompute_forward, weight_offset=weight_offset, cast_mode=cast_mode)
            reduce: Any = None
        else:
            run, reduce = _recompute_forward, _recompute_reduce
        ctx.recompute_token = register_recompute(y, run, x2, w, rstd, bound=(eps, out_dtype, x.shape), reduce=reduce)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        forget_recompute(ctx.recompute_token)  # every consumer's backward has run
        x2, w, rstd = ctx.saved_tensors
        n_inputs = len(ctx.needs_input_grad)  # 4 or 6: weight_offset and cast_mode may be left to their defaults
        need_dx, need_dw = ctx.needs_input_grad[:2]
        if not (need_dx or need_dw):
            return (None,) * n_inputs
        dy2 = _rows_2d(dy, x2.shape[1])
        dx, dw = _backward(dy2, x2, w, rstd, ctx.x_shape, need_dx, need_dw, ctx.weight_offset, ctx.cast_mode)
        return (dx, dw) + (None,) * (n_inputs - 2)


# --------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    out_dtype: torch.dtype | None = None,
    use_kernel: bool | None = None,
    weight_offset: float = 0.0,
    cast_mode: CastMode = "llama",
) -> torch.Tensor:
    """RMSNorm with HF's numerics (``LlamaRMSNorm``'s by default, ``Gemma2RMSNorm``'s on request), in Triton on CUDA.

    Args:
        x: Input ``[..., hidden]``; any leading dims (per-head norms take ``(B, S, heads, head_dim)`` as is). Rows
            need not be contiguous with each other, but a last dim whose stride is not 1 is copied to a contiguous
            tensor first (kernel path).
        weight: Scale ``[hidden]``.
        eps: Added to the mean square before the reciprocal square root (``variance_epsilon``, Gemma's ``eps``).
        out_dtype: None returns HF's dtype exactly: ``torch.promote_types(weight.dtype, x.dtype)`` for the llama
            mode, ``x.dtype`` for the gemma mode. A dtype gives that result cast to it, written directly by the
            kernel: under autocast pass the autocast dtype (the consumers are linears that would cast to it anyway)
            to halve the bytes written for an fp32 result.
        use_kernel: None takes the kernel when :func:`rms_norm_kernel_available` says so, else the reference; True
            requires the kernel (ValueError saying why when it cannot run); False forces the reference.
        weight_offset: Added to the weight in fp32 before the multiply. 1.0 for Gemma/Gemma 2/Gemma 3 (their
            ``(1 + weight)``, the stored weight initialised to zeros); needs ``cast_mode="gemma"``.
        cast_mode: ``"llama"`` (LLaMA, Mistral, Qwen2, Qwen3): the normalised value rounded to ``x.dtype``, then
            multiplied by the weight in the promoted dtype. ``"gemma"`` (Gemma 2/3 with ``weight_offset=1.0``,
            OLMo 2 with ``0.0``): the product taken in fp32 and rounded once to ``x.dtype``.

    Returns:
        The normalised ``x``, same shape, in ``out_dtype`` or HF's dtype.

    Raises:
        TypeError: ``x``/``weight`` not floating-point tensors, ``eps`` or ``weight_offset`` not a number,
            ``out_dtype`` not a float dtype.
        ValueError: Shape or device mismatch, ``eps`` negative or not finite, an unknown ``cast_mode``, a nonzero
            ``weight_offset`` without ``cast_mode="gemma"``, or ``use_kernel=True`` with unsupported inputs.

    Example:
        >>> x = torch.randn(2, 3, 40, dtype=torch.bfloat16)
        >>> w = torch.ones(40)  # an fp32 parameter, as under bf16-mixed
        >>> rms_norm(x, w, 1e-6).dtype
        torch.float32
        >>> rms_norm(x, w, 1e-6, out_dtype=torch.bfloat16).shape
        torch.Size([2, 3, 40])
        >>> gemma = rms_norm(x, torch.zeros(40), 1e-6, weight_offset=1.0, cast_mode="gemma")  # Gemma2RMSNorm
        >>> gemma.dtype, torch.equal(gemma, rms_norm(x, w, 1e-6, cast_mode="gemma"))
        (torch.bfloat16, True)
    """
    _check_args(x, weight, eps, out_dtype, weight_offset, cast_mode)
    if use_kernel is False:
        return rms_norm_reference(x, weight, eps, out_dtype=out_dtype, weight_offset=weight_offset, cast_mode=cast_mode)
    reason = _unsupported_reason(x, weight, out_dtype, cast_mode)
    if reason is not None:
        if use_kernel:
            raise ValueError(f"rms_norm(use_kernel=True) cannot use the Triton kernel: {reason}")
        return rms_norm_reference(x, weight, eps, out_dtype=out_dtype, weight_offset=weight_offset, cast_mode=cast_mode)
    return rms_norm_kernel(x, weight, eps, out_dtype, weight_offset=weight_offset, cast_mode=cast_mode)


def rms_norm_kernel(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype | None,
    *,
    weight_offset: float = 0.0,
    cast_mode: CastMode = "llama",
) -> torch.Tensor:
    """The kernel path of :func:`rms_norm` for inputs already known to be supported (``rms_norm_fallback_reason``
    returned None for them, with the same ``cast_mode``): no argument checks, for callers that cached that answer
    per input signature."""
    dtype = _result_dtype(x, weight, out_dtype, cast_mode)
    offset = float(weight_offset)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        y: torch.Tensor = RMSNormFunction.apply(x, weight, float(eps), dtype, offset, cast_mode)
        return y
    # No graph: skip the autograd.Function and the rstd store.
    x2, w = _rows_2d(x, x.shape[-1]), weight.contiguous()
    y2, _ = _forward(x2, w, float(eps), dtype, x.shape, False, offset, cast_mode)
    return y2
