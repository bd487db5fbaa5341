"""Tokens/s of a pruned model's shape against the original: llama-1b vs llama-1b-half, same run.

Training: the plain loop (bf16 autocast, fp32 master weights, fused AdamW, the same random batches) on the model
``CausalLM`` builds (with its default CUDA kernels). Inference: forward passes under ``torch.no_grad`` with bf16
weights. The pruned shape is the ``llama-1b-half`` target of ``lit_accel.pruning.targets.TARGET_PRESETS`` (what
``recipes/prune_continue`` exports); its weights are random here, which does not change the speed.

    python benchmarks/pruning.py --results $OUT/RESULTS.md
    python benchmarks/pruning.py --source llama-20m --target llama-20m-half --batch 16 --seq 1024
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Measurement, measure, write_results

from lit_accel.models import CausalLM
from lit_accel.pruning.targets import TARGET_PRESETS


def _model(preset: str, overrides: dict[str, int] | None) -> torch.nn.Module:
    module = CausalLM(preset, config_overrides=overrides)
    module.configure_model()
    assert module.model is not None
    return module.model.cuda()


def train_step(model: torch.nn.Module, batch: int, seq: int, args: argparse.Namespace) -> Measurement:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=3e-4, fused=True
    )
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, model.config.vocab_size, (4, batch, seq), generator=g).cuda()
    state = {"i": 0}

    def step() -> None:
        x = data[state["i"] % 4]
        state["i"] += 1
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    model.train()
    result = measure("train", step, warmup=args.warmup, iters=args.iters, repeats=args.repeats)
    return result


def inference(model: torch.nn.Module, batch: int, seq: int, args: argparse.Namespace) -> Measurement:
    model = model.to(torch.bfloat16).eval()
    x = torch.randint(0, model.config.vocab_size, (batch, seq), device="cuda")

    def step() -> None:
        with torch.no_grad():
            model(input_ids=x, use_cache=False)

    return measure("inference", step, warmup=args.warmup, iters=args.iters, repeats=args.repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="llama-1b", help="model preset of the original")
    parser.add_argument("--target", default="llama-1b-half", help="pruning target preset (TARGET_PRESETS)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
    args = parser.parse_args()
    if args.target not in TARGET_PRESETS:
        parser.error(f"--target {args.target!r}: allowed {sorted(TARGET_PRESETS)}")
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    timings: dict[tuple[str, str], Measurement] = {}
    params: dict[str, int] = {}
    for name, overrides in ((args.source, None), (args.target, TARGET_PRESETS[args.target])):
        for kind in ("train", "inference"):
            torch.manual_seed(0)
            model = _model(args.source, overrides)
            params[name] = sum(p.numel() for p in model.parameters())
            fn = train_step if kind == "train" else inference
            timings[(name, kind)] = fn(model, args.batch, args.seq, args)
            del model
            gc.collect()
            torch.cuda.empty_cache()
            m = timings[(name, kind)]
            print(f"{name} {kind}: {m.median_ms:.1f} ms, {m.peak_gib:.1f} GiB", flush=True)
    tokens = args.batch * args.seq
    for kind in ("train", "inference"):
        base = timings[(args.source, kind)]
        for name in (args.source, args.target):
            m = timings[(name, kind)]
            rows.append(
                [
                    kind,
                    name,
                    f"{params[name] / 1e6:.1f}M",
                    f"{args.batch}x{args.seq}",
                    m.median_ms,
                    m.spread_ms,
                    f"{tokens / (m.median_ms / 1e3) / 1e3:.1f}k",
                    base.median_ms / m.median_ms,
                    m.peak_gib,
                ]
            )
    text = write_results(
        f"Pruned shape vs original: {args.source} vs {args.target}",
        ["pass", "model", "params", "batch", "median ms", "spread ms", "tokens/s", "speed vs original", "peak GiB"],
        rows,
        args.results,
        notes="train: bf16 autocast, fp32 master weights, fused AdamW, CausalLM's default CUDA kernels; inference:"
        f" bf16 weights, no grad; {args.repeats} windows of {args.iters} after {args.warmup} warm-up.",
    )
    print(text)


if __name__ == "__main__":
    main()
