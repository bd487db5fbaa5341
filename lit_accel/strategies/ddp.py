"""``lit_ddp``: Lightning's ``DDPStrategy`` with defaults measured faster for LLM training.

Two settings, neither of which changes what is computed (each gradient element is still the mean over the ranks;
with more than two ranks the bucket boundaries may change the all-reduce's summation order, so the last bit may
differ, as between any two DDP bucket settings):

- ``gradient_as_bucket_view=True``: parameters' ``.grad`` are views into DDP's communication buckets, so the backward
  writes gradients straight into the buckets (no copy of every gradient into a bucket and back) and the gradient
  memory is not held twice.
- ``bucket_cap_mb=100`` (PyTorch's default is 25): a quarter as many all-reduce calls, each large enough to run at
  NVLink bandwidth, still overlapping the backward.

Measured on two GPUs with ``python -m benchmarks run scaling`` (llama-125m): a higher weak-scaling efficiency than
plain ``ddp`` (``benchmarks/RESULTS.md``, "scaling"). Every ``DDPStrategy`` argument can still be given, and wins over
these defaults.

Example:
    >>> from lightning.pytorch.strategies import StrategyRegistry
    >>> import lit_accel.strategies
    >>> StrategyRegistry["lit_ddp"]["init_params"]
    {'gradient_as_bucket_view': True, 'bucket_cap_mb': 100}
    >>> # L.Trainer(strategy="lit_ddp", devices=8) or, with an override,
    >>> # L.Trainer(strategy=resolve_strategy("lit_ddp", bucket_cap_mb=200), devices=8)
"""

from __future__ import annotations

from typing import Any

from lightning.fabric.strategies import _StrategyRegistry
from lightning.pytorch.strategies import DDPStrategy

__all__ = ["LIT_DDP_STRATEGIES", "register_ddp_strategies"]

LIT_DDP_STRATEGIES: dict[str, tuple[str, dict[str, Any]]] = {
    "lit_ddp": (
        "DDP with lit_accel's LLM defaults (gradient_as_bucket_view, 100 MB buckets)",
        {"gradient_as_bucket_view": True, "bucket_cap_mb": 100},
    ),
}
"""Registered name -> (description, ``DDPStrategy`` arguments)."""


def register_ddp_strategies(strategy_registry: _StrategyRegistry) -> None:
    """Registers ``lit_ddp`` as a ``DDPStrategy`` with :data:`LIT_DDP_STRATEGIES`' arguments (idempotent)."""
    for name, (description, init_params) in LIT_DDP_STRATEGIES.items():
        strategy_registry.register(name, DDPStrategy, description=description, override=True, **init_params)
