"""2:4 masks: row-wise (2 largest of every 4 along the input dim) and transposable (per 4x4 block the exact best
of the 90 patterns with 2 kept per row and per column, so W and W^T are both 2:4; Hu et al., 2024).

The transposable mask has three layers, as every op in :mod:`lit_accel.ops`:

* :func:`transposable_24_mask_reference` - plain PyTorch (one matmul scoring all blocks against all 90 patterns,
  argmax), used by the tests and as the CPU fallback.
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

import itertools

import torch

from lit_accel.ops._triton import HAS_TRITON as _HAS_TRITON
from lit_accel.ops._triton import interpret as _interpret
from lit_accel.ops._triton import tl, triton

__all__ = [
    "NUM_TRANSPOSABLE_PATTERNS",
    "check_24_shape",
    "rowwise_24_mask",
    "transposable_24_mask",
    "transposable_24_mask_reference",
    "transposable_24_mask_triton",
    "transposable_patterns",
]

_PADDED = 128  # tl.arange and tl.dot need a power of two >= 16: 90 patterns pad to 128
_BLOCKS = 32  # 4x4 blocks per program: a [32, 16] x [16, 128] dot, a comfortable tile for any GPU


NUM_TRANSPOSABLE_PATTERNS = 90
"""Number of 4x4 binary patterns with exactly 2 ones in every row and every column."""


def transposable_patterns(device: torch.device | str | None = None) -> torch.Tensor:
    """The 90 transposable 2:4 patterns of a 4x4 block, as a ``[90, 4, 4]`` float32 tensor of 0/1.

    The order is fixed (lexicographic over each row's pair of kept columns, first row slowest), so the index of
    the best pattern, and with it the tie-break, is the same on every rank, device and run.

    Example:
        >>> p = transposable_patterns()
        >>> tuple(p.shape), bool((p.sum(1) == 2).all() and (p.sum(2) == 2).all())
        ((90, 4, 4), True)
    """
    rows = list(itertools.combinations(range(4), 2))
    found = []
    for choice in itertools.product(rows, repeat=4):
        block = torch.zeros(4, 4)
        for i, cols in enumerate(choice):
            block[i, list(cols)] = 1.0
        if bool((block.sum(0) == 2).all()):
            found.append(block)
    out = torch.stack(found)
    assert out.shape[0] == NUM_TRANSPOSABLE_PATTERNS
    return out.to(device) if device is not None else out


_PATTERN_CACHE: dict[torch.device, torch.Tensor] = {}


def _patterns_on(device: torch.device) -> torch.Tensor:
    # Built once per device: the enumeration is Python loops, far slower than the scoring it feeds.
    if device not in _PATTERN_CACHE:
        _PATTERN_CACHE[device] = transposable_patterns(device)
    return _PATTERN_CACHE[device]


def check_24_shape(weight: torch.Tensor, *, transposable: bool, name: str = "weight") -> str | None:
    """Why ``weight`` cannot take a 2:4 mask, or None if it can.

    Row-wise masks need the input dim (columns) to be a multiple of 4; transposable masks tile the matrix in 4x4
    blocks, so both dims must be.

    Example:
        >>> check_24_shape(torch.zeros(6, 8), transposable=True)
        'weight has shape (6, 8); a transposable 2:4 mask needs both dims to be multiples of 4'
    """
    # ZeRO-3 keeps an empty local shard and records the whole shape as ds_shape.
    shape = tuple(getattr(weight, "ds_shape", weight.shape))
    if len(shape) != 2:
        return f"{name} has shape {shape}; a 2:4 mask needs a 2-D weight"
    if transposable and (shape[0] % 4 or shape[1] % 4):
        return f"{name} has shape {shape}; a transposable 2:4 mask needs both dims to be multiples of 4"
    if not transposable and shape[1] % 4:
        return f"{name} has shape {shape}; a row-wise 2:4 mask needs the input dim (dim 1) to be a multiple of 4"
    return None


def rowwise_24_mask(weight: torch.Tensor) -> torch.Tensor:
    """Keeps the 2 largest ``|w|`` of every 4 consecutive entries along the input dim (dim 1).

    Args:
        weight: ``[out_features, in_features]``, ``in_features`` a multiple of 4; any float dtype.

    Returns:
        A bool mask of ``weight``'s shape. Ties keep the lower column index (a stable sort), so the mask is
        deterministic.

    Raises:
        ValueError: If ``weight`` is not 2-D or its input dim is not a multiple of 4 (the message names the shape).

    Example:
        >>> rowwise_24_mask(torch.tensor([[1.0, -3.0, 2.0, 0.5]])).tolist()
        [[False, True, True, False]]
    """
    reason = check_24_shape(weight, transposable=False)
    if reason is not None:
        raise ValueError(reason)
    out_f, in_f = weight.shape
    groups = weight.detach().abs().float().reshape(out_f, in_f // 4, 4)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :2]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True)
    return mask.reshape(out_f, in_f)


def _blocks(weight: torch.Tensor) -> torch.Tensor:
    """``[R, C]`` -> ``[R/4 * C/4, 16]`` float32 ``|w|``, one row per 4x4 block (row-major inside the block)."""
    r, c = weight.shape
    a = weight.detach().abs().float().reshape(r // 4, 4, c // 4, 4).permute(0, 2, 1, 3)
    return a.reshape(-1, 16)


def _unblocks(blocks: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    r, c = shape
    return blocks.reshape(r // 4, c // 4, 4, 4).permute(0, 2, 1, 3).reshape(r, c)


def transposable_24_mask_reference(weight: torch.Tensor) -> torch.Tensor:
    """The exact best transposable 2:4 mask: per 4x4 block, of the 90 patterns with 2 kept per row and per column,
    the one that keeps the largest sum of ``|w|``.

    All blocks are scored against all patterns with one matmul (``[blocks, 16] @ [16, 90]``, in float32 whatever
    the input dtype) and the argmax taken; ties go to the lowest pattern index of :func:`transposable_patterns`.

    Args:
        weight: ``[out_features, in_features]``, both multiples of 4; any float dtype.

    Returns:
        A bool mask of ``weight``'s shape with exactly 2 kept in every row and every column of every 4x4 block.

    Raises:
        ValueError: If ``weight`` is not 2-D or a dim is not a multiple of 4 (the message names the shape).

    Example:
        >>> w = torch.tensor([[9.0, 8, 0, 0], [7, 0, 6, 0], [0, 5, 0, 4], [0, 0, 3, 2]])
        >>> transposable_24_mask_reference(w).int().tolist()
        [[1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]]
    """
    reason = check_24_shape(weight, transposable=True)
    if reason is not None:
        raise ValueError(reason)
    pats = _patterns_on(weight.device).reshape(NUM_TRANSPOSABLE_PATTERNS, 16)
    best = (_blocks(weight) @ pats.t()).argmax(dim=1)
    return _unblocks(pats[best].bool(), (weight.shape[0], weight.shape[1]))


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
