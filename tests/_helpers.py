"""Test-only callbacks, importable by class path from CLI configs, and tiny models shared by the tests (pytest
puts tests/ on sys.path)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning as L

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM


class CrashAtStep(L.Callback):
    """Raises at the start of optimizer step ``step``, as a crash would (after the checkpoints before it)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: object, idx: int) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash at step {self.step}")


def tiny_llama(
    layers: int = 2,
    *,
    intermediate_size: int = 128,
    vocab_size: int = 128,
    max_position_embeddings: int = 64,
    tie_word_embeddings: bool = False,
) -> LlamaForCausalLM:
    """A random LLaMA: hidden 64, 4 query heads over 2 KV heads (head_dim 16), by default intermediate 128, vocab
    128, 64 positions, untied; fresh, so in training mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
    )
    return LlamaForCausalLM(cfg)


def quiet_trainer(**overrides: Any) -> L.Trainer:
    """A Trainer on one CPU device without logger, progress bar, checkpoints, model summary or validation, logging
    every step; ``overrides`` replace or add any argument (``accelerator="gpu"``, ``strategy=...``)."""
    return L.Trainer(**quiet_trainer_kwargs(**overrides))


def quiet_trainer_kwargs(**overrides: Any) -> dict[str, Any]:
    """The arguments :func:`quiet_trainer` passes to ``L.Trainer``, for tests that build the Trainer themselves."""
    kw: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    kw.update(overrides)
    return kw


def finish_distributed() -> None:
    """Ends a torchrun worker: every rank's collectives finish before the interpreter tears gloo down (a rank once
    aborted at exit, "terminate called without an active exception", on the 2-core CI machine after a complete fit)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
