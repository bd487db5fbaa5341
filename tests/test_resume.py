"""Resuming from a checkpoint written at the end of an epoch is step-exact (max_steps training, TextDataModule)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_accel.data import TextDataModule
from lit_accel.models import CausalLM
from lit_accel.resume import complete_epoch_end_loop_state

EPOCH_LEN = 3  # batches per epoch (limit_train_batches)
MAX_STEPS = 8  # two full epochs and part of a third


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("resume_cache")


class _Record(L.Callback):
    def __init__(self) -> None:
        self.rows: dict[int, tuple[int, int, float, list[int]]] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        step = trainer.global_step - 1
        self.rows[step] = (trainer.current_epoch, idx, float(outputs["loss"]), batch["input_ids"][:, 0].tolist())


class _CrashAtEpoch(L.Callback):
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.current_epoch == 1:
            raise RuntimeError("simulated crash after epoch 0")


def _fit(cache: Path, root: Path, callbacks: list, validate: bool, ckpt_path: str | None = None) -> None:
    data = TextDataModule(
        corpus="stdlib",
        max_corpus_bytes=300_000,
        bpe_vocab_size=512,
        bpe_train_bytes=200_000,
        seq_len=32,
        batch_size=4,
        max_val_sequences=4,
        cache_dir=str(cache),
    )
    checkpoint = ModelCheckpoint(
        dirpath=root, every_n_epochs=1, save_last=True, save_top_k=-1, save_on_train_epoch_end=True
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=MAX_STEPS,  # iteration-based training: max_epochs stays unset
        limit_train_batches=EPOCH_LEN,
        limit_val_batches=1 if validate else 0,
        num_sanity_val_steps=0,
        precision="32-true",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=[checkpoint, *callbacks],
    )
    L.seed_everything(7)
    trainer.fit(CausalLM("llama-tiny", warmup_steps=2, learning_rate=1e-3), datamodule=data, ckpt_path=ckpt_path)


@pytest.mark.parametrize("validate", [False, True], ids=["no-val", "val-before-save"])
def test_resume_from_an_epoch_end_checkpoint_is_step_exact(tmp_path: Path, cache: Path, validate: bool) -> None:
    full = _Record()
    _fit(cache, tmp_path / "full", [full], validate)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(cache, tmp_path / "crashed", [_CrashAtEpoch()], validate)
    last = tmp_path / "crashed" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == EPOCH_LEN  # written at the end of epoch 0

    resumed = _Record()
    _fit(cache, tmp_path / "crashed", [resumed], validate, ckpt_path=str(last))
    assert sorted(full.rows) == list(range(MAX_STEPS))
    assert sorted(resumed.rows) == list(range(EPOCH_LEN, MAX_STEPS))
    for step, (epoch, idx, loss, first_tokens) in resumed.rows.items():
        f_epoch, f_idx, f_loss, f_first_tokens = full.rows[step]
        assert (epoch, idx) == (f_epoch, f_idx), step  # the same epoch and batch index as the uninterrupted run
        assert first_tokens == f_first_tokens, step  # the same batch
        assert loss == pytest.approx(f_loss, rel=0, abs=1e-6), step


def _epoch_end_loops() -> dict[str, Any]:
    done = {"ready": 3, "started": 3, "processed": 3, "completed": 3}
    return {
        "fit_loop": {
            "epoch_progress": {
                "total": {"ready": 1, "started": 1, "processed": 1, "completed": 0},
                "current": {"ready": 1, "started": 1, "processed": 1, "completed": 0},
            },
            "epoch_loop.batch_progress": {"total": dict(done), "current": dict(done), "is_last_batch": True},
            "epoch_loop.scheduler_progress": {
                "total": {"ready": 3, "completed": 3},
                "current": {"ready": 3, "completed": 3},
            },
            "epoch_loop.val_loop.batch_progress": {"total": dict(done), "current": dict(done), "is_last_batch": True},
        }
    }


def test_complete_epoch_end_loop_state_only_touches_epoch_end_checkpoints() -> None:
    ckpt = {"loops": _epoch_end_loops()}
    assert complete_epoch_end_loop_state(ckpt)
    fit = ckpt["loops"]["fit_loop"]
    assert fit["epoch_progress"]["total"]["completed"] == fit["epoch_progress"]["current"]["completed"] == 1
    assert fit["epoch_loop.batch_progress"]["current"] == dict.fromkeys(
        ("ready", "started", "processed", "completed"), 0
    )
    assert fit["epoch_loop.batch_progress"]["total"]["completed"] == 3  # totals (global counts) are kept
    assert not complete_epoch_end_loop_state(ckpt)  # idempotent: now a clean epoch start

    # Saved at on_validation_end / on_train_batch_end (epoch not yet processed), or mid-epoch: left alone.
    mid = _epoch_end_loops()
    for counts in mid["fit_loop"]["epoch_progress"].values():
        counts["processed"] = 0
    before = copy.deepcopy(mid)
    assert not complete_epoch_end_loop_state({"loops": mid}) and mid == before
    assert not complete_epoch_end_loop_state({"state_dict": {}})  # weights-only checkpoint
