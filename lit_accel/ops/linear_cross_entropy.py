"""Fused LM head + cross-entropy: the loss of ``hidden @ weight.T + bias`` without the ``(tokens x vocab)`` logits.

Three layers, as every op in :mod:`lit_accel.ops`:

* :func:`linear_cross_entropy_reference` - plain PyTorch, what Hugging Face causal LMs compute (``lm_head``, Gemma 2's
  final-logit soft-capping when asked for, then ``F.cross_entropy`` on ``logits.float()``), plus the optional z-loss;
  used by the tests and as the fallback.
* :class:`FusedLinearCrossEntropyFunction` - the ``torch.autograd.Function``: the tokens are processed in chunks;
  per chunk a cuBLAS GEMM writes the chunk's logits, one Triton kernel turns them into per-row losses and
  overwrites them in place with ``d loss / d logits``, and two more GEMMs turn that into the chunk's rows of
  ``d hidden`` and its contribution to ``d weight`` (accumulated in fp32). Under ``reduction="mean"``/``"sum"`` the
  gradients are therefore ready when the forward returns and the backward only multiplies them by the incoming
  gradient. Under ``reduction="none"`` each token's incoming gradient is only known in the backward, so the forward
  computes the losses alone and the backward runs the chunks again (see the cost below).
* :func:`fused_linear_cross_entropy` - the entry point: the fused path when
  :func:`fused_linear_cross_entropy_kernel_available` says so (CUDA tensors; CPU fp32 under ``TRITON_INTERPRET=1``
  for tests), else the reference.

Time and memory against HF and Liger-Kernel are in ``benchmarks/RESULTS.md`` (result ``kernels/linear_cross_entropy``).
The memory above the inputs is one logits chunk plus the fp32 weight-gradient accumulator (V x H x 4 bytes), which
Liger's default keeps in bf16.

Numerics. Logits are produced in the GEMM's dtype (bf16 under bf16 inputs or CUDA autocast, as HF's ``lm_head``),
every softmax/loss quantity is fp32, the logits gradient is rounded once to the GEMM dtype (as the backward of
HF's ``.float()`` does) and the weight gradient is accumulated over chunks in fp32 by cuBLAS (``out_dtype``), then
rounded once to the weight's dtype. With ``softcap = c`` the (bias-added) logits are first capped as Gemma 2 does,
``x' = c * tanh(x / c)``; HF computes ``x / c``, ``tanh`` and ``* c`` in the logits' dtype, and the kernel rounds
each of the three results to that dtype too, so a bf16 run sees the same capped logits (up to the last bit of
``tanh``); ``x' = x`` without it. The gradient through the cap is formed in fp32 and rounded once. Per
valid row ``i`` with target ``y``, ``lse = logsumexp(x')``, ``eps = label_smoothing``, ``V`` classes, class weights
``w`` (all 1 without ``class_weight``) and ``W = sum_j w_j``::

    loss_i = (1 - eps) * w_y * (lse - x'_y) + (eps / V) * sum_j w_j * (lse - x'_j) + z_loss_weight * lse**2
    dloss_i / dx'_j = r_i * (softmax_j * ((1 - eps) * w_y + eps * W / V + 2 * z_loss_weight * lse)
                             - (1 - eps) * w_y * [j == y] - eps * w_j / V)
    dloss_i / dx_j = dloss_i / dx'_j * (1 - t_j**2),  t_j = tanh(x_j / c) as the forward rounded it (softcap)

which is ``F.cross_entropy(x', y, weight=w, label_smoothing=eps)``'s per-token loss, smoothing term included. ``r_i``
is the reduction's scale ``s``: ``1 / sum_valid w_y`` (``"mean"``: the number of valid tokens without class weights,
as torch divides), ``1`` (``"sum"``) or ``1 / num_items_in_batch``; under ``"none"`` it is token ``i``'s incoming
gradient. The z-loss is not defined with class weights (refused).

Labels outside ``[0, V)`` that are not ``ignore_index`` raise ``ValueError``. On CPU tensors and on the reference
path the check is immediate (on CUDA the reference then waits for the device once: ``F.cross_entropy`` would
otherwise trip a device-side assert that ends the process's CUDA context). The fused CUDA path does not wait: the
kernel never reads outside the row, gives such a token a NaN loss and no gradient, and folds the count and range of
the offending labels into three integers with atomics (run by such rows only, so a clean batch pays one 24-byte
copy each way), which are copied to pinned host memory asynchronously; the ``ValueError`` is raised by the first
later call of this op (or the backward of this one) that finds the copy complete, without a host-device sync.

Kernel design. One program per row, two passes over the row in 16384-wide blocks: an online-softmax pass (running
max, sum of exponentials, row sum for smoothing) and a gradient pass whose re-read of the row (64 KB in bf16 for a
32000-word vocabulary) mostly hits L2, so HBM sees about one read and one write of the logits (close to a plain
copy of the chunk); holding the whole row in registers for a single pass was slower: 32 warps a row leave one
program per SM and nothing overlaps its load with its reductions. Small vocabularies (``V <= 8192``) take one
block. Nothing needs a host-device sync: the number of valid tokens (or their class-weight sum) stays on the device
and the kernel reads the scale through a pointer.

Memory above the inputs during the forward: ``d hidden`` (N x H, hidden's dtype), the fp32 weight-gradient
accumulator (V x H x 4 bytes), the chunk's logits (C x V, compute dtype) and a few N-sized fp32 vectors; the
final rounding of the accumulator to a bf16/fp16 weight's dtype writes into the logits buffer when that buffer
is at least as large (it is allocated V x H then), so it costs no extra allocation.

``reduction="none"`` cost. The forward runs one GEMM and the kernel's loss pass per chunk and allocates only the
chunk's logits and N-sized vectors; the inputs are saved for the backward. The backward runs the chunks again: the
logits GEMM a second time, the kernel's two passes with every row scaled by its token's incoming gradient, and the
``d hidden``/``d weight`` GEMMs, so the op does four GEMMs instead of three (one third more GEMM time) and holds
nothing between forward and backward beyond its inputs; the backward's peak memory is the mean/sum forward's.
Measured on an H100 (16384 x 2048 x 32000, bf16, forward + backward): 15.6 ms against 11.5 ms for ``"mean"``, the
same 0.68 GiB above the inputs. The soft-cap's tanh, computed in both passes, takes the kernel from 0.39 to 0.74 ms
per 4096-token chunk (12.7 ms for the whole op); class weights cost nothing measurable.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lit_accel.ops._linear_cross_entropy_device import (
    _auto_chunk,
    _ce_rows,
    _check_args,
    _check_labels_now,
    _mm_into,
    _new_label_stats,
    _queue_label_stats,
    _raise_finished_label_checks,
    _scale_,
)
from lit_accel.ops._triton import HAS_TRITON as _HAS_TRITON
from lit_accel.ops._triton import interpret as _interpret

__all__ = [
    "FusedLinearCrossEntropyFunction",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_fallback_reason",
    "fused_linear_cross_entropy_kernel",
    "fused_linear_cross_entropy_kernel_available",
    "linear_cross_entropy_reference",
]

_REDUCTIONS = ("mean", "sum", "none")
_CUDA_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# --------------------------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------------------


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype F.linear would compute in: autocast's when it is on for hidden's device, else hidden's own."""
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return hidden.dtype


def fused_linear_cross_entropy_fallback_reason(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    softcap: float | None = None,
    class_weight: torch.Tensor | None = None,
    reduction: str = "mean",
) -> str | None:
    """Why :func:`fused_linear_cross_entropy` would take the reference path for these inputs, or None.

    Meant for an integration layer that warns once, naming the module, when it falls back. The inputs are assumed
    valid (the entry point raises on invalid ones). The kernel takes every ``softcap``, ``class_weight`` and
    ``reduction`` setting; they are accepted here so a caller can pass the keywords it passes the op.

    Args:
        hidden: ``(..., H)``.
        weight: ``(V, H)``.
        labels: ``(...)`` int64.
        bias: ``(V,)`` or None.
        softcap: Gemma 2's final-logit cap or None.
        class_weight: ``(V,)`` per-class weights or None; must share hidden's device.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        A short reason, or None when the Triton kernel will run.

    Example:
        >>> fused_linear_cross_entropy_fallback_reason(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4).long())
        'hidden is on cpu; the kernel needs CUDA (or TRITON_INTERPRET=1 with fp32 CPU tensors, for tests)'
    """
    del softcap, reduction  # every value runs in the kernel
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
    if any(t is not None and t.device != hidden.device for t in (weight, labels, bias, class_weight)):
        return "hidden, weight, labels, bias and class_weight are not all on one device"
    if hidden.numel() == 0 or weight.shape[0] == 0:
        return "there are no tokens or no classes"
    return None


def fused_linear_cross_entropy_kernel_available(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    softcap: float | None = None,
    class_weight: torch.Tensor | None = None,
    reduction: str = "mean",
) -> bool:
    """Whether :func:`fused_linear_cross_entropy` would run the fused Triton path for these inputs.

    Args:
        hidden: ``(..., H)``.
        weight: ``(V, H)``.
        labels: ``(...)`` int64.
        bias: ``(V,)`` or None.
        softcap: Gemma 2's final-logit cap or None (every value is supported).
        class_weight: ``(V,)`` per-class weights or None.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (all supported).

    Returns:
        True on CUDA with bf16/fp16/fp32 compute (and on CPU fp32 under ``TRITON_INTERPRET=1``).

    Example:
        >>> fused_linear_cross_entropy_kernel_available(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4).long())
        False
    """
    reason = fused_linear_cross_entropy_fallback_reason(
        hidden, weight, labels, bias, softcap=softcap, class_weight=class_weight, reduction=reduction
    )
    return reason is None


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
    softcap: float | None = None,
    class_weight: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LM head + cross-entropy in plain PyTorch, as Hugging Face computes it, plus an optional z-loss.

    ``logits = F.linear(hidden, weight, bias)``; with ``softcap`` then ``logits / softcap``, ``tanh``, ``* softcap``
    in the logits' dtype (Gemma 2's ``Gemma2ForCausalLM.forward``); then
    ``F.cross_entropy(logits.float(), labels, weight=class_weight, ...)`` summed over the valid tokens (labels not
    equal to ``ignore_index``), plus ``z_loss_weight * logsumexp(logits)**2`` summed over the same tokens, then
    divided by ``num_items_in_batch`` when given (Hugging Face's ``ForCausalLMLoss``), else by the number of valid
    tokens, or with ``class_weight`` the sum of their targets' weights (``"mean"``, as torch), or by 1 (``"sum"``);
    ``"none"`` returns each token's loss. ``F.linear`` runs under the caller's autocast, so logits are in the
    autocast dtype as in HF models.

    Unlike ``F.cross_entropy`` (NaN), a batch whose tokens are all ignored gives loss 0 and zero gradients under
    ``"mean"``: a packed or heavily masked micro-batch must not poison the accumulated gradients.

    Args:
        hidden: ``(..., H)`` final hidden states, already shifted so that row ``i`` predicts ``labels[i]``.
        weight: ``(V, H)`` LM-head weight.
        labels: ``(...)`` int64 class indices in ``[0, V)``, ``ignore_index`` for tokens without loss; others raise
            ``ValueError`` (checked at once; on CUDA that costs one host-device sync on this path).
        bias: ``(V,)`` or None.
        ignore_index: Label value that marks ignored tokens.
        label_smoothing: In ``[0, 1)``, as ``F.cross_entropy``'s (with ``class_weight``, torch's weighted smoothing
            term ``sum_j w_j * (lse - x_j)``).
        z_loss_weight: ``>= 0``; weight of the ``logsumexp**2`` regulariser (PaLM's z-loss), of the capped logits
            when ``softcap`` is given. Must be 0 with ``class_weight``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-token fp32 losses of labels' shape, 0 where ignored).
        num_items_in_batch: When given, the loss is the sum divided by it (overrides ``"mean"``/``"sum"``; not with
            ``"none"``).
        return_z_loss: Also return the z-loss term (detached), i.e. the part of the loss that is
            ``z_loss_weight * ...``, reduced the same way.
        softcap: A positive float ``c``: the logits become ``c * tanh(logits / c)`` before the loss (Gemma 2's
            ``final_logit_softcapping``); None leaves them as they are.
        class_weight: ``(V,)`` float weights, as ``F.cross_entropy``'s ``weight``: token ``i``'s loss is multiplied by
            ``class_weight[labels[i]]``, and ``"mean"`` divides by the sum of those weights. Not differentiated.

    Returns:
        The fp32 loss (a scalar, or labels' shape under ``"none"``), or ``(loss, z_loss_term)`` with
        ``return_z_loss``.

    Example:
        >>> h, w = torch.randn(5, 8), torch.randn(11, 8)
        >>> y = torch.tensor([1, 4, -100, 10, 0])
        >>> loss = linear_cross_entropy_reference(h, w, y)
        >>> torch.allclose(loss, F.cross_entropy(h @ w.T, y))
        True
        >>> capped = linear_cross_entropy_reference(h, w, y, softcap=2.0, reduction="none")
        >>> torch.allclose(capped, F.cross_entropy(2.0 * torch.tanh(h @ w.T / 2.0), y, reduction="none"))
        True
    """
    _check_args(
        hidden, weight, labels, bias, ignore_index, label_smoothing, z_loss_weight, reduction, num_items_in_batch, None,
        softcap, class_weight,
    )  # fmt: skip
    v = weight.shape[0]
    flat = labels.reshape(-1)
    _check_labels_now(flat, v, ignore_index)
    logits = F.linear(hidden, weight, bias)
    if softcap is not None:
        # Gemma2ForCausalLM.forward, step by step in the logits' dtype.
        logits = logits / softcap
        logits = torch.tanh(logits)
        logits = logits * softcap
    logits = logits.float().reshape(-1, v)
    cw = class_weight.detach().float() if class_weight is not None else None
    loss = F.cross_entropy(
        logits,
        flat,
        weight=cw,
        ignore_index=ignore_index,
        label_smoothing=float(label_smoothing),
        reduction="none" if reduction == "none" else "sum",
    )
    valid = flat != ignore_index
    z_rows = None
    if z_loss_weight > 0.0 or return_z_loss:
        lse = torch.logsumexp(logits, dim=-1)
        z_rows = torch.where(valid, lse.square(), 0.0) * float(z_loss_weight)
    if reduction == "none":
        if z_loss_weight > 0.0 and z_rows is not None:
            loss = loss + z_rows
        loss = loss.reshape(labels.shape)
        if not return_z_loss:
            return loss
        assert z_rows is not None
        return loss, z_rows.reshape(labels.shape).detach()
    z_sum = z_rows.sum() if z_rows is not None else None
    if z_loss_weight > 0.0 and z_sum is not None:
        loss = loss + z_sum
    if num_items_in_batch is not None:
        denom: torch.Tensor | float = (
            num_items_in_batch.to(loss.device) if isinstance(num_items_in_batch, torch.Tensor) else num_items_in_batch
        )
    elif reduction == "mean":
        if cw is not None:
            total = torch.where(valid, cw[torch.where(valid, flat, 0)], 0.0).sum()
            denom = torch.where(total == 0, 1.0, total)
        else:
            denom = valid.sum().clamp_min(1)
    else:
        denom = 1.0
    loss = loss / denom
    if not return_z_loss:
        return loss
    assert z_sum is not None
    return loss, (z_sum / denom).detach()


# --------------------------------------------------------------------------------------------------------------
# Autograd function
# --------------------------------------------------------------------------------------------------------------


def _fused_chunks(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    scale: torch.Tensor,
    row_scale: torch.Tensor | None,
    compute_dtype: torch.dtype,
    chunk: int,
    ignore_index: int,
    label_smoothing: float,
    z_loss_weight: float,
    softcap: float | None,
    class_weight: torch.Tensor | None,
    need_grads: tuple[bool, bool, bool],
    label_stats: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Per chunk: logits GEMM, loss kernel (gradient written over the logits), gradient GEMMs.

    Returns ``(loss_rows, lse_rows, d hidden, d weight, d bias)``, the gradients in their inputs' dtypes (None where
    not needed), each row's gradient multiplied by ``scale`` and, when given, by ``row_scale[row]``.
    """
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
    chunk = min(chunk, n)

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
                softcap=softcap,
                class_weight=class_weight,
                row_scale=row_scale[start:end] if row_scale is not None else None,
                label_stats=label_stats,
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
    return loss_rows, lse_rows, gx, gw, gb


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """Chunked LM head + cross-entropy whose gradients are computed during the forward (or, per token, the backward).

    ``apply(hidden, weight, labels, bias, scale, compute_dtype, chunk_size, ignore_index, label_smoothing,
    z_loss_weight, need_grads, softcap=None, class_weight=None, reduction="mean", label_stats=None)`` with ``hidden``
    ``(N, H)``, ``labels`` ``(N,)`` (outside ``[0, V)`` and not ``ignore_index``: NaN loss and no gradient for that
    row), ``scale`` a one-element fp32 tensor on the device (the reduction's ``s``), ``need_grads`` a
    ``(hidden, weight, bias)`` tuple of bools, ``softcap`` a positive float or None, ``class_weight`` a contiguous
    fp32 ``(V,)`` tensor or None, ``label_stats`` None or a ``(3,)`` int64 tensor initialised to
    ``(0, int64 max, int64 min)`` into which the forward's kernel folds the count, min and max of the labels outside
    ``[0, V)``. ``hidden``/``weight``/``bias`` are cast to ``compute_dtype`` inside (so autograd
    sees the originals and the gradients come back in their own dtypes: fp32 master weights get the fp32
    accumulator itself). The arguments are not checked (:func:`fused_linear_cross_entropy` does that).

    With ``reduction`` ``"mean"`` or ``"sum"`` (the two differ only through ``scale``) it returns
    ``(loss, z_loss_term)``, scalars, with the gradients computed in the forward; the backward scales them in place,
    so it can run once per forward (a second backward through a retained graph raises). With ``"none"`` it returns
    ``(N,)`` per-row losses and z terms, each times ``scale``; ``need_grads`` is not used: the backward recomputes the
    logits chunk by chunk and scales each row's gradient by its incoming gradient (see the module docstring for the
    cost), and may run more than once. The second output is not differentiable.

    Example:
        >>> # on CUDA, or on CPU under TRITON_INTERPRET=1 with fp32 tensors
        >>> h, w = torch.randn(6, 16, requires_grad=True), torch.randn(40, 16, requires_grad=True)
        >>> y = torch.randint(0, 40, (6,))
        >>> s = torch.full((1,), 1 / 6)
        >>> loss, _ = FusedLinearCrossEntropyFunction.apply(  # doctest: +SKIP
        ...     h, w, y, None, s, torch.float32, 4, -100, 0.0, 0.0, (True, True, False), 30.0)
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
        softcap: float | None = None,
        class_weight: torch.Tensor | None = None,
        reduction: str = "mean",
        label_stats: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        per_row = reduction == "none"
        settings = (compute_dtype, chunk_size, ignore_index, label_smoothing, z_loss_weight, softcap)
        loss_rows, lse_rows, gx, gw, gb = _fused_chunks(
            hidden, weight, bias, labels, scale, None, *settings, class_weight,
            (False, False, False) if per_row else need_grads, label_stats,
        )  # fmt: skip
        s = scale.reshape(())
        ctx.per_row = per_row
        if per_row:
            loss = loss_rows * s
            z_term = lse_rows.square() * (float(z_loss_weight) * s)
            # The backward runs the chunks again with each row scaled by its incoming gradient.
            ctx.save_for_backward(hidden, weight, bias, labels, scale, class_weight)
            ctx.settings = settings
        else:
            loss = loss_rows.sum() * s
            z_term = lse_rows.square().sum() * (float(z_loss_weight) * s)
            ctx.grads = (gx, gw, gb)
            ctx.used = False
        ctx.mark_non_differentiable(z_term)
        return loss, z_term

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, _grad_z: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        _raise_finished_label_checks()
        nones = (None,) * 11
        if ctx.per_row:
            hidden, weight, bias, labels, scale, class_weight = ctx.saved_tensors
            need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3])
            if not any(need):
                return None, None, None, None, *nones
            row_scale = grad_loss.detach().to(torch.float32).reshape(-1).contiguous()
            compute_dtype, chunk, ignore_index, smoothing, z_weight, softcap = ctx.settings
            _, _, gx, gw, gb = _fused_chunks(
                hidden, weight, bias, labels, scale, row_scale, compute_dtype, chunk, ignore_index, smoothing,
                z_weight, softcap, class_weight, need,
            )  # fmt: skip
            return gx, gw, None, gb, *nones
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
        return gx, gw, None, gb, *nones


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
    softcap: float | None = None,
    class_weight: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``labels`` without materialising all the logits.

    Same value as :func:`linear_cross_entropy_reference` (see there for the exact formula, the soft-capping, the
    class weights, the z-loss and ``num_items_in_batch``). On CUDA the tokens are processed ``chunk_size`` at a
    time and the gradients of ``hidden``, ``weight`` and ``bias`` are computed during the forward, only for those that
    require grad (a frozen LM head under LoRA costs no weight-gradient GEMM) and only when grad mode is on. Under
    autocast the GEMMs run in the autocast dtype and each gradient comes back in its input's own dtype.
    ``reduction="none"`` instead computes the gradients in the backward, recomputing the logits: one more GEMM (four
    instead of three) and nothing held from forward to backward beyond the inputs.

    Args:
        hidden: ``(..., H)`` final hidden states, already shifted so that row ``i`` predicts ``labels[i]``.
        weight: ``(V, H)`` LM-head weight (may be tied to the input embedding; autograd adds both gradients).
        labels: ``(...)`` int64 (``hidden.shape[:-1]``), ``ignore_index`` for tokens without loss, others in
            ``[0, V)``. A label outside raises ``ValueError``: at once for CPU tensors and on the reference path;
            on the fused CUDA path without a host-device sync, from the first later call of this op (or this call's
            backward) that finds the device's check done, this call having given those tokens a NaN loss and no
            gradient.
        bias: ``(V,)`` or None.
        ignore_index: Label value that marks ignored tokens.
        label_smoothing: In ``[0, 1)``.
        z_loss_weight: ``>= 0``; adds ``z_loss_weight * logsumexp(logits)**2`` per valid token (0 with
            ``class_weight``).
        reduction: ``"mean"`` (over valid tokens, or their class-weight sum), ``"sum"`` or ``"none"`` (per-token
            fp32 losses of labels' shape, 0 for ignored tokens).
        num_items_in_batch: When given (int >= 1 or one-element tensor), the loss is the sum divided by it, as
            Hugging Face does under gradient accumulation. Not with ``"none"``.
        chunk_size: Tokens per chunk; None picks ``max(H, 2048)`` capped at 8192, split evenly.
        return_z_loss: Also return the z-loss term (detached): the part of the loss contributed by
            ``z_loss_weight``, reduced like the loss.
        softcap: Positive float ``c``: the logits become ``c * tanh(logits / c)`` before the loss, as Gemma 2's
            ``final_logit_softcapping``; None for no capping.
        class_weight: ``(V,)`` float per-class weights, as ``F.cross_entropy``'s ``weight`` (not differentiated).

    Returns:
        The fp32 loss (scalar; labels' shape under ``"none"``), or ``(loss, z_loss_term)`` with ``return_z_loss``.
        All tokens ignored under ``"mean"``: 0 with zero gradients (``F.cross_entropy`` gives NaN).

    Raises:
        TypeError: On non-tensor inputs, non-int64 labels, non-float hidden/weight/bias/class_weight, or mixed dtypes
            outside autocast.
        ValueError: On inconsistent shapes or devices, settings out of range (``softcap`` not a positive finite
            float, ``num_items_in_batch`` with ``"none"``, z-loss with ``class_weight``), or labels outside
            ``[0, V)`` (see ``labels``).

    Example:
        >>> h = torch.randn(2, 3, 16, requires_grad=True)
        >>> w = torch.randn(50, 16, requires_grad=True)
        >>> y = torch.tensor([[3, 7, -100], [49, 0, 1]])
        >>> loss = fused_linear_cross_entropy(h, w, y)
        >>> loss.backward()
        >>> torch.allclose(loss, F.cross_entropy((h @ w.T).reshape(-1, 50), y.reshape(-1)))
        True
        >>> per_token = fused_linear_cross_entropy(h, w, y, reduction="none", softcap=30.0)
        >>> per_token.shape, per_token[0, 2].item()
        (torch.Size([2, 3]), 0.0)
        >>> fused_linear_cross_entropy(h, w, torch.tensor([[3, 7, 50], [49, 0, 1]]))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: labels must be class indices in [0, 50) ... got 1 label(s) outside that range, 50
    """
    _check_args(
        hidden, weight, labels, bias, ignore_index, label_smoothing, z_loss_weight, reduction, num_items_in_batch,
        chunk_size, softcap, class_weight,
    )  # fmt: skip
    reason = fused_linear_cross_entropy_fallback_reason(
        hidden, weight, labels, bias, softcap=softcap, class_weight=class_weight, reduction=reduction
    )
    if reason is not None:
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
            softcap=softcap,
            class_weight=class_weight,
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
        softcap=softcap,
        class_weight=class_weight,
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
    softcap: float | None = None,
    class_weight: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The fused path of :func:`fused_linear_cross_entropy` without its argument checks.

    For callers that decided once per input signature that the fused path takes these inputs
    (:func:`fused_linear_cross_entropy_fallback_reason` returned None), e.g. the patched ``*ForCausalLM`` forward
    of :func:`lit_accel.kernels.apply_kernels`, so the hot path does not re-check every step. The labels' range is
    still checked (it depends on the data): at once for CPU tensors, without a sync on CUDA (see
    :func:`fused_linear_cross_entropy`). Takes the same arguments.
    """
    h_dim = hidden.shape[-1]
    x2 = hidden.reshape(-1, h_dim)
    y1 = labels.reshape(-1)
    n, v = x2.shape[0], weight.shape[0]
    dev = hidden.device
    label_stats = None
    if dev.type == "cuda":
        _raise_finished_label_checks()
        label_stats = _new_label_stats(dev)
    else:
        _check_labels_now(y1, v, ignore_index)
    cw = class_weight.detach().to(device=dev, dtype=torch.float32).contiguous() if class_weight is not None else None
    # The scale stays on the device: no host sync for the valid-token count (or weight sum).
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            scale = 1.0 / num_items_in_batch.detach().to(device=dev, dtype=torch.float32).reshape(1)
        else:
            scale = torch.full((1,), 1.0 / num_items_in_batch, device=dev, dtype=torch.float32)
    elif reduction == "mean":
        valid = y1 != ignore_index
        if cw is not None:
            ok = valid & (y1 >= 0) & (y1 < v)
            total = torch.where(ok, cw[torch.where(ok, y1, 0)], 0.0).sum()
            scale = (1.0 / torch.where(total == 0, 1.0, total)).reshape(1)
        else:
            scale = 1.0 / valid.sum().clamp_min(1).to(torch.float32).reshape(1)
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
        float(softcap) if softcap is not None else None,
        cw,
        reduction,
        label_stats,
    )
    if label_stats is not None:
        _queue_label_stats(label_stats, v, ignore_index)
    if reduction == "none":
        loss, z_term = loss.reshape(labels.shape), z_term.reshape(labels.shape)
    return (loss, z_term) if return_z_loss else loss
