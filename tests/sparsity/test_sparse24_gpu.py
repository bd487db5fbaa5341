"""2:4 sparse training on the GPU under DeepSpeed ZeRO 1/2/3 (``-m gpu``): the layers run on cuSPARSELt, masks
are computed from the gathered weights, masked decay goes through the gradient hooks, and the exported model
holds the zeros. The CPU matrix (``tests/matrix``) checks the same rows for rank agreement and exact resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from _helpers import quiet_trainer
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from lit_accel.callbacks import SemiStructuredSparsity
from lit_accel.models import CausalLM, full_state_dict
from lit_accel.sparsity import MASKS_FILE

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("strategy", ["deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3"])
def test_sparse24_under_deepspeed(tmp_path: Path, strategy: str) -> None:
    pytest.importorskip("deepspeed")
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 4096, (8 * 2, 64), generator=g)
    loader: DataLoader[Any] = DataLoader([{"input_ids": x} for x in data], batch_size=2)  # type: ignore[arg-type]
    module = CausalLM("llama-tiny", warmup_steps=1, learning_rate=1e-3)
    cb = SemiStructuredSparsity(
        targets="mlp", dense_warmup_steps=2, mask_refresh_every=3, kernel="cusparselt", export_dir=str(tmp_path / "x")
    )
    hooks: list[int] = []

    class Watch(L.Callback):
        def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, opt: Any) -> None:
            hooks.append(len(cb._decay_hooks))

    trainer = quiet_trainer(
        accelerator="gpu",
        strategy=strategy,
        precision="bf16-mixed",
        max_steps=8,
        default_root_dir=tmp_path,
        callbacks=[cb, Watch()],
    )
    trainer.fit(module, train_dataloaders=loader)
    assert cb.phase == "sparse" and cb.refreshes == 2  # steps 2 and 5
    assert set(cb.kernels.values()) == {"cusparselt"}, cb.kernel_reasons
    assert hooks and all(n == len(cb.layers) == 6 for n in hooks)  # masked decay through the hooks
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    for name, mask in cb.masks.items():
        rows = mask.reshape(mask.shape[0], -1, 4).sum(-1)
        cols = mask.t().reshape(mask.shape[1], -1, 4).sum(-1)
        assert bool((rows == 2).all() and (cols == 2).all()), name
    assert module.model is not None
    state = full_state_dict(module.model)
    assert all(torch.isfinite(v.float()).all() for v in state.values())
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "x")
    masks = torch.load(tmp_path / "x" / MASKS_FILE)
    weight = dict(exported.named_parameters())["model.layers.0.mlp.up_proj.weight"]
    assert bool((weight.detach()[~masks["model.layers.0.mlp.up_proj"]] == 0).all())
