"""Scaling: tokens/s per GPU from 1 to N GPUs, dense and with each technique (goal >= 90% efficiency).

Each (GPU count, strategy, variant) runs in its own process: Lightning's launcher then starts one process per GPU
from that command, as in any Lightning script. The per-GPU batch is fixed (weak scaling), so efficiency =
(tokens/s per GPU at N) / (tokens/s per GPU at 1). Rank 0 writes each point's JSON; the driver collects them into a
table appended to RESULTS.md.

    python benchmarks/scaling.py --gpus 1                          # the 1-GPU point of every variant
    python benchmarks/scaling.py --gpus 1 2 4 8 --strategy lit_deepspeed_stage_2 --results $OUT/RESULTS.md
    python benchmarks/scaling.py --gpus 1 8 --variants dense dropbp lora --preset llama-1b --batch 8
    python benchmarks/scaling.py --gpus 2 --variants dense --ddp gradient_as_bucket_view=true bucket_cap_mb=100
    python benchmarks/scaling.py --gpus 2 --variants dense --ddp comm_hook=bf16   # bf16-compressed all-reduce
    python benchmarks/scaling.py --gpus 1 2 --strategy lit_ddp --results $OUT/RESULTS.md   # lit_accel's DDP defaults
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

VARIANTS = ("dense", "dropbp", "lora", "factorize", "sparsity24", "pruning")


def _callbacks(variant: str) -> list[Any]:
    from lit_accel.callbacks import DropBP, LoRA, LowRankFactorization, SemiStructuredSparsity, StructuredPruning

    if variant == "dense":
        return []
    if variant == "dropbp":
        return [DropBP(target=0.5, sensitivity="uniform")]
    if variant == "lora":
        return [LoRA(targets="all-linear", r=16, alpha=32)]
    if variant == "factorize":
        return [LowRankFactorization("attention", rank=256)]
    if variant == "sparsity24":
        return [SemiStructuredSparsity(targets="mlp", dense_warmup_steps=0)]
    if variant == "pruning":
        return [StructuredPruning(param_ratio=0.5)]
    raise ValueError(f"variant={variant!r}; allowed: {VARIANTS}")


def _ddp_kwargs(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs (YAML values) as DDPStrategy arguments; ``comm_hook=bf16|fp16`` picks a compression hook."""
    import yaml

    kwargs: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--ddp takes KEY=VALUE pairs, got {pair!r}")
        if key == "comm_hook":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            hooks = {"bf16": default_hooks.bf16_compress_hook, "fp16": default_hooks.fp16_compress_hook}
            if value not in hooks:
                raise SystemExit(f"--ddp comm_hook must be one of {sorted(hooks)}, got {value!r}")
            kwargs["ddp_comm_hook"] = hooks[value]
        else:
            kwargs[key] = yaml.safe_load(value)
    return kwargs


def _child(args: argparse.Namespace) -> None:
    import lightning as L
    import torch
    from train_step import RandomTokens, _StepTimer, loader

    import lit_accel.strategies  # noqa: F401  (registers the lit_deepspeed_* names)
    from lit_accel.models import CausalLM

    torch.backends.cuda.matmul.allow_tf32 = True
    module = CausalLM(args.preset, warmup_steps=10)
    timer = _StepTimer(args.warmup, args.iters, args.repeats)
    steps = args.warmup + args.iters * args.repeats
    # One GPU is the single-device baseline whatever the DDP flavour; DeepSpeed names keep their engine.
    strategy: Any = args.strategy if args.devices > 1 or args.strategy not in ("ddp", "lit_ddp") else "auto"
    if strategy in ("ddp", "lit_ddp") and args.ddp:
        from lit_accel.strategies import resolve_strategy

        strategy = resolve_strategy(strategy, **_ddp_kwargs(args.ddp))
    trainer = L.Trainer(
        accelerator="gpu",
        devices=args.devices,
        strategy=strategy,
        precision="bf16-mixed",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[timer, *_callbacks(args.variant)],
    )
    world = args.devices
    ds = RandomTokens(args.batch * world * (steps + 1), args.seq, module.config.vocab_size)
    trainer.fit(module, train_dataloaders=loader(ds, args.batch))
    if trainer.is_global_zero:
        times = [s.elapsed_time(e) / args.iters for s, e in timer.events]
        with open(args.out, "w") as f:
            json.dump({"times_ms": times, "peak_gib": timer.peak_gib}, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=[1], help="GPU counts to measure")
    parser.add_argument(
        "--strategy", default="ddp", help="ddp, lit_ddp or a DeepSpeed name (lit_deepspeed_stage_2 ...)"
    )
    parser.add_argument(
        "--ddp", nargs="*", default=[], metavar="KEY=VALUE", help="DDPStrategy arguments for the multi-GPU ddp runs"
    )
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--preset", default="llama-125m")
    parser.add_argument("--batch", type=int, default=16, help="sequences per GPU")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="dense", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ddp and args.strategy not in ("ddp", "lit_ddp"):
        parser.error(f"--ddp sets DDPStrategy arguments: it needs --strategy ddp or lit_ddp, not {args.strategy!r}")
    if args.child:
        _child(args)
        return

    import statistics

    from harness import write_results

    label = args.strategy + (f" ({', '.join(args.ddp)})" if args.ddp else "")
    rows = []
    for variant in args.variants:
        per_gpu: dict[int, float] = {}
        for n in args.gpus:
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
                out = tmp.name
            cmd = [sys.executable, os.path.abspath(__file__), "--child", "--devices", str(n), "--variant", variant]
            cmd += ["--strategy", args.strategy, "--preset", args.preset, "--batch", str(args.batch)]
            cmd += ["--seq", str(args.seq), "--warmup", str(args.warmup), "--iters", str(args.iters)]
            cmd += ["--repeats", str(args.repeats), "--out", out]
            if args.ddp:
                cmd += ["--ddp", *args.ddp]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0 or not os.path.getsize(out):
                print(f"{variant} x{n}: FAILED\n{proc.stderr[-3000:]}", flush=True)
                continue
            with open(out) as f:
                res = json.load(f)
            os.unlink(out)
            ms = statistics.median(res["times_ms"])
            tok_s_gpu = args.batch * args.seq / (ms / 1e3)
            per_gpu[n] = tok_s_gpu
            base = per_gpu.get(min(per_gpu))
            eff = tok_s_gpu / base if base else float("nan")
            rows.append(
                [
                    variant,
                    n,
                    label,
                    ms,
                    f"{tok_s_gpu / 1e3:.1f}k",
                    f"{tok_s_gpu * n / 1e3:.1f}k",
                    eff,
                    res["peak_gib"],
                ]
            )
            print(rows[-1], flush=True)
    text = write_results(
        f"Scaling: {args.preset}, {args.batch}x{args.seq} per GPU, {label}",
        [
            "variant",
            "GPUs",
            "strategy",
            "median ms/step",
            "tokens/s per GPU",
            "tokens/s total",
            "efficiency",
            "peak GiB (rank 0)",
        ],
        rows,
        args.results,
        notes="Weak scaling (fixed per-GPU batch); efficiency = tokens/s per GPU over the smallest GPU count's;"
        " bf16-mixed, CausalLM defaults (kernels on).",
    )
    print(text)


if __name__ == "__main__":
    main()
