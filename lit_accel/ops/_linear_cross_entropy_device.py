"""The parts of :mod:`lit_accel.ops.linear_cross_entropy` that run on the device: the Triton row kernel (online
softmax, loss, soft-cap and the logits gradient in place), the GEMM helpers around it, and the check of labels
outside the vocabulary that reads its result without a host-device sync. The module docstring of
:mod:`lit_accel.ops.linear_cross_entropy` gives the numerics and the design; nothing here is public API.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import torch

from lit_accel.ops._triton import HAS_TRITON as _HAS_TRITON
from lit_accel.ops._triton import interpret as _interpret
from lit_accel.ops._triton import tl, triton

__all__: list[str] = []

_REDUCTIONS = ("mean", "sum", "none")
_CUDA_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Up to this width a row is one block (one pass). Wider rows loop over _LOOP_BLOCK-wide blocks twice; on an H100
# 16384 x 32 warps was the fastest of blocks 2048-16384 x 4-32 warps (V = 32000 and 128256), and beat one
# 32768-wide block a row (see the module docstring).
_MAX_SINGLE_BLOCK = 8192
_LOOP_BLOCK = 16384
# The interpreter runs numpy per program: small blocks keep the tests quick and exercise the multi-block loop.
_INTERP_MAX_SINGLE_BLOCK = 64
_INTERP_LOOP_BLOCK = 64
# Automatic chunk: as many tokens as keep the chunk's logits no larger than the weight (C <= H tokens), which lets
# the final gradient cast reuse their buffer, but never fewer than this many tokens, below which the three GEMMs
# per chunk (K = C for the weight gradient) stop filling an H100 and the fp32 accumulator's read-modify-write
# per chunk starts to show.
_MIN_AUTO_CHUNK = 2048
_MAX_AUTO_CHUNK = 8192


# --------------------------------------------------------------------------------------------------------------
# Label range: immediate on CPU and on the reference path, read without waiting on the fused CUDA path
# --------------------------------------------------------------------------------------------------------------

_INT64_MAX = 2**63 - 1
_INT64_MIN = -(2**63)
# Label checks in flight at most: a call finding this many unread (the host that far ahead of the device) waits for
# the oldest.
_MAX_PENDING_LABEL_CHECKS = 64


def _bad_label_stats(labels: torch.Tensor, v: int, ignore_index: int) -> torch.Tensor:
    """``(count, min, max)`` of the labels outside ``[0, V)`` other than ``ignore_index``: int64 on labels' device."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= v))
    if labels.numel() == 0:
        return torch.zeros(3, dtype=torch.int64, device=labels.device)
    lo = torch.where(bad, labels, _INT64_MAX).amin()
    hi = torch.where(bad, labels, _INT64_MIN).amax()
    return torch.stack((bad.sum(), lo, hi))


def _label_error(stats: list[int], v: int, ignore_index: int, context: str = "") -> ValueError:
    count, lo, hi = stats
    span = f"{lo}" if lo == hi else f"from {lo} to {hi}"
    return ValueError(
        f"{context}labels must be class indices in [0, {v}) (the vocabulary: weight.shape[0]={v}) or "
        f"ignore_index={ignore_index}; got {count} label(s) outside that range, {span}"
    )


def _check_labels_now(labels: torch.Tensor, v: int, ignore_index: int) -> None:
    """Raises at once on labels outside ``[0, V)`` (one host-device sync on CUDA)."""
    stats = _bad_label_stats(labels, v, ignore_index).tolist()
    if stats[0]:
        raise _label_error(stats, v, ignore_index)


@dataclasses.dataclass
class _PendingLabelCheck:
    stats: torch.Tensor  # (count, min, max) on the host, filled by an asynchronous copy
    event: Any  # torch.cuda.Event recorded after that copy; None when the copy was synchronous
    v: int
    ignore_index: int
    device: torch.device


_PENDING_LABEL_CHECKS: list[_PendingLabelCheck] = []
_RING_NEXT = [0]


@functools.cache
def _pinned_ring() -> torch.Tensor:
    # One page-locked allocation for all checks in flight: a pinned allocation per call costs more than the check.
    return torch.empty((_MAX_PENDING_LABEL_CHECKS, 3), dtype=torch.int64, pin_memory=True)


@functools.cache
def _label_stats_init(device: torch.device) -> torch.Tensor:
    return torch.tensor([0, _INT64_MAX, _INT64_MIN], dtype=torch.int64, device=device)


def _new_label_stats(device: torch.device) -> torch.Tensor:
    """``(count, min, max)`` = ``(0, int64 max, int64 min)`` on the device, for the kernel's atomics (one copy)."""
    return _label_stats_init(device).clone()


def _queue_label_stats(stats: torch.Tensor, v: int, ignore_index: int) -> None:
    """Copies the kernel's ``(count, min, max)`` to the host without waiting; read by
    :func:`_raise_finished_label_checks` once the copy is done (which has left a ring slot free)."""
    device = stats.device
    event = None
    if stats.is_cuda:
        if torch.cuda.is_current_stream_capturing():
            return  # a CUDA graph being captured can hold no host read; the NaN loss still shows the problem
        # Slots are taken in turn and records leave in order, so with fewer than the ring's size in flight the
        # next slot is free.
        assert len(_PENDING_LABEL_CHECKS) < _MAX_PENDING_LABEL_CHECKS
        host = _pinned_ring()[_RING_NEXT[0] % _MAX_PENDING_LABEL_CHECKS]
        _RING_NEXT[0] += 1
        with torch.cuda.device(device):
            host.copy_(stats, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        stats = host
    _PENDING_LABEL_CHECKS.append(_PendingLabelCheck(stats, event, v, ignore_index, device))


def _raise_finished_label_checks() -> None:
    """Raises ``ValueError`` for the oldest completed check that found bad labels; waits for the device only when
    the host has run a whole ring of calls ahead of it."""
    if len(_PENDING_LABEL_CHECKS) >= _MAX_PENDING_LABEL_CHECKS and _PENDING_LABEL_CHECKS[0].event is not None:
        _PENDING_LABEL_CHECKS[0].event.synchronize()
    while _PENDING_LABEL_CHECKS:
        rec = _PENDING_LABEL_CHECKS[0]
        if rec.event is not None and not rec.event.query():
            return
        _PENDING_LABEL_CHECKS.pop(0)
        stats = rec.stats.tolist()
        if stats[0]:
            raise _label_error(
                stats,
                rec.v,
                rec.ignore_index,
                context=f"an earlier fused_linear_cross_entropy call on {rec.device} gave those tokens a NaN loss "
                "and no gradient: ",
            )


# --------------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------------

if _HAS_TRITON:

    @triton.jit
    def _softcap_tanh(raw, cap, inv_cap, ROUND: tl.constexpr, DTYPE: tl.constexpr):
        """``(cap * tanh(raw / cap), tanh(raw / cap))`` in fp32; with ROUND each step rounded to DTYPE, as HF."""
        # torch divides a tensor by a Python scalar as a product with the scalar's fp32 reciprocal.
        u = raw * inv_cap
        if ROUND:
            u = u.to(DTYPE).to(tl.float32)
        a = tl.abs(u)
        # tanh(a) = (1 - e) / (1 + e), e = exp(-2a), saturates to 1 for large a; below 1/8 the odd Taylor series to
        # a**7 (error < 2e-10 relative) avoids the cancellation in 1 - e.
        e = tl.exp(-2.0 * a)
        a2 = a * a
        series = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0))))
        t = tl.where(a < 0.125, series, (1.0 - e) / (1.0 + e))
        t = tl.where(u < 0.0, -t, t)
        if ROUND:
            t = t.to(DTYPE).to(tl.float32)
        x = t * cap
        if ROUND:
            x = x.to(DTYPE).to(tl.float32)
        return x, t


def _ce_rows_body(
    logits_ptr,  # [C, V] compute dtype; overwritten with dloss/dlogits when COMPUTE_GRAD
    stride_row,
    labels_ptr,  # [C] int64
    loss_ptr,  # [C] fp32, unscaled per-row loss (0 for ignored rows, NaN for labels outside [0, V))
    lse_ptr,  # [C] fp32, logsumexp of the (capped) logits (0 for ignored rows)
    scale_ptr,  # [1] fp32, the reduction's scale s
    row_scale_ptr,  # [C] fp32, each row's incoming gradient (reduction="none"); read when HAS_ROW_SCALE
    class_weight_ptr,  # [V] fp32 class weights; read when HAS_CLASS_WEIGHT
    label_stats_ptr,  # [3] int64 (count, min, max) of labels outside [0, V); updated when HAS_LABEL_STATS
    V,
    ignore_index,
    smoothing,
    z_weight,
    softcap,
    inv_softcap,
    BLOCK_V: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    ROUND_SOFTCAP: tl.constexpr,
    HAS_CLASS_WEIGHT: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr,
    HAS_LABEL_STATS: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
):
    """One row: loss, logsumexp and (optionally) the gradient written over the logits."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    dt = logits_ptr.dtype.element_ty
    y = tl.load(labels_ptr + row)
    valid = y != ignore_index
    in_vocab = (y >= 0) & (y < V)
    ok = valid & in_vocab
    # A label outside [0, V) is never used as an offset: its row gets a NaN loss and a zero gradient, and is counted
    # for the host to read later (the atomics run for such rows only).
    y_safe = tl.where(ok, y, 0)
    if HAS_LABEL_STATS:  # noqa: SIM102 - a compile-time branch around a run-time one
        # A branch rather than masked atomics: a clean row then issues no atomic (nor its memory fence) at all.
        if valid & (~in_vocab):
            tl.atomic_add(label_stats_ptr, 1, sem="relaxed")
            tl.atomic_min(label_stats_ptr + 1, y, sem="relaxed")
            tl.atomic_max(label_stats_ptr + 2, y, sem="relaxed")
    offs = tl.arange(0, BLOCK_V)
    w_y = 1.0
    if HAS_CLASS_WEIGHT:
        w_y = tl.load(class_weight_ptr + y_safe)
    w_sum = 0.0
    wx_sum = 0.0

    if SINGLE_BLOCK:
        # The whole row in registers: one read and (with gradients) one write of the logits.
        in_row = offs < V
        x = tl.load(row_ptr + offs, mask=in_row, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            x, t = _softcap_tanh(x, softcap, inv_softcap, ROUND_SOFTCAP, dt)
        x = tl.where(in_row, x, -float("inf"))
        m = tl.max(x, axis=0)
        e = tl.exp(x - m)  # exp(-inf) = 0 for the padding
        d = tl.sum(e, axis=0)
        lse = m + tl.log(d)
        x_y = tl.sum(tl.where(offs == y_safe, x, 0.0), axis=0)
        if HAS_SMOOTHING:
            if HAS_CLASS_WEIGHT:
                wb = tl.load(class_weight_ptr + offs, mask=in_row, other=0.0)
                w_sum = tl.sum(wb, axis=0)
                wx_sum = tl.sum(wb * tl.where(in_row, x, 0.0), axis=0)
            else:
                wx_sum = tl.sum(tl.where(in_row, x, 0.0), axis=0)
    else:
        # Online softmax: running max m and sum d of exp(x - m) over the blocks.
        m = -float("inf")
        d = 0.0
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            in_row = cols < V
            xb = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                xb, _ = _softcap_tanh(xb, softcap, inv_softcap, ROUND_SOFTCAP, dt)
            xb = tl.where(in_row, xb, -float("inf"))
            m_new = tl.maximum(m, tl.max(xb, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(xb - m_new), axis=0)
            m = m_new
            if HAS_SMOOTHING:
                if HAS_CLASS_WEIGHT:
                    wb = tl.load(class_weight_ptr + cols, mask=in_row, other=0.0)
                    w_sum += tl.sum(wb, axis=0)
                    wx_sum += tl.sum(wb * tl.where(in_row, xb, 0.0), axis=0)
                else:
                    wx_sum += tl.sum(tl.where(in_row, xb, 0.0), axis=0)
        lse = m + tl.log(d)
        x_y = tl.load(row_ptr + y_safe).to(tl.float32)
        if HAS_SOFTCAP:
            x_y, _ = _softcap_tanh(x_y, softcap, inv_softcap, ROUND_SOFTCAP, dt)

    loss = (1.0 - smoothing) * w_y * (lse - x_y) + z_weight * lse * lse
    if HAS_SMOOTHING:
        if HAS_CLASS_WEIGHT:
            # torch's weighted smoothing term: (eps / V) * sum_j w_j * (lse - x_j).
            loss += smoothing / V * (w_sum * lse - wx_sum)
        else:
            loss += smoothing * (lse - wx_sum / V)
    tl.store(loss_ptr + row, tl.where(ok, loss, tl.where(valid, float("nan"), 0.0)))
    tl.store(lse_ptr + row, tl.where(ok, lse, 0.0))

    if COMPUTE_GRAD:
        s = tl.load(scale_ptr)
        if HAS_ROW_SCALE:
            s = s * tl.load(row_scale_ptr + row)
        # Ignored rows (and rows with a label outside [0, V)) get an all-zero gradient row (the GEMMs read all rows).
        s = tl.where(ok, s, 0.0)
        hit = s * (1.0 - smoothing) * w_y
        if HAS_CLASS_WEIGHT:
            p_coef = hit + s * (smoothing * w_sum / V + 2.0 * z_weight * lse)
        else:
            p_coef = s * (1.0 + 2.0 * z_weight * lse)
        flat = s * smoothing / V
        if SINGLE_BLOCK:
            g = tl.exp(x - lse) * p_coef
            if HAS_SMOOTHING:
                if HAS_CLASS_WEIGHT:
                    g -= flat * wb
                else:
                    g -= flat
            g = tl.where(offs == y_safe, g - hit, g)
            if HAS_SOFTCAP:
                g = g * (1.0 - t * t)
            tl.store(row_ptr + offs, g.to(dt), mask=offs < V)
        else:
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                in_row = cols < V
                xb = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
                if HAS_SOFTCAP:
                    xb, tb = _softcap_tanh(xb, softcap, inv_softcap, ROUND_SOFTCAP, dt)
                g = tl.exp(xb - lse) * p_coef
                if HAS_SMOOTHING:
                    if HAS_CLASS_WEIGHT:
                        g -= flat * tl.load(class_weight_ptr + cols, mask=in_row, other=0.0)
                    else:
                        g -= flat
                g = tl.where(cols == y_safe, g - hit, g)
                if HAS_SOFTCAP:
                    g = g * (1.0 - tb * tb)
                tl.store(row_ptr + cols, g.to(dt), mask=in_row)


def _scale_body(ptr, n, scale_ptr, BLOCK: tl.constexpr):
    """In place ``t *= s`` with the product formed in fp32 (s is not rounded to t's dtype first)."""
    s = tl.load(scale_ptr)
    # loss.backward() passes exactly 1: skip the memory traffic.
    if s != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        v = tl.load(ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(ptr + offs, (v * s).to(ptr.dtype.element_ty), mask=ok)


@functools.cache
def _kernels() -> tuple[Any, Any]:
    # Built at first use so that importing this module never needs triton (CPU-only installs use the reference).
    return triton.jit(_ce_rows_body), triton.jit(_scale_body)


def _ce_rows(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_out: torch.Tensor,
    lse_out: torch.Tensor,
    scale: torch.Tensor,
    ignore_index: int,
    smoothing: float,
    z_weight: float,
    compute_grad: bool,
    softcap: float | None = None,
    class_weight: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    label_stats: torch.Tensor | None = None,
) -> None:
    rows, v = logits.shape
    interp = _interpret()
    max_single = _INTERP_MAX_SINGLE_BLOCK if interp else _MAX_SINGLE_BLOCK
    pow2 = triton.next_power_of_2(v)
    single = pow2 <= max_single
    block = pow2 if single else (_INTERP_LOOP_BLOCK if interp else _LOOP_BLOCK)
    num_warps = 32 if block >= 16384 else (16 if block >= 4096 else 8)
    _kernels()[0][(rows,)](
        logits,
        logits.stride(0),
        labels,
        loss_out,
        lse_out,
        scale,
        row_scale if row_scale is not None else scale,  # not read without HAS_ROW_SCALE
        class_weight if class_weight is not None else scale,  # not read without HAS_CLASS_WEIGHT
        label_stats if label_stats is not None else labels,  # not touched without HAS_LABEL_STATS
        v,
        int(ignore_index),
        float(smoothing),
        float(z_weight),
        float(softcap) if softcap is not None else 1.0,
        1.0 / float(softcap) if softcap is not None else 1.0,
        BLOCK_V=block,
        SINGLE_BLOCK=single,
        HAS_SMOOTHING=smoothing > 0.0,
        HAS_SOFTCAP=softcap is not None,
        ROUND_SOFTCAP=logits.dtype != torch.float32,
        HAS_CLASS_WEIGHT=class_weight is not None,
        HAS_ROW_SCALE=row_scale is not None,
        HAS_LABEL_STATS=label_stats is not None,
        COMPUTE_GRAD=compute_grad,
        num_warps=num_warps,
    )


def _scale_(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    n = t.numel()
    if n:
        block = 4096
        _kernels()[1][(triton.cdiv(n, block),)](t, n, scale, BLOCK=block, num_warps=8)
    return t


# --------------------------------------------------------------------------------------------------------------
# GEMM helpers: fp32 accumulation of bf16/fp16 products without a product-sized temporary
# --------------------------------------------------------------------------------------------------------------


@functools.cache
def _cuda_out_dtype_mm() -> bool:
    """Whether ``torch.mm``/``torch.addmm`` take ``out_dtype=torch.float32`` for half-precision CUDA inputs."""
    try:
        a = torch.ones(16, 16, device="cuda", dtype=torch.bfloat16)
        acc = torch.ones(16, 16, device="cuda", dtype=torch.float32)
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        torch.mm(a, a, out_dtype=torch.float32, out=acc)
        return bool(acc[0, 0].item() == 16.0)
    except (RuntimeError, TypeError):
        return False


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """``out (+)= a @ b`` where ``out`` may be fp32 and ``a``/``b`` half precision (products summed in fp32)."""
    if out.dtype == a.dtype:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
    elif out.is_cuda and _cuda_out_dtype_mm():
        # cuBLAS reads/writes the fp32 C directly (beta = 1): no half-precision product to round and re-add.
        if accumulate:
            torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
        else:
            torch.mm(a, b, out_dtype=out.dtype, out=out)
    elif accumulate:
        out.add_(torch.mm(a, b))
    else:
        out.copy_(torch.mm(a, b))


def _auto_chunk(n: int, h: int, v: int) -> int:
    chunk = min(max(h, _MIN_AUTO_CHUNK), _MAX_AUTO_CHUNK)
    if n <= chunk:
        return n
    # Even chunks (no short tail GEMM), rounded up to 128 rows to stay on whole GEMM tiles.
    n_chunks = -(-n // chunk)
    even = -(-n // n_chunks)
    return min(n, -(-even // 128) * 128)


# Argument checks
# --------------------------------------------------------------------------------------------------------------


def _check_args(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss_weight: float,
    reduction: str,
    num_items_in_batch: int | torch.Tensor | None,
    chunk_size: int | None,
    softcap: float | None = None,
    class_weight: torch.Tensor | None = None,
) -> None:
    """Raises ``TypeError``/``ValueError`` naming the argument, the value given and what is allowed."""
    for name, obj in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(obj, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(obj).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (vocab, hidden), got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden's last dim must equal weight.shape[1]={weight.shape[1]} (weight {tuple(weight.shape)}), "
            f"got hidden of shape {tuple(hidden.shape)}"
        )
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels must have shape hidden.shape[:-1]={tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}"
        )
    if labels.dtype != torch.long:
        raise TypeError(f"labels must be int64 (torch.long), got {labels.dtype}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape (vocab,)=({weight.shape[0]},) or be None, got {tuple(bias.shape)}")
    opt: tuple[tuple[str, torch.Tensor | None], ...] = (("hidden", hidden), ("weight", weight), ("bias", bias))
    for name, t in opt:
        if t is not None and not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if not torch.is_autocast_enabled(hidden.device.type):
        # F.linear itself refuses mixed dtypes outside autocast; say so with the names.
        for name, t in opt[1:]:
            if t is not None and t.dtype != hidden.dtype:
                raise TypeError(
                    f"{name} dtype {t.dtype} differs from hidden's {hidden.dtype}; outside autocast they must match"
                )
    if class_weight is not None:
        if not isinstance(class_weight, torch.Tensor):
            raise TypeError(f"class_weight must be a torch.Tensor or None, got {type(class_weight).__name__}")
        if tuple(class_weight.shape) != (weight.shape[0],):
            raise ValueError(
                f"class_weight must be 1-D of shape (vocab,)=({weight.shape[0]},) or None, "
                f"got shape {tuple(class_weight.shape)}"
            )
        if not class_weight.is_floating_point():
            raise TypeError(f"class_weight must be a floating-point tensor, got {class_weight.dtype}")
    for name, t in (*opt[1:], ("labels", labels), ("class_weight", class_weight)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}; they must share a device")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not (isinstance(label_smoothing, (int, float)) and 0.0 <= label_smoothing < 1.0):
        raise ValueError(f"label_smoothing must be a float in [0, 1), got {label_smoothing!r}")
    if not (isinstance(z_loss_weight, (int, float)) and math.isfinite(z_loss_weight) and z_loss_weight >= 0.0):
        raise ValueError(f"z_loss_weight must be a finite float >= 0, got {z_loss_weight!r}")
    if softcap is not None and (
        isinstance(softcap, bool)
        or not isinstance(softcap, (int, float))
        or not math.isfinite(softcap)
        or softcap <= 0.0
    ):
        raise ValueError(f"softcap must be a positive finite float (e.g. 30.0) or None (no capping), got {softcap!r}")
    if class_weight is not None and z_loss_weight > 0.0:
        raise ValueError(
            f"z_loss_weight={z_loss_weight!r} cannot be combined with class_weight (a class-weighted z-loss has no "
            "agreed meaning); use z_loss_weight=0.0 with class_weight, or no class_weight"
        )
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be an int >= 1 or None (automatic), got {chunk_size!r}")
    if num_items_in_batch is not None:
        if reduction == "none":
            raise ValueError(
                "num_items_in_batch divides the summed loss and cannot be combined with reduction='none' (per-token "
                "losses); pass num_items_in_batch=None, or reduction='mean'/'sum'"
            )
        if isinstance(num_items_in_batch, torch.Tensor):
            if num_items_in_batch.numel() != 1:
                raise ValueError(
                    f"num_items_in_batch must be a one-element tensor, got shape {tuple(num_items_in_batch.shape)}"
                )
        elif isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, int):
            raise TypeError(
                f"num_items_in_batch must be an int, a one-element tensor or None, got {num_items_in_batch!r}"
            )
        elif num_items_in_batch < 1:
            raise ValueError(f"num_items_in_batch must be >= 1, got {num_items_in_batch}")
