"""Benchmark harness: timing windows, interleaved variants, and records.

A suite (``benchmarks/suites/<name>.py``) has one function, ``run(ctx: Context) -> None``. It builds each variant,
checks that the variants compute the same thing where they should, times them, and adds rows to a
:class:`Table` (``ctx.table(...)``). Every row is written at once as one JSON line of ``<records>/<suite>.jsonl``
(the record: result, row, device, versions, git commit, exact command, date, smoke or not), so a run that dies
half-way keeps what it measured. ``python -m benchmarks render`` turns the newest run of each result into
``benchmarks/RESULTS.md`` and the README's results table.

Timing: :func:`measure` runs warm-up calls (not timed), then ``windows`` windows of ``iters`` calls; a window is
bracketed by CUDA events on a GPU (device time, launch gaps included, as a training loop sees them) and by
``time.perf_counter`` on a CPU. :func:`measure_interleaved` times several variants window by window, rotating
their order each round, so a drift of the clock or of the machine's load falls on all of them alike.

Example:
    >>> import torch
    >>> m = measure("add", lambda: torch.ones(8) + 1, warmup=1, iters=2, windows=5, device=torch.device("cpu"))
    >>> len(m.times_ms), m.median_ms > 0
    (5, True)
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "MIN_WINDOWS",
    "Context",
    "Measurement",
    "Table",
    "cpu_device",
    "environment",
    "free_memory",
    "git_commit",
    "measure",
    "measure_interleaved",
]

MIN_WINDOWS = 5
"""Every timed figure is the median of at least this many windows; the spread (max - min) is recorded with it."""

REPO = Path(__file__).resolve().parent.parent
_WRITE_LOCK = threading.Lock()  # a suite may write from a thread (CPU jobs beside its GPU runs)


@dataclass
class Measurement:
    """Timing of one variant: the per-call time of each window (ms) and peak memory (GiB; NaN on a CPU)."""

    name: str
    times_ms: list[float] = field(default_factory=list)
    peak_gib: float = float("nan")
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms) if self.times_ms else float("nan")

    @property
    def spread_ms(self) -> float:
        return max(self.times_ms) - min(self.times_ms) if self.times_ms else float("nan")

    def fields(self, prefix: str = "") -> dict[str, float | int]:
        """``{median ms, spread ms, windows, peak GiB}``, named with ``prefix``, for a table row."""
        return {
            f"{prefix}median ms": self.median_ms,
            f"{prefix}spread ms": self.spread_ms,
            f"{prefix}windows": len(self.times_ms),
            f"{prefix}peak GiB": self.peak_gib,
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Window:
    # One timed window: CUDA events on a GPU (device time), the wall clock on a CPU.
    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            self.start_event = torch.cuda.Event(enable_timing=True)
            self.end_event = torch.cuda.Event(enable_timing=True)
            self.start_event.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> float:
        """Milliseconds since the window opened."""
        if self.device.type == "cuda":
            self.end_event.record()
            torch.cuda.synchronize(self.device)
            return float(self.start_event.elapsed_time(self.end_event))
        return (time.perf_counter() - self.t0) * 1e3


def free_memory() -> None:
    """Collects garbage and returns cached CUDA blocks, so the next variant starts from the same allocator state."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def measure(
    name: str,
    step: Callable[[], object],
    warmup: int = 3,
    iters: int = 10,
    windows: int = MIN_WINDOWS,
    device: torch.device | None = None,
) -> Measurement:
    """Times ``step``: ``warmup`` untimed calls, then ``windows`` windows of ``iters`` calls each.

    Args:
        name: The variant's name.
        step: One call of the thing timed.
        warmup: Untimed calls first (compilation, autotuning, allocator warm-up).
        iters: Calls per window; the window's time over ``iters`` is one sample.
        windows: Samples (>= :data:`MIN_WINDOWS` for a figure that is reported).
        device: Where ``step`` runs; CUDA if available, else the CPU.
    """
    device = device or (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    for _ in range(warmup):
        step()
    _sync(device)
    _reset_peak(device)
    result = Measurement(name)
    for _ in range(windows):
        window = _Window(device)
        for _ in range(iters):
            step()
        result.times_ms.append(window.stop() / iters)
    result.peak_gib = _peak_gib(device)
    return result


def measure_interleaved(
    steps: Mapping[str, Callable[[], object]],
    warmup: int = 3,
    iters: int = 10,
    windows: int = MIN_WINDOWS,
    device: torch.device | None = None,
) -> dict[str, Measurement]:
    """Times several variants window by window: round ``w`` times each once, in an order rotated by ``w``.

    Peak memory is each variant's own: the peak statistic is reset before each of its windows.

    Returns:
        ``{name: Measurement}`` in the order of ``steps``.
    """
    device = device or (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    _sync(device)
    results = {name: Measurement(name) for name in names}
    peaks = {name: 0.0 for name in names}
    for w in range(windows):
        order = names[w % len(names) :] + names[: w % len(names)]
        if w % 2:
            order.reverse()
        for name in order:
            _sync(device)
            _reset_peak(device)
            window = _Window(device)
            for _ in range(iters):
                steps[name]()
            results[name].times_ms.append(window.stop() / iters)
            peaks[name] = max(peaks[name], _peak_gib(device)) if device.type == "cuda" else float("nan")
    for name in names:
        results[name].peak_gib = peaks[name]
    return results


def git_commit() -> str:
    """The checkout's commit (12 hex digits), with ``+dirty`` when tracked files differ from it; ``unknown``
    outside a git checkout (e.g. a copy on another machine: set ``LIT_ACCEL_COMMIT`` there)."""
    if os.environ.get("LIT_ACCEL_COMMIT"):
        return os.environ["LIT_ACCEL_COMMIT"]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def environment() -> dict[str, Any]:
    """Device and library versions of this process, for every record."""
    import lightning
    import transformers

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "lightning": lightning.__version__,
        "transformers": transformers.__version__,
    }
    for name in ("triton", "deepspeed", "peft", "liger_kernel"):
        try:
            module = __import__(name)
            versions[name] = str(getattr(module, "__version__", "?"))
        except Exception:  # absent, or failing to import on this machine (deepspeed without its accelerator)
            continue
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        device = torch.cuda.get_device_name() + (f" x{count}" if count > 1 else "")
    else:
        device = cpu_device()
    return {"device": device, "versions": versions}


def cpu_device() -> str:
    """This machine's CPU as records name it (also for CPU runs beside a GPU on the same machine)."""
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"


class Table:
    """One result's rows; :meth:`add` writes each row as a record at once."""

    def __init__(self, ctx: Context, result: str, title: str, notes: str = "", device: str | None = None) -> None:
        self.ctx, self.result, self.title, self.notes = ctx, result, title, notes
        self.device = device

    def add(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """Writes ``row`` (column name -> value, in display order) as one record; returns the record."""
        record = {
            "suite": self.ctx.suite,
            "result": self.result,
            "title": self.title,
            "row": dict(row),
            "notes": self.notes,
            **self.ctx.stamp,
            **({"device": self.device} if self.device else {}),
        }
        self.ctx.write(record)
        print(f"[{self.ctx.suite}/{self.result}] " + ", ".join(f"{k}={_short(v)}" for k, v in row.items()), flush=True)
        return record


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class Context:
    """What a suite's ``run`` gets: the device, whether this is a smoke run, and where records go.

    Args:
        suite: The suite's name.
        smoke: Tiny sizes, any device (CPU in CI): proves the suite builds, checks and times; its records are
            kept apart and never rendered.
        records: The folder of ``<suite>.jsonl`` files.
        run_id: Shared by every record of one ``python -m benchmarks run`` invocation.
        command: The exact command that produced the records.
        only: The results to run (``None``: all of the suite's); a whole suite may outlast a time limit.
        models: The model presets to run where a result measures several (``None``: all).
        jobs: How many independent CPU jobs a suite may run at once (each on its own cores), where it has any.
        wandb: ``"offline"`` or ``"online"``: suites that can (quality) also log their curves to W&B; None: no W&B.
    """

    def __init__(
        self,
        suite: str,
        smoke: bool,
        records: Path,
        run_id: str,
        command: str | None = None,
        only: set[str] | None = None,
        models: set[str] | None = None,
        jobs: int = 1,
        wandb: str | None = None,
    ) -> None:
        self.suite, self.smoke, self.records, self.run_id = suite, smoke, Path(records), run_id
        self.only, self.models, self.jobs, self.wandb = only, models, jobs, wandb
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self.command = command or "python " + " ".join(shlex.quote(a) for a in sys.argv)
        env = environment()
        self.stamp: dict[str, Any] = {
            "run": run_id,
            "device": env["device"],
            "versions": env["versions"],
            "commit": git_commit(),
            "command": self.command,
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "smoke": smoke,
        }

    @property
    def windows(self) -> int:
        """Windows per timed figure: :data:`MIN_WINDOWS` (also in smoke runs, at one call per window)."""
        return MIN_WINDOWS

    def wants(self, result: str) -> bool:
        """Whether this run measures ``result`` (``run SUITE/RESULT`` picks some)."""
        return self.only is None or result in self.only

    def wants_model(self, preset: str) -> bool:
        """Whether this run measures the model ``preset`` (``run --models`` picks some)."""
        return self.models is None or preset in self.models

    def table(self, result: str, title: str, notes: str = "", device: str | None = None) -> Table:
        """A result's table; ``result`` is its stable id (``"train_step"``), ``title`` its heading; ``device``
        overrides the records' device (CPU jobs run beside a GPU)."""
        return Table(self, result, title, notes, device)

    @staticmethod
    def cpu_device() -> str:
        """This machine's CPU, as records name it."""
        return cpu_device()

    def write(self, record: Mapping[str, Any]) -> None:
        """Appends ``record`` to ``<records>/<suite>.jsonl`` (NaN, e.g. a CPU's peak memory, as null)."""
        self.records.mkdir(parents=True, exist_ok=True)
        with _WRITE_LOCK, open(self.records / f"{self.suite}.jsonl", "a") as f:
            f.write(json.dumps(_finite(record), allow_nan=False) + "\n")
            f.flush()


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
