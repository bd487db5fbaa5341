"""DDP worker for test_lora_ddp.py: a few LoRA steps on CPU over gloo; writes what each rank holds.

Run as ``python -m torch.distributed.run --standalone --nproc_per_node 2 lora_ddp_worker.py BASE_DIR OUT_DIR``.
Each rank writes ``OUT_DIR/rank<r>.json`` with hashes of its adapters and the logits of its model on fixed tokens;
the LoRA callback writes the PEFT adapter to ``OUT_DIR/export/adapter`` (rank 0 writes, every rank gathers).
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
from torch.utils.data import DataLoader

from lit_accel.lowrank.lora import lora_state_dict
from lit_accel.lowrank.lora_callback import LoRA
from lit_accel.models import CausalLM

VOCAB = 128


def main(base_dir: str, out_dir: Path) -> None:
    L.seed_everything(0)
    module = CausalLM(base_dir, learning_rate=1e-2, warmup_steps=0, weight_decay=0.0)
    # Different tokens on each rank (DistributedSampler), and a different dropout draw on each rank.
    data = torch.randint(0, VOCAB, (32, 16), generator=torch.Generator().manual_seed(0))
    loader: DataLoader[Any] = DataLoader([{"input_ids": x} for x in data], batch_size=4)  # type: ignore[arg-type]
    lora = LoRA(r=4, alpha=8, dropout=0.1, export_dir=str(out_dir / "export"), export="adapter")
    trainer = quiet_trainer(
        devices=2,
        strategy="ddp",
        max_steps=3,
        callbacks=[lora],
    )
    trainer.fit(module, loader)
    assert module.model is not None
    adapters = lora_state_dict(module.model)
    hashes = {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest() for k, v in adapters.items()}
    module.model.eval()
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = module.model(input_ids=ids).logits
    result = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "hashes": hashes,
        "b_norm": float(sum(v.abs().sum() for k, v in adapters.items() if k.endswith("lora_B"))),
        "trainable": sorted(n for n, p in module.named_parameters() if p.requires_grad),
        "logits": logits.tolist(),
        "global_step": trainer.global_step,
    }
    (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    torch.set_num_threads(1)
    os.environ.setdefault("WANDB_MODE", "disabled")
    main(sys.argv[1], Path(sys.argv[2]))
    finish_distributed()
