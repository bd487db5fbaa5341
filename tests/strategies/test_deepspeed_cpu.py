"""DeepSpeed on CPU over gloo (LitDeepSpeedStrategy): ZeRO-1/2/3 equal DDP, resume exactly, keep full_parameters
edits, and every registered name trains with its defaults. Each test runs deepspeed_cpu_worker.py under torchrun."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from deepspeed_helpers import check_compare, run_worker

from lit_accel.checkpoint import deepspeed_client_state_file, load_checkpoint_file

pytest.importorskip("deepspeed")


def test_zero_1_2_3_match_ddp_resume_and_keep_edits_two_processes(tmp_path: Path) -> None:
    ranks = run_worker(tmp_path, "compare", nproc=2)
    check_compare(tmp_path, ranks, atol=1e-5)
    # every stage's folder gives up Lightning's checkpoint dict (ZeRO-3 names its file zero_pp_rank_0_...): what
    # the W&B resume, the reference-loss reader and export's pruning test read
    for stage in (1, 2, 3):
        folder = tmp_path / f"zero{stage}_ckpts" / "epoch=0-step=2.ckpt"
        states = deepspeed_client_state_file(folder)
        assert states is not None and states.name.startswith("zero_pp_rank_0_" if stage == 3 else "mp_rank_00")
        client = load_checkpoint_file(states, mmap=True)
        assert client["global_step"] == 2 and client["lit_accel"]["run"]["run_id"], stage


def test_registered_names_train_with_their_defaults_one_process(tmp_path: Path) -> None:
    (rank,) = run_worker(tmp_path, "defaults", nproc=1)
    runs = rank["runs"]
    validate = runs.pop("validate")
    assert validate["zero_stage"] == 3 and torch.isfinite(torch.tensor(validate["val_loss"]))
    assert set(runs) == {f"lit_deepspeed_stage_{s}" for s in ("1", "2", "3", "2_offload", "3_offload")}
    for name, rec in runs.items():
        stage = int(name.split("_")[3])
        assert rec["zero_stage"] == stage, name
        assert torch.isfinite(torch.tensor(rec["loss"])) and rec["global_step"] == 2, name
        # bf16 by default (Trainer precision left at 32-true), with the size-derived buckets.
        assert rec["bf16"] is True and rec["derived"]["precision"] == "bf16-mixed", name
        assert "zero_optimization.reduce_bucket_size" in rec["derived"], name
        if stage == 3:
            assert rec["derived"]["zero_optimization.stage3_param_persistence_threshold"] == 640, name
        # bf16 parameters, fp32 master copy: untouched elements keep their fp32 values bit for bit.
        assert rec["master_checks"] == {"edited_rows": True, "other_rows_unchanged": True}, name
