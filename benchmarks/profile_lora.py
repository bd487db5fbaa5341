"""Where a LoRA training step's time goes: CUDA kernels of the frozen-base floor and of our LoRA, side by side.

Same builders and step as ``benchmarks/lora.py``; ``torch.profiler`` over a few steps after warm-up, kernels grouped
by name, sorted by their CUDA time per step. Prints both tables, then the difference in total kernel time per
step (what the adapters add) and the per-kernel differences over the union of names, largest first (negative:
faster or absent in the LoRA step), so the cost of each adapter GEMM is visible.

    python benchmarks/profile_lora.py                    # llama-1b, 8 x 2048, r 16 on all linears
    python benchmarks/profile_lora.py --top 40 --steps 3
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lora import _step_fn, add_step_arguments, floor_model, lora_model


def _profile(model: torch.nn.Module, args: argparse.Namespace) -> dict[str, tuple[float, int]]:
    step = _step_fn(model, args.batch, args.seq_len)
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start.record()
        for _ in range(args.steps):
            step()
        end.record()
        torch.cuda.synchronize()
    print(f"  wall per step {start.elapsed_time(end) / args.steps:.1f} ms", flush=True)
    out: dict[str, tuple[float, int]] = {}
    for ev in prof.key_averages():
        t = float(getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0.0) or 0.0)
        if t > 0:
            out[ev.key] = (t / 1e3 / args.steps, ev.count // args.steps)
    return out


def _table(name: str, kernels: dict[str, tuple[float, int]], top: int) -> None:
    total = sum(ms for ms, _ in kernels.values())
    print(f"\n== {name}: kernel time {total:.1f} ms/step", flush=True)
    for key, (ms, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"{ms:8.2f} ms {n:6d}x  {key[:150]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_arguments(parser)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()

    print("floor: frozen base, no adapters", flush=True)
    model = floor_model(args.preset)
    floor = _profile(model, args)
    del model
    torch.cuda.empty_cache()
    print("lit_accel LoRA (default CUDA path)", flush=True)
    model = lora_model(args.preset, args.r)
    ours = _profile(model, args)
    _table("floor", floor, args.top)
    _table("ours", ours, args.top)
    total = sum(ms for ms, _ in ours.values()) - sum(ms for ms, _ in floor.values())
    print(f"\n== ours minus floor: {total:+.1f} ms/step of kernel time; by kernel (ms, calls ours/floor):", flush=True)
    none = (0.0, 0)
    diff = {k: (ours.get(k, none)[0] - floor.get(k, none)[0], ours.get(k, none)[1], floor.get(k, none)[1])
            for k in ours.keys() | floor.keys()}  # fmt: skip
    for key, (ms, n_ours, n_floor) in sorted(diff.items(), key=lambda kv: -abs(kv[1][0]))[: args.top]:
        print(f"{ms:+8.2f} ms {n_ours:5d}/{n_floor:<5d}  {key[:150]}")


if __name__ == "__main__":
    main()
