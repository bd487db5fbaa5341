"""Observability: throughput/MFU/memory callback and Weights & Biases helpers (logger, tables, charts)."""

from lit_accel.observe.progress import ParamsSummary, StepProgressBar
from lit_accel.observe.throughput import (
    PEAK_FLOPS,
    Throughput,
    ThroughputSettings,
    device_peak_flops,
    model_flops_per_token,
)
from lit_accel.observe.wandb import (
    BarChart,
    LineChart,
    WandbCharts,
    WandbLogger,
    other_loggers,
    wandb_credentials_present,
    wandb_loggers,
)

__all__ = [
    "PEAK_FLOPS",
    "BarChart",
    "LineChart",
    "ParamsSummary",
    "StepProgressBar",
    "Throughput",
    "ThroughputSettings",
    "WandbCharts",
    "WandbLogger",
    "device_peak_flops",
    "model_flops_per_token",
    "other_loggers",
    "wandb_credentials_present",
    "wandb_loggers",
]
