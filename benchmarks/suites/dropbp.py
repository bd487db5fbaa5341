"""DropBP: step time and peak memory against dense, the longest sequence that trains, and validation loss against
training wall-clock.

    python -m benchmarks run dropbp

Every part runs by default; each takes a few minutes on an H100 (the validation-loss curves the longest):

- ``step_vs_dense``: ``llama-1b``, 8 x 2048 tokens, ``CausalLM`` in a Lightning ``Trainer`` (bf16-mixed, lit_accel's
  kernels on as by default) with no callback (dense, the baseline) and with ``DropBP`` at targets 0.25, 0.5 and
  0.75 (uniform rates), at 0.5 with the paper's independent draws, and at 0.5 with measured sensitivities (measured
  inside the warm-up, so the windows time the steady state). Every run is the same ``Trainer`` set-up and data;
  each is its own fit (a fit cannot be split into interleaved windows), so dense runs both first and last, and the
  last run's ratio to the first shows the drift over the whole table.
- ``longest_sequence``: the longest batch-1 sequence that trains three steps (fresh drop masks each), dense against
  DropBP 0.5 uniform. Both arms search one and the same length grid (16384, 20480, 24576, 32768, 40960, 49152),
  from the shortest up, and stop at the first length that runs out of memory; bf16 autocast, fp32 weights, fused
  AdamW, no activation checkpointing.
- ``val_loss_vs_time`` and ``val_loss_equal_time``: ``llama-125m`` trained 800 steps on the embedded corpus, dense
  and DropBP 0.5 (measured sensitivities), validation loss at every eighth of the run against the training
  wall-clock (validation time excluded); after one short warm-up fit of each arm, so neither pays the kernels'
  compilation and autotuning.

Before timing, the suite checks on the timed model that DropBP computes what it should: with nothing dropped, loss
and every gradient equal dense; with one middle sublayer dropped, the loss equals dense, the dropped sublayer's
parameters get no gradient, and every parameter after it (later sublayers, final norm, LM head) gets dense's.

Smoke (``--smoke``, a CPU): the same parts with ``llama-tiny``, fp32: 2 x 32-token steps, the length grid
(32, 64) (a CPU never runs out of memory, so both arms reach its end), and 8 steps of each validation curve.
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Any

import lightning as L
import torch

from benchmarks.common import lightning_loop
from benchmarks.harness import Context, Measurement, free_memory
from lit_accel.callbacks import DropBP
from lit_accel.data import TextDataModule
from lit_accel.dropbp import apply_dropbp, draw_mask, uniform_drop_rates
from lit_accel.models import CausalLM

__all__ = ["run"]

TARGETS = (0.25, 0.5, 0.75)
# One grid for both arms: dense ran out of memory at 24576 tokens on an 80 GB H100, DropBP 0.5 at 40960.
SEQ_GRID = (16384, 20480, 24576, 32768, 40960, 49152)
SEQLEN_STEPS = 3


_free = free_memory


def _numerics(device: torch.device) -> str:
    if device.type == "cuda":
        return "bf16 autocast, fp32 weights, fused AdamW, lit_accel's kernels on (CausalLM's default on CUDA)"
    return "fp32, AdamW, Hugging Face's modules (CausalLM's default off CUDA)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------- check


def _loss_and_grads(
    model: torch.nn.Module, x: torch.Tensor, device: torch.device
) -> tuple[float, dict[str, torch.Tensor | None]]:
    model.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = model(input_ids=x, labels=x, use_cache=False).loss
    loss.backward()
    grads = {n: None if p.grad is None else p.grad.detach().float().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def check_dropbp(preset: str, seq: int, device: torch.device) -> None:
    """Raises unless DropBP on ``preset`` keeps dense's loss and the gradients it must keep (see the docstring)."""
    # bf16 autocast on a GPU: the same kernels run in both arms, so differences are reduction-order noise.
    tol = 2e-2 if device.type == "cuda" else 1e-5
    module = CausalLM(preset)
    with torch.device(device):
        module.configure_model()
    model = module.model
    assert model is not None
    model.train()
    x = torch.randint(0, model.config.vocab_size, (2, seq), generator=torch.Generator().manual_seed(0)).to(device)
    ref_loss, ref = _loss_and_grads(model, x, device)
    ctrl = apply_dropbp(model)
    try:
        ctrl.keep_all()
        loss, grads = _loss_and_grads(model, x, device)
        if abs(loss - ref_loss) > tol * abs(ref_loss):
            raise RuntimeError(f"DropBP check: nothing dropped, loss {loss} != dense {ref_loss}")
        for name, g in grads.items():
            r = ref[name]
            if (g is None) != (r is None) or (g is not None and r is not None and _rel_err(g, r) > tol):
                raise RuntimeError(f"DropBP check: nothing dropped, gradient of {name} differs from dense")
        k = ctrl.num_sublayers // 2
        ctrl.set_mask([i == k for i in range(ctrl.num_sublayers)])
        loss, grads = _loss_and_grads(model, x, device)
        if abs(loss - ref_loss) > tol * abs(ref_loss):
            raise RuntimeError(f"DropBP check: sublayer {k} dropped, loss {loss} != dense {ref_loss}")
        names = {id(p): n for n, p in model.named_parameters()}

        def params_of(i: int) -> set[str]:
            sub = ctrl.sublayers[i]
            return {names[id(p)] for m in (sub.norm, sub.module) if m is not None for p in m.parameters()}

        dropped = params_of(k)
        upstream = set().union(*(params_of(i) for i in range(k)))
        embeddings = {names[id(p)] for p in model.get_input_embeddings().parameters()}
        downstream = [n for n in grads if n not in dropped | upstream | embeddings]
        if not dropped or not downstream:
            raise RuntimeError(f"DropBP check: sublayer {k} has no parameters or nothing follows it")
        for name in dropped:
            if grads[name] is not None:
                raise RuntimeError(f"DropBP check: dropped sublayer {k}'s parameter {name} got a gradient")
        for name in downstream:
            g, r = grads[name], ref[name]
            if g is None or r is None or _rel_err(g, r) > tol:
                raise RuntimeError(f"DropBP check: {name}, after dropped sublayer {k}, differs from dense")
    finally:
        ctrl.remove()
        del model, module
        _free()


# ---------------------------------------------------------------------------------------------------- speed


def step_vs_dense(ctx: Context, preset: str, batch: int, seq: int, warmup: int, iters: int) -> None:
    at = min(2, warmup - 1)
    table = ctx.table(
        "step_vs_dense",
        "DropBP: training step time and peak memory vs dense (Lightning Trainer)",
        notes=(
            f"CausalLM in a Lightning Trainer ({_numerics(ctx.device)}), random tokens; "
            f"{ctx.windows} windows of {iters} steps after {warmup} warm-up steps, median and spread (max - min) "
            "per step. Baseline: the same Trainer without DropBP (dense), run first; 'dense, again last' reruns it "
            "after the DropBP runs (its ratio shows the drift over the table). 'time vs dense' and 'memory vs "
            "dense' = this / the first dense run. 'uniform': every sublayer at the target rate; 'independent': "
            "the paper's per-sublayer Bernoulli draws (default: systematic, a fixed count per step); 'auto': rates "
            f"from sensitivities measured at step {at}, inside the warm-up."
        ),
    )
    variants: list[tuple[str, DropBP | None]] = [("dense", None)]
    variants += [(f"DropBP {t} uniform", DropBP(target=t, sensitivity="uniform")) for t in TARGETS]
    variants.append(
        ("DropBP 0.5 uniform, independent", DropBP(target=0.5, sensitivity="uniform", sampling="independent"))
    )
    variants.append(
        ("DropBP 0.5 auto", DropBP(target=0.5, sensitivity="auto", sensitivity_at=at, before_measurement="dense"))
    )
    variants.append(("dense, again last", None))
    dense: Measurement | None = None
    for name, cb in variants:
        torch.manual_seed(0)
        m = lightning_loop(
            preset, batch, seq, warmup, iters, ctx.windows, ctx.device, callbacks=[cb] if cb else None, name=name
        )
        _free()
        if len(m.times_ms) != ctx.windows:
            raise RuntimeError(f"{name}: {len(m.times_ms)} windows timed, {ctx.windows} expected")
        dense = dense or m
        row: dict[str, Any] = {
            "model": preset,
            "batch": f"{batch}x{seq}",
            "variant": name,
            "median ms/step": m.median_ms,
            "spread ms": m.spread_ms,
            "windows": len(m.times_ms),
            "time vs dense": m.median_ms / dense.median_ms,
            "peak GiB": m.peak_gib,
            "memory vs dense": m.peak_gib / dense.peak_gib,
        }
        if cb is not None and cb.settings.sensitivity == "auto":
            if not cb.measured:
                raise RuntimeError(f"{name}: the sensitivities were never measured")
            row["sensitivity s (once)"] = cb.sensitivity_seconds
            row["rates"] = " ".join(f"{r:.1f}" for r in cb.rates)
        table.add(row)


# ---------------------------------------------------------------------------------------------------- seqlen


def _train_steps(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    seq: int,
    ctrl: Any,
    rates: list[float] | None,
    device: torch.device,
) -> float | None:
    """Peak GiB of batch-1 training steps at ``seq`` tokens (fresh drop masks each; NaN on a CPU), None on OOM."""
    g = torch.Generator().manual_seed(seq)
    gpu = device.type == "cuda"
    try:
        if gpu:
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(SEQLEN_STEPS):
            if ctrl is not None and rates is not None:
                ctrl.set_mask(draw_mask(rates, g))
            x = torch.randint(0, model.config.vocab_size, (1, seq), generator=g).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
                loss = model(input_ids=x, labels=x, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if not torch.isfinite(loss.detach()):
                raise RuntimeError(f"seq {seq}: loss {float(loss.detach())}")
            del loss, x
        _sync(device)
        return torch.cuda.max_memory_allocated(device) / 2**30 if gpu else float("nan")
    except torch.OutOfMemoryError:
        opt.zero_grad(set_to_none=True)
        return None
    finally:
        _free()


def longest_sequence(ctx: Context, preset: str, grid: tuple[int, ...]) -> None:
    table = ctx.table(
        "longest_sequence",
        f"DropBP: longest batch-1 sequence that trains ({SEQLEN_STEPS} steps, fresh drop masks each) on one GPU",
        notes=(
            f"Both arms, dense and DropBP 0.5 uniform, search one and the same length grid ({', '.join(map(str, grid))}"
            f" tokens), from the shortest up, stopping at the first length that runs out of memory; {SEQLEN_STEPS} "
            f"training steps per length. {_numerics(ctx.device)}, no activation checkpointing; same device and "
            "process for both. 'seq vs dense' = longest / dense's longest."
        ),
    )
    dense_best = 0
    for name, target in (("dense", None), ("DropBP 0.5 uniform", 0.5)):
        module = CausalLM(preset, config_overrides={"max_position_embeddings": max(grid)})
        with torch.device(ctx.device):
            module.configure_model()
        model = module.model
        assert model is not None
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=ctx.device.type == "cuda")
        ctrl = apply_dropbp(model) if target is not None else None
        rates = uniform_drop_rates(ctrl.num_sublayers, target) if ctrl is not None and target is not None else None
        best, best_peak, failed = 0, float("nan"), None
        for seq in grid:
            peak = _train_steps(model, opt, seq, ctrl, rates, ctx.device)
            print(f"{name} seq {seq}: " + ("out of memory" if peak is None else f"{peak:.1f} GiB"), flush=True)
            if peak is None:
                failed = seq
                break
            best, best_peak = seq, peak
        dense_best = dense_best or best
        table.add(
            {
                "model": preset,
                "variant": name,
                "longest seq that fit": best,
                "its peak GiB": best_peak,
                "first that ran out of memory": failed if failed is not None else f"none up to {grid[-1]}",
                "seq vs dense": best / dense_best if dense_best else float("nan"),
            }
        )
        if ctrl is not None:
            ctrl.remove()
        del model, module, opt, ctrl
        _free()


# ---------------------------------------------------------------------------------------------------- quality


class _ValCurve(L.Callback):
    """(training seconds, step, val/loss) at every validation; the clock stops while validating."""

    def __init__(self) -> None:
        self.t0 = 0.0
        self.points: list[tuple[float, int, float]] = []
        self.paused = 0.0
        self._vstart = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _sync(pl_module.device)
        self.t0 = time.perf_counter()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _sync(pl_module.device)
        self._vstart = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _sync(pl_module.device)
        now = time.perf_counter()
        self.paused += now - self._vstart
        loss = float(trainer.callback_metrics["val/loss"])
        self.points.append((now - self.t0 - self.paused, trainer.global_step, loss))


def _fit(
    ctx: Context,
    cfg: dict[str, Any],
    steps: int,
    callbacks: list[L.Callback],
    val_every: int | None,
) -> None:
    torch.manual_seed(0)
    gpu = ctx.device.type == "cuda"
    data = TextDataModule(
        corpus="stdlib",
        bpe_vocab_size=cfg["vocab"],
        max_corpus_bytes=cfg["corpus_bytes"],
        seq_len=cfg["seq"],
        batch_size=cfg["batch"],
        num_workers=cfg["workers"],
        max_val_sequences=cfg["val_sequences"],
        cache_dir=".cache/lit_accel",
    )
    module = CausalLM(cfg["preset"], learning_rate=cfg["lr"], warmup_steps=cfg["lr_warmup"])
    trainer = L.Trainer(
        accelerator="gpu" if gpu else "cpu",
        devices=1,
        precision="bf16-mixed" if gpu else "32-true",
        max_steps=steps,
        val_check_interval=val_every,
        check_val_every_n_epoch=None,
        limit_val_batches=cfg["val_batches"] if val_every else 0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        gradient_clip_val=1.0,
    )
    trainer.fit(module, datamodule=data)
    del trainer, module, data
    _free()


def val_loss_vs_time(ctx: Context, cfg: dict[str, Any]) -> None:
    steps, arms = cfg["steps"], ("dense", "DropBP 0.5 auto")

    def dropbp() -> DropBP:
        return DropBP(target=0.5, sensitivity="auto", sensitivity_at=0.1)

    # Compiles and autotunes the kernels of both arms (dense and dropped sublayers) before any clock runs.
    for name in arms:
        _fit(ctx, cfg, cfg["warm_steps"], [] if name == "dense" else [DropBP(target=0.5, sensitivity="uniform")], None)
    curves: dict[str, list[tuple[float, int, float]]] = {}
    for name in arms:
        curve = _ValCurve()
        _fit(ctx, cfg, steps, [curve] if name == "dense" else [curve, dropbp()], steps // 8)
        if len(curve.points) < 2 or not all(math.isfinite(p[2]) for p in curve.points):
            raise RuntimeError(f"{name}: validation curve {curve.points}")
        curves[name] = curve.points
    precision = "bf16-mixed" if ctx.device.type == "cuda" else "fp32"
    setup = (
        f"{cfg['preset']} on the embedded corpus (BPE {cfg['vocab']}), batch {cfg['batch']}x{cfg['seq']}, "
        f"{precision}, lr {cfg['lr']} cosine over {steps} steps (both arms the same steps and data order), "
        f"validation every {steps // 8} steps on {cfg['val_batches']} batches. Training seconds: wall-clock from "
        "the start of training, validation excluded, DropBP's sensitivity measurement included; after one "
        f"{cfg['warm_steps']}-step warm-up fit of each arm (kernel compilation and autotuning paid before)."
    )
    curve_table = ctx.table(
        "val_loss_vs_time",
        f"DropBP: validation loss vs training wall-clock, {cfg['preset']} on the embedded corpus",
        notes=f"{setup} Baseline: dense, the same Trainer without DropBP.",
    )
    for name, points in curves.items():
        for t, step, loss in points:
            curve_table.add({"variant": name, "step": step, "train seconds": t, "val/loss": loss})
    dense = curves["dense"]
    summary = ctx.table(
        "val_loss_equal_time",
        f"DropBP: validation loss at equal wall-clock, {cfg['preset']}",
        notes=(
            f"{setup} 'time vs dense' = this run's training seconds / dense's; 'dense val/loss then' = dense's "
            "validation loss at this run's final wall-clock, interpolated linearly between dense's points (its "
            "last point if dense finished sooner, its first if it had not reached it yet)."
        ),
    )
    for name, points in curves.items():
        t_end = points[-1][0]
        dense_at = next(
            (
                lo[2] + (hi[2] - lo[2]) * (t_end - lo[0]) / (hi[0] - lo[0])
                for lo, hi in itertools.pairwise(dense)
                if lo[0] <= t_end <= hi[0]
            ),
            dense[-1][2] if t_end >= dense[-1][0] else dense[0][2],
        )
        summary.add(
            {
                "variant": name,
                "steps": points[-1][1],
                "train seconds": t_end,
                "time vs dense": t_end / dense[-1][0],
                "final val/loss": points[-1][2],
                "dense val/loss then": dense_at,
            }
        )


# ---------------------------------------------------------------------------------------------------- run


def run(ctx: Context) -> None:
    if ctx.smoke:
        preset, batch, seq, warmup, iters = "llama-tiny", 2, 32, 3, 1
        grid: tuple[int, ...] = (32, 64)
        quality: dict[str, Any] = dict(
            preset="llama-tiny", vocab=1024, corpus_bytes=1_000_000, seq=32, batch=4, workers=0, val_sequences=16,
            val_batches=2, lr=2e-3, lr_warmup=2, steps=8, warm_steps=2,
        )  # fmt: skip
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        preset, batch, seq, warmup, iters = "llama-1b", 8, 2048, 5, 10
        grid = SEQ_GRID
        quality = dict(
            preset="llama-125m", vocab=32000, corpus_bytes=None, seq=1024, batch=16, workers=2, val_sequences=256,
            val_batches=16, lr=6e-4, lr_warmup=100, steps=800, warm_steps=20,
        )  # fmt: skip
    check_dropbp(preset, 64 if ctx.smoke else 256, ctx.device)
    _free()
    # The search first: it is the part most sensitive to what earlier runs left in the allocator.
    if ctx.wants("longest_sequence"):
        longest_sequence(ctx, preset, grid)
    if ctx.wants("step_vs_dense"):
        step_vs_dense(ctx, preset, batch, seq, warmup, iters)
    if ctx.wants("val_loss_vs_time") or ctx.wants("val_loss_equal_time"):
        val_loss_vs_time(ctx, quality)
