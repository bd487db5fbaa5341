"""DDP worker for test_dropbp_ddp.py: a few DropBP steps on CPU over gloo; writes what each rank saw.

Run as ``python -m torch.distributed.run --standalone --nproc_per_node 2 ddp_worker.py OUT_DIR``; Lightning
sees the torchrun environment and does not launch processes itself. Each rank writes ``OUT_DIR/rank<r>.json``
with its drop masks, rates, sensitivities and a hash of every parameter after training.
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
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader

from lit_accel.dropbp import DropBP
from lit_accel.models import CausalLM

VOCAB = 128


class MaskLog(L.Callback):
    def __init__(self, dropbp: DropBP) -> None:
        self.dropbp = dropbp
        self.masks: list[list[bool]] = []
        self.none_grads: list[int] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        assert self.dropbp.mask is not None
        self.masks.append(list(self.dropbp.mask))

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self.none_grads.append(sum(p.grad is None for p in pl_module.parameters()))


def main(out_dir: Path) -> None:
    L.seed_everything(0)
    overrides = {"vocab_size": VOCAB, "num_hidden_layers": 3, "hidden_size": 64, "intermediate_size": 128}
    module = CausalLM("llama-tiny", config_overrides=overrides, warmup_steps=1, learning_rate=1e-3)
    # Different tokens on each rank (DistributedSampler), so the ranks' sensitivities differ before averaging.
    data = torch.randint(0, VOCAB, (64, 16), generator=torch.Generator().manual_seed(0))
    loader: DataLoader[Any] = DataLoader([{"input_ids": x} for x in data], batch_size=4)  # type: ignore[arg-type]
    dropbp = DropBP(target=0.5, sensitivity_at=2, seed=3)
    log = MaskLog(dropbp)
    trainer = quiet_trainer(devices=2, strategy=DDPStrategy(), max_steps=6, callbacks=[dropbp, log])
    trainer.fit(module, loader)
    hashes = {
        name: hashlib.sha256(p.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
        for name, p in module.named_parameters()
    }
    result = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "find_unused_parameters": trainer.strategy._ddp_kwargs.get("find_unused_parameters"),  # type: ignore[attr-defined]
        "masks": log.masks,
        "none_grads": log.none_grads,
        "rates": dropbp.rates,
        "sensitivities": dropbp.sensitivities,
        "param_hashes": hashes,
        "global_step": trainer.global_step,
    }
    (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    torch.set_num_threads(1)
    os.environ.setdefault("WANDB_MODE", "disabled")
    main(Path(sys.argv[1]))
    finish_distributed()
