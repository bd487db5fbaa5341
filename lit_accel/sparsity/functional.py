"""2:4 semi-structured sparsity, the pure functions: masks, the masked linear, masked decay.

* :func:`rowwise_24_mask`: keep the 2 largest ``|w|`` of every 4 consecutive weights along the input dim.
* :func:`transposable_24_mask_reference`: per 4x4 block the exact best of the 90 patterns that keep 2 per row
  *and* 2 per column, so both ``W`` and ``W^T`` are 2:4 (the forward and the input-gradient matmul can both use
  the sparse tensor cores; Hu et al., 2024, "Accelerating Transformer Pre-training with 2:4 Sparsity").
  :func:`lit_accel.kernels.sparse24.transposable_24_mask` is the dispatching entry point (Triton on CUDA).
* :func:`flip_rate`: the fraction of mask entries that changed between two refreshes (the paper's health signal).
* :class:`SparseLinear` / :func:`masked_linear`: ``y = x (W*M)^T + b``, ``dX = dY (W*M)``, ``dW = dY^T x`` dense.
* :func:`masked_decay_`: the paper's masked decay, ``grad += decay * W * (1 - M)``.

Example:
    >>> import torch
    >>> w = torch.randn(8, 16)
    >>> m = transposable_24_mask_reference(w)
    >>> bool((m.view(2, 4, 4, 4).sum(dim=(1,)) == 2).all()), int(m.sum())
    (True, 64)
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lit_accel.models.params import full_shape

__all__ = [
    "KERNELS",
    "NUM_TRANSPOSABLE_PATTERNS",
    "MaskedLinearFunction",
    "SparseLinear",
    "check_24_shape",
    "flip_rate",
    "masked_decay_",
    "masked_decay_term",
    "masked_linear",
    "rowwise_24_mask",
    "transposable_24_mask_reference",
    "transposable_patterns",
]

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
    shape = full_shape(weight)  # ZeRO-3 keeps an empty local shard
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


def flip_rate(old: torch.Tensor, new: torch.Tensor) -> float:
    """Fraction of mask entries that differ between ``old`` and ``new`` (0 = unchanged, 1 = all flipped).

    Raises:
        ValueError: If the shapes differ.

    Example:
        >>> flip_rate(torch.tensor([True, False, True, False]), torch.tensor([True, True, False, False]))
        0.5
    """
    if old.shape != new.shape:
        raise ValueError(f"flip_rate needs masks of one shape, got {tuple(old.shape)} and {tuple(new.shape)}")
    if old.numel() == 0:
        return 0.0
    return float((old.bool() != new.bool()).float().mean())


class MaskedLinearFunction(torch.autograd.Function):
    """``y = x (W*M)^T + b`` with ``dX = dY (W*M)`` and the *dense* weight gradient ``dW = dY^T x``.

    The dense ``dW`` is the paper's choice: the pruned weights keep learning, so a mask refresh can bring them
    back. (Plain autograd through ``W * M`` would give ``dW * M`` and freeze them.) This is the masked dense path:
    the numerics a sparse-tensor-core path must reproduce.
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor
    ) -> torch.Tensor:
        w_masked = weight * mask.to(weight.dtype)
        ctx.save_for_backward(x, w_masked)
        ctx.has_bias = bias is not None
        return F.linear(x, w_masked, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w_masked = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = grad_out @ w_masked
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[1]:
            gw = g2.t() @ x.reshape(-1, x.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb, None


def masked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
    """``x (W*M)^T + b`` with a dense weight gradient (see :class:`MaskedLinearFunction`).

    Under autocast the operands are cast to the autocast dtype first, as ``F.linear`` would; the gradients
    flow back through those casts to the parameters' own dtypes.

    Example:
        >>> w = torch.ones(4, 4, requires_grad=True)
        >>> y = masked_linear(torch.ones(1, 4), w, None, torch.eye(4, dtype=torch.bool))
        >>> y.tolist(), y.sum().backward(), w.grad.sum().item()
        ([[1.0, 1.0, 1.0, 1.0]], None, 16.0)
    """
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and x.is_floating_point():
        dtype = torch.get_autocast_dtype(dev)
        with torch.autocast(dev, enabled=False):
            b = bias.to(dtype) if bias is not None else None
            out: torch.Tensor = MaskedLinearFunction.apply(x.to(dtype), weight.to(dtype), b, mask)
        return out
    result: torch.Tensor = MaskedLinearFunction.apply(x, weight, bias, mask)
    return result


KERNELS: tuple[str, ...] = ("masked", "cusparselt")
"""Backends of :class:`SparseLinear` while a mask is set: the masked dense path (any device and dtype) or the 2:4
sparse tensor cores through cuSPARSELt (:mod:`lit_accel.kernels.sparse24_gemm`; CUDA, bf16, transposable
masks, dims multiples of 16; elsewhere it falls back to the masked dense path with a warning)."""


class SparseLinear(nn.Linear):
    """An ``nn.Linear`` whose forward uses ``W * mask`` while a mask is set (:func:`masked_linear`), else ``W``.

    ``kernel`` picks how the masked product runs: ``"masked"`` (dense matmuls on ``W * mask``, the reference) or
    ``"cusparselt"`` (2:4 sparse tensor cores for the forward and the input gradient, same numerics up to
    summation order; see :data:`KERNELS`). Set it with :meth:`set_kernel`.

    ``state_dict`` keys are those of ``nn.Linear`` (``weight`` is the dense weight, ``bias``): the mask is a
    non-persistent buffer, so a checkpoint of the model loads into a plain model and an HF ``save_pretrained``
    is unchanged; the callback that owns the masks saves them in its own state. The buffer still moves with
    ``.to(device)``.

    Example:
        >>> layer = SparseLinear.from_linear(nn.Linear(8, 4))
        >>> layer.set_mask(torch.ones(4, 8, dtype=torch.bool)); list(layer.state_dict())
        ['weight', 'bias']
    """

    mask: torch.Tensor | None
    kernel: str
    sparse_name: str

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **kwargs: Any) -> None:
        super().__init__(in_features, out_features, bias=bias, **kwargs)
        self.register_buffer("mask", None, persistent=False)
        self._init_sparse_state()

    def _init_sparse_state(self) -> None:
        self.kernel = "masked"
        self.sparse_name = ""
        # Per-layer cache of the cuSPARSELt path (packed operands for the current mask); not in the state_dict.
        self._kernel_cache: dict[str, Any] = {}

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> SparseLinear:
        """A SparseLinear sharing ``linear``'s parameters (same objects: optimizer and ZeRO see no new ones)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new.register_buffer("mask", None, persistent=False)
        new._init_sparse_state()
        return new

    def set_kernel(self, kernel: str) -> None:
        """Chooses the backend of the masked product: ``"masked"`` or ``"cusparselt"`` (see :data:`KERNELS`).

        Raises:
            ValueError: For any other value.
        """
        if kernel not in KERNELS:
            raise ValueError(f"SparseLinear kernel={kernel!r} is not allowed; kernel must be one of {KERNELS}")
        if kernel != self.kernel:
            self._kernel_cache.clear()
        self.kernel = kernel

    def set_mask(self, mask: torch.Tensor | None) -> None:
        """Sets the mask (bool, the weight's shape) or removes it (``None``: dense forward).

        Raises:
            ValueError: If the mask's shape is not the weight's.
        """
        shape = full_shape(self.weight)
        if mask is not None and tuple(mask.shape) != shape:
            raise ValueError(f"mask has shape {tuple(mask.shape)}, the weight {shape}")
        self.mask = None if mask is None else mask.to(device=self.weight.device, dtype=torch.bool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            return F.linear(x, self.weight, self.bias)
        if self.kernel == "cusparselt":
            # Imported here: lit_accel.kernels.sparse24_gemm imports this module.
            from lit_accel.kernels.sparse24_gemm import sparse24_linear

            return sparse24_linear(x, self.weight, self.bias, self.mask, self._kernel_cache, self.sparse_name)
        return masked_linear(x, self.weight, self.bias, self.mask)

    def extra_repr(self) -> str:
        kernel = f", kernel={self.kernel}" if self.kernel != "masked" else ""
        return super().extra_repr() + f", sparse={self.mask is not None}{kernel}"


@torch.no_grad()
def masked_decay_(grad: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, decay: float) -> None:
    """The paper's masked decay, in place: ``grad += decay * weight * (1 - mask)``.

    Applied to the gradient after backward and before the optimizer step (as ``sparse.masked_add_`` in
    huyz2023/2by4-pretrain, ``alpha=2e-4``), so only the pruned weights are pulled towards zero, through the
    optimizer (Adam normalises it like any gradient term), and a pruned weight that keeps a large magnitude must
    earn it back against this pull.

    Example:
        >>> g = torch.zeros(1, 4)
        >>> masked_decay_(g, torch.ones(1, 4), torch.tensor([[True, False, True, False]]), 0.5); g.tolist()
        [[0.0, 0.5, 0.0, 0.5]]
    """
    pruned = weight.to(grad.dtype) * (~mask.bool()).to(grad.dtype)
    grad.add_(pruned, alpha=decay)


def masked_decay_term(grad: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, decay: float) -> torch.Tensor:
    """``grad + decay * weight * (1 - mask)`` out of place: the masked decay as a gradient hook returns it.

    Used where the gradient never reaches ``param.grad`` before the optimizer step (DeepSpeed reduces it into its
    own buffers): the hook adds the term to each micro-batch's gradient as autograd produces it, with ``decay``
    divided by the number of micro-batches per step (and multiplied by any loss scale), so the step sees the same
    total as :func:`masked_decay_` adds once.

    Raises:
        RuntimeError: If ``weight`` is not whole (a ZeRO-3 partition outside its module's forward / backward).

    Example:
        >>> g = torch.zeros(1, 4)
        >>> masked_decay_term(g, torch.ones(1, 4), torch.tensor([[True, False, True, False]]), 0.5).tolist()
        [[0.0, 0.5, 0.0, 0.5]]
    """
    if weight.shape != grad.shape or mask.shape != grad.shape:
        raise RuntimeError(
            f"masked decay needs the whole weight: got weight {tuple(weight.shape)}, mask {tuple(mask.shape)} for a "
            f"gradient of {tuple(grad.shape)} (a partitioned ZeRO-3 weight outside its module's backward?)"
        )
    return grad + decay * weight.detach().to(grad.dtype) * (~mask.bool()).to(grad.dtype)
