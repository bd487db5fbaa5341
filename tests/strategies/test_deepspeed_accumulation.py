"""Gradient accumulation under LitDeepSpeedStrategy equals DDP's: the loss is divided by the accumulation once.

Lightning divides each micro-batch's loss by ``accumulate_grad_batches`` and DeepSpeed's ``engine.backward`` would
divide it again; Adam's ``eps`` (and DeepSpeed's gradient clipping) then act on gradients ``accumulate`` times too
small, and ZeRO runs drift from DDP's (by 2.5e-2 in the weights after the 4 steps of this run without it). One
process, fp32, 3 micro-batches per step: ZeRO-1 and ZeRO-2 end bit for bit where DDP ends.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _helpers import run_torchrun

pytest.importorskip("deepspeed")

WORKER = Path(__file__).with_name("elastic_worker.py")


def test_zero_accumulation_equals_ddp(tmp_path: Path) -> None:
    from lit_accel.data import TextDataModule

    TextDataModule(corpus="stdlib", max_corpus_bytes=300_000, bpe_vocab_size=512, bpe_train_bytes=200_000,
                   seq_len=32, batch_size=2, cache_dir=str(tmp_path / "cache")).prepare_data()  # fmt: skip
    runs = [
        {"name": name, "strategy": name, "technique": "dense", "accumulate": 3, "ckpt_path": None}
        for name in ("ddp", "zero1", "zero2")
    ]
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(runs))
    (rank,) = run_torchrun(WORKER, tmp_path, plan, tmp_path / "cache", tmp_path / "unused", out=tmp_path, nproc=1)
    assert [rank["runs"][r["name"]]["accumulate"] for r in runs] == [3, 3, 3]
    ddp = torch.load(tmp_path / "ddp.pt")
    for stage in ("zero1", "zero2"):
        state = torch.load(tmp_path / f"{stage}.pt")
        assert rank["runs"][stage]["engine_steps"] == 4
        assert all(torch.equal(state[k], ddp[k]) for k in ddp), stage
