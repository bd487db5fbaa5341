"""2:4 semi-structured sparsity, the pure functions: masks, the masked linear, masked decay.

The mask algorithms and the masked product are ops (:mod:`lit_accel.ops.sparse24`,
:mod:`lit_accel.ops.masked_linear`), re-exported here so the technique reads as one API.

* :func:`rowwise_24_mask`: keep the 2 largest ``|w|`` of every 4 consecutive weights along the input dim.
* :func:`transposable_24_mask_reference`: per 4x4 block the exact best of the 90 patterns that keep 2 per row
  *and* 2 per column, so both ``W`` and ``W^T`` are 2:4 (the forward and the input-gradient matmul can both use
  the sparse tensor cores; Hu et al., 2024, "Accelerating Transformer Pre-training with 2:4 Sparsity").
  :func:`lit_accel.ops.sparse24.transposable_24_mask` is the dispatching entry point (Triton on CUDA).
* :func:`flip_rate`: the fraction of mask entries that changed between two refreshes (the paper's health signal).
* :class:`SparseLinear` / :func:`masked_linear`: ``y = x (W*M)^T + b``, ``dX = dY (W*M)``, ``dW = dY^T x`` dense.
* :func:`masked_decay_`: the paper's masked decay, ``grad += decay * W * (1 - M)``.
* :func:`sparsify_linears`: the surgery, target linears -> :class:`SparseLinear` (same parameters), on every
  supported family: Phi-3's fused ``qkv_proj`` / ``gate_up_proj`` are masked as one matrix each (with transposable
  masks this equals masking q, k, v (gate, up) apart, their boundaries being multiples of 4); a mixture of experts'
  MLP (Mixtral, Qwen3-MoE) has 3-D expert weights, not linears, so its experts stay dense and its router is never
  targeted (:func:`~lit_accel.models.surgery.match_linears` warns, or refuses targets that select nothing else).
* :func:`set_24_masks`: compute every sparse layer's mask from its current weight and set it.

Example:
    >>> import torch
    >>> w = torch.randn(8, 16)
    >>> m = transposable_24_mask_reference(w)
    >>> bool((m.view(2, 4, 4, 4).sum(dim=(1,)) == 2).all()), int(m.sum())
    (True, 64)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lit_accel.models.params import full_shape, gathered
from lit_accel.models.structure import StructurePatterns
from lit_accel.models.surgery import match_linears, replace_module
from lit_accel.ops.masked_linear import MaskedLinearFunction, masked_linear
from lit_accel.ops.sparse24 import (
    NUM_TRANSPOSABLE_PATTERNS,
    check_24_shape,
    rowwise_24_mask,
    transposable_24_mask,
    transposable_24_mask_reference,
    transposable_patterns,
)
from lit_accel.ops.sparse24_gemm import sparse24_linear

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
    "set_24_masks",
    "sparsify_linears",
    "transposable_24_mask_reference",
    "transposable_patterns",
]


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


KERNELS: tuple[str, ...] = ("masked", "cusparselt")
"""Backends of :class:`SparseLinear` while a mask is set: the masked dense path (any device and dtype) or the 2:4
sparse tensor cores through cuSPARSELt (:mod:`lit_accel.ops.sparse24_gemm`; CUDA, bf16, transposable
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


def sparsify_linears(
    model: nn.Module,
    targets: str | Sequence[str] = "mlp",
    *,
    transposable: bool = True,
    patterns: StructurePatterns | None = None,
) -> tuple[dict[str, SparseLinear], dict[str, str]]:
    """Swaps the target linears of ``model`` for :class:`SparseLinear` (dense until a mask is set), in place.

    Each new layer shares the original ``weight`` and ``bias`` objects, so an optimizer built before still holds
    them and ``state_dict`` keys do not change. Idempotent: a layer that already is a :class:`SparseLinear` is
    returned as it is. A target that cannot take a 2:4 mask (not a plain ``nn.Linear``, or a dim that is not a
    multiple of 4) is left as it is and reported with the reason.

    Works on every supported family (see :func:`~lit_accel.models.surgery.match_linears`): Phi-3's fused
    ``qkv_proj`` and ``gate_up_proj`` become one sparse layer each; in Mixtral and Qwen3-MoE the experts' weights are
    3-D tensors, not linears, so they stay dense (a warning names the blocks) and the router is never targeted.

    Args:
        model: A supported Hugging Face causal LM, or any transformer with ``patterns``.
        targets: A preset (``"mlp"``, ``"attention"``, ``"all-linear"``), roles, module names or regexes.
        transposable: Whether the masks will be transposable (both dims multiples of 4) or row-wise (input dim).
        patterns: Module-name patterns for a model that is not a supported architecture.

    Returns:
        ``(layers, skipped)``: qualified name -> :class:`SparseLinear`, and qualified name -> why a target was
        left dense.

    Raises:
        ValueError: ``targets`` matches no linear (also when it selects only mixture-of-experts MLPs).

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        ...                                      num_attention_heads=4, vocab_size=128))
        >>> layers, skipped = sparsify_linears(model, "mlp")
        >>> kept = set_24_masks(layers)["model.layers.0.mlp.up_proj"].float().mean().item()
        >>> sorted(n.rsplit(".", 1)[1] for n in layers), skipped, kept
        (['down_proj', 'gate_proj', 'up_proj'], {}, 0.5)
    """
    chosen = match_linears(model, targets, patterns=patterns, technique="2:4 sparsity")
    layers: dict[str, SparseLinear] = {}
    skipped: dict[str, str] = {}
    for name, module in chosen.items():
        if isinstance(module, SparseLinear):
            layers[name] = module
            continue
        if type(module) is not nn.Linear:
            skipped[name] = f"it is a {type(module).__name__}, not an nn.Linear"
            continue
        reason = check_24_shape(module.weight, transposable=transposable)
        if reason:
            skipped[name] = reason
            continue
        new = SparseLinear.from_linear(module)
        replace_module(model, name, new)
        layers[name] = new
    return layers, skipped


@torch.no_grad()
def set_24_masks(layers: Mapping[str, SparseLinear], *, transposable: bool = True) -> dict[str, torch.Tensor]:
    """Computes each layer's 2:4 mask from its current weight, sets it, and returns the masks by name.

    ``transposable`` picks :func:`~lit_accel.ops.sparse24.transposable_24_mask` (2:4 in ``W`` and ``W^T``; Triton on
    CUDA) or :func:`rowwise_24_mask`. Under ZeRO-3 the weights are gathered first (call it on every rank).

    Example:
        >>> layer = SparseLinear.from_linear(nn.Linear(8, 4))
        >>> int(set_24_masks({"fc": layer})["fc"].sum()), layer.mask is not None
        (16, True)
    """
    masks: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        with gathered([layer.weight]):  # type: ignore[list-item]  # a Parameter, typed Tensor by nn.Linear
            weight = layer.weight.detach()
            masks[name] = transposable_24_mask(weight) if transposable else rowwise_24_mask(weight)
        layer.set_mask(masks[name])
    return masks
