"""``s * U^T Y`` over the tokens, with ``Y`` rebuilt tile by tile from the fused kernel that produced it.

A LoRA layer's ``dA = s * u^T x`` needs its input ``x`` again in the backward. With ``recompute_input`` the layer
keeps the inputs of the fused kernel that made ``x`` (RMSNorm: the residual stream, its weight and the per-row
``rstd`` it saves anyway; SwiGLU: ``gate`` and ``up``) and reran that kernel to write ``x`` out, only for a
tall-skinny GEMM to read it back. :func:`lowrank_reduce` does both in one pass: each program rebuilds a
``[BLOCK_M, BLOCK_N]`` tile of ``x`` in registers from the producer's inputs, with the producer's exact rounding
(so the tile holds the bits the forward wrote), and feeds it straight into a ``[R, BLOCK_M] x [BLOCK_M, BLOCK_N]``
``tl.dot``; ``x`` never goes to memory. At llama-1b's MLP that is one read of ``gate`` and ``up`` instead of that
read plus a write and a read of the ``[tokens, 5632]`` SwiGLU output.

The token dimension is split over ``SPLIT`` programs per column tile (the output ``[R, N]`` is small and a column
tile alone gives too few programs to fill the GPU); their fp32 partial sums are added by ``torch.sum``, in a fixed
order, so the result is the same run to run (no atomics).

Producers (``PRODUCERS``): ``"plain"`` (``Y`` read as is; tests and any other input), ``"rms_norm"``
(:mod:`lit_accel.ops.rms_norm`'s forward) and ``"swiglu"`` (:mod:`lit_accel.ops.swiglu`'s forward).

Example:
    >>> # on CUDA, or on CPU under TRITON_INTERPRET=1
    >>> u, y = torch.randn(64, 16), torch.randn(64, 32)  # doctest: +SKIP
    >>> g = lowrank_reduce(u, "plain", (y,), scale=2.0, y_dtype=torch.float32)  # doctest: +SKIP
    >>> torch.allclose(g, 2.0 * u.T @ y, atol=1e-4)  # doctest: +SKIP
    True
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from lit_accel.ops._triton import interpret as _interpret
from lit_accel.ops._triton import tl, triton

__all__ = ["DY_PRODUCTS_MIN_N", "MAX_RANK", "PRODUCERS", "dy_products", "lowrank_reduce", "takes"]

PRODUCERS = ("plain", "rms_norm", "swiglu")
"""What :func:`lowrank_reduce` can rebuild ``Y`` from."""

MAX_RANK = 64
"""Widest ``R`` the kernels take (a group's summed rank for :func:`lowrank_reduce`): beyond it their register and
shared-memory tiles spill or exceed the per-block limit on an H100 (``R`` = 256 needs 256 KiB in ``dy_products``),
so callers use cuBLAS (:func:`takes`)."""

_PLAIN, _RMS_NORM, _SWIGLU = 0, 1, 2
# Rounding codes: 0 keeps fp32, 1 rounds to bf16, 2 to fp16.
_ROUND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _reduce_body(
    u_ptr,  # [M, R] (the consumer's u = dY B), any strides
    a_ptr,  # [M, N] plain: Y; rms_norm: x; swiglu: gate
    b_ptr,  # rms_norm: rstd [M] fp32; swiglu: up [M, N]; plain: unused
    w_ptr,  # rms_norm: weight [N]; else unused
    out_ptr,  # [SPLIT, R, N] fp32 partial sums
    M,
    N,
    R,
    rows_per_split,
    stride_um,
    stride_ur,
    stride_am,
    stride_bm,
    stride_os,
    stride_or,
    scale,
    PRODUCER: tl.constexpr,
    PROD_ROUND: tl.constexpr,  # rms_norm: HF's rounding of the weight product to the promoted dtype
    Y_ROUND: tl.constexpr,  # the producer's output dtype
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    m_start = pid_s * rows_per_split
    m_end = tl.minimum(M, m_start + rows_per_split)
    if PRODUCER == 1:
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < m_end
        rows64 = rows.to(tl.int64)
        ok = row_ok[:, None] & col_ok[None, :]
        ut = tl.load(u_ptr + rr[:, None] * stride_ur + rows64[None, :] * stride_um,
                     mask=r_ok[:, None] & row_ok[None, :], other=0.0)  # fmt: skip
        a = tl.load(a_ptr + rows64[:, None] * stride_am + cols[None, :], mask=ok, other=0.0)
        if PRODUCER == 1:
            # rms_norm's forward: the normalised value rounded to x's dtype, times the weight, rounded to the
            # promoted dtype. rstd is the very value the forward computed (it stored it for its backward).
            rstd = tl.load(b_ptr + rows64, mask=row_ok, other=0.0)
            n = (a.to(tl.float32) * rstd[:, None]).to(a_ptr.dtype.element_ty).to(tl.float32)
            y = w[None, :] * n
            if PROD_ROUND == 1:
                y = y.to(tl.bfloat16).to(tl.float32)
            elif PROD_ROUND == 2:
                y = y.to(tl.float16).to(tl.float32)
        elif PRODUCER == 2:
            # swiglu's forward: silu(g) * u in fp32, sigmoid written as the forward writes it.
            g = a.to(tl.float32)
            up = tl.load(b_ptr + rows64[:, None] * stride_bm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            y = g * (1.0 / (1.0 + tl.exp(-g))) * up
        else:
            y = a.to(tl.float32)
        # The bits the producer stored, then the consumer's cast to its compute dtype (the dot's operand dtype).
        if Y_ROUND == 1:
            y = y.to(tl.bfloat16).to(tl.float32)
        elif Y_ROUND == 2:
            y = y.to(tl.float16).to(tl.float32)
        acc = tl.dot(ut, y.to(ut.dtype), acc)
    o_ptrs = out_ptr + pid_s * stride_os + rr[:, None] * stride_or + cols[None, :]
    tl.store(o_ptrs, acc * scale, mask=r_ok[:, None] & col_ok[None, :])


@functools.cache
def _kernel() -> Any:
    # Built at first use so that importing this module never needs triton.
    return triton.jit(_reduce_body, do_not_specialize=["rows_per_split"])


@functools.cache
def _sm_count(device_index: int) -> int:
    return int(torch.cuda.get_device_properties(device_index).multi_processor_count)


# (BLOCK_M, BLOCK_N, num_warps, num_stages, programs per SM) on the GPU: chosen by
# benchmarks/tools/lowrank_reduce_sweep.py at llama-1b shapes as the fastest for the SwiGLU producer and near the best
# for the RMSNorm one.
_GPU_CONFIG = (128, 64, 8, 3, 2)


def takes(like: torch.Tensor, r: int) -> bool:
    """Whether these kernels run, and are meant to run, on tensors like ``like`` with rank ``r``.

    On CUDA: bf16/fp16 only (an fp32 ``tl.dot`` would run in TF32, below torch's fp32 matmul precision) and
    ``r <= MAX_RANK``; on the CPU only under ``TRITON_INTERPRET=1`` (tests). Never without triton.

    Example:
        >>> takes(torch.zeros(4, 4), MAX_RANK + 1)
        False
    """
    if triton is None or r > MAX_RANK:
        return False
    if like.is_cuda:
        return like.dtype in (torch.bfloat16, torch.float16)
    return _interpret()


def _launch(
    m: int, n: int, r: int, device: torch.device, config: tuple[int, int, int, int, int] | None = None
) -> tuple[int, int, int, int, dict[str, int]]:
    """``(BLOCK_R, BLOCK_M, BLOCK_N, SPLIT, meta)`` for a ``[m, r]^T x [m, n]`` reduction."""
    block_r = max(16, triton.next_power_of_2(r))
    if _interpret():
        return block_r, 16, 16, max(1, min(3, triton.cdiv(m, 16))), {"num_warps": 1}
    block_m, block_n, warps, stages, per_sm = config or _GPU_CONFIG
    n_tiles = triton.cdiv(n, block_n)
    # per_sm programs per SM; never more splits than row tiles.
    split = max(1, min(triton.cdiv(m, block_m), triton.cdiv(per_sm * _sm_count(device.index or 0), n_tiles)))
    return block_r, block_m, block_n, split, {"num_warps": warps, "num_stages": stages}


def _split_rows(m: int, split: int, block_m: int) -> tuple[int, int]:
    """``(rows per program, programs)`` covering ``m`` rows in about ``split`` ranges of whole ``block_m`` tiles."""
    rows_per_split = triton.cdiv(triton.cdiv(m, split), block_m) * block_m
    return rows_per_split, triton.cdiv(m, rows_per_split)


def lowrank_reduce(
    u: torch.Tensor,
    producer: str,
    inputs: tuple[torch.Tensor, ...],
    scale: float,
    y_dtype: torch.dtype,
    prod_round: torch.dtype | None = None,
    _config: tuple[int, int, int, int, int] | None = None,
) -> torch.Tensor:
    """``scale * u^T Y`` in fp32, ``[R, N]``, with ``Y`` rebuilt from ``producer``'s ``inputs`` tile by tile.

    Args:
        u: ``[M, R]`` in the consumer's compute dtype: ``Y`` is cast to it before the product, as the consumer's
            ``.to(dtype)`` of a recomputed ``Y`` would.
        producer: One of :data:`PRODUCERS`.
        inputs: ``plain``: ``(Y [M, N],)``; ``rms_norm``: ``(x [M, N], weight [N], rstd [M] fp32)`` as the RMSNorm
            forward saved them; ``swiglu``: ``(gate [M, N], up [M, N])``. Unit column stride.
        scale: Multiplies the result.
        y_dtype: The dtype the producer wrote ``Y`` in (its bits are rebuilt exactly).
        prod_round: ``rms_norm`` only: the promoted dtype HF rounds the weight product to.

    Returns:
        ``[R, N]`` fp32.
    """
    if producer not in PRODUCERS:
        raise ValueError(f"producer must be one of {PRODUCERS}, got {producer!r}")
    a = inputs[0]
    m, n = a.shape
    r = u.shape[1]
    kind = PRODUCERS.index(producer)
    if m == 0:
        return torch.zeros((r, n), device=u.device, dtype=torch.float32)
    b = inputs[2] if kind == _RMS_NORM else inputs[1] if kind == _SWIGLU else a
    w = inputs[1] if kind == _RMS_NORM else a
    block_r, block_m, block_n, split, meta = _launch(m, n, r, u.device, _config)
    rows_per_split, split = _split_rows(m, split, block_m)
    out = torch.empty((split, r, n), device=u.device, dtype=torch.float32)
    _kernel()[(triton.cdiv(n, block_n), split)](
        u,
        a,
        b,
        w,
        out,
        m,
        n,
        r,
        rows_per_split,
        u.stride(0),
        u.stride(1),
        a.stride(0),
        b.stride(0) if kind == _SWIGLU else 0,
        out.stride(0),
        out.stride(1),
        float(scale),
        PRODUCER=kind,
        PROD_ROUND=_ROUND.get(prod_round, 0) if prod_round is not None else 0,
        Y_ROUND=_ROUND[y_dtype],
        BLOCK_R=block_r,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        **meta,
    )
    return out[0] if split == 1 else out.sum(0)


# --------------------------------------------------------------------------------------------------------------
# Both products of an output gradient: u = dY B and dB = s dY^T t, one read of dY
# --------------------------------------------------------------------------------------------------------------


def _dy_body(
    dy_ptr,  # [M, N] output gradient, unit column stride
    b_ptr,  # [N, R] the adapter's B in dY's dtype
    t_ptr,  # [M, R] the forward's rank projection
    u_ptr,  # [STRIPES, M, R] fp32 partial sums of dY B over column stripes
    db_ptr,  # [SPLIT, N, R] fp32 partial sums of dY^T t over row ranges
    M,
    N,
    R,
    rows_per_split,
    stride_dym,
    stride_bn,
    stride_br,
    stride_tm,
    stride_tr,
    stride_us,
    stride_um,
    stride_ds,
    stride_dn,
    scale,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    b = tl.load(b_ptr + cols[:, None] * stride_bn + rr[None, :] * stride_br,
                mask=col_ok[:, None] & r_ok[None, :], other=0.0)  # fmt: skip
    m_start = pid_s * rows_per_split
    m_end = tl.minimum(M, m_start + rows_per_split)
    db = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < m_end
        rows64 = rows.to(tl.int64)
        dy = tl.load(dy_ptr + rows64[:, None] * stride_dym + cols[None, :],
                     mask=row_ok[:, None] & col_ok[None, :], other=0.0)  # fmt: skip
        tt = tl.load(t_ptr + rows64[:, None] * stride_tm + rr[None, :] * stride_tr,
                     mask=row_ok[:, None] & r_ok[None, :], other=0.0)  # fmt: skip
        # The same dY tile feeds both products: its rank-R projection over this column stripe, and this stripe's
        # rows of dB over these tokens.
        part = tl.dot(dy, b)
        tl.store(u_ptr + pid_n.to(tl.int64) * stride_us + rows64[:, None] * stride_um + rr[None, :], part,
                 mask=row_ok[:, None] & r_ok[None, :])  # fmt: skip
        db = tl.dot(tl.trans(dy), tt, db)
    tl.store(db_ptr + pid_s.to(tl.int64) * stride_ds + cols[:, None] * stride_dn + rr[None, :], db * scale,
             mask=col_ok[:, None] & r_ok[None, :])  # fmt: skip


@functools.cache
def _dy_kernel() -> Any:
    return triton.jit(_dy_body, do_not_specialize=["rows_per_split"])


# (BLOCK_M, BLOCK_N, num_warps, num_stages, programs per SM) on the GPU: the same sweep's best for llama-1b's gate/up
# gradients (benchmarks/RESULTS.md). Wide stripes keep the fp32 partial sums of u (one [M, R] slab per stripe) small
# next to dY itself.
_DY_GPU_CONFIG = (64, 256, 8, 2, 2)
DY_PRODUCTS_MIN_N = 4096
"""Narrowest output on which :func:`dy_products` beats cuBLAS's two GEMMs on the GPU: on narrower ones (q, o, down
at 2048) the partial sums of ``u`` cost more than the second read of ``dY`` saves (measured with
``benchmarks/tools/lowrank_reduce_sweep.py`` at llama-1b shapes)."""


def dy_products(
    dy: torch.Tensor,
    lora_b: torch.Tensor,
    t: torch.Tensor,
    scale: float,
    _config: tuple[int, int, int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dY B, scale * dY^T t)`` with one read of ``dY``: a LoRA layer's ``u`` and its ``dB``.

    cuBLAS computes the two as separate GEMMs, each a full read of the ``[tokens, out]`` gradient (both are
    memory-bound at rank 16). Here each program reads a ``[BLOCK_M, BLOCK_N]`` tile once and feeds both dots; ``u``
    is summed over column stripes and ``dB`` over row ranges from fp32 partial sums (fixed order: deterministic).

    Args:
        dy: ``[M, N]`` output gradient (bf16/fp16 on CUDA; fp32 too under the interpreter), unit column stride.
        lora_b: ``[N, R]`` in ``dy``'s dtype.
        t: ``[M, R]`` the forward's ``x A^T`` in ``dy``'s dtype.
        scale: Multiplies ``dB``.

    Returns:
        ``u`` ``[M, R]`` in ``dy``'s dtype and ``dB`` ``[N, R]`` fp32.

    Example:
        >>> # on CUDA (bf16/fp16), or on CPU under TRITON_INTERPRET=1
        >>> dy, b, t = torch.randn(64, 32), torch.randn(32, 4), torch.randn(64, 4)  # doctest: +SKIP
        >>> u, db = dy_products(dy, b, t, 2.0)  # doctest: +SKIP
        >>> torch.allclose(u, dy @ b, atol=1e-4) and torch.allclose(db, 2.0 * dy.T @ t, atol=1e-4)  # doctest: +SKIP
        True
    """
    m, n = dy.shape
    r = lora_b.shape[1]
    if m == 0:
        return dy.new_zeros((0, r)), torch.zeros((n, r), device=dy.device, dtype=torch.float32)
    block_r, block_m, block_n, split, meta = _launch(m, n, r, dy.device, _config or _DY_GPU_CONFIG)
    rows_per_split, split = _split_rows(m, split, block_m)
    stripes = triton.cdiv(n, block_n)
    u_part = torch.empty((stripes, m, r), device=dy.device, dtype=torch.float32)
    db_part = torch.empty((split, n, r), device=dy.device, dtype=torch.float32)
    _dy_kernel()[(stripes, split)](
        dy,
        lora_b,
        t,
        u_part,
        db_part,
        m,
        n,
        r,
        rows_per_split,
        dy.stride(0),
        lora_b.stride(0),
        lora_b.stride(1),
        t.stride(0),
        t.stride(1),
        u_part.stride(0),
        u_part.stride(1),
        db_part.stride(0),
        db_part.stride(1),
        float(scale),
        BLOCK_R=block_r,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        **meta,
    )
    u = (u_part[0] if stripes == 1 else u_part.sum(0)).to(dy.dtype)
    return u, db_part[0] if split == 1 else db_part.sum(0)
