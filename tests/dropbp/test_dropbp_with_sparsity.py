"""DropBP composes with 2:4 sparsity: both callbacks in one CPU Trainer."""

from __future__ import annotations

import lightning as L
import torch
from dropbp_helpers import random_loader, trainer_kwargs

from lit_accel.callbacks import DropBP, SemiStructuredSparsity
from lit_accel.models import CausalLM
from lit_accel.sparsity.functional import SparseLinear


class _Grads(L.Callback):
    def __init__(self) -> None:
        self.none_counts: list[int] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        mlp = [m for m in pl_module.modules() if isinstance(m, SparseLinear)]
        self.none_counts.append(sum(m.weight.grad is None for m in mlp))


def test_dropbp_and_24_sparsity_train_together() -> None:
    module = CausalLM(
        {
            "model_type": "llama",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 128,
            "max_position_embeddings": 64,
        },
        warmup_steps=1,
        learning_rate=1e-3,
    )
    sparse = SemiStructuredSparsity(
        targets="mlp", dense_warmup_steps=1, mask_refresh_every=2, dense_finetune_fraction=0.0
    )
    drop = DropBP(target=0.5, sensitivity="uniform")
    grads = _Grads()
    trainer = L.Trainer(max_steps=8, callbacks=[sparse, drop, grads], **trainer_kwargs())
    trainer.fit(module, random_loader(32))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    layers = [m for m in module.modules() if isinstance(m, SparseLinear)]
    assert len(layers) == 6  # gate, up, down of two blocks, all 2:4
    # DropBP really drops MLP sublayers of the sparse model: some steps leave their weights without gradient.
    assert any(n > 0 for n in grads.none_counts) and any(n == 0 for n in grads.none_counts)
