"""Quality of 2:4 sparse training: validation loss of 2:4 MLPs against dense after the same steps.

Every run starts from the same random init (same seed), sees the same batches and uses the same schedule; the only
difference is the ``SemiStructuredSparsity`` callback (MLP linears, transposable masks refreshed every 40 steps,
masked decay). Variants: dense; 2:4 from the first step; and the paper's schedule, a dense warm-up and a dense
fine-tune around the sparse phase. The masked path and the cuSPARSELt path compute the same numbers (the kernel
changes the speed only), so the masked path is used here on any device. Runs on CPU at the default tiny size in a
few minutes; on the GPU at llama-125m:

    python benchmarks/sparse24_quality.py --results benchmarks/RESULTS.md
    python benchmarks/sparse24_quality.py --accelerator gpu --preset llama-125m --layers 12 --vocab 32000 \\
        --seq 1024 --batch 16 --steps 600 --lr 6e-4 --results $OUT/RESULTS.md
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import lightning as L
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import write_results
from quality_common import add_quality_arguments, quality_datamodule, quality_trainer, val_loss

from lit_accel.callbacks import SemiStructuredSparsity
from lit_accel.data import TextDataModule
from lit_accel.models import CausalLM


def _run(args: argparse.Namespace, dm: TextDataModule, callbacks: list[L.Callback]) -> tuple[float, float]:
    L.seed_everything(args.seed)
    overrides = {"num_hidden_layers": args.layers, "vocab_size": args.vocab}
    module = CausalLM(
        args.preset, config_overrides=overrides, learning_rate=args.lr, warmup_steps=args.steps // 20, min_lr_ratio=0.1
    )
    trainer = quality_trainer(args, args.steps, callbacks)
    t0 = time.time()
    trainer.fit(module, datamodule=dm)
    seconds = time.time() - t0
    loss = val_loss(trainer, module, dm)
    return loss, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_quality_arguments(parser)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    dm = quality_datamodule(args, args.vocab, None if args.accelerator != "cpu" else 2_000_000)
    tenth = args.steps // 10
    variants: list[tuple[str, list[L.Callback]]] = [
        ("dense", []),
        ("2:4 MLPs from step 0", [SemiStructuredSparsity(targets="mlp", dense_warmup_steps=0)]),
        (
            f"2:4 MLPs, dense warm-up {tenth} steps + dense fine-tune last 10%",
            [SemiStructuredSparsity(targets="mlp", dense_warmup_steps=tenth, dense_finetune_fraction=0.1)],
        ),
    ]
    rows = []
    dense_loss = None
    for name, callbacks in variants:
        loss, seconds = _run(args, dm, callbacks)
        dense_loss = loss if dense_loss is None else dense_loss
        rows.append([name, args.steps, loss, loss - dense_loss, seconds])
        print(rows[-1], flush=True)
    tokens = args.batch * args.seq
    text = write_results(
        f"2:4 sparse training quality: validation loss against dense ({args.preset}, {args.layers} blocks)",
        ["run", "steps", "val loss", "minus dense", "train seconds"],
        rows,
        args.results,
        notes=f"{args.preset}, {args.layers} blocks, vocab {args.vocab}, on the embedded corpus, {args.accelerator},"
        f" batch {args.batch}x{args.seq} = {tokens} tokens/step, AdamW lr {args.lr}, warm-up {args.steps // 20} +"
        " cosine; same init, batches and schedule in every run; SemiStructuredSparsity on the MLP linears"
        " (transposable masks refreshed every 40 steps, masked decay 2e-4, masked kernel).",
    )
    print(text)


if __name__ == "__main__":
    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    main()
