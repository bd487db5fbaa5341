"""LoRA training step on the GPU: ours (fused path and PEFT-equal path) against PEFT and the floor.

The floor is the same frozen bf16 base with the backward through the activations and no adapters at all
(what any adapter method must at least pay). Same model, batch and optimizer settings for all, one process.

    python benchmarks/lora.py --results $OUT/RESULTS.md          # llama-1b, 8 x 2048, r 16 on all linears
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import sys
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Measurement, measure, write_results

import lit_accel.lowrank.lora_groups as groups_module
from lit_accel.lowrank import apply_lora, lora_layers
from lit_accel.models import CausalLM


def _base(preset: str) -> torch.nn.Module:
    module = CausalLM(preset)
    with torch.device("cuda"):
        module.configure_model()
    model = module.model.to(torch.bfloat16)
    model.requires_grad_(False)
    return model


def floor_model(preset: str) -> torch.nn.Module:
    """The frozen base with the backward through every layer's activations and no weight gradients."""
    model = _base(preset)
    model.enable_input_require_grads()
    return model


def lora_model(preset: str, r: int, recompute_inputs: bool = True, use_kernel: bool | None = None) -> torch.nn.Module:
    """The frozen base with our adapters on all linears (alpha = 2 r); ``recompute_inputs`` as ``apply_lora``'s,
    ``use_kernel`` as ``LoRALinear.use_kernel`` (False: PEFT's computation)."""
    model = _base(preset)
    apply_lora(model, targets="all-linear", r=r, alpha=2 * r, recompute_inputs=recompute_inputs)
    for layer in lora_layers(model).values():
        layer.use_kernel = use_kernel
    return model


def add_step_arguments(parser: argparse.ArgumentParser) -> None:
    """The model and batch arguments this script and ``profile_lora.py`` share."""
    parser.add_argument("--preset", default="llama-1b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)


def _step_fn(model: torch.nn.Module, batch: int, seq: int) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True) if params else None
    g = torch.Generator(device="cuda").manual_seed(0)
    xs = [torch.randint(0, model.config.vocab_size, (batch, seq), device="cuda", generator=g) for _ in range(4)]
    state = {"i": 0}

    def step() -> None:
        x = xs[state["i"] % len(xs)]
        state["i"] += 1
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def _run(name: str, build: Callable[[], torch.nn.Module], args: argparse.Namespace) -> Measurement:
    model = build()
    result = measure(
        name, _step_fn(model, args.batch, args.seq_len), warmup=args.warmup, iters=args.iters, repeats=args.repeats
    )
    result.extra["trainable_M"] = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
    print(name, f"{result.median_ms:.1f} ms", f"{result.peak_gib:.1f} GiB", flush=True)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_arguments(parser)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
    parser.add_argument("--pytorch-path", action="store_true", help="also time the plain-PyTorch (PEFT-equal) path")
    args = parser.parse_args()
    r, alpha = args.r, 2 * args.r

    floor = functools.partial(floor_model, args.preset)

    def peft() -> torch.nn.Module:
        from peft import LoraConfig, get_peft_model

        return get_peft_model(_base(args.preset), LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear"))

    ours = functools.partial(lora_model, args.preset, r)

    results: list[Measurement] = [_run("floor: frozen base, no adapters", floor, args)]
    results.append(_run("PEFT LoRA", peft, args))
    keep_inputs = functools.partial(ours, recompute_inputs=False)
    results.append(_run("lit_accel LoRA (default CUDA path: shared-input groups, recompute_inputs=True)", ours, args))
    results.append(_run("lit_accel LoRA, recompute_inputs=False", keep_inputs, args))
    group_devices = groups_module._GROUP_DEVICES
    groups_module._GROUP_DEVICES = ()
    try:
        results.append(_run("lit_accel LoRA, no shared-input groups (one node per linear)", ours, args))
    finally:
        groups_module._GROUP_DEVICES = group_devices
    if args.pytorch_path:
        peft_equal = functools.partial(ours, use_kernel=False)
        results.append(_run("lit_accel LoRA (PyTorch path)", peft_equal, args))
    base = results[0]
    rows = [
        [
            args.preset,
            f"{args.batch}x{args.seq_len}",
            m.name,
            m.median_ms,
            m.spread_ms,
            m.median_ms / base.median_ms,
            m.peak_gib,
            m.peak_gib / base.peak_gib,
            m.extra.get("trainable_M", 0.0),
        ]
        for m in results
    ]
    write_results(
        f"LoRA training step: ours vs PEFT vs the frozen-base floor (r {r}, alpha {alpha}, all linears)",
        [
            "model",
            "batch",
            "variant",
            "median ms/step",
            "spread ms",
            "time vs floor",
            "peak GiB",
            "memory vs floor",
            "trainable M",
        ],
        rows,
        args.results,
        notes="bf16 base weights, fp32 adapters (PEFT's default; ours too), bf16 autocast, fused AdamW on the"
        f" adapters; {args.repeats} windows of {args.iters} steps after {args.warmup} warm-up steps.",
    )


if __name__ == "__main__":
    main()
