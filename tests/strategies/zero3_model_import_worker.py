"""Worker for test_zero3_model_import.py: two ZeRO-3 fits of a CausalLM in one process, the first of them the first
time the process builds a LLaMA (so transformers imports its modeling module then).

Run as ``python -m torch.distributed.run --standalone --nproc_per_node 1 zero3_model_import_worker.py OUT_DIR``
(``LitDeepSpeedStrategy`` ZeRO-3, fp32, DeepSpeed's CPU accelerator over gloo). Writes ``OUT_DIR/rank0.json``: whether
the modeling module was still unimported before the first fit, and each fit's loss and last step.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from _helpers import finish_distributed, quiet_trainer
from torch.utils.data import DataLoader

from lit_accel.models import CausalLM
from lit_accel.strategies import LitDeepSpeedStrategy

MODELING = "transformers.models.llama.modeling_llama"
CONFIG = dict(
    model_type="llama",
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=64,
)


def fit() -> dict[str, Any]:
    """One step of a fresh CausalLM under ZeRO-3: its loss and the step it reached."""
    module = CausalLM(dict(CONFIG), learning_rate=1e-3, warmup_steps=0)
    data = torch.randint(0, CONFIG["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    loader: DataLoader[Any] = DataLoader([{"input_ids": x} for x in data], batch_size=2)  # type: ignore[arg-type]
    trainer = quiet_trainer(strategy=LitDeepSpeedStrategy(stage=3, bf16=False), max_steps=1)
    trainer.fit(module, loader)
    return {"loss": float(trainer.callback_metrics["train/loss"]), "global_step": trainer.global_step}


def main(out_dir: Path) -> None:
    record: dict[str, Any] = {"first_import_in_the_fit": MODELING not in sys.modules}
    record["fits"] = [fit(), fit()]
    (out_dir / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    torch.set_num_threads(1)
    os.environ.setdefault("WANDB_MODE", "disabled")
    main(Path(sys.argv[1]))
    finish_distributed()
