"""Worker for test_pruning_zero3.py: StructuredPruning under DeepSpeed ZeRO-3 against ZeRO-2 and DDP on CPU over gloo.

Run as ``python -m torch.distributed.run --standalone --nproc_per_node 2 pruning_zero3_worker.py OUT_DIR`` (with
``DS_ACCELERATOR=cpu``). From the same saved weights, on the same data, in fp32, StructuredPruning trains a tiny
LLaMA for ``STEPS`` steps under DDP, ZeRO-2 and ZeRO-3 (``LitDeepSpeedStrategy``), each with a checkpoint at every
epoch end (step 2 and step 4), a validation batch after it, the architecture charted every step and the pruned model
exported at the end (``export_dir``); then a ZeRO-3 run resumes from the ZeRO-3 checkpoint of step 2. Every rank
writes ``OUT_DIR/rank<r>.json``: per run, each step's loss and ``pruning/`` metrics, the last validation loss and
kept parameter count, and digests of the masks, multipliers and model weights as that rank sees them (gathered under
ZeRO-3). Rank 0 saves each run's final masks, multipliers and weights to ``OUT_DIR/<run>.pt`` and exports the ZeRO-3
checkpoint of step 4 with ``lit-accel export``'s exporter to ``OUT_DIR/zero3_cli``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from _helpers import quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, Strategy
from pruning_ddp_worker import LLAMA, VOCAB  # the same 3-block LLaMA as the DDP test
from torch.utils.data import DataLoader

from lit_accel.export import export_checkpoint
from lit_accel.models import CausalLM
from lit_accel.models.params import full_state_dict, gathered_for_reading
from lit_accel.pruning.callback import StructuredPruning
from lit_accel.strategies import LitDeepSpeedStrategy

STEPS = 4
TARGET = {"num_layers": 2, "num_kv_heads": 1, "intermediate_size": 64, "hidden_size": 48}


class Record(L.Callback):
    """Each step's loss (with the Lagrangian penalty) and ``pruning/`` metrics, as this rank logged them."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("pruning/")}
        self.steps.append({"step": trainer.global_step, "loss": float(loss.detach()), **metrics})


def _loader() -> DataLoader[Any]:
    # 8 sequences: 2 batches per rank and epoch with 2 ranks, so the checkpoint of step 2 falls at an epoch end and a
    # resumed run sees the same batches as an uninterrupted one.
    data = torch.randint(0, VOCAB, (8, 12), generator=torch.Generator().manual_seed(0))
    return DataLoader([{"input_ids": x} for x in data], batch_size=2)  # type: ignore[arg-type]


def _strategy(name: str) -> Strategy:
    if name == "ddp":
        return DDPStrategy(process_group_backend="gloo")
    return LitDeepSpeedStrategy(stage=int(name[-1]), bf16=False)


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name, t in sorted(tensors.items()):
        h.update(name.encode())
        h.update(t.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def _fit(run: str, init_dir: Path, out: Path, ckpt_path: Path | None = None) -> dict[str, Any]:
    strategy = run.removesuffix("_resumed")
    module = CausalLM(str(init_dir), learning_rate=1e-3, warmup_steps=0)
    export_dir = None if ckpt_path else str(out / f"{run}_pruned")
    # Charts every step: the per-layer report reads the masks outside the training step (gathered for it).
    pruning = StructuredPruning(**TARGET, export_dir=export_dir, chart_every_n_steps=1)
    record = Record()
    checkpoints = ModelCheckpoint(
        dirpath=out / f"{run}_ckpts", every_n_epochs=1, save_top_k=-1, save_on_train_epoch_end=True
    )
    trainer = quiet_trainer(
        devices=int(os.environ["WORLD_SIZE"]),
        strategy=_strategy(strategy),
        max_steps=STEPS,
        callbacks=[pruning, record, checkpoints],
        enable_checkpointing=True,
        limit_val_batches=1,  # a validation batch at each epoch end: the deterministic masks, gathered in a forward
    )
    loader = _loader()
    trainer.fit(
        module, train_dataloaders=loader, val_dataloaders=loader, ckpt_path=str(ckpt_path) if ckpt_path else None
    )
    assert module.model is not None
    pruning_module = module.pruning  # type: ignore[attr-defined]
    with gathered_for_reading(pruning_module.parameters()):  # collective under ZeRO-3
        masks = {k: v.detach().clone() for k, v in pruning_module.state_dict().items()}
    weights = full_state_dict(module.model)  # collective under ZeRO-3; rank 0 gets the tensors
    with gathered_for_reading(module.model.parameters()):
        model_digest = _digest(dict(module.model.named_parameters()))
    if trainer.global_rank == 0:
        torch.save({"pruning": masks, "model": weights}, out / f"{run}.pt")
    engine = getattr(trainer.strategy, "deepspeed_engine", None)
    return {
        "global_step": trainer.global_step,
        "steps": record.steps,
        "val_loss": float(trainer.callback_metrics["val/loss"]),
        "kept_params": float(trainer.callback_metrics["pruning/kept_params"]),
        "pruning_digest": _digest(masks),
        "model_digest": model_digest,
        "zero_stage": engine.zero_optimization_stage() if engine is not None else None,
        "partitioned": any(hasattr(p, "ds_id") for p in pruning_module.parameters()),
    }


def main(out: Path) -> None:
    rank = int(os.environ["RANK"])
    init_dir = out / f"init{rank}"  # each rank writes its own copy of the same seeded weights: no barrier needed
    L.seed_everything(0)
    init = CausalLM(LLAMA)
    init.configure_model()
    init.save_hf(init_dir)
    runs = {run: _fit(run, init_dir, out) for run in ("ddp", "zero2", "zero3")}
    runs["zero3_resumed"] = _fit("zero3_resumed", init_dir, out, ckpt_path=out / "zero3_ckpts/epoch=0-step=2.ckpt")
    if rank == 0:
        export_checkpoint(out / "zero3_ckpts/epoch=1-step=4.ckpt", out / "zero3_cli")
    (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "runs": runs}, indent=1))


if __name__ == "__main__":
    torch.set_num_threads(1)
    os.environ.setdefault("WANDB_MODE", "disabled")
    main(Path(sys.argv[1]))
    # The results are written: leave without the interpreter's finalisation, where gloo's and DeepSpeed's background
    # threads, still running, occasionally abort the process on a loaded machine (as deepspeed_cpu_worker.py does).
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
