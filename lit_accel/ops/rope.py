"""Rotary position embedding on queries and keys (HF's ``apply_rotary_pos_emb``) in one Triton launch.

Three layers, as every op in :mod:`lit_accel.ops`:

* :func:`apply_rope_reference` - plain PyTorch, operation for operation HF LLaMA's ``apply_rotary_pos_emb``
  (``x * cos + rotate_half(x) * sin``, the "rotate half" / GPT-NeoX convention), used by the tests and as the
  CPU fallback.
* :class:`RoPEFunction` - the ``torch.autograd.Function`` over the Triton kernel below.
* :func:`apply_rope` - the entry point: the kernel when :func:`rope_kernel_available` says so, else the
  reference. :func:`rope_fallback_reason` says in words why an input takes the reference, for a one-time warning.

Semantics kept from HF. ``q`` is ``(B, Hq, S, D)`` and ``k`` ``(B, Hkv, S, D)`` (GQA: ``Hq != Hkv``), usually
*non-contiguous*: HF builds them as ``proj(x).view(B, S, H, D).transpose(1, 2)``. ``cos``/``sin`` are
``(B, S, R)`` or ``(1, S, R)`` as ``LlamaRotaryEmbedding`` returns them, in the hidden states' dtype, which under
bf16-mixed autocast is fp32 while ``q``/``k`` are bf16: HF's result is then fp32 (type promotion of ``q`` and
``cos``), and so is ours by default; ``out_dtype=`` overrides it. ``unsqueeze_dim=2`` takes ``(B, S, H, D)``
inputs instead. Any frequency scaling (Llama 3's ``rope_type="llama3"``, YaRN, ...) lives in the ``cos``/``sin``
tables, which are used as given.

Partial rotary. ``R = cos.shape[-1]`` is the rotary width: usually ``R = D``; with ``R < D`` (Phi-3's, GPT-NeoX's
or StableLM's ``partial_rotary_factor < 1``) only the first ``R`` channels of each head are rotated (their two
halves of ``R / 2``) and the other ``D - R`` pass through unchanged (cast to the result dtype), as Phi-3's
``apply_rotary_pos_emb``: ``cat([rotate(x[..., :R]), x[..., R:]], -1)``. Their gradient passes through unchanged
too.

Numerics. fp32 math inside, one rounding to the output dtype (HF rounds each product and the sum in the promoted
dtype: in bf16 the kernel is slightly more accurate; in fp32 they agree to an ulp or so).

Output layout. The outputs (and, in backward, the gradients of ``q``/``k``) have the *strides of the inputs*
(``torch.empty_like``): for HF's ``view(B, S, H, D).transpose(1, 2)`` tensors that is ``(B, S, H, D)`` memory seen
as ``(B, H, S, D)``. Why:

* the kernel then reads and writes the same contiguous ``H * D`` run of one token for q and for k, and loads
  that token's ``cos``/``sin`` once for all ``Hq + Hkv`` heads;
* SDPA's flash and memory-efficient kernels take ``(B, S, H, D)`` memory natively (they transpose
  ``(B, H, S, D)`` arguments to it), and accept any batch/head/sequence strides with a unit last stride, so no
  copy happens before attention, and their ``dq``/``dk`` come back in that layout for our backward to read;
* the gradients we return, in ``(B, S, H, D)`` memory, make autograd's ``transpose`` + ``view`` back to the
  projection's ``(B, S, H * D)`` output free; a contiguous ``(B, H, S, D)`` gradient would make that ``view``'s
  backward (a ``reshape``) copy the whole activation once more, per layer, for q and for k.

Memory. Autograd saves only ``cos`` and ``sin`` (one pair shared by every layer in HF models), not ``q``/``k``:
the backward is the inverse rotation, ``dx = dy * cos + rotate_half^T(dy) * sin`` (and ``dx = dy`` on pass-through
channels), which needs no inputs.
``cos``/``sin`` get no gradient; when either requires grad, :func:`apply_rope` takes the reference.
"""

from __future__ import annotations

from typing import Any

import torch

from lit_accel.ops._triton import HAS_TRITON as _HAS_TRITON
from lit_accel.ops._triton import interpret as _interpret
from lit_accel.ops._triton import tl, triton

__all__ = [
    "RoPEFunction",
    "apply_rope",
    "apply_rope_reference",
    "rope_fallback_reason",
    "rope_kernel",
    "rope_kernel_available",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Register budget per program: a [BLOCK_H, BLOCK_HALF] fp32 tile of each half plus the rotated halves; 2048
# elements over 4 warps keeps that at 16 values per thread each, without spills, for any head count.
_TILE_ELEMS = 2048
_NUM_WARPS = 4


# --------------------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------------------


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    unsqueeze_dim: int = 1,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE in plain PyTorch, operation for operation as HF LLaMA's ``apply_rotary_pos_emb`` (Phi-3's for partial
    rotary, ``cos.shape[-1] < D``).

    Args:
        q: Queries ``(B, Hq, S, D)`` (or ``(B, S, Hq, D)`` with ``unsqueeze_dim=2``).
        k: Keys ``(B, Hkv, S, D)`` (or ``(B, S, Hkv, D)``).
        cos: ``(B, S, R)`` or ``(1, S, R)``, ``R <= D`` the rotary width: the first ``R`` channels of each head
            are rotated, the rest pass through.
        sin: Same shape as ``cos``.
        unsqueeze_dim: Where ``cos``/``sin`` get their broadcast head dimension.
        out_dtype: Cast the results to this dtype; None keeps HF's promoted dtype.

    Returns:
        ``(q_embed, k_embed)``.

    Example:
        >>> q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 1, 3, 4)
        >>> cos, sin = torch.ones(1, 3, 4), torch.zeros(1, 3, 4)  # angle 0: the identity
        >>> qe, ke = apply_rope_reference(q, k, cos, sin)
        >>> torch.equal(qe, q), torch.equal(ke, k)
        (True, True)
        >>> qe, _ = apply_rope_reference(q, k, -cos[..., :2], sin[..., :2])  # rotate 2 of 4 channels by pi
        >>> torch.equal(qe[..., :2], -q[..., :2]), torch.equal(qe[..., 2:], q[..., 2:])
        (True, True)
    """
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    rot = cos.shape[-1]
    if rot == q.shape[-1]:
        q_embed = (q * cos) + (_rotate_half(q) * sin)
        k_embed = (k * cos) + (_rotate_half(k) * sin)
    else:
        q_rot, q_pass = q[..., :rot], q[..., rot:]
        k_rot, k_pass = k[..., :rot], k[..., rot:]
        q_embed = torch.cat([(q_rot * cos) + (_rotate_half(q_rot) * sin), q_pass], dim=-1)
        k_embed = torch.cat([(k_rot * cos) + (_rotate_half(k_rot) * sin), k_pass], dim=-1)
    if out_dtype is not None:
        q_embed, k_embed = q_embed.to(out_dtype), k_embed.to(out_dtype)
    return q_embed, k_embed


# --------------------------------------------------------------------------------------------------------------
# Argument checks and dispatch
# --------------------------------------------------------------------------------------------------------------


def _check_args(q: Any, k: Any, cos: Any, sin: Any, unsqueeze_dim: Any, out_dtype: Any) -> int:
    """Validates the inputs; returns ``unsqueeze_dim`` normalised to 1 or 2."""
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if isinstance(unsqueeze_dim, bool) or not isinstance(unsqueeze_dim, int) or unsqueeze_dim not in (1, 2, -3, -2):
        raise ValueError(
            f"unsqueeze_dim must be 1 (q/k as (B, H, S, D)) or 2 (q/k as (B, S, H, D)), got {unsqueeze_dim!r}"
        )
    dim = unsqueeze_dim % 4
    if out_dtype is not None and (not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point):
        raise TypeError(f"out_dtype must be None or a floating-point torch.dtype, got {out_dtype!r}")
    layout = "(B, H, S, D)" if dim == 1 else "(B, S, H, D)"
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D {layout} for unsqueeze_dim={unsqueeze_dim}, got {tuple(t.shape)}")
    s_ax = 2 if dim == 1 else 1
    b, s, d = q.shape[0], q.shape[s_ax], q.shape[3]
    if k.shape[0] != b or k.shape[s_ax] != s or k.shape[3] != d:
        raise ValueError(
            f"q and k must agree in batch, sequence and head_dim ({layout}), got q {tuple(q.shape)} and "
            f"k {tuple(k.shape)}"
        )
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have the same shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if cos.dim() != 3 or cos.shape[0] not in (1, b) or cos.shape[1] != s or not 0 < cos.shape[2] <= d:
        raise ValueError(
            f"cos/sin must have shape ({b}, {s}, {d}) or (1, {s}, {d}) for q {tuple(q.shape)} "
            f"(unsqueeze_dim={unsqueeze_dim}), or a last dim R with 0 < R < {d} for partial rotary, "
            f"got {tuple(cos.shape)}"
        )
    devices = {t.device for t in (q, k, cos, sin)}
    if len(devices) > 1:
        raise ValueError(f"q, k, cos and sin must be on one device, got {sorted(map(str, devices))}")
    return dim


def _unsupported_reason(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out_dtype: torch.dtype | None
) -> str | None:
    """Why the kernel cannot take these (already checked) inputs, or None when it can."""
    if not _HAS_TRITON:
        return "triton is not installed"
    if q.is_cuda:
        allowed: tuple[torch.dtype, ...] = _FLOAT_DTYPES
    elif _interpret() and q.device.type == "cpu":
        # The CPU interpreter emulates in numpy, which has no bf16; fp32 is what the tests cover.
        allowed = (torch.float32,)
    else:
        return f"tensors are on {q.device}; the kernel needs CUDA (or TRITON_INTERPRET=1 with CPU fp32 tensors)"
    for name, dt in (("q", q.dtype), ("k", k.dtype), ("cos", cos.dtype), ("sin", sin.dtype), ("out_dtype", out_dtype)):
        if dt is not None and dt not in allowed:
            return f"{name} dtype {dt} is not supported (allowed: {', '.join(map(str, allowed))})"
    rot = cos.shape[-1]
    if rot % 2:
        what = f"head_dim={rot}" if rot == q.shape[3] else f"rotary width {rot} (cos.shape[-1])"
        return f"{what} is odd; the kernel rotates two equal halves"
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        return "cos/sin require grad; the kernel gives them no gradient"
    if q.numel() == 0 or k.numel() == 0:
        return "q or k is empty"
    return None


def rope_fallback_reason(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    unsqueeze_dim: int = 1,
    out_dtype: torch.dtype | None = None,
) -> str | None:
    """Why :func:`apply_rope` would take the PyTorch reference for these inputs, or None when it uses the kernel.

    Args:
        q: Queries, as for :func:`apply_rope`.
        k: Keys.
        cos: Cosines.
        sin: Sines.
        unsqueeze_dim: 1 or 2.
        out_dtype: Requested output dtype or None.

    Returns:
        A short sentence for a warning, or None.

    Raises:
        TypeError: If an input is not a floating-point tensor or ``out_dtype`` is not a float dtype.
        ValueError: If shapes, ``unsqueeze_dim`` or devices are inconsistent.

    Example:
        >>> q, cos = torch.randn(1, 2, 3, 8), torch.randn(1, 3, 8)
        >>> rope_fallback_reason(q, q, cos, cos) is not None  # CPU: the reference
        True
    """
    _check_args(q, k, cos, sin, unsqueeze_dim, out_dtype)
    return _unsupported_reason(q, k, cos, sin, out_dtype)


def rope_kernel_available(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    unsqueeze_dim: int = 1,
    out_dtype: torch.dtype | None = None,
) -> bool:
    """Whether :func:`apply_rope` would run the Triton kernel on these inputs.

    True on CUDA for fp16/bf16/fp32 tensors (mixed allowed) with an even rotary width ``cos.shape[-1]`` (the
    head_dim, or less for partial rotary) and ``cos``/``sin`` not requiring grad; on CPU only for fp32 under
    ``TRITON_INTERPRET=1`` (tests).

    Args:
        q: Queries, as for :func:`apply_rope`.
        k: Keys.
        cos: Cosines.
        sin: Sines.
        unsqueeze_dim: 1 or 2.
        out_dtype: Requested output dtype or None.

    Returns:
        True when the kernel would be used.

    Example:
        >>> q, cos = torch.randn(1, 2, 3, 8), torch.randn(1, 3, 8)
        >>> rope_kernel_available(q, q, cos, cos)
        False
    """
    return rope_fallback_reason(q, k, cos, sin, unsqueeze_dim, out_dtype) is None


# --------------------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------------------

if _HAS_TRITON:

    @triton.jit
    def _rotate_heads(
        x_ptr,
        o_ptr,
        b,
        s,
        H: tl.constexpr,
        HALF,
        PASS,
        sxb,
        sxh,
        sxs,
        sxd,
        sob,
        soh,
        sos,
        sod,
        c1,
        c2,
        s1,
        s2,
        BLOCK_H: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
        BLOCK_PASS: tl.constexpr,
        HAS_PASS: tl.constexpr,
        BACKWARD: tl.constexpr,
    ):
        """Rotates all H heads of token (b, s): x -> o, with [1, BLOCK_HALF] fp32 cos/sin halves; copies the PASS
        channels after the rotated 2 * HALF (partial rotary) unchanged, forward and backward alike."""
        offs_d = tl.arange(0, BLOCK_HALF)
        d_ok = offs_d < HALF
        x_base = x_ptr + b * sxb + s * sxs
        o_base = o_ptr + b * sob + s * sos
        # Head count and tile are compile-time (fixed per model): the loop unrolls, usually to one tile.
        for h0 in tl.static_range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            ok = (offs_h < H)[:, None] & d_ok[None, :]
            xp = x_base + offs_h[:, None] * sxh + offs_d[None, :] * sxd
            x1 = tl.load(xp, mask=ok, other=0.0).to(tl.float32)
            x2 = tl.load(xp + HALF * sxd, mask=ok, other=0.0).to(tl.float32)
            if BACKWARD:
                # Transpose of the forward map: d x1 = dy1 c1 + dy2 s2, d x2 = dy2 c2 - dy1 s1.
                o1 = x1 * c1 + x2 * s2
                o2 = x2 * c2 - x1 * s1
            else:
                # x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1).
                o1 = x1 * c1 - x2 * s1
                o2 = x2 * c2 + x1 * s2
            op = o_base + offs_h[:, None] * soh + offs_d[None, :] * sod
            tl.store(op, o1.to(o_ptr.dtype.element_ty), mask=ok)
            tl.store(op + HALF * sod, o2.to(o_ptr.dtype.element_ty), mask=ok)
            if HAS_PASS:
                # The identity map and its transpose: one cast to the output dtype, as HF's cat promotes.
                offs_p = 2 * HALF + tl.arange(0, BLOCK_PASS)
                ok_p = (offs_h < H)[:, None] & (offs_p < 2 * HALF + PASS)[None, :]
                xp = tl.load(x_base + offs_h[:, None] * sxh + offs_p[None, :] * sxd, mask=ok_p, other=0.0)
                tl.store(o_base + offs_h[:, None] * soh + offs_p[None, :] * sod, xp.to(o_ptr.dtype.element_ty),
                         mask=ok_p)  # fmt: skip

    @triton.jit
    def _rope_kernel(
        q_ptr,
        k_ptr,
        cos_ptr,
        sin_ptr,
        oq_ptr,
        ok_ptr,
        S,
        HQ: tl.constexpr,
        HK: tl.constexpr,
        HALF,
        PASS,
        sqb,
        sqh,
        sqs,
        sqd,
        skb,
        skh,
        sks,
        skd,
        scb,
        scs,
        scd,
        ssb,
        sss,
        ssd,
        soqb,
        soqh,
        soqs,
        soqd,
        sokb,
        sokh,
        soks,
        sokd,
        BLOCK_HQ: tl.constexpr,
        BLOCK_HK: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
        BLOCK_PASS: tl.constexpr,
        HAS_PASS: tl.constexpr,
        BACKWARD: tl.constexpr,
    ):
        # One program per token (b, s): cos/sin are read once and serve all Hq + Hkv heads. int64 offsets:
        # B * S * H * D passes 2**31 elements at long sequences.
        pid = tl.program_id(0).to(tl.int64)
        b = pid // S
        s = pid % S
        offs_d = tl.arange(0, BLOCK_HALF)
        d_ok = offs_d < HALF
        cp = cos_ptr + b * scb + s * scs + offs_d * scd
        sp = sin_ptr + b * ssb + s * sss + offs_d * ssd
        # Both halves are loaded: HF's cos is cat(freqs, freqs), but nothing requires a caller's cos to be.
        c1 = tl.load(cp, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        c2 = tl.load(cp + HALF * scd, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        s1 = tl.load(sp, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        s2 = tl.load(sp + HALF * ssd, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        _rotate_heads(q_ptr, oq_ptr, b, s, HQ, HALF, PASS, sqb, sqh, sqs, sqd, soqb, soqh, soqs, soqd,
                      c1, c2, s1, s2, BLOCK_HQ, BLOCK_HALF, BLOCK_PASS, HAS_PASS, BACKWARD)  # fmt: skip
        _rotate_heads(k_ptr, ok_ptr, b, s, HK, HALF, PASS, skb, skh, sks, skd, sokb, sokh, soks, sokd,
                      c1, c2, s1, s2, BLOCK_HK, BLOCK_HALF, BLOCK_PASS, HAS_PASS, BACKWARD)  # fmt: skip


def _block_h(h: int, block_width: int) -> int:
    return max(1, min(triton.next_power_of_2(max(h, 1)), _TILE_ELEMS // block_width))


def _launch(
    x_q: torch.Tensor,
    x_k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    o_q: torch.Tensor,
    o_k: torch.Tensor,
    hq: int,
    hk: int,
    backward: bool,
) -> None:
    """Rotates ``x_q`` -> ``o_q`` (first ``hq`` heads) and ``x_k`` -> ``o_k`` (``hk`` heads), all (B, H, S, D).

    ``hq``/``hk`` of 0 skip that tensor (its pointers are then never dereferenced). ``cos``/``sin`` are already
    expanded to ``(B, S, R)`` (a stride-0 batch dim when shared); channels ``R..D`` are copied.
    """
    b, _, s, d = x_q.shape
    rot = cos.shape[-1]
    half, n_pass = rot // 2, d - rot
    block_half = triton.next_power_of_2(half)
    block_pass = triton.next_power_of_2(max(n_pass, 1))
    # The widest of the per-head tiles sets how many heads one tile holds.
    block_width = max(block_half, block_pass)
    meta: dict[str, Any] = {} if _interpret() else {"num_warps": _NUM_WARPS}
    _rope_kernel[(b * s,)](
        x_q,
        x_k,
        cos,
        sin,
        o_q,
        o_k,
        s,
        hq,
        hk,
        half,
        n_pass,
        *x_q.stride(),
        *x_k.stride(),
        *cos.stride(),
        *sin.stride(),
        *o_q.stride(),
        *o_k.stride(),
        BLOCK_HQ=_block_h(hq, block_width),
        BLOCK_HK=_block_h(hk, block_width),
        BLOCK_HALF=block_half,
        BLOCK_PASS=block_pass,
        HAS_PASS=n_pass > 0,
        BACKWARD=backward,
        **meta,
    )


class RoPEFunction(torch.autograd.Function):
    """Autograd function over the RoPE kernel for ``(B, H, S, D)`` q/k of any strides.

    ``apply(q, k, cos, sin, q_dtype, k_dtype)``: ``cos``/``sin`` ``(B, S, R)`` (expanded, stride 0 allowed; ``R``
    even, ``R < D`` rotates only the first ``R`` channels of each head), ``q_dtype``/``k_dtype`` the output dtypes.
    Returns ``(q_embed, k_embed)`` with the strides of ``q``/``k`` (see the module docstring); saves only ``cos`` and
    ``sin``; returns no gradient for them. Use :func:`apply_rope` unless the inputs are known to be supported.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        q_dtype: torch.dtype,
        k_dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # empty_like keeps the input strides when they are dense and non-overlapping (HF's transposed views).
        oq = torch.empty_like(q, dtype=q_dtype)
        ok = torch.empty_like(k, dtype=k_dtype)
        _launch(q, k, cos, sin, oq, ok, q.shape[1], k.shape[1], backward=False)
        ctx.save_for_backward(cos, sin)
        ctx.layouts = ((q.shape, oq.stride(), q.dtype), (k.shape, ok.stride(), k.dtype))
        return oq, ok

    @staticmethod
    def backward(ctx: Any, dq_embed: torch.Tensor, dk_embed: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        cos, sin = ctx.saved_tensors
        need_q, need_k = ctx.needs_input_grad[:2]
        if not (need_q or need_k):
            return None, None, None, None, None, None
        (q_shape, q_stride, q_dt), (k_shape, k_stride, k_dt) = ctx.layouts
        dev = dq_embed.device
        # The input's layout again, so that the views HF took to build q/k undo without a copy.
        dq = torch.empty_strided(q_shape, q_stride, dtype=q_dt, device=dev) if need_q else dq_embed
        dk = torch.empty_strided(k_shape, k_stride, dtype=k_dt, device=dev) if need_k else dk_embed
        _launch(dq_embed, dk_embed, cos, sin, dq, dk, q_shape[1] if need_q else 0, k_shape[1] if need_k else 0,
                backward=True)  # fmt: skip
        return (dq if need_q else None), (dk if need_k else None), None, None, None, None


# --------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    unsqueeze_dim: int = 1,
    out_dtype: torch.dtype | None = None,
    use_kernel: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding of queries and keys, HF's ``apply_rotary_pos_emb`` as one Triton launch.

    Args:
        q: Queries ``(B, Hq, S, D)`` with any strides (HF's ``view(B, S, H, D).transpose(1, 2)`` is read as is),
            or ``(B, S, Hq, D)`` with ``unsqueeze_dim=2``.
        k: Keys ``(B, Hkv, S, D)`` (``Hkv`` may differ from ``Hq``: GQA), same layout convention as ``q``.
        cos: ``(B, S, R)`` or ``(1, S, R)``, e.g. from ``LlamaRotaryEmbedding`` (any ``rope_type``: the tables
            carry the frequency scaling); any float dtype. ``R`` is the rotary width: ``R = D`` rotates whole heads,
            ``R < D`` (``partial_rotary_factor < 1``, e.g. Phi-3's tables) only their first ``R`` channels, the rest
            passing through, as in Phi-3's ``apply_rotary_pos_emb``.
        sin: Same shape as ``cos``.
        unsqueeze_dim: 1 (``(B, H, S, D)`` inputs) or 2 (``(B, S, H, D)`` inputs), as in HF.
        out_dtype: Output dtype of both results. None keeps HF's: the promotion of ``q`` (resp. ``k``), ``cos``
            and ``sin``, e.g. fp32 for bf16 ``q`` with fp32 ``cos`` under bf16-mixed autocast.
        use_kernel: None: the Triton kernel when :func:`rope_kernel_available`, else the reference; True: require
            the kernel (ValueError saying why when it cannot run); False: the reference.

    Returns:
        ``(q_embed, k_embed)`` with the shapes of ``q`` and ``k``. On the kernel path they have the strides of
        ``q``/``k`` (for HF's inputs, ``(B, S, H, D)`` memory; see the module docstring for why), and their
        gradients are computed by the inverse rotation without saved activations.

    Raises:
        TypeError: If an input is not a floating-point tensor or ``out_dtype`` is not a float dtype.
        ValueError: If shapes, ``unsqueeze_dim`` or devices are inconsistent, or ``use_kernel=True`` where the
            kernel cannot run.

    Example:
        >>> b, s, hq, hkv, d = 2, 5, 4, 2, 8
        >>> q = torch.randn(b, s, hq, d).transpose(1, 2)  # (B, Hq, S, D), non-contiguous as in HF
        >>> k = torch.randn(b, s, hkv, d).transpose(1, 2)
        >>> ang = torch.arange(s)[:, None] * torch.rand(d // 2)
        >>> cos, sin = torch.cat([ang, ang], -1).cos()[None], torch.cat([ang, ang], -1).sin()[None]
        >>> qe, ke = apply_rope(q, k, cos, sin)  # CPU: the reference
        >>> qe.shape, ke.shape
        (torch.Size([2, 4, 5, 8]), torch.Size([2, 2, 5, 8]))
        >>> torch.allclose(qe.norm(dim=-1), q.norm(dim=-1), atol=1e-5)  # a rotation keeps norms
        True
    """
    dim = _check_args(q, k, cos, sin, unsqueeze_dim, out_dtype)
    if use_kernel is False:
        return apply_rope_reference(q, k, cos, sin, unsqueeze_dim, out_dtype)
    reason = _unsupported_reason(q, k, cos, sin, out_dtype)
    if reason is not None:
        if use_kernel:
            raise ValueError(f"apply_rope(use_kernel=True) cannot use the Triton kernel: {reason}")
        return apply_rope_reference(q, k, cos, sin, unsqueeze_dim, out_dtype)
    return rope_kernel(q, k, cos, sin, dim, out_dtype)


def rope_kernel(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    unsqueeze_dim: int = 1,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton path of :func:`apply_rope` without its argument checks.

    For callers that decided once per input signature that the kernel takes these inputs
    (:func:`rope_fallback_reason` returned None), e.g. the patched attention of :func:`lit_accel.kernels.apply_kernels`,
    so the hot path does not re-check every call. Inputs the kernel cannot take give undefined results.
    """
    dim = unsqueeze_dim % 4

    def result_dtype(x: torch.Tensor) -> torch.dtype:
        if out_dtype is not None:
            return out_dtype
        return torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)

    # (B, S, H, D) inputs are handled as their (B, H, S, D) transposes: a view, strides do the rest.
    qc, kc = (q, k) if dim == 1 else (q.transpose(1, 2), k.transpose(1, 2))
    shape = (q.shape[0], cos.shape[1], cos.shape[2])
    out: tuple[torch.Tensor, torch.Tensor] = RoPEFunction.apply(
        qc, kc, cos.expand(shape), sin.expand(shape), result_dtype(q), result_dtype(k)
    )
    qe, ke = out
    return (qe, ke) if dim == 1 else (qe.transpose(1, 2), ke.transpose(1, 2))
