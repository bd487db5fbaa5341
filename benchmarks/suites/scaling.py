"""Scaling: tokens/s per GPU from 1 to N GPUs (N = every GPU torch sees), dense and with each technique.

    python -m benchmarks run scaling
    LIT_ACCEL_BENCH_SCALING_STRATEGIES=lit_deepspeed_stage_2 python -m benchmarks run scaling   # other strategies

``llama-125m``, 16 x 2048 tokens per GPU (weak scaling: the per-GPU batch is fixed), ``CausalLM`` in a Lightning
``Trainer`` (bf16-mixed, lit_accel's kernels on as by default), with no callback (dense) and with each technique's
callback: DropBP 0.5 uniform, LoRA r=16 on every linear, low-rank factorisation of attention (rank 256), 2:4 sparsity
of the MLPs, structured pruning to half the parameters. GPU counts 1, 2, 4, ... up to N (and N itself).

Each (GPU count, strategy, variant) is its own process, started as any Lightning script is: ``Trainer(devices=n)``
in it launches the other ranks. One GPU is the single-device baseline for every DDP flavour (``ddp``, Lightning's
``DDPStrategy`` as is; ``lit_ddp``, lit_accel's registered DDP defaults); a DeepSpeed strategy keeps its engine at
one GPU and is its own baseline. Efficiency = (tokens/s per GPU at n) / (tokens/s per GPU at one GPU) of the same
variant and strategy; the points of one variant run back to back, so a drift of the machine falls on a whole
variant's points alike rather than on one count. ``LIT_ACCEL_BENCH_SCALING_STRATEGIES`` (comma-separated, default
``ddp,lit_ddp``) names the multi-GPU strategies.

On a machine with one GPU only the one-GPU points are measured, and the table's notes say that N > 1 needs more
GPUs. The smoke run is dense ``llama-tiny`` in one CPU process, and in two over gloo under ``ddp`` and ``lit_ddp``.

Checks: every rank of a DDP point ends training with the same weights (a checksum over ranks), every point ran
as many ranks as asked and timed all of its windows; a failed point fails the suite after the others ran.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from typing import Any

from benchmarks.harness import REPO, Context

__all__ = ["run"]

VARIANTS = ("dense", "dropbp", "lora", "factorize", "sparsity24", "pruning")
DDP_FAMILY = ("ddp", "lit_ddp")
STRATEGIES_ENV = "LIT_ACCEL_BENCH_SCALING_STRATEGIES"
SINGLE = "single device"


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


def _same_on_every_rank() -> Any:
    """A callback that raises at the end of training unless every rank holds the same weights (a DDP check)."""
    import lightning as L
    import torch
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    class SameOnEveryRank(L.Callback):
        def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            strategy = trainer.strategy
            if trainer.world_size < 2 or not isinstance(strategy, DDPStrategy):
                return
            if isinstance(strategy, DeepSpeedStrategy):
                return  # ZeRO partitions differ by rank by design
            # Plain tensors only: a weight held in a sparse tensor subclass has no cheap elementwise sum.
            sums = [p.double().sum() for p in (q.detach() for q in pl_module.parameters()) if type(p) is torch.Tensor]
            if not sums:
                return
            total = torch.stack(sums).sum()
            high, low = total.clone(), total.clone()
            torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
            torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
            # Every rank applies the same all-reduced gradients: the weights agree up to summation order.
            if not torch.isfinite(total) or float(high - low) > 1e-6 * float(high.abs()) + 1e-9:
                raise RuntimeError(f"the ranks' weights differ after training: checksums {float(low)}..{float(high)}")

    return SameOnEveryRank()


def _child(args: argparse.Namespace) -> None:
    """One point: ``args.devices`` ranks of one Trainer; rank 0 writes the windows and its peak memory."""
    import lightning as L
    import torch

    import lit_accel.strategies  # noqa: F401  (registers lit_ddp and the lit_deepspeed_* names)
    from benchmarks.common import RandomTokens, StepTimer, loader
    from lit_accel.models import CausalLM

    gpu = args.accelerator == "gpu"
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
    module = CausalLM(args.preset, warmup_steps=10)
    timer = StepTimer(args.warmup, args.iters, args.windows)
    steps = args.warmup + args.iters * args.windows
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy="auto" if args.strategy == SINGLE else args.strategy,
        precision="bf16-mixed" if gpu else "32-true",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[timer, *_callbacks(args.variant), _same_on_every_rank()],
    )
    ds = RandomTokens(args.batch * args.devices * (steps + 1), args.seq, module.config.vocab_size)
    trainer.fit(module, train_dataloaders=loader(ds, args.batch))
    if trainer.world_size != args.devices:
        raise RuntimeError(f"{trainer.world_size} ranks ran, {args.devices} asked for")
    if trainer.is_global_zero:
        with open(args.out, "w") as f:
            json.dump({"times_ms": timer.times_ms, "peak_gib": timer.peak_gib}, f)


def _counts(n: int) -> list[int]:
    counts = [1]
    while counts[-1] * 2 <= n:
        counts.append(counts[-1] * 2)
    return counts + ([n] if n not in counts else [])


def _point(ctx: Context, cfg: dict[str, Any], variant: str, devices: int, strategy: str) -> dict[str, Any] | None:
    """Runs one point in its own process; its times and peak, or None (the output printed) when it failed."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
        out = tmp.name
    cmd = [sys.executable, "-m", "benchmarks.suites.scaling", "--child", "--devices", str(devices)]
    cmd += ["--variant", variant, "--strategy", strategy, "--preset", cfg["preset"], "--batch", str(cfg["batch"])]
    cmd += ["--seq", str(cfg["seq"]), "--warmup", str(cfg["warmup"]), "--iters", str(cfg["iters"])]
    cmd += ["--windows", str(ctx.windows), "--accelerator", cfg["accelerator"], "--out", out]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    # A process group of its own: on a timeout the ranks its launcher started are killed with it.
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=cfg["timeout"])
        failed = proc.returncode != 0 or not os.path.getsize(out)
        log = stdout[-2000:] + stderr[-4000:]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        failed, log = True, f"timed out after {cfg['timeout']} s"
    try:
        if failed:
            print(f"{variant} x{devices} {strategy}: FAILED\n{log}", flush=True)
            return None
        with open(out) as f:
            res: dict[str, Any] = json.load(f)
    finally:
        os.unlink(out)
    if len(res["times_ms"]) != ctx.windows:
        print(f"{variant} x{devices} {strategy}: {len(res['times_ms'])} windows, {ctx.windows} expected", flush=True)
        return None
    return res


def run(ctx: Context) -> None:
    import torch

    if ctx.smoke:
        # CPU processes over gloo: the launcher, the rank bookkeeping and the records, not a scaling figure.
        cfg: dict[str, Any] = dict(
            preset="llama-tiny", batch=2, seq=32, warmup=2, iters=1, accelerator="cpu", timeout=120
        )
        n, variants, strategies = 2, ("dense",), list(DDP_FAMILY)
    else:
        gpu = ctx.device.type == "cuda"
        # A point is killed after 9 minutes, so a hung one becomes a row instead of stalling the suite.
        cfg = dict(preset="llama-125m", batch=16, seq=2048, warmup=5, iters=10, timeout=540)
        cfg["accelerator"] = "gpu" if gpu else "cpu"
        n, variants = torch.cuda.device_count() if gpu else 1, VARIANTS
        strategies = [s.strip() for s in os.environ.get(STRATEGIES_ENV, ",".join(DDP_FAMILY)).split(",") if s.strip()]
    counts = _counts(n)
    unit = "CPU processes over gloo" if ctx.smoke else "GPUs"
    notes = (
        f"Weak scaling: {cfg['batch']}x{cfg['seq']} tokens per {'process' if ctx.smoke else 'GPU'}, "
        f"{'fp32' if ctx.smoke else 'bf16-mixed'}, CausalLM defaults (lit_accel's kernels on CUDA); each point its "
        f"own process and Trainer; {ctx.windows} windows of {cfg['iters']} steps after {cfg['warmup']} warm-up "
        "steps, median and spread (max - min) of rank 0's step time. Baseline: the same variant on one device "
        f"('{SINGLE}' for ddp and lit_ddp; a DeepSpeed strategy at one GPU for itself); efficiency = tokens/s per "
        "GPU at this count / at one. ddp: Lightning's DDPStrategy as is; lit_ddp: gradient_as_bucket_view, 100 MB "
        f"buckets. Counts measured: {', '.join(map(str, counts))} {unit}."
    )
    if n < 2:
        notes += f" This machine has {max(n, 1)} GPU: the points for N > 1 need more GPUs."
    table = ctx.table(
        "weak_scaling", f"Scaling: {cfg['preset']}, {cfg['batch']}x{cfg['seq']} per GPU, tokens/s per GPU", notes
    )
    failures: list[str] = []
    for variant in variants:
        base: dict[str, float] = {}
        for devices in counts:
            if devices == 1:
                labels = [SINGLE] if any(s in DDP_FAMILY for s in strategies) else []
                labels += [s for s in strategies if s not in DDP_FAMILY]
            else:
                labels = strategies
            for label in labels:
                res = _point(ctx, cfg, variant, devices, label)
                if res is None:
                    failures.append(f"{variant} x{devices} {label}")
                    continue
                times = res["times_ms"]
                ms = statistics.median(times)
                tok_s = cfg["batch"] * cfg["seq"] / (ms / 1e3)
                key = SINGLE if label in DDP_FAMILY else label
                if devices == 1:
                    base[key] = tok_s
                table.add(
                    {
                        "variant": variant,
                        "GPUs": devices,
                        "strategy": label,
                        "median ms/step": ms,
                        "spread ms": max(times) - min(times),
                        "windows": len(times),
                        "tokens/s per GPU": tok_s,
                        "tokens/s total": tok_s * devices,
                        "efficiency": tok_s / base[key] if key in base else float("nan"),
                        "peak GiB (rank 0)": float("nan") if res["peak_gib"] is None else res["peak_gib"],
                    }
                )
    if failures:
        raise RuntimeError(f"scaling points failed: {', '.join(failures)}")


def _main() -> None:
    parser = argparse.ArgumentParser(description="one scaling point (started by the suite)")
    parser.add_argument("--child", action="store_true", required=True)
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--strategy", required=True)
    parser.add_argument("--preset", required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--seq", type=int, required=True)
    parser.add_argument("--warmup", type=int, required=True)
    parser.add_argument("--iters", type=int, required=True)
    parser.add_argument("--windows", type=int, required=True)
    parser.add_argument("--accelerator", choices=("gpu", "cpu"), required=True)
    parser.add_argument("--out", required=True)
    _child(parser.parse_args())


if __name__ == "__main__":
    _main()
