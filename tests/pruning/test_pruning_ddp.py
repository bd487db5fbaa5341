"""StructuredPruning under DDP: 2 CPU processes over gloo keep identical masks, multipliers and weights."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from matrix.matrix_common import torchrun_command, worker_env
from transformers import LlamaForCausalLM

WORKER = Path(__file__).with_name("pruning_ddp_worker.py")
REPO = Path(__file__).resolve().parents[2]


def test_ddp_two_ranks_learn_identical_masks(tmp_path: Path) -> None:
    proc = subprocess.run(
        torchrun_command(WORKER, tmp_path), env=worker_env(), cwd=REPO, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["rank"], r1["rank"], r0["global_step"]) == (0, 1, 3)
    assert any(k.startswith("pruning.masks.") for k in r0["hashes"])
    assert r0["hashes"] == r1["hashes"]
    assert r0["masks_moved"] and r0["lambda_1_heads"] < 0
    small = LlamaForCausalLM.from_pretrained(tmp_path / "pruned")
    assert (small.config.num_hidden_layers, small.config.num_key_value_heads, small.config.intermediate_size) == (
        2,
        1,
        64,
    )
