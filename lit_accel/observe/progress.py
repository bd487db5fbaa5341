"""Console: ``StepProgressBar`` (Lightning's rich progress bar, labelled by optimizer step and showing tokens/s) and
``ParamsSummary`` (the model summary without a FLOPs column that only reads 0).

Step-based runs (``max_steps`` set) have no last epoch, so Lightning's bar reads ``Epoch 0/-2``; this one reads
``step 120/200`` and adds the :class:`~lit_accel.observe.Throughput` callback's tokens/s to the bar's metrics, without
the logger version (``v_num``) that says nothing during training. The ``lit-accel`` command uses it by default.

Example:
    >>> import lightning as L
    >>> trainer = L.Trainer(max_steps=200, callbacks=[StepProgressBar()])  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichModelSummary, RichProgressBar
from lightning.pytorch.utilities.model_summary import get_human_readable_count
from rich import get_console
from rich.table import Table
from typing_extensions import override

from lit_accel.observe.throughput import Throughput

__all__ = ["ParamsSummary", "StepProgressBar"]


class StepProgressBar(RichProgressBar):
    """A ``RichProgressBar`` that counts optimizer steps when the run is step-based and shows tokens/s."""

    @override
    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        if trainer.max_steps is not None and trainer.max_steps > 0:
            text = f"step {trainer.global_step}/{trainer.max_steps}"
            return f"{text:{len(self.validation_description)}}"
        return super()._get_train_description(current_epoch)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # Lightning sets the description once an epoch and counts batches of the epoch against the epoch's length
        # (which reads "56/5" when the loader's length and the step budget disagree); a step-based run's bar
        # counts optimizer steps against max_steps, across epochs and resumes.
        if self.progress is not None and self.train_progress_bar_id is not None and trainer.max_steps > 0:
            self.progress.update(
                self.train_progress_bar_id,
                description=self._get_train_description(trainer.current_epoch),
                completed=trainer.global_step,
                total=trainer.max_steps,
            )
            self.refresh()

    @override
    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = dict(super().get_metrics(trainer, pl_module))
        metrics.pop("v_num", None)
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(callback, Throughput) and callback.last_metrics:
                rate = callback.last_metrics.get("throughput/tokens_per_sec")
                if rate is not None:
                    metrics["tok/s"] = f"{rate:,.0f}"
        return metrics


class ParamsSummary(RichModelSummary):
    """Lightning's rich model summary, leaving out the FLOPs column and total when they were not measured.

    Lightning measures FLOPs only with an ``example_input_array``; without one (any causal LM module) the column
    reads 0 for every layer. Training FLOPs per token are what :class:`~lit_accel.observe.Throughput` reports.
    """

    @staticmethod
    @override
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        if total_flops:
            RichModelSummary.summarize(
                summary_data,
                total_parameters,
                trainable_parameters,
                model_size,
                total_training_modes,
                total_flops,
                **summarize_kwargs,
            )
            return
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        kept = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table.add_column(" ", style="dim")
        for name, _ in kept[1:]:
            table.add_column(name, justify="right" if name.startswith(("Params", "In", "Out")) else "left")
        for row in zip(*(values for _, values in kept)):
            table.add_row(*row)
        console = get_console()
        console.print(table)
        trainable, frozen, total = (
            get_human_readable_count(int(n)).strip()
            for n in (trainable_parameters, total_parameters - trainable_parameters, total_parameters)
        )
        console.print(
            f"Trainable params: {trainable}, frozen: {frozen}, total: {total}"
            f" ({model_size:,.1f} MB); modules in train mode: {total_training_modes['train']}, in eval mode:"
            f" {total_training_modes['eval']}"
        )
