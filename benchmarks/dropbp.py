"""DropBP on the GPU: step time and peak memory against dense in the same run, the longest sequence that fits,
and validation loss at equal wall-clock time.

    python benchmarks/dropbp.py speed   --results $OUT/RESULTS.md   # llama-1b 8x2048: dense vs DropBP 0.5
    python benchmarks/dropbp.py seqlen  --results $OUT/RESULTS.md   # longest batch-1 sequence, dense vs 0.5
    python benchmarks/dropbp.py quality --results $OUT/RESULTS.md   # llama-125m val loss vs wall-clock
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from typing import Any

import lightning as L
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import itertools

from harness import write_results
from train_step import lightning_loop

from lit_accel.callbacks import DropBP
from lit_accel.data import TextDataModule
from lit_accel.dropbp import apply_dropbp, draw_mask, uniform_drop_rates
from lit_accel.models import CausalLM


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def speed(args: argparse.Namespace) -> None:
    preset, batch, seq = args.preset, args.batch, args.seq_len
    rows: list[list[Any]] = []
    dense = lightning_loop(preset, batch, seq, args.warmup, args.iters, args.repeats, name="dense")
    _free()
    variants: list[tuple[str, DropBP]] = [
        (f"DropBP {t} uniform", DropBP(target=t, sensitivity="uniform")) for t in args.targets
    ]
    variants.append(
        ("DropBP 0.5 uniform, independent", DropBP(target=0.5, sensitivity="uniform", sampling="independent"))
    )
    # auto: the sensitivity measurement runs at step 2, inside the warm-up, so the windows time steady state.
    variants.append(
        ("DropBP 0.5 auto", DropBP(target=0.5, sensitivity="auto", sensitivity_at=2, before_measurement="dense"))
    )
    results = [dense]
    extra: dict[str, str] = {}
    for name, cb in variants:
        results.append(lightning_loop(preset, batch, seq, args.warmup, args.iters, args.repeats, [cb], name=name))
        if cb.settings.sensitivity == "auto":
            extra[name] = f"sensitivity measurement {cb.sensitivity_seconds:.2f} s once; rates {cb.rates}"
        _free()
    for r in results:
        rows.append(
            [
                preset,
                f"{batch}x{seq}",
                r.name,
                r.median_ms,
                r.spread_ms,
                r.median_ms / dense.median_ms,
                r.peak_gib,
                r.peak_gib / dense.peak_gib,
            ]
        )
        print(rows[-1], flush=True)
    notes = "; ".join(f"{k}: {v}" for k, v in extra.items())
    write_results(
        "DropBP: training step time and peak memory vs dense (Lightning Trainer, bf16-mixed)",
        ["model", "batch", "variant", "median ms/step", "spread ms", "time vs dense", "peak GiB", "memory vs dense"],
        rows,
        args.results,
        notes=f"{args.repeats} windows of {args.iters} steps after {args.warmup} warm-up steps. {notes}",
    )


def _train_steps(
    model: torch.nn.Module, opt: torch.optim.Optimizer, seq: int, ctrl: Any, rates: list[float] | None, steps: int = 3
) -> float | None:
    """Peak GiB of ``steps`` batch-1 training steps at ``seq`` tokens (fresh drop masks each), or None on OOM."""
    g = torch.Generator().manual_seed(seq)
    try:
        torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):
            if ctrl is not None and rates is not None:
                ctrl.set_mask(draw_mask(rates, g))
            x = torch.randint(0, model.config.vocab_size, (1, seq), device="cuda")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=x, labels=x, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            del loss, x
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**30
    except torch.OutOfMemoryError:
        opt.zero_grad(set_to_none=True)
        return None
    finally:
        _free()


def seqlen(args: argparse.Namespace) -> None:
    rows: list[list[Any]] = []
    for name, target, lengths in [
        ("dense", None, args.dense_seq_lens),
        ("DropBP 0.5 uniform", 0.5, args.drop_seq_lens),
    ]:
        module = CausalLM(args.preset, config_overrides={"max_position_embeddings": max(lengths)})
        with torch.device("cuda"):
            module.configure_model()
        model = module.model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        ctrl = apply_dropbp(model) if target is not None else None
        rates = uniform_drop_rates(ctrl.num_sublayers, target) if ctrl is not None and target is not None else None
        best, best_peak, failed = 0, 0.0, None
        for seq in lengths:
            peak = _train_steps(model, opt, seq, ctrl, rates)
            print(name, seq, "OOM" if peak is None else f"{peak:.1f} GiB", flush=True)
            if peak is None:
                failed = seq
                break
            best, best_peak = seq, peak
        rows.append([args.preset, name, best, best_peak, failed or f"> {lengths[-1]} not tried"])
        if ctrl is not None:
            ctrl.remove()
        del model, module, opt
        _free()
    write_results(
        "DropBP: longest batch-1 sequence that trains (3 steps, fresh drop masks each) on one GPU",
        ["model", "variant", "longest seq that fit", "its peak GiB", "first that ran out of memory"],
        rows,
        args.results,
        notes="bf16 autocast, fp32 weights, fused AdamW, no activation checkpointing; same GPU for both.",
    )


class _ValCurve(L.Callback):
    def __init__(self) -> None:
        self.t0 = 0.0
        self.points: list[tuple[float, int, float]] = []
        self.paused = 0.0
        self._vstart = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.cuda.synchronize()
        self.t0 = time.perf_counter()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.cuda.synchronize()
        self._vstart = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.cuda.synchronize()
        now = time.perf_counter()
        self.paused += now - self._vstart  # training wall-clock excludes validation
        loss = float(trainer.callback_metrics["val/loss"])
        self.points.append((now - self.t0 - self.paused, trainer.global_step, loss))


def quality(args: argparse.Namespace) -> None:
    curves: dict[str, list[tuple[float, int, float]]] = {}
    for name in ("dense", "DropBP 0.5 auto"):
        torch.manual_seed(0)
        data = TextDataModule(
            corpus="stdlib",
            bpe_vocab_size=32000,
            seq_len=1024,
            batch_size=16,
            num_workers=2,
            max_val_sequences=256,
            cache_dir=".cache/lit_accel",
        )
        module = CausalLM("llama-125m", learning_rate=6e-4, warmup_steps=100)
        curve = _ValCurve()
        cbs: list[L.Callback] = [curve]
        if name != "dense":
            cbs.append(DropBP(target=0.5, sensitivity="auto", sensitivity_at=0.1))
        trainer = L.Trainer(
            accelerator="gpu",
            devices=1,
            precision="bf16-mixed",
            max_steps=args.steps,
            val_check_interval=args.steps // 8,
            check_val_every_n_epoch=None,
            limit_val_batches=16,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=cbs,
            gradient_clip_val=1.0,
        )
        trainer.fit(module, datamodule=data)
        curves[name] = curve.points
        print(name, curve.points, flush=True)
        del trainer, module
        _free()
    dense, drop = curves["dense"], curves["DropBP 0.5 auto"]
    t_end = drop[-1][0]
    # dense's validation loss at DropBP's final wall-clock time, by linear interpolation between its points
    dense_at = next(
        (
            lo[2] + (hi[2] - lo[2]) * (t_end - lo[0]) / (hi[0] - lo[0])
            for lo, hi in itertools.pairwise(dense)
            if lo[0] <= t_end <= hi[0]
        ),
        dense[-1][2],
    )
    rows = [[name, s, f"{t:.1f}", v] for name, pts in curves.items() for t, s, v in pts]
    write_results(
        "DropBP: validation loss vs training wall-clock, llama-125m on the embedded corpus",
        ["variant", "step", "train seconds", "val/loss"],
        rows,
        args.results,
        notes=(
            f"batch 16x1024, bf16-mixed, lr 6e-4 cosine over {args.steps} steps, both runs the same steps. "
            f"DropBP finished in {t_end:.1f} s at val/loss {drop[-1][2]:.4f}; dense at that wall-clock: "
            f"{dense_at:.4f} (finished in {dense[-1][0]:.1f} s at {dense[-1][2]:.4f})."
        ),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["speed", "seqlen", "quality"])
    parser.add_argument("--preset", default="llama-1b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--dense_seq_lens", type=int, nargs="+", default=[16384, 20480, 24576])
    parser.add_argument("--drop_seq_lens", type=int, nargs="+", default=[24576, 32768, 40960, 49152])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
    args = parser.parse_args()
    {"speed": speed, "seqlen": seqlen, "quality": quality}[args.what](args)


if __name__ == "__main__":
    main()
