"""Quality per unit of compute: validation-loss curves against training wall-clock and tokens, and what they say.

A comparison trains a baseline (dense) and variants (a technique, or a schedule of one) on the same data and
schedule shape, each from the same seed, several seeds. :class:`ValCurve` records, at every validation, the training
seconds (the clock stops while validating), the optimizer step, the tokens trained and the validation loss.
:func:`summarize` turns the curves of all seeds into one row per variant:

- **loss at equal wall-clock**: each run's validation loss at the seed's common time (the shortest run's end),
  interpolated linearly between its validation points, and its difference from the baseline's at that time (a
  longer run is read mid-schedule, before its learning rate has decayed: this figure favours the shorter run);
- **time to target**: the training seconds at which the run's validation loss first reaches the target (default:
  the baseline's final loss of that seed), interpolated between the validation points that bracket it, as a
  fraction of the baseline's own time to it; not reached when the run ends above it;
- both as the mean over seeds with the spread (min .. max).

Budgets: a variant trains either the baseline's steps (``"steps"``: the same tokens) or about the baseline's
wall-clock (``"time"``: its steps scaled by the measured step-time ratio, :func:`steps_for_time`), so a technique
that makes steps cheaper gets more of them, as a user with a fixed budget would.

Example:
    >>> a = [Point(10.0, 100, 1000, 3.0), Point(20.0, 200, 2000, 2.0)]
    >>> loss_at(a, 15.0), time_to(a, 2.5)
    (2.5, 15.0)
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning as L

from benchmarks.harness import _sync

__all__ = [
    "Curve",
    "Point",
    "ValCurve",
    "loss_at",
    "overlay_chart",
    "spread",
    "steps_for_time",
    "summarize",
    "time_to",
]


@dataclass(frozen=True)
class Point:
    """One validation: training seconds so far, optimizer steps, tokens trained, validation loss."""

    seconds: float
    step: int
    tokens: int
    loss: float


@dataclass
class Curve:
    """One run of a comparison: its variant, seed and validation points (in time order)."""

    variant: str
    seed: int
    points: list[Point] = field(default_factory=list)

    @property
    def end(self) -> Point:
        return self.points[-1]


class ValCurve(L.Callback):
    """Records a :class:`Point` at every validation of a fit; the clock stops while validating.

    Args:
        tokens_per_step: Tokens one optimizer step trains (micro-batch x sequence x accumulation x ranks).
        start: Where this fit continues a curve (a second phase: pruning, then continued training): its seconds,
            steps and tokens are added to this fit's own.
        loggers_key: Prefix of the scalars logged to the trainer's loggers at every validation
            (``<key>/val_loss``, ``<key>/train_seconds``, ``<key>/tokens``); W&B plots the first against the
            second (``define_metric``), so runs of one group overlay on a wall-clock axis.
    """

    def __init__(self, tokens_per_step: int, start: Point | None = None, loggers_key: str = "quality") -> None:
        self.tokens_per_step = tokens_per_step
        self.start = start or Point(0.0, 0, 0, float("nan"))
        self.key = loggers_key
        self.points: list[Point] = []
        self.train_seconds = 0.0
        self._t0 = 0.0
        self._paused = 0.0
        self._vstart = 0.0
        self._training = False

    def _now(self) -> float:
        return time.perf_counter() - self._t0 - self._paused

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _sync(pl_module.device)
        self._t0, self._paused, self._training = time.perf_counter(), 0.0, True
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            define = getattr(experiment, "define_metric", None)
            if callable(define):  # a W&B run: val loss and tokens plotted against the wall-clock
                define(f"{self.key}/train_seconds")
                define(f"{self.key}/*", step_metric=f"{self.key}/train_seconds")

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._training:
            _sync(pl_module.device)
            self._vstart = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._training or trainer.sanity_checking:
            return
        _sync(pl_module.device)
        self._paused += time.perf_counter() - self._vstart
        self.add(trainer, float(trainer.callback_metrics["val/loss"]), self._now())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _sync(pl_module.device)
        self.train_seconds = self._now()
        self._training = False

    def add(self, trainer: L.Trainer, loss: float, seconds: float) -> Point:
        """Appends (and logs) the point of ``loss`` after ``seconds`` of this fit's training."""
        step = int(trainer.global_step)
        s = self.start
        point = Point(s.seconds + seconds, s.step + step, s.tokens + step * self.tokens_per_step, loss)
        self.points.append(point)
        metrics = {
            f"{self.key}/val_loss": point.loss,
            f"{self.key}/train_seconds": point.seconds,
            f"{self.key}/tokens": float(point.tokens),
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=point.step)
        return point


def loss_at(points: Sequence[Point], seconds: float) -> float:
    """The validation loss at ``seconds``, linear between the points that bracket it; NaN outside the curve."""
    if not points or seconds > points[-1].seconds + 1e-9 or seconds < points[0].seconds - 1e-9:
        return math.nan
    for lo, hi in itertools.pairwise(points):
        if lo.seconds <= seconds <= hi.seconds:
            width = hi.seconds - lo.seconds
            return lo.loss if width <= 0 else lo.loss + (hi.loss - lo.loss) * (seconds - lo.seconds) / width
    return points[-1].loss


def time_to(points: Sequence[Point], target: float, axis: Callable[[Point], float] = lambda p: p.seconds) -> float:
    """The first ``axis`` value (seconds; or tokens, steps) at which the loss reaches ``target``, linear between
    the two points that bracket the crossing; the first point's when it starts at or below; NaN if never."""
    if not points:
        return math.nan
    if points[0].loss <= target:
        return axis(points[0])
    for lo, hi in itertools.pairwise(points):
        if hi.loss <= target:
            frac = (lo.loss - target) / (lo.loss - hi.loss)
            return axis(lo) + frac * (axis(hi) - axis(lo))
    return math.nan


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, min, max) of the finite values; NaNs when none is."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan, math.nan
    return statistics.fmean(finite), min(finite), max(finite)


def steps_for_time(baseline_steps: int, time_ratio: float, multiple: int = 1) -> int:
    """The steps a variant whose step takes ``time_ratio`` x the baseline's trains in the baseline's wall-clock,
    rounded to a multiple of ``multiple`` (the validation interval) and at least one multiple."""
    if not (math.isfinite(time_ratio) and time_ratio > 0):
        raise ValueError(f"time_ratio={time_ratio!r} must be a positive finite number")
    steps = baseline_steps / time_ratio
    return max(multiple, round(steps / multiple) * multiple)


def summarize(curves: Sequence[Curve], baseline: str, target: float | None = None) -> list[dict[str, Any]]:
    """One row per variant (the baseline first): final loss, loss at equal wall-clock and time to target, each as
    the mean over seeds (NaN where no seed has it) with ``"min..max"`` beside it; ``target`` None = each seed's
    baseline final loss.

    Example:
        >>> dense = Curve("dense", 0, [Point(10.0, 100, 1000, 3.0), Point(20.0, 200, 2000, 2.0)])
        >>> fast = Curve("fast", 0, [Point(5.0, 100, 1000, 3.0), Point(15.0, 300, 3000, 1.8)])
        >>> row = summarize([dense, fast], "dense")[1]
        >>> round(row["time to target vs baseline"], 3), row["reached target"]
        (0.667, '1/1')

    Raises:
        ValueError: When a seed has no baseline curve.
    """
    by_seed: dict[int, dict[str, Curve]] = {}
    for c in curves:
        by_seed.setdefault(c.seed, {})[c.variant] = c
    for seed, runs in by_seed.items():
        if baseline not in runs:
            raise ValueError(f"seed {seed} has no {baseline!r} curve; variants: {sorted(runs)}")
    variants = [baseline, *sorted({c.variant for c in curves} - {baseline}, key=[c.variant for c in curves].index)]
    rows = []
    for v in variants:
        final, at_eq, minus, t_frac, tok_frac, secs, steps, reached, n = [], [], [], [], [], [], [], 0, 0
        for runs in by_seed.values():
            if v not in runs:
                continue
            n += 1
            base, run = runs[baseline], runs[v]
            t_eq = min(r.end.seconds for r in runs.values())
            goal = base.end.loss if target is None else target
            final.append(run.end.loss)
            secs.append(run.end.seconds)
            steps.append(run.end.step)
            at_eq.append(loss_at(run.points, t_eq))
            minus.append(loss_at(run.points, t_eq) - loss_at(base.points, t_eq))
            t_run, t_base = time_to(run.points, goal), time_to(base.points, goal)
            tokens_run = time_to(run.points, goal, lambda p: float(p.tokens))
            tokens_base = time_to(base.points, goal, lambda p: float(p.tokens))
            reached += math.isfinite(t_run)
            t_frac.append(t_run / t_base if math.isfinite(t_base) and t_base > 0 else math.nan)
            tok_frac.append(tokens_run / tokens_base if math.isfinite(tokens_base) and tokens_base > 0 else math.nan)
        row: dict[str, Any] = {"variant": v, "seeds": n, "steps": spread(steps)[0], "train seconds": spread(secs)[0]}
        for name, values in (
            ("final val loss", final),
            ("val loss at equal time", at_eq),
            ("minus baseline at equal time", minus),
            ("time to target vs baseline", t_frac),
            ("tokens to target vs baseline", tok_frac),
        ):
            mean, lo, hi = spread(values)
            row[name] = mean
            row[f"{name} (min..max)"] = "-" if math.isnan(mean) else f"{lo:.3f}..{hi:.3f}"
        row["reached target"] = f"{reached}/{n}"
        rows.append(row)
    return rows


def overlay_chart(curves: Sequence[Curve], title: str) -> Any:
    """A W&B line-series chart of every curve's validation loss against training seconds (one line per run), for a
    comparison's summary run; needs ``wandb``."""
    import wandb  # deferred: the quality suite runs without W&B unless asked to log there

    keys = [f"{c.variant} / seed {c.seed}" for c in curves]
    return wandb.plot.line_series(
        xs=[[p.seconds for p in c.points] for c in curves],
        ys=[[p.loss for p in c.points] for c in curves],
        keys=keys,
        title=title,
        xname="training seconds",
    )
