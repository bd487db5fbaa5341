"""Each hot-path op alone: lit_accel's Triton kernels against Hugging Face's PyTorch composition and Liger-Kernel.

    python -m benchmarks run kernels

Four tables, each at llama-1b and llama-125m shapes (8 x 2048 and 16 x 2048 tokens), forward and forward +
backward, bf16 activations as in a bf16-mixed LLaMA step:

- ``rms_norm``: RMSNorm of ``[tokens, hidden]`` (16384 x 2048, 32768 x 768) with an fp32 weight (bf16-mixed) and
  with a bf16 weight; gradients of x and the weight. Variants: ``HF LlamaRMSNorm`` (the eager module, the
  baseline); ``torch F.rms_norm`` on the weight cast to x's dtype (a speed reference: it does not round like HF);
  ``ours`` (:func:`lit_accel.ops.rms_norm`, HF's output dtype); ``ours, out bf16`` (``out_dtype=bf16``, what the
  model patch passes under autocast; fp32 weight only); ``Liger LigerRMSNorm`` (``casting_mode="llama"``, HF's
  rounding). On a GPU the kernel time (sum of kernel durations, torch.profiler) is recorded beside the CUDA-event
  time, which includes launch gaps.
- ``swiglu``: ``silu(gate) * up`` on bf16 ``[tokens, intermediate]`` (16384 x 5632, 32768 x 2048): ``HF``
  (``F.silu(gate) * up``, what ``LlamaMLP`` runs), ``ours`` (:func:`lit_accel.ops.swiglu`), ``liger``
  (``LigerSiLUMulFunction``, what ``LigerSwiGLUMLP`` calls).
- ``rope``: rotary embedding of bf16 q/k laid out as HF makes them (``proj(x).view(B, S, H, D).transpose(1, 2)``,
  gradients taken w.r.t. the projection outputs) with cos/sin from a real ``LlamaRotaryEmbedding`` in fp32 (what
  HF gives under bf16 autocast; HF's and our output is then fp32) and in bf16: ``HF`` (``apply_rotary_pos_emb``),
  ``ours`` (:func:`lit_accel.ops.apply_rope`), ``ours, out_dtype=bf16`` (fp32 cos only), ``liger``
  (``LigerRopeFunction``, what ``liger_rotary_pos_emb`` calls).
- ``linear_cross_entropy``: LM head + cross-entropy, bf16 hidden and head, LLaMA-2's vocabulary (32000), 10% of
  labels ignored: ``HF (lm_head + fp32 CE)`` (:func:`lit_accel.ops.linear_cross_entropy_reference`, ``F.linear``
  then ``F.cross_entropy`` on ``logits.float()`` as ``LlamaForCausalLM`` does), ``ours`` with the automatic chunk
  and with 1024, 2048, 4096 and 8192 tokens per chunk, and Liger's ``LigerFusedLinearCrossEntropyFunction`` with
  its default bf16 weight-gradient accumulation and with ``accum_dtype=fp32`` (ours always accumulates in fp32).

How the figures are made honest: every variant of one op and shape lives in one process on the same inputs and is
timed with :func:`benchmarks.harness.measure_interleaved` (warm-up excluded, then ``ctx.windows`` windows in
rotating order; median and spread recorded). Before any timing, each variant's forward output and gradients are
checked against HF's on the same inputs and upstream gradient (elementwise for outputs, relative norm for
gradients, tolerances per activation dtype); a mismatch fails the suite. Our ops are called with
``use_kernel=True`` (the fused cross-entropy's fallback reason must be None), so a silent fallback to the PyTorch
reference cannot be timed as ours. Liger-Kernel is optional: when ``import liger_kernel`` fails, each case gets a
row saying "liger-kernel not installed" and no Liger timing; a Liger call that raises (rather than computing a
different result, which fails the suite) gets a row with the error instead of a timing. Liger writes gradients
into its inputs' or upstream gradient's memory (SwiGLU, RMSNorm) or rotates its inputs in place (RoPE), so it gets
its own copies of them; the values it then runs on change from call to call, its cost does not.

Smoke (``--smoke``, a CPU with ``TRITON_INTERPRET=1``): the same code path in fp32 at tiny shapes (16 tokens x 64
hidden, vocabulary 128, one chunk size), one call per window; the kernel-time and memory columns are empty (no
GPU).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.harness import Context, Measurement, Table, free_memory, measure_interleaved
from lit_accel.ops import apply_rope, fused_linear_cross_entropy, linear_cross_entropy_reference, rms_norm, swiglu
from lit_accel.ops.linear_cross_entropy import fused_linear_cross_entropy_fallback_reason

__all__ = ["run"]

BF16, F32 = torch.bfloat16, torch.float32
EPS = 1e-5
NO_LIGER = "liger-kernel not installed"

Step = Callable[[], object]


# ------------------------------------------------------------------------------------------------------ sizes


@dataclass(frozen=True)
class Sizes:
    """Shapes, dtypes and call counts of one run (real or smoke)."""

    act: torch.dtype
    rms_shapes: Sequence[tuple[str, int, int]]
    rms_dtypes: Sequence[tuple[str, torch.dtype, torch.dtype]]
    swiglu_shapes: Sequence[tuple[str, int, int]]
    rope_shapes: Sequence[tuple[str, int, int, int, int, int]]
    rope_cos: Sequence[torch.dtype]
    ce_shapes: Sequence[tuple[str, int, int, int]]
    ce_chunks: Sequence[int]
    iters: Mapping[str, int] = field(default_factory=dict)
    warmup: Mapping[str, int] = field(default_factory=dict)


REAL = Sizes(
    act=BF16,
    rms_shapes=[("llama-1b 16384x2048", 16384, 2048), ("llama-125m 32768x768", 32768, 768)],
    rms_dtypes=[("bf16 x, fp32 w", BF16, F32), ("bf16 x, bf16 w", BF16, BF16)],
    swiglu_shapes=[("llama-1b", 16384, 5632), ("llama-125m", 32768, 2048)],
    # (label, B, S, Hq, Hkv, D)
    rope_shapes=[("llama-1b", 8, 2048, 32, 4, 64), ("llama-125m", 16, 2048, 12, 12, 64)],
    rope_cos=[F32, BF16],
    # (label, tokens, hidden, vocabulary)
    ce_shapes=[("llama-1b", 16384, 2048, 32000), ("llama-125m", 32768, 768, 32000)],
    ce_chunks=[1024, 2048, 4096, 8192],
    iters={"rms_norm": 50, "swiglu": 20, "rope": 20, "linear_cross_entropy": 10},
    warmup={"rms_norm": 5, "swiglu": 3, "rope": 3, "linear_cross_entropy": 3},
)

# Triton's CPU interpreter emulates in numpy: fp32 only (no bf16), and small grids so it finishes in seconds.
SMOKE = Sizes(
    act=F32,
    rms_shapes=[("tiny 16x64", 16, 64)],
    rms_dtypes=[("fp32 x, fp32 w", F32, F32)],
    swiglu_shapes=[("tiny", 16, 64)],
    rope_shapes=[("tiny", 1, 16, 4, 2, 16)],
    rope_cos=[F32],
    ce_shapes=[("tiny", 16, 64, 128)],
    ce_chunks=[8],
    iters={},
    warmup={},
)


def _iters(sizes: Sizes, op: str) -> int:
    return sizes.iters.get(op, 1)


def _warmup(sizes: Sizes, op: str) -> int:
    return sizes.warmup.get(op, 1)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _short(dtype: torch.dtype) -> str:
    return {BF16: "bf16", F32: "fp32", torch.float16: "fp16"}.get(dtype, _name(dtype))


_free = free_memory


def _resident_gib(device: torch.device) -> float:
    if device.type != "cuda":
        return 0.0
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device) / 2**30


# ------------------------------------------------------------------------------------------------------ Liger


_LIGER = {
    "rms_norm": ("liger_kernel.transformers.rms_norm", "LigerRMSNorm"),
    "swiglu": ("liger_kernel.ops.swiglu", "LigerSiLUMulFunction"),
    "rope": ("liger_kernel.ops.rope", "LigerRopeFunction"),
    "linear_cross_entropy": ("liger_kernel.ops.fused_linear_cross_entropy", "LigerFusedLinearCrossEntropyFunction"),
}


class Liger:
    """Liger-Kernel's RMSNorm module and its SwiGLU / RoPE / fused linear cross-entropy functions, each when it
    imports (absent, or built for another torch/triton: no Liger timing, and a row saying why)."""

    def __init__(self) -> None:
        self.ops: dict[str, Any] = {}
        self.missing: dict[str, str] = {}
        try:
            import liger_kernel  # noqa: F401
        except Exception:
            self.missing = dict.fromkeys(_LIGER, NO_LIGER)
            return
        for op, (module, name) in _LIGER.items():
            try:
                self.ops[op] = getattr(importlib.import_module(module), name)
            except Exception as e:
                self.missing[op] = f"{module}.{name} does not import: {type(e).__name__}"

    def note(self, op: str) -> str:
        """The table notes' sentence on Liger for ``op``."""
        if op in self.ops:
            return f"Liger-Kernel {self.version()} present."
        return f"{self.missing[op]}: no Liger timing (a row says so)."

    @staticmethod
    def version() -> str:
        try:
            from importlib.metadata import version

            return version("liger-kernel")
        except Exception:
            return "(version unknown)"


# ------------------------------------------------------------------------------------------------------ variants


@dataclass
class Variant:
    """One implementation of an op on shared inputs: ``fn`` runs the forward (a tensor or a tuple of tensors),
    ``params`` are the tensors whose gradients forward + backward asks for."""

    name: str
    fn: Callable[[], Any]
    params: list[torch.Tensor]
    peer: bool = False


def _outs(out: Any) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _upstream_like(outs: Sequence[torch.Tensor], ref: Sequence[torch.Tensor] | None) -> tuple[torch.Tensor, ...] | None:
    """Upstream gradients for ``outs``: HF's values (``ref``) in each output's own dtype and strides (as SDPA's
    backward returns dq/dk shaped like the q/k it got); None for a scalar loss."""
    if ref is None:
        return None
    return tuple(torch.empty_like(o).copy_(r) for o, r in zip(outs, ref))


# Per activation dtype: (output rtol, output atol, gradient relative-norm bound). fp32: the kernels differ from
# PyTorch only by summation order. bf16: HF rounds several intermediates to bf16, the kernels (and Liger) round
# once or keep fp32, and Liger accumulates the LM head's weight gradient in bf16 by default; an output may differ
# by one or two bf16 ulps (absolutely, where two rounded terms of RoPE nearly cancel), a gradient by a few 1e-3
# in norm. A wrong kernel (a misread tile, a missing term) is off by O(1).
_TOL = {F32: (1e-4, 1e-5, 1e-4), BF16: (1.6e-2, 3e-2, 2e-2)}


def _compare(what: str, got: torch.Tensor, want: torch.Tensor, act: torch.dtype, gradient: bool) -> None:
    rtol, atol, rel_bound = _TOL[act]
    if got.shape != want.shape:
        raise AssertionError(f"{what}: shape {tuple(got.shape)} != HF's {tuple(want.shape)}")
    a, b = got.detach().double(), want.detach().double()
    if not torch.isfinite(a).all():
        raise AssertionError(f"{what}: not finite")
    if gradient:
        rel = float((a - b).norm() / b.norm().clamp_min(1e-30))
        if rel > rel_bound:
            raise AssertionError(f"{what}: relative error {rel:.3g} against HF's exceeds {rel_bound:g}")
        return
    err = (a - b).abs()
    bad = err > atol + rtol * b.abs()
    if bool(bad.any()):
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {b.numel()} elements differ from HF's by more than {atol:g} + {rtol:g}|x| "
            f"(max abs error {float(err.max()):.3g})"
        )


def _check(
    op: str, case: str, ref: Variant, variants: Sequence[Variant], act: torch.dtype, g: Sequence[torch.Tensor] | None
) -> dict[str, str]:
    """Each variant's forward outputs and gradients against the reference's, on the same inputs and upstream
    gradient ``g`` (None: a scalar loss). Raises AssertionError naming the first mismatch.

    Returns:
        ``{name: why}`` for the peer variants (Liger) that raised instead of computing (e.g. a build that rejects
        this torch/triton, or an out-of-memory): they get a row saying so and no timing.
    """
    ref_out = _outs(ref.fn())
    ref_grads = torch.autograd.grad(ref_out, ref.params, _upstream_like(ref_out, g))
    ref_out = tuple(o.detach() for o in ref_out)
    failed: dict[str, str] = {}
    for v in variants:
        try:
            out = _outs(v.fn())
            grads = torch.autograd.grad(out, v.params, _upstream_like(out, g))
        except Exception as e:
            if not v.peer:
                raise
            failed[v.name] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            print(f"{op} {case} {v.name}: {failed[v.name]}", flush=True)
            _free()
            continue
        where = f"{op} {case} {v.name}"
        if len(out) != len(ref_out):
            raise AssertionError(f"{where}: {len(out)} outputs, HF has {len(ref_out)}")
        for i, (o, r) in enumerate(zip(out, ref_out)):
            _compare(f"{where} output {i}", o, r, act, gradient=False)
        for i, (d, r) in enumerate(zip(grads, ref_grads)):
            _compare(f"{where} gradient {i}", d, r, act, gradient=True)
        del out, grads
    return failed


def _steps(v: Variant, g: Sequence[torch.Tensor] | None) -> tuple[Step, Step]:
    """(forward, forward + backward) of ``v``, each with its own upstream gradient (Liger may write into it)."""
    upstream = _upstream_like(_outs(v.fn()), g)

    def fwd() -> object:  # grad mode on, as in training: the forward saves what backward needs
        return v.fn()

    def fwd_bwd() -> object:
        return torch.autograd.grad(_outs(v.fn()), v.params, upstream)

    return fwd, fwd_bwd


@dataclass
class Case:
    """One op at one shape: the checked variants (HF's first), their timings, and the peers that failed."""

    variants: list[Variant]
    steps: dict[str, tuple[Step, Step]]
    fwd: dict[str, Measurement]
    both: dict[str, Measurement]
    resident_gib: float
    failed: dict[str, str]

    @property
    def ref(self) -> Variant:
        return self.variants[0]

    def speed(self, name: str) -> float:
        """HF's forward + backward time over this variant's (higher is faster)."""
        return self.both[self.ref.name].median_ms / self.both[name].median_ms

    def peak_above_inputs(self, name: str, with_forward: bool = False) -> float:
        peak = max(self.fwd[name].peak_gib, self.both[name].peak_gib) if with_forward else self.both[name].peak_gib
        return peak - self.resident_gib

    def timing(self, name: str) -> dict[str, float | int]:
        fwd, both = self.fwd[name], self.both[name]
        return {
            "fwd ms": fwd.median_ms,
            "fwd spread ms": fwd.spread_ms,
            "fwd+bwd ms": both.median_ms,
            "fwd+bwd spread ms": both.spread_ms,
            "windows": min(len(fwd.times_ms), len(both.times_ms)),
        }


def _case(
    ctx: Context,
    op: str,
    label: str,
    ref: Variant,
    others: Sequence[Variant],
    act: torch.dtype,
    g: Sequence[torch.Tensor] | None,
    iters: int,
    warmup: int,
) -> Case:
    """Checks every variant against ``ref``, then times forward and forward + backward of each, interleaved."""
    failed = _check(op, label, ref, others, act, g)
    variants = [ref, *(v for v in others if v.name not in failed)]
    steps = {v.name: _steps(v, g) for v in variants}
    resident = _resident_gib(ctx.device)
    kw: dict[str, Any] = {"warmup": warmup, "iters": iters, "windows": ctx.windows, "device": ctx.device}
    fwd = measure_interleaved({n: s[0] for n, s in steps.items()}, **kw)
    both = measure_interleaved({n: s[1] for n, s in steps.items()}, **kw)
    return Case(variants, steps, fwd, both, resident, failed)


def _peer_rows(table: Table, head: Mapping[str, Any], case: Case, liger: Liger, op: str, names: Sequence[str]) -> None:
    """Rows for the Liger variants without timing: those that failed, or all of them when Liger is missing."""
    for name, why in case.failed.items():
        table.add({**head, "variant": name, "note": why})
    if op in liger.missing:
        for name in names:
            table.add({**head, "variant": name, "note": liger.missing[op]})


def _saved_bytes(fn: Callable[[], object]) -> float:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return float(sum(seen.values()))


def _gpu_ms(steps: Mapping[str, Step], iters: int, windows: int) -> dict[str, Measurement]:
    """Kernel time per call: the sum of the durations of every kernel a step launches (torch.profiler), per window
    of ``iters`` calls, variants interleaved like :func:`measure_interleaved`.

    CUDA-event windows include launch gaps, so a Python-heavy op whose kernels finish before the CPU issues the
    next call is timed by its CPU cost there; in a training step those gaps overlap other layers' GPU work, and
    this figure is what the op costs the GPU.
    """
    from torch.profiler import ProfilerActivity, profile

    names = list(steps)
    out = {n: Measurement(n) for n in names}
    for w in range(windows):
        order = names[w % len(names) :] + names[: w % len(names)]
        for name in order:
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(iters):
                    steps[name]()
                torch.cuda.synchronize()
            total_us = sum(float(getattr(e, "self_device_time_total", 0.0)) for e in prof.key_averages())
            out[name].times_ms.append(total_us / iters / 1e3)
    return out


# ------------------------------------------------------------------------------------------------------ RMSNorm


def _rms_variants(
    m: int, n: int, x_dtype: torch.dtype, w_dtype: torch.dtype, device: torch.device, liger: Liger
) -> tuple[Variant, list[Variant]]:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = torch.randn(m, n, device=device).to(x_dtype).requires_grad_()
    w = (1.0 + 0.1 * torch.randn(n, device=device)).to(w_dtype).requires_grad_()
    hf = LlamaRMSNorm(n, eps=EPS).to(device)
    hf.weight = torch.nn.Parameter(w.detach().clone())
    ref = Variant("HF LlamaRMSNorm", lambda: hf(x), [x, hf.weight])
    out = [Variant("torch F.rms_norm", lambda: F.rms_norm(x, (n,), w.to(x_dtype), EPS), [x, w])]
    out.append(Variant("ours", lambda: rms_norm(x, w, EPS, use_kernel=True), [x, w]))
    if w_dtype != x_dtype:
        out.append(Variant("ours, out bf16", lambda: rms_norm(x, w, EPS, out_dtype=BF16, use_kernel=True), [x, w]))
    if "rms_norm" in liger.ops:
        # Its backward writes dx into the upstream gradient's memory (in_place=True, its default): every variant
        # gets its own upstream gradient.
        mod = liger.ops["rms_norm"](n, eps=EPS, casting_mode="llama").to(device)
        mod.weight = torch.nn.Parameter(w.detach().clone())
        out.append(Variant(LIGER_RMS, lambda: mod(x), [x, mod.weight], peer=True))
    return ref, out


LIGER_RMS = "Liger LigerRMSNorm"


def _rms_bytes(m: int, n: int, x_dtype: torch.dtype, y_dtype: torch.dtype) -> int:
    """Minimum bytes an RMSNorm forward + backward moves: read x, write y; read x and dy, write dx."""
    xb, yb = x_dtype.itemsize, y_dtype.itemsize
    return m * n * (xb + yb) + m * n * (xb + yb + xb)


def _run_rms_norm(ctx: Context, sizes: Sizes, liger: Liger) -> None:
    gpu = ctx.device.type == "cuda"
    iters, warmup = _iters(sizes, "rms_norm"), _warmup(sizes, "rms_norm")
    table = ctx.table(
        "rms_norm",
        "RMSNorm kernel vs HF LlamaRMSNorm vs Liger",
        notes=(
            f"eps={EPS}; forward and forward + backward (gradients of x and the weight). ms: median of "
            f"{ctx.windows} windows of {iters} calls after {warmup} warm-up calls, variants interleaved "
            "(CUDA events on a GPU, launch gaps included); spread = max - min. GPU ms: sum of kernel durations "
            "(torch.profiler), median of as many windows, also interleaved. GB/s: minimum bytes (forward: read x, "
            "write y; backward: read x and dy, write dx) over the forward + backward GPU ms. Speed vs HF = HF's "
            "time / this time for the same shape and dtypes (higher is faster). Peak GiB above inputs: max "
            "allocated during forward + backward minus what was allocated before timing (all variants' inputs, "
            "weights and upstream gradients). Baseline: HF's LlamaRMSNorm module, eager. torch F.rms_norm runs on "
            "the weight cast to x's dtype and does not round like HF (a speed reference). Each variant's output "
            f"and gradients were checked against HF's before timing. {liger.note('rms_norm')}"
        ),
    )
    nan = float("nan")
    for label, m, n in sizes.rms_shapes:
        for dlabel, x_dtype, w_dtype in sizes.rms_dtypes:
            head = {"shape": label, "dtypes": dlabel}
            ref, others = _rms_variants(m, n, x_dtype, w_dtype, ctx.device, liger)
            # bf16-representable values, so every variant's upstream gradient (in its output's dtype) is the same
            g = (torch.randn(m, n, device=ctx.device).to(x_dtype),)
            case = _case(ctx, "rms_norm", f"{label} {dlabel}", ref, others, sizes.act, g, iters, warmup)
            out_dtype = {v.name: _outs(v.fn())[0].dtype for v in case.variants}
            gf = _gpu_ms({k: s[0] for k, s in case.steps.items()}, iters, ctx.windows) if gpu else {}
            gb = _gpu_ms({k: s[1] for k, s in case.steps.items()}, iters, ctx.windows) if gpu else {}
            base_gpu = gb[ref.name].median_ms if gpu else nan
            for v in case.variants:
                gpu_fb = gb[v.name].median_ms if gpu else nan
                table.add(
                    {
                        **head,
                        "variant": v.name,
                        "out": _name(out_dtype[v.name]),
                        **case.timing(v.name),
                        "fwd GPU ms": gf[v.name].median_ms if gpu else nan,
                        "fwd+bwd GPU ms": gpu_fb,
                        "fwd+bwd GPU spread ms": gb[v.name].spread_ms if gpu else nan,
                        "fwd+bwd GPU GB/s": _rms_bytes(m, n, x_dtype, out_dtype[v.name]) / gpu_fb / 1e6,
                        "speed vs HF (fwd+bwd)": case.speed(v.name),
                        "speed vs HF (fwd+bwd GPU)": base_gpu / gpu_fb,
                        "peak GiB above inputs": case.peak_above_inputs(v.name),
                    }
                )
            _peer_rows(table, head, case, liger, "rms_norm", [LIGER_RMS])
            del ref, others, case, g
            _free()


# ------------------------------------------------------------------------------------------------------ SwiGLU


def _swiglu_variants(
    tokens: int, inter: int, dtype: torch.dtype, device: torch.device, liger: Liger
) -> tuple[Variant, list[Variant]]:
    gate = torch.randn(tokens, inter, device=device, dtype=dtype, requires_grad=True)
    up = torch.randn(tokens, inter, device=device, dtype=dtype, requires_grad=True)
    ref = Variant("HF", lambda: F.silu(gate) * up, [gate, up])
    out = [Variant("ours", lambda: swiglu(gate, up, use_kernel=True), [gate, up])]
    if "swiglu" in liger.ops:
        fn = liger.ops["swiglu"]
        # Its backward writes the gradients into the saved inputs' memory: its own copies.
        lg = gate.detach().clone().requires_grad_()
        lu = up.detach().clone().requires_grad_()
        out.append(Variant("liger", lambda: fn.apply(lg, lu), [lg, lu], peer=True))
    return ref, out


def _run_swiglu(ctx: Context, sizes: Sizes, liger: Liger) -> None:
    iters, warmup = _iters(sizes, "swiglu"), _warmup(sizes, "swiglu")
    table = ctx.table(
        "swiglu",
        "SwiGLU kernel vs HF vs Liger",
        notes=(
            f"silu(gate) * up on {_short(sizes.act)} [tokens, intermediate] gate and up (the MLP's linear "
            f"outputs); gradients of gate and up. ms: median of {ctx.windows} windows of {iters} calls after "
            f"{warmup} warm-up calls, variants interleaved (CUDA events on a GPU); spread = max - min. Speed vs HF "
            "= HF's forward + backward time / this one (higher is faster). fwd GB/s: ideal forward traffic (read "
            "gate and up, write the output) over the forward time. Saved MiB: distinct storages autograd keeps "
            "for backward. Peak GiB above inputs: max allocated during forward or forward + backward minus what "
            "was allocated before timing. Baseline: HF's F.silu(gate) * up, eager. Each variant's output and "
            f"gradients were checked against HF's before timing. {liger.note('swiglu')}"
        ),
    )
    for label, m, n in sizes.swiglu_shapes:
        head = {"shape": f"{label} {m}x{n}"}
        ref, others = _swiglu_variants(m, n, sizes.act, ctx.device, liger)
        g = (torch.randn(m, n, device=ctx.device, dtype=sizes.act),)
        case = _case(ctx, "swiglu", head["shape"], ref, others, sizes.act, g, iters, warmup)
        saved = {v.name: _saved_bytes(v.fn) for v in case.variants}
        nbytes = 3.0 * m * n * sizes.act.itemsize
        for v in case.variants:
            table.add(
                {
                    **head,
                    "variant": v.name,
                    **case.timing(v.name),
                    "speed vs HF (fwd+bwd)": case.speed(v.name),
                    "fwd GB/s": nbytes / case.fwd[v.name].median_ms / 1e6,
                    "saved MiB": saved[v.name] / 2**20,
                    "peak GiB above inputs": case.peak_above_inputs(v.name, with_forward=True),
                }
            )
        _peer_rows(table, head, case, liger, "swiglu", ["liger"])
        del ref, others, case, g
        _free()


# ------------------------------------------------------------------------------------------------------ RoPE


def _rope_variants(
    b: int,
    s: int,
    hq: int,
    hkv: int,
    d: int,
    dtype: torch.dtype,
    cs_dtype: torch.dtype,
    device: torch.device,
    liger: Liger,
) -> tuple[Variant, list[Variant]]:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    qp = torch.randn(b, s, hq * d, device=device, dtype=dtype, requires_grad=True)  # q_proj / k_proj outputs
    kp = torch.randn(b, s, hkv * d, device=device, dtype=dtype, requires_grad=True)
    cfg = LlamaConfig(hidden_size=hq * d, num_attention_heads=hq, num_key_value_heads=hkv, head_dim=d)
    pos = torch.arange(s, device=device)[None]
    cos, sin = LlamaRotaryEmbedding(cfg).to(device)(torch.empty(1, device=device, dtype=cs_dtype), pos)

    def views(qx: torch.Tensor, kx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return qx.view(b, s, hq, d).transpose(1, 2), kx.view(b, s, hkv, d).transpose(1, 2)

    def hf() -> tuple[torch.Tensor, torch.Tensor]:
        qe, ke = apply_rotary_pos_emb(*views(qp, kp), cos, sin)
        return qe, ke

    ref = Variant("HF", hf, [qp, kp])
    out = [Variant("ours", lambda: apply_rope(*views(qp, kp), cos, sin, use_kernel=True), [qp, kp])]
    if torch.promote_types(dtype, cs_dtype) != dtype:
        out.append(
            Variant(
                f"ours, out_dtype={_short(dtype)}",
                lambda: apply_rope(*views(qp, kp), cos, sin, out_dtype=dtype, use_kernel=True),
                [qp, kp],
            )
        )
    if "rope" in liger.ops:
        fn = liger.ops["rope"]
        # It rotates in place in its contiguous copy of q/k, which for HF-layout inputs is the projection output
        # itself: its own copies. Its output is in q's dtype whatever cos's dtype.
        lq = qp.detach().clone().requires_grad_()
        lk = kp.detach().clone().requires_grad_()

        def liger_rope() -> tuple[torch.Tensor, torch.Tensor]:
            qe, ke = fn.apply(*views(lq, lk), cos, sin)
            return qe, ke

        out.append(Variant("liger", liger_rope, [lq, lk], peer=True))
    return ref, out


def _run_rope(ctx: Context, sizes: Sizes, liger: Liger) -> None:
    iters, warmup = _iters(sizes, "rope"), _warmup(sizes, "rope")
    table = ctx.table(
        "rope",
        "RoPE kernel vs HF vs Liger",
        notes=(
            f"{_short(sizes.act)} q/k as HF lays them out (projection output .view(B, S, H, D).transpose(1, 2)), "
            "gradients w.r.t. the projection outputs; cos/sin from LlamaRotaryEmbedding in the dtype shown. With "
            "fp32 cos (bf16-mixed autocast) HF's and our default outputs are fp32 (HF semantics), Liger's bf16; "
            "'ours, out_dtype=bf16' is what attention under autocast consumes anyway. ms: median of "
            f"{ctx.windows} windows of {iters} calls after {warmup} warm-up calls, variants interleaved (CUDA "
            "events on a GPU); spread = max - min. Speed vs HF = HF's forward + backward time / this one (higher "
            "is faster). fwd GB/s: ideal forward traffic (read q and k, write both outputs) over the forward time. "
            "Saved MiB: distinct storages autograd keeps for backward (cos/sin). Peak GiB above inputs: max "
            "allocated during forward or forward + backward minus what was allocated before timing. Baseline: "
            "HF's apply_rotary_pos_emb, eager. Each variant's outputs and gradients were checked against HF's "
            f"before timing. {liger.note('rope')}"
        ),
    )
    for label, b, s, hq, hkv, d in sizes.rope_shapes:
        for cs in sizes.rope_cos:
            head = {"shape": f"{label} B{b} S{s} Hq{hq} Hkv{hkv} D{d}", "cos": _name(cs)}
            ref, others = _rope_variants(b, s, hq, hkv, d, sizes.act, cs, ctx.device, liger)
            g = tuple(torch.randn(b, h, s, d, device=ctx.device, dtype=sizes.act) for h in (hq, hkv))
            case = _case(ctx, "rope", f"{head['shape']} cos {head['cos']}", ref, others, sizes.act, g, iters, warmup)
            out_dtype = {v.name: _outs(v.fn())[0].dtype for v in case.variants}
            saved = {v.name: _saved_bytes(v.fn) for v in case.variants}
            elems = b * s * (hq + hkv) * d
            for v in case.variants:
                nbytes = elems * (sizes.act.itemsize + out_dtype[v.name].itemsize)
                table.add(
                    {
                        **head,
                        "variant": v.name,
                        "out": _name(out_dtype[v.name]),
                        **case.timing(v.name),
                        "speed vs HF (fwd+bwd)": case.speed(v.name),
                        "fwd GB/s": nbytes / case.fwd[v.name].median_ms / 1e6,
                        "saved MiB": saved[v.name] / 2**20,
                        "peak GiB above inputs": case.peak_above_inputs(v.name, with_forward=True),
                    }
                )
            _peer_rows(table, head, case, liger, "rope", ["liger"])
            del ref, others, case, g
            _free()


# ------------------------------------------------------------------------------------------------------ linear + CE

LIGER_CE = ("Liger (bf16 dW accumulation)", "Liger (accum_dtype=fp32)")


def _ce_variants(
    n: int, h: int, v: int, chunks: Sequence[int], dtype: torch.dtype, device: torch.device, liger: Liger
) -> tuple[Variant, list[Variant]]:
    x = torch.randn(n, h, device=device).to(dtype).requires_grad_()
    # logits std ~3, the range of a trained LM's head, so the softmax is not uniform
    w = (torch.randn(v, h, device=device) * (3.0 / h**0.5)).to(dtype).requires_grad_()
    y = torch.randint(0, v, (n,), device=device)
    y[torch.rand(n, device=device) < 0.1] = -100
    reason = fused_linear_cross_entropy_fallback_reason(x, w, y)
    if reason is not None:
        raise RuntimeError(f"fused linear cross-entropy would run its PyTorch reference here: {reason}")
    ref = Variant("HF (lm_head + fp32 CE)", lambda: linear_cross_entropy_reference(x, w, y), [x, w])
    out = [Variant("ours (auto chunk)", lambda: fused_linear_cross_entropy(x, w, y), [x, w])]
    for c in chunks:
        out.append(
            Variant(f"ours (chunk {c})", functools.partial(fused_linear_cross_entropy, x, w, y, chunk_size=c), [x, w])
        )
    if "linear_cross_entropy" in liger.ops:
        fn = liger.ops["linear_cross_entropy"]

        def liger_loss(accum: torch.dtype | None) -> torch.Tensor:
            # apply(_input, weight, target, bias, ce_weight, ignore_index, lse_square_scale, label_smoothing,
            # reduction, softcap, return_z_loss, accum_dtype); it returns (loss, z_loss, ...).
            args: tuple[Any, ...] = (x, w, y, None, None, -100, 0.0, 0.0, "mean", None, False)
            res = fn.apply(*args, accum) if accum is not None else fn.apply(*args)
            loss: torch.Tensor = res[0] if isinstance(res, tuple) else res
            return loss

        out.append(Variant(LIGER_CE[0], lambda: liger_loss(None), [x, w], peer=True))
        out.append(Variant(LIGER_CE[1], lambda: liger_loss(F32), [x, w], peer=True))
    return ref, out


def _run_linear_cross_entropy(ctx: Context, sizes: Sizes, liger: Liger) -> None:
    iters, warmup = _iters(sizes, "linear_cross_entropy"), _warmup(sizes, "linear_cross_entropy")
    table = ctx.table(
        "linear_cross_entropy",
        f"Fused linear + cross-entropy: {_short(sizes.act)} hidden/head, 10% ignored labels",
        notes=(
            f"Loss and gradients of hidden and head weight. ms: median of {ctx.windows} windows of {iters} calls "
            f"after {warmup} warm-up calls, variants interleaved (CUDA events on a GPU); spread = max - min. The "
            "fused variants (ours, Liger) compute the gradients in the forward, so their forward and forward + "
            "backward times are close; HF's forward is the loss only. Speed vs HF = HF's forward + backward time "
            "/ this one (higher is faster). Peak GiB above inputs: max allocated during forward + backward minus "
            "what was allocated before timing (the returned gradients count). Baseline: F.linear then "
            "F.cross_entropy on logits.float(), as LlamaForCausalLM computes its loss, eager. Liger runs "
            "LigerFusedLinearCrossEntropyFunction with its default (bf16) and with fp32 weight-gradient "
            "accumulation; ours accumulates in fp32. Each variant's loss and gradients were checked against HF's "
            f"before timing. {liger.note('linear_cross_entropy')}"
        ),
    )
    for label, n, h, v in sizes.ce_shapes:
        head = {"shape": f"{label} {n}x{h}x{v}"}
        ref, others = _ce_variants(n, h, v, sizes.ce_chunks, sizes.act, ctx.device, liger)
        case = _case(ctx, "linear_cross_entropy", head["shape"], ref, others, sizes.act, None, iters, warmup)
        for var in case.variants:
            table.add(
                {
                    **head,
                    "variant": var.name,
                    **case.timing(var.name),
                    "speed vs HF (fwd+bwd)": case.speed(var.name),
                    "peak GiB above inputs": case.peak_above_inputs(var.name),
                }
            )
        _peer_rows(table, head, case, liger, "linear_cross_entropy", LIGER_CE)
        del ref, others, case
        _free()


# ------------------------------------------------------------------------------------------------------ run


def run(ctx: Context) -> None:
    """Every op's table: RMSNorm, SwiGLU, RoPE, fused linear + cross-entropy."""
    sizes = SMOKE if ctx.smoke else REAL
    torch.manual_seed(0)
    liger = Liger()
    if ctx.wants("rms_norm"):
        _run_rms_norm(ctx, sizes, liger)
    if ctx.wants("swiglu"):
        _run_swiglu(ctx, sizes, liger)
    if ctx.wants("rope"):
        _run_rope(ctx, sizes, liger)
    if ctx.wants("linear_cross_entropy"):
        _run_linear_cross_entropy(ctx, sizes, liger)
