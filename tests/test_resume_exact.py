"""A run interrupted mid-epoch and resumed from ``last.ckpt`` ends bit for bit where the uninterrupted run ends.

The cadence is the quickstart's: a checkpoint every ``K`` optimizer steps with validation at the same steps (so
``ModelCheckpoint`` saves before the validation data loader is iterated, or after it when it monitors
``val/loss``), and the crash lands between two checkpoints. Each technique's final weights (every parameter and
buffer, exactly) and final validation loss (exactly) must equal the uninterrupted run's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_accel.callbacks import DropBP, LoRA, LowRankFactorization, SemiStructuredSparsity, StructuredPruning
from lit_accel.data import TextDataModule
from lit_accel.models import CausalLM

EVERY = 2  # checkpoint and validation cadence, in optimizer steps
MAX_STEPS = 8
CRASH_AT = 5  # the crash comes one step after the checkpoint at step 4: resuming repeats step 5


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("resume_exact_cache")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pretrained llama-tiny folder, the base that adapter-only LoRA checkpoints rebuild from."""
    lm = CausalLM("llama-tiny")
    lm.configure_model()
    assert lm.model is not None
    path = tmp_path_factory.mktemp("resume_exact_base") / "llama-tiny"
    lm.model.save_pretrained(str(path))
    return path


class _Crash(L.Callback):
    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == CRASH_AT:
            raise RuntimeError("simulated crash")


class _ValLosses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.losses.append(float(trainer.callback_metrics["val/loss"]))


def _fit(
    cache: Path,
    model: str,
    technique: Callable[[], list[L.Callback]],
    ckpt_dir: Path,
    monitor: str | None,
    crash: bool = False,
    ckpt_path: str | None = None,
) -> tuple[dict[str, torch.Tensor], list[float]]:
    data = TextDataModule(
        corpus="stdlib",
        max_corpus_bytes=300_000,
        bpe_vocab_size=512,
        bpe_train_bytes=200_000,
        seq_len=32,
        batch_size=4,
        max_val_sequences=8,
        cache_dir=str(cache),
    )
    losses = _ValLosses()
    checkpoint = ModelCheckpoint(
        dirpath=ckpt_dir, every_n_train_steps=EVERY, save_last=True, save_top_k=1, monitor=monitor
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=MAX_STEPS,
        val_check_interval=EVERY,
        check_val_every_n_epoch=None,
        limit_train_batches=100,  # one epoch outlasts the run: the crash and the resume are mid-epoch
        limit_val_batches=2,
        num_sanity_val_steps=0,
        precision="32-true",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=ckpt_dir,
        callbacks=[checkpoint, losses, *technique(), *([_Crash()] if crash else [])],
    )
    L.seed_everything(11)
    lm = CausalLM(model, warmup_steps=2, learning_rate=1e-2)
    trainer.fit(lm, datamodule=data, ckpt_path=ckpt_path)
    assert lm.model is not None
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}, losses.losses


TECHNIQUES: dict[str, Callable[[], list[L.Callback]]] = {
    "plain": lambda: [],
    "dropbp": lambda: [DropBP(target=0.5, sensitivity="uniform")],
    "sparsity24": lambda: [SemiStructuredSparsity(targets="mlp", mask_refresh_every=3)],
    "pruning": lambda: [StructuredPruning(num_layers=1, intermediate_size=128)],
    "factorization": lambda: [LowRankFactorization(targets="attention", rank=8)],
    "lora-dropout": lambda: [LoRA(r=4, alpha=8, dropout=0.1)],
}


@pytest.mark.parametrize("monitor", [None, "val/loss"], ids=["save-before-val", "save-after-val"])
@pytest.mark.parametrize("name", list(TECHNIQUES))
def test_resume_mid_epoch_ends_bit_for_bit(
    tmp_path: Path, cache: Path, base_dir: Path, name: str, monitor: Any
) -> None:
    model = str(base_dir) if name == "lora-dropout" else "llama-tiny"  # adapter-only checkpoints for LoRA
    technique = TECHNIQUES[name]
    straight, straight_losses = _fit(cache, model, technique, tmp_path / "straight", monitor)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(cache, model, technique, tmp_path / "crashed", monitor, crash=True)
    last = tmp_path / "crashed" / "last.ckpt"
    resumed, resumed_losses = _fit(cache, model, technique, tmp_path / "crashed", monitor, ckpt_path=str(last))

    assert straight.keys() == resumed.keys()
    differ = [k for k in straight if not torch.equal(straight[k], resumed[k])]
    assert not differ, f"{len(differ)} tensors differ after the resume, e.g. {differ[:3]}"
    # The resumed run validates at steps 6 and 8, the uninterrupted one at 2, 4, 6 and 8.
    assert len(straight_losses) == MAX_STEPS // EVERY
    assert resumed_losses == straight_losses[-len(resumed_losses) :]
    assert resumed_losses[-1] == straight_losses[-1]
