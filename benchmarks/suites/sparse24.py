"""2:4 sparsity through cuSPARSELt against dense: each linear, the MLP block, the llama-1b training step, and
cuSPARSELt plans kept across calls.

    python -m benchmarks run sparse24

Every part runs by default, dense and sparse in one process on one GPU, bf16 compute, random transposable 2:4 masks:

- ``sparse_linear`` (the check, before anything is timed): ``SparseLinear(kernel="cusparselt")`` forward, input
  gradient and weight gradient under bf16 autocast against the masked dense path (the reference), each against
  float64 on the same bf16-rounded operands, at three cases (llama-1b shapes, a 3-D input with a bias); the suite
  fails unless cuSPARSELt's errors stay within the masked path's and its weight gradient equals the masked path's,
  and unless fp32 input falls back to the masked path with the same result.
- ``linears``: llama-1b's weight shapes (gate/up 2048->5632, down 5632->2048, q/o 2048->2048) at 16384 tokens.
  Forward, input gradient and the in-place refresh of the packed operands in GPU time with the launch queue kept
  full (host overhead hidden; the products are first checked against dense cuBLAS on the same masked weight), the
  same three back to back in wall time, and a whole ``SparseLinear`` forward + backward (dense weight gradient
  included) with the packed operands refreshed every iteration, as training does, against the same layer without
  a mask (bf16 autocast over fp32 master weights).
- ``mlp_block``: a LLaMA MLP block (gate, up, SiLU * up, down; 2048 -> 5632 -> 2048) forward + backward at 16384
  tokens: dense, 2:4 on the masked dense path, 2:4 on cuSPARSELt (refresh every iteration); the two 2:4 arms are
  checked to give the same output and gradients first.
- ``plans``: one 2:4 forward product per shape, ``torch._cslt_sparse_mm`` (a cuSPARSELt plan built per call) and
  lit_accel's plans cached across calls, against dense ``F.linear``; torch's product is checked against dense and
  the cached one bit-equal to torch's first.
- ``step``: ``CausalLM("llama-1b")`` in a Lightning ``Trainer`` (8 x 2048 tokens, bf16-mixed, fused AdamW,
  lit_accel's kernels on as by default): dense, ``SemiStructuredSparsity`` on the MLPs with ``kernel="auto"``
  (cuSPARSELt where it measured faster) and with ``kernel="masked"``, then dense again (the drift over the table).
  A timing window is exactly one mask-refresh interval (40 steps, the callback's default), so every window holds
  one mask refresh, with its new packed index and plans on the cuSPARSELt path. Checked: the first step's loss of
  ``kernel="auto"`` equals ``kernel="masked"``'s (same seed, data and masks), the second dense run's the first's,
  and each timed window held one refresh.

Variants that can share a process are timed window by window in rotating order (each timed figure: the median of 5
windows, spread = max - min); the training steps are separate fits, dense first and last.

Smoke (``--smoke``, a CPU, fp32): cuSPARSELt does not exist there, so every sparse arm runs the masked dense path
(``SparseLinear``'s fallback, the callback's choice on a CPU) at tiny shapes, rows marked so in their ``path`` or
``note`` column; the step is ``llama-tiny``, 2 x 32 tokens, a mask refresh every 2 steps.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import lightning_loop
from benchmarks.harness import Context, Measurement, _sync, _Window, free_memory, measure_interleaved
from lit_accel.ops import cusparselt
from lit_accel.ops.sparse24 import transposable_24_mask
from lit_accel.ops.sparse24_gemm import (
    TOKEN_MULTIPLE,
    CusparseltWeight,
    cusparselt_unsupported_reason,
    mark_weights_updated,
    select_alg,
)
from lit_accel.sparsity import SemiStructuredSparsity, SemiStructuredSparsitySettings
from lit_accel.sparsity.functional import SparseLinear, masked_linear

__all__ = ["run"]

LLAMA_1B_SHAPES = ((5632, 2048), (2048, 5632), (2048, 2048))
"""(out, in): gate/up projection, down projection, attention q/o projection."""
ROLES = ("gate/up", "down", "q/o")
REFRESH_EVERY = SemiStructuredSparsitySettings().mask_refresh_every


@dataclass(frozen=True)
class Sizes:
    """What the parts run at (``REAL`` on a GPU, ``SMOKE`` on a CPU)."""

    shapes: tuple[tuple[int, int], ...]
    """(out, in) per weight, in the order of :data:`ROLES`."""
    tokens: int
    hidden: int
    inter: int
    cases: tuple[tuple[tuple[int, ...], int, int, bool], ...]
    """SparseLinear check cases: (leading dims, in, out, bias)."""
    warmup: int
    iters: int
    plan_iters: int
    preset: str
    batch: int
    seq: int
    step_warmup: int
    refresh_every: int
    """The step's mask-refresh interval, also its timing window (steps)."""


REAL = Sizes(
    shapes=LLAMA_1B_SHAPES, tokens=16384, hidden=2048, inter=5632,
    cases=(((4096,), 2048, 5632, False), ((2, 1000), 5632, 2048, True), ((8, 512), 2048, 2048, False)),
    warmup=3, iters=10, plan_iters=20, preset="llama-1b", batch=8, seq=2048, step_warmup=5,
    refresh_every=REFRESH_EVERY,
)  # fmt: skip
SMOKE = Sizes(
    shapes=((384, 128), (128, 384), (128, 128)), tokens=64, hidden=128, inter=384,
    cases=(((16,), 32, 64, False), ((2, 10), 64, 32, True), ((2, 8), 32, 32, False)),
    warmup=1, iters=1, plan_iters=1, preset="llama-tiny", batch=2, seq=32, step_warmup=1, refresh_every=2,
)  # fmt: skip


_free = free_memory


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _compute_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _tolerance(device: torch.device) -> float:
    # bf16 outputs of fp32-accumulated products: a rounding of ~2**-9 relative, summation order aside.
    return 1e-2 if device.type == "cuda" else 1e-5


def _path(reason: str | None) -> str:
    return "cuSPARSELt" if reason is None else f"masked dense fallback ({reason})"


def _interleaved(
    steps: Mapping[str, Callable[[], object]],
    warmup: int,
    iters: int,
    windows: int,
    device: torch.device,
    queue_full: bool = False,
) -> dict[str, Measurement]:
    """Times ``steps`` window by window in rotating order (as ``harness.measure_interleaved``); each Measurement's
    ``extra["host ms"]`` is the median host time to issue one call.

    ``queue_full``: before each window the GPU spins long enough for the host to queue the whole window, so the
    window's CUDA-event time is GPU time with host overhead hidden (the CPU has no queue: wall time there).
    """
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    _sync(device)
    spin: dict[str, int] = {}
    if queue_full and device.type == "cuda":
        for name in names:
            t0 = time.perf_counter()
            steps[name]()
            _sync(device)
            host_guess = max(time.perf_counter() - t0, 1e-4)
            spin[name] = int(min(2e9, max(1e6, 1.2 * host_guess * iters * 2e9)))  # cycles at ~2 GHz
    results = {name: Measurement(name) for name in names}
    host: dict[str, list[float]] = {name: [] for name in names}
    for w in range(windows):
        order = names[w % len(names) :] + names[: w % len(names)]
        if w % 2:
            order.reverse()
        for name in order:
            _sync(device)
            if name in spin:
                torch.cuda._sleep(spin[name])
            window = _Window(device)
            h0 = time.perf_counter()
            for _ in range(iters):
                steps[name]()
            host[name].append((time.perf_counter() - h0) * 1e3 / iters)
            results[name].times_ms.append(window.stop() / iters)
    for name in names:
        results[name].extra["host ms"] = statistics.median(host[name])
    return results


# ---------------------------------------------------------------------------------------------------- check


def _fp32_falls_back(device: torch.device) -> str:
    """Raises unless fp32 input to a cuSPARSELt SparseLinear gives the masked path's result; returns the warning."""
    layer = SparseLinear(64, 32).to(device)
    layer.set_mask(transposable_24_mask(layer.weight.detach()))
    layer.set_kernel("cusparselt")
    layer.sparse_name = "check.fp32"
    x = torch.randn(4, 64, device=device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = layer(x)
    assert layer.mask is not None
    if not torch.equal(y, masked_linear(x, layer.weight, layer.bias, layer.mask)):
        raise RuntimeError("SparseLinear(kernel='cusparselt') with fp32 input differs from the masked dense path")
    messages = [str(c.message)[:160] for c in caught]
    return f"fp32 input on the GPU falls back to the masked path (equal results); warning: {messages}."


def sparse_linear(ctx: Context, sizes: Sizes, reason: str | None) -> None:
    gpu = ctx.device.type == "cuda"
    cdtype = _compute_dtype(ctx.device)
    tol = _tolerance(ctx.device)
    fp32_note = _fp32_falls_back(ctx.device) if reason is None else ""
    precision = "bf16 autocast over fp32 weights" if gpu else "fp32"
    table = ctx.table(
        "sparse_linear",
        "2:4 cuSPARSELt SparseLinear against the masked dense path (bf16 autocast)",
        notes=(
            f"Relative errors (Frobenius) against float64 on the same {str(cdtype).replace('torch.', '')}-rounded "
            f"operands, {precision}; 'csl' = SparseLinear(kernel='cusparselt'), 'masked' = the masked dense path "
            "(the reference) on the same weights and mask; 'dW csl/masked' and 'db' = csl's gradient against "
            f"masked's. The suite fails unless each csl error is at most max(2 x masked's, {tol:g}) and dW, db "
            f"agree within {tol:g}. {fp32_note}"
            + ("" if reason is None else f" No cuSPARSELt here ({reason}): 'csl' is SparseLinear's fallback.")
        ),
    )
    for lead, in_f, out_f, bias in sizes.cases:
        torch.manual_seed(0)
        layer = SparseLinear(in_f, out_f, bias=bias).to(ctx.device)
        ref_layer = copy.deepcopy(layer)
        mask = transposable_24_mask(layer.weight.detach())
        layer.set_mask(mask)
        ref_layer.set_mask(mask)
        layer.set_kernel("cusparselt")
        layer.sparse_name = f"check.{in_f}x{out_f}"
        x = torch.randn(*lead, in_f, device=ctx.device, requires_grad=True)
        xr = x.detach().clone().requires_grad_()
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=gpu):
            y = layer(x)
            yr = ref_layer(xr)
        gy = torch.randn_like(y)
        y.backward(gy)
        yr.backward(gy)
        wm = (layer.weight.detach() * mask).to(cdtype).double()
        x64, g64 = x.detach().to(cdtype).double(), gy.double()
        y64 = x64 @ wm.t() + (layer.bias.detach().to(cdtype).double() if layer.bias is not None else 0)
        gx64 = g64 @ wm
        gw64 = g64.reshape(-1, out_f).t() @ x64.reshape(-1, in_f)
        assert x.grad is not None and xr.grad is not None
        assert layer.weight.grad is not None and ref_layer.weight.grad is not None
        db = float("nan")
        if layer.bias is not None and ref_layer.bias is not None:
            assert layer.bias.grad is not None and ref_layer.bias.grad is not None
            db = _rel(layer.bias.grad, ref_layer.bias.grad)
        row: dict[str, Any] = {
            "case": f"{tuple(lead)}x{in_f}->{out_f}" + (" +bias" if bias else ""),
            "y err (csl)": _rel(y, y64),
            "y err (masked)": _rel(yr, y64),
            "dX err (csl)": _rel(x.grad, gx64),
            "dX err (masked)": _rel(xr.grad, gx64),
            "dW err (csl)": _rel(layer.weight.grad, gw64),
            "dW csl/masked": _rel(layer.weight.grad, ref_layer.weight.grad),
            "db": db,
            "path": _path(reason),
        }
        for what in ("y", "dX"):
            if row[f"{what} err (csl)"] > max(2 * row[f"{what} err (masked)"], tol):
                raise RuntimeError(f"SparseLinear check {row['case']}: {what} error {row[f'{what} err (csl)']:.3g}")
        if row["dW csl/masked"] > tol or (bias and db > tol):
            raise RuntimeError(f"SparseLinear check {row['case']}: weight or bias gradient differs from masked")
        table.add(row)
        del layer, ref_layer, x, xr, y, yr
    _free()


# ---------------------------------------------------------------------------------------------------- linears


def _fwd_bwd(module: nn.Module, x: torch.Tensor, refresh: bool) -> Callable[[], None]:
    gpu = x.device.type == "cuda"

    def step() -> None:
        if refresh:
            mark_weights_updated()  # as after an optimizer step: the packed operands are rebuilt from the weights
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=gpu):
            y = module(x)
        y.backward(torch.ones_like(y))
        for p in module.parameters():
            p.grad = None
        x.grad = None

    return step


def _layer_ops(out_f: int, in_f: int, tokens: int, device: torch.device, reason: str | None) -> dict[str, Any]:
    """Dense and sparse forward, input gradient and refresh of one weight shape (checked), as callables."""
    dtype = _compute_dtype(device)
    g = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(out_f, in_f, device=device, generator=g)
    mask = transposable_24_mask(w)
    wm = (w * mask).to(dtype)
    n = tokens + (-tokens) % TOKEN_MULTIPLE
    x = torch.randn(n, in_f, device=device, generator=g).to(dtype)
    gy = torch.randn(n, out_f, device=device, generator=g).to(dtype)
    ops: dict[str, Any] = {
        "dense fwd": lambda: F.linear(x, wm),
        "dense dX": lambda: gy @ wm,
    }

    def dense_step() -> None:
        wc = w.to(dtype)  # as autocast casts the fp32 master weight every step
        F.linear(x, wc)
        torch.mm(gy, wc)

    ops["dense step"] = dense_step
    if reason is None:
        op = CusparseltWeight(mask, dtype, name=f"{out_f}x{in_f}")
        op.refresh(w)

        def sparse_step() -> None:
            op.refresh(w, force=True)
            op.forward_mm(x)
            op.input_grad_mm(gy)

        ops.update(
            {
                "sparse fwd": lambda: op.forward_mm(x),
                "sparse dX": lambda: op.input_grad_mm(gy),
                "refresh": lambda: op.refresh(w, force=True),
                "sparse step": sparse_step,
            }
        )
    else:  # the masked dense path: the mask applied to the weight, then dense products

        def masked_step() -> None:
            wmk = (w * mask).to(dtype)
            F.linear(x, wmk)
            gy @ wmk

        ops.update(
            {
                "sparse fwd": lambda: masked_linear(x, w.to(dtype), None, mask),
                "sparse dX": lambda: gy @ (w * mask).to(dtype),
                "refresh": lambda: (w * mask).to(dtype),
                "sparse step": masked_step,
            }
        )
    tol = _tolerance(device)
    for what, got, want in (
        ("forward", ops["sparse fwd"](), F.linear(x, wm)),
        ("input gradient", ops["sparse dX"](), gy @ wm),
    ):
        err = _rel(got, want)
        if err > tol:
            raise RuntimeError(f"{in_f}->{out_f}: the 2:4 {what} differs from dense on the masked weight ({err:.3g})")
    return ops


def linears(ctx: Context, sizes: Sizes, reason: str | None) -> None:
    gpu = ctx.device.type == "cuda"
    w, it, n = sizes.warmup, sizes.iters, ctx.windows
    how = (
        "GPU time per call with the launch queue kept full (the GPU spins before each window until the host has "
        "queued it: host overhead hidden)"
        if gpu
        else "wall time per call (a CPU has no launch queue)"
    )
    sparse = (
        "cuSPARSELt (CusparseltWeight.forward_mm / input_grad_mm, plans cached across calls as by default; "
        "'refresh' = the in-place gather of W and W^T into the packed operands, once per optimizer step)"
        if reason is None
        else f"the masked dense path, as SparseLinear falls back to ({reason}; 'refresh' = W * M)"
    )
    table = ctx.table(
        "linears",
        f"2:4 cuSPARSELt linears, {sizes.tokens} tokens, {'bf16' if gpu else 'fp32'}",
        notes=(
            f"Per weight shape, a random transposable 2:4 mask, {sizes.tokens} tokens. 'fwd', 'dX', 'refresh': {how};"
            f" dense = cuBLAS on the masked weight (F.linear, dY @ W), sparse = {sparse}. 'host ms / sparse call' = "
            "host time to issue one sparse forward. '(wall)': CUDA events around back-to-back weight cast + fwd + "
            "dX (dense) against refresh + fwd + dX (sparse), nothing queued ahead, host overhead included. "
            "'fwd+bwd wall': a whole SparseLinear forward + backward (dense weight gradient included, bf16 "
            "autocast over fp32 weights on a GPU) without a mask (dense) against kernel='cusparselt' with the "
            "packed operands refreshed every iteration, as after an optimizer step. Ratios 'x' = dense / sparse "
            f"(> 1: sparse faster), of medians. Every figure: median of {n} windows of {it} calls after {w} "
            "warm-up calls, dense and sparse interleaved window by window in rotating order; spread = max - min "
            "over the windows. The sparse products are checked against dense on the masked weight first."
        ),
    )
    for out_f, in_f in sizes.shapes:
        ops = _layer_ops(out_f, in_f, sizes.tokens, ctx.device, reason)
        fwd = _interleaved({k: ops[k] for k in ("dense fwd", "sparse fwd")}, w, it, n, ctx.device, queue_full=True)
        dx = _interleaved({k: ops[k] for k in ("dense dX", "sparse dX")}, w, it, n, ctx.device, queue_full=True)
        refresh = _interleaved({"refresh": ops["refresh"]}, w, it, n, ctx.device, queue_full=True)["refresh"]
        wall = _interleaved({k: ops[k] for k in ("dense step", "sparse step")}, w, it, n, ctx.device)
        del ops
        layer = SparseLinear(in_f, out_f, bias=False).to(ctx.device)
        sparse_layer = copy.deepcopy(layer)
        sparse_layer.set_mask(transposable_24_mask(sparse_layer.weight.detach()))
        sparse_layer.set_kernel("cusparselt")
        sparse_layer.sparse_name = f"linears.{in_f}x{out_f}"
        x = torch.randn(sizes.tokens, in_f, device=ctx.device, dtype=_compute_dtype(ctx.device), requires_grad=True)
        whole = measure_interleaved(
            {"dense": _fwd_bwd(layer, x, False), "sparse": _fwd_bwd(sparse_layer, x, True)},
            warmup=w,
            iters=it,
            windows=n,
            device=ctx.device,
        )
        del layer, sparse_layer, x
        _free()
        d_fwd, s_fwd = fwd["dense fwd"], fwd["sparse fwd"]
        d_dx, s_dx = dx["dense dX"], dx["sparse dX"]
        dense_gpu = d_fwd.median_ms + d_dx.median_ms
        sparse_gpu = s_fwd.median_ms + s_dx.median_ms + refresh.median_ms
        table.add(
            {
                "linear (in->out)": f"{in_f}->{out_f}",
                "dense fwd ms": d_fwd.median_ms,
                "sparse fwd ms": s_fwd.median_ms,
                "fwd x": d_fwd.median_ms / s_fwd.median_ms,
                "dense dX ms": d_dx.median_ms,
                "sparse dX ms": s_dx.median_ms,
                "dX x": d_dx.median_ms / s_dx.median_ms,
                "refresh ms": refresh.median_ms,
                "fwd+dX+refresh x (GPU)": dense_gpu / sparse_gpu,
                "host ms / sparse call": s_fwd.extra["host ms"] if gpu else float("nan"),
                "fwd+dX+refresh x (wall)": wall["dense step"].median_ms / wall["sparse step"].median_ms,
                "fwd+bwd wall dense ms": whole["dense"].median_ms,
                "fwd+bwd wall sparse ms": whole["sparse"].median_ms,
                "wall x": whole["dense"].median_ms / whole["sparse"].median_ms,
                "dense fwd spread ms": d_fwd.spread_ms,
                "sparse fwd spread ms": s_fwd.spread_ms,
                "dense dX spread ms": d_dx.spread_ms,
                "sparse dX spread ms": s_dx.spread_ms,
                "refresh spread ms": refresh.spread_ms,
                "fwd+bwd wall dense spread ms": whole["dense"].spread_ms,
                "fwd+bwd wall sparse spread ms": whole["sparse"].spread_ms,
                "windows": min(len(m.times_ms) for m in (d_fwd, s_fwd, d_dx, s_dx, refresh, *whole.values())),
                "path": _path(reason),
            }
        )


# ---------------------------------------------------------------------------------------------------- MLP block


class LlamaMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with SparseLinear projections."""

    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = SparseLinear(hidden, inter, bias=False)
        self.up_proj = SparseLinear(hidden, inter, bias=False)
        self.down_proj = SparseLinear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def sparse(self, kernel: str, name: str) -> None:
        """Transposable 2:4 masks from the current weights on all three projections, on ``kernel``."""
        for role, m in (("gate", self.gate_proj), ("up", self.up_proj), ("down", self.down_proj)):
            m.set_mask(transposable_24_mask(m.weight.detach()))
            m.set_kernel(kernel)
            m.sparse_name = f"{name}.{role}"


def _output_and_grads(module: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    x.grad = None
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
        y = module(x)
    y.backward(torch.ones_like(y))
    assert x.grad is not None
    out = [y.detach().clone(), x.grad.clone()]
    for p in module.parameters():
        assert p.grad is not None
        out.append(p.grad.clone())
        p.grad = None
    x.grad = None
    return out


def mlp_block(ctx: Context, sizes: Sizes, reason: str | None) -> None:
    h, i, tokens = sizes.hidden, sizes.inter, sizes.tokens
    table = ctx.table(
        "mlp_block",
        f"2:4 MLP block fwd+bwd, {tokens} tokens (refresh every iteration)",
        notes=(
            f"A LLaMA MLP block (gate, up, SiLU * up, down) {h}->{i}->{h}, forward + backward of {tokens} tokens "
            f"({'bf16 autocast over fp32 weights' if ctx.device.type == 'cuda' else 'fp32'}), wall time (CUDA "
            "events around back-to-back calls on a GPU, host overhead included). Baseline: the same block without "
            "masks (dense). '2:4 masked dense': SparseLinear's masked dense path; '2:4 cuSPARSELt': "
            "kernel='cusparselt' with the packed operands refreshed every iteration (as after an optimizer step); "
            "both with one transposable mask and the dense block's weights, and checked to give the same output "
            f"and gradients (relative error <= {2 * _tolerance(ctx.device):g}) before timing. 'x dense' = dense / "
            f"this. Median of {ctx.windows} windows of "
            f"{sizes.iters} calls after {sizes.warmup} warm-up calls, the three interleaved window by window; "
            "spread = max - min."
            + ("" if reason is None else f" No cuSPARSELt here ({reason}): its row is SparseLinear's fallback.")
        ),
    )
    dense = LlamaMLP(h, i).to(ctx.device)
    masked, csl = copy.deepcopy(dense), copy.deepcopy(dense)
    masked.sparse("masked", "mlp_block.masked")
    csl.sparse("cusparselt", "mlp_block.csl")
    x = torch.randn(tokens, h, device=ctx.device, dtype=_compute_dtype(ctx.device), requires_grad=True)
    # One more bf16 rounding than a single linear (silu(gate) * up), and the gradients pass through all three.
    tol = 2 * _tolerance(ctx.device)
    for k, (a, b) in enumerate(zip(_output_and_grads(csl, x), _output_and_grads(masked, x))):
        if _rel(a, b) > tol:
            raise RuntimeError(f"MLP block: 2:4 cuSPARSELt and masked dense differ (tensor {k}: {_rel(a, b):.3g})")
    variants = {"dense": (dense, False), "2:4 masked dense": (masked, False), "2:4 cuSPARSELt": (csl, True)}
    paths = {"dense": "dense", "2:4 masked dense": "masked dense", "2:4 cuSPARSELt": _path(reason)}
    result = measure_interleaved(
        {name: _fwd_bwd(m, x, refresh) for name, (m, refresh) in variants.items()},
        warmup=sizes.warmup,
        iters=sizes.iters,
        windows=ctx.windows,
        device=ctx.device,
    )
    base = result["dense"].median_ms
    for name, m in result.items():
        table.add(
            {
                "block": f"MLP {h}->{i}->{h}",
                "variant": name,
                "wall ms": m.median_ms,
                "x dense": base / m.median_ms,
                "spread ms": m.spread_ms,
                "windows": len(m.times_ms),
                "peak GiB": m.peak_gib,
                "path": paths[name],
            }
        )
    del dense, masked, csl, x
    _free()


# ---------------------------------------------------------------------------------------------------- plans


def _plan_variants(
    label: str, out_f: int, in_f: int, tokens: int, device: torch.device, reason: str | None
) -> tuple[dict[str, Callable[[], object]], str]:
    """Dense, torch's per-call plan and the cached plan for one shape (checked), and a note when the cache is off."""
    dtype = _compute_dtype(device)
    w = torch.randn(out_f, in_f, device=device)
    mask = transposable_24_mask(w)
    wm = (w * mask).to(dtype)
    x = torch.randn(tokens, in_f, device=device, dtype=dtype)
    variants: dict[str, Callable[[], object]] = {"dense F.linear (cuBLAS)": lambda: F.linear(x, wm)}
    if reason is not None:
        variants["2:4 masked dense (F.linear on W*M)"] = lambda: F.linear(x, (w * mask).to(dtype))
        return variants, ""
    packed = torch._cslt_compress(wm)
    alg = select_alg(packed, x)
    torch_mm = torch._cslt_sparse_mm(packed, x.t(), transpose_result=True, alg_id=alg)
    err = _rel(torch_mm, F.linear(x, wm))
    if err > _tolerance(device):
        raise RuntimeError(f"{label}: torch._cslt_sparse_mm differs from dense ({err:.3g})")
    cache = cusparselt.SparsePlanCache(label)
    cached = cache.matmul(packed, x, out_f, alg)  # builds the plan and checks it against torch's product
    variants["2:4 torch._cslt_sparse_mm (plan per call)"] = lambda: torch._cslt_sparse_mm(
        packed, x.t(), transpose_result=True, alg_id=alg
    )
    if not cusparselt.plan_cache_enabled():
        why = cusparselt._state.get("disabled_reason") or cusparselt.plan_cache_unavailable_reason()
        return variants, f"plan cache off: {why}"
    if not torch.equal(cached, torch_mm):
        raise RuntimeError(f"{label}: the cached plan's product differs from torch._cslt_sparse_mm")
    variants["2:4 cached plan"] = lambda: cache.matmul(packed, x, out_f, alg)
    return variants, ""


def plans(ctx: Context, sizes: Sizes, reason: str | None) -> None:
    gpu = ctx.device.type == "cuda"
    table = ctx.table(
        "plans",
        f"cuSPARSELt plans kept across calls: 2:4 forward products, {sizes.tokens} tokens, {'bf16' if gpu else 'fp32'}",
        notes=(
            "Windows of back-to-back calls bracketed by CUDA events (host time the GPU cannot hide included), "
            f"median of {ctx.windows} windows of {sizes.plan_iters} calls after {sizes.warmup} warm-up calls, the "
            "variants interleaved window by window; spread = max - min. Host ms = Python + library time to issue "
            "one call (median over the windows). Baseline: dense F.linear (cuBLAS) on the masked weight; 'speed "
            "vs dense' = dense / this. Transposable masks; the algorithm id chosen by select_alg for both 2:4 "
            "variants. Checked first: torch's 2:4 product against dense, the cached plan's bit-equal to torch's."
            + ("" if reason is None else f" No cuSPARSELt here ({reason}): the 2:4 row is the masked dense path.")
        ),
    )
    if reason is None:
        cusparselt.set_plan_cache(True)
    for (out_f, in_f), role in zip(sizes.shapes, ROLES):
        label = f"{role} {in_f}->{out_f}"
        variants, note = _plan_variants(label, out_f, in_f, sizes.tokens, ctx.device, reason)
        result = _interleaved(variants, sizes.warmup, sizes.plan_iters, ctx.windows, ctx.device)
        del variants
        base = result["dense F.linear (cuBLAS)"].median_ms
        for name, m in result.items():
            table.add(
                {
                    "shape": label,
                    "variant": name,
                    "ms per call (back to back)": m.median_ms,
                    "spread ms": m.spread_ms,
                    "windows": len(m.times_ms),
                    "host ms per call": m.extra["host ms"],
                    "speed vs dense": base / m.median_ms,
                    "note": note if name != "dense F.linear (cuBLAS)" else "",
                }
            )
        _free()


# ---------------------------------------------------------------------------------------------------- step


class _StepProbe(L.Callback):
    """The first step's loss, and the sparsity callback's refresh count as the timed windows start (placed before
    that callback in the list, so that a refresh due at the first timed step counts as timed)."""

    def __init__(self, sparsity: SemiStructuredSparsity | None, at_step: int) -> None:
        self.sparsity, self.at_step = sparsity, at_step
        self.refreshes_before: int | None = None
        self.first_loss: float | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if self.sparsity is not None and trainer.global_step == self.at_step and self.refreshes_before is None:
            self.refreshes_before = self.sparsity.refreshes

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if self.first_loss is None:
            loss = outputs["loss"] if isinstance(outputs, Mapping) else outputs
            self.first_loss = float(loss.detach())


def step(ctx: Context, sizes: Sizes, reason: str | None) -> None:
    gpu = ctx.device.type == "cuda"
    preset, batch, seq, every = sizes.preset, sizes.batch, sizes.seq, sizes.refresh_every
    warmup, iters = sizes.step_warmup, every
    tol = _tolerance(ctx.device)
    numerics = (
        "bf16-mixed, fp32 master weights, fused AdamW, lit_accel's kernels on (CausalLM's default on CUDA)"
        if gpu
        else "fp32, AdamW (CausalLM's default off CUDA)"
    )
    table = ctx.table(
        "step",
        f"2:4 MLPs: {preset} training step (Lightning, {'bf16-mixed, fused AdamW' if gpu else 'fp32'})",
        notes=(
            f"CausalLM in a Lightning Trainer ({numerics}), {batch} x {seq} random tokens. SemiStructuredSparsity "
            f"on every MLP linear from step 0, mask refresh every {every} steps (the configured interval), masked "
            f"decay. Timed: {ctx.windows} windows of {iters} steps after {warmup} warm-up steps, so every window "
            "INCLUDES one mask refresh (new transposable masks from the current weights and, on the cuSPARSELt "
            "path, the new packed index, verification and plans): the step time is the amortised cost at that "
            "interval; median and spread (max - min) per step. kernel='auto' times dense against cuSPARSELt per "
            "layer shape inside the warm-up and keeps cuSPARSELt where faster ('note': how many layers). 'peak "
            "GiB' = peak allocated over the timed windows, each arm's own (masks and packed operands included). "
            "Baseline: the same Trainer without the callback (dense), run first; 'dense, again last' reruns it "
            "after the 2:4 runs (its ratio shows the drift over the table). 'speed vs dense' = dense ms / this ms "
            "(> 1: faster than dense); 'memory vs dense' = this peak / dense's. Checked: the first step's loss of "
            "kernel='auto' equals kernel='masked''s (same seed, data and masks), the second dense run's the "
            "first's, and every timed window held one refresh."
            + ("" if reason is None else f" No cuSPARSELt here ({reason}): every 2:4 layer runs the masked path.")
        ),
    )
    variants: list[tuple[str, str | None]] = [
        ("dense", None),
        ("2:4 MLPs, kernel=auto (cuSPARSELt where faster)", "auto"),
        ("2:4 MLPs, kernel=masked", "masked"),
        ("dense, again last", None),
    ]
    same_as = {"masked": "auto", None: None}  # arms whose first-step loss must equal an earlier arm's
    first: dict[str | None, float] = {}
    dense: Measurement | None = None
    for name, kernel in variants:
        torch.manual_seed(0)
        sparsity = None
        if kernel is not None:
            sparsity = SemiStructuredSparsity(targets="mlp", kernel=kernel, mask_refresh_every=every)
        probe = _StepProbe(sparsity, warmup)
        callbacks: list[L.Callback] = [probe] if sparsity is None else [probe, sparsity]
        m = lightning_loop(preset, batch, seq, warmup, iters, ctx.windows, ctx.device, callbacks=callbacks, name=name)
        _free()
        if len(m.times_ms) != ctx.windows:
            raise RuntimeError(f"{name}: {len(m.times_ms)} windows timed, {ctx.windows} expected")
        loss = probe.first_loss
        if loss is None or loss != loss:
            raise RuntimeError(f"{name}: first-step loss {loss}")
        other = same_as.get(kernel, "")
        if other != "" and other in first and abs(loss - first[other]) > tol * abs(first[other]):
            raise RuntimeError(f"{name}: first-step loss {loss} != {first[other]} of the {other or 'dense'} arm")
        first.setdefault(kernel, loss)
        dense = dense or m
        row: dict[str, Any] = {
            "model": preset,
            "batch": f"{batch}x{seq}",
            "variant": name,
            "median ms/step": m.median_ms,
            "spread ms": m.spread_ms,
            "windows": len(m.times_ms),
            "speed vs dense": dense.median_ms / m.median_ms,
            "peak GiB": m.peak_gib,
            "memory vs dense": m.peak_gib / dense.peak_gib,
            "mask refreshes timed": 0,
            "note": "",
        }
        if sparsity is not None:
            before = probe.refreshes_before
            timed = sparsity.refreshes - before if before is not None else 0
            if timed != ctx.windows:
                raise RuntimeError(f"{name}: {timed} mask refreshes in the timed windows, {ctx.windows} expected")
            if not sparsity.kernels:
                raise RuntimeError(f"{name}: the sparse phase never started")
            on_csl = sum(1 for k in sparsity.kernels.values() if k == "cusparselt")
            row["mask refreshes timed"] = timed
            row["note"] = f"{on_csl}/{len(sparsity.kernels)} layers on cuSPARSELt" + (
                "" if reason is None else " (masked dense fallback: no cuSPARSELt)"
            )
        table.add(row)


# ---------------------------------------------------------------------------------------------------- run


def run(ctx: Context) -> None:
    sizes = SMOKE if ctx.smoke else REAL
    reason = cusparselt_unsupported_reason(ctx.device, torch.bfloat16)
    if reason is not None and not ctx.smoke:
        print(f"sparse24: {reason}; every 2:4 arm runs the masked dense path", flush=True)
    sparse_linear(ctx, sizes, reason)  # the correctness check: always
    if ctx.wants("linears"):
        linears(ctx, sizes, reason)
    if ctx.wants("mlp_block"):
        mlp_block(ctx, sizes, reason)
    if ctx.wants("plans"):
        plans(ctx, sizes, reason)
    if ctx.wants("step"):
        step(ctx, sizes, reason)
