"""DropBP under DDP: 2 CPU processes over gloo drop the same sublayers and keep identical parameters."""

from __future__ import annotations

from pathlib import Path

import torch
from _helpers import run_torchrun

WORKER = Path(__file__).with_name("ddp_worker.py")


def test_ddp_two_ranks_drop_the_same_sublayers(tmp_path: Path) -> None:
    r0, r1 = run_torchrun(WORKER, tmp_path, out=tmp_path, timeout=180)
    assert (r0["rank"], r1["rank"], r0["world_size"]) == (0, 1, 2)
    assert r0["find_unused_parameters"] is True and r0["global_step"] == 6
    # Same masks on both ranks, and some sublayers really were dropped (unused parameters in those steps).
    assert r0["masks"] == r1["masks"] and len(r0["masks"]) == 6
    assert any(any(m) for m in r0["masks"])
    assert max(r0["none_grads"]) > 0 and r0["none_grads"] == r1["none_grads"]
    # Sensitivities averaged over ranks, hence the same allocation everywhere.
    assert r0["sensitivities"] is not None and r0["sensitivities"] == r1["sensitivities"]
    assert r0["rates"] == r1["rates"]
    assert r0["param_hashes"] == r1["param_hashes"]
    assert torch.distributed.is_available()
