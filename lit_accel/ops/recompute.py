"""Outputs of the fused kernels that a consumer may recompute in its backward instead of saving them.

The RMSNorm and SwiGLU autograd functions already save what produced their output (``x`` and the weight; ``gate``
and ``up``). A consumer that would otherwise save that output for its own backward (a LoRA layer keeps its input
for the adapter's ``dA = u^T x``) can save those producer inputs instead: the very same tensors, so no memory is
added, while the output itself is freed after the forward. In the backward it reruns the producer's forward
kernel on them, which gives the same bits (same kernel, same inputs, same launch) for one memory-bound pass.

The kernels register each output they return under autograd with :func:`register_recompute`, as long as some
consumer has asked for recipes (:func:`request_recompute`); a consumer asks :func:`recompute_recipe` for the
tensor it was given. The registry holds the output weakly: an entry lives as long as the output does (or until the
producer's backward), and holding it keeps nothing alive that the producer's own autograd node does not.

Example:
    >>> import torch
    >>> consumer = object.__new__(type("Consumer", (), {}))  # anything weak-referenceable, e.g. a LoRA layer
    >>> request_recompute(consumer)
    >>> y = torch.randn(4, 8) * 2
    >>> ticket = register_recompute(y, lambda a: a * 2, y / 2)
    >>> recipe = recompute_recipe(y)
    >>> torch.equal(recipe.run(*recipe.inputs), y), recompute_recipe(y.clone()) is None
    (True, True)
    >>> _ = y.mul_(1)  # an in-place change: the recipe would rebuild the old values
    >>> recompute_recipe(y) is None
    True
    >>> forget_recompute(ticket)
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import weakref
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["Recompute", "Ticket", "forget_recompute", "recompute_recipe", "register_recompute", "request_recompute"]


@dataclasses.dataclass(frozen=True)
class Recompute:
    """How to produce a tensor again: ``run(*inputs)``."""

    run: Callable[..., torch.Tensor]
    """The producer's forward on its inputs (no autograd graph is built: it runs on saved tensors)."""
    inputs: tuple[torch.Tensor, ...]
    """The producer's saved inputs; a consumer saves these (``ctx.save_for_backward``) in place of the output."""
    reduce: Callable[..., torch.Tensor] | None = None
    """``reduce(*inputs, u=u, scale=s)``: ``s * u^T @ output`` in fp32 (``u`` ``[rows, R]``, the output seen as
    ``[rows, N]``) without writing the output out (:func:`lit_accel.ops.lowrank_reduce.lowrank_reduce`), for a
    consumer that needs the output only in such a product (a LoRA layer's ``dA``); None when the producer has none."""


# id(output) -> (weak ref to output, recipe, token, output's version when produced)
_REGISTRY: dict[int, tuple[weakref.ref[torch.Tensor], Recompute, int, int]] = {}
_TOKENS = itertools.count(1)
_REQUESTERS: weakref.WeakSet[Any] = weakref.WeakSet()

Ticket = tuple[int, int]
"""What :func:`register_recompute` returns and :func:`forget_recompute` takes: ``(id(output), token)``."""


def request_recompute(consumer: Any) -> None:
    """Marks that ``consumer`` (e.g. a LoRA layer) will ask for recipes. While no such consumer is alive the
    producers record nothing, so the default path pays nothing for this registry."""
    _REQUESTERS.add(consumer)


def register_recompute(
    output: torch.Tensor,
    run: Callable[..., torch.Tensor],
    *inputs: torch.Tensor,
    bound: tuple[Any, ...] = (),
    reduce: Callable[..., torch.Tensor] | None = None,
) -> Ticket | None:
    """Records that ``run(*bound, *inputs)`` reproduces ``output`` bit for bit (and ``reduce``, if given, its
    products with a ``u``: see :attr:`Recompute.reduce`; it is called as ``reduce(*bound, *inputs, u=, scale=)``).

    The record lasts until ``output`` is freed or :func:`forget_recompute` is called with the returned ticket (the
    producer does so in its own backward, after which no consumer's backward can need it: this way a user who keeps
    ``output`` does not keep ``inputs`` alive past the backward). Nothing is recorded while no consumer has called
    :func:`request_recompute`, or under ``torch.compile`` (object identity means nothing in a traced graph);
    consumers then save their inputs as usual. Nor when an input is a DeepSpeed ZeRO-3 partitioned parameter
    (``lit_accel.models.params.is_partitioned``; not imported here, the models package imports the kernels): it is
    released after its module's forward and gathered again only for that module's own backward, which runs after
    the consumer's. ``bound`` holds leading non-tensor arguments of ``run``, bound only when a record is made.

    Returns:
        A ticket for :func:`forget_recompute`, or None when nothing was recorded.
    """
    if not _REQUESTERS or torch.compiler.is_compiling() or any(hasattr(t, "ds_id") for t in inputs):
        return None
    if bound:
        run = functools.partial(run, *bound)
        reduce = None if reduce is None else functools.partial(reduce, *bound)
    key, token = id(output), next(_TOKENS)
    _REGISTRY[key] = (weakref.ref(output, lambda _ref: forget_recompute((key, token))), Recompute(run, inputs, reduce),
                      token, output._version)  # fmt: skip
    return key, token


def forget_recompute(ticket: Ticket | None) -> None:
    """Drops the record behind ``ticket`` if it is still there (not replaced by a later output at the same id)."""
    if ticket is None:
        return
    key, token = ticket
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
