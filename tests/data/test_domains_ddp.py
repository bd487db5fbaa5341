"""Dynamic batch loading under DDP (2 CPU processes over gloo) and across a Trainer resume."""

from __future__ import annotations

from pathlib import Path

import pytest
from _helpers import run_torchrun

WORKER = Path(__file__).with_name("domains_ddp_worker.py")


def test_ddp_ranks_agree_and_a_resumed_run_matches_the_uninterrupted_one(tmp_path: Path) -> None:
    r0, r1 = run_torchrun(WORKER, tmp_path, out=tmp_path, timeout=300)
    for run in ("full", "resumed"):
        a, b = r0[run], r1[run]
        assert a["global_step"] == b["global_step"] == 6
        # Every rank draws the same domains for a step, and takes different sequences of them.
        for step, (domains, digest) in a["batches"].items():
            assert b["batches"][step][0] == domains and b["batches"][step][1] != digest
        # Losses are reduced over the ranks: the same references, weights and model everywhere.
        assert a["schedule"] == b["schedule"] and a["reference_losses"] == b["reference_losses"]
        assert a["weights_hash"] == b["weights_hash"]
    full, resumed = r0["full"], r0["resumed"]
    # Updates every 2 steps, each taking effect from the next batch drawn; they move the weights.
    assert [s for s, _ in full["schedule"]] == [0, 2, 4, 6]
    assert max(abs(a - b) for a, b in zip(full["schedule"][0][1], full["schedule"][-1][1])) > 1e-3
    # The resumed run starts at step 3 with the batches, schedule and references the straight run had.
    assert sorted(resumed["batches"], key=int) == ["3", "4", "5"]
    assert all(resumed["batches"][s] == full["batches"][s] for s in ("3", "4", "5"))
    assert resumed["reference_losses"] == full["reference_losses"]  # saved, not re-measured on a trained model
    assert len(resumed["schedule"]) == len(full["schedule"])
    for (s_full, w_full), (s_res, w_res) in zip(full["schedule"], resumed["schedule"]):
        assert s_full == s_res and w_res == pytest.approx(w_full, rel=1e-6)
    assert resumed["weights_abs_sum"] == pytest.approx(full["weights_abs_sum"], rel=1e-6)
