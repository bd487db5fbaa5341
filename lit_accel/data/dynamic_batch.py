"""The :class:`DynamicBatchLoading` callback: re-weights the domains of a
:class:`~lit_accel.data.domains.MultiDomainDataModule` from each domain's validation loss (Sheared LLaMA, Xia et al.
2023, Alg. 1).

The data module holds the weights, their schedule and the update rule
(:func:`~lit_accel.data.domains.update_domain_weights`); this callback decides *when*: it measures the per-domain
losses every ``update_every`` optimizer steps and, with ``reference_losses="initial"``, the reference losses when
training starts.

Example:
    >>> import lightning as L
    >>> from lit_accel.data import DynamicBatchLoading, MultiDomainDataModule
    >>> dm = MultiDomainDataModule({"net": "stdlib:asyncio,http", "rest": "stdlib:*"}, reference_losses="initial")
    >>> trainer = L.Trainer(callbacks=[DynamicBatchLoading()])  # doctest: +SKIP
    >>> trainer.fit(model, datamodule=dm)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lit_accel.data.domains import MultiDomainDataModule

__all__ = ["DynamicBatchLoading"]


class DynamicBatchLoading(L.Callback):
    """Every ``datamodule.update_every`` optimizer steps, measure each domain's validation loss and update the
    weights of a :class:`MultiDomainDataModule` (dynamic batch loading, Sheared LLaMA).

    The loss is measured here (one pass of ``pl_module(input_ids, labels=input_ids).loss`` over each domain's
    validation loader under ``torch.no_grad()``, summed over ranks with ``trainer.strategy.reduce``) because a
    model's ``validation_step`` logs one aggregated ``val/loss``. Logs ``data/weight/<domain>`` and
    ``data/val_loss/<domain>``. Runs on every rank (the reductions need them all); parameters must be readable
    as-is (not ZeRO-3 partitioned).

    With ``MultiDomainDataModule(reference_losses="initial")`` the reference losses are measured the same way when
    training starts (``on_train_start``, unless a resumed checkpoint holds them), with every callback that has a
    ``bypass(pl_module)`` context manager entered: such a callback (``StructuredPruning``) then leaves the model
    as the source model. They are logged as ``data/reference_loss/<domain>``.

    Example:
        >>> trainer = L.Trainer(callbacks=[DynamicBatchLoading()])  # doctest: +SKIP
    """

    def _dm(self, trainer: L.Trainer) -> MultiDomainDataModule:
        dm = getattr(trainer, "datamodule", None)
        if not isinstance(dm, MultiDomainDataModule):
            raise ValueError(
                f"DynamicBatchLoading needs trainer.fit(..., datamodule=MultiDomainDataModule(...)); got {type(dm)}."
            )
        return dm

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = self._dm(trainer)
        if dm.reference_losses is None and not dm.measure_reference:
            raise ValueError(
                "DynamicBatchLoading needs MultiDomainDataModule(reference_losses=...): a dict, 'initial' (measured "
                "when training starts) or a checkpoint path."
            )

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = self._dm(trainer)
        if dm.reference_losses is not None or not dm.measure_reference:
            return
        with contextlib.ExitStack() as stack:
            for cb in trainer.callbacks:  # type: ignore[attr-defined]
                bypass = getattr(cb, "bypass", None)
                if callable(bypass):
                    stack.enter_context(bypass(pl_module))
            losses = self.domain_losses(trainer, pl_module)
        dm.set_reference_losses(losses)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in losses.items())
        rank_zero_info(f"lit_accel: reference losses (the model as training starts): {shown}")
        for logger in trainer.loggers:
            logger.log_metrics({f"data/reference_loss/{n}": v for n, v in losses.items()}, step=trainer.global_step)

    @torch.no_grad()
    def domain_losses(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Mean next-token loss per domain, over all ranks."""
        was_training = pl_module.training
        pl_module.eval()
        losses = {}
        try:
            for name, loader in self._dm(trainer).domain_val_dataloaders().items():
                total = torch.zeros(2, dtype=torch.float64, device=pl_module.device)
                for batch in loader:
                    ids = batch["input_ids"].to(pl_module.device)
                    loss = pl_module(ids, labels=ids).loss
                    total += torch.stack([loss.double() * len(ids), torch.tensor(float(len(ids)), device=total.device)])
                total = trainer.strategy.reduce(total, reduce_op="sum")
                losses[name] = float(total[0] / total[1].clamp(min=1))
        finally:
            pl_module.train(was_training)
        return losses

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        dm = self._dm(trainer)
        step = trainer.global_step
        if step == 0 or step % dm.update_every or getattr(self, "_last_step", -1) == step:
            return
        self._last_step = step  # with gradient accumulation, several batches end at one global step
        losses = self.domain_losses(trainer, pl_module)
        weights = dm.update(step, losses)
        metrics = {f"data/weight/{n}": w for n, w in weights.items()}
        metrics.update({f"data/val_loss/{n}": v for n, v in losses.items()})
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)
