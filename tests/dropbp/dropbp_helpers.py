"""Tiny models, reference computations and recording callbacks shared by the DropBP tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from _helpers import quiet_trainer_kwargs as trainer_kwargs  # noqa: F401  (re-exported for the DropBP tests)
from _helpers import tiny_gpt2  # noqa: F401  (re-exported for the DropBP tests)
from torch import nn
from torch.utils.data import DataLoader

from lit_accel.dropbp import DropBP
from lit_accel.models.structure import Sublayer

VOCAB = 128
"""The vocabulary of ``_helpers.tiny_gpt2`` and ``_helpers.tiny_llama``."""


def enable_checkpointing(model: Any) -> None:
    """HF activation checkpointing, non-reentrant (transformers 5 name, with the v4 name as fallback)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()


@contextmanager
def detached_outputs(sublayers: list[Sublayer], dropped: list[int]) -> Iterator[None]:
    """The hand-written reference of a dropped sublayer: ``x + f(norm(x)).detach()``."""

    def detach(_m: nn.Module, _args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (output[0].detach(), *output[1:])
        return output.detach()

    handles = [sublayers[i].module.register_forward_hook(detach) for i in dropped]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters() if p.requires_grad}


def random_loader(n: int, seq_len: int = 16, batch_size: int = 4, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, VOCAB, (n, seq_len), generator=g)
    return DataLoader([{"input_ids": x} for x in data], batch_size=batch_size)  # type: ignore[arg-type]


class Recorder(L.Callback):
    """Records, per training batch, the optimizer step, DropBP's mask and the loss."""

    def __init__(self, dropbp: DropBP) -> None:
        self.dropbp = dropbp
        self.steps: list[int] = []
        self.masks: list[tuple[bool, ...]] = []
        self.losses: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        assert self.dropbp.controller is not None and self.dropbp.mask is not None
        assert self.dropbp.controller.mask == self.dropbp.mask
        self.steps.append(trainer.global_step)
        self.masks.append(self.dropbp.mask)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        self.losses.append(float(outputs["loss"]))
