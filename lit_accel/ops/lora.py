"""Fused LoRA linear: ``y = x W^T + b + s * dropout(x) A^T B^T`` with a frozen base and trainable adapters.

Layers, as every op in :mod:`lit_accel.ops`:

* :func:`lora_linear_reference` - plain PyTorch, operation for operation what PEFT's ``lora.Linear`` does
  (``base(x) + lora_B(lora_A(dropout(x))) * scaling``), used by the tests and as the CPU default.
* :class:`LoRALinearFunction` - the ``torch.autograd.Function`` of the fused path: cuBLAS GEMMs composed so that no
  output is written twice (below). It is plain torch, so it runs on any device; CUDA is where it pays.
* :func:`lora_linear` - the entry point: checks its arguments, picks the path (:func:`lora_linear_uses_fused`) and
  runs it (:func:`lora_linear_unchecked`, which callers with fixed shapes may call directly).
* :class:`LoRAGroupFunction` / :func:`lora_linear_group` - several LoRA linears on one input (a block's q/k/v, its
  gate/up) as one node: one rank projection of the input, one ``dA`` product, one ``dX``
  (:class:`lit_accel.lowrank.SharedInputGroup` runs them on CUDA).

Which path runs is ``use_kernel``'s choice, as for the other ops (here the "kernel" is the fused cuBLAS path):

* ``None`` (default): the fused path on CUDA when the compute dtype is bf16 or fp16 (where it was measured), the
  reference elsewhere, so CPU and fp32 runs stay equal to PEFT bit for bit;
* ``True``: the fused path on any device and float dtype (how the CPU tests exercise it), or a ``ValueError`` saying
  why it cannot take these inputs (a base that requires grad, tensors on different devices, an empty input);
* ``False``: the reference.

The fused path. The output starts as the low-rank term, a rank-r GEMM that only writes it (``s`` as cuBLAS's alpha), and
the base GEMM accumulates into it (beta = 1): the extra read of the output happens inside a compute-bound GEMM instead
of a second memory-bound pass that re-reads and re-writes it (the profile that showed that pass as the adapters' largest
cost came from ``benchmarks/tools/profile_lora.py``; the timings of both orders are result ``lora/gemm_beta`` in
``benchmarks/RESULTS.md``). The backward does the same for ``dX``; the adapter gradients are written in fp32 straight
from cuBLAS (``out_dtype``); ``u = dY B`` and ``dB`` come from one read of ``dY`` for wide outputs
(:func:`~lit_accel.ops.lowrank_reduce.dy_products`), and ``dA = s u^T x`` for an input rebuilt from its fused producer
never writes that input out (:func:`~lit_accel.ops.lowrank_reduce.lowrank_reduce`).

Dropout uses a mask drawn with torch once in forward and reused in backward (so the fused path and the reference
agree given the mask); its RNG stream therefore differs from PEFT's, which draws inside ``nn.Dropout``: the
reference path is the one that equals PEFT bit for bit. Groups take no dropout (each adapter would need its own
input).
"""

from __future__ import annotations

import functools
import math
from typing import Any, cast

import torch
import torch.nn.functional as F

from lit_accel.ops.lowrank_reduce import DY_PRODUCTS_MIN_N, dy_products
from lit_accel.ops.lowrank_reduce import takes as lowrank_kernels_take
from lit_accel.ops.recompute import Recompute, recompute_recipe

__all__ = [
    "LoRAGroupFunction",
    "LoRALinearFunction",
    "kernel_available",
    "lora_linear",
    "lora_linear_group",
    "lora_linear_group_kernel",
    "lora_linear_reference",
    "lora_linear_unchecked",
    "lora_linear_uses_fused",
]

_LAYOUTS = ("out_in", "in_out")
# The compute dtypes the fused path is the CUDA default for: the ones it was measured in. fp32 keeps PEFT's exact
# computation unless use_kernel=True asks otherwise.
_GPU_DTYPES = (torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------------------------
# Argument checks and the choice of path
# --------------------------------------------------------------------------------------------------------------


def _check_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float,
    weight_layout: str,
) -> tuple[int, int, int]:
    """Validates shapes and settings; returns ``(in_features, out_features, r)``."""
    if weight_layout not in _LAYOUTS:
        raise ValueError(f"weight_layout must be one of {_LAYOUTS}, got {weight_layout!r}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape if weight_layout == "out_in" else weight.shape[::-1]
    if x.dim() < 1 or x.shape[-1] != in_f:
        raise ValueError(
            f"x's last dim must equal in_features={in_f} (weight {tuple(weight.shape)}, layout {weight_layout!r}), "
            f"got x of shape {tuple(x.shape)}"
        )
    if lora_a.dim() != 2 or lora_a.shape[1] != in_f:
        raise ValueError(f"lora_a must have shape [r, in_features={in_f}], got {tuple(lora_a.shape)}")
    r = lora_a.shape[0]
    if r < 1:
        raise ValueError(f"lora_a must have rank r >= 1, got shape {tuple(lora_a.shape)}")
    if lora_b.dim() != 2 or tuple(lora_b.shape) != (out_f, r):
        raise ValueError(f"lora_b must have shape [out_features={out_f}, r={r}], got {tuple(lora_b.shape)}")
    if bias is not None and tuple(bias.shape) != (out_f,):
        raise ValueError(f"bias must have shape [out_features={out_f}] or be None, got {tuple(bias.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if not math.isfinite(scaling):
        raise ValueError(f"scaling must be a finite float, got {scaling}")
    return in_f, out_f, r


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype F.linear would compute in: autocast's when it is on for x's device, else x's own."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and x.is_floating_point():
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _fused_unsupported_reason(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
) -> str | None:
    """Why the fused path cannot take these (already shape-checked) inputs on any device, or None when it can."""
    dtype = _compute_dtype(x)
    if not dtype.is_floating_point:
        return f"compute dtype {dtype} is not a floating-point dtype"
    # Without autocast the base GEMM mixes no dtypes (F.linear would raise); keep the same contract.
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
            return f"{name} dtype {t.dtype} differs from the compute dtype {dtype}"
    if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        return "weight/bias require grad; the fused path treats the base layer as frozen (no dW/db)"
    if x.numel() == 0:
        return "x is empty"
    if not x.device == weight.device == lora_a.device == lora_b.device:
        return "x, weight, lora_a and lora_b are not all on one device"
    return None


def lora_linear_uses_fused(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    weight_layout: str = "out_in",
    use_kernel: bool | None = None,
) -> bool:
    """Checks :func:`lora_linear`'s arguments and says which path it takes: True for the fused one.

    The choice depends on the inputs' dtypes, devices, shapes and ``requires_grad``, and on the grad and autocast
    modes, never on their values: a caller whose shapes are fixed (:class:`lit_accel.lowrank.LoRALinear`) can make
    it once per such signature and then call :func:`lora_linear_unchecked`.

    Args:
        x, weight, bias, lora_a, lora_b, scaling, dropout_p, weight_layout, use_kernel: As :func:`lora_linear`'s.

    Returns:
        True when :func:`lora_linear` runs the fused path, False when it runs the reference.

    Raises:
        ValueError: On inconsistent shapes or settings, or ``use_kernel=True`` with inputs the fused path cannot
            take (the message says why).

    Example:
        >>> x, w, a, b = torch.randn(4, 16), torch.randn(8, 16), torch.randn(2, 16), torch.zeros(8, 2)
        >>> lora_linear_uses_fused(x, w, None, a, b, 1.0)  # CPU: the PEFT-exact reference by default
        False
        >>> lora_linear_uses_fused(x, w, None, a, b, 1.0, use_kernel=True)
        True
    """
    _check_args(x, weight, bias, lora_a, lora_b, scaling, dropout_p, weight_layout)
    if use_kernel is False:
        return False
    reason = _fused_unsupported_reason(x, weight, bias, lora_a, lora_b)
    if use_kernel:
        if reason is not None:
            raise ValueError(f"lora_linear(use_kernel=True) cannot take the fused path: {reason}")
        return True
    return reason is None and x.is_cuda and _compute_dtype(x) in _GPU_DTYPES


def kernel_available(
    x: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    lora_a: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    weight_layout: str = "out_in",
) -> bool:
    """Whether :func:`lora_linear` with ``use_kernel=None`` takes the fused path.

    With no arguments: whether CUDA is present. With tensors: whether these particular inputs take it (CUDA, bf16
    or fp16 compute dtype, a frozen base). CPU tensors never do by default: they run the fused path only when asked
    with ``use_kernel=True``, so default CPU runs stay on the PEFT-exact reference.

    Args:
        x: Input ``[..., in]``.
        weight: Base weight, ``[out, in]`` or ``[in, out]`` per ``weight_layout``.
        bias: Base bias ``[out]`` or None.
        lora_a: Adapter down-projection ``[r, in]``.
        lora_b: Adapter up-projection ``[out, r]``.
        weight_layout: ``"out_in"`` (nn.Linear) or ``"in_out"`` (GPT-2 Conv1D).

    Returns:
        True when the fused path runs by default.

    Example:
        >>> kernel_available(torch.randn(4, 16), torch.randn(16, 16), None, torch.randn(2, 16), torch.zeros(16, 2))
        False
    """
    if x is None or weight is None or lora_a is None or lora_b is None:
        return torch.cuda.is_available()
    return lora_linear_uses_fused(x, weight, bias, lora_a, lora_b, 1.0, 0.0, weight_layout)


# --------------------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------------------


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    weight_layout: str = "out_in",
) -> torch.Tensor:
    """LoRA linear in plain PyTorch, exactly as PEFT's ``lora.Linear.forward`` computes it.

    ``base(x) + lora_B(lora_A(dropout(x))) * scaling``, cast back to the base output's dtype. As in PEFT, ``x``
    is cast to ``lora_a``'s dtype for the adapter path (fp32 adapters on a bf16 base compute the adapter in fp32
    unless autocast is on, where F.linear casts everything to the autocast dtype). Dropout is one call of
    ``F.dropout`` (the same RNG draws as PEFT's ``nn.Dropout``) and draws nothing when ``dropout_p == 0`` or
    ``not training`` (PEFT uses ``nn.Identity`` for p == 0).

    Args:
        x: Input ``[..., in]``.
        weight: Base weight ``[out, in]`` (``weight_layout="out_in"``, nn.Linear) or ``[in, out]`` (``"in_out"``,
            GPT-2 Conv1D, computed as Conv1D does with ``addmm``).
        bias: Base bias ``[out]`` or None.
        lora_a: ``[r, in]``.
        lora_b: ``[out, r]``.
        scaling: Adapter scale (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA).
        dropout_p: Adapter dropout probability in [0, 1).
        training: Whether dropout is active.
        weight_layout: ``"out_in"`` or ``"in_out"``.

    Returns:
        ``[..., out]`` in the base output's dtype.

    Example:
        >>> x, w = torch.randn(3, 8), torch.randn(4, 8)
        >>> a, b = torch.randn(2, 8), torch.randn(4, 2)
        >>> y = lora_linear_reference(x, w, None, a, b, scaling=0.5)
        >>> torch.allclose(y, x @ w.T + 0.5 * (x @ a.T) @ b.T, atol=1e-5)
        True
    """
    _check_args(x, weight, bias, lora_a, lora_b, scaling, dropout_p, weight_layout)
    return _reference(x, weight, bias, lora_a, lora_b, scaling, dropout_p, training, weight_layout)


def _reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float,
    training: bool,
    weight_layout: str,
) -> torch.Tensor:
    """:func:`lora_linear_reference` after its argument checks."""
    if weight_layout == "out_in":
        result = F.linear(x, weight, bias)
    else:
        # transformers' Conv1D.forward, so in_out models match PEFT-on-GPT-2 bit for bit.
        x2 = x.reshape(-1, x.shape[-1])
        y2 = torch.addmm(bias, x2, weight) if bias is not None else torch.mm(x2, weight)
        result = y2.view(*x.shape[:-1], weight.shape[1])
    result_dtype = result.dtype
    xa = x if x.dtype == lora_a.dtype else x.to(lora_a.dtype)
    if dropout_p > 0.0 and training:
        xa = F.dropout(xa, dropout_p, training=True)
    result = result + F.linear(F.linear(xa, lora_a), lora_b) * scaling
    return result.to(result_dtype)


# --------------------------------------------------------------------------------------------------------------
# Fused path
# --------------------------------------------------------------------------------------------------------------


def _lora_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    d: torch.Tensor,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    mask_on_input: bool,
    scale: float,
    inv_keep: float,
    t_in: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a @ b + scale * mask?(mask?(a) @ d) @ c + bias, mask?(a) @ d)`` for 2-D views with any strides.

    One routine serves both directions: forward ``a = x``, ``b = W^T``, ``d = A^T``, ``c = B^T`` (the second result
    is ``t``, saved for ``dB``); backward ``a = dY``, ``b = W``, ``d = B``, ``c = A`` (it is ``u``, needed for
    ``dA``). ``a`` [M, K], ``b`` [K, N], ``d`` [K, R], ``c`` [R, N]; ``mask`` (bool) is [M, K] when
    ``mask_on_input`` else [M, N]. With ``t_in`` (the [M, R] projection, computed by the caller) it is used as is.

    The output starts as the low-rank term (a rank-r GEMM that only writes it, the scale applied by cuBLAS's
    alpha) and the big GEMM accumulates into it with beta = 1: the output is written once by the rank-r GEMM and
    read once more inside the big, compute-bound GEMM, instead of a memory-bound rank-r pass that re-reads and
    re-writes the whole output after it; no output-sized tensor is kept for backward.
    """
    if t_in is not None:
        t = t_in
    else:
        t = (a if mask is None or not mask_on_input else a * mask * inv_keep) @ d
    m, n = a.shape[0], b.shape[1]
    if mask is None or mask_on_input:
        if bias is not None:
            out = torch.addmm(bias, t, c, alpha=scale)
        else:
            out = torch.empty((m, n), device=a.device, dtype=a.dtype).addmm_(t, c, beta=0, alpha=scale)
    else:
        out = (t @ c).mul_(mask).mul_(scale * inv_keep)
        if bias is not None:
            out.add_(bias)
    return out.addmm_(a, b), t


def _base_views(weight: torch.Tensor, weight_layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W^T [in, out], W [out, in])`` as strided views of the stored weight, no copies."""
    w_t = weight.t() if weight_layout == "out_in" else weight
    return w_t, w_t.t()


def _dy_products_available(dy: torch.Tensor, r: int) -> bool:
    """Whether :func:`~lit_accel.ops.lowrank_reduce.dy_products` runs on (and pays off for) this output gradient."""
    return lowrank_kernels_take(dy, r) and (not dy.is_cuda or dy.shape[-1] >= DY_PRODUCTS_MIN_N)


@functools.cache
def _addmm_writes_fp32(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.addmm(..., out_dtype=torch.float32)`` runs for ``dtype`` operands on ``device``.

    ``aten::addmm.dtype`` (cuBLAS writing a bf16/fp16 product in fp32) exists on CUDA in recent torch releases, and
    its early releases required ``self`` in the inputs' dtype; one 1x1 product per device and dtype tells.
    """
    if device.type != "cuda" or dtype not in _GPU_DTYPES or "dtype" not in torch.ops.aten.addmm.overloads():
        return False
    one = torch.ones((1, 1), device=device, dtype=dtype)
    try:
        torch.addmm(torch.empty((1, 1), device=device), one, one, beta=0, out_dtype=torch.float32)
    except RuntimeError:
        return False
    return True


def _scaled_product(a: torch.Tensor, b: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``scale * a @ b`` in ``dtype``: an adapter gradient (``dA = s u^T x``, ``dB = s dY^T t``) in the adapter's dtype.

    On CUDA a bf16/fp16 product for fp32 adapters is written in fp32 by cuBLAS itself with ``alpha = scale``: the
    gradient is not rounded to the low dtype first, and no scale or cast kernel runs (each of those is tiny, but
    there are four per adapter per step). Where torch cannot, the unfused form gives the same values rounded once
    more.
    """
    if dtype == torch.float32 and _addmm_writes_fp32(a.device, a.dtype):
        out = torch.empty((a.shape[0], b.shape[1]), device=a.device, dtype=dtype)
        return torch.addmm(out, a, b, beta=0, alpha=scale, out_dtype=dtype)
    return (a @ b).mul_(scale).to(dtype)


class LoRALinearFunction(torch.autograd.Function):
    """Autograd function of the fused LoRA path (frozen base, trainable adapters), on any device.

    ``apply(x, weight, bias, lora_a, lora_b, scaling, dropout_mask, dropout_p, weight_layout, x_recompute=None)``:
    ``x`` is ``[M, in]`` (2-D), ``weight`` and ``bias`` in ``x``'s dtype, the adapters in any float dtype (cast to
    ``x``'s for the GEMMs, gradients returned in their own dtype), ``dropout_mask`` a bool ``[M, in]`` keep-mask or
    None, ``x_recompute`` a recipe that rebuilds ``x`` in the backward (:mod:`lit_accel.ops.recompute`). No
    gradients flow to ``weight`` or ``bias``.

    Example:
        >>> x, w = torch.randn(6, 16, requires_grad=True), torch.randn(8, 16)
        >>> a, b = torch.randn(2, 16, requires_grad=True), torch.randn(8, 2, requires_grad=True)
        >>> y = LoRALinearFunction.apply(x, w, None, a, b, 2.0, None, 0.0, "out_in")
        >>> torch.allclose(y, lora_linear_reference(x, w, None, a, b, 2.0), atol=1e-5)
        True
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
        dropout_mask: torch.Tensor | None,
        dropout_p: float,
        weight_layout: str,
        x_recompute: Recompute | None = None,
    ) -> torch.Tensor:
        dtype = x.dtype
        a_c, b_c = lora_a.to(dtype), lora_b.to(dtype)
        w_t, _ = _base_views(weight, weight_layout)
        inv_keep = 1.0 / (1.0 - dropout_p)
        # forward: a = x, b = W^T [in, out], d = A^T [in, r], c = B^T [r, out]
        y, t = _lora_gemm(x, w_t, a_c.t(), b_c.t(), bias, dropout_mask, True, scaling, inv_keep)
        if x_recompute is None:
            ctx.save_for_backward(x, weight, a_c, b_c, t, dropout_mask)
        else:
            # x is rebuilt in backward from its producer's saved inputs (the same tensors: nothing added).
            ctx.save_for_backward(None, weight, a_c, b_c, t, dropout_mask, *x_recompute.inputs)
            ctx.x_recompute = x_recompute.run
            ctx.x_reduce = x_recompute.reduce
            ctx.x_meta = (x.shape, x.dtype)
        ctx.scaling = scaling
        ctx.inv_keep = inv_keep
        ctx.weight_layout = weight_layout
        ctx.adapter_dtypes = (lora_a.dtype, lora_b.dtype)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, a_c, b_c, t, dropout_mask, *producer_inputs = ctx.saved_tensors
        s, inv_keep = ctx.scaling, ctx.inv_keep
        dy = dy.contiguous()
        need_dx, _, _, need_da, need_db = ctx.needs_input_grad[:5]
        u = db = None
        if need_db and _dy_products_available(dy, b_c.shape[1]):
            # u = dY B and dB = s dY^T t from one read of dY (cuBLAS would read it once for each).
            u, db32 = dy_products(dy, b_c, t, s)
            db = db32.to(ctx.adapter_dtypes[1])
        dx = None
        if need_dx:
            _, w = _base_views(weight, ctx.weight_layout)
            # backward: a = dY, b = W [out, in], d = B [out, r], c = A [r, in]; the mask gates the low-rank term.
            dx, u = _lora_gemm(dy, w, b_c, a_c, None, dropout_mask, False, s, inv_keep, t_in=u)
        elif need_da and u is None:
            u = dy @ b_c
        da = None
        if need_da:
            assert u is not None
            if x is None and dropout_mask is None and ctx.x_reduce is not None and lowrank_kernels_take(u, u.shape[1]):
                # s u^T x with x rebuilt tile by tile by its producer's reduction: x is never written out.
                da = ctx.x_reduce(*producer_inputs, u=u, scale=s).to(ctx.adapter_dtypes[0])
            else:
                if x is None:
                    shape, dtype = ctx.x_meta
                    x = ctx.x_recompute(*producer_inputs).reshape(shape).to(dtype)
                xd = x if dropout_mask is None else x * dropout_mask * inv_keep
                # u was stored unscaled; s rides on the small [r, in] result.
                da = _scaled_product(u.t(), xd, s, ctx.adapter_dtypes[0])
        if need_db and db is None:
            db = _scaled_product(dy.t(), t, s, ctx.adapter_dtypes[1])
        return dx, None, None, da, db, None, None, None, None, None


# --------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    weight_layout: str = "out_in",
    use_kernel: bool | None = None,
    recompute_input: bool = False,
) -> torch.Tensor:
    """LoRA linear ``x W^T + b + scaling * dropout(x) A^T B^T``, fused on CUDA.

    Args:
        x: Input ``[..., in]``.
        weight: Frozen base weight ``[out, in]`` (``weight_layout="out_in"``) or ``[in, out]`` (``"in_out"``).
        bias: Frozen base bias ``[out]`` or None.
        lora_a: ``[r, in]`` (trainable, any float dtype; cast to the compute dtype on the fused path).
        lora_b: ``[out, r]``.
        scaling: Adapter scale.
        dropout_p: Adapter dropout probability in [0, 1).
        training: Whether dropout is active.
        weight_layout: ``"out_in"`` (nn.Linear) or ``"in_out"`` (GPT-2 Conv1D).
        use_kernel: None takes the fused path when :func:`kernel_available` says so (CUDA, bf16/fp16 compute dtype,
            a frozen base), else the reference; True requires the fused path on whatever device the inputs are
            (ValueError saying why when it cannot take them); False forces the reference.
        recompute_input: On the fused path, when ``x`` is the output of one of the fused kernels (RMSNorm,
            SwiGLU; :mod:`lit_accel.ops.recompute`), keep that kernel's saved inputs instead of ``x`` and rerun
            it in the backward for ``dA``: the same result, without holding ``x`` from the forward to the backward.
            Elsewhere (the reference path, any other ``x``) ``x`` is saved as usual.

    Returns:
        ``[..., out]`` in the compute dtype (autocast's when enabled, else ``x``'s).

    Raises:
        ValueError: On inconsistent shapes or settings, or ``use_kernel=True`` with unsupported inputs.

    Note:
        The reference path equals PEFT's ``lora.Linear`` bit for bit (same RNG draws for dropout). The fused path
        draws its dropout mask with ``bernoulli_`` (a different RNG stream than PEFT's when ``dropout_p > 0``) and
        casts the adapters to the compute dtype, as autocast would.

    Example:
        >>> x = torch.randn(2, 5, 16)
        >>> w, a, b = torch.randn(32, 16), torch.randn(4, 16), torch.zeros(32, 4)
        >>> lora_linear(x, w, None, a, b, scaling=2.0).shape
        torch.Size([2, 5, 32])
    """
    fused = lora_linear_uses_fused(x, weight, bias, lora_a, lora_b, scaling, dropout_p, weight_layout, use_kernel)
    return lora_linear_unchecked(
        x, weight, bias, lora_a, lora_b, scaling, dropout_p, training, weight_layout, fused, recompute_input
    )


def lora_linear_unchecked(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float,
    training: bool,
    weight_layout: str,
    fused: bool,
    recompute_input: bool = False,
) -> torch.Tensor:
    """:func:`lora_linear` without its checks: the path is ``fused`` (a :func:`lora_linear_uses_fused` answer).

    For callers that checked these arguments' signature before (:class:`lit_accel.lowrank.LoRALinear` does once
    per dtype, device, width and mode), so the hot path does not repeat the checks on every call.

    Example:
        >>> x, w, a, b = torch.randn(4, 16), torch.randn(8, 16), torch.randn(2, 16), torch.zeros(8, 2)
        >>> fused = lora_linear_uses_fused(x, w, None, a, b, 1.0)
        >>> lora_linear_unchecked(x, w, None, a, b, 1.0, 0.0, False, "out_in", fused).shape
        torch.Size([4, 8])
    """
    if not fused:
        return _reference(x, weight, bias, lora_a, lora_b, scaling, dropout_p, training, weight_layout)
    return _fused(x, weight, bias, lora_a, lora_b, scaling, dropout_p, training, weight_layout, recompute_input)


def _fused(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float,
    training: bool,
    weight_layout: str,
    recompute_input: bool = False,
) -> torch.Tensor:
    """Flattens, casts as autocast would, draws the dropout mask and applies :class:`LoRALinearFunction`."""
    in_f = x.shape[-1]
    out_f = weight.shape[0] if weight_layout == "out_in" else weight.shape[1]
    dtype = _compute_dtype(x)
    lead = x.shape[:-1]
    # Autocast would cast the base operands inside F.linear; do it here and run the GEMMs with autocast off.
    x2 = x.reshape(-1, in_f).to(dtype).contiguous()
    w = weight.to(dtype)
    b = bias.to(dtype) if bias is not None else None
    mask = None
    if dropout_p > 0.0 and training:
        # bool keep-mask: 1 byte per element saved for backward (PEFT keeps the 2-byte dropped activations).
        mask = torch.empty(x2.shape, dtype=torch.bool, device=x2.device).bernoulli_(1.0 - dropout_p)
    # x.grad_fn: the producer's autograd node exists, so its inputs are kept anyway and saving them adds nothing.
    use_recipe = recompute_input and torch.is_grad_enabled() and x.grad_fn is not None
    x_recompute = recompute_recipe(x) if use_recipe else None  # none recorded over ZeRO-3 partitioned inputs
    with torch.autocast(x.device.type, enabled=False):
        y = LoRALinearFunction.apply(x2, w, b, lora_a, lora_b, float(scaling), mask, float(dropout_p), weight_layout,
                                     x_recompute)  # fmt: skip
    return y.view(*lead, out_f)


# --------------------------------------------------------------------------------------------------------------
# Linears sharing one input (q/k/v, gate/up)
# --------------------------------------------------------------------------------------------------------------


class LoRAGroupFunction(torch.autograd.Function):
    """``n`` frozen linears that read the same input, each with its own adapter, as one autograd node.

    ``apply(x, n, scalings, x_recompute, *weights, *biases, *lora_as, *lora_bs)`` returns the ``n`` outputs
    ``x W_i^T + b_i + s_i (x A_i^T) B_i^T``. ``x`` is ``[M, in]`` in the compute dtype, ``weights`` ``[out_i, in]`` and
    ``biases`` (or None) in it too; the adapters in their own dtype (cast to the compute dtype inside, gradients
    returned in theirs). Sharing the input is what the per-layer function cannot exploit:

    * one rank projection ``x [A_1; ...; A_n]^T`` (one read of ``x`` instead of ``n``), and in the backward one
      ``[u_1 ... u_n]^T x`` for every ``dA_i`` (and, with ``x_recompute``, one rebuild of ``x`` instead of ``n``);
    * each output starts as its low-rank term (a rank-r GEMM that only writes) and the base GEMM adds into it with
      beta = 1, so no output is read and written a second time; in the backward ``dX`` starts as
      ``[u_1 ... u_n] [s_1 A_1; ...]`` and each ``dY_i W_i`` accumulates into it, which also replaces the separate
      additions autograd makes to sum the ``n`` input gradients (a frozen model without adapters pays those).

    No dropout (a per-adapter dropout gives each adapter its own input); the base is frozen (no dW / db).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        n: int,
        scalings: tuple[float, ...],
        x_recompute: Recompute | None,
        *tensors: torch.Tensor | None,
    ) -> tuple[torch.Tensor, ...]:
        weights = cast("list[torch.Tensor]", list(tensors[:n]))
        biases = list(tensors[n : 2 * n])
        lora_as = cast("list[torch.Tensor]", list(tensors[2 * n : 3 * n]))
        ranks = [a.shape[0] for a in lora_as]
        # Adapters in their own dtype (fp32 under autocast); one concatenation, then one cast to the compute dtype.
        a_cat = (torch.cat(lora_as) if n > 1 else lora_as[0]).to(x.dtype)
        lora_bs = [lb.to(x.dtype) for lb in cast("list[torch.Tensor]", tensors[3 * n :])]
        t = x @ a_cat.t()
        outs = []
        start = 0
        for w, b, lb, s, r in zip(weights, biases, lora_bs, scalings, ranks, strict=True):
            # Each output as the per-layer fused path makes it, from this member's slice of the shared projection.
            y, _ = _lora_gemm(x, w.t(), a_cat.t(), lb.t(), b, None, True, s, 1.0, t_in=t[:, start : start + r])
            outs.append(y)
            start += r
        if x_recompute is None:
            ctx.save_for_backward(x, a_cat, t, *weights, *lora_bs)
        else:
            ctx.save_for_backward(None, a_cat, t, *weights, *lora_bs, *x_recompute.inputs)
            ctx.x_recompute = x_recompute.run
            ctx.x_reduce = x_recompute.reduce
            ctx.x_meta = (x.shape, x.dtype)
        ctx.n, ctx.scalings, ctx.ranks = n, scalings, ranks
        ctx.adapter_dtypes = [(a.dtype, lb.dtype) for a, lb in zip(lora_as, tensors[3 * n :], strict=True)]  # type: ignore[union-attr]
        ctx.set_materialize_grads(False)
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, *dys: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        n, scalings, ranks = ctx.n, ctx.scalings, ctx.ranks
        x, a_cat, t, *rest = ctx.saved_tensors
        weights, lora_bs, producer_inputs = rest[:n], rest[n : 2 * n], rest[2 * n :]
        need_dx = ctx.needs_input_grad[0]
        need_da = any(ctx.needs_input_grad[4 + 2 * n : 4 + 3 * n])
        need_db = ctx.needs_input_grad[4 + 3 * n :]
        m = t.shape[0]
        live = {i: dy for i, dy in enumerate(dys) if dy is not None}
        d_as: list[torch.Tensor | None] = [None] * n
        d_bs: list[torch.Tensor | None] = [None] * n
        dx = None
        if live and (need_dx or need_da):
            # u_i = dY_i B_i, unscaled; a missing dY_i (output unused) contributes zeros. With dB_i wanted too, both
            # come from one read of dY_i.
            us = []
            start = 0
            for i, (r, s) in enumerate(zip(ranks, scalings, strict=True)):
                if i not in live:
                    us.append(t.new_zeros(m, r))
                elif need_db[i] and _dy_products_available(live[i], r):
                    u_i, db_i = dy_products(live[i].contiguous(), lora_bs[i], t[:, start : start + r], s)
                    us.append(u_i)
                    d_bs[i] = db_i.to(ctx.adapter_dtypes[i][1])
                else:
                    us.append(live[i] @ lora_bs[i])
                start += r
            u = torch.cat(us, dim=1) if n > 1 else us[0]
            if need_dx:
                if len(set(scalings)) == 1:
                    dx = torch.empty((m, a_cat.shape[1]), device=t.device, dtype=t.dtype)
                    dx.addmm_(u, a_cat, beta=0, alpha=scalings[0])
                else:
                    scale = torch.cat([t.new_full((r,), s) for r, s in zip(ranks, scalings, strict=True)])
                    dx = u @ (a_cat * scale[:, None])
                for i, dy in live.items():
                    dx.addmm_(dy, weights[i])
            if need_da:
                a_dtypes = {d[0] for d in ctx.adapter_dtypes}
                one_scale = len(set(scalings)) == 1
                g_scale = scalings[0] if one_scale else 1.0
                if x is None and ctx.x_reduce is not None and lowrank_kernels_take(u, u.shape[1]):
                    # One s U^T x for every dA, x rebuilt tile by tile by its producer: x is never written out.
                    g = ctx.x_reduce(*producer_inputs, u=u, scale=g_scale)
                else:
                    if x is None:
                        shape, dtype = ctx.x_meta
                        x = ctx.x_recompute(*producer_inputs).reshape(shape).to(dtype)
                    # One [R, in] product for every dA, in the adapters' dtype straight from cuBLAS when they share one.
                    g = _scaled_product(u.t(), x, g_scale, a_dtypes.pop() if len(a_dtypes) == 1 else x.dtype)
                start = 0
                for i, (r, s) in enumerate(zip(ranks, scalings, strict=True)):
                    if i in live:
                        d_a = g[start : start + r]
                        d_as[i] = (d_a if one_scale else d_a * s).to(ctx.adapter_dtypes[i][0])
                    start += r
        start = 0
        for i, (r, s) in enumerate(zip(ranks, scalings, strict=True)):
            if need_db[i] and i in live and d_bs[i] is None:
                d_bs[i] = _scaled_product(live[i].t(), t[:, start : start + r], s, ctx.adapter_dtypes[i][1])
            start += r
        return (dx, None, None, None, *([None] * (2 * n)), *d_as, *d_bs)


def lora_linear_group(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor | None],
    lora_as: list[torch.Tensor],
    lora_bs: list[torch.Tensor],
    scalings: list[float],
    recompute_input: bool = False,
) -> list[torch.Tensor]:
    """LoRA linears that share their input (``nn.Linear`` layout, no dropout), as :class:`LoRAGroupFunction`.

    Equal to ``[lora_linear(x, w_i, b_i, a_i, b_i, s_i) ...]`` within the rounding of the compute dtype (the
    low-rank term is rounded once before the base product is added to it, the other order from PEFT's). Runs on
    any device (cuBLAS calls on CUDA, the same torch calls elsewhere); :class:`lit_accel.lowrank.LoRALinear` uses it
    on CUDA for the q/k/v and gate/up projections of a block.

    Args:
        x: Input ``[..., in]``.
        weights: Frozen base weights ``[out_i, in]``.
        biases: Frozen biases ``[out_i]`` or None, one per weight.
        lora_as: ``[r_i, in]`` adapters (any float dtype; cast to the compute dtype, gradients in their own).
        lora_bs: ``[out_i, r_i]``.
        scalings: Adapter scales.
        recompute_input: As :func:`lora_linear`'s: rebuild ``x`` in the backward from its fused producer.

    Returns:
        The ``n`` outputs ``[..., out_i]`` in the compute dtype.

    Example:
        >>> x = torch.randn(5, 16, requires_grad=True)
        >>> ws = [torch.randn(8, 16), torch.randn(4, 16)]
        >>> a_s, b_s = [torch.randn(2, 16), torch.randn(3, 16)], [torch.randn(8, 2), torch.randn(4, 3)]
        >>> ys = lora_linear_group(x, ws, [None, None], a_s, b_s, [2.0, 0.5])
        >>> ref = [lora_linear_reference(x, w, None, a, b, s) for w, a, b, s in zip(ws, a_s, b_s, [2.0, 0.5])]
        >>> all(torch.allclose(y, r, atol=1e-4) for y, r in zip(ys, ref))
        True
    """
    n = len(weights)
    if not n or not len(biases) == len(lora_as) == len(lora_bs) == len(scalings) == n:
        raise ValueError(
            "weights, biases, lora_as, lora_bs and scalings must be non-empty lists of one length, got lengths "
            f"{[len(weights), len(biases), len(lora_as), len(lora_bs), len(scalings)]}"
        )
    for w, b, a, lb, s in zip(weights, biases, lora_as, lora_bs, scalings, strict=True):
        _check_args(x, w, b, a, lb, s, 0.0, "out_in")
    return lora_linear_group_kernel(x, weights, biases, lora_as, lora_bs, scalings, recompute_input)


def lora_linear_group_kernel(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor | None],
    lora_as: list[torch.Tensor],
    lora_bs: list[torch.Tensor],
    scalings: list[float],
    recompute_input: bool = False,
) -> list[torch.Tensor]:
    """The path of :func:`lora_linear_group` after its argument checks, for callers whose shapes are fixed by
    construction (:class:`lit_accel.lowrank.SharedInputGroup`: its layers were validated when built), so the hot
    path does not re-check every member on every call."""
    n = len(weights)
    in_f = x.shape[-1]
    dtype = _compute_dtype(x)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_f).to(dtype).contiguous()
    use_recipe = recompute_input and torch.is_grad_enabled() and x.grad_fn is not None
    x_recompute = recompute_recipe(x) if use_recipe else None
    tensors = [
        *(w.to(dtype) for w in weights),
        *(b if b is None else b.to(dtype) for b in biases),
        *lora_as,
        *lora_bs,
    ]
    with torch.autocast(x.device.type, enabled=False):
        outs = LoRAGroupFunction.apply(x2, n, tuple(float(s) for s in scalings), x_recompute, *tensors)
    return [y.view(*lead, w.shape[0]) for y, w in zip(outs, weights, strict=True)]
