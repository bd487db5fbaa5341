"""DropBP's algorithm as plain functions: drop sublayer backward passes, measure sensitivity, allocate rates.

DropBP (Woo et al., "Accelerating Fine-Tuning of Large Language Models by Dropping Backward Propagation",
NeurIPS 2024; code: WooSunghyeon/dropbp) skips the backward pass of whole residual sublayers ``x + f(norm(x))``
at random, each sublayer ``i`` with its own rate ``r_i``. The forward pass computes the same values; the
residual path still carries the gradient to earlier layers.

Mechanism. :func:`apply_dropbp` puts forward hooks (no module is replaced, so ``state_dict`` keys do not change
and :meth:`DropBPController.remove` undoes everything) on each sublayer's pre-norm and on the sublayer itself.
While a sublayer is dropped those two modules run with autograd off: they record no graph and save no
activations, so their output enters the residual as a constant and costs no backward. That is where the time
and memory go: unlike the reference code, which runs the sublayer with autograd on and detaches its output
(saving every activation anyway), nothing is stored for a dropped sublayer.

Sensitivity (:func:`measure_sensitivity`), as the reference ``DropBPHandler.compute_sensitivity`` with
``gradnorm=True`` computes it: for every trainable parameter tensor ``p`` take the gradient norm with nothing
dropped, ``||g(p)||``, and with only sublayer ``i`` dropped, ``||g_i(p)||`` (0 where ``p`` gets no gradient, e.g.
the dropped sublayer's own weights), then ``S_i = sum_p (||g(p)|| - ||g_i(p)||) ** 2``. That costs ``L + 1``
forward/backward passes per batch for ``L`` sublayers.

Allocation (:func:`allocate_drop_rates`), as the reference ``allocate_p`` (``dropbp/cpp_extention/
allocate_p.cc``) does: all rates start at 0; the rate of the sublayer with the lowest added cost goes up by
``step`` until the expected dropped backward FLOPs ``sum_i r_i F_i`` reach ``target * sum_i F_i``. Raising
sublayer ``i`` from ``r_i`` to ``r_i + step`` adds ``S_i * (r_i + step)``: a cost that grows with the rate, so
the total cost of a rate is ``S_i * step * k (k + 1) / 2`` after ``k`` raises, a discretised ``S_i r_i^2 / 2``.
The quadratic spreads the dropping: a sublayer half as sensitive ends at about twice the rate, rather than
the least sensitive ones all going to the cap. FLOPs decide only when to stop, not the order (as in the
reference).

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    >>> controller = apply_dropbp(model)
    >>> gen = torch.Generator().manual_seed(0)
    >>> controller.set_mask(draw_mask([0.5] * controller.num_sublayers, gen))
    >>> loss = model(torch.randint(0, 128, (2, 16)), labels=torch.randint(0, 128, (2, 16))).loss
    >>> loss.backward()  # the dropped sublayers' weights keep grad None
    >>> controller.remove()
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lit_accel.models.flops import backward_flops
from lit_accel.models.params import world_size
from lit_accel.models.structure import ModelStructure, StructurePatterns, Sublayer, get_structure

__all__ = [
    "DropBPController",
    "all_reduce_mean",
    "allocate_drop_rates",
    "apply_dropbp",
    "draw_mask",
    "dropped_fraction",
    "grad_norms",
    "measure_sensitivity",
    "sublayer_backward_flops",
    "uniform_drop_rates",
]

# The exact rates the allocation moves in are multiples of ``step``; comparing rates and FLOP fractions with
# this slack keeps 0.1 + 0.1 + 0.1 from missing 0.3.
_EPS = 1e-9


# --------------------------------------------------------------------------------------------------------------
# Mechanism
# --------------------------------------------------------------------------------------------------------------


class DropBPController:
    """The installed DropBP hooks of one model and the current drop mask. Build it with :func:`apply_dropbp`.

    ``mask[i]`` True means sublayer ``i`` (in ``structure.sublayers()`` order: attention, MLP of block 0, then
    block 1, ...) runs without autograd until the mask changes. A new controller keeps every sublayer.

    Example:
        >>> controller = apply_dropbp(model)  # doctest: +SKIP
        >>> controller.set_mask([True, False, False, False])  # doctest: +SKIP
        >>> with controller.masked([False] * 4): ...  # doctest: +SKIP
        >>> controller.remove()  # doctest: +SKIP
    """

    def __init__(self, structure: ModelStructure) -> None:
        self.structure = structure
        self.sublayers: list[Sublayer] = structure.sublayers()
        self._mask: list[bool] = [False] * len(self.sublayers)
        self._handles: list[RemovableHandle] = []
        for index, sub in enumerate(self.sublayers):
            # Pre-norm, sublayer and post-norm (Gemma 2/3, OLMo 2) all sit on the dropped branch; the residual
            # add outside them keeps the gradient path to earlier layers.
            for module in sub.path_modules:
                self._hook(module, index)

    def _hook(self, module: nn.Module, index: int) -> None:
        # A stack, not a flag: a module may be re-entered (activation checkpointing recomputes it inside the
        # backward of an outer forward), and each call must restore exactly what it found.
        saved: list[bool | None] = []

        def pre_hook(_module: nn.Module, _args: Any) -> None:
            if self._mask[index]:
                saved.append(torch.is_grad_enabled())
                torch._C._set_grad_enabled(False)
            else:
                saved.append(None)

        def post_hook(_module: nn.Module, _args: Any, _output: Any) -> None:
            previous = saved.pop() if saved else None
            if previous is not None:
                torch._C._set_grad_enabled(previous)

        self._handles.append(module.register_forward_pre_hook(pre_hook))
        # always_call: grad mode must come back even when the forward raises.
        self._handles.append(module.register_forward_hook(post_hook, always_call=True))

    @property
    def trainable(self) -> tuple[bool, ...]:
        """Per sublayer: whether it (its pre-norm or its module) holds a parameter that requires grad now.

        With LoRA on some projections only, or a partly frozen model, sublayers without trainable parameters
        exist; dropping every sublayer that has some would leave the loss without a graph.
        """
        return tuple(any(p.requires_grad for m in sub.path_modules for p in m.parameters()) for sub in self.sublayers)

    @property
    def num_sublayers(self) -> int:
        """Number of residual sublayers (twice the number of blocks)."""
        return len(self.sublayers)

    @property
    def mask(self) -> tuple[bool, ...]:
        """The current drop mask, one bool per sublayer."""
        return tuple(self._mask)

    @property
    def installed(self) -> bool:
        """Whether the hooks are still in place."""
        return bool(self._handles)

    def set_mask(self, mask: Sequence[bool] | torch.Tensor) -> None:
        """Drops the sublayers where ``mask`` is True from the next forward on.

        Args:
            mask: One bool per sublayer.

        Raises:
            ValueError: ``mask`` has the wrong length.
        """
        values = [bool(m) for m in (mask.tolist() if isinstance(mask, torch.Tensor) else mask)]
        if len(values) != len(self._mask):
            raise ValueError(f"mask has {len(values)} entries; the model has {len(self._mask)} sublayers")
        self._mask[:] = values

    def keep_all(self) -> None:
        """Drops nothing: the model behaves as if DropBP were not installed."""
        self._mask[:] = [False] * len(self._mask)

    @contextmanager
    def masked(self, mask: Sequence[bool] | torch.Tensor) -> Iterator[None]:
        """Uses ``mask`` inside the ``with`` block and restores the previous mask after it."""
        previous = list(self._mask)
        self.set_mask(mask)
        try:
            yield
        finally:
            self._mask[:] = previous

    def remove(self) -> None:
        """Removes every hook; the model is exactly as before :func:`apply_dropbp`."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.keep_all()


def apply_dropbp(
    model: nn.Module, patterns: StructurePatterns | None = None, structure: ModelStructure | None = None
) -> DropBPController:
    """Installs DropBP's hooks on every residual sublayer of ``model``.

    Args:
        model: A supported Hugging Face causal LM (possibly ``peft``-wrapped) or any transformer described by
            ``patterns``.
        patterns: Module names of a model :func:`~lit_accel.models.structure.get_structure` does not know.
        structure: An already computed structure of ``model`` (then ``patterns`` is ignored).

    Returns:
        The controller; nothing is dropped until :meth:`DropBPController.set_mask` is called.

    Raises:
        ValueError: From :func:`~lit_accel.models.structure.get_structure` when the model is not supported or a
            pattern matches nothing.

    Example:
        >>> controller = apply_dropbp(hf_model)  # doctest: +SKIP
        >>> controller.set_mask([i % 2 == 1 for i in range(controller.num_sublayers)])  # doctest: +SKIP
    """
    return DropBPController(structure if structure is not None else get_structure(model, patterns))


# --------------------------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------------------------


def draw_mask(
    rates: Sequence[float],
    generator: torch.Generator,
    sampling: Literal["systematic", "independent"] = "systematic",
    trainable: Sequence[bool] | None = None,
) -> tuple[bool, ...]:
    """Draws which sublayers drop this step; sublayer ``i`` drops with probability ``rates[i]`` either way.

    ``"independent"`` is the paper's draw: ``u_i < rate_i`` with ``u = torch.rand(n)``. The number of dropped
    sublayers then varies from step to step (binomially), and so do step time and activation memory; the peak
    memory of a run is set by its unluckiest step. ``"systematic"`` keeps every sublayer's marginal drop
    probability exactly ``rate_i`` but fixes how many drop (``floor`` or ``ceil`` of ``sum(rates)``): the
    sublayers are shuffled, their rates laid end to end on ``[0, sum(rates))``, and the ones whose segment holds
    a point of ``u + k`` (one uniform ``u``, integer ``k``) drop. Rates must be at most 1 for that (DropBP caps
    them at 0.9).

    Each draw consumes the same amount of the generator whatever the rates, so it advances identically on every
    rank and in a resumed run. If every sublayer would drop (every ``trainable`` one, when given), the one with
    the lowest rate among them (the lowest index among equals) is kept, so that some parameter still gets a
    gradient. That fallback can only trigger when ``sum(rates) > n - 1`` (at the 0.9 cap: models of four blocks
    or fewer), and then it lowers the kept sublayer's realised rate below ``rates[i]``.

    Args:
        rates: Drop rate of each sublayer, in ``[0, 1]``.
        generator: A CPU generator seeded identically on every rank.
        sampling: ``"systematic"`` (fixed count per step) or ``"independent"`` (the paper's Bernoulli draws).
        trainable: Per sublayer, whether it holds trainable parameters (default: all do).

    Returns:
        One bool per sublayer, True = dropped.

    Example:
        >>> draw_mask([0.0, 1.0, 1.0], torch.Generator().manual_seed(0), sampling="independent")
        (False, True, True)
        >>> sum(draw_mask([0.5] * 10, torch.Generator().manual_seed(1)))
        5
        >>> draw_mask([1.0, 1.0], torch.Generator().manual_seed(0))
        (False, True)
    """
    n = len(rates)
    if sampling == "independent":
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        mask = [bool(u[i] < rate) for i, rate in enumerate(rates)]
    elif sampling == "systematic":
        order = torch.randperm(n, generator=generator).tolist()
        offset = float(torch.rand((), generator=generator, dtype=torch.float64))
        mask = [False] * n
        start = 0.0
        for i in order:
            end = start + float(rates[i])
            # Segment [start, end) holds a point offset + k exactly when the count of points below moves.
            mask[i] = math.floor(end - offset) > math.floor(start - offset)
            start = end
    else:
        raise ValueError(f"sampling={sampling!r} is not allowed; use 'systematic' or 'independent'.")
    candidates = [i for i in range(n) if trainable is None or trainable[i]]
    if candidates and all(mask[i] for i in candidates):
        keep = min(candidates, key=lambda i: (rates[i], i))
        mask[keep] = False
    return tuple(mask)


def sublayer_backward_flops(structure: ModelStructure, seq_len: int) -> list[float]:
    """Backward FLOPs per token of every sublayer, attention's sequence-length term included.

    Args:
        structure: The model's structure.
        seq_len: Sequence length the attention runs over.

    Returns:
        One value per sublayer, in ``structure.sublayers()`` order.
    """
    return [backward_flops(structure, sub, seq_len) for sub in structure.sublayers()]


def dropped_fraction(mask: Sequence[bool], flops: Sequence[float]) -> float:
    """Fraction of the sublayers' backward FLOPs that ``mask`` drops.

    Example:
        >>> dropped_fraction([True, False], [1.0, 3.0])
        0.25
    """
    total = float(sum(flops))
    return float(sum(f for m, f in zip(mask, flops) if m)) / total if total > 0 else 0.0


# --------------------------------------------------------------------------------------------------------------
# Allocation
# --------------------------------------------------------------------------------------------------------------


def _check_target(target: float, cap: float, step: float) -> None:
    if not 0.0 < step <= 1.0:
        raise ValueError(f"step={step!r} must be in (0, 1]")
    if not 0.0 <= cap <= 1.0:
        raise ValueError(f"cap={cap!r} must be in [0, 1]")
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"target={target!r} must be in [0, 1]")


def uniform_drop_rates(num_sublayers: int, target: float, cap: float = 0.9) -> list[float]:
    """Every sublayer at rate ``target`` (capped at ``cap``): DropBP without a sensitivity measurement.

    Example:
        >>> uniform_drop_rates(3, 0.5)
        [0.5, 0.5, 0.5]
    """
    _check_target(target, cap, 1.0)
    return [min(float(target), float(cap))] * num_sublayers


def allocate_drop_rates(
    sensitivities: Sequence[float] | torch.Tensor,
    flops: Sequence[float],
    target: float,
    step: float = 0.1,
    cap: float = 0.9,
) -> list[float]:
    """Per-sublayer drop rates that drop ``target`` of the backward FLOPs where it hurts least.

    Greedy, as the reference ``allocate_p``: every rate starts at 0; repeatedly the sublayer with the lowest
    added cost ``sensitivity_i * (rate_i + step)`` (ties: the lowest index) gets ``rate_i += step``, skipping
    sublayers at ``cap``, until ``sum_i rate_i * flops_i >= target * sum_i flops_i``, i.e. the expected kept
    backward FLOPs are at most ``1 - target`` of the total.

    Args:
        sensitivities: Sensitivity of each sublayer (:func:`measure_sensitivity`), ``>= 0``.
        flops: Backward FLOPs of each sublayer (:func:`sublayer_backward_flops`), ``> 0``.
        target: Fraction of the backward FLOPs to drop, in expectation.
        step: Rate increment.
        cap: Highest rate of any sublayer.

    Returns:
        One rate per sublayer, each a multiple of ``step`` in ``[0, cap]``.

    Raises:
        ValueError: Lengths differ, a value is negative or not finite, or the target cannot be reached with every
            rate at the cap.

    Example:
        >>> allocate_drop_rates([1.0, 2.0, 4.0], [1.0, 1.0, 2.0], target=0.5)
        [0.9, 0.6, 0.3]
    """
    _check_target(target, cap, step)
    sens = [float(s) for s in (sensitivities.tolist() if isinstance(sensitivities, torch.Tensor) else sensitivities)]
    fl = [float(f) for f in flops]
    if len(sens) != len(fl):
        raise ValueError(f"{len(sens)} sensitivities but {len(fl)} FLOP counts; give one of each per sublayer")
    if any(not math.isfinite(s) or s < 0 for s in sens):
        raise ValueError(f"sensitivities must be finite and >= 0, got {sens}")
    if any(not math.isfinite(f) or f <= 0 for f in fl):
        raise ValueError(f"flops must be finite and > 0, got {fl}")
    # Integer step counts: the rates are exact multiples of ``step`` and the cap test cannot drift.
    max_steps = math.floor(cap / step + _EPS)
    total = sum(fl)
    goal = target * total
    counts = [0] * len(sens)
    dropped = 0.0
    while dropped < goal - _EPS * total:
        open_ = [i for i in range(len(sens)) if counts[i] < max_steps]
        if not open_:
            reachable = sum(max_steps * step * f for f in fl) / total
            raise ValueError(
                f"target={target} cannot be reached: with every rate at cap={cap} (in steps of {step}) at most "
                f"{reachable:.3f} of the backward FLOPs drop"
            )
        best = min(open_, key=lambda i: (sens[i] * (counts[i] + 1) * step, i))
        counts[best] += 1
        dropped += step * fl[best]
    return [round(k * step, 12) for k in counts]


# --------------------------------------------------------------------------------------------------------------
# Sensitivity
# --------------------------------------------------------------------------------------------------------------


def grad_norms(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm of the gradient of ``loss`` for each tensor in ``params`` (0 where it gets no gradient).

    Uses ``torch.autograd.grad``: nothing accumulates into ``.grad`` and no gradient-accumulator hooks (DDP's
    reducer, DeepSpeed's) fire, so it is safe to call in the middle of training.

    Args:
        loss: A scalar.
        params: Leaf tensors that require grad.

    Returns:
        A float64 tensor with one norm per parameter, on ``loss``'s device.
    """
    zero = torch.zeros((), dtype=torch.float64, device=loss.device)
    if not params or not loss.requires_grad:
        return zero.expand(len(params)).clone()
    norms = [zero] * len(params)
    handles = []
    for index, param in enumerate(params):

        def record(grad: torch.Tensor, index: int = index) -> torch.Tensor:
            # Keep the norm, hand autograd a zero-stride zero: each parameter's full gradient lives only while its
            # hook runs, so the measurement never holds a whole set of gradients (large under ZeRO-3, where they
            # would be unpartitioned).
            norms[index] = torch.linalg.vector_norm(grad.detach(), dtype=torch.float64).to(zero.device)
            return grad.new_zeros(()).expand_as(grad)

        handles.append(param.register_hook(record))
    try:
        torch.autograd.grad(loss, list(params), allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(norms)


def measure_sensitivity(
    controller: DropBPController,
    loss_fn: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    seed: int | None = 0,
) -> torch.Tensor:
    """Sensitivity of every sublayer on one batch: ``S_i = sum_p (||g(p)|| - ||g_i(p)||) ** 2``.

    ``g`` is the gradient with nothing dropped and ``g_i`` the gradient with only sublayer ``i`` dropped; ``p``
    runs over ``params`` (the trainable ones: adapters only under LoRA). ``L + 1`` forward/backward passes.
    The model's train/eval mode is left alone; instead the global RNG is reseeded before every pass and
    restored after the last one, so dropout draws the same masks in every pass and training's random stream
    is untouched. The controller's mask is restored afterwards.

    Args:
        controller: The model's DropBP controller.
        loss_fn: Runs the forward pass on a fixed batch and returns the scalar loss.
        params: Parameters whose gradient norms are compared.
        seed: Seed for every pass; None leaves the RNG alone (only right for models without randomness).

    Returns:
        A float64 tensor with one sensitivity per sublayer, on the loss's device.

    Example:
        >>> params = [p for p in model.parameters() if p.requires_grad]  # doctest: +SKIP
        >>> s = measure_sensitivity(controller, lambda: model(ids, labels=ids).loss, params)  # doctest: +SKIP
    """
    n = controller.num_sublayers
    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    results: list[torch.Tensor] = []
    with torch.random.fork_rng(devices=devices), controller.masked([False] * n):

        def norms_with(mask: list[bool]) -> torch.Tensor:
            controller.set_mask(mask)
            if seed is not None:
                torch.manual_seed(seed)
            with torch.enable_grad():
                return grad_norms(loss_fn(), params)

        full = norms_with([False] * n)
        for i in range(n):
            dropped = norms_with([j == i for j in range(n)])
            results.append(((full - dropped) ** 2).sum())
    return torch.stack(results) if results else torch.zeros(0, dtype=torch.float64)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over all ranks when ``torch.distributed`` is initialised, else ``tensor`` itself.

    The mean is then broadcast from rank 0, so every rank holds bit-identical values whatever the
    backend's reduction order, and every rank computes the same allocation from it.
    """
    world = world_size()
    if world == 1:
        return tensor
    out = tensor.clone()
    torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
    out /= world
    torch.distributed.broadcast(out, src=0)
    return out
