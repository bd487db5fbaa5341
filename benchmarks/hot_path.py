"""Training step with the hot-path kernels: HF eager vs HF + torch.compile vs HF + Liger-Kernel vs ours.

Each (model, variant) runs in its own child process, because Liger patches ``transformers`` classes and module
functions globally, and a crash or out-of-memory in one variant must not take the others down. Every variant is the
same plain loop (bf16 autocast, fp32 master weights, fused AdamW, sdpa attention, the same random batches), only
the model differs; "CausalLM (Lightning)" is the plugin's own module in a Trainer with its default (kernels on).
The first step's loss of every variant is printed as a numerical sanity check (same seed, same batch).

    python benchmarks/hot_path.py                                  # llama-125m 16x2048 and llama-1b 8x2048
    python benchmarks/hot_path.py --sizes llama-125m:16:2048 --variants eager ours --results $OUT/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

VARIANTS = ("eager", "compile", "liger", "ours", "lightning")
LABELS = {
    "eager": "HF eager",
    "compile": "HF + torch.compile",
    "liger": "HF + Liger-Kernel (rope, rmsnorm, swiglu, FLCE)",
    "ours": "HF + lit_accel kernels (apply_kernels)",
    "lightning": "CausalLM in a Lightning Trainer (kernels default on)",
}


def _child(preset: str, batch: int, seq: int, variant: str, warmup: int, iters: int, repeats: int) -> dict:
    import torch
    from harness import measure

    from lit_accel.models import CausalLM

    torch.backends.cuda.matmul.allow_tf32 = True
    if variant == "lightning":
        from train_step import lightning_loop

        r = lightning_loop(preset, batch, seq, warmup, iters, repeats)
        return {"times_ms": r.times_ms, "peak_gib": r.peak_gib, "first_loss": float("nan")}

    module = CausalLM(preset, kernels=False)  # only to build the identical HF model
    module.configure_model()
    model = module.model.cuda()
    if variant == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(
            rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True, model=model
        )
    elif variant == "ours":
        from lit_accel.kernels import apply_kernels

        print("patched:", apply_kernels(model, strict=True).counts(), flush=True)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=3e-4,
        betas=(0.9, 0.95),
        fused=True,
    )
    forward = torch.compile(model) if variant == "compile" else model
    g = torch.Generator().manual_seed(0)
    n = warmup + iters * repeats + 1
    data = torch.randint(0, model.config.vocab_size, (n, batch, seq), generator=g).pin_memory()
    state = {"i": 0, "first": None}

    def step() -> None:
        x = data[state["i"] % n].cuda(non_blocking=True)
        state["i"] += 1
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = forward(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        if state["first"] is None:
            state["first"] = float(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)

    r = measure(LABELS[variant], step, warmup=warmup, iters=iters, repeats=repeats)
    return {"times_ms": r.times_ms, "peak_gib": r.peak_gib, "first_loss": state["first"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["llama-125m:16:2048", "llama-1b:8:2048"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
    parser.add_argument("--child", nargs=4, metavar=("PRESET", "BATCH", "SEQ", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        preset, b, t, variant = args.child
        result = _child(preset, int(b), int(t), variant, args.warmup, args.iters, args.repeats)
        with open(args.out, "w") as f:
            json.dump(result, f)
        return

    from harness import Measurement, write_results

    rows = []
    for spec in args.sizes:
        preset, b, t = spec.split(":")
        batch, seq = int(b), int(t)
        measured: dict[str, Measurement] = {}
        losses: dict[str, float] = {}
        for variant in args.variants:
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
                out = tmp.name
            cmd = [sys.executable, os.path.abspath(__file__), "--child", preset, b, t, variant, "--out", out]
            cmd += ["--warmup", str(args.warmup), "--iters", str(args.iters), "--repeats", str(args.repeats)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{preset} {variant}: FAILED\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}", flush=True)
                continue
            with open(out) as f:
                res = json.load(f)
            os.unlink(out)
            measured[variant] = Measurement(LABELS[variant], res["times_ms"], res["peak_gib"])
            losses[variant] = res["first_loss"]
            m = measured[variant]
            print(
                f"{preset} {variant}: {m.median_ms:.1f} ms, {m.peak_gib:.1f} GiB, loss {res['first_loss']}", flush=True
            )
        base = measured.get("eager")
        for variant, m in measured.items():
            tok_s = batch * seq / (m.median_ms / 1e3)
            rows.append(
                [
                    preset,
                    f"{batch}x{seq}",
                    m.name,
                    m.median_ms,
                    m.spread_ms,
                    f"{tok_s / 1e3:.1f}k",
                    base.median_ms / m.median_ms if base else float("nan"),
                    m.peak_gib,
                    losses[variant],
                ]
            )
    text = write_results(
        "Training step with the hot-path kernels",
        [
            "model",
            "batch",
            "variant",
            "median ms/step",
            "spread ms",
            "tokens/s",
            "speed vs HF eager",
            "peak GiB",
            "first-step loss",
        ],
        rows,
        args.results,
        notes=f"bf16 autocast, fp32 master weights, fused AdamW, sdpa attention, same random batches; each variant"
        f" in its own process; {args.repeats} windows of {args.iters} steps after {args.warmup} warm-up steps"
        " (torch.compile's compilation happens in the warm-up).",
    )
    print(text)


if __name__ == "__main__":
    main()
