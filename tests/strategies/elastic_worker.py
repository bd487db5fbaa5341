"""Worker for test_elastic_resume.py: train, checkpoint, and resume on another number of processes.

Run as ``python -m torch.distributed.run --standalone --nproc_per_node N elastic_worker.py OUT PLAN.json``. The plan
is a list of runs, each ``{"name", "strategy", "technique", "accumulate", "ckpt_path"}``: ``strategy`` is
``zero1``/``zero2``/``zero3`` (``LitDeepSpeedStrategy``, fp32, DeepSpeed's CPU accelerator over gloo) or ``ddp``;
``technique`` a key of :data:`TECHNIQUES`; ``accumulate`` the Trainer's ``accumulate_grad_batches`` (a resumed run
passes 1 and relies on ``TextDataModule(keep_global_batch=True)`` to restore the saved global batch); ``ckpt_path``
None for a run from scratch (which checkpoints at step :data:`SAVE_AT` into ``OUT/<name>/``) or the checkpoint to
resume from. Every run trains to :data:`MAX_STEPS` on a ``TextDataModule`` of :data:`BATCH` sequences per rank;
rank 0 writes the final full state dict to ``OUT/<name>.pt``, and every rank writes ``OUT/rank<r>.json`` with, per
run, the samples it trained on after the resume point, the technique's state and the Trainer's accumulation.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_accel.callbacks import DropBP, LoRA, SemiStructuredSparsity, StructuredPruning
from lit_accel.data import TextDataModule
from lit_accel.models import CausalLM
from lit_accel.models.params import full_state_dict
from lit_accel.strategies import LitDeepSpeedStrategy

BATCH = 2
SEQ_LEN = 32
SAVE_AT = 2
MAX_STEPS = 4
LEARNING_RATE = 1e-2

TECHNIQUES: dict[str, Callable[[], list[L.Callback]]] = {
    "dense": lambda: [],
    "dropbp": lambda: [DropBP(target=0.5, sensitivity="uniform")],
    "sparsity24": lambda: [SemiStructuredSparsity(targets="mlp", mask_refresh_every=1)],
    "pruning": lambda: [StructuredPruning(num_layers=1, intermediate_size=128)],
    "lora": lambda: [LoRA(r=4, alpha=8)],
}


class Record(L.Callback):
    """The samples each training batch held (a hash of every sequence) and the Trainer's accumulation."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self.accumulate: int | None = None
        self.lrs: list[tuple[int, float]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self.accumulate = int(trainer.accumulate_grad_batches)
        self.lrs.append((trainer.global_step, trainer.optimizers[0].param_groups[0]["lr"]))
        for row in batch["input_ids"]:
            self.samples.append(hash(tuple(row.tolist())))


def _strategy(name: str, world: int) -> Any:
    if name == "ddp":
        return "ddp" if world > 1 else "auto"
    return LitDeepSpeedStrategy(stage=int(name.removeprefix("zero")), bf16=False)


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.float().flatten().tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value if isinstance(value, (int, float, str, bool)) or value is None else repr(value)


def _technique_state(trainer: L.Trainer) -> dict[str, Any]:
    """Each technique callback's state_dict, JSON-able (timings left out), for comparison across runs."""
    state: dict[str, Any] = {}
    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(cb, (DropBP, SemiStructuredSparsity, StructuredPruning, LoRA)):
            saved = {k: v for k, v in cb.state_dict().items() if "seconds" not in k}
            state[type(cb).__name__] = _jsonable(saved)
    return state


def run(out: Path, spec: dict[str, Any], cache: Path, base: Path) -> dict[str, Any]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    record = Record()
    callbacks = [record, *TECHNIQUES[spec["technique"]]()]
    if spec["ckpt_path"] is None:
        callbacks.append(ModelCheckpoint(dirpath=out / spec["name"], every_n_train_steps=SAVE_AT, save_top_k=-1))
    data = TextDataModule(
        corpus="stdlib",
        max_corpus_bytes=300_000,
        bpe_vocab_size=512,
        bpe_train_bytes=200_000,
        seq_len=SEQ_LEN,
        batch_size=BATCH,
        max_val_sequences=8,
        cache_dir=str(cache),
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=_strategy(spec["strategy"], world),
        precision="32-true",
        max_steps=MAX_STEPS,
        accumulate_grad_batches=spec["accumulate"],
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out / spec["name"],
        callbacks=callbacks,
    )
    L.seed_everything(11)
    model = str(base) if spec["technique"] == "lora" else "llama-tiny"  # LoRA saves adapters over this base
    lm = CausalLM(model, warmup_steps=1, learning_rate=LEARNING_RATE)
    trainer.fit(lm, datamodule=data, ckpt_path=spec["ckpt_path"])
    assert lm.model is not None
    held_out = torch.randint(0, 512, (4, SEQ_LEN), generator=torch.Generator().manual_seed(1234))
    with torch.no_grad():  # every rank runs it: under ZeRO-3 the forward gathers the partitions collectively
        final_loss = float(lm.model(input_ids=held_out, labels=held_out).loss)
    state = full_state_dict(lm.model)
    if trainer.is_global_zero:
        torch.save({k: v.detach().float().cpu() for k, v in state.items()}, out / f"{spec['name']}.pt")
    return {
        "global_step": int(trainer.global_step),
        "final_loss": final_loss,
        "accumulate": record.accumulate,
        "samples": record.samples,
        "lrs": record.lrs,
        "technique_state": _technique_state(trainer),
        "world_size": world,
        "engine_steps": getattr(getattr(trainer.strategy, "deepspeed_engine", None), "global_steps", None),
    }


def main() -> None:
    out, plan = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    cache, base = Path(sys.argv[3]), Path(sys.argv[4])
    rank = int(os.environ.get("RANK", "0"))
    results = {spec["name"]: run(out, spec, cache, base) for spec in plan}
    (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "runs": results}))


if __name__ == "__main__":
    main()
