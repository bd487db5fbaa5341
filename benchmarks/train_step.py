"""Training step of lit_accel's ``CausalLM`` in a Lightning ``Trainer`` against a raw Hugging Face + torch loop.

Same model config, same random token batches, bf16 autocast with fp32 master weights, fused AdamW, in one
process on one GPU. Reports median ms/step over repeats, tokens/s, the ratio raw/ours (> 1 means ours is
faster) and peak memory, and appends the table to a results file.

    python benchmarks/train_step.py                                   # llama-125m 16x2048 and llama-1b 8x2048
    python benchmarks/train_step.py --sizes llama-125m:16:2048 --results $OUT/RESULTS.md
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Measurement, measure, write_results

from lit_accel.models import CausalLM


class RandomTokens(Dataset):
    """Fixed random token sequences (the same for both loops)."""

    def __init__(self, n: int, seq_len: int, vocab: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, vocab, (n, seq_len), generator=g)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.data[i]}


def loader(ds: Dataset, batch: int) -> DataLoader:
    return DataLoader(ds, batch_size=batch, shuffle=False, drop_last=True, pin_memory=True)


def raw_loop(preset: str, batch: int, seq_len: int, warmup: int, iters: int, repeats: int) -> Measurement:
    """The plain loop a user would write: HF model, autocast bf16, fused AdamW, same decay groups as ours."""
    module = CausalLM(preset)  # only to build the identical HF model
    module.configure_model()
    model = module.model.cuda()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=3e-4,
        betas=(0.9, 0.95),
        fused=True,
    )
    ds = RandomTokens(batch * (warmup + iters * repeats + 1), seq_len, model.config.vocab_size)
    it = iter(loader(ds, batch))

    def step() -> None:
        x = next(it)["input_ids"].cuda(non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    result = measure("raw HF + torch", step, warmup=warmup, iters=iters, repeats=repeats)
    return result


class _StepTimer(L.Callback):
    """CUDA events around windows of ``iters`` training batches, after ``warmup`` batches."""

    def __init__(self, warmup: int, iters: int, repeats: int) -> None:
        self.warmup, self.iters, self.repeats = warmup, iters, repeats
        self.events: list[tuple[Any, Any]] = []
        self.peak_gib = float("nan")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        k = idx - self.warmup
        if k == 0:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        if k >= 0 and k % self.iters == 0 and k // self.iters < self.repeats:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self.events.append((start, None))

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, out: Any, batch: Any, idx: int
    ) -> None:
        k = idx - self.warmup + 1
        if k > 0 and k % self.iters == 0 and k // self.iters <= self.repeats:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.events[-1] = (self.events[-1][0], end)
        if k == self.iters * self.repeats:
            torch.cuda.synchronize()
            self.peak_gib = torch.cuda.max_memory_allocated() / 2**30


def lightning_loop(
    preset: str,
    batch: int,
    seq_len: int,
    warmup: int,
    iters: int,
    repeats: int,
    callbacks: list[L.Callback] | None = None,
    name: str = "lit_accel CausalLM (Lightning)",
) -> Measurement:
    """Times ``CausalLM`` in a real ``Trainer`` (bf16-mixed), with optional extra callbacks."""
    module = CausalLM(preset, warmup_steps=10)
    timer = _StepTimer(warmup, iters, repeats)
    steps = warmup + iters * repeats
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
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
    result = Measurement(name)
    result.times_ms = [s.elapsed_time(e) / iters for s, e in timer.events]
    result.peak_gib = timer.peak_gib
    del trainer, module
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", nargs="+", default=["llama-125m:16:2048", "llama-1b:8:2048"], help="preset:batch:seq_len entries"
    )
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for spec in args.sizes:
        preset, b, t = spec.split(":")
        batch, seq = int(b), int(t)
        results = []
        for fn in (raw_loop, lightning_loop):
            torch.manual_seed(0)
            results.append(fn(preset, batch, seq, args.warmup, args.iters, args.repeats))
            gc.collect()
            torch.cuda.empty_cache()
        raw = results[0]
        for r in results:
            tok_s = batch * seq / (r.median_ms / 1e3)
            rows.append(
                [
                    preset,
                    f"{batch}x{seq}",
                    r.name,
                    r.median_ms,
                    r.spread_ms,
                    f"{tok_s / 1e3:.1f}k",
                    raw.median_ms / r.median_ms,
                    r.peak_gib,
                ]
            )
            print(rows[-1], flush=True)
    text = write_results(
        "Training step: CausalLM (Lightning) vs raw Hugging Face loop",
        ["model", "batch", "loop", "median ms/step", "spread ms", "tokens/s", "speed vs raw", "peak GiB"],
        rows,
        args.results,
        notes=f"bf16 autocast, fp32 master weights, fused AdamW, sdpa attention; {args.repeats} windows of"
        f" {args.iters} steps after {args.warmup} warm-up steps; 'speed vs raw' = raw ms / this ms.",
    )
    print(text)


if __name__ == "__main__":
    main()
