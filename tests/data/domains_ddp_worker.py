"""DDP worker for test_domains_ddp.py: MultiDomainDataModule + DynamicBatchLoading on 2 CPU ranks over gloo.

Run as ``python -m torch.distributed.run --standalone --nproc_per_node 2 domains_ddp_worker.py OUT_DIR``. It trains 6
steps straight, then again from the step-3 checkpoint of the first run, and writes ``OUT_DIR/rank<r>.json`` with,
for each run, the batches this rank saw (domains and a hash of the tokens), the weight schedule, the reference
losses measured at the start ("initial") and a hash of the final weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from _helpers import finish_distributed, quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_accel.data import DynamicBatchLoading, MultiDomainDataModule
from lit_accel.models import CausalLM

DOMAINS: dict[str, str | list[str]] = {"json": "stdlib:json", "email": "stdlib:email", "rest": "stdlib:*"}


class Record(L.Callback):
    """Remembers the domains and a token hash of every training batch, by global step."""

    def __init__(self) -> None:
        self.batches: dict[int, Any] = {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        digest = hashlib.sha256(batch["input_ids"].numpy().tobytes()).hexdigest()[:16]
        self.batches[trainer.global_step] = [batch["domain"].tolist(), digest]


def datamodule(cache: Path) -> MultiDomainDataModule:
    return MultiDomainDataModule(
        DOMAINS,
        reference_losses="initial",
        update_every=2,
        clip_excess=False,  # from scratch the losses fall below the initial references; the signed update still acts
        bpe_vocab_size=500,
        bpe_train_bytes=200_000,
        max_corpus_bytes=150_000,
        seq_len=32,
        batch_size=4,
        val_fraction=0.1,
        max_val_sequences=8,
        cache_dir=str(cache),
    )


def fit(out_dir: Path, ckpt_path: str | None) -> dict[str, Any]:
    L.seed_everything(0)
    dm = datamodule(out_dir / "cache")
    module = CausalLM("llama-tiny", config_overrides={"vocab_size": 512}, learning_rate=1e-3, warmup_steps=0)
    record = Record()
    ckpts = ModelCheckpoint(dirpath=out_dir / "ckpt", every_n_train_steps=3, save_top_k=-1, filename="{step}")
    trainer = quiet_trainer(
        devices=2,
        strategy="ddp",
        max_steps=6,
        callbacks=[DynamicBatchLoading(), record, *([] if ckpt_path else [ckpts])],
        enable_checkpointing=ckpt_path is None,
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    weights = hashlib.sha256()
    total = 0.0
    for name, tensor in sorted(module.state_dict().items()):
        weights.update(name.encode() + tensor.contiguous().numpy().tobytes())
        total += float(tensor.double().abs().sum())
    return {
        "global_step": trainer.global_step,
        "batches": {str(k): v for k, v in record.batches.items()},
        "schedule": [[s, w] for s, w in dm.schedule],
        "reference_losses": dm.reference_losses,
        "weights_hash": weights.hexdigest(),
        "weights_abs_sum": total,
    }


def main(out_dir: Path) -> None:
    full = fit(out_dir, None)
    resumed = fit(out_dir, str(out_dir / "ckpt" / "step=3.ckpt"))
    rank = int(os.environ["RANK"])
    (out_dir / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "full": full, "resumed": resumed}))


if __name__ == "__main__":
    torch.set_num_threads(1)
    os.environ.setdefault("WANDB_MODE", "disabled")
    main(Path(sys.argv[1]))
    finish_distributed()
