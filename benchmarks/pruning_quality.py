"""Quality at small scale: pruned + continued vs the same shape trained from scratch on the same tokens.

1. source: a dense model trained for ``--source-steps`` (the model one would prune);
2. prune: ``StructuredPruning`` to the target shape for ``--prune-steps`` (weights and masks train together), then
   :func:`lit_accel.pruning.export_pruned` gives a physically smaller model;
3. continue: that model trained for ``--continue-steps``;
4. scratch: the same shape from a random init trained for ``--prune-steps + --continue-steps`` (the tokens the
   pruned model saw after the source existed).
All runs share the data, tokenizer, validation set, batch size and schedule shape; the table gives the validation
loss of each at the end. Runs on CPU at the default tiny size in a few minutes; ``--accelerator gpu`` with a larger
preset for the GPU-scale figure.

    python benchmarks/pruning_quality.py --results benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any

import lightning as L
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import write_results
from quality_common import add_quality_arguments, quality_datamodule, quality_trainer, val_loss

from lit_accel.callbacks import StructuredPruning
from lit_accel.data import TextDataModule
from lit_accel.models import CausalLM
from lit_accel.pruning import export_pruned


def _fit(args: argparse.Namespace, module: CausalLM, dm: TextDataModule, steps: int, cbs: list[Any]) -> float:
    trainer = quality_trainer(args, steps, cbs)
    trainer.fit(module, datamodule=dm)
    return val_loss(trainer, module, dm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_quality_arguments(parser)
    parser.add_argument("--target", default="3,1,192,96", help="kept layers,kv heads,mlp channels,hidden dims")
    parser.add_argument("--source-steps", type=int, default=400)
    parser.add_argument("--prune-steps", type=int, default=60)
    parser.add_argument("--continue-steps", type=int, default=240)
    args = parser.parse_args()
    layers, kv, inter, hidden = (int(v) for v in args.target.split(","))
    dm = quality_datamodule(args, 1024, 2_000_000)
    overrides = {"num_hidden_layers": args.layers, "vocab_size": 1024}
    hp = {"learning_rate": args.lr, "warmup_steps": 10, "min_lr_ratio": 0.1}
    t0 = time.time()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        L.seed_everything(args.seed)
        source = CausalLM(args.preset, config_overrides=overrides, **hp)
        source_loss = _fit(args, source, dm, args.source_steps, [])
        source_dir = os.path.join(tmp, "source")
        source.save_hf(source_dir)
        n_source = sum(p.numel() for p in source.parameters())
        rows.append(["source (dense)", f"{n_source / 1e6:.2f}M", f"{args.source_steps} (its own)", source_loss])
        print(rows[-1], flush=True)

        L.seed_everything(args.seed)
        pruning = CausalLM(source_dir, **hp)
        cb = StructuredPruning(
            num_layers=layers,
            num_kv_heads=kv,
            intermediate_size=inter,
            hidden_size=hidden,
            lagrangian_warmup_steps=args.prune_steps // 2,
        )
        masked_loss = _fit(args, pruning, dm, args.prune_steps, [cb])
        assert pruning.model is not None
        small = export_pruned(pruning.model.cpu(), cb.masks).float()
        pruned_dir = os.path.join(tmp, "pruned")
        small.save_pretrained(pruned_dir)
        n_small = sum(p.numel() for p in small.parameters())
        rows.append(["pruned, masked (end of pruning)", f"{n_small / 1e6:.2f}M", args.prune_steps, masked_loss])
        print(rows[-1], flush=True)

        L.seed_everything(args.seed)
        cont = CausalLM(pruned_dir, **hp)
        trainer = quality_trainer(args, 0, [])
        exported_loss = val_loss(trainer, cont, dm)
        rows.append(
            ["pruned, exported (no further training)", f"{n_small / 1e6:.2f}M", args.prune_steps, exported_loss]
        )
        cont_loss = _fit(args, cont, dm, args.continue_steps, [])
        total = args.prune_steps + args.continue_steps
        rows.append(["pruned + continued", f"{n_small / 1e6:.2f}M", total, cont_loss])
        print(rows[-1], flush=True)

        L.seed_everything(args.seed)
        scratch = CausalLM(small.config.to_dict(), **hp)
        scratch_loss = _fit(args, scratch, dm, total, [])
        n_scratch = sum(p.numel() for p in scratch.parameters())
        rows.append(["same shape from scratch", f"{n_scratch / 1e6:.2f}M", total, scratch_loss])
        print(rows[-1], flush=True)
    tokens = args.batch * args.seq
    text = write_results(
        "Structured pruning quality at small scale: pruned + continued vs from scratch",
        ["model", "params", "training steps after the source", "val loss"],
        rows,
        args.results,
        notes=f"{args.preset} with {args.layers} blocks (vocab 1024) on the embedded corpus, {args.accelerator},"
        f" batch {args.batch}x{args.seq} = {tokens} tokens/step, AdamW lr {args.lr} warm-up 10 + cosine per run;"
        f" target {args.target} (layers, KV heads, MLP, hidden); 'pruned + continued' and 'from scratch' both train"
        f" {args.prune_steps + args.continue_steps} steps after the source; {time.time() - t0:.0f} s in all.",
    )
    print(text)


if __name__ == "__main__":
    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    main()
