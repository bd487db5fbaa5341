"""Quality per unit of compute: does each technique reach dense's model sooner, and by how much, or what does it
cost in loss at equal wall-clock?

    python -m benchmarks run quality --allow-cpu --jobs 12     # CPU scale, every comparison and seed at once
    python -m benchmarks run quality                            # on a GPU: also the llama-125m comparisons

Every comparison trains a baseline and variants on the same data, schedule shape and seed (three seeds), records
validation loss against training wall-clock and tokens (``<comparison>_curves``), and summarises them
(``<comparison>``): the loss at equal wall-clock, the time (and tokens) to reach the baseline's final loss as a
fraction of the baseline's, each the mean over seeds with min and max (:mod:`benchmarks.quality_curves`).

Comparisons (CPU scale: a ``llama-20m``-class model, 6 blocks of 384, BPE 2048, 8 x 128 tokens a step):

- ``pretrain``: from a random init on the embedded corpus, dense vs DropBP 0.5 with its defaults (rates uniform at
  the target until the sensitivities are measured at 10% of the run) and with the schedules under study (dense until
  measured; the drop rate warmed up linearly from 0 over the first 30% of the run; the learning rate x1.5), and 2:4
  MLPs from step 0 and with the paper's schedule (dense warm-up for the first 10% of the steps, dense fine-tune for
  the last 10%). DropBP trains the steps that fit dense's wall-clock (its step is cheaper); 2:4 on a CPU trains
  dense's steps (its speed-up is a GPU property: a CPU runs the masked emulation).
- ``dropbp_settings``: DropBP's target (0.25, 0.75) and measurement (at 30% of the run; measured again at 50%)
  against dense, at equal wall-clock.
- ``finetune``: a model of ours pretrained on the embedded corpus's first bytes (library code: it never sees the
  ``test`` package), fine-tuned on a domain it has not seen: the standard library's own test suite
  (``test/test_*.py``, written to a local JSONL; documents held out for validation). Full fine-tuning (the
  baseline), LoRA (r 16, all linears), DropBP 0.5 (sensitivities at step 0, as for fine-tuning), LoRA + DropBP, and
  the SVD factorisation of every decoder linear at rank width / 4, each for the steps that fit full fine-tuning's
  wall-clock.
- ``pruning``: a dense source, ``StructuredPruning`` to a smaller shape, exported and trained on (the source's cost
  not counted), against the same shape from a random init trained for the same wall-clock (the baseline).

On a GPU (``llama-125m``, 16 x 1024, bf16-mixed): ``pretrain_125m`` (dense, DropBP defaults, DropBP dense until
measured, 2:4 with the paper's schedule on its fast kernels, for dense's wall-clock) and ``finetune_125m``, two
seeds. ``--jobs N`` runs the CPU-scale (comparison, seed) jobs as N processes at once, each on its own cores (CUDA
hidden), so a GPU machine's idle cores record the CPU scale beside its GPU runs.

Smoke (``--smoke``): every comparison with ``llama-tiny`` at a few steps, one seed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch

from benchmarks.common import StepTimer
from benchmarks.harness import Context, free_memory
from benchmarks.quality_curves import Curve, Point, ValCurve, overlay_chart, steps_for_time, summarize
from lit_accel.callbacks import DropBP, LoRA, LowRankFactorization, SemiStructuredSparsity, StructuredPruning
from lit_accel.data import TextDataModule
from lit_accel.models import CausalLM
from lit_accel.pruning import export_pruned

__all__ = ["Scale", "run"]

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "lit_accel"


@dataclass(frozen=True)
class Scale:
    """Model, data and schedule of one scale of the comparisons."""

    name: str
    preset: str
    overrides: dict[str, Any]
    seq: int
    batch: int
    lr: float
    steps: int
    """Pre-training steps of the baseline."""
    val_points: int = 8
    """Validations per baseline run (every ``steps / val_points`` steps)."""
    val_batches: int = 8
    corpus_bytes: int | None = 4_000_000
    seeds: tuple[int, ...] = (0, 1, 2)
    ft_source_steps: int = 400
    ft_steps: int = 120
    ft_lr: float = 1e-4
    """Full fine-tuning's peak lr: below the source's final lr (0.1 x ``lr``); at 5e-4 (2.5x it) a fresh AdamW raised
    the CPU-scale domain loss above the source's and 120 steps did not bring it back."""
    lora_lr: float = 5e-4
    ft_bytes: int = 2_000_000
    prune_target: tuple[int, int, int, int] = (4, 1, 512, 288)
    """Kept layers, KV heads, MLP channels, hidden dims."""
    prune_source_steps: int = 200
    prune_steps: int = 60
    continue_steps: int = 140
    calib_steps: int = 20
    """Steps of each calibration fit (the first quarter untimed)."""

    @property
    def tokens_per_step(self) -> int:
        return self.seq * self.batch

    def describe(self, precision: str) -> str:
        shape = ", ".join(f"{k}={v}" for k, v in self.overrides.items())
        return (
            f"{self.preset} ({shape}), {precision}, {self.batch} x {self.seq} = {self.tokens_per_step} tokens a "
            f"step, AdamW, warm-up 5% + cosine to 0.1 x"
        )


CPU = Scale(
    "cpu",
    "llama-20m",
    dict(num_hidden_layers=6, vocab_size=2048),
    seq=128,
    batch=8,
    lr=2e-3,
    steps=200,
)
GPU = Scale(
    "125m",
    "llama-125m",
    dict(vocab_size=32000),
    seq=1024,
    batch=16,
    lr=6e-4,
    steps=400,
    val_batches=16,
    corpus_bytes=10_000_000,  # the embedded corpus's first 10 MB end before its test package (the fine-tuning domain)
    seeds=(0, 1),
    ft_source_steps=600,
    ft_steps=240,
    ft_lr=2e-4,
    lora_lr=1e-3,
    ft_bytes=20_000_000,
)
SMOKE = Scale(
    "smoke",
    "llama-tiny",
    dict(num_hidden_layers=4, vocab_size=1024),
    seq=32,
    batch=4,
    lr=2e-3,
    steps=8,
    val_points=2,
    val_batches=2,
    corpus_bytes=300_000,
    seeds=(0,),
    ft_source_steps=6,
    ft_steps=4,
    ft_bytes=200_000,
    prune_target=(3, 1, 192, 96),
    prune_source_steps=4,
    prune_steps=4,
    continue_steps=4,
    calib_steps=3,
)


# ---------------------------------------------------------------------------------------------------- variants


class RampedDropBP(DropBP):
    """DropBP whose rates grow linearly from 0 to their value over the first ``ramp_steps`` optimizer steps."""

    def __init__(self, ramp_steps: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ramp_steps = max(1, ramp_steps)
        self._now = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self._now = trainer.global_step
        super().on_train_batch_start(trainer, pl_module, batch, idx)

    @property  # type: ignore[override]
    def rates(self) -> list[float]:
        scale = min(1.0, self._now / self.ramp_steps)
        return [r * scale for r in DropBP.rates.fget(self)]  # type: ignore[attr-defined]


class RemeasuredDropBP(DropBP):
    """DropBP that measures the sensitivities again (and reallocates the rates) at ``again_at`` x the run."""

    def __init__(self, again_at: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.again_at, self.remeasured = again_at, False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if self.measured and not self.remeasured and trainer.global_step >= self.again_at * trainer.max_steps:
            self.measured, self.remeasured = False, True
            self.sensitivity_step = trainer.global_step
        super().on_train_batch_start(trainer, pl_module, batch, idx)


@dataclass(frozen=True)
class Variant:
    """One arm of a comparison."""

    name: str
    callbacks: Callable[[int, int], list[L.Callback]] = lambda seed, steps: []
    """(seed, steps) -> the fit's callbacks."""
    budget: str = "steps"
    """``"steps"``: the baseline's steps; ``"time"``: the steps that fit the baseline's wall-clock."""
    probe: Callable[[], list[L.Callback]] | None = None
    """Steady-state callbacks timed against the baseline to size a ``"time"`` budget."""
    coverage: float = 1.0
    """Share of the run at the probe's step time (the rest at the baseline's)."""
    lr_scale: float = 1.0
    lora: bool = False


def _dropbp(target: float = 0.5, **kw: Any) -> Callable[[int, int], list[L.Callback]]:
    return lambda seed, steps: [DropBP(target=target, seed=seed, **kw)]


def _uniform_probe() -> list[L.Callback]:
    return [DropBP(target=0.5, sensitivity="uniform")]


def _lora() -> LoRA:
    return LoRA(targets="all-linear", r=16, alpha=32)


SVD_WIDTH_FRACTION = 4
"""The factorisation variant's rank: the model's width over this (96 at llama-20m, 192 at llama-125m)."""


class _WidthFactorization(LowRankFactorization):
    """:class:`LowRankFactorization` at rank ``hidden_size // SVD_WIDTH_FRACTION`` of the model it meets, timing its
    SVDs: they run at set-up, before the training clock starts, so it reports them as ``setup_seconds``, which the
    comparison adds to the run's wall-clock (every cost of a technique is counted)."""

    setup_seconds = 0.0

    def _apply(self, model: torch.nn.Module) -> None:
        t0 = time.perf_counter()
        self.settings.rank = max(1, int(model.config.hidden_size) // SVD_WIDTH_FRACTION)
        super()._apply(model)
        self.setup_seconds += time.perf_counter() - t0


def _svd(seed: int = 0, steps: int = 0) -> list[L.Callback]:
    return [_WidthFactorization(targets="all-linear", rank=1)]


def _sparse24(warmup_fraction: float, kernel: str) -> Callable[[int, int], list[L.Callback]]:
    def make(seed: int, steps: int) -> list[L.Callback]:
        tenth = int(warmup_fraction * steps)
        return [
            SemiStructuredSparsity(
                targets="mlp", dense_warmup_steps=tenth, dense_finetune_fraction=warmup_fraction, kernel=kernel
            )
        ]

    return make


def pretrain_variants(gpu: bool) -> list[Variant]:
    """Dense; DropBP 0.5 with its defaults and with the schedules under study (dense until the sensitivities are
    measured, the rate warmed up over the first 30% of the run, the learning rate x1.5); 2:4 from step 0 and with
    the paper's schedule. On a GPU 2:4 runs its fast kernels (``kernel="auto"``) and trains the steps that fit
    dense's wall-clock; on a CPU (the masked emulation, no speed-up) dense's steps. The GPU scale runs the defaults
    and the best schedule of the CPU scale only (its runs are longer)."""
    kernel, budget = ("auto", "time") if gpu else ("masked", "steps")
    probe = (lambda: _sparse24(0.0, "auto")(0, 1)) if gpu else None
    dense_first = Variant(
        "DropBP 0.5, dense until measured", _dropbp(before_measurement="dense"), "time", _uniform_probe, 0.9
    )
    variants = [
        Variant("dense"),
        Variant("DropBP 0.5", _dropbp(), "time", _uniform_probe),
        dense_first,
        Variant(
            "DropBP 0.5, rate warm-up over 30%",
            lambda s, n: [RampedDropBP(int(0.3 * n), target=0.5, seed=s)],
            "time",
            _uniform_probe,
            0.85,
        ),
        Variant("DropBP 0.5, lr x1.5", _dropbp(), "time", _uniform_probe, lr_scale=1.5),
        Variant("2:4 MLPs from step 0", _sparse24(0.0, kernel), budget, probe),
        Variant("2:4 MLPs, dense warm-up 10% + dense fine-tune 10%", _sparse24(0.1, kernel), budget, probe, 0.8),
    ]
    if gpu:
        keep = {"dense", "DropBP 0.5", dense_first.name, "2:4 MLPs, dense warm-up 10% + dense fine-tune 10%"}
        variants = [v for v in variants if v.name in keep]
    return variants


DROPBP_SETTINGS = [
    Variant("dense"),
    Variant("DropBP 0.25", _dropbp(0.25), "time", lambda: [DropBP(target=0.25, sensitivity="uniform")]),
    Variant("DropBP 0.75", _dropbp(0.75), "time", lambda: [DropBP(target=0.75, sensitivity="uniform")]),
    Variant("DropBP 0.5, measured at 30%", _dropbp(sensitivity_at=0.3), "time", _uniform_probe),
    Variant(
        "DropBP 0.5, measured again at 50%",
        lambda s, n: [RemeasuredDropBP(0.5, target=0.5, seed=s)],
        "time",
        _uniform_probe,
    ),
]
FINETUNE = [
    Variant("full fine-tuning"),
    Variant("DropBP 0.5", _dropbp(sensitivity_at=0), "time", _uniform_probe),
    Variant("LoRA r16", lambda s, n: [_lora()], "time", lambda: [_lora()], lora=True),
    Variant(
        "LoRA r16 + DropBP 0.5",
        lambda s, n: [_lora(), DropBP(target=0.5, sensitivity_at=0, seed=s)],
        "time",
        lambda: [_lora(), DropBP(target=0.5, sensitivity="uniform")],
        lora=True,
    ),
    Variant(f"SVD rank d/{SVD_WIDTH_FRACTION}, all linears", _svd, "time", _svd),
]


def comparison_variants(name: str) -> list[Variant]:
    """The variants of comparison ``name`` (``pretrain``, ``dropbp_settings``, ``finetune``), baseline first."""
    if name == "pretrain":
        return pretrain_variants(_gpu())
    return {"dropbp_settings": DROPBP_SETTINGS, "finetune": FINETUNE}[name]


# ---------------------------------------------------------------------------------------------------- training


def _gpu() -> bool:
    return torch.cuda.is_available()


def _precision() -> str:
    return "bf16-mixed" if _gpu() else "32-true"


def pretrain_data(scale: Scale, seed: int) -> TextDataModule:
    """The embedded corpus (its first ``corpus_bytes``), a BPE trained on it, 5% of the documents held out."""
    return TextDataModule(
        corpus="stdlib",
        bpe_vocab_size=int(scale.overrides["vocab_size"]),
        max_corpus_bytes=scale.corpus_bytes,
        val_fraction=0.05,
        seq_len=scale.seq,
        batch_size=scale.batch,
        max_val_sequences=scale.val_batches * scale.batch,
        seed=seed,
        cache_dir=str(CACHE),
    )


def finetune_corpus(max_bytes: int) -> Path:
    """The fine-tuning domain: the standard library's test suite (``test/test_*.py``, sorted, up to ``max_bytes``)
    as a local JSONL, one document a file; written once (atomically) and reused."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"]) / "test"
    out = CACHE / f"quality-finetune-stdlib-tests-{max_bytes}.jsonl"
    if out.is_file():
        return out
    docs, total = [], 0
    for path in sorted(root.rglob("test_*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if total + len(text) > max_bytes:
            break
        docs.append(json.dumps({"text": text, "name": path.relative_to(root).as_posix()}))
        total += len(text)
    if not docs:
        raise RuntimeError(f"no test_*.py files under {root}: this interpreter ships no test package")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text("\n".join(docs) + "\n")
    os.replace(tmp, out)
    return out


def finetune_data(scale: Scale, seed: int, source: Path) -> TextDataModule:
    return TextDataModule(
        corpus=str(finetune_corpus(scale.ft_bytes)),
        tokenizer=str(source),
        val_fraction=0.05,
        seq_len=scale.seq,
        batch_size=scale.batch,
        max_val_sequences=scale.val_batches * scale.batch,
        seed=seed,
        cache_dir=str(CACHE),
    )


def _module(scale: Scale, model: Any, lr: float, steps: int) -> CausalLM:
    source = model if model is not None else scale.preset
    overrides = scale.overrides if model is None else None
    return CausalLM(
        source, config_overrides=overrides, learning_rate=lr, warmup_steps=max(1, steps // 20), min_lr_ratio=0.1
    )


def _trainer(scale: Scale, steps: int, callbacks: list[L.Callback], val_every: int | None, logger: Any) -> L.Trainer:
    return L.Trainer(
        accelerator="gpu" if _gpu() else "cpu",
        devices=1,
        precision=_precision(),  # type: ignore[arg-type]
        max_steps=steps,
        val_check_interval=val_every,
        check_val_every_n_epoch=None,
        limit_val_batches=scale.val_batches,
        num_sanity_val_steps=0,
        logger=logger if logger is not None else False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        callbacks=callbacks,
    )


def _step_seconds(scale: Scale, dm: TextDataModule, model: Any, lr: float, callbacks: list[L.Callback]) -> float:
    # The first quarter is untimed (compilation, allocation, a technique's first measurement); the rest is timed
    # in three windows and their median kept, so one stall of the machine does not set a variant's budget.
    skip = max(1, scale.calib_steps // 4)
    iters = max(1, (scale.calib_steps - skip) // 3)
    if scale.calib_steps < skip + iters:
        raise ValueError(f"calib_steps={scale.calib_steps} leaves no timed window: use at least {skip + iters}")
    timer = StepTimer(skip, iters, 3)
    module = _module(scale, model, lr, scale.calib_steps)
    _trainer(scale, scale.calib_steps, [timer, *callbacks], None, None).fit(module, datamodule=dm)
    del module
    free_memory()
    return statistics.median(timer.times_ms) / 1000.0


@dataclass
class Job:
    """One (comparison, scale, seed): what a worker process runs."""

    comparison: str
    scale: str
    seed: int
    wandb: str | None = None
    group: str = ""


@dataclass
class JobResult:
    curves: list[Curve] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def _logger(job: Job, variant: str) -> Any:
    if not job.wandb:
        return None
    from lit_accel.observe.wandb import WandbLogger

    return WandbLogger(
        project="lit_accel-quality",
        name=f"{job.comparison}/{variant}/seed {job.seed}",
        group=job.group,
        offline=job.wandb == "offline",
        save_dir=str(CACHE / "wandb"),
        job_type=job.comparison,
    )


def _finish(logger: Any) -> None:
    if logger is not None:
        logger.finalize("success")
        logger.experiment.finish()


def _fit_curve(
    job: Job,
    scale: Scale,
    dm: TextDataModule,
    variant: Variant,
    model: Any,
    lr: float,
    steps: int,
    val_every: int,
    start: Point | None = None,
) -> tuple[Curve, CausalLM]:
    L.seed_everything(job.seed, verbose=False)
    module = _module(scale, model, lr * variant.lr_scale, steps)
    curve = ValCurve(scale.tokens_per_step, start=start)
    logger = _logger(job, variant.name)
    trainer = _trainer(scale, steps, [curve, *variant.callbacks(job.seed, steps)], val_every, logger)
    trainer.fit(module, datamodule=dm)
    if not curve.points or curve.points[-1].step - (start.step if start else 0) != trainer.global_step:
        loss = float(trainer.validate(module, datamodule=dm, verbose=False)[0]["val/loss"])
        curve.add(trainer, loss, curve.train_seconds)
    _finish(logger)
    # Work a technique does at set-up, before the training clock starts (e.g. the SVDs of a factorisation): any
    # callback of the variant may report it as ``setup_seconds``.
    setup = sum(float(getattr(cb, "setup_seconds", 0.0)) for cb in trainer.callbacks)
    fitted = [replace(p, seconds=p.seconds + setup) for p in curve.points]
    points = ([start] if start is not None and math.isfinite(start.loss) else []) + fitted
    if not all(math.isfinite(p.loss) for p in points):
        raise RuntimeError(f"{variant.name}: non-finite validation loss {points}")
    return Curve(variant.name, job.seed, points), module


def _budgets(
    scale: Scale, dm: TextDataModule, variants: list[Variant], model: str | None, lr: float, steps: int, every: int
) -> tuple[dict[str, int], dict[str, float]]:
    """Each variant's steps: the baseline's, or (``"time"``) those that fit its wall-clock at the measured ratio."""
    budgets: dict[str, int] = {v.name: steps for v in variants}
    ratios: dict[str, float] = {}
    timed = [v for v in variants if v.budget == "time"]
    if not timed:
        return budgets, ratios
    # The baseline is timed before and after the probes and its faster time kept: a process's first fit also pays
    # for warming up its thread pools and allocator, which would understate every probe's ratio.
    base = _step_seconds(scale, dm, model, lr, [])
    probes = {v.name: _step_seconds(scale, dm, model, lr * v.lr_scale, v.probe()) for v in timed if v.probe}
    base = min(base, _step_seconds(scale, dm, model, lr, []))
    for v in timed:
        ratio = probes[v.name] / base
        ratios[v.name] = ratio
        effective = 1.0 - (1.0 - ratio) * v.coverage
        budgets[v.name] = steps_for_time(steps, effective, every)
    return budgets, ratios


def run_comparison(job: Job, scale: Scale, variants: list[Variant], source: Path | None = None) -> JobResult:
    """Trains every variant of one comparison at one seed; the first variant is the baseline."""
    finetune = source is not None
    dm = finetune_data(scale, job.seed, source) if source is not None else pretrain_data(scale, job.seed)
    model = str(source) if finetune else None
    steps = scale.ft_steps if finetune else scale.steps
    lr = scale.ft_lr if finetune else scale.lr
    every = max(1, steps // scale.val_points)
    budgets, ratios = _budgets(scale, dm, variants, model, lr, steps, every)
    start = None
    if finetune:  # every run starts from the same pretrained model: its loss on the new domain is the first point
        L.seed_everything(job.seed, verbose=False)
        before = _module(scale, model, lr, steps)
        loss = float(_trainer(scale, 1, [], 1, None).validate(before, datamodule=dm, verbose=False)[0]["val/loss"])
        start = Point(0.0, 0, 0, loss)
        del before
    result = JobResult(info={"budgets": budgets, "step time ratios": ratios})
    order = variants[job.seed % len(variants) :] + variants[: job.seed % len(variants)]
    for v in order:  # the order rotates with the seed: a drift of the machine's speed falls on every variant
        variant_lr = scale.lora_lr if v.lora else lr
        curve, module = _fit_curve(job, scale, dm, v, model, variant_lr, budgets[v.name], every, start)
        result.curves.append(curve)
        del module
        free_memory()
    result.curves.sort(key=lambda c: [v.name for v in variants].index(c.variant))
    return result


# ---------------------------------------------------------------------------------------------------- pruning


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def run_pruning(job: Job, scale: Scale) -> JobResult:
    """Source (not counted) -> pruning -> export -> continued training, against the same shape from scratch for the
    same wall-clock (the baseline)."""
    dm = pretrain_data(scale, job.seed)
    layers, kv, inter, hidden = scale.prune_target
    every = max(1, (scale.prune_steps + scale.continue_steps) // scale.val_points)
    with tempfile.TemporaryDirectory() as tmp:
        L.seed_everything(job.seed, verbose=False)
        source = _module(scale, None, scale.lr, scale.prune_source_steps)
        trainer = _trainer(scale, scale.prune_source_steps, [], None, None)
        trainer.fit(source, datamodule=dm)
        source_loss = float(trainer.validate(source, datamodule=dm, verbose=False)[0]["val/loss"])
        source_dir = Path(tmp) / "source"
        source.save_hf(source_dir)
        source_params = _params(source)
        del source, trainer
        free_memory()

        cb = StructuredPruning(
            num_layers=layers,
            num_kv_heads=kv,
            intermediate_size=inter,
            hidden_size=hidden,
            lagrangian_warmup_steps=scale.prune_steps // 2,
            seed=job.seed,
        )
        prune = Variant("pruned + continued", lambda s, n: [cb])
        masked, pruned = _fit_curve(job, scale, dm, prune, str(source_dir), scale.lr, scale.prune_steps, every)
        assert pruned.model is not None
        small = export_pruned(pruned.model.cpu(), cb.masks).float()
        small_dir = Path(tmp) / "pruned"
        small.save_pretrained(small_dir)
        small_params = _params(small)
        del pruned
        free_memory()
        cont = Variant("pruned + continued")
        tail, _ = _fit_curve(
            job, scale, dm, cont, str(small_dir), scale.lr, scale.continue_steps, every, start=masked.end
        )
        curve = Curve("pruned + continued", job.seed, masked.points + tail.points[1:])

        shape = small.config.to_dict()
        step_seconds = _step_seconds(scale, dm, shape, scale.lr, [])
        scratch_steps = steps_for_time(1, step_seconds / curve.end.seconds, every)
        scratch, _ = _fit_curve(
            job, scale, dm, Variant("same shape from scratch"), shape, scale.lr, scratch_steps, every
        )
        del small
        free_memory()
    info = {
        "source val loss": source_loss,
        "source params": source_params,
        "pruned params": small_params,
        "scratch steps": scratch_steps,
    }
    return JobResult([scratch, curve], info)


# ---------------------------------------------------------------------------------------------------- jobs


def build_source(scale: Scale) -> Path:
    """The fine-tuning comparisons' pretrained model: dense, ``ft_source_steps`` on the embedded corpus's first
    bytes (seed 0), saved with its tokenizer; built once per scale and reused."""
    fields = ("preset", "overrides", "seq", "batch", "lr", "val_batches", "corpus_bytes", "ft_source_steps")
    key = json.dumps({f: getattr(scale, f) for f in fields}, sort_keys=True, default=str)
    out = CACHE / f"quality-source-{scale.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (out / "config.json").is_file():
        return out
    dm = pretrain_data(scale, 0)
    L.seed_everything(0, verbose=False)
    module = _module(scale, None, scale.lr, scale.ft_source_steps)
    _trainer(scale, scale.ft_source_steps, [], None, None).fit(module, datamodule=dm)
    module.save_hf(out, tokenizer=dm.tokenizer, overwrite=True)
    del module
    free_memory()
    return out


def _scale(name: str) -> Scale:
    return {s.name: s for s in (CPU, GPU, SMOKE)}[name]


def run_job(job: Job) -> JobResult:
    scale = _scale(job.scale)
    if job.comparison == "source":
        build_source(scale)
        return JobResult()
    if job.comparison == "pruning":
        return run_pruning(job, scale)
    base = job.comparison.removesuffix("_125m")
    source = build_source(scale) if base == "finetune" else None
    return run_comparison(job, scale, comparison_variants(base), source)


def _job_main(argv: list[str]) -> int:
    job = Job(**json.loads(argv[0]))
    result = run_job(job)
    payload = {
        "curves": [
            {"variant": c.variant, "seed": c.seed, "points": [asdict(p) for p in c.points]} for c in result.curves
        ],
        "info": result.info,
    }
    Path(argv[1]).write_text(json.dumps(payload))
    return 0


def _load(path: Path) -> JobResult:
    data = json.loads(path.read_text())
    curves = [Curve(c["variant"], c["seed"], [Point(**p) for p in c["points"]]) for c in data["curves"]]
    return JobResult(curves, data["info"])


def run_parallel(
    jobs: list[Job], at_once: int, reserve: int = 0, errors: list[BaseException] | None = None
) -> dict[tuple[str, int], JobResult]:
    """Runs ``jobs`` as worker processes, ``at_once`` at a time, each pinned to its own cores (the first
    ``reserve`` cores left to the parent), CUDA hidden. A failed job is reported in ``errors`` (raised when None)
    and left out of the result."""
    cores = sorted(os.sched_getaffinity(0))[reserve:]
    per = max(1, len(cores) // at_once)
    free = [cores[i * per : (i + 1) * per] for i in range(min(at_once, len(cores)))]
    pending, done = list(jobs), {}
    running: list[tuple[Job, list[int], Path, subprocess.Popen[bytes]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        while pending or running:
            while pending and free:
                job, mine = pending.pop(0), free.pop(0)
                out = Path(tmp) / f"{job.comparison}-{job.seed}.json"
                env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(len(mine))}
                cmd = ["taskset", "-c", ",".join(map(str, mine)), sys.executable, "-m", "benchmarks.suites.quality"]
                cmd += ["_job", json.dumps(asdict(job)), str(out)]
                running.append((job, mine, out, subprocess.Popen(cmd, cwd=REPO, env=env)))
            time.sleep(1.0)
            for item in list(running):
                job, mine, out, proc = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                free.append(mine)
                if proc.returncode != 0:
                    error = RuntimeError(
                        f"quality job {job.comparison} seed {job.seed} failed (exit {proc.returncode})"
                    )
                    if errors is None:
                        raise error
                    errors.append(error)
                    continue
                done[(job.comparison, job.seed)] = _load(out)
    return done


# ---------------------------------------------------------------------------------------------------- records

TITLES = {
    "pretrain": "Pre-training: each technique against dense at equal wall-clock",
    "dropbp_settings": "DropBP's target and measurement in pre-training, at equal wall-clock",
    "finetune": "Fine-tuning a pretrained model on an unseen domain: LoRA, DropBP, LoRA + DropBP vs full fine-tuning",
    "pruning": "Pruned + continued vs the same shape from scratch, at equal wall-clock",
}
BASELINES = {
    "pretrain": "dense",
    "dropbp_settings": "dense",
    "finetune": "full fine-tuning",
    "pruning": "same shape from scratch",
}


def _notes(comparison: str, scale: Scale, results: list[JobResult]) -> str:
    base = comparison.removesuffix("_125m")
    precision = "bf16-mixed" if scale.name == "125m" else "fp32"
    seeds = ", ".join(str(s) for s in scale.seeds)
    budgets = "; ".join(
        f"seed {i}: " + ", ".join(f"{k} {v}" for k, v in r.info.get("budgets", {}).items())
        for i, r in enumerate(results)
    )
    ratios = {
        k: [r.info["step time ratios"][k] for r in results if k in r.info.get("step time ratios", {})]
        for k in (results[0].info.get("step time ratios", {}) if results else {})
    }
    ratio_text = ", ".join(f"{k} {min(v):.3f}..{max(v):.3f}" for k, v in ratios.items())
    common = (
        f"{scale.describe(precision)}; seeds {seeds} (init, data order and the technique's own draws; every variant "
        f"of a seed shares them; the variants' order rotates with the seed); validation every "
        "baseline_steps / "
        f"{scale.val_points} steps on {scale.val_batches} batches; training seconds exclude validation. Target = the "
        "baseline's final val loss of the same seed; 'time to target vs baseline' = the seconds at which the run "
        "first reaches it / the baseline's (interpolated between validations; NaN = not reached); 'val loss at "
        "equal time' = at the seed's shortest run's end (a longer run is read there mid-schedule, before its lr has "
        "decayed, so this column favours the shorter run; final val loss and time to target do not)."
    )
    if base in ("pretrain", "dropbp_settings"):
        data = (
            f"From a random init on the embedded corpus (first {scale.corpus_bytes or 'all'} bytes, BPE, 5% held "
            f"out), lr {scale.lr}."
        )
    elif base == "finetune":
        data = (
            f"Source: dense, {scale.ft_source_steps} steps on the embedded corpus's first "
            f"{scale.corpus_bytes or 'all'} bytes (library code, never the test package), seed 0. Fine-tuned on the "
            "standard library's test suite "
            f"(test/test_*.py, first {scale.ft_bytes:,} bytes, 5% of the files held out), {scale.ft_steps} steps of "
            f"full fine-tuning at lr {scale.ft_lr}; LoRA r 16, alpha 32, all linears at lr {scale.lora_lr}; DropBP "
            "sensitivities measured at step 0; SVD: every decoder linear replaced by its truncated SVD of rank "
            f"hidden size / {SVD_WIDTH_FRACTION} before the first step (skipped where the factors would not be "
            "smaller; the SVDs' time counted), at full fine-tuning's lr. The first point of every curve is the "
            "source's loss on the domain."
        )
    else:
        layers, kv, inter, hidden = scale.prune_target
        data = (
            f"Source: dense, {scale.prune_source_steps} steps per seed (its cost not counted). StructuredPruning to "
            f"{layers} layers, {kv} KV heads, MLP {inter}, hidden {hidden} for {scale.prune_steps} steps (Lagrangian "
            f"warm-up {scale.prune_steps // 2}; its points are the masked model's), exported, then "
            f"{scale.continue_steps} steps; baseline: that shape from a random init for the steps that fit the pruned "
            f"run's wall-clock (pruning included). lr {scale.lr}."
        )
    if base == "pruning":
        scratch = ", ".join(f"seed {i}: {r.info.get('scratch steps')}" for i, r in enumerate(results))
        return f"{common} {data} From-scratch steps: {scratch}."
    return f"{common} {data} Budgets (steps): {budgets}. Step time vs the baseline, measured: {ratio_text or '-'}."


def write_tables(ctx: Context, comparison: str, scale: Scale, results: list[JobResult], device: str | None) -> None:
    base = comparison.removesuffix("_125m")
    notes = _notes(comparison, scale, results)
    curves = [c for r in results for c in r.curves]
    title = TITLES[base] + (f" ({scale.preset})" if scale.name != "cpu" else f" (CPU scale, {scale.preset} class)")
    table = ctx.table(f"{comparison}_curves", f"{title}: validation curves", notes=notes, device=device)
    for c in curves:
        for p in c.points:
            table.add(
                {
                    "variant": c.variant,
                    "seed": c.seed,
                    "step": p.step,
                    "tokens": p.tokens,
                    "train seconds": p.seconds,
                    "val loss": p.loss,
                }
            )
    summary = ctx.table(comparison, title, notes=notes, device=device)
    for row in summarize(curves, BASELINES[base]):
        summary.add(row)
    if ctx.wandb:
        _wandb_summary(ctx, comparison, title, curves)


def _wandb_summary(ctx: Context, comparison: str, title: str, curves: list[Curve]) -> None:
    import wandb  # deferred: only with --wandb

    run = wandb.init(
        project="lit_accel-quality",
        group=f"{comparison}-{ctx.run_id}",
        name=f"{comparison}/overlay",
        job_type="overlay",
        mode="offline" if ctx.wandb == "offline" else "online",
        dir=str(CACHE / "wandb"),
    )
    run.log({f"{comparison}/val_loss_vs_seconds": overlay_chart(curves, title)})
    run.finish()


def _cpu_scale(ctx: Context, names: list[str], errors: list[BaseException]) -> None:
    """Runs the CPU-scale comparisons; each comparison's records are written as soon as its seeds are done, and a
    failing comparison does not stop the others (its error is kept for the caller)."""
    scale = SMOKE if ctx.smoke else CPU
    beside_gpu = ctx.device.type == "cuda"
    device = ctx.cpu_device() if beside_gpu else None
    try:
        if "finetune" in names and beside_gpu:  # built on the CPU like the jobs that read it, CUDA hidden
            run_parallel([Job("source", scale.name, 0)], 1, reserve=2)
        elif "finetune" in names:
            build_source(scale)
    except BaseException as e:
        errors.append(e)
        names = [c for c in names if c != "finetune"]
    jobs = {c: [Job(c, scale.name, s, ctx.wandb, f"{c}-{ctx.run_id}") for s in scale.seeds] for c in names}
    if ctx.jobs > 1 or beside_gpu:
        done = run_parallel([j for js in jobs.values() for j in js], ctx.jobs, 2 if beside_gpu else 0, errors)
    for c in names:
        try:
            if ctx.jobs > 1 or beside_gpu:
                results = [done[(c, s)] for s in scale.seeds]
            else:
                results = [run_job(j) for j in jobs[c]]
            write_tables(ctx, c, scale, results, device)
        except BaseException as e:  # reported by the caller once the others are recorded
            errors.append(e)


def run(ctx: Context) -> None:
    """CPU-scale comparisons (as worker processes with CUDA hidden, on a GPU machine: beside the GPU runs), and on a
    GPU the ``llama-125m`` ones."""
    names = [c for c in ("pretrain", "dropbp_settings", "finetune", "pruning") if ctx.wants(c)]
    gpu = ctx.device.type == "cuda" and not ctx.smoke
    if ctx.device.type == "cpu":
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    errors: list[BaseException] = []
    worker = None
    if names and ctx.device.type == "cuda":  # the thread only starts and waits for worker processes
        worker = threading.Thread(target=_cpu_scale, args=(ctx, names, errors))
        worker.start()
    elif names:
        _cpu_scale(ctx, names, errors)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        for c in ("pretrain_125m", "finetune_125m"):
            if ctx.wants(c):
                jobs = [Job(c, GPU.name, s, ctx.wandb, f"{c}-{ctx.run_id}") for s in GPU.seeds]
                try:
                    write_tables(ctx, c, GPU, [run_job(j) for j in jobs], None)
                except Exception as e:  # the other comparisons still run and record
                    errors.append(e)
    if worker is not None:
        worker.join()
    if errors:
        raise errors[0]


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_job":
        sys.exit(_job_main(sys.argv[2:]))
