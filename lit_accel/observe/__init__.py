"""Observability: throughput/MFU/memory callback and Weights & Biases helpers."""

from lit_accel.observe.throughput import PEAK_FLOPS, Throughput, device_peak_flops, model_flops_per_token
from lit_accel.observe.wandb import WandbLogger, wandb_credentials_present

__all__ = [
    "PEAK_FLOPS",
    "Throughput",
    "WandbLogger",
    "device_peak_flops",
    "model_flops_per_token",
    "wandb_credentials_present",
]
