"""A LLaMA MLP's ``silu(gate(x)) * up(x)`` with LoRA on gate and up, the adapters' up-projection inside SwiGLU.

With adapters on both projections, :func:`~lit_accel.kernels.lora.lora_linear_group` writes each ``[tokens, 5632]``
output twice over: the rank-r term first, then the base GEMM adds into it. Here the base GEMMs write their plain
products ``g = x W_g^T`` and ``u = x W_u^T`` and the SwiGLU kernel adds the low-rank terms itself: each
``[BLOCK_M, BLOCK_N]`` tile loads ``t = x [A_g; A_u]^T`` rows and ``B`` columns and runs two rank-r ``tl.dot`` s
before ``silu(g') * u'``. The backward kernel rebuilds ``g'`` and ``u'`` the same way (nothing more is saved than
the frozen model's SwiGLU keeps: ``g`` and ``u``, plus the ``[tokens, 2r]`` ``t``), and the rest of the backward is
the shared-input group's (:func:`~lit_accel.kernels.lora.shared_input_backward`).

``g'`` is ``bf16(bf16(x W_g^T) + s t B_g^T)``: the base product rounded once as cuBLAS writes it, the low-rank
term added in fp32. The group path rounds the low-rank term first instead; both are one rounding of the sum of
two bf16-exact parts, and neither is PEFT's order (which rounds both terms and their sum).

:class:`lit_accel.lowrank.SharedInputGroup` calls :func:`lora_swiglu` from the MLP forward that
:func:`lit_accel.kernels.apply_kernels` patches, when gate and up are one group with no hooks of their own (a hook
would see outputs this path never writes).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from lit_accel.kernels._triton import interpret as _interpret
from lit_accel.kernels._triton import tl, triton
from lit_accel.kernels.lora import _compute_dtype, shared_input_backward
from lit_accel.kernels.recompute import Recompute, forget_recompute, recompute_recipe, register_recompute

__all__ = ["LoRASwiGLUFunction", "lora_swiglu", "lora_swiglu_reference"]

_GPU_DTYPES = (torch.bfloat16, torch.float16)


def _adapted_tile(
    base_ptr,
    t_ptr,
    b_ptr,
    rows64,
    cols,
    row_ok,
    col_ok,
    rr,
    r,
    t_col0,
    stride_base,
    stride_t,
    stride_bn,
    scale,
):
    """``round(base + scale * t B^T)`` for one tile, in fp32 registers: the adapted projection rounded to the base
    product's dtype, as a LoRA linear would store it."""
    r_ok = rr < r
    base = tl.load(base_ptr + rows64[:, None] * stride_base + cols[None, :],
                   mask=row_ok[:, None] & col_ok[None, :], other=0.0)  # fmt: skip
    tt = tl.load(t_ptr + rows64[:, None] * stride_t + (t_col0 + rr)[None, :],
                 mask=row_ok[:, None] & r_ok[None, :], other=0.0)  # fmt: skip
    bt = tl.load(b_ptr + cols[None, :] * stride_bn + rr[:, None], mask=r_ok[:, None] & col_ok[None, :], other=0.0)
    low = tl.dot(tt, bt)
    return (base.to(tl.float32) + scale * low).to(base.dtype).to(tl.float32)


def _fwd_body(
    g_ptr,
    u_ptr,
    t_ptr,
    bg_ptr,
    bu_ptr,
    o_ptr,
    M,
    N,
    R_G,
    R_U,
    stride_g,
    stride_u,
    stride_t,
    stride_bg,
    stride_bu,
    stride_o,
    s_g,
    s_u,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows64 = rows.to(tl.int64)
    row_ok, col_ok = rows < M, cols < N
    ok = row_ok[:, None] & col_ok[None, :]
    rr = tl.arange(0, BLOCK_R)
    g = _adapted(g_ptr, t_ptr, bg_ptr, rows64, cols, row_ok, col_ok, rr, R_G, 0, stride_g, stride_t, stride_bg, s_g)
    u = _adapted(u_ptr, t_ptr, bu_ptr, rows64, cols, row_ok, col_ok, rr, R_U, R_G, stride_u, stride_t, stride_bu, s_u)
    # silu(g) * u exactly as lit_accel.kernels.swiglu's forward writes it.
    out = g * (1.0 / (1.0 + tl.exp(-g))) * u
    tl.store(o_ptr + rows64[:, None] * stride_o + cols[None, :], out.to(o_ptr.dtype.element_ty), mask=ok)


def _bwd_body(
    dy_ptr,
    g_ptr,
    u_ptr,
    t_ptr,
    bg_ptr,
    bu_ptr,
    dg_ptr,
    du_ptr,
    M,
    N,
    R_G,
    R_U,
    stride_dy,
    stride_g,
    stride_u,
    stride_t,
    stride_bg,
    stride_bu,
    stride_dg,
    stride_du,
    s_g,
    s_u,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows64 = rows.to(tl.int64)
    row_ok, col_ok = rows < M, cols < N
    ok = row_ok[:, None] & col_ok[None, :]
    rr = tl.arange(0, BLOCK_R)
    g = _adapted(g_ptr, t_ptr, bg_ptr, rows64, cols, row_ok, col_ok, rr, R_G, 0, stride_g, stride_t, stride_bg, s_g)
    u = _adapted(u_ptr, t_ptr, bu_ptr, rows64, cols, row_ok, col_ok, rr, R_U, R_G, stride_u, stride_t, stride_bu, s_u)
    dy = tl.load(dy_ptr + rows64[:, None] * stride_dy + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    silu = g * sig
    dg = dy * u * (sig + silu * (1.0 - sig))
    du = dy * silu
    tl.store(dg_ptr + rows64[:, None] * stride_dg + cols[None, :], dg.to(dg_ptr.dtype.element_ty), mask=ok)
    tl.store(du_ptr + rows64[:, None] * stride_du + cols[None, :], du.to(du_ptr.dtype.element_ty), mask=ok)


_adapted: Any = None  # the jitted _adapted_tile, bound at first use (kernels call it by this global name)


@functools.cache
def _kernels() -> tuple[Any, Any]:
    # Built at first use so that importing this module never needs triton.
    global _adapted
    _adapted = triton.jit(_adapted_tile)
    return triton.jit(_fwd_body), triton.jit(_bwd_body)


def _launch(r_max: int) -> tuple[int, int, int, dict[str, int]]:
    block_r = max(16, triton.next_power_of_2(r_max))
    if _interpret():
        return block_r, 16, 16, {"num_warps": 1}
    return block_r, 64, 128, {"num_warps": 8, "num_stages": 2}


def swiglu_lora_forward(
    g: torch.Tensor,
    u: torch.Tensor,
    t: torch.Tensor,
    b_g: torch.Tensor,
    b_u: torch.Tensor,
    s_g: float,
    s_u: float,
    out_shape: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """``silu(g + s_g t_g B_g^T) * (u + s_u t_u B_u^T)`` for ``[M, N]`` base products ``g``, ``u``; ``t`` ``[M, r_g +
    r_u]`` holds ``t_g`` then ``t_u``; ``B`` ``[N, r]``. Output in ``g``'s dtype, of ``out_shape`` (``[..., N]``,
    default ``[M, N]``)."""
    m, n = g.shape
    r_g, r_u = b_g.shape[1], b_u.shape[1]
    block_r, block_m, block_n, meta = _launch(max(r_g, r_u))
    result = torch.empty(out_shape or (m, n), device=g.device, dtype=g.dtype)
    out = result.view(m, n)
    fwd, _ = _kernels()
    fwd[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
        g, u, t, b_g, b_u, out, m, n, r_g, r_u,
        g.stride(0), u.stride(0), t.stride(0), b_g.stride(0), b_u.stride(0), out.stride(0), float(s_g), float(s_u),
        BLOCK_R=block_r, BLOCK_M=block_m, BLOCK_N=block_n, **meta,
    )  # fmt: skip
    return result


def swiglu_lora_backward(
    dy: torch.Tensor,
    g: torch.Tensor,
    u: torch.Tensor,
    t: torch.Tensor,
    b_g: torch.Tensor,
    b_u: torch.Tensor,
    s_g: float,
    s_u: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`swiglu_lora_forward`'s output with respect to the adapted gate and up (= to ``g``, ``u``)."""
    m, n = g.shape
    dy = dy.reshape(m, n)
    r_g, r_u = b_g.shape[1], b_u.shape[1]
    block_r, block_m, block_n, meta = _launch(max(r_g, r_u))
    dg, du = torch.empty_like(g), torch.empty_like(u)
    _, bwd = _kernels()
    bwd[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
        dy, g, u, t, b_g, b_u, dg, du, m, n, r_g, r_u,
        dy.stride(0), g.stride(0), u.stride(0), t.stride(0), b_g.stride(0), b_u.stride(0), dg.stride(0), du.stride(0),
        float(s_g), float(s_u),
        BLOCK_R=block_r, BLOCK_M=block_m, BLOCK_N=block_n, **meta,
    )  # fmt: skip
    return dg, du


def _rebuild(
    s_g: float,
    s_u: float,
    out_shape: tuple[int, ...],
    g: torch.Tensor,
    u: torch.Tensor,
    t: torch.Tensor,
    b_g: torch.Tensor,
    b_u: torch.Tensor,
) -> torch.Tensor:
    """The forward's output again, bit for bit (same kernel, same saved inputs)."""
    return swiglu_lora_forward(g, u, t, b_g, b_u, s_g, s_u, out_shape)


def _reduce(
    s_g: float,
    s_u: float,
    _out_shape: tuple[int, ...],
    g: torch.Tensor,
    up: torch.Tensor,
    t: torch.Tensor,
    b_g: torch.Tensor,
    b_u: torch.Tensor,
    *,
    u: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``scale * u^T h`` (fp32; ``u`` the consumer's ``dY B``) with ``h`` rebuilt tile by tile, never written out."""
    from lit_accel.kernels.lowrank_reduce import lowrank_reduce

    return lowrank_reduce(u, "swiglu_lora", (g, up, t, b_g, b_u), scale, g.dtype, lora_scales=(s_g, s_u))


class LoRASwiGLUFunction(torch.autograd.Function):
    """``silu(x W_g^T + s_g x A_g^T B_g^T) * (x W_u^T + s_u x A_u^T B_u^T)`` with frozen bases, as one node.

    ``apply(x, w_g, w_u, a_g, a_u, b_g, b_u, s_g, s_u, x_recompute, out_shape)``: ``x`` ``[M, in]`` and the weights in
    the compute dtype, the adapters in their own (gradients returned in it); the output has ``out_shape``
    (``[..., inter]``). Registers its output for recompute (the down projection's LoRA layer rebuilds it, or
    reduces over it, from the tensors saved here).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        w_g: torch.Tensor,
        w_u: torch.Tensor,
        a_g: torch.Tensor,
        a_u: torch.Tensor,
        b_g: torch.Tensor,
        b_u: torch.Tensor,
        s_g: float,
        s_u: float,
        x_recompute: Recompute | None,
        out_shape: tuple[int, ...],
    ) -> torch.Tensor:
        dtype = x.dtype
        a_cat = torch.cat([a_g, a_u]).to(dtype)
        bg_c, bu_c = b_g.to(dtype), b_u.to(dtype)
        t = x @ a_cat.t()
        g = x @ w_g.t()
        u = x @ w_u.t()
        h = swiglu_lora_forward(g, u, t, bg_c, bu_c, s_g, s_u, out_shape)
        if x_recompute is None:
            ctx.save_for_backward(x, a_cat, t, g, u, bg_c, bu_c, w_g, w_u)
        else:
            ctx.save_for_backward(None, a_cat, t, g, u, bg_c, bu_c, w_g, w_u, *x_recompute.inputs)
            ctx.x_recompute = (x_recompute.run, x_recompute.reduce, x.shape, x.dtype)
        ctx.scalings = (float(s_g), float(s_u))
        ctx.adapter_dtypes = [(a_g.dtype, b_g.dtype), (a_u.dtype, b_u.dtype)]
        # The down projection's LoRA layer may rebuild h (or reduce over it) from the tensors saved here.
        ctx.recompute_token = register_recompute(
            h, _rebuild, g, u, t, bg_c, bu_c, bound=(float(s_g), float(s_u), out_shape), reduce=_reduce
        )
        return h

    @staticmethod
    def backward(ctx: Any, dh: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        forget_recompute(ctx.recompute_token)  # every consumer's backward has run
        x, a_cat, t, g, u, bg_c, bu_c, w_g, w_u, *producer_inputs = ctx.saved_tensors
        s_g, s_u = ctx.scalings
        dg, du = swiglu_lora_backward(dh.contiguous(), g, u, t, bg_c, bu_c, s_g, s_u)
        rebuild = None
        if x is None:
            run, reduce, shape, dtype = ctx.x_recompute
            rebuild = (lambda: run(*producer_inputs).reshape(shape).to(dtype), reduce, producer_inputs)
        needs = ctx.needs_input_grad
        dx, d_as, d_bs = shared_input_backward(
            [dg, du],
            x,
            a_cat,
            t,
            [w_g, w_u],
            [bg_c, bu_c],
            ctx.scalings,
            [bg_c.shape[1], bu_c.shape[1]],
            ctx.adapter_dtypes,
            need_dx=needs[0],
            need_da=needs[3] or needs[4],
            need_db=[needs[5], needs[6]],
            rebuild=rebuild,
        )
        return dx, None, None, d_as[0], d_as[1], d_bs[0], d_bs[1], None, None, None, None


def lora_swiglu_reference(
    x: torch.Tensor,
    w_g: torch.Tensor,
    w_u: torch.Tensor,
    a_g: torch.Tensor,
    a_u: torch.Tensor,
    b_g: torch.Tensor,
    b_u: torch.Tensor,
    s_g: float,
    s_u: float,
) -> torch.Tensor:
    """The same MLP input to the down projection in plain PyTorch (PEFT's LoRA linears, then SiLU and product)."""
    from lit_accel.kernels.lora import lora_linear_reference

    gate = lora_linear_reference(x, w_g, None, a_g, b_g, s_g)
    up = lora_linear_reference(x, w_u, None, a_u, b_u, s_u)
    return torch.nn.functional.silu(gate) * up


def lora_swiglu(
    x: torch.Tensor,
    w_g: torch.Tensor,
    w_u: torch.Tensor,
    a_g: torch.Tensor,
    a_u: torch.Tensor,
    b_g: torch.Tensor,
    b_u: torch.Tensor,
    s_g: float,
    s_u: float,
    recompute_input: bool = False,
) -> torch.Tensor:
    """``silu(gate(x)) * up(x)`` for LoRA-adapted gate and up projections (no bias, no dropout), fused.

    Args:
        x: ``[..., in]`` (CUDA bf16/fp16 or autocast; CPU fp32 under ``TRITON_INTERPRET=1``).
        w_g: Frozen gate weight ``[inter, in]``; ``w_u`` the up weight, same shape.
        a_g: Gate adapter ``[r_g, in]``; ``a_u`` the up adapter's.
        b_g: ``[inter, r_g]``; ``b_u`` ``[inter, r_u]``.
        s_g: Gate adapter scale; ``s_u`` the up adapter's.
        recompute_input: Rebuild ``x`` in the backward from its fused producer (see
            :func:`~lit_accel.kernels.lora.lora_linear`).

    Returns:
        ``[..., inter]`` in the compute dtype.

    Example:
        >>> # on CUDA under bf16 autocast, or on CPU fp32 under TRITON_INTERPRET=1
        >>> h = lora_swiglu(x, w_g, w_u, a_g, a_u, b_g, b_u, 2.0, 2.0)  # doctest: +SKIP
    """
    dtype = _compute_dtype(x)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(dtype).contiguous()
    use_recipe = recompute_input and torch.is_grad_enabled() and x.grad_fn is not None
    x_recompute = recompute_recipe(x) if use_recipe else None
    with torch.autocast(x.device.type, enabled=False):
        # The output is returned as the Function made it (no view after): a consumer finds its recompute recipe by
        # the tensor's identity.
        h: torch.Tensor = LoRASwiGLUFunction.apply(
            x2, w_g.to(dtype), w_u.to(dtype), a_g, a_u, b_g, b_u, float(s_g), float(s_u), x_recompute,
            (*lead, w_g.shape[0]),
        )  # fmt: skip
    return h
