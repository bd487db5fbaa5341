"""Lists host-device synchronisations in steady-state ``CausalLM`` training steps (a GPU diagnostic).

A sync stalls the CPU until the GPU drains its queue, so the next step's launches start late: every one found
in the per-step path is time the raw loop does not lose.

    python benchmarks/tools/find_syncs.py --preset llama-125m --batch 4 --seq_len 512
    python benchmarks/tools/find_syncs.py --raw          # the same model and batches in the plain loop

Random token batches of ``benchmarks/common.py``; bf16, fused AdamW and ``CausalLM``'s default (lit_accel's kernels
on CUDA) in both loops.
"""

from __future__ import annotations

import argparse
import collections
import sys
import traceback
import warnings
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.common import RandomTokens, loader
from lit_accel.models import CausalLM


class _Watch(L.Callback):
    def __init__(self, start: int) -> None:
        self.start = start
        self.sites: collections.Counter[str] = collections.Counter()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: object, idx: int) -> None:
        if idx == self.start:
            torch.cuda.set_sync_debug_mode("warn")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama-125m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--raw", action="store_true", help="a hand-written loop instead of the Trainer")
    args = parser.parse_args()
    watch = _Watch(start=5)

    def show(message: warnings.WarningMessage | str, category: type, filename: str, lineno: int, *rest: object) -> None:
        if "synchroniz" in str(message):
            stack = [f for f in traceback.extract_stack()[:-2] if "warnings.py" not in f.filename]
            site = " <- ".join(f"{f.filename.split('site-packages/')[-1]}:{f.lineno}" for f in stack[-4:][::-1])
            watch.sites[site] += 1

    warnings.showwarning = show  # type: ignore[assignment]
    warnings.simplefilter("always")
    module = CausalLM(args.preset, warmup_steps=5)
    batches = loader(RandomTokens(args.batch * (args.steps + 1), args.seq_len, module.config.vocab_size), args.batch)
    if args.raw:
        # The same model and batches in a hand-written loop, for comparison.
        module.configure_model()
        model = module.model.cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        for i, batch in enumerate(batches):
            if i == watch.start:
                torch.cuda.set_sync_debug_mode("warn")
            x = batch["input_ids"].cuda(non_blocking=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=x, labels=x, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i + 1 == args.steps:
                break
        _report(watch, args.steps)
        return
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        log_every_n_steps=10,
        callbacks=[watch],
    )
    trainer.fit(module, train_dataloaders=batches)
    _report(watch, args.steps)


def _report(watch: _Watch, total_steps: int) -> None:
    torch.cuda.set_sync_debug_mode("default")
    steps = total_steps - watch.start
    print(f"synchronisations in {steps} steady-state steps (site: count):")
    for site, count in watch.sites.most_common(20):
        print(f"  {count:4d}  {site}")


if __name__ == "__main__":
    main()
