"""DDP worker for test_pruning_ddp.py: a few StructuredPruning steps on CPU over gloo; writes what each rank holds.

Run as ``python -m torch.distributed.run --standalone --nproc_per_node 2 pruning_ddp_worker.py OUT_DIR``. Each
rank writes ``OUT_DIR/rank<r>.json`` with hashes of its masks, multipliers and model weights; rank 0 exports the
pruned model to ``OUT_DIR/pruned``.
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

from lit_accel.models import CausalLM
from lit_accel.pruning.callback import StructuredPruning

VOCAB = 96
LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}


def main(out_dir: Path) -> None:
    L.seed_everything(0)
    module = CausalLM(LLAMA, learning_rate=1e-3, warmup_steps=0)
    # Different tokens on each rank (DistributedSampler): only gradient averaging keeps the ranks equal.
    data = torch.randint(0, VOCAB, (32, 12), generator=torch.Generator().manual_seed(0))
    loader: DataLoader[Any] = DataLoader([{"input_ids": x} for x in data], batch_size=4)  # type: ignore[arg-type]
    cb = StructuredPruning(num_layers=2, num_kv_heads=1, intermediate_size=64, export_dir=str(out_dir / "pruned"))
    trainer = quiet_trainer(
        devices=2,
        strategy="ddp",
        max_steps=3,
        callbacks=[cb],
    )
    trainer.fit(module, loader)
    hashes = {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest() for k, v in module.state_dict().items()}
    start = torch.full((64,), 4.6052)
    result = {
        "rank": trainer.global_rank,
        "global_step": trainer.global_step,
        "hashes": hashes,
        "masks_moved": not torch.allclose(cb.masks.hidden.log_alpha.detach(), start, atol=1e-3),
        "lambda_1_heads": float(cb.lagrangian.lambda_1["heads"].detach()),
    }
    (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    torch.set_num_threads(1)
    os.environ.setdefault("WANDB_MODE", "disabled")
    main(Path(sys.argv[1]))
    finish_distributed()
