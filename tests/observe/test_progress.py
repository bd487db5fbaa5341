"""The CLI's progress bar counts optimizer steps and shows tokens/s; the console drops Lightning's ads."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import pytest
import torch
from _helpers import tiny_llama
from jsonargparse import Namespace
from torch.utils.data import DataLoader

from lit_accel.cli import _quiet_console, use_step_progress_bar
from lit_accel.observe import StepProgressBar, Throughput


class _LM(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_llama()

    def training_step(self, batch: dict[str, torch.Tensor], idx: int) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def test_the_bar_counts_steps_and_shows_tokens_per_second() -> None:
    ids = torch.randint(0, 128, (12, 16), generator=torch.Generator().manual_seed(0))
    bar, throughput = StepProgressBar(), Throughput(log_every_n_steps=1)
    seen: list[tuple[str, dict[str, Any]]] = []

    class Look(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
            seen.append((bar._get_train_description(trainer.current_epoch), bar.get_metrics(trainer, pl_module)))

    trainer = L.Trainer(
        max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False, enable_model_summary=False,
        callbacks=[bar, throughput, Look()],
    )  # fmt: skip
    trainer.fit(_LM(), DataLoader([{"input_ids": x} for x in ids], batch_size=4))  # type: ignore[arg-type]
    assert [d.strip() for d, _ in seen] == [f"step {s}/5" for s in range(1, 6)]  # not "Epoch 0/-2"
    assert "tok/s" in seen[-1][1] and "v_num" not in seen[-1][1]


def test_the_cli_adds_the_bar_unless_the_config_has_one_or_none() -> None:
    config = Namespace(trainer=Namespace(enable_progress_bar=None, callbacks=[]))
    assert use_step_progress_bar(config)
    assert [c.class_path.rpartition(".")[2] for c in config.trainer.callbacks] == ["StepProgressBar", "ParamsSummary"]
    assert not use_step_progress_bar(config)  # already there
    off = Namespace(trainer=Namespace(enable_progress_bar=False, callbacks=None))
    assert not use_step_progress_bar(off) and off.trainer.callbacks is None


def test_lightning_tips_are_dropped(caplog: pytest.LogCaptureFixture) -> None:
    _quiet_console()
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        logger.info("💡 Tip: install something")
        logger.info("a real message")
    assert "Tip" not in caplog.text and "a real message" in caplog.text


def test_the_summary_leaves_out_unmeasured_flops(capsys: pytest.CaptureFixture) -> None:
    from lit_accel.observe import ParamsSummary

    data = [(" ", ["0"]), ("Name", ["model"]), ("Type", ["Llama"]), ("Params", ["1.4 M"]), ("Mode", ["train"]),
            ("FLOPs", ["0"])]  # fmt: skip
    ParamsSummary.summarize(data, 1_400_000, 1_000_000, 5.8, {"train": 33, "eval": 0}, 0)
    out = capsys.readouterr().out
    assert "FLOPs" not in out and "Trainable params: 1.0 M, frozen: 400 K, total: 1.4 M" in out
