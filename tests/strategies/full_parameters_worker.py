"""Worker for test_full_parameters.py: ``full_parameters`` under plain DDP-style replication over gloo.

Run as ``python -m torch.distributed.run --standalone --nproc_per_node 2 full_parameters_worker.py OUT_DIR``. Each
rank starts from different values (as if an edit had been drawn per rank) and writes ``OUT_DIR/rank<r>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from lit_accel.models.params import full_parameters


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(rank))
    with full_parameters(model) as params:  # read-only: nothing is synchronised
        read_only = {name: p.detach().flatten().tolist() for name, p in params.items()}
    after_read = [p.detach().flatten().tolist() for p in model.parameters()]
    with full_parameters(model, modifier_rank=1) as params, torch.no_grad():
        params["0.weight"][0, 0] = 10.0 + rank  # rank 1's 11.0 must win everywhere
    after_write = {name: p.detach().flatten().tolist() for name, p in model.named_parameters()}
    try:
        with full_parameters(model, modifier_rank=2):
            pass
        error = ""
    except ValueError as e:
        error = str(e)
    result = {"read_only": read_only, "after_read": after_read, "after_write": after_write, "error": error}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
