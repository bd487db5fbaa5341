"""StructuredPruning under DDP: 2 CPU processes over gloo keep identical masks, multipliers and weights."""

from __future__ import annotations

from pathlib import Path

from _helpers import run_torchrun
from transformers import LlamaForCausalLM

WORKER = Path(__file__).with_name("pruning_ddp_worker.py")


def test_ddp_two_ranks_learn_identical_masks(tmp_path: Path) -> None:
    r0, r1 = run_torchrun(WORKER, tmp_path, out=tmp_path, timeout=180)
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
