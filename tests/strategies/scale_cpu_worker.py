"""Worker for test_strategy_scale.py: ZeRO-3 with hpZ (``zero_hpz_partition_size``) on CPU over gloo.

Run as ``python -m torch.distributed.run --standalone --nproc_per_node 2 scale_cpu_worker.py OUT_DIR``. In one
process, one after the other, from the same weights on the same data (fp32, ``STEPS`` steps, the ``EditWeights``
callback of deepspeed_cpu_worker.py rewriting part of a weight through ``full_parameters``): plain ZeRO-3; ZeRO-3
with ``zero_hpz_partition_size="node"`` (resolved to the 2 devices of this node); and ZeRO-3 with hpZ 2 and
``communication_data_type="fp32"`` (a second hpZ run in the same process). Rank 0 saves each final full state dict
to ``OUT_DIR/<run>.pt``; every rank writes ``OUT_DIR/rank<r>.json`` with what DeepSpeed's engine was given.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from deepspeed_cpu_worker import OVERRIDES, STEPS, _fit

from lit_accel.models import CausalLM
from lit_accel.models.params import full_state_dict
from lit_accel.strategies import LitDeepSpeedStrategy

RUNS: dict[str, dict[str, Any]] = {
    "plain": {},
    "hpz_node": {"zero_hpz_partition_size": "node"},
    "hpz_2_fp32_comm": {"zero_hpz_partition_size": 2, "communication_data_type": "fp32"},
}


def main(out: Path) -> None:
    rank = int(os.environ.get("RANK", "0"))
    init_dir = out / f"init{rank}"  # each rank writes its own copy of the same seeded weights: no barrier needed
    L.seed_everything(0)
    init = CausalLM("llama-tiny", config_overrides=OVERRIDES)
    init.configure_model()
    init.save_hf(init_dir)
    runs: dict[str, Any] = {}
    for name, kwargs in RUNS.items():
        trainer, module, edit = _fit(LitDeepSpeedStrategy(stage=3, bf16=False, **kwargs), init_dir, STEPS)
        assert module.model is not None
        state = full_state_dict(module.model)  # collective; rank 0 gets the tensors
        if rank == 0:
            torch.save(state, out / f"{name}.pt")
        engine = trainer.strategy.deepspeed_engine  # type: ignore[attr-defined]
        runs[name] = {
            "hpz": engine.zero_hpz_partition_size(),
            "communication_data_type": str(engine.communication_data_type),
            "derived": trainer.strategy.derived,  # type: ignore[attr-defined]
            "global_step": trainer.global_step,
            "master_checks": edit.master_checks,
        }
    result = {"rank": rank, "world_size": int(os.environ.get("WORLD_SIZE", "1")), "runs": runs}
    (out / f"rank{rank}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    # As deepspeed_cpu_worker.py: leave without the interpreter's finalisation (gloo's and DeepSpeed's threads).
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
