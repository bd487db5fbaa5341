"""The training step: ``CausalLM`` in a Lightning ``Trainer`` against the raw Hugging Face + torch loop, and the
hot-path kernels against HF eager, ``torch.compile`` and Liger-Kernel.

    python -m benchmarks run step

Two results, each at ``llama-125m`` (16 x 2048 tokens) and ``llama-1b`` (8 x 2048), on random token batches:

- ``hot_path``: one plain loop (bf16 autocast, fp32 master weights, fused AdamW, sdpa attention, the same batches
  and the same initial weights) around five models: ``HF eager`` (the Hugging Face model ``CausalLM`` builds, with
  lit_accel's kernels off: the baseline), ``HF + torch.compile`` (that model compiled; it compiles before timing),
  ``HF + Liger-Kernel`` (Liger's documented ``apply_liger_kernel_to_llama`` with rope, rms_norm, swiglu and
  fused_linear_cross_entropy on the model instance), ``HF + ours (apply_kernels)`` (``apply_kernels(strict=True)``),
  and the plugin's default path, ``CausalLM`` in a Trainer with ``kernels=None`` (the kernels on CUDA). Each
  (size, variant) runs in its own process, because Liger patches ``transformers`` functions globally and a crash or
  out-of-memory of one variant must not take the others down; the second size runs the variants in the reverse
  order, so a drift of the machine does not always fall on the same one. Liger missing: a row says so.
- ``train_step``: ``CausalLM`` in a Lightning ``Trainer`` (bf16-mixed) against the raw loop, both with lit_accel's
  kernels off, so the figure is the cost of Lightning and of the module around the same model; and a third row,
  the same Trainer with ``CausalLM``'s default kernels (``kernels=None``: on on CUDA), so the reader sees both.
  Two fits cannot share windows, so the loops run one after the other, in the reverse order at the second size.

Checks before timing: every ``hot_path`` child computes the first batch's loss and all gradients with its model as
built (HF eager) and again after patching or compiling it, and fails unless they agree (norm-wise relative error
over all parameters <= 5e-2 with bf16 autocast, 0.25 per parameter, loss <= 1e-2; fp32: 1e-4, 1e-3, 1e-4); the
Trainer variants start from the plain loop's initial weights, and their first step's loss must equal the plain
model's on the same batch (kernels off: 5e-3 bf16, 1e-5 fp32; the default kernels on: the loss bound above).
lit_accel's kernels must be patched in exactly where asked. A variant that fails or crashes gets a row saying so,
and the suite fails after the rest ran.

Smoke (``--smoke``, a CPU, fp32): ``llama-tiny``, 2 x 32 tokens (and 4 x 32 for ``train_step``), one step per
window; ``hot_path`` runs every variant, each in its own process: ours with the kernels' PyTorch references (a
CPU's dispatch), ``torch.compile`` with the ``aot_eager`` backend (dynamo and AOTAutograd without inductor, whose
compilation alone takes half a minute on a CPU; its row says so), Liger when it imports.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import inspect
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch

from benchmarks.common import RandomTokens, lightning_loop, raw_loop
from benchmarks.harness import REPO, Context, Measurement, measure
from lit_accel.kernels import KERNEL_NAMES, apply_kernels, kernels_applied
from lit_accel.models import CausalLM
from lit_accel.models.presets import PRESETS

__all__ = ["run"]

SIZES: tuple[tuple[str, int, int], ...] = (("llama-125m", 16, 2048), ("llama-1b", 8, 2048))
SMOKE_SIZES: tuple[tuple[str, int, int], ...] = (("llama-tiny", 2, 32), ("llama-tiny", 4, 32))
# One small model per family for the ``families`` result: (preset, batch, seq, config overrides). Batches keep
# HF eager (whose logits are materialised, 256k-word vocabularies for Gemma) within 80 GB with AdamW's fp32 state;
# Phi-3-mini's 3.8B parameters leave room for 16 of its 32 blocks only.
FAMILY_SIZES: tuple[tuple[str, int, int, dict[str, Any]], ...] = (
    ("qwen3-0.6b", 8, 2048, {}),
    ("gemma3-1b", 4, 2048, {}),
    ("gemma2-2b", 2, 2048, {}),
    ("phi3-mini", 2, 2048, {"num_hidden_layers": 16}),
    ("olmo2-1b", 4, 2048, {}),
    ("qwen3-moe-3b", 2, 2048, {}),
)
SMOKE_FAMILY_SIZES: tuple[tuple[str, int, int, dict[str, Any]], ...] = (("gemma2-tiny", 2, 32, {}),)
FAMILY_VARIANTS = ("eager", "liger", "ours")
# Liger-Kernel's patch function per ``model_type`` (called with the keyword arguments it accepts).
LIGER_FUNCTIONS = {
    "llama": "apply_liger_kernel_to_llama",
    "qwen3": "apply_liger_kernel_to_qwen3",
    "gemma2": "apply_liger_kernel_to_gemma2",
    "gemma3_text": "apply_liger_kernel_to_gemma3_text",
    "phi3": "apply_liger_kernel_to_phi3",
    "olmo2": "apply_liger_kernel_to_olmo2",
    "mixtral": "apply_liger_kernel_to_mixtral",
    "qwen3_moe": "apply_liger_kernel_to_qwen3_moe",
}

RAW = "raw HF + torch"
LIGHTNING = "lit_accel CausalLM (Lightning)"
LIGHTNING_DEFAULT = "lit_accel CausalLM (Lightning), default kernels"

VARIANTS = ("eager", "compile", "liger", "ours", "lightning")
LABELS = {
    "eager": "HF eager",
    "compile": "HF + torch.compile",
    "liger": "HF + Liger-Kernel",
    "ours": "HF + ours (apply_kernels)",
    "lightning": "CausalLM in a Lightning Trainer (kernels default on)",
}
NO_LIGER = "liger-kernel not installed"
SMOKE_BACKEND = "aot_eager"


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _numerics(device: torch.device) -> str:
    if device.type == "cuda":
        return "bf16 autocast (bf16-mixed in the Trainer), fp32 master weights, fused AdamW, sdpa attention"
    return "fp32, AdamW, sdpa attention"


def _tolerances(device: torch.device) -> dict[str, float]:
    # bf16 autocast: the variants round different intermediates (HF rounds the logits and norm outputs to bf16,
    # the fused kernels keep fp32 longer, Liger accumulates the LM head's weight gradient in bf16), and those
    # differences reach every gradient through the backward of the whole model; a wrong kernel is off by far more.
    # fp32 on a CPU: the kernels' references are Hugging Face's formulas, so only summation order differs.
    if device.type == "cuda":
        return {"loss": 1e-2, "grads": 5e-2, "param": 0.25, "first_step": 5e-3}
    return {"loss": 1e-4, "grads": 1e-4, "param": 1e-3, "first_step": 1e-5}


def _initial_model(preset: str, overrides: dict[str, Any] | None = None) -> torch.nn.Module:
    """The model every loop of a size starts from: ``CausalLM``'s, kernels off, built on the CPU after seed 0 (what
    ``raw_loop`` builds under the same seed)."""
    torch.manual_seed(0)
    module = CausalLM(preset, kernels=False, config_overrides=overrides or None)
    module.configure_model()
    assert module.model is not None
    return module.model


def _first_batch(batch: int, seq: int, n_batches: int, vocab: int) -> torch.Tensor:
    """The first batch both loops draw (``RandomTokens`` of their size, in order)."""
    return RandomTokens(batch * n_batches, seq, vocab).data[:batch]


def _loss(model: torch.nn.Module, x: torch.Tensor, device: torch.device) -> float:
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return float(model(input_ids=x, labels=x, use_cache=False).loss)


class _FirstStep(L.Callback):
    """Starts the Trainer's model from ``state`` (the plain loop's initial weights), checks which kernels are
    patched in, and raises unless the first step's loss equals ``ref_loss`` (the plain model's on that batch)."""

    def __init__(self, state: dict[str, torch.Tensor], ref_loss: float, tol: float, kernels: bool) -> None:
        self.state, self.ref_loss, self.tol, self.kernels = state, ref_loss, tol, kernels
        self.loss = float("nan")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = pl_module.model
        model.load_state_dict(self.state)
        patched = kernels_applied(model)
        if self.kernels and set(patched) != set(KERNEL_NAMES):
            raise RuntimeError(f"step check: the Trainer's model has kernels {patched}, all of {KERNEL_NAMES} expected")
        if not self.kernels and patched:
            raise RuntimeError(f"step check: the Trainer's model has kernels {patched}, none expected")
        self.state = {}

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if idx != 0 or not math.isnan(self.loss):
            return
        self.loss = float(outputs["loss"])
        if not abs(self.loss - self.ref_loss) <= self.tol * abs(self.ref_loss):
            raise RuntimeError(
                f"step check: the Trainer's first loss {self.loss} != the plain model's {self.ref_loss} on the same"
                " weights and batch"
            )


# ---------------------------------------------------------------------------------------------------- hot path


def _loss_and_grads(
    forward: Any, model: torch.nn.Module, x: torch.Tensor, device: torch.device
) -> tuple[float, dict[str, torch.Tensor | None]]:
    model.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = forward(input_ids=x, labels=x, use_cache=False).loss
    loss.backward()
    grads = {n: None if p.grad is None else p.grad.detach().float().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


def _compare(
    variant: str,
    loss: float,
    grads: dict[str, torch.Tensor | None],
    ref_loss: float,
    ref: dict[str, torch.Tensor | None],
    tol: dict[str, float],
) -> None:
    """Raises unless ``variant``'s loss and gradients equal HF eager's (``ref``) within ``tol``."""
    if not (math.isfinite(loss) and abs(loss - ref_loss) <= tol["loss"] * abs(ref_loss)):
        raise RuntimeError(f"hot_path check: {variant}: loss {loss} != HF eager's {ref_loss}")
    diff, norm = 0.0, 0.0
    for name, want in ref.items():
        got = grads.get(name)
        if got is None or want is None:
            if (got is None) != (want is None):
                raise RuntimeError(f"hot_path check: {variant}: {name} has a gradient in one model only")
            continue
        d, w = float((got - want).norm()) ** 2, float(want.norm()) ** 2
        if not math.sqrt(d) <= tol["param"] * max(math.sqrt(w), 1e-12):
            raise RuntimeError(
                f"hot_path check: {variant}: {name}'s gradient off by {math.sqrt(d / max(w, 1e-24)):.3g} > "
                f"{tol['param']:g} (relative, against HF eager)"
            )
        diff, norm = diff + d, norm + w
    err = math.sqrt(diff / max(norm, 1e-24))
    if not err <= tol["grads"]:
        raise RuntimeError(f"hot_path check: {variant}: gradients off by {err:.3g} > {tol['grads']:g} over all")


def _child(args: argparse.Namespace) -> dict[str, Any]:
    """One (size, variant) of ``hot_path``: checks the variant against HF eager, then times it."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    gpu = device.type == "cuda"
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
    variant, batch, seq = args.variant, args.batch, args.seq
    tol = _tolerances(device)
    n = args.warmup + args.iters * args.windows + 1
    model = _initial_model(args.preset, json.loads(args.overrides))
    vocab = model.config.vocab_size
    x0 = _first_batch(batch, seq, n, vocab).to(device)

    if variant == "lightning":
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        ref_loss = _loss(model.to(device), x0, device)
        del model
        _free()
        # Kernels on against the plain model's loss: bf16 rounding differs, hence the loss bound of the HF variants.
        probe = _FirstStep(state, ref_loss, tol["loss"], kernels=gpu)
        del state
        m = lightning_loop(
            args.preset, batch, seq, args.warmup, args.iters, args.windows, device, [probe], LABELS[variant]
        )
        return {"times_ms": m.times_ms, "peak_gib": m.peak_gib, "first_loss": probe.loss}

    if variant == "liger":
        model_type = model.config.model_type
        try:
            import liger_kernel.transformers as liger
        except ModuleNotFoundError:
            return {"skipped": NO_LIGER}
        except Exception as err:  # a build for another torch or triton
            return {"skipped": f"liger-kernel does not import: {type(err).__name__}: {err}"}
        apply_liger: Any = getattr(liger, LIGER_FUNCTIONS.get(str(model_type), ""), None)
        if apply_liger is None:
            return {"skipped": f"liger-kernel {_version('liger_kernel')} has no patch for {model_type}"}

    model = model.to(device)
    model.train()
    ref_loss, ref = _loss_and_grads(model, model, x0, device)
    forward: Any = model
    expected: set[str] = set()
    if variant == "liger":
        wanted: dict[str, Any] = dict(rope=True, rms_norm=True, swiglu=True, geglu=True, cross_entropy=False)
        wanted.update(fused_linear_cross_entropy=True, model=model)
        accepted = inspect.signature(apply_liger).parameters
        apply_liger(**{k: v for k, v in wanted.items() if k in accepted})
    elif variant == "ours":
        report = apply_kernels(model, strict=True)
        print("patched:", report.counts(), report.notes, flush=True)
        # Every kernel, except the gated-MLP one where every MLP is a mixture of experts (the report says so).
        expected = set(KERNEL_NAMES) - ({"swiglu"} - set(report.patched))
    elif variant == "compile":
        forward = torch.compile(model, backend=args.backend)
    patched = kernels_applied(model)
    if set(patched) != expected:
        raise RuntimeError(f"hot_path check: {variant}: lit_accel kernels patched in: {patched}")
    if variant != "eager":
        loss, grads = _loss_and_grads(forward, model, x0, device)
        _compare(LABELS[variant], loss, grads, ref_loss, ref, tol)
        del grads
    del ref
    _free()

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=3e-4,
        betas=(0.9, 0.95),
        fused=gpu,
    )
    data = RandomTokens(batch * n, seq, vocab).data.view(n, batch, seq)
    if gpu:
        data = data.pin_memory()
    state: dict[str, Any] = {"i": 0, "first": None}

    def step() -> None:
        x = data[state["i"] % n].to(device, non_blocking=True)
        state["i"] += 1
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
            loss = forward(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        if state["first"] is None:
            state["first"] = float(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)

    m = measure(LABELS[variant], step, warmup=args.warmup, iters=args.iters, windows=args.windows, device=device)
    return {"times_ms": m.times_ms, "peak_gib": m.peak_gib, "first_loss": state["first"]}


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _spawn(
    cfg: dict[str, Any],
    preset: str,
    batch: int,
    seq: int,
    variant: str,
    windows: int,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Runs one child; its result, or ``{"failed": why}``."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
        out = tmp.name
    cmd = [sys.executable, "-m", "benchmarks.suites.step", "--child", variant, "--preset", preset]
    cmd += ["--overrides", json.dumps(overrides or {})]
    cmd += ["--batch", str(batch), "--seq", str(seq), "--warmup", str(cfg["warmup"]), "--iters", str(cfg["iters"])]
    cmd += ["--windows", str(windows), "--backend", cfg["compile_backend"], "--out", out]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if not torch.cuda.is_available():
        # On a CPU the patched model runs the kernels' PyTorch references; interpreted Triton takes seconds a step.
        env.pop("TRITON_INTERPRET", None)
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=cfg["timeout"])
        ok = proc.returncode == 0 and os.path.getsize(out) > 0
        if not ok:
            print(f"{preset} {variant}: FAILED\n{stdout[-2000:]}\n{stderr[-4000:]}", flush=True)
            lines = [line for line in stderr.strip().splitlines() if line.strip()]
            return {"failed": f"failed (exit {proc.returncode}): {lines[-1][:300] if lines else 'no output'}"}
        with open(out) as f:
            result: dict[str, Any] = json.load(f)
        return result
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"failed": f"timed out after {cfg['timeout']} s"}
    finally:
        os.unlink(out)


def hot_path(ctx: Context, sizes: tuple[tuple[str, int, int], ...], cfg: dict[str, Any]) -> list[str]:
    """Times every variant at every size; returns the variants that failed (their rows say why)."""
    tol = _tolerances(ctx.device)
    table = ctx.table(
        "hot_path",
        "Training step with the hot-path kernels",
        notes=(
            f"{_numerics(ctx.device)}; the same random batches and initial weights (seed 0) for every variant; each "
            f"variant in its own process, {ctx.windows} windows of {cfg['iters']} steps after {cfg['warmup']} "
            "warm-up steps (torch.compile compiles before them, in the check), median and spread (max - min) per "
            "step; the second size runs the variants in the reverse order. Baseline: HF eager, the Hugging Face model "
            "CausalLM builds with lit_accel's kernels off (kernels=False), in the plain loop; 'speed vs HF eager' = "
            "HF eager ms / this ms. Liger: apply_liger_kernel_to_llama(rope, rms_norm, swiglu, "
            "fused_linear_cross_entropy) on the model instance. Ours: apply_kernels(strict=True). The CausalLM row "
            "is the plugin's default path: CausalLM(kernels=None) in a Lightning Trainer, which turns the kernels "
            "on on CUDA (not on a CPU). Checked before timing, in each variant's process: loss and gradients of "
            f"the first batch against HF eager's (relative error <= {tol['grads']:g} over all parameters, "
            f"{tol['param']:g} per parameter, loss {tol['loss']:g}); the Trainer starts from the same weights and "
            f"its first loss must equal HF eager's ({tol['loss']:g}). 'first-step loss': the loss of the "
            "first (warm-up) step."
        ),
    )
    return _time_variants(ctx, table, [(p, b, t, {}) for p, b, t in sizes], cfg, VARIANTS)


def families(ctx: Context, sizes: tuple[tuple[str, int, int, dict[str, Any]], ...], cfg: dict[str, Any]) -> list[str]:
    """HF eager, Liger-Kernel and ours on one small model per family; returns the variants that failed."""
    tol = _tolerances(ctx.device)
    table = ctx.table(
        "families",
        "Training step with the hot-path kernels, one model per family",
        notes=(
            f"{_numerics(ctx.device)} (Gemma 2: eager attention, transformers has no sdpa for its soft-capped "
            "attention); the same random batches and initial weights (seed 0) for every variant; each variant in "
            f"its own process, {ctx.windows} windows of {cfg['iters']} steps after {cfg['warmup']} warm-up steps, "
            "median and spread (max - min) per step; every other model runs the variants in the reverse order. "
            "Baseline: HF eager, the Hugging Face model CausalLM builds with lit_accel's kernels off; 'speed vs HF "
            "eager' = HF eager ms / this ms. Liger: its apply_liger_kernel_to_<family>(rope, rms_norm, swiglu or "
            "geglu, fused_linear_cross_entropy) on the model instance, where Liger has one. Ours: "
            "apply_kernels(strict=True): every kernel, the gated MLP except in mixture-of-experts blocks (HF's "
            "experts loop runs there). Checked before timing, in each variant's process: loss and gradients of the "
            f"first batch against HF eager's (relative error <= {tol['grads']:g} over all parameters, "
            f"{tol['param']:g} per parameter, loss {tol['loss']:g}). Model shapes: the released models' (random "
            "weights), with the block count cut where the model column says so."
        ),
    )
    return _time_variants(ctx, table, sizes, cfg, FAMILY_VARIANTS)


def _time_variants(
    ctx: Context,
    table: Any,
    sizes: Sequence[tuple[str, int, int, dict[str, Any]]],
    cfg: dict[str, Any],
    variants: tuple[str, ...],
) -> list[str]:
    """Runs every variant at every size in its own process and adds their rows; returns the failures."""
    tol = _tolerances(ctx.device)
    liger_missing = importlib.util.find_spec("liger_kernel") is None
    failures: list[str] = []
    for i, (preset, batch, seq, overrides) in enumerate(sizes):
        model_name = preset
        if "num_hidden_layers" in overrides:
            full = int(PRESETS[preset]["num_hidden_layers"])
            model_name = f"{preset} ({overrides['num_hidden_layers']} of {full} blocks)"
        head = {"model": model_name, "batch": f"{batch}x{seq}"}
        results: dict[str, dict[str, Any]] = {}
        for variant in variants if i % 2 == 0 else variants[::-1]:
            if variant == "liger" and liger_missing:
                results[variant] = {"skipped": NO_LIGER}
            else:
                results[variant] = _spawn(cfg, preset, batch, seq, variant, ctx.windows, overrides)
            res = results[variant]
            if "times_ms" in res:
                if len(res["times_ms"]) != ctx.windows:
                    res = results[variant] = {"failed": f"{len(res['times_ms'])} windows, {ctx.windows} expected"}
                else:
                    m = Measurement(LABELS[variant], res["times_ms"])
                    print(f"{preset} {variant}: {m.median_ms:.1f} ms, loss {res['first_loss']}", flush=True)
            if "failed" in res:
                failures.append(f"{preset} {LABELS[variant]}: {res['failed']}")
        eager = results["eager"]
        base = Measurement(LABELS["eager"], eager["times_ms"]) if "times_ms" in eager else None
        for variant in variants:
            res = results[variant]
            if "times_ms" not in res:
                table.add({**head, "variant": LABELS[variant], "note": res.get("skipped") or res.get("failed")})
                continue
            m = Measurement(LABELS[variant], res["times_ms"])
            peak = res["peak_gib"]
            first = res["first_loss"]
            if base is not None and first is not None and eager["first_loss"] is not None:
                ref = eager["first_loss"]
                if not abs(first - ref) <= tol["loss"] * abs(ref):
                    raise RuntimeError(f"hot_path check: {preset} {LABELS[variant]}: first loss {first} != {ref}")
            row: dict[str, Any] = {
                **head,
                "variant": LABELS[variant],
                "median ms/step": m.median_ms,
                "spread ms": m.spread_ms,
                "windows": len(m.times_ms),
                "tokens/s": batch * seq / (m.median_ms / 1e3),
                "speed vs HF eager": base.median_ms / m.median_ms if base is not None else float("nan"),
                "peak GiB": float("nan") if peak is None else float(peak),
                "first-step loss": float("nan") if first is None else float(first),
            }
            if variant == "compile" and cfg["compile_backend"] != "inductor":
                row["note"] = f"backend {cfg['compile_backend']} (inductor's compilation takes half a minute on a CPU)"
            table.add(row)
    return failures


# ---------------------------------------------------------------------------------------------------- train step


def train_step(ctx: Context, sizes: tuple[tuple[str, int, int], ...], cfg: dict[str, Any]) -> None:
    warmup, iters = cfg["warmup"], cfg["iters"]
    tol, tol_kernels = _tolerances(ctx.device)["first_step"], _tolerances(ctx.device)["loss"]
    table = ctx.table(
        "train_step",
        "Training step: CausalLM (Lightning) vs raw Hugging Face loop",
        notes=(
            f"{_numerics(ctx.device)}; lit_accel's kernels off in both loops (kernels=False), so the difference is "
            "Lightning's and the module's own cost around the same Hugging Face model; the same random batches and "
            f"initial weights (seed 0). {ctx.windows} windows of {iters} steps after {warmup} warm-up steps, median "
            "and spread (max - min) per step; the loops run one after the other (two fits cannot share windows), "
            "the raw loop first at the first size and second at the next. Baseline: the raw loop (the Hugging Face "
            "model, torch.autocast, fused AdamW with CausalLM's weight-decay groups, no Lightning); 'speed vs raw' = "
            f"raw ms / this ms. '{LIGHTNING_DEFAULT}': the same Trainer with CausalLM(kernels=None), the plugin's "
            "default (lit_accel's kernels on CUDA, off on a CPU), so the reader sees both; it runs last at the first "
            "size and first at the next. Checked: the kernels-off Trainer's model has no kernels patched in, the "
            "default one all of them on CUDA, and each first loss equals the plain model's on the same weights and "
            f"batch (relative {tol:g} kernels off, {tol_kernels:g} kernels on)."
        ),
    )
    for i, (preset, batch, seq) in enumerate(sizes):
        n = warmup + iters * ctx.windows + 1
        model = _initial_model(preset)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        ref_loss = _loss(
            model.to(ctx.device), _first_batch(batch, seq, n, model.config.vocab_size).to(ctx.device), ctx.device
        )
        del model
        _free()
        probes = {
            LIGHTNING: _FirstStep(dict(state), ref_loss, tol, kernels=False),
            # Kernels on against the plain model's loss: bf16 rounding differs, hence the hot-path loss bound.
            LIGHTNING_DEFAULT: _FirstStep(state, ref_loss, tol_kernels, kernels=ctx.device.type == "cuda"),
        }
        del state
        loops = [RAW, LIGHTNING, LIGHTNING_DEFAULT] if i % 2 == 0 else [LIGHTNING_DEFAULT, LIGHTNING, RAW]
        measured: dict[str, Measurement] = {}
        for loop in loops:
            torch.manual_seed(0)
            args = (preset, batch, seq, warmup, iters, ctx.windows, ctx.device)
            if loop == RAW:
                m = raw_loop(*args, kernels=False, name=RAW)
            else:
                kernels = False if loop == LIGHTNING else None
                m = lightning_loop(*args, callbacks=[probes[loop]], name=loop, kernels=kernels)
            _free()
            if len(m.times_ms) != ctx.windows:
                raise RuntimeError(f"{preset} {loop}: {len(m.times_ms)} windows timed, {ctx.windows} expected")
            measured[loop] = m
        raw = measured[RAW]
        for loop in (RAW, LIGHTNING, LIGHTNING_DEFAULT):
            m = measured[loop]
            table.add(
                {
                    "model": preset,
                    "batch": f"{batch}x{seq}",
                    "loop": loop,
                    "median ms/step": m.median_ms,
                    "spread ms": m.spread_ms,
                    "windows": len(m.times_ms),
                    "tokens/s": batch * seq / (m.median_ms / 1e3),
                    "speed vs raw": raw.median_ms / m.median_ms,
                    "peak GiB": m.peak_gib,
                }
            )


# ---------------------------------------------------------------------------------------------------- run


def run(ctx: Context) -> None:
    if ctx.smoke:
        cfg: dict[str, Any] = dict(warmup=1, iters=1, timeout=120, compile_backend=SMOKE_BACKEND)
        hot_sizes, step_sizes = SMOKE_SIZES[:1], SMOKE_SIZES
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        # A child is killed after 9 minutes, so a hung variant becomes a row instead of stalling the suite.
        cfg = dict(warmup=5, iters=10, timeout=540, compile_backend="inductor")
        hot_sizes, step_sizes = SIZES, SIZES
    family_sizes = SMOKE_FAMILY_SIZES if ctx.smoke else FAMILY_SIZES
    hot_sizes = tuple(s for s in hot_sizes if ctx.wants_model(s[0]))
    step_sizes = tuple(s for s in step_sizes if ctx.wants_model(s[0]))
    family_sizes = tuple(s for s in family_sizes if ctx.wants_model(s[0]))
    # The child processes first, while this process holds no GPU memory.
    failures = hot_path(ctx, hot_sizes, cfg) if ctx.wants("hot_path") else []
    if ctx.wants("families"):
        failures += families(ctx, family_sizes, cfg)
    if ctx.wants("train_step"):
        train_step(ctx, step_sizes, cfg)
    if failures:
        raise RuntimeError("hot-path variants failed: " + "; ".join(failures))


def _main() -> None:
    parser = argparse.ArgumentParser(description="one hot_path variant (started by the suite)")
    parser.add_argument("--child", choices=VARIANTS, required=True)
    parser.add_argument("--preset", required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--seq", type=int, required=True)
    parser.add_argument("--warmup", type=int, required=True)
    parser.add_argument("--iters", type=int, required=True)
    parser.add_argument("--windows", type=int, required=True)
    parser.add_argument("--backend", default="inductor", help="torch.compile's backend")
    parser.add_argument("--overrides", default="{}", help="config overrides of the preset, as JSON")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    args.variant = args.child
    result = _child(args)
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    _main()
