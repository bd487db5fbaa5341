"""Outputs of the fused kernels that a consumer may recompute in its backward instead of saving them.

The RMSNorm and SwiGLU autograd functions already save what produced their output (``x`` and the weight; ``gate``
and ``up``). A consumer that would otherwise save that output for its own backward (a LoRA layer keeps its input
for the adapter's ``dA = u^T x``) can save those producer inputs instead: the very same tensors, so no memory is
added, while the output itself is freed after the forward. In the backward it reruns the producer's forward
kernel on them, which gives the same bits (same kernel, same inputs, same launch) for one memory-bound pass.

The kernels register each output they return under autograd with :func:`register_recompute`; a consumer asks
:func:`recompute_recipe` for the tensor it was given. The registry holds the output weakly: an entry lives as
long as the output does, and holding it keeps nothing alive that the producer's own autograd node does not.

Example:
    >>> import torch
    >>> y = torch.randn(4, 8) * 2
    >>> token = register_recompute(y, lambda a: a * 2, y / 2)
    >>> recipe = recompute_recipe(y)
    >>> torch.equal(recipe.run(*recipe.inputs), y), recompute_recipe(y.clone()) is None
    (True, True)
    >>> _ = y.mul_(1)  # an in-place change: the recipe would rebuild the old values
    >>> recompute_recipe(y) is None
    True
    >>> forget_recompute(token)
"""

from __future__ import annotations

import dataclasses
import itertools
import weakref
from collections.abc import Callable

import torch

__all__ = ["Recompute", "forget_recompute", "recompute_recipe", "register_recompute"]


@dataclasses.dataclass(frozen=True)
class Recompute:
    """How to produce a tensor again: ``run(*inputs)``."""

    run: Callable[..., torch.Tensor]
    """The producer's forward on its inputs (no autograd graph is built: it runs on saved tensors)."""
    inputs: tuple[torch.Tensor, ...]
    """The producer's saved inputs; a consumer saves these (``ctx.save_for_backward``) in place of the output."""


_REGISTRY: dict[int, tuple[weakref.ref[torch.Tensor], Recompute, int, int]] = {}
_KEYS: dict[int, int] = {}  # token -> id(output)
_TOKENS = itertools.count(1)


def register_recompute(output: torch.Tensor, run: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> int:
    """Records that ``run(*inputs)`` reproduces ``output`` bit for bit.

    The record lasts until ``output`` is freed or :func:`forget_recompute` is called with the returned token (the
    producer does so in its own backward, after which no consumer's backward can need it: this way a user who keeps
    ``output`` does not keep ``inputs`` alive past the backward). Under ``torch.compile`` nothing is recorded (object
    identity means nothing in a traced graph); consumers then save their inputs as usual.

    Returns:
        A token for :func:`forget_recompute` (0 when nothing was recorded).
    """
    if torch.compiler.is_compiling():
        return 0
    key, token = id(output), next(_TOKENS)

    def _forget(ref: weakref.ref[torch.Tensor], key: int = key, token: int = token) -> None:
        _KEYS.pop(token, None)
        entry = _REGISTRY.get(key)
        if entry is not None and entry[0] is ref:
            del _REGISTRY[key]

    _REGISTRY[key] = (weakref.ref(output, _forget), Recompute(run, tuple(inputs)), token, output._version)
    _KEYS[token] = key
    return token


def forget_recompute(token: int) -> None:
    """Drops the record :func:`register_recompute` returned ``token`` for, if it is still there."""
    key = _KEYS.pop(token, None)
    if key is None:
        return
    entry = _REGISTRY.get(key)
    if entry is not None and entry[2] == token:
        del _REGISTRY[key]


def recompute_recipe(tensor: torch.Tensor) -> Recompute | None:
    """The recipe registered for this very tensor object (not a view or copy of it), or None.

    None also when the tensor was modified in place since it was produced (its version moved: the recipe would
    rebuild the old values) and under ``torch.compile`` (an identity lookup would make dynamo guard on the object).
    """
    if torch.compiler.is_compiling():
        return None
    entry = _REGISTRY.get(id(tensor))
    if entry is None or entry[0]() is not tensor or entry[3] != tensor._version:
        return None
    return entry[1]
