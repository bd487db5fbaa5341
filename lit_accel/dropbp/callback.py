"""``DropBP``: a Lightning callback that drops the backward pass of residual sublayers, per sensitivity.

The callback only decides *when*; the algorithm is in :mod:`lit_accel.dropbp.functional`. Timeline of a fit:

1. ``setup``: under DDP, turns on ``find_unused_parameters`` (see :class:`DropBP`).
2. ``on_fit_start``: finds the Hugging Face model (:func:`lit_accel.models.surgery.find_hf_model`), installs the
   hooks, resolves ``sensitivity_at`` to an optimizer step.
3. Every training batch (``on_train_batch_start``): when the measurement is due, measures the sensitivities on
   that batch (``L + 1`` forward/backward passes, nothing written to ``.grad``); after ``sensitivity_batches``
   batches averages them over batches and ranks and allocates the rates. Then draws which sublayers drop in
   this step (or micro-batch) from a generator seeded identically on every rank.
4. ``teardown``: removes the hooks.

Example:
    >>> import lightning as L
    >>> from lit_accel.dropbp import DropBP
    >>> trainer = L.Trainer(max_steps=1000, callbacks=[DropBP(target=0.5)])  # doctest: +SKIP
    >>> # fine-tuning: measure before the first step
    >>> trainer = L.Trainer(callbacks=[DropBP(target=0.5, sensitivity_at=0)])  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lit_accel.dropbp.functional import (
    DropBPController,
    all_reduce_mean,
    allocate_drop_rates,
    apply_dropbp,
    draw_mask,
    dropped_fraction,
    measure_sensitivity,
    sublayer_backward_flops,
    uniform_drop_rates,
)
from lit_accel.models.params import world_size
from lit_accel.models.structure import StructurePatterns, as_patterns
from lit_accel.models.surgery import find_hf_model
from lit_accel.observe.wandb import BarChart, WandbCharts, other_loggers
from lit_accel.settings import settings_from, takes_settings

__all__ = ["MAX_TARGET", "DropBP", "DropBPSettings"]

MAX_TARGET = 0.9
"""Highest allowed ``target``, and the cap of every sublayer's rate (as in the paper)."""

_RATE_STEP = 0.1
# The paper's allocation moves rates in steps of 0.1; finer steps change little and make the greedy slower.


@dataclass
class DropBPSettings:
    """The arguments of :class:`DropBP`, one field each, validated (its docstring says how to choose them).

    Example:
        >>> DropBPSettings(target=0.5, sensitivity="uniform").target
        0.5
    """

    target: float = 0.5
    """Fraction of the sublayers' backward FLOPs to drop, in expectation, in ``[0, 0.9]``."""
    sensitivity: Literal["auto", "uniform"] = "auto"
    """``"auto"``: measure sensitivities once and allocate rates from them; ``"uniform"``: every rate = target."""
    sensitivity_at: int | float = 0.1
    """When to measure: an int is an optimizer step (0 = before the first step); a float in ``[0, 1)`` is a
    fraction of the run's total steps (``trainer.estimated_stepping_batches``)."""
    sensitivity_batches: int = 1
    """Number of training batches (micro-batches) the sensitivities are averaged over (``L + 1`` passes each)."""
    decide_every: Literal["step", "micro_batch"] = "step"
    """Draw a new drop mask every optimizer step (shared by its gradient-accumulation micro-batches) or every
    micro-batch."""
    seed: int = 0
    """Seed of the mask generator (the same on every rank) and of the measurement passes."""
    patterns: StructurePatterns | None = None
    """Module names of a model that :func:`~lit_accel.models.structure.get_structure` does not know (a
    :class:`~lit_accel.models.structure.StructurePatterns` or a dict of its fields); None for a supported Hugging
    Face architecture."""
    log_every_n_steps: int | None = None
    """Interval of the ``dropbp/*`` scalars in optimizer steps; None uses the trainer's."""
    before_measurement: Literal["uniform", "dense"] = "uniform"
    """Rates until the measurement (``sensitivity="auto"``): ``"uniform"`` drops every sublayer at ``target``
    (as the reference code does), ``"dense"`` drops nothing."""
    sampling: Literal["systematic", "independent"] = "systematic"
    """How masks are drawn from the rates; both drop sublayer ``i`` with probability ``rate_i``.
    ``"systematic"`` fixes how many sublayers drop each step, so step time and peak memory stay steady;
    ``"independent"`` is the paper's per-sublayer Bernoulli draw (the count varies, and the peak memory of a
    run follows its unluckiest step). See :func:`~lit_accel.dropbp.functional.draw_mask`."""

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"DropBP {name}={getattr(self, name)!r} is not allowed; {name} must be {allowed}")

        if isinstance(self.target, bool) or not isinstance(self.target, (int, float)):
            raise bad("target", f"a number in [0, {MAX_TARGET}]")
        if not 0.0 <= float(self.target) <= MAX_TARGET:
            raise bad("target", f"in [0, {MAX_TARGET}] (the paper caps every sublayer's rate at {MAX_TARGET})")
        self.target = float(self.target)
        if self.sensitivity not in ("auto", "uniform"):
            raise bad("sensitivity", "'auto' or 'uniform'")
        at = self.sensitivity_at
        if isinstance(at, bool) or not isinstance(at, (int, float)):
            raise bad("sensitivity_at", "an int step >= 0 or a float fraction of the run in [0, 1)")
        if isinstance(at, int) and at < 0:
            raise bad("sensitivity_at", "an int step >= 0 or a float fraction of the run in [0, 1)")
        if isinstance(at, float) and not 0.0 <= at < 1.0:
            raise bad("sensitivity_at", "a float fraction of the run in [0, 1) (or an int step >= 0)")
        if isinstance(self.sensitivity_batches, bool) or not isinstance(self.sensitivity_batches, int):
            raise bad("sensitivity_batches", "an int >= 1")
        if self.sensitivity_batches < 1:
            raise bad("sensitivity_batches", "an int >= 1")
        if self.decide_every not in ("step", "micro_batch"):
            raise bad("decide_every", "'step' or 'micro_batch'")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise bad("seed", "an int")
        if self.log_every_n_steps is not None and (
            isinstance(self.log_every_n_steps, bool)
            or not isinstance(self.log_every_n_steps, int)
            or self.log_every_n_steps < 1
        ):
            raise bad("log_every_n_steps", "an int >= 1 or None")
        if self.before_measurement not in ("uniform", "dense"):
            raise bad("before_measurement", "'uniform' or 'dense'")
        if self.sampling not in ("systematic", "independent"):
            raise bad("sampling", "'systematic' or 'independent'")
        self.patterns = as_patterns(self.patterns, "DropBP")


def _max_over_ranks(value: int, device: torch.device) -> int:
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def _seq_len(batch: Any) -> int | None:
    ids = None
    if isinstance(batch, Mapping):
        ids = batch.get("input_ids")
    elif isinstance(batch, (list, tuple)) and batch:
        ids = batch[0]
    elif isinstance(batch, torch.Tensor):
        ids = batch
    if isinstance(ids, torch.Tensor) and ids.ndim >= 1:
        return int(ids.shape[-1])
    return None


@contextmanager
def _mute_logging(pl_module: L.LightningModule) -> Iterator[None]:
    # The measurement reruns training_step; what it logs would be logged twice (and Lightning rejects the same
    # key from two hooks), so log/log_dict are shadowed by no-ops on the instance for its duration.
    object.__setattr__(pl_module, "log", lambda *a, **k: None)
    object.__setattr__(pl_module, "log_dict", lambda *a, **k: None)
    try:
        yield
    finally:
        for name in ("log", "log_dict"):
            pl_module.__dict__.pop(name, None)


@takes_settings(DropBPSettings)
class DropBP(L.Callback):
    """Drops the backward pass of residual sublayers at per-sublayer rates set from measured sensitivity.

    Each step every sublayer (attention with its pre-norm, MLP with its pre-norm) drops with its rate: it then
    runs its forward without autograd, saving no activations and costing no backward, and its output is added
    to the residual as a constant. The rates start uniform at ``target`` (or 0, ``before_measurement="dense"``);
    at ``sensitivity_at`` the sensitivity of every sublayer is measured and rates are allocated so that the
    expected dropped backward FLOPs reach ``target`` with the least sensitive sublayers dropped most (formulas
    in :mod:`lit_accel.dropbp.functional`).

    Choosing ``sensitivity_at``: for pre-training, after the loss has left its initial plateau (the default,
    10% of the run, as the paper); for fine-tuning a pretrained model the gradients are informative from the
    start, so measure at the first steps (``sensitivity_at=0``). The measurement costs ``L + 1``
    forward/backward passes per batch (``L`` = 2 x blocks); each gradient is reduced to its norm as soon as it is
    computed, so the passes hold no extra set of gradients; it reruns
    ``training_step`` (with logging muted) so it needs automatic optimisation. Its wall time is logged as
    ``dropbp/sensitivity_seconds``.

    Distributed: every rank draws from the same seeded generator, so all ranks drop the same sublayers. Under
    DDP a dropped sublayer's parameters get no gradient in that step, on every rank; ``setup`` therefore sets
    ``find_unused_parameters=True`` on Lightning's ``DDPStrategy`` (before it wraps the model), and DDP leaves
    those gradients None, exactly as on one device (AdamW then skips them). ``static_graph=True`` cannot work
    with a graph that changes per step and is rejected. Sensitivities are averaged over ranks, so every rank
    allocates the same rates. Under DeepSpeed nothing is set (it has no ``find_unused_parameters``): every rank
    drops the same sublayers (the CPU matrix checks it on 2 and 4 ranks, ZeRO-1/2/3), but ZeRO steps flat
    partitions, so a dropped sublayer's parameters get a zero gradient and AdamW still moves them by their momentum
    and weight decay (one device and DDP skip them).

    Logged: the settings once as the run's config (``dropbp/target``, ...: ``log_hyperparams``);
    ``dropbp/dropped_backward_flops_fraction`` (this step),
    ``dropbp/dropped_backward_flops_fraction_mean`` (since the last log), ``dropbp/num_dropped``; after
    allocation a W&B table and bar charts of the per-sublayer rates and sensitivities (other loggers:
    ``dropbp/rate/<i>``, ``dropbp/sensitivity/<i>``).

    Args: see :class:`DropBPSettings`.

    Raises:
        ValueError: At construction, for any argument outside what is allowed (the message names it); at the
            start of fit, when the model's structure cannot be found or ``sensitivity_at`` falls at or after the
            end of the run.

    Example:
        >>> cb = DropBP(target=0.5, sensitivity="uniform")
        >>> cb.settings.sensitivity
        'uniform'
    """

    def __init__(
        self,
        target: float = 0.5,
        sensitivity: Literal["auto", "uniform"] = "auto",
        sensitivity_at: int | float = 0.1,
        sensitivity_batches: int = 1,
        decide_every: Literal["step", "micro_batch"] = "step",
        seed: int = 0,
        patterns: StructurePatterns | None = None,
        log_every_n_steps: int | None = None,
        before_measurement: Literal["uniform", "dense"] = "uniform",
        sampling: Literal["systematic", "independent"] = "systematic",
    ) -> None:
        super().__init__()
        self.settings = settings_from(DropBPSettings, locals())
        self.controller: DropBPController | None = None
        self.generator = torch.Generator().manual_seed(seed)
        self.sensitivity_step: int | None = None
        """Optimizer step at which the measurement runs (resolved at the start of fit)."""
        self.measured = False
        """Whether the sensitivities have been measured and the rates allocated."""
        self.sensitivities: list[float] | None = None
        """Per-sublayer sensitivity, averaged over batches and ranks, once measured."""
        self.allocated_rates: list[float] | None = None
        """Per-sublayer rates from the allocation, once measured."""
        self.allocation_flops: list[float] | None = None
        """Per-sublayer backward FLOPs per token the allocation used."""
        self.sensitivity_seconds = 0.0
        """Wall time spent measuring."""
        self.mask: tuple[bool, ...] | None = None
        """The drop mask in use."""
        self.last_metrics: dict[str, float] = {}
        self._sens_sum: list[float] | None = None
        self._sens_batches = 0
        self._decided_step = -1
        self._zero3_cleared_step = -1
        self._num_sublayers: int | None = None
        self._flops_cache: dict[int, list[float]] = {}
        self._seq_len: int | None = None
        self._trainable: tuple[bool, ...] | None = None
        self._log_fraction_sum = 0.0
        self._run_fraction = (0.0, 0)  # (sum, count) of the dropped backward-FLOPs fractions of this fit
        self._log_count = 0
        self._charts = WandbCharts("DropBP")

    # ------------------------------------------------------------------ rates
    @property
    def num_sublayers(self) -> int:
        """Number of sublayers (known from the start of fit on)."""
        if self._num_sublayers is None:
            raise RuntimeError("DropBP: the model is not known before the start of fit")
        return self._num_sublayers

    @property
    def rates(self) -> list[float]:
        """The per-sublayer drop rates in use now."""
        s = self.settings
        n = self.num_sublayers
        if s.sensitivity == "auto" and self.measured and self.allocated_rates is not None:
            return list(self.allocated_rates)
        if s.sensitivity == "auto" and s.before_measurement == "dense":
            return [0.0] * n
        return uniform_drop_rates(n, s.target, cap=MAX_TARGET)

    def _flops(self, seq_len: int | None) -> list[float]:
        assert self.controller is not None
        structure = self.controller.structure
        length = seq_len or structure.max_position_embeddings or 2048
        if length not in self._flops_cache:
            self._flops_cache[length] = sublayer_backward_flops(structure, length)
        return self._flops_cache[length]

    # ------------------------------------------------------------------ set-up
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = trainer.strategy
        # DeepSpeedStrategy subclasses DDPStrategy but never builds a torch DDP wrapper: nothing to set there.
        if isinstance(strategy, DDPStrategy) and not isinstance(strategy, DeepSpeedStrategy):
            kwargs = getattr(strategy, "_ddp_kwargs", None)
            if not isinstance(kwargs, dict):
                raise RuntimeError(
                    "DropBP needs DDP's find_unused_parameters=True (dropped sublayers get no gradient) but cannot "
                    "set it on this Lightning version; pass strategy=DDPStrategy(find_unused_parameters=True)."
                )
            if kwargs.get("static_graph"):
                raise ValueError(
                    "DropBP changes which parameters get gradients from step to step, which DDP static_graph=True "
                    "cannot handle; use DDPStrategy(find_unused_parameters=True) without static_graph."
                )
            if not kwargs.get("find_unused_parameters"):
                if isinstance(getattr(strategy, "model", None), nn.parallel.DistributedDataParallel):
                    raise RuntimeError(
                        "DropBP: the model is already wrapped by DDP without find_unused_parameters; pass "
                        "strategy=DDPStrategy(find_unused_parameters=True)."
                    )
                # Every rank drops the same sublayers, so such a parameter is unused on all ranks and DDP leaves
                # its grad None, as on one device.
                kwargs["find_unused_parameters"] = True
                rank_zero_info("DropBP: set DDP find_unused_parameters=True (dropped sublayers get no gradient).")
        if self.settings.sensitivity == "auto" and not pl_module.automatic_optimization:
            raise ValueError(
                "DropBP sensitivity='auto' reruns training_step to measure, which needs automatic optimization; "
                "use sensitivity='uniform' with manual optimization."
            )

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = find_hf_model(pl_module)
        if self.controller is not None:
            self.controller.remove()
        self.controller = apply_dropbp(model, self.settings.patterns)
        if trainer.is_global_zero:
            # The settings are constants of the run: its config (W&B run config, hparams.yaml), not a curve.
            for logger in trainer.loggers:
                settings = {f.name: getattr(self.settings, f.name) for f in dataclasses.fields(self.settings)}
                logger.log_hyperparams({f"dropbp/{k}": v for k, v in settings.items() if k != "patterns"})
        self._num_sublayers = self.controller.num_sublayers
        self._trainable = self.controller.trainable
        self._flops_cache.clear()
        s = self.settings
        total = float(trainer.estimated_stepping_batches)
        at = s.sensitivity_at
        if isinstance(at, float):
            if total == float("inf"):
                raise ValueError(
                    f"DropBP sensitivity_at={at} is a fraction of the run, but the run has no finite length; set "
                    "trainer max_steps, or give sensitivity_at as an int step."
                )
            self.sensitivity_step = int(at * total)
        else:
            self.sensitivity_step = int(at)
        if s.sensitivity == "auto" and not self.measured and self.sensitivity_step >= total:
            raise ValueError(
                f"DropBP sensitivity_at={at!r} is step {self.sensitivity_step}, at or after the end of the run "
                f"({int(total)} optimizer steps); use a smaller sensitivity_at, or sensitivity='uniform'."
            )
        rank_zero_info(
            f"DropBP: {self.controller.num_sublayers} sublayers, target {s.target}, sensitivity={s.sensitivity}"
            + (f" measured at step {self.sensitivity_step}" if s.sensitivity == "auto" else "")
        )

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.settings.sensitivity == "uniform":
            self._log_allocation(trainer)

    # ------------------------------------------------------------------ per batch
    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.controller is None:
            return
        s = self.settings
        step = trainer.global_step
        if self._zero3_cleared_step != step:
            self._zero3_cleared_step = step
            _clear_zero3_gradient_partitions(trainer)
        self._seq_len = _seq_len(batch) or self._seq_len
        assert self.sensitivity_step is not None
        # target 0 allocates rate 0 everywhere whatever the sensitivities: skip the L + 1 passes.
        if s.sensitivity == "auto" and not self.measured and s.target > 0 and step >= self.sensitivity_step:
            self._measure(trainer, pl_module, batch, batch_idx)
        if s.decide_every == "step" and self.mask is not None and self._decided_step == step:
            self.controller.set_mask(self.mask)  # a later micro-batch of the same optimizer step
            return
        self.mask = draw_mask(self.rates, self.generator, self.settings.sampling, self._trainable)
        self._decided_step = step
        self.controller.set_mask(self.mask)
        self._log_decision(trainer)

    def _measure(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        assert self.controller is not None
        start = time.perf_counter()
        params = list({id(p): p for p in pl_module.parameters() if p.requires_grad}.values())

        def loss_fn() -> torch.Tensor:
            with _mute_logging(pl_module), trainer.precision_plugin.train_step_context():
                out = pl_module.training_step(batch, batch_idx)
            loss = out.get("loss") if isinstance(out, Mapping) else out
            if not isinstance(loss, torch.Tensor):
                raise RuntimeError(
                    f"DropBP sensitivity='auto' needs training_step to return the loss (a tensor or a dict with "
                    f"'loss'); got {type(out).__name__}. Use sensitivity='uniform' otherwise."
                )
            return loss

        values = measure_sensitivity(self.controller, loss_fn, params, seed=self.settings.seed)
        host = values.double().cpu().tolist()
        self._sens_sum = host if self._sens_sum is None else [a + b for a, b in zip(self._sens_sum, host)]
        self._sens_batches += 1
        self.sensitivity_seconds += time.perf_counter() - start
        if self._sens_batches >= self.settings.sensitivity_batches:
            self._allocate(trainer, pl_module)

    def _allocate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self._sens_sum is not None
        mean = torch.tensor(self._sens_sum, dtype=torch.float64, device=pl_module.device) / self._sens_batches
        self.sensitivities = all_reduce_mean(mean).cpu().tolist()
        # Attention's FLOPs grow with the sequence length: every rank must allocate from the same length, or
        # ranks with shorter batches would draw different masks.
        self._seq_len = _max_over_ranks(self._seq_len or 0, pl_module.device) or None
        self.allocation_flops = list(self._flops(self._seq_len))
        self.allocated_rates = allocate_drop_rates(
            self.sensitivities, self.allocation_flops, self.settings.target, step=_RATE_STEP, cap=MAX_TARGET
        )
        self.measured = True
        self._sens_sum, self._sens_batches = None, 0
        rank_zero_info(
            f"DropBP: measured sensitivities in {self.sensitivity_seconds:.1f} s; rates {self.allocated_rates}"
        )
        self._log_allocation(trainer)

    # ------------------------------------------------------------------ logging
    def _every(self, trainer: L.Trainer) -> int:
        return int(self.settings.log_every_n_steps or getattr(trainer, "log_every_n_steps", None) or 50)

    def _log_decision(self, trainer: L.Trainer) -> None:
        assert self.mask is not None
        fraction = dropped_fraction(self.mask, self._flops(self._seq_len))
        self._log_fraction_sum += fraction
        self._log_count += 1
        self._run_fraction = (self._run_fraction[0] + fraction, self._run_fraction[1] + 1)
        step = trainer.global_step
        if step % self._every(trainer) != 0:
            return
        metrics = {
            "dropbp/dropped_backward_flops_fraction": fraction,
            "dropbp/dropped_backward_flops_fraction_mean": self._log_fraction_sum / self._log_count,
            "dropbp/num_dropped": float(sum(self.mask)),
        }
        if self.measured:
            metrics["dropbp/sensitivity_seconds"] = self.sensitivity_seconds
        self.last_metrics = metrics
        self._log_fraction_sum, self._log_count = 0.0, 0
        if trainer.is_global_zero:
            # Straight to the loggers, as Throughput does: self.log's cadence would drop most decisions.
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    def _log_allocation(self, trainer: L.Trainer) -> None:
        if not trainer.is_global_zero or self.controller is None:
            return
        rates = self.rates
        flops = self._flops(self._seq_len)
        total = sum(flops)
        sens = self.sensitivities
        rows = [
            [
                f"{sub.block_index}.{'attn' if sub.kind == 'attention' else 'mlp'}",
                i,
                sub.name,
                rates[i],
                sens[i] if sens is not None else None,
                flops[i] / total,
            ]
            for i, sub in enumerate(self.controller.sublayers)
        ]
        columns = ["sublayer", "index", "name", "rate", "sensitivity", "backward_flops_share"]
        charts = {"dropbp/rates": BarChart("sublayer", "rate", "DropBP drop rate per sublayer")}
        if sens is not None:
            charts["dropbp/sensitivities"] = BarChart("sublayer", "sensitivity", "DropBP sensitivity per sublayer")
        self._charts.log(trainer, "dropbp/allocation", columns, rows, charts)
        scalars = {f"dropbp/rate/{i}": r for i, r in enumerate(rates)}
        if sens is not None:
            scalars.update({f"dropbp/sensitivity/{i}": float(v) for i, v in enumerate(sens)})
        for logger in other_loggers(trainer):
            logger.log_metrics(scalars, step=trainer.global_step)

    # ------------------------------------------------------------------ end, state
    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.controller is not None:
            self.controller.keep_all()
        total, count = self._run_fraction
        if count:
            how = (
                f"rates allocated at step {self.sensitivity_step} from measured sensitivities"
                if self.measured
                else "uniform rates"
            )
            rank_zero_info(
                f"DropBP: dropped {total / count:.1%} of the sublayers' backward FLOPs on average over {count}"
                f" decisions (target {self.settings.target:.0%}; {how})"
            )

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.controller is not None:
            self.controller.remove()
            self.controller = None

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Lightning's exception path skips teardown: leave no hooks behind (a retry in the same process would
        # keep dropping silently), and turn autograd back on in case the exception left a dropped sublayer's
        # no-grad region open (forward hooks do not run for KeyboardInterrupt).
        self.teardown(trainer, pl_module, "fit")
        torch.set_grad_enabled(True)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "target": self.settings.target,
            "sensitivity": self.settings.sensitivity,
            "measured": self.measured,
            "sensitivities": self.sensitivities,
            "allocated_rates": self.allocated_rates,
            "allocation_flops": self.allocation_flops,
            "sensitivity_seconds": self.sensitivity_seconds,
            "sens_sum": self._sens_sum,
            "sens_batches": self._sens_batches,
            "generator": self.generator.get_state(),
            "mask": list(self.mask) if self.mask is not None else None,
            "decided_step": self._decided_step,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.measured = bool(state_dict.get("measured", False))
        self.sensitivities = state_dict.get("sensitivities")
        self.allocated_rates = state_dict.get("allocated_rates")
        self.allocation_flops = state_dict.get("allocation_flops")
        self.sensitivity_seconds = float(state_dict.get("sensitivity_seconds", 0.0))
        self._sens_sum = state_dict.get("sens_sum")
        self._sens_batches = int(state_dict.get("sens_batches", 0))
        if state_dict.get("generator") is not None:
            self.generator.set_state(state_dict["generator"])
        mask = state_dict.get("mask")
        self.mask = tuple(bool(m) for m in mask) if mask is not None else None
        self._decided_step = int(state_dict.get("decided_step", -1))
        saved_target = state_dict.get("target", self.settings.target)
        if (
            self.measured
            and saved_target != self.settings.target
            and self.sensitivities is not None
            and self.allocation_flops is not None
        ):
            # Resumed with a new target: the measured sensitivities still hold, only the allocation changes.
            rank_zero_info(f"DropBP: target changed from {saved_target} to {self.settings.target}; re-allocating.")
            self.allocated_rates = allocate_drop_rates(
                self.sensitivities, self.allocation_flops, self.settings.target, step=_RATE_STEP, cap=MAX_TARGET
            )


def _clear_zero3_gradient_partitions(trainer: L.Trainer) -> None:
    """Zero DeepSpeed ZeRO-3's flat buffer of gradient partitions at the start of an optimizer step.

    ZeRO-3 overwrites a parameter's slot in that buffer only when the parameter's gradient is reduced, and its
    ``zero_grad`` leaves the buffer alone; a sublayer DropBP dropped produces no gradient, so without this its slot
    would still hold the previous step's gradient and the optimizer would apply it again (found as a resume mismatch
    by the distribution matrix). ZeRO-1/2 and DDP keep no such buffer.
    """
    strategy = trainer.strategy
    if not isinstance(strategy, DeepSpeedStrategy) or not getattr(strategy, "zero_stage_3", False):
        return
    engine = getattr(strategy, "deepspeed_engine", None)
    buffer = getattr(getattr(engine, "optimizer", None), "grad_partitions_flat_buffer", None)
    if isinstance(buffer, torch.Tensor):
        buffer.zero_()
