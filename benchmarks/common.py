"""What several suites share: random token batches, and a training step timed in a Lightning ``Trainer`` or in the
plain loop a user would write.

Both loops run on the context's device: bf16 autocast with fp32 master weights and fused AdamW on a GPU, fp32 on a
CPU (smoke runs). ``kernels`` chooses whether ``CausalLM`` patches the model with lit_accel's Triton kernels: the
baselines ("HF eager", "raw loop") pass ``kernels=False``, so a comparison against them is against Hugging Face's
own modules, never against a second patched loop.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from benchmarks.harness import Measurement, _peak_gib, _reset_peak, _sync, _Window, measure
from lit_accel.models import CausalLM

__all__ = ["RandomTokens", "StepTimer", "lightning_loop", "loader", "raw_loop"]


class RandomTokens(Dataset):
    """Fixed random token sequences (the same for every loop given the same seed)."""

    def __init__(self, n: int, seq_len: int, vocab: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, vocab, (n, seq_len), generator=g)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.data[i]}


def loader(ds: Dataset, batch: int) -> DataLoader:
    """In order, whole batches, pinned on a GPU machine."""
    return DataLoader(ds, batch_size=batch, shuffle=False, drop_last=True, pin_memory=torch.cuda.is_available())


def raw_loop(
    preset: str,
    batch: int,
    seq_len: int,
    warmup: int,
    iters: int,
    windows: int,
    device: torch.device,
    kernels: bool = False,
    name: str = "raw HF + torch loop",
    config_overrides: dict[str, Any] | None = None,
) -> Measurement:
    """The plain loop: the Hugging Face model ``CausalLM`` builds, autocast bf16 on a GPU, fused AdamW, the same
    weight-decay groups as ``CausalLM``; kernels off unless ``kernels``."""
    module = CausalLM(preset, kernels=kernels, config_overrides=config_overrides)
    module.configure_model()
    assert module.model is not None
    model = module.model.to(device)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=3e-4,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )
    ds = RandomTokens(batch * (warmup + iters * windows + 1), seq_len, model.config.vocab_size)
    it = iter(loader(ds, batch))
    gpu = device.type == "cuda"

    def step() -> None:
        x = next(it)["input_ids"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
            loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return measure(name, step, warmup=warmup, iters=iters, windows=windows, device=device)


class StepTimer(L.Callback):
    """Windows of ``iters`` training batches after ``warmup`` batches: CUDA events on a GPU, the clock on a CPU."""

    def __init__(self, warmup: int, iters: int, windows: int) -> None:
        self.warmup, self.iters, self.windows = warmup, iters, windows
        self.times_ms: list[float] = []
        self.peak_gib = float("nan")
        self._window: _Window | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        k = trainer.global_step - self.warmup
        device = pl_module.device
        if k == 0:
            _sync(device)
            _reset_peak(device)
        if k >= 0 and k % self.iters == 0 and k // self.iters < self.windows:
            self._window = _Window(device)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, out: Any, batch: Any, idx: int
    ) -> None:
        k = trainer.global_step - self.warmup
        if k > 0 and k % self.iters == 0 and self._window is not None:
            self.times_ms.append(self._window.stop() / self.iters)
            self._window = None
        if k == self.iters * self.windows:
            _sync(pl_module.device)
            self.peak_gib = _peak_gib(pl_module.device)


def lightning_loop(
    preset: str,
    batch: int,
    seq_len: int,
    warmup: int,
    iters: int,
    windows: int,
    device: torch.device,
    callbacks: list[L.Callback] | None = None,
    name: str = "lit_accel CausalLM (Lightning)",
    kernels: bool | None = None,
    config_overrides: dict[str, Any] | None = None,
    strategy: Any = "auto",
) -> Measurement:
    """Times ``CausalLM`` in a real ``Trainer`` (bf16-mixed on a GPU, fp32 on a CPU), with optional callbacks.

    ``kernels=None`` is ``CausalLM``'s default (lit_accel's kernels on CUDA).
    """
    module = CausalLM(preset, warmup_steps=10, kernels=kernels, config_overrides=config_overrides)
    timer = StepTimer(warmup, iters, windows)
    steps = warmup + iters * windows
    gpu = device.type == "cuda"
    trainer = L.Trainer(
        accelerator="gpu" if gpu else "cpu",
        devices=1,
        strategy=strategy,
        precision="bf16-mixed" if gpu else "32-true",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        log_every_n_steps=10,
        callbacks=[timer, *(callbacks or [])],
    )
    ds = RandomTokens(batch * (steps + 1), seq_len, module.config.vocab_size)
    trainer.fit(module, train_dataloaders=loader(ds, batch))
    result = Measurement(name, times_ms=list(timer.times_ms), peak_gib=timer.peak_gib)
    del trainer, module
    return result
