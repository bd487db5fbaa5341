"""Transposable 2:4 mask: per 4x4 block the exact best of the 90 patterns with 2 kept per row and per column.

Three layers, as every op in :mod:`lit_accel.kernels`:

* :func:`~lit_accel.sparsity.functional.transposable_24_mask_reference` - plain PyTorch (one matmul scoring
  all blocks against all 90 patterns, argmax), used by the tests and as the CPU fallback.
* :func:`transposable_24_mask_triton` - the Triton kernel below.
* :func:`transposable_24_mask` - the entry point: Triton on CUDA, the reference elsewhere; ``use_kernel=True``
  forces Triton (on CPU only under ``TRITON_INTERPRET=1``).

Kernel design. One program handles ``BLOCKS`` 4x4 blocks. It loads their ``|w|`` as a ``[BLOCKS, 16]`` tile
(element ``e`` of a block is row ``e // 4``, column ``e % 4``), scores all patterns with one ``tl.dot`` against
the ``[16, 128]`` pattern matrix (the 90 patterns padded to 128 columns, the padding scored -1 so it never
wins since real scores are >= 0), and takes the argmax (ties to the lowest index, as ``torch.argmax`` in the
reference). The chosen pattern is read back as a 16-bit code (bit ``e`` = element ``e`` kept) from a 128-entry
table, and its bits are stored as the mask. The dot is in IEEE fp32 (``input_precision="ieee"``, not TF32),
so the scores are the reference's up to summation order: blocks whose two best patterns tie to within
rounding may pick the other one of them (equal kept magnitude either way).
"""

from __future__ import annotations

import torch

from lit_accel.kernels._triton import HAS_TRITON as _HAS_TRITON
from lit_accel.kernels._triton import interpret as _interpret
from lit_accel.kernels._triton import tl, triton
from lit_accel.sparsity.functional import (
    NUM_TRANSPOSABLE_PATTERNS,
    check_24_shape,
    transposable_24_mask_reference,
    transposable_patterns,
)

__all__ = ["transposable_24_mask", "transposable_24_mask_reference", "transposable_24_mask_triton"]

_PADDED = 128  # tl.arange and tl.dot need a power of two >= 16: 90 patterns pad to 128
_BLOCKS = 32  # 4x4 blocks per program: a [32, 16] x [16, 128] dot, a comfortable tile for any GPU


if _HAS_TRITON:

    @triton.jit
    def _transposable_kernel(
        w_ptr,
        out_ptr,
        pat_ptr,
        code_ptr,
        n_blocks,
        n_block_cols,
        stride_r,
        stride_c,
        BLOCKS: tl.constexpr,
        PADDED: tl.constexpr,
    ):
        pid = tl.program_id(0)
        b = pid * BLOCKS + tl.arange(0, BLOCKS)
        valid = b < n_blocks
        e = tl.arange(0, 16)
        rows = (b // n_block_cols)[:, None] * 4 + (e // 4)[None, :]
        cols = (b % n_block_cols)[:, None] * 4 + (e % 4)[None, :]
        m2 = valid[:, None]
        w = tl.load(w_ptr + rows * stride_r + cols * stride_c, mask=m2, other=0.0)
        a = tl.abs(w.to(tl.float32))
        p = tl.arange(0, PADDED)
        pats = tl.load(pat_ptr + e[:, None] * PADDED + p[None, :])  # [16, PADDED], 0/1 in fp32
        scores = tl.dot(a, pats, input_precision="ieee")
        scores = tl.where((p < 90)[None, :], scores, -1.0)
        best = tl.argmax(scores, axis=1, tie_break_left=True)
        code = tl.load(code_ptr + best)
        keep = (code[:, None] >> e[None, :]) & 1
        tl.store(
            out_ptr + rows * (n_block_cols * 4) + cols,  # out is contiguous
            keep.to(tl.int8),
            mask=m2,
        )


_TABLES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``[16, 128]`` fp32 pattern matrix and the ``[128]`` int32 bit codes, built once per device."""
    if device not in _TABLES:
        pats = transposable_patterns().reshape(NUM_TRANSPOSABLE_PATTERNS, 16)
        mat = torch.zeros(16, _PADDED)
        mat[:, :NUM_TRANSPOSABLE_PATTERNS] = pats.t()
        codes = torch.zeros(_PADDED, dtype=torch.int32)
        codes[:NUM_TRANSPOSABLE_PATTERNS] = (pats.long() << torch.arange(16)).sum(1).int()
        _TABLES[device] = (mat.to(device).contiguous(), codes.to(device))
    return _TABLES[device]


def _kernel_unsupported_reason(weight: torch.Tensor) -> str | None:
    if not _HAS_TRITON:
        return "triton is not installed"
    if weight.device.type != "cuda" and not _interpret():
        return f"the weight is on {weight.device.type}, and Triton runs on CUDA (or on CPU under TRITON_INTERPRET=1)"
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {weight.dtype} is not one of float32, float16, bfloat16"
    return None


def transposable_24_mask_triton(weight: torch.Tensor) -> torch.Tensor:
    """The transposable 2:4 mask computed by the Triton kernel (see the module docstring).

    Raises:
        ValueError: If a dim is not a multiple of 4, or the kernel cannot run here (the message says why).
    """
    reason = check_24_shape(weight, transposable=True) or _kernel_unsupported_reason(weight)
    if reason is not None:
        raise ValueError(f"transposable_24_mask with use_kernel=True: {reason}")
    r, c = weight.shape
    w = weight.detach()
    out = torch.empty(r, c, dtype=torch.int8, device=w.device)
    n_blocks = (r // 4) * (c // 4)
    pats, codes = _tables(w.device)
    grid = (triton.cdiv(n_blocks, _BLOCKS),)
    _transposable_kernel[grid](
        w, out, pats, codes, n_blocks, c // 4, w.stride(0), w.stride(1), BLOCKS=_BLOCKS, PADDED=_PADDED
    )
    return out.bool()


def transposable_24_mask(weight: torch.Tensor, use_kernel: bool | None = None) -> torch.Tensor:
    """The exact best transposable 2:4 mask of ``weight`` (2 kept per row and per column of every 4x4 block).

    Args:
        weight: ``[out_features, in_features]``, both multiples of 4.
        use_kernel: None: Triton on CUDA, the PyTorch reference elsewhere; True: Triton (on CPU only under
            ``TRITON_INTERPRET=1``); False: the reference.

    Returns:
        A bool mask of ``weight``'s shape.

    Raises:
        ValueError: If a dim is not a multiple of 4 (the message names the shape), or ``use_kernel=True`` where
            the kernel cannot run.

    Example:
        >>> m = transposable_24_mask(torch.randn(8, 12))
        >>> int(m.sum()), bool((m.reshape(2, 4, 3, 4).sum(1) == 2).all())
        (48, True)
    """
    if use_kernel is None:
        use_kernel = weight.device.type == "cuda" and _kernel_unsupported_reason(weight) is None
    if use_kernel:
        return transposable_24_mask_triton(weight)
    return transposable_24_mask_reference(weight)
