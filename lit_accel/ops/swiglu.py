"""Gated MLP activations ``act(gate) * up`` as one Triton pass forward and backward: SwiGLU (LLaMA) and GeGLU (Gemma).

Hugging Face's ``LlamaMLP.forward`` is ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` with ``act_fn = SiLU``;
``GemmaMLP``/``Gemma2MLP``/``Gemma3MLP`` have the same form with ``act_fn`` HF's ``gelu_pytorch_tanh``, i.e.
``F.gelu(x, approximate="tanh")``. The ``activation`` argument picks one (:data:`ACTIVATIONS`): ``"silu"`` (the
default) or ``"gelu_tanh"``. Three layers, as every op in :mod:`lit_accel.ops`:

* :func:`swiglu_reference` - plain PyTorch, exactly HF's ``F.silu(gate) * up`` or
  ``F.gelu(gate, approximate="tanh") * up`` (used by the tests and as the CPU fallback).
* :class:`SwiGLUFunction` - the ``torch.autograd.Function`` over the two Triton kernels below.
* :func:`swiglu` - the entry point: the kernel when :func:`swiglu_kernel_available` says so, else the reference.
  :func:`swiglu_fallback_reason` says in words why an input takes the reference, for a one-time warning.

Numerics. The kernels load both inputs, compute in fp32 and round once to the output dtype. HF's composition
rounds twice in bf16 (``act(gate)`` is rounded to bf16 before the product), so on bf16 inputs the kernel is
slightly *more* accurate than HF; the two agree to about one bf16 ulp. Both activations are ``g * sigmoid(a(g))``:
``a(g) = g`` for SiLU, and for the tanh GELU ``a(g) = 2 sqrt(2/pi) (g + 0.044715 g^3)``, since
``0.5 (1 + tanh(z)) = sigmoid(2 z)``. In fp32 that agrees with PyTorch's ``0.5 g (1 + tanh(z))`` to about 1e-6
absolute and is the more accurate of the two for negative ``g``, where PyTorch's ``1 + tanh(z)`` and, in its
backward, ``1 - tanh(z)^2`` cancel (its gradient is flushed to 0 from about ``g = -5``).

Memory. Autograd saves only ``gate`` and ``up`` (the linears' outputs, which the graph keeps alive for the
projections' weight gradients anyway when they are the same tensors); the backward recomputes the sigmoid
instead of keeping ``act(gate)``. HF's composition saves ``act(gate)`` as well (the product's backward needs it),
so the kernel keeps one activation-sized ``[tokens, intermediate]`` tensor less per MLP for the whole step. The
backward writes two fresh gradient tensors (not in place into the saved inputs, which would make a second backward
with ``retain_graph=True`` silently wrong).

Kernel design. Memory-bound and elementwise: each program handles ``BLOCK`` columns of one row, so any row stride
is read directly (e.g. ``gate``/``up`` as the two halves of a fused ``gate_up`` projection's output, without a
copy); the last dimension must be unit-stride.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import torch
import torch.nn.functional as F

from lit_accel.ops._triton import HAS_TRITON as _HAS_TRITON
from lit_accel.ops._triton import interpret as _interpret
from lit_accel.ops._triton import tl, triton
from lit_accel.ops.lowrank_reduce import lowrank_reduce
from lit_accel.ops.recompute import forget_recompute, register_recompute

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "SwiGLUFunction",
    "swiglu",
    "swiglu_fallback_reason",
    "swiglu_kernel_available",
    "swiglu_reference",
]

Activation = Literal["silu", "gelu_tanh"]
"""The gate activation: ``"silu"`` (SwiGLU) or ``"gelu_tanh"`` (GeGLU, ``F.gelu(x, approximate="tanh")``)."""
ACTIVATIONS: tuple[str, ...] = ("silu", "gelu_tanh")
"""The values ``activation`` takes, in the order of the kernels' ``ACT`` code."""

_GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# 1024 columns x 4 warps: 8 contiguous elements per thread, i.e. 16-byte vector loads in bf16; the tail of a row
# whose width is not a multiple of 1024 wastes at most one partly masked block per row.
_BLOCK = 1024
_NUM_WARPS = 4
# The CPU interpreter runs one numpy step per program: a small block makes test shapes span several column
# blocks (edge masks exercised) without slowing it down much.
_INTERP_BLOCK = 64


# --------------------------------------------------------------------------------------------------------------
# Argument checks and dispatch
# --------------------------------------------------------------------------------------------------------------


def _check_args(gate: Any, up: Any, activation: Any = "silu") -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    for name, t in (("gate", gate), ("up", up)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have the same shape, got gate {tuple(gate.shape)} and up {tuple(up.shape)}")
    if gate.device != up.device:
        raise ValueError(f"gate and up must be on the same device, got {gate.device} and {up.device}")


def _unsupported_reason(gate: torch.Tensor, up: torch.Tensor) -> str | None:
    """Why the kernel cannot take these (already checked) inputs, or None when it can."""
    if not _HAS_TRITON:
        return "triton is not installed"
    if gate.is_cuda:
        allowed: tuple[torch.dtype, ...] = _GPU_DTYPES
    elif _interpret() and gate.device.type == "cpu":
        # The CPU interpreter emulates in numpy, which has no bf16; fp32 is what the tests cover.
        allowed = (torch.float32,)
    else:
        return f"tensors are on {gate.device}; the kernel needs CUDA (or TRITON_INTERPRET=1 with CPU fp32 tensors)"
    for name, t in (("gate", gate), ("up", up)):
        if t.dtype not in allowed:
            return f"{name} dtype {t.dtype} is not supported (allowed: {', '.join(map(str, allowed))})"
    if gate.dim() == 0:
        return "inputs are 0-dimensional"
    if gate.numel() == 0:
        return "inputs are empty"
    return None


def swiglu_fallback_reason(gate: torch.Tensor, up: torch.Tensor, activation: Activation = "silu") -> str | None:
    """Why :func:`swiglu` would take the PyTorch reference for these inputs, or None when it uses the kernel.

    Args:
        gate: Gate projection output ``[..., intermediate]``.
        up: Up projection output, same shape.
        activation: As for :func:`swiglu` (checked only: the kernel takes both).

    Returns:
        A short sentence for a warning, or None.

    Raises:
        TypeError: If an input is not a floating-point tensor.
        ValueError: If the shapes or devices differ, or ``activation`` is unknown.

    Example:
        >>> swiglu_fallback_reason(torch.randn(2, 8), torch.randn(2, 8)) is not None  # CPU: the reference
        True
    """
    _check_args(gate, up, activation)
    return _unsupported_reason(gate, up)


def swiglu_kernel_available(gate: torch.Tensor, up: torch.Tensor, activation: Activation = "silu") -> bool:
    """Whether :func:`swiglu` would run the Triton kernel on these inputs.

    True on CUDA for fp16/bf16/fp32 inputs of the same shape (mixed dtypes allowed), and on CPU fp32 inputs
    under ``TRITON_INTERPRET=1`` (tests), for either activation.

    Args:
        gate: Gate projection output ``[..., intermediate]``.
        up: Up projection output, same shape.
        activation: As for :func:`swiglu`.

    Returns:
        True when the kernel would be used.

    Example:
        >>> swiglu_kernel_available(torch.randn(2, 8), torch.randn(2, 8))
        False
    """
    return swiglu_fallback_reason(gate, up, activation) is None


# --------------------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------------------


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor, activation: Activation = "silu") -> torch.Tensor:
    """``act(gate) * up`` in plain PyTorch, operation for operation as HF's ``LlamaMLP`` (or ``Gemma2MLP``) computes it.

    Args:
        gate: Gate projection output ``[..., intermediate]``.
        up: Up projection output, same shape.
        activation: ``"silu"`` for ``F.silu``, ``"gelu_tanh"`` for ``F.gelu(gate, approximate="tanh")``.

    Returns:
        ``act(gate) * up`` in the promotion of the two dtypes.

    Raises:
        ValueError: If ``activation`` is unknown.

    Example:
        >>> g, u = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([3.0, 2.0, 1.0])
        >>> swiglu_reference(g, u)
        tensor([ 0.0000,  1.4621, -0.2384])
        >>> swiglu_reference(g, u, activation="gelu_tanh")
        tensor([ 0.0000,  1.6824, -0.0454])
    """
    if activation == "silu":
        return F.silu(gate) * up
    if activation == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


# --------------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------------


def _swiglu_fwd_body(
    g_ptr,
    u_ptr,
    o_ptr,
    N,
    stride_g,
    stride_u,
    stride_o,
    ACT: tl.constexpr,  # 0: silu, 1: gelu_tanh
    BLOCK: tl.constexpr,
):
    # int64 row offsets: rows x row stride passes 2**31 elements at realistic token counts x widths.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    g = tl.load(g_ptr + row * stride_g + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + cols, mask=ok, other=0.0).to(tl.float32)
    # act(g) = g * sigmoid(a(g)); sigmoid via exp of -a saturates cleanly to 0 / 1 in fp32 for large |a|.
    if ACT == 0:
        a = g
    else:
        # 2 sqrt(2 / pi) (g + 0.044715 g^3): gelu_tanh(g) = 0.5 g (1 + tanh(z)) = g sigmoid(2 z).
        a = 1.5957691216057308 * (g + 0.044715 * g * g * g)
    sig = 1.0 / (1.0 + tl.exp(-a))
    out = g * sig * u
    tl.store(o_ptr + row * stride_o + cols, out.to(o_ptr.dtype.element_ty), mask=ok)


def _swiglu_bwd_body(
    dy_ptr,
    g_ptr,
    u_ptr,
    dg_ptr,
    du_ptr,
    N,
    stride_dy,
    stride_g,
    stride_u,
    stride_dg,
    stride_du,
    ACT: tl.constexpr,  # 0: silu, 1: gelu_tanh
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    dy = tl.load(dy_ptr + row * stride_dy + cols, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + row * stride_g + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + cols, mask=ok, other=0.0).to(tl.float32)
    # Recomputing sigmoid costs one exp per element in a memory-bound kernel: free, and it saves storing act(g).
    if ACT == 0:
        a = g
    else:
        a = 1.5957691216057308 * (g + 0.044715 * g * g * g)  # as in the forward
    sig = 1.0 / (1.0 + tl.exp(-a))
    act = g * sig
    # d act / dg = sig + g * sig * (1 - sig) * a'(g) = sig + act * (1 - sig) * a'(g)
    if ACT == 0:
        dact = sig + act * (1.0 - sig)
    else:
        # 1 - sig as sigmoid(-a): no cancellation where sig ~ 1, which a'(g) ~ 3 * 0.0447 * 1.6 * g^2 would amplify.
        dact = sig + act * (1.0 / (1.0 + tl.exp(a))) * (1.5957691216057308 * (1.0 + 0.134145 * g * g))
    dg = dy * u * dact
    du = dy * act
    tl.store(dg_ptr + row * stride_dg + cols, dg.to(dg_ptr.dtype.element_ty), mask=ok)
    tl.store(du_ptr + row * stride_du + cols, du.to(du_ptr.dtype.element_ty), mask=ok)


@functools.cache
def _kernels() -> tuple[Any, Any]:
    # Built at first use so that importing this module never needs triton (CPU-only installs use the reference).
    return triton.jit(_swiglu_fwd_body), triton.jit(_swiglu_bwd_body)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a 2-D ``[rows, N]`` view with unit column stride, copying only when no such view exists."""
    n = t.shape[-1]
    if t.stride(-1) == 1:
        try:
            return t.view(-1, n)
        except RuntimeError:  # leading dims not mergeable into one row stride
            pass
    return t.reshape(-1, n).contiguous()


def _launch_args() -> tuple[int, dict[str, int]]:
    if _interpret():
        return _INTERP_BLOCK, {"BLOCK": _INTERP_BLOCK}
    return _BLOCK, {"BLOCK": _BLOCK, "num_warps": _NUM_WARPS}


def _swiglu_fwd(gate: torch.Tensor, up: torch.Tensor, out_dtype: torch.dtype, act: int = 0) -> torch.Tensor:
    """``act(gate) * up`` with ``act`` the index of the activation in :data:`ACTIVATIONS`."""
    g2, u2 = _rows(gate), _rows(up)
    m, n = g2.shape
    out = torch.empty(gate.shape, dtype=out_dtype, device=gate.device)
    o2 = out.view(m, n)
    block, meta = _launch_args()
    fwd, _ = _kernels()
    fwd[(m, triton.cdiv(n, block))](g2, u2, o2, n, g2.stride(0), u2.stride(0), o2.stride(0), ACT=act, **meta)
    return out


def _swiglu_bwd(
    dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    d2, g2, u2 = _rows(dy), _rows(gate), _rows(up)
    m, n = g2.shape
    dg = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    du = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    dg2, du2 = dg.view(m, n), du.view(m, n)
    block, meta = _launch_args()
    _, bwd = _kernels()
    bwd[(m, triton.cdiv(n, block))](
        d2, g2, u2, dg2, du2, n, d2.stride(0), g2.stride(0), u2.stride(0), dg2.stride(0), du2.stride(0), ACT=act,
        **meta,
    )  # fmt: skip
    return dg, du


def _recompute_forward(gate: torch.Tensor, up: torch.Tensor, *, act: int = 0) -> torch.Tensor:
    """The forward's output again, bit for bit (same kernel on the same saved inputs)."""
    return _swiglu_fwd(gate, up, torch.promote_types(gate.dtype, up.dtype), act)


def _recompute_reduce(gate: torch.Tensor, up: torch.Tensor, *, u: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * u^T y`` (fp32) from the saved ``gate`` and ``up``, ``y`` rebuilt in registers only. The reduction
    kernel rebuilds SiLU's output: registered for that activation only."""
    return lowrank_reduce(u, "swiglu", (_rows(gate), _rows(up)), scale, torch.promote_types(gate.dtype, up.dtype))


class SwiGLUFunction(torch.autograd.Function):
    """Autograd function ``act(gate) * up`` over the Triton kernels; saves only ``gate`` and ``up``.

    ``apply(gate, up, activation="silu")``: same shape, unit-stride last dimension preferred (other layouts are
    copied once), on CUDA (or CPU fp32 under ``TRITON_INTERPRET=1``); ``activation`` one of :data:`ACTIVATIONS`,
    unchecked. The output has the promoted dtype; the gradients have their input's dtype. Use :func:`swiglu` unless
    the inputs are known to be supported.

    Example:
        >>> # on CUDA, or on CPU fp32 under TRITON_INTERPRET=1
        >>> g = torch.randn(4, 40, requires_grad=True)  # doctest: +SKIP
        >>> torch.allclose(SwiGLUFunction.apply(g, g.detach()), swiglu_reference(g, g), atol=1e-6)  # doctest: +SKIP
        True
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, gate: torch.Tensor, up: torch.Tensor, activation: str = "silu"
    ) -> torch.Tensor:
        act = ACTIVATIONS.index(activation)
        ctx.save_for_backward(gate, up)
        ctx.act = act
        y = _swiglu_fwd(gate, up, torch.promote_types(gate.dtype, up.dtype), act)
        # A consumer (the down projection's LoRA layer) may rebuild y from gate and up instead of keeping it.
        if act == 0:
            ctx.recompute_token = register_recompute(y, _recompute_forward, gate, up, reduce=_recompute_reduce)
        else:
            run = functools.partial(_recompute_forward, act=act)
            ctx.recompute_token = register_recompute(y, run, gate, up)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        forget_recompute(ctx.recompute_token)  # every consumer's backward has run
        gate, up = ctx.saved_tensors
        extra = (None,) * (len(ctx.needs_input_grad) - 2)  # activation, when it was passed
        need_g, need_u = ctx.needs_input_grad[:2]
        if not (need_g or need_u):
            return (None, None, *extra)
        dg, du = _swiglu_bwd(dy, gate, up, ctx.act)
        return (dg if need_g else None), (du if need_u else None), *extra


# --------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------


def swiglu(
    gate: torch.Tensor, up: torch.Tensor, use_kernel: bool | None = None, *, activation: Activation = "silu"
) -> torch.Tensor:
    """Gated activation ``act(gate) * up``: SwiGLU (HF ``LlamaMLP``'s ``act_fn(gate_proj(x)) * up_proj(x)``) by
    default, GeGLU (``Gemma2MLP``'s, ``act_fn`` = ``gelu_pytorch_tanh``) with ``activation="gelu_tanh"``.

    Args:
        gate: Gate projection output ``[..., intermediate]`` (fp16, bf16 or fp32).
        up: Up projection output, same shape (any float dtype; typically both bf16 under autocast).
        use_kernel: None: the Triton kernel when :func:`swiglu_kernel_available`, else the reference; True:
            require the kernel (ValueError saying why when it cannot run); False: the reference.
        activation: ``"silu"`` (``F.silu``) or ``"gelu_tanh"`` (``F.gelu(gate, approximate="tanh")``).

    Returns:
        ``act(gate) * up`` with ``gate``'s shape in ``torch.promote_types(gate.dtype, up.dtype)``. The kernel
        computes in fp32 and rounds once; its backward recomputes the activation from the saved inputs.

    Raises:
        TypeError: If an input is not a floating-point tensor.
        ValueError: If the shapes or devices differ, ``activation`` is unknown, or ``use_kernel=True`` where the
            kernel cannot run.

    Example:
        >>> g = torch.randn(2, 3, 11, requires_grad=True)
        >>> u = torch.randn(2, 3, 11, requires_grad=True)
        >>> y = swiglu(g, u)  # CPU: the reference
        >>> torch.allclose(y, torch.nn.functional.silu(g) * u)
        True
        >>> y = swiglu(g, u, activation="gelu_tanh")  # GeGLU, as Gemma's MLP
        >>> torch.allclose(y, torch.nn.functional.gelu(g, approximate="tanh") * u)
        True
    """
    _check_args(gate, up, activation)
    if use_kernel is False:
        return swiglu_reference(gate, up, activation)
    reason = _unsupported_reason(gate, up)
    if reason is not None:
        if use_kernel:
            raise ValueError(f"swiglu(use_kernel=True) cannot use the Triton kernel: {reason}")
        return swiglu_reference(gate, up, activation)
    return swiglu_kernel(gate, up, activation)


def swiglu_kernel(gate: torch.Tensor, up: torch.Tensor, activation: Activation = "silu") -> torch.Tensor:
    """The kernel path of :func:`swiglu` for inputs already known to be supported (``swiglu_fallback_reason``
    returned None for them): no argument checks, for callers that cached that answer per input signature."""
    if not (torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)):
        # No graph (evaluation, a DropBP-dropped MLP): the kernel alone, nothing saved or registered.
        return _swiglu_fwd(gate, up, torch.promote_types(gate.dtype, up.dtype), ACTIVATIONS.index(activation))
    out: torch.Tensor = SwiGLUFunction.apply(gate, up, activation)
    return out
