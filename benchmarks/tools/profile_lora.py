"""Where a LoRA training step's time goes: CUDA kernels of the frozen-base floor and of our LoRA, side by side.

Same models and step as the ``lora`` suite's ``train_step`` (``benchmarks/suites/lora.py``: lit_accel's kernels on,
bf16 base, fp32 adapters, bf16 autocast); ``torch.profiler`` over a few steps after warm-up, kernels grouped by
name, sorted by their CUDA time per step. Prints both tables, then the difference in total kernel time per step
(what the adapters add) and the per-kernel differences over the union of names, largest first (negative: faster or
absent in the LoRA step), so the cost of each adapter GEMM is visible. ``--groups``: instead, the kernels of each
variant of the suite's ``shared_input_groups`` result (floor, per layer, group for q/k/v, gate/up, o, down).

    python benchmarks/tools/profile_lora.py                    # llama-1b, 8 x 2048, r 16 on all linears
    python benchmarks/tools/profile_lora.py --top 40 --steps 3
    python benchmarks/tools/profile_lora.py --groups           # 16384 tokens per sublayer input
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.suites.lora import (
    REAL,
    Sizes,
    batches,
    floor_model,
    group_case,
    lora_model,
    make_step,
    model_dims,
)
from lit_accel.ops.recompute import request_recompute


def _kernels(step: Callable[[], object], warmup: int, steps: int) -> dict[str, tuple[float, int]]:
    """Kernel name -> (CUDA ms per call of ``step``, launches per call), after ``warmup`` untimed calls."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start.record()
        for _ in range(steps):
            step()
        end.record()
        torch.cuda.synchronize()
    print(f"  wall per call {start.elapsed_time(end) / steps:.3f} ms", flush=True)
    out: dict[str, tuple[float, int]] = {}
    for ev in prof.key_averages():
        t = float(getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0.0) or 0.0)
        if t > 0:
            out[ev.key] = (t / 1e3 / steps, ev.count // steps)
    return out


def _table(name: str, kernels: dict[str, tuple[float, int]], top: int) -> None:
    total = sum(ms for ms, _ in kernels.values())
    print(f"\n== {name}: kernel time {total:.3f} ms per call", flush=True)
    for key, (ms, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"{ms:8.3f} ms {n:6d}x  {key[:150]}")


def _step_profile(sizes: Sizes, args: argparse.Namespace) -> None:
    device = torch.device("cuda")
    print("floor: frozen base, no adapters", flush=True)
    model = floor_model(sizes, device, kernels=True)
    xs = batches(model.config.vocab_size, sizes.batch, sizes.seq, device)
    floor = _kernels(make_step(model, xs, device)[0], args.warmup, args.steps)
    del model
    torch.cuda.empty_cache()
    print("lit_accel LoRA (default CUDA path)", flush=True)
    model = lora_model(sizes, device, kernels=True)
    ours = _kernels(make_step(model, xs, device)[0], args.warmup, args.steps)
    _table("floor", floor, args.top)
    _table("ours", ours, args.top)
    total = sum(ms for ms, _ in ours.values()) - sum(ms for ms, _ in floor.values())
    print(f"\n== ours minus floor: {total:+.1f} ms/step of kernel time; by kernel (ms, calls ours/floor):", flush=True)
    none = (0.0, 0)
    diff = {k: (ours.get(k, none)[0] - floor.get(k, none)[0], ours.get(k, none)[1], floor.get(k, none)[1])
            for k in ours.keys() | floor.keys()}  # fmt: skip
    for key, (ms, n_ours, n_floor) in sorted(diff.items(), key=lambda kv: -abs(kv[1][0]))[: args.top]:
        print(f"{ms:+8.2f} ms {n_ours:5d}/{n_floor:<5d}  {key[:150]}")


class _Consumer:
    """Keeps the fused kernels recording recompute recipes while the groups run (as a LoRA layer would)."""


def _group_profile(sizes: Sizes, args: argparse.Namespace) -> None:
    device = torch.device("cuda")
    hidden, mlp, kv = model_dims(sizes)
    consumer = _Consumer()
    request_recompute(consumer)
    inputs = [("q/k/v", "norm", hidden, [hidden, kv, kv]), ("gate/up", "norm", hidden, [mlp, mlp]),
              ("o", "plain", hidden, [hidden]), ("down", "swiglu", mlp, [hidden])]  # fmt: skip
    for label, producer, in_f, outs in inputs:
        case = group_case(args.tokens, producer, in_f, outs, sizes.r, device)
        for variant in ("floor", "per layer", "group"):
            print(f"{label} {variant}", flush=True)
            _table(f"{label} {variant}", _kernels(case.step(variant), args.warmup, 10), args.top)
        del case
        torch.cuda.empty_cache()
    del consumer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=REAL.preset)
    parser.add_argument("--batch", type=int, default=REAL.batch)
    parser.add_argument("--seq_len", type=int, default=REAL.seq)
    parser.add_argument("--r", type=int, default=REAL.r)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--groups", action="store_true", help="profile the shared-input group variants instead")
    parser.add_argument("--tokens", type=int, default=REAL.tokens, help="--groups: M = batch x sequence")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/tools/profile_lora.py needs a CUDA GPU")
    sizes = dataclasses.replace(REAL, preset=args.preset, batch=args.batch, seq=args.seq_len, r=args.r)
    if args.groups:
        _group_profile(sizes, args)
    else:
        _step_profile(sizes, args)


if __name__ == "__main__":
    main()
