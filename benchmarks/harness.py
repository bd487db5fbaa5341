"""Benchmark harness: warm-up, CUDA-event timing, medians of repeats, peak memory, and RESULTS.md rows.

Every benchmark compares against a baseline measured in the same process on the same device, and appends a
section to a results file with the device, date, library versions and the exact command.
"""

from __future__ import annotations

import datetime as _dt
import platform
import shlex
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["Measurement", "environment", "measure", "write_results"]


@dataclass
class Measurement:
    """Timing of one variant: per-iteration times of each repeat (ms) and peak memory (GiB)."""

    name: str
    times_ms: list[float] = field(default_factory=list)
    peak_gib: float = float("nan")
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def spread_ms(self) -> float:
        return max(self.times_ms) - min(self.times_ms) if self.times_ms else float("nan")


def measure(
    name: str,
    step: Callable[[], object],
    warmup: int = 3,
    iters: int = 10,
    repeats: int = 3,
    device: torch.device | None = None,
) -> Measurement:
    """Times ``step`` on the GPU: ``warmup`` calls, then ``repeats`` windows of ``iters`` calls each.

    Each window is bracketed by CUDA events, so the per-call time is the window's device time over ``iters``
    (launch gaps included, as a training loop sees them). Peak memory is the maximum allocated over all windows.
    """
    device = device or torch.device("cuda")
    for _ in range(warmup):
        step()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = Measurement(name)
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            step()
        end.record()
        torch.cuda.synchronize(device)
        result.times_ms.append(start.elapsed_time(end) / iters)
    result.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def environment() -> dict[str, str]:
    """Device, date and versions for a results header."""
    import lightning
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "n/a"
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return {
        "device": dev,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "triton": triton_version,
        "lightning": lightning.__version__,
        "transformers": transformers.__version__,
    }


def write_results(
    title: str, header: Sequence[str], rows: Sequence[Sequence[object]], path: str | Path, notes: str = ""
) -> str:
    """Appends a markdown section (environment, command, table, notes) to ``path`` and returns it."""
    env = environment()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    lines = [
        f"## {title}",
        "",
        f"- device: {env['device']}; date: {env['date']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in env.items() if k not in ("device", "date")),
        f"- command: `{command}`",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(" --- " for _ in header) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(c) for c in row) + " |")
    if notes:
        lines += ["", notes]
    text = "\n".join(lines) + "\n\n"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(text)
    return text


def _fmt(cell: object) -> str:
    if isinstance(cell, float):
        return f"{cell:.3g}" if abs(cell) < 100 else f"{cell:.1f}"
    return str(cell)
