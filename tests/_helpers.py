"""Test-only callbacks, importable by class path from CLI configs (pytest puts tests/ on sys.path)."""

from __future__ import annotations

import lightning as L


class CrashAtStep(L.Callback):
    """Raises at the start of optimizer step ``step``, as a crash would (after the checkpoints before it)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: object, idx: int) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash at step {self.step}")
