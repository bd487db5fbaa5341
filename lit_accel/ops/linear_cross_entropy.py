"""Fused LM head + cross-entropy: the loss of ``hidden @ weight.T + bias`` without the ``(tokens x vocab)`` logits.

Three layers, as every op in :mod:`lit_accel.ops`:

* :func:`linear_cross_entropy_reference` - plain PyTorch, what Hugging Face causal LMs compute (``lm_head`` then
  ``F.cross_entropy`` on ``logits.float()``), plus the optional z-loss; used by the tests and as the fallback.
* :class:`FusedLinearCrossEntropyFunction` - the ``torch.autograd.Function``: the tokens are processed in chunks;
  per chunk a cuBLAS GEMM writes the chunk's logits, one Triton kernel turns them into per-row losses and
  overwrites them in place with ``d loss / d logits``, and two more GEMMs turn that into the chunk's rows of
  ``d hidden`` and its contribution to ``d weight`` (accumulated in fp32). The gradients are therefore ready when
  the forward returns; the backward only multiplies them by the incoming gradient.
* :func:`fused_linear_cross_entropy` - the entry point: the fused path when
  :func:`fused_linear_cross_entropy_kernel_available` says so (CUDA tensors; CPU fp32 under ``TRITON_INTERPRET=1``
  for tests), else the reference.

Time and memory against HF and Liger-Kernel are in ``benchmarks/RESULTS.md`` (result ``kernels/linear_cross_entropy``).
The memory above the inputs is one logits chunk plus the fp32 weight-gradient accumulator (V x H x 4 bytes), which
Liger's default keeps in bf16.

Numerics. Logits are produced in the GEMM's dtype (bf16 under bf16 inputs or CUDA autocast, as HF's ``lm_head``),
every softmax/loss quantity is fp32, the logits gradient is rounded once to the GEMM dtype (as the backward of
HF's ``.float()`` does) and the weight gradient is accumulated over chunks in fp32 by cuBLAS (``out_dtype``), then
rounded once to the weight's dtype. Per valid row ``i`` with target ``y``, ``lse = logsumexp(x)``,
``eps = label_smoothing``, ``V`` classes::

    loss_i = (1 - eps) * (lse - x_y) + eps * (lse - mean_j x_j) + z_loss_weight * lse**2
    dloss_i / dx_j = s * (softmax_j * (1 + 2 * z_loss_weight * lse) - (1 - eps) * [j == y] - eps / V)

with ``s`` the reduction's scale: ``1 / #valid`` (mean), ``1`` (sum) or ``1 / num_items_in_batch``.

Kernel design. One program per row, two passes over the row in 16384-wide blocks: an online-softmax pass (running
max, sum of exponentials, row sum for smoothing) and a gradient pass whose re-read of the row (64 KB in bf16 for a
32000-word vocabulary) mostly hits L2, so HBM sees about one read and one write of the logits (close to a plain
copy of the chunk); holding the whole row in registers for a single pass was slower: 32 warps a row leave one
program per SM and nothing overlaps its load with its reductions. Small vocabularies (``V <= 8192``) take one
block. Nothing needs a host-device sync: the number of valid tokens stays on the device and the kernel reads the scale
through a pointer.

Memory above the inputs during the forward: ``d hidden`` (N x H, hidden's dtype), the fp32 weight-gradient
accumulator (V x H x 4 bytes), the chunk's logits (C x V, compute dtype) and a few N-sized fp32 vectors; the
final rounding of the accumulator to a bf16/fp16 weight's dtype writes into the logits buffer when that buffer
is at least as large (it is allocated V x H then), so it costs no extra allocation.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F

from lit_accel.ops._triton import HAS_TRITON as _HAS_TRITON
from lit_accel.ops._triton import interpret as _interpret
from lit_accel.ops._triton import tl, triton

__all__ = [
    "FusedLinearCrossEntropyFunction",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_fallback_reason",
    "fused_linear_cross_entropy_kernel",
    "fused_linear_cross_entropy_kernel_available",
    "linear_cross_entropy_reference",
]

_REDUCTIONS = ("mean", "sum")
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
    for name, t in (*opt[1:], ("labels", labels)):
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
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be an int >= 1 or None (automatic), got {chunk_size!r}")
    if num_items_in_batch is not None:
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


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype F.linear would compute in: autocast's when it is on for hidden's device, else hidden's own."""
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return hidden.dtype


def fused_linear_cross_entropy_fallback_reason(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None = None
) -> str | None:
    """Why :func:`fused_linear_cross_entropy` would take the reference path for these inputs, or None.

    Meant for an integration layer that warns once, naming the module, when it falls back. The inputs are assumed
    valid (the entry point raises on invalid ones).

    Args:
        hidden: ``(..., H)``.
        weight: ``(V, H)``.
        labels: ``(...)`` int64.
        bias: ``(V,)`` or None.

    Returns:
        A short reason, or None when the Triton kernel will run.

    Example:
        >>> fused_linear_cross_entropy_fallback_reason(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4).long())
        'hidden is on cpu; the kernel needs CUDA (or TRITON_INTERPRET=1 with fp32 CPU tensors, for tests)'
    """
    if not _HAS_TRITON:
        return "triton is not installed"
    dtype = _compute_dtype(hidden)
    if hidden.is_cuda:
        if dtype not in _CUDA_DTYPES:
            return f"compute dtype {dtype} is not supported (allowed: {', '.join(map(str, _CUDA_DTYPES))})"
    elif not (_interpret() and hidden.device.type == "cpu" and dtype == torch.float32):
        return (
            f"hidden is on {hidden.device}; the kernel needs CUDA (or TRITON_INTERPRET=1 with fp32 CPU tensors, "
            "for tests)"
        )
    if any(t is not None and t.device != hidden.device for t in (weight, labels, bias)):
        return "hidden, weight, labels and bias are not all on one device"
    if hidden.numel() == 0 or weight.shape[0] == 0:
        return "there are no tokens or no classes"
    return None


def fused_linear_cross_entropy_kernel_available(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None = None
) -> bool:
    """Whether :func:`fused_linear_cross_entropy` would run the fused Triton path for these inputs.

    Args:
        hidden: ``(..., H)``.
        weight: ``(V, H)``.
        labels: ``(...)`` int64.
        bias: ``(V,)`` or None.

    Returns:
        True on CUDA with bf16/fp16/fp32 compute (and on CPU fp32 under ``TRITON_INTERPRET=1``).

    Example:
        >>> fused_linear_cross_entropy_kernel_available(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4).long())
        False
    """
    return fused_linear_cross_entropy_fallback_reason(hidden, weight, labels, bias) is None


# --------------------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------------------


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss_weight: float = 0.0,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
    return_z_loss: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LM head + cross-entropy in plain PyTorch, as Hugging Face computes it, plus an optional z-loss.

    ``F.cross_entropy(F.linear(hidden, weight, bias).float(), labels, ...)`` summed over the valid tokens (labels
    not equal to ``ignore_index``), plus ``z_loss_weight * logsumexp(logits)**2`` summed over the same tokens, then
    divided by ``num_items_in_batch`` when given (Hugging Face's ``ForCausalLMLoss``), else by the number of valid
    tokens (``"mean"``) or by 1 (``"sum"``). ``F.linear`` runs under the caller's autocast, so logits are in the
    autocast dtype as in HF models.

    Unlike ``F.cross_entropy`` (NaN), a batch whose tokens are all ignored gives loss 0 and zero gradients under
    ``"mean"``: a packed or heavily masked micro-batch must not poison the accumulated gradients.

    Args:
        hidden: ``(..., H)`` final hidden states, already shifted so that row ``i`` predicts ``labels[i]``.
        weight: ``(V, H)`` LM-head weight.
        labels: ``(...)`` int64 class indices, ``ignore_index`` for tokens without loss.
        bias: ``(V,)`` or None.
        ignore_index: Label value that marks ignored tokens.
        label_smoothing: In ``[0, 1)``, as ``F.cross_entropy``'s.
        z_loss_weight: ``>= 0``; weight of the ``logsumexp**2`` regulariser (PaLM's z-loss).
        reduction: ``"mean"`` or ``"sum"``.
        num_items_in_batch: When given, the loss is the sum divided by it (overrides ``reduction``).
        return_z_loss: Also return the z-loss term (detached), i.e. the part of the loss that is
            ``z_loss_weight * ...``, reduced the same way.

    Returns:
        The scalar fp32 loss, or ``(loss, z_loss_term)`` with ``return_z_loss``.

    Example:
        >>> h, w = torch.randn(5, 8), torch.randn(11, 8)
        >>> y = torch.tensor([1, 4, -100, 10, 0])
        >>> loss = linear_cross_entropy_reference(h, w, y)
        >>> torch.allclose(loss, F.cross_entropy(h @ w.T, y))
        True
    """
    _check_args(
        hidden, weight, labels, bias, ignore_index, label_smoothing, z_loss_weight, reduction, num_items_in_batch, None
    )
    logits = F.linear(hidden, weight, bias).float()
    logits = logits.reshape(-1, logits.shape[-1])
    flat = labels.reshape(-1)
    loss = F.cross_entropy(
        logits, flat, ignore_index=ignore_index, label_smoothing=float(label_smoothing), reduction="sum"
    )
    valid = flat != ignore_index
    z_sum = None
    if z_loss_weight > 0.0 or return_z_loss:
        lse = torch.logsumexp(logits, dim=-1)
        z_sum = torch.where(valid, lse.square(), 0.0).sum() * float(z_loss_weight)
        loss = loss + z_sum
    if num_items_in_batch is not None:
        denom: torch.Tensor | float = (
            num_items_in_batch.to(loss.device) if isinstance(num_items_in_batch, torch.Tensor) else num_items_in_batch
        )
    elif reduction == "mean":
        denom = valid.sum().clamp_min(1)
    else:
        denom = 1.0
    loss = loss / denom
    if not return_z_loss:
        return loss
    assert z_sum is not None
    return loss, (z_sum / denom).detach()


# --------------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------------


def _ce_rows_body(
    logits_ptr,  # [C, V] compute dtype; overwritten with dloss/dlogits when COMPUTE_GRAD
    stride_row,
    labels_ptr,  # [C] int64
    loss_ptr,  # [C] fp32, unscaled per-row loss (0 for ignored rows)
    lse_ptr,  # [C] fp32, logsumexp (0 for ignored rows)
    scale_ptr,  # [1] fp32, the reduction's scale s
    V,
    ignore_index,
    smoothing,
    z_weight,
    BLOCK_V: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
):
    """One row: loss, logsumexp and (optionally) the gradient written over the logits."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    y = tl.load(labels_ptr + row)
    valid = y != ignore_index
    y_safe = tl.where(valid, y, 0)
    offs = tl.arange(0, BLOCK_V)

    if SINGLE_BLOCK:
        # The whole row in registers: one read and (with gradients) one write of the logits.
        in_row = offs < V
        x = tl.load(row_ptr + offs, mask=in_row, other=-float("inf")).to(tl.float32)
        m = tl.max(x, axis=0)
        e = tl.exp(x - m)  # exp(-inf) = 0 for the padding
        d = tl.sum(e, axis=0)
        lse = m + tl.log(d)
        x_y = tl.sum(tl.where(offs == y_safe, x, 0.0), axis=0)
        if HAS_SMOOTHING:
            row_sum = tl.sum(tl.where(in_row, x, 0.0), axis=0)
    else:
        # Online softmax: running max m and sum d of exp(x - m) over the blocks.
        m = -float("inf")
        d = 0.0
        row_sum = 0.0
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            in_row = cols < V
            xb = tl.load(row_ptr + cols, mask=in_row, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(xb, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(xb - m_new), axis=0)
            m = m_new
            if HAS_SMOOTHING:
                row_sum += tl.sum(tl.where(in_row, xb, 0.0), axis=0)
        lse = m + tl.log(d)
        x_y = tl.load(row_ptr + y_safe).to(tl.float32)

    loss = (1.0 - smoothing) * (lse - x_y) + z_weight * lse * lse
    if HAS_SMOOTHING:
        loss += smoothing * (lse - row_sum / V)
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
    tl.store(lse_ptr + row, tl.where(valid, lse, 0.0))

    if COMPUTE_GRAD:
        s = tl.load(scale_ptr)
        # Ignored rows get an all-zero gradient row (the GEMMs after this read every row).
        s = tl.where(valid, s, 0.0)
        p_coef = s * (1.0 + 2.0 * z_weight * lse)
        hit = s * (1.0 - smoothing)
        flat = s * smoothing / V
        if SINGLE_BLOCK:
            g = tl.exp(x - lse) * p_coef - flat
            g = tl.where(offs == y_safe, g - hit, g)
            tl.store(row_ptr + offs, g.to(logits_ptr.dtype.element_ty), mask=offs < V)
        else:
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                in_row = cols < V
                xb = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
                g = tl.exp(xb - lse) * p_coef - flat
                g = tl.where(cols == y_safe, g - hit, g)
                tl.store(row_ptr + cols, g.to(logits_ptr.dtype.element_ty), mask=in_row)


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
        v,
        int(ignore_index),
        float(smoothing),
        float(z_weight),
        BLOCK_V=block,
        SINGLE_BLOCK=single,
        HAS_SMOOTHING=smoothing > 0.0,
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


# --------------------------------------------------------------------------------------------------------------
# Autograd function
# --------------------------------------------------------------------------------------------------------------


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """Chunked LM head + cross-entropy whose gradients are computed during the forward.

    ``apply(hidden, weight, labels, bias, scale, compute_dtype, chunk_size, ignore_index, label_smoothing,
    z_loss_weight, need_grads)`` with ``hidden`` ``(N, H)``, ``labels`` ``(N,)``, ``scale`` a one-element fp32
    tensor on the device (the reduction's ``s``), ``need_grads`` a ``(hidden, weight, bias)`` tuple of bools.
    ``hidden``/``weight``/``bias`` are cast to ``compute_dtype`` inside (so autograd sees the originals and the
    gradients come back in their own dtypes: fp32 master weights get the fp32 accumulator itself). Returns
    ``(loss, z_loss_term)``; the second output is not differentiable. The backward scales the stored gradients
    in place, so it can run once per forward (a second backward through a retained graph raises).

    Example:
        >>> # on CUDA, or on CPU under TRITON_INTERPRET=1 with fp32 tensors
        >>> h, w = torch.randn(6, 16, requires_grad=True), torch.randn(40, 16, requires_grad=True)
        >>> y = torch.randint(0, 40, (6,))
        >>> s = torch.full((1,), 1 / 6)
        >>> loss, _ = FusedLinearCrossEntropyFunction.apply(  # doctest: +SKIP
        ...     h, w, y, None, s, torch.float32, 4, -100, 0.0, 0.0, (True, True, False))
        >>> loss.backward()  # doctest: +SKIP
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        bias: torch.Tensor | None,
        scale: torch.Tensor,
        compute_dtype: torch.dtype,
        chunk_size: int,
        ignore_index: int,
        label_smoothing: float,
        z_loss_weight: float,
        need_grads: tuple[bool, bool, bool],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        need_x, need_w, need_b = need_grads
        need_b = need_b and bias is not None
        any_grad = need_x or need_w or need_b
        n, h = hidden.shape
        v = weight.shape[0]
        dev = hidden.device
        x = hidden.to(compute_dtype).contiguous()
        w = weight.to(compute_dtype).contiguous()
        b = bias.to(compute_dtype) if bias is not None else None
        labels = labels.contiguous()
        chunk = min(chunk_size, n)

        # The final cast of the fp32 weight-gradient accumulator can land in the logits buffer when that buffer
        # is at least V x H: allocate it so when the chunk's logits are no bigger, so the cast adds no memory.
        reuse_for_dw = need_w and weight.dtype == compute_dtype and compute_dtype != torch.float32 and chunk <= h
        buf = torch.empty((v * h) if reuse_for_dw else (chunk * v), device=dev, dtype=compute_dtype)
        loss_rows = torch.empty(n, device=dev, dtype=torch.float32)
        lse_rows = torch.empty(n, device=dev, dtype=torch.float32)
        gx = torch.empty((n, h), device=dev, dtype=hidden.dtype) if need_x else None
        # fp32 master weights (autocast) accumulate straight into their own-dtype gradient.
        gw32 = torch.empty((v, h), device=dev, dtype=torch.float32) if need_w else None
        gb32 = torch.zeros(v, device=dev, dtype=torch.float32) if need_b else None

        with torch.autocast(dev.type, enabled=False):
            for i, start in enumerate(range(0, n, chunk)):
                end = min(start + chunk, n)
                rows = end - start
                x_c = x[start:end]
                logits = buf[: rows * v].view(rows, v)
                if b is not None:
                    torch.addmm(b, x_c, w.t(), out=logits)
                else:
                    torch.mm(x_c, w.t(), out=logits)
                _ce_rows(
                    logits,
                    labels[start:end],
                    loss_rows[start:end],
                    lse_rows[start:end],
                    scale,
                    ignore_index,
                    label_smoothing,
                    z_loss_weight,
                    any_grad,
                )
                # logits now hold dloss/dlogits (already multiplied by the reduction's scale).
                if gx is not None:
                    _mm_into(gx[start:end], logits, w, accumulate=False)
                if gw32 is not None:
                    _mm_into(gw32, logits.t(), x_c, accumulate=i > 0)
                if gb32 is not None:
                    gb32.add_(logits.sum(dim=0, dtype=torch.float32))

        del logits, x_c  # views of buf and x: drop them so the buffers can go
        gw: torch.Tensor | None = None
        if gw32 is not None:
            if weight.dtype == torch.float32:
                gw = gw32
            elif reuse_for_dw:
                gw = buf.view(v, h).copy_(gw32)
            else:
                del buf
                gw = gw32.to(weight.dtype)
            del gw32
        gb = gb32.to(bias.dtype) if gb32 is not None and bias is not None else None

        loss = loss_rows.sum() * scale.reshape(())
        z_term = lse_rows.square().sum() * (float(z_loss_weight) * scale.reshape(()))
        ctx.mark_non_differentiable(z_term)
        ctx.grads = (gx, gw, gb)
        ctx.used = False
        return loss, z_term

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, _grad_z: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        if ctx.used:
            raise RuntimeError(
                "FusedLinearCrossEntropyFunction's gradients were computed in the forward and scaled in place by the "
                "first backward; a second backward through the same graph (retain_graph=True) is not supported"
            )
        ctx.used = True
        gx, gw, gb = ctx.grads
        ctx.grads = None
        go = grad_loss.detach().to(torch.float32).reshape(1).contiguous()
        for g in (gx, gw, gb):
            if g is not None:
                _scale_(g, go)
        return gx, gw, None, gb, None, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss_weight: float = 0.0,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
    return_z_loss: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``labels`` without materialising all the logits.

    Same value as :func:`linear_cross_entropy_reference` (see there for the exact formula, the z-loss and
    ``num_items_in_batch``). On CUDA the tokens are processed ``chunk_size`` at a time and the gradients of
    ``hidden``, ``weight`` and ``bias`` are computed during the forward, only for those that require grad (a frozen
    LM head under LoRA costs no weight-gradient GEMM) and only when grad mode is on. Under autocast the GEMMs
    run in the autocast dtype and each gradient comes back in its input's own dtype.

    Args:
        hidden: ``(..., H)`` final hidden states, already shifted so that row ``i`` predicts ``labels[i]``.
        weight: ``(V, H)`` LM-head weight (may be tied to the input embedding; autograd adds both gradients).
        labels: ``(...)`` int64 (``hidden.shape[:-1]``), ``ignore_index`` for tokens without loss. Other labels
            must lie in ``[0, V)``; on the fused path an out-of-range label is not detected (no host sync).
        bias: ``(V,)`` or None.
        ignore_index: Label value that marks ignored tokens.
        label_smoothing: In ``[0, 1)``.
        z_loss_weight: ``>= 0``; adds ``z_loss_weight * logsumexp(logits)**2`` per valid token.
        reduction: ``"mean"`` (over valid tokens) or ``"sum"``.
        num_items_in_batch: When given (int >= 1 or one-element tensor), the loss is the sum divided by it, as
            Hugging Face does under gradient accumulation.
        chunk_size: Tokens per chunk; None picks ``max(H, 2048)`` capped at 8192, split evenly.
        return_z_loss: Also return the z-loss term (detached): the part of the loss contributed by
            ``z_loss_weight``, reduced like the loss.

    Returns:
        The scalar fp32 loss, or ``(loss, z_loss_term)`` with ``return_z_loss``. All tokens ignored under
        ``"mean"``: 0 with zero gradients (``F.cross_entropy`` gives NaN).

    Raises:
        TypeError: On non-tensor inputs, non-int64 labels, non-float hidden/weight/bias, or mixed dtypes outside
            autocast.
        ValueError: On inconsistent shapes or devices, or settings out of range.

    Example:
        >>> h = torch.randn(2, 3, 16, requires_grad=True)
        >>> w = torch.randn(50, 16, requires_grad=True)
        >>> y = torch.tensor([[3, 7, -100], [49, 0, 1]])
        >>> loss = fused_linear_cross_entropy(h, w, y)
        >>> loss.backward()
        >>> torch.allclose(loss, F.cross_entropy((h @ w.T).reshape(-1, 50), y.reshape(-1)))
        True
    """
    _check_args(
        hidden, weight, labels, bias, ignore_index, label_smoothing, z_loss_weight, reduction, num_items_in_batch,
        chunk_size,
    )  # fmt: skip
    if fused_linear_cross_entropy_fallback_reason(hidden, weight, labels, bias) is not None:
        return linear_cross_entropy_reference(
            hidden,
            weight,
            labels,
            bias,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            z_loss_weight=z_loss_weight,
            reduction=reduction,
            num_items_in_batch=num_items_in_batch,
            return_z_loss=return_z_loss,
        )
    return fused_linear_cross_entropy_kernel(
        hidden,
        weight,
        labels,
        bias,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss_weight=z_loss_weight,
        reduction=reduction,
        num_items_in_batch=num_items_in_batch,
        chunk_size=chunk_size,
        return_z_loss=return_z_loss,
    )


def fused_linear_cross_entropy_kernel(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss_weight: float = 0.0,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
    return_z_loss: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The fused path of :func:`fused_linear_cross_entropy` without its argument checks.

    For callers that decided once per input signature that the fused path takes these inputs
    (:func:`fused_linear_cross_entropy_fallback_reason` returned None), e.g. the patched ``*ForCausalLM`` forward
    of :func:`lit_accel.kernels.apply_kernels`, so the hot path does not re-check every step.
    """
    h_dim = hidden.shape[-1]
    x2 = hidden.reshape(-1, h_dim)
    y1 = labels.reshape(-1)
    n, v = x2.shape[0], weight.shape[0]
    dev = hidden.device
    # The scale stays on the device: no host sync for the valid-token count.
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            scale = 1.0 / num_items_in_batch.detach().to(device=dev, dtype=torch.float32).reshape(1)
        else:
            scale = torch.full((1,), 1.0 / num_items_in_batch, device=dev, dtype=torch.float32)
    elif reduction == "mean":
        scale = 1.0 / (y1 != ignore_index).sum().clamp_min(1).to(torch.float32).reshape(1)
    else:
        scale = torch.ones(1, device=dev, dtype=torch.float32)

    grad_on = torch.is_grad_enabled()
    need = (
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    chunk = chunk_size if chunk_size is not None else _auto_chunk(n, h_dim, v)
    loss, z_term = FusedLinearCrossEntropyFunction.apply(
        x2,
        weight,
        y1,
        bias,
        scale,
        _compute_dtype(hidden),
        chunk,
        int(ignore_index),
        float(label_smoothing),
        float(z_loss_weight),
        need,
    )
    return (loss, z_term) if return_z_loss else loss
