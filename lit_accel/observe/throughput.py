"""``Throughput``: tokens/s, step time, model FLOPs utilisation and peak memory of a training run.

Timing syncs the device only at logging steps: the interval between two synchronised points covers all device
work launched in between, so the average step time is exact without stalling every step.

Example:
    >>> import lightning as L
    >>> from lit_accel.observe import Throughput
    >>> trainer = L.Trainer(callbacks=[Throughput(peak_flops=None)])  # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lit_accel.models.flops import flops_per_token
from lit_accel.models.structure import get_structure
from lit_accel.settings import settings_from, takes_settings

__all__ = ["PEAK_FLOPS", "Throughput", "ThroughputSettings", "device_peak_flops", "model_flops_per_token"]

# Dense (non-sparse) tensor-core peaks per device, from the vendors' datasheets (SXM parts where both exist).
# "half" is bf16/fp16 with fp32 accumulation; "tf32" is fp32 matmuls on tensor cores; "fp32" is plain FMA.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H200": {"half": 989e12, "tf32": 494e12, "fp32": 67e12},
    "H100": {"half": 989e12, "tf32": 494e12, "fp32": 67e12},
    "A100": {"half": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "L40S": {"half": 362e12, "tf32": 183e12, "fp32": 91.6e12},
    "A10G": {"half": 125e12, "tf32": 62.5e12, "fp32": 31.2e12},
    "L4": {"half": 121e12, "tf32": 60e12, "fp32": 30.3e12},
    "V100": {"half": 125e12, "tf32": 15.7e12, "fp32": 15.7e12},
}


def device_peak_flops(device: torch.device, precision: str) -> float | None:
    """Looks up the peak FLOP/s of ``device`` for a Lightning ``precision`` string; ``None`` if unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    kind = "half" if ("bf16" in precision or "16" in precision) else "fp32"
    if kind == "fp32" and torch.backends.cuda.matmul.allow_tf32:
        kind = "tf32"
    for key, table in PEAK_FLOPS.items():
        if key in name:
            return table[kind]
    return None


def model_flops_per_token(module: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token of the Hugging Face model inside ``module`` (PaLM's 6N + attention formula)."""
    model = getattr(module, "model", module)
    return float(flops_per_token(get_structure(model), seq_len, training=True))


@dataclass
class ThroughputSettings:
    """The arguments of :class:`Throughput`, one field each, validated.

    Example:
        >>> ThroughputSettings(peak_flops=989e12).peak_flops
        989000000000000.0
    """

    peak_flops: float | None = None
    """Peak FLOP/s of one device for MFU; None looks it up from :data:`PEAK_FLOPS` by device name and trainer
    precision (e.g. 989e12 for an H100 in bf16). On CPU, MFU is logged only if given."""
    flops_per_token: float | None = None
    """Training FLOPs per token; None computes it from the model's shapes (6N plus the attention term at the
    batch's sequence length)."""
    log_every_n_steps: int | None = None
    """Logging interval in optimizer steps; None uses the trainer's."""
    verbose: bool = False
    """Also print one line per logging interval (rank zero), for runs without a dashboard."""

    def __post_init__(self) -> None:
        for name, what in (("peak_flops", "FLOP/s"), ("flops_per_token", "FLOPs")):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"Throughput {name} must be > 0 {what} or None; got {value!r}.")
            setattr(self, name, float(value))
        n = self.log_every_n_steps
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"Throughput log_every_n_steps must be >= 1 or None; got {n!r}.")
        if not isinstance(self.verbose, bool):
            raise ValueError(f"Throughput verbose must be true or false; got {self.verbose!r}.")


@takes_settings(ThroughputSettings)
class Throughput(L.Callback):
    """Logs ``throughput/*``: tokens/s (global and per device), step time, TFLOP/s, MFU and peak memory.

    Args: see :class:`ThroughputSettings`.

    Example:
        >>> Throughput(log_every_n_steps=10).settings.log_every_n_steps
        10
    """

    def __init__(
        self,
        peak_flops: float | None = None,
        flops_per_token: float | None = None,
        log_every_n_steps: int | None = None,
        verbose: bool = False,
    ) -> None:
        super().__init__()
        self.settings = settings_from(ThroughputSettings, locals())
        self.resolved_peak_flops: float | None = None
        """The peak FLOP/s in use (the argument, or looked up at the start of each fit)."""
        self.resolved_flops_per_token: float | None = None
        """The FLOPs per token in use (the argument, or computed from the model at the first batch of a fit)."""
        self._t0: float | None = None
        self._tokens = 0
        self._steps = 0
        self._last_step = -1
        self._warned = False
        self.last_metrics: dict[str, float] = {}

    def _sync(self, device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def _restart(self, pl_module: L.LightningModule) -> None:
        self._sync(pl_module.device)
        self._t0 = time.perf_counter()
        self._tokens = 0
        self._steps = 0
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Derived values are recomputed every fit (never restored): the device, precision or sequence length
        # may differ from the run that wrote a checkpoint.
        s = self.settings
        self.resolved_peak_flops = s.peak_flops or device_peak_flops(pl_module.device, str(trainer.precision))
        self.resolved_flops_per_token = s.flops_per_token
        self._last_step = trainer.global_step
        self._restart(pl_module)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        ids = batch["input_ids"] if isinstance(batch, dict) else batch[0]
        self._tokens += int(ids.numel())
        if self.resolved_flops_per_token is None and not self._warned:
            try:
                self.resolved_flops_per_token = model_flops_per_token(pl_module, int(ids.shape[-1]))
            except (ValueError, AttributeError) as err:
                if not self._warned:
                    rank_zero_warn(f"Throughput: no FLOPs per token for this model ({err}); pass flops_per_token.")
                    self._warned = True
        if trainer.global_step == self._last_step:
            return  # still accumulating gradients for this optimizer step
        self._steps += trainer.global_step - self._last_step
        self._last_step = trainer.global_step
        every = int(self.settings.log_every_n_steps or getattr(trainer, "log_every_n_steps", None) or 50)
        if trainer.global_step % every != 0 or self._t0 is None or self._steps == 0:
            return
        self._sync(pl_module.device)
        elapsed = time.perf_counter() - self._t0
        world = trainer.world_size
        tokens_per_sec_device = self._tokens / elapsed
        metrics = {
            "throughput/step_time_ms": 1000.0 * elapsed / self._steps,
            "throughput/tokens_per_sec": tokens_per_sec_device * world,
            "throughput/tokens_per_sec_per_device": tokens_per_sec_device,
        }
        if self.resolved_flops_per_token is not None:
            achieved = tokens_per_sec_device * self.resolved_flops_per_token
            metrics["throughput/tflops_per_device"] = achieved / 1e12
            if self.resolved_peak_flops:
                metrics["throughput/mfu"] = achieved / self.resolved_peak_flops
        if pl_module.device.type == "cuda":
            metrics["throughput/peak_memory_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
            metrics["throughput/peak_reserved_gib"] = torch.cuda.max_memory_reserved(pl_module.device) / 2**30
        self.last_metrics = metrics
        if trainer.is_global_zero:
            # Straight to the loggers: Lightning's own cadence would drop values computed between its log steps.
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
            if self.settings.verbose:
                line = ", ".join(f"{k.split('/')[1]} {v:.4g}" for k, v in metrics.items())
                rank_zero_info(f"step {trainer.global_step}: {line}")
        self._restart(pl_module)

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Validation inside fit is not training time: restart the interval after it.
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._restart(pl_module)
