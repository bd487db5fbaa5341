"""GPU rows of the DeepSpeed strategy plugin (``pytest -m gpu``; skipped on CPU): every ``lit_deepspeed_stage_N``
fits with falling loss, checkpoints and resumes; the offload names step with DeepSpeedCPUAdam on the LR schedule;
the CPU rows' worker runs on CUDA (one GPU, and two for the DDP comparison)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from deepspeed_helpers import check_compare, run_worker
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lit_accel.models import CausalLM, full_state_dict, warmup_cosine
from lit_accel.strategies import LitDeepSpeedStrategy, resolve_strategy

pytestmark = pytest.mark.gpu
EPOCH = 4  # batches per epoch: the checkpoint at the first epoch end is the one resumed from


class _Losses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        self.losses.append(float(outputs["loss"]))


def _loader() -> DataLoader[Any]:
    data = torch.randint(0, 4096, (EPOCH * 2, 64), generator=torch.Generator().manual_seed(0))
    return DataLoader([{"input_ids": x} for x in data], batch_size=2)  # type: ignore[arg-type]


def _fit(
    name: str, steps: int, root: Path, ckpt_path: Path | None = None, **strategy_args: Any
) -> tuple[L.Trainer, CausalLM, list[float]]:
    L.seed_everything(0)
    module = CausalLM("llama-tiny", warmup_steps=1, learning_rate=1e-3)
    losses = _Losses()
    checkpoint = ModelCheckpoint(dirpath=root, every_n_epochs=1, save_top_k=-1, save_on_train_epoch_end=True)
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        strategy=resolve_strategy(name, **strategy_args),
        max_steps=steps,
        callbacks=[losses, checkpoint],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=root,
    )
    trainer.fit(module, train_dataloaders=_loader(), ckpt_path=str(ckpt_path) if ckpt_path else None)
    return trainer, module, losses.losses


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_lit_deepspeed_stage_fits_checkpoints_and_resumes(tmp_path: Path, stage: int) -> None:
    name = f"lit_deepspeed_stage_{stage}"
    trainer, module, losses = _fit(name, 2 * EPOCH, tmp_path / "full")
    strategy = trainer.strategy
    assert isinstance(strategy, LitDeepSpeedStrategy)
    engine = strategy.deepspeed_engine
    assert engine.zero_optimization_stage() == stage and engine.bfloat16_enabled()
    assert str(trainer.precision) == "bf16-mixed" and strategy.derived["precision"] == "bf16-mixed"
    assert engine.zero_reduce_bucket_size() == strategy.derived["zero_optimization.reduce_bucket_size"]
    assert module.model is not None
    assert any(hasattr(p, "ds_id") for p in module.model.parameters()) == (stage == 3)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    first = tmp_path / "full" / f"epoch=0-step={EPOCH}.ckpt"
    assert first.is_dir()  # a DeepSpeed checkpoint folder
    full = full_state_dict(module.model)
    _, resumed, resumed_losses = _fit(name, 2 * EPOCH, tmp_path / "resumed", ckpt_path=first)
    assert resumed.model is not None
    torch.testing.assert_close(resumed_losses, losses[EPOCH:], rtol=0, atol=1e-5)
    again = full_state_dict(resumed.model)
    for key, value in full.items():
        torch.testing.assert_close(again[key], value, rtol=0, atol=1e-5, msg=key)


@pytest.mark.parametrize("name", ["lit_deepspeed_stage_2_offload", "lit_deepspeed_stage_3_offload"])
def test_offload_names_step_with_deepspeed_cpu_adam_on_the_schedule(tmp_path: Path, name: str) -> None:
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    trainer, module, losses = _fit(name, 3, tmp_path)  # compiles DeepSpeed's cpu_adam op on first use
    engine = trainer.strategy.deepspeed_engine  # type: ignore[attr-defined]
    assert isinstance(engine.basic_optimizer, DeepSpeedCPUAdam)
    assert all(torch.isfinite(torch.tensor(losses)))
    total = int(trainer.estimated_stepping_batches)
    expected = 1e-3 * warmup_cosine(trainer.global_step, 1, total, module.hparams.min_lr_ratio)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.get_last_lr()[0] == pytest.approx(expected)
    assert engine.basic_optimizer.param_groups[0]["lr"] == pytest.approx(expected)


def test_registered_names_and_full_parameters_on_one_gpu(tmp_path: Path) -> None:
    (rank,) = run_worker(tmp_path, "defaults", nproc=1, accelerator="gpu", timeout=900)
    assert torch.isfinite(torch.tensor(rank["runs"].pop("validate")["val_loss"]))
    for name, rec in rank["runs"].items():
        assert rec["bf16"] is True and torch.isfinite(torch.tensor(rec["loss"])), name
        assert rec["master_checks"] == {"edited_rows": True, "other_rows_unchanged": True}, name


@pytest.mark.multigpu
def test_zero_1_2_3_match_ddp_and_resume_on_two_gpus(tmp_path: Path) -> None:
    ranks = run_worker(tmp_path, "compare", nproc=2, accelerator="gpu", timeout=900)
    # fp32 on GPUs: DDP's all-reduce and ZeRO's reduce-scatter sum in different orders.
    check_compare(tmp_path, ranks, atol=1e-3, resume_atol=1e-5)
