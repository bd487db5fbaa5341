"""Running deepspeed_cpu_worker.py under torchrun and checking what its ranks saw (shared by the CPU and GPU tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from _helpers import run_torchrun

WORKER = Path(__file__).with_name("deepspeed_cpu_worker.py")
REPO = Path(__file__).resolve().parents[2]
EDIT_VALUE, EDIT_ROWS = 0.5, 4
EDITED = "model.layers.0.self_attn.q_proj.weight"


def run_worker(
    out: Path, mode: str, nproc: int, accelerator: str = "cpu", timeout: float = 300
) -> list[dict[str, Any]]:
    """Runs the worker under torchrun and returns each rank's record."""
    # DeepSpeed's CPU accelerator only for CPU runs: a GPU run must find the CUDA one.
    ds_accelerator = "cpu" if accelerator == "cpu" else None
    return run_torchrun(
        WORKER, out, mode, out=out, nproc=nproc, timeout=timeout, LIT_ACCEL_TEST_ACCELERATOR=accelerator,
        DS_ACCELERATOR=ds_accelerator,
    )  # fmt: skip


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def check_compare(out: Path, ranks: list[dict[str, Any]], atol: float, resume_atol: float = 0.0) -> None:
    """The assertions of the compare mode: DeepSpeed within ``atol`` of DDP, resumed within ``resume_atol`` of
    uninterrupted (exact on CPU)."""
    r0, r1 = (r["runs"] for r in ranks)
    assert (ranks[0]["world_size"], ranks[1]["rank"]) == (2, 1)
    for run, rec in r0.items():
        if run.startswith("odd_sizes"):
            continue
        # Both ranks hold the same full model, the loss is finite and the run reached its last step.
        assert rec["digest"] == r1[run]["digest"], run
        assert torch.isfinite(torch.tensor(rec["loss"])) and rec["global_step"] == 4, run
    states = {run: torch.load(out / f"{run}.pt") for run in r0 if not run.startswith("odd_sizes")}
    for stage in (1, 2, 3):
        run = f"zero{stage}"
        assert r0[run]["zero_stage"] == stage and r0[run]["bf16"] is False
        # The edit went into DeepSpeed's fp32 master copy: rank 0's value, the other elements untouched.
        assert r0[run]["master_checks"] == {"edited_rows": True, "other_rows_unchanged": True}, run
        assert r1[run]["master_checks"] == {"edited_rows": True, "other_rows_unchanged": True}, run
        # Same weights as DDP trained from the same start on the same data (fp32).
        assert _max_diff(states[run], states["ddp"]) < atol, run
        # Resuming from the DeepSpeed checkpoint folder written at step 2 continues exactly.
        assert r0[f"{run}_resumed"]["checkpoint_is_folder"]
        assert _max_diff(states[f"{run}_resumed"], states[run]) <= resume_atol, run
        odd = r0[f"odd_sizes_zero{stage}"]
        assert odd["first.weight[0]"] == [7.0] * 5 and odd["param first.weight[0]"] == [7.0] * 5, odd
        assert odd["second.bias"][-1] == 7.0 and odd == r1[f"odd_sizes_zero{stage}"]
    assert _max_diff(states["ddp_resumed"], states["ddp"]) <= resume_atol
    # The edit survived the following optimizer steps (rank 0's +0.5, not rank 1's -0.5, nor the old weights).
    edited = states["zero3"][EDITED][:EDIT_ROWS]
    assert (edited - EDIT_VALUE).abs().max() < 0.01
