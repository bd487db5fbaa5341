"""DropBP on the GPU under DeepSpeed ZeRO 1/2/3 (``-m gpu``): runs, measures, allocates, trains."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lit_accel.callbacks import DropBP
from lit_accel.models import CausalLM, full_state_dict

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("strategy", ["deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3"])
def test_dropbp_under_deepspeed(tmp_path, strategy: str) -> None:
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 4096, (8 * 2, 64), generator=g)
    loader = DataLoader([{"input_ids": x} for x in data], batch_size=2)
    module = CausalLM("llama-tiny", warmup_steps=1, learning_rate=1e-3)
    cb = DropBP(target=0.5, sensitivity="auto", sensitivity_at=2)
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        strategy=strategy,
        precision="bf16-mixed",
        max_steps=8,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        limit_val_batches=0,
        callbacks=[cb],
    )
    trainer.fit(module, train_dataloaders=loader)
    assert cb.measured and len(cb.rates) == 4
    assert all(s >= 0 for s in cb.sensitivities) and max(cb.sensitivities) > 0
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    state = full_state_dict(module.model)
    assert all(torch.isfinite(v.float()).all() for v in state.values())
