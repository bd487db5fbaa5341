"""A pruned model's shape against the original: training and inference tokens/s of ``llama-1b`` and
``llama-1b-half`` in the same run.

    python -m benchmarks run pruning

8 x 2048 tokens. ``train``: the plain loop (bf16 autocast, fp32 master weights, fused AdamW with weight decay 0.1 on
the matrices, four random batches in turn) on the model ``CausalLM`` builds, with its default kernels (lit_accel's
on CUDA). ``inference``: forward passes under ``torch.no_grad`` in eval mode with bf16 weights. The pruned shape is
the ``llama-1b-half`` target of ``lit_accel.pruning.targets.TARGET_PRESETS`` (what ``recipes/prune_continue``
exports), built with random weights: the speed depends on the shape only. The original is the baseline of each
pass; both models of a pass live in one process and are timed window by window in a rotating order.

Peak memory is each model's own: the memory the other model of the pass holds between steps (its weights,
optimizer state and batches) is subtracted from the peak measured while this one ran.

Checks before timing: the pruned model has the target's dims and fewer parameters than the original; each model's
first training loss is finite; each inference model (bf16 weights) gives the logits of the training model with the
same initial weights under autocast (norm-wise relative error <= 0.1; the bf16 residual stream's rounding is
about 0.03; fp32 on a CPU: 1e-5).

Smoke (``--smoke``, a CPU, fp32 for both passes): ``llama-tiny`` against a narrower shape of it (hidden 64, two query
heads over one KV head, MLP 192), 2 x 32 tokens, one step per window.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from benchmarks.harness import Context, Measurement, free_memory, measure_interleaved
from lit_accel.models import CausalLM
from lit_accel.pruning.targets import TARGET_PRESETS

__all__ = ["run"]

SOURCE, TARGET = "llama-1b", "llama-1b-half"
# Half of llama-tiny's width with its group size (2 query heads per KV head) and head size (32).
SMOKE_TARGET = (
    "llama-tiny-half",
    dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, num_key_value_heads=1, intermediate_size=192),
)
PASSES = ("train", "inference")


_free = free_memory


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _model(source: str, overrides: dict[str, int] | None, device: torch.device) -> torch.nn.Module:
    """``CausalLM``'s model of ``source`` reshaped by ``overrides``, after seed 0 (the same weights every call)."""
    torch.manual_seed(0)
    module = CausalLM(source, config_overrides=overrides)
    module.configure_model()
    assert module.model is not None
    return module.model.to(device)


def _train_step(model: torch.nn.Module, batch: int, seq: int, device: torch.device) -> Callable[[], float]:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    gpu = device.type == "cuda"
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=3e-4, fused=gpu
    )
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, model.config.vocab_size, (4, batch, seq), generator=g).to(device)
    state = {"i": 0}
    model.train()

    def step() -> float:
        x = data[state["i"] % 4]
        state["i"] += 1
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
            loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _inference_step(
    model: torch.nn.Module, batch: int, seq: int, device: torch.device, dtype: torch.dtype
) -> Callable[[], object]:
    gpu = device.type == "cuda"
    g = torch.Generator().manual_seed(1)
    probe = torch.randint(0, model.config.vocab_size, (2, min(seq, 128)), generator=g).to(device)
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
        want = model(input_ids=probe, use_cache=False).logits.float()
    model = model.to(dtype)
    with torch.no_grad():
        got = model(input_ids=probe, use_cache=False).logits.float()
    # bf16 weights keep the residual stream in bf16 where autocast keeps it in fp32: about 3% apart at llama-1b (a
    # CPU's autocast), where another model's logits are off by ~100%.
    tol = 0.1 if gpu else 1e-5
    err = float((got - want).norm() / want.norm().clamp_min(1e-12))
    if not err <= tol:
        raise RuntimeError(f"pruning check: {dtype} inference logits off by {err:.3g} > {tol:g} from the fp32 model's")
    del want, got
    x = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g).to(device)

    def step() -> object:
        with torch.no_grad():
            return model(input_ids=x, use_cache=False)

    return step


def _check_shape(model: torch.nn.Module, overrides: dict[str, int], source_params: int, name: str) -> None:
    for key, value in overrides.items():
        if getattr(model.config, key) != value:
            raise RuntimeError(f"pruning check: {name}'s {key} is {getattr(model.config, key)}, {value} expected")
    params = sum(p.numel() for p in model.parameters())
    if not params < source_params:
        raise RuntimeError(f"pruning check: {name} has {params} parameters, the original {source_params}")


def run(ctx: Context) -> None:
    device = ctx.device
    if ctx.smoke:
        source, (target, overrides) = "llama-tiny", SMOKE_TARGET
        batch, seq, warmup, iters = 2, 32, 1, 1
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        source, target, overrides = SOURCE, TARGET, TARGET_PRESETS[TARGET]
        batch, seq, warmup, iters = 8, 2048, 3, 5
    gpu = device.type == "cuda"
    infer_dtype = torch.bfloat16 if gpu else torch.float32
    shapes: dict[str, dict[str, int] | None] = {source: None, target: overrides}
    table = ctx.table(
        "shape",
        f"Pruned shape vs original: {source} vs {target}",
        notes=(
            "train: "
            + (
                "bf16 autocast, fp32 master weights, fused AdamW, CausalLM's default CUDA kernels"
                if gpu
                else "fp32, AdamW, CausalLM's default on a CPU (no kernels)"
            )
            + f"; inference: {'bf16' if gpu else 'fp32'} weights, eval mode, no grad; {batch}x{seq} tokens, the "
            f"same random batches for both models. The two models of a pass are timed interleaved in one process, "
            f"{ctx.windows} windows of {iters} after {warmup} warm-up, median and spread (max - min). Baseline: the "
            f"original ({source}) in the same pass and run; 'speed vs original' = original ms / this ms (the "
            f"tokens/s ratio). {target}: "
            + ", ".join(f"{k} {v}" for k, v in overrides.items())
            + ", random weights. Peak GiB: the model's own (the other model's resident weights, optimizer state "
            "and batches subtracted). Checked: the target's dims and fewer parameters; a finite first loss; "
            "inference logits equal the training model's with the same weights (relative "
            f"{0.1 if gpu else 1e-5:g})."
        ),
    )
    params: dict[str, int] = {}
    timings: dict[tuple[str, str], Measurement] = {}
    for kind in PASSES:
        steps: dict[str, Callable[[], object]] = {}
        resident: dict[str, int] = {}
        for name, shape in shapes.items():
            before = _allocated(device)
            model = _model(source, shape, device)
            params[name] = sum(p.numel() for p in model.parameters())
            if shape is not None:
                _check_shape(model, shape, params[source], name)
            if kind == "train":
                step = _train_step(model, batch, seq, device)
                loss = float(step())  # also creates the optimizer state, which stays resident
                if not math.isfinite(loss):
                    raise RuntimeError(f"pruning check: {name}'s first training loss is {loss}")
            else:
                step = _inference_step(model, batch, seq, device, infer_dtype)
            del model
            _free()
            _sync(device)
            steps[name] = step
            resident[name] = _allocated(device) - before
        measured = measure_interleaved(steps, warmup=warmup, iters=iters, windows=ctx.windows, device=device)
        total = sum(resident.values())
        for name, m in measured.items():
            m.peak_gib -= (total - resident[name]) / 2**30
            timings[(kind, name)] = m
            print(f"{name} {kind}: {m.median_ms:.1f} ms, {m.peak_gib:.2f} GiB", flush=True)
        del steps, measured
        _free()
    for kind in PASSES:
        base = timings[(kind, source)]
        for name in shapes:
            m = timings[(kind, name)]
            table.add(
                {
                    "pass": kind,
                    "model": name,
                    "params": params[name],
                    "batch": f"{batch}x{seq}",
                    "median ms": m.median_ms,
                    "spread ms": m.spread_ms,
                    "windows": len(m.times_ms),
                    "tokens/s": batch * seq / (m.median_ms / 1e3),
                    "speed vs original": base.median_ms / m.median_ms,
                    "peak GiB": m.peak_gib,
                }
            )
