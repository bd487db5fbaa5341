"""Worker for test_deepspeed_cpu.py: DeepSpeed ZeRO-1/2/3 (LitDeepSpeedStrategy) against DDP on CPU over gloo.

Run as ``python -m torch.distributed.run --standalone --nproc_per_node N deepspeed_cpu_worker.py OUT_DIR MODE``;
Lightning sees the torchrun environment and does not launch processes itself.

``MODE=compare`` (2 processes, fp32): every strategy trains the same tiny LLaMA from the same weights on the same
data for ``STEPS`` steps, with an ``EditWeights`` callback rewriting part of a weight through
``full_parameters(modifier_rank=0)`` at step ``EDIT_STEP`` (rank 0 writes ``+EDIT_VALUE``, the other ranks
``-EDIT_VALUE``, which must be discarded); each run checkpoints at the end of its first epoch (step 2, a DeepSpeed
checkpoint folder for the DeepSpeed stages) and a second run resumes from it to ``STEPS``. Rank 0 saves every final
full state dict to ``OUT_DIR/<run>.pt``.

``MODE=defaults`` (1 process): each registered ``lit_deepspeed_*`` name trains a few steps with its defaults
(bf16; the offload names with ``cpu_adam=False``, since DeepSpeedCPUAdam's op takes minutes to compile), its
``EditWeights`` checking that untouched elements keep their fp32 master values; then ``validate`` alone runs under
``lit_deepspeed_stage_3`` (DeepSpeed's inference engine).

``MODE=compare`` also runs ``OddSizes``: a module whose parameter sizes are not multiples of the world size, edited
by the *last* rank under ZeRO-1/2/3 (DeepSpeed's own ``safe_set_full_fp32_param`` slices past the end there).

``$LIT_ACCEL_TEST_ACCELERATOR`` (default ``cpu``) picks the accelerator, so the GPU tests reuse this worker.
Every rank writes ``OUT_DIR/rank<r>.json`` with what it saw.
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
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, Strategy
from torch.utils.data import DataLoader

from lit_accel.models import CausalLM
from lit_accel.models.params import full_parameters, full_state_dict
from lit_accel.strategies import LitDeepSpeedStrategy, resolve_strategy

VOCAB = 256
OVERRIDES = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
STEPS = 4
EDIT_STEP = 1
ACCELERATOR = os.environ.get("LIT_ACCEL_TEST_ACCELERATOR", "cpu")
EDIT_VALUE = 0.5
EDIT_ROWS = 4


def _master(param: torch.nn.Parameter) -> torch.Tensor | None:
    """DeepSpeed's fp32 master copy of ``param`` (full), or None without a DeepSpeed optimizer (collective)."""
    if not (hasattr(param, "_hp_mapping") or hasattr(param, "_z3_optimizer")):
        return None
    from deepspeed.utils import safe_get_full_fp32_param

    master = safe_get_full_fp32_param(param)
    return None if master is None else master.detach().float().cpu().reshape(-1, OVERRIDES["hidden_size"])


class EditWeights(L.Callback):
    """At ``EDIT_STEP`` rewrites the first rows of layer 0's ``q_proj`` through ``full_parameters``."""

    def __init__(self) -> None:
        self.master_checks: dict[str, bool] = {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step != EDIT_STEP:
            return
        proj = pl_module.model.model.layers[0].self_attn.q_proj  # type: ignore[union-attr]
        before = _master(proj.weight)
        value = EDIT_VALUE if trainer.global_rank == 0 else -EDIT_VALUE
        with full_parameters(proj, modifier_rank=0) as params, torch.no_grad():
            params["weight"][:EDIT_ROWS] = value
        after = _master(proj.weight)
        if before is not None and after is not None:
            self.master_checks = {
                "edited_rows": bool((after[:EDIT_ROWS] == EDIT_VALUE).all()),
                # bit-exact: the untouched elements keep their fp32 master value (not the bf16-rounded parameter)
                "other_rows_unchanged": bool(torch.equal(after[EDIT_ROWS:], before[EDIT_ROWS:])),
            }


def _loader() -> DataLoader[Any]:
    # 8 sequences: 2 batches per rank and epoch with 2 ranks, so the mid-run checkpoint falls at an epoch end.
    data = torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(0))
    return DataLoader([{"input_ids": x} for x in data], batch_size=2)  # type: ignore[arg-type]


def _fit(
    strategy: Strategy,
    init_dir: Path,
    steps: int,
    precision: str = "32-true",
    ckpt_path: Path | None = None,
    checkpoint_dir: Path | None = None,
) -> tuple[L.Trainer, CausalLM, EditWeights]:
    module = CausalLM(str(init_dir), warmup_steps=1, learning_rate=1e-3)
    edit = EditWeights()
    callbacks: list[L.Callback] = [edit]
    if checkpoint_dir is not None:
        # As configs/ do: a checkpoint at every epoch end (here after step 2), each kept.
        callbacks.append(
            ModelCheckpoint(dirpath=checkpoint_dir, every_n_epochs=1, save_top_k=-1, save_on_train_epoch_end=True)
        )
    trainer = L.Trainer(
        accelerator=ACCELERATOR,
        devices=int(os.environ.get("WORLD_SIZE", "1")),
        strategy=strategy,
        precision=precision,  # type: ignore[arg-type]
        max_steps=steps,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=checkpoint_dir is not None,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=_loader(), ckpt_path=str(ckpt_path) if ckpt_path else None)
    return trainer, module, edit


def _digest(module: CausalLM) -> str:
    """Hash of every full parameter as this rank sees it (gathered under ZeRO-3)."""
    assert module.model is not None
    h = hashlib.sha256()
    with full_parameters(module.model) as params:
        for name, p in sorted(params.items()):
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def _record(out: Path, run: str, trainer: L.Trainer, module: CausalLM, edit: EditWeights, save: bool) -> dict[str, Any]:
    assert module.model is not None
    state = full_state_dict(module.model)  # collective under ZeRO-3; rank 0 gets the tensors
    if save and trainer.global_rank == 0:
        torch.save(state, out / f"{run}.pt")
    strategy = trainer.strategy
    engine = getattr(strategy, "deepspeed_engine", None)
    return {
        "loss": float(trainer.callback_metrics["train/loss"]),
        "global_step": trainer.global_step,
        "digest": _digest(module),
        "master_checks": edit.master_checks,
        "zero_stage": engine.zero_optimization_stage() if engine is not None else None,
        "bf16": bool(engine.bfloat16_enabled()) if engine is not None else None,
        "derived": getattr(strategy, "derived", {}),
        "param_dtype": str(next(module.model.parameters()).dtype),
        "optimizer": type(engine.basic_optimizer).__name__ if engine is not None else None,
    }


class OddSizes(L.LightningModule):
    """Parameters of 15, 3, 21 and 7 elements: never a multiple of 2 ranks (ZeRO-3 pads the last partition)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = torch.nn.Linear(5, 3)
        self.second = torch.nn.Linear(3, 7)
        self.seen: dict[str, Any] = {}

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.second(self.first(batch)).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.global_step != 1:
            return
        last = self.trainer.world_size - 1
        with full_parameters(self, modifier_rank=last) as params, torch.no_grad():
            mine = 7.0 if self.global_rank == last else -1.0
            params["first.weight"][0] = mine
            params["second.bias"][-1] = mine
        from deepspeed.utils import safe_get_full_fp32_param

        self.seen = {
            "first.weight[0]": safe_get_full_fp32_param(self.first.weight)[0].tolist(),
            "second.bias": safe_get_full_fp32_param(self.second.bias).tolist(),
        }
        with full_parameters(self) as params:
            self.seen["param first.weight[0]"] = params["first.weight"][0].float().tolist()


def odd_sizes(stage: int) -> dict[str, Any]:
    L.seed_everything(0)
    module = OddSizes()
    trainer = L.Trainer(
        accelerator=ACCELERATOR,
        devices=int(os.environ.get("WORLD_SIZE", "1")),
        strategy=LitDeepSpeedStrategy(stage=stage),
        max_steps=2,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    data = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=2))  # type: ignore[arg-type]
    return module.seen


def compare(out: Path, rank: int) -> dict[str, Any]:
    init_dir = out / f"init{rank}"  # each rank writes its own copy of the same seeded weights: no barrier needed
    L.seed_everything(0)
    init = CausalLM("llama-tiny", config_overrides=OVERRIDES)
    init.configure_model()
    init.save_hf(init_dir)
    runs: dict[str, Any] = {}
    strategies: dict[str, Any] = {
        "ddp": lambda: DDPStrategy(process_group_backend="gloo" if ACCELERATOR == "cpu" else None),
        **{f"zero{s}": (lambda s=s: LitDeepSpeedStrategy(stage=s, bf16=False)) for s in (1, 2, 3)},
    }
    for name, make in strategies.items():
        ckpts = out / f"{name}_ckpts"
        trainer, module, edit = _fit(make(), init_dir, STEPS, checkpoint_dir=ckpts)
        runs[name] = _record(out, name, trainer, module, edit, save=True)
        first = ckpts / f"epoch=0-step={STEPS // 2}.ckpt"
        trainer, module, edit = _fit(make(), init_dir, STEPS, ckpt_path=first)
        runs[f"{name}_resumed"] = _record(out, f"{name}_resumed", trainer, module, edit, save=True)
        runs[f"{name}_resumed"]["checkpoint_is_folder"] = first.is_dir()
    for stage in (1, 2, 3):
        runs[f"odd_sizes_zero{stage}"] = odd_sizes(stage)
    return runs


def defaults(out: Path, rank: int) -> dict[str, Any]:
    init_dir = out / f"init{rank}"
    L.seed_everything(0)
    init = CausalLM("llama-tiny", config_overrides=OVERRIDES)
    init.configure_model()
    init.save_hf(init_dir)
    runs: dict[str, Any] = {}
    for name in ("lit_deepspeed_stage_1", "lit_deepspeed_stage_2", "lit_deepspeed_stage_3"):
        trainer, module, edit = _fit(resolve_strategy(name), init_dir, 2)
        runs[name] = _record(out, name, trainer, module, edit, save=False)
    for name in ("lit_deepspeed_stage_2_offload", "lit_deepspeed_stage_3_offload"):
        trainer, module, edit = _fit(resolve_strategy(name, cpu_adam=False), init_dir, 2)
        runs[name] = _record(out, name, trainer, module, edit, save=False)
    # validate alone: DeepSpeed's inference engine (no optimizer), partitioned under ZeRO-3.
    trainer = L.Trainer(
        accelerator=ACCELERATOR, devices=1, strategy="lit_deepspeed_stage_3", logger=False, enable_progress_bar=False
    )
    (metrics,) = trainer.validate(CausalLM(str(init_dir)), dataloaders=_loader())
    runs["validate"] = {
        "val_loss": metrics["val/loss"],
        "zero_stage": trainer.strategy.deepspeed_engine.zero_optimization_stage(),
    }  # type: ignore[attr-defined]
    return runs


def main(out: Path, mode: str) -> None:
    rank = int(os.environ.get("RANK", "0"))
    runs = compare(out, rank) if mode == "compare" else defaults(out, rank)
    result = {"rank": rank, "world_size": int(os.environ.get("WORLD_SIZE", "1")), "runs": runs}
    (out / f"rank{rank}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
    # The results are written: leave without the interpreter's finalisation, where gloo's and DeepSpeed's background
    # threads, still running, occasionally abort the process ("terminate called without an active exception")
    # on a loaded machine.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
