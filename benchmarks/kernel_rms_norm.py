"""RMSNorm: our Triton kernels vs HF's ``LlamaRMSNorm`` vs Liger-Kernel's ``LigerRMSNorm`` (GPU only).

At llama-1b (16384 tokens x hidden 2048) and llama-125m (32768 x 768) shapes, for bf16 input with an fp32 weight
(Lightning bf16-mixed) and with a bf16 weight, forward and forward+backward (gradients of x and weight) of:

* ``HF LlamaRMSNorm`` - the eager module (the baseline);
* ``torch F.rms_norm`` - torch's own op on ``x`` and the weight cast to ``x``'s dtype (not HF's rounding; a
  speed reference only; skipped where torch lacks it);
* ``torch.compile(HF)`` - with ``--compile`` only (compilation takes device time);
* ``ours`` - :func:`lit_accel.ops.rms_norm.rms_norm` with HF's output dtype;
* ``ours, out bf16`` - the same with ``out_dtype=bf16``, what the integration layer passes under autocast (fp32
  weight only: with a bf16 weight it is the row above);
* ``Liger LigerRMSNorm`` - when ``import liger_kernel`` works (``casting_mode="llama"``, HF's rounding).

``ms`` is the harness's CUDA-event time (launch gaps included: Python-heavy ops can be CPU-bound there), ``GPU ms``
the sum of kernel durations from torch.profiler. ``GB/s`` divides the minimum bytes an RMSNorm must move (forward:
read x, write y; backward additionally read x and dy, write dx) by the GPU time, so it compares variants on one
scale; H100 SXM's HBM3 peaks near 3.35 TB/s.

Usage::

    python benchmarks/kernel_rms_norm.py --results benchmarks/RESULTS.md [--compile] [--iters 50]
    python benchmarks/kernel_rms_norm.py --sweep   # tile size / backward grid / prefetch sweep of our kernel
    python benchmarks/kernel_rms_norm.py --profile  # also print the kernel breakdown of ours and Liger
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import _fmt, measure, write_results

# By module path: the package re-exports the function under the module's name.
rms_mod = importlib.import_module("lit_accel.ops.rms_norm")

SHAPES = [("llama-1b 16384x2048", 16384, 2048), ("llama-125m 32768x768", 32768, 768)]
DTYPES = [("bf16 x, fp32 w", torch.bfloat16, torch.float32), ("bf16 x, bf16 w", torch.bfloat16, torch.bfloat16)]
EPS = 1e-5

try:  # optional comparison; never a dependency
    from liger_kernel.transformers.rms_norm import LigerRMSNorm

    _HAS_LIGER = True
except Exception:  # ImportError, or a liger built for another torch/triton
    _HAS_LIGER = False


Variant = tuple[Callable[[], torch.Tensor], list[torch.Tensor]]


def _variants(m: int, n: int, x_dtype: torch.dtype, w_dtype: torch.dtype, compile_hf: bool) -> dict[str, Variant]:
    """Per variant: a forward closure on a shared ``x`` and the tensors to differentiate (x and its weight)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    dev = torch.device("cuda")
    x = torch.randn(m, n, device=dev).to(x_dtype).requires_grad_()
    w = (1.0 + 0.1 * torch.randn(n, device=dev)).to(w_dtype).requires_grad_()
    hf = LlamaRMSNorm(n, eps=EPS).to(dev)
    hf.weight = torch.nn.Parameter(w.detach().clone())

    out: dict[str, Variant] = {"HF LlamaRMSNorm": (lambda: hf(x), [x, hf.weight])}
    if hasattr(torch.nn.functional, "rms_norm"):
        out["torch F.rms_norm"] = (lambda: torch.nn.functional.rms_norm(x, (n,), w.to(x_dtype), EPS), [x, w])
    if compile_hf:
        compiled = torch.compile(hf)
        out["torch.compile(HF)"] = (lambda: compiled(x), [x, hf.weight])
    out["ours"] = (lambda: rms_mod.rms_norm(x, w, EPS), [x, w])
    if w_dtype != x_dtype:
        out["ours, out bf16"] = (lambda: rms_mod.rms_norm(x, w, EPS, out_dtype=torch.bfloat16), [x, w])
    if _HAS_LIGER:
        liger = LigerRMSNorm(n, eps=EPS, casting_mode="llama").to(dev)
        liger.weight = torch.nn.Parameter(w.detach().clone())
        out["Liger LigerRMSNorm"] = (lambda: liger(x), [x, liger.weight])
    return out


def _bytes(m: int, n: int, x_dtype: torch.dtype, y_dtype: torch.dtype) -> tuple[int, int]:
    """Minimum bytes moved: (forward, forward + backward)."""
    xb, yb = x_dtype.itemsize, y_dtype.itemsize
    fwd = m * n * (xb + yb)
    bwd = m * n * (xb + yb + xb)  # read x, read dy (y's dtype), write dx
    return fwd, fwd + bwd


def _fwd_bwd(fn: Callable[[], torch.Tensor], params: list[torch.Tensor], g: torch.Tensor) -> Callable[[], object]:
    def step() -> object:
        return torch.autograd.grad(fn(), params, g)

    return step


def gpu_ms(step: Callable[[], object], iters: int = 10, table: bool = False) -> float:
    """Device time per call: the sum of the durations of every kernel ``step`` launches (torch.profiler).

    The harness's CUDA-event windows include launch gaps, so a Python-heavy op whose kernels finish before the
    CPU issues the next call is timed by its CPU cost there; in a training step those gaps overlap other layers'
    GPU work, and this column shows what the op costs the GPU.
    """
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    if table:
        print(events.table(sort_by="self_device_time_total", row_limit=8), flush=True)
    total_us = sum(float(getattr(e, "self_device_time_total", 0.0)) for e in events)
    return total_us / iters / 1e3


def run_benchmark(args: argparse.Namespace) -> list[list[object]]:
    rows: list[list[object]] = []
    for label, m, n in SHAPES:
        for dlabel, x_dtype, w_dtype in DTYPES:
            variants = _variants(m, n, x_dtype, w_dtype, args.compile)
            base_gpu = None
            for name, (fn, params) in variants.items():
                y0 = fn()
                g = torch.randn_like(y0)
                _, total_bytes = _bytes(m, n, x_dtype, y0.dtype)
                del y0
                fwd_bwd = _fwd_bwd(fn, params, g)
                mf = measure(name, fn, warmup=5, iters=args.iters)
                mb = measure(name, fwd_bwd, warmup=5, iters=args.iters)
                gf = gpu_ms(fn, table=args.profile and name.startswith(("ours", "Liger")))
                gb = gpu_ms(fwd_bwd, table=args.profile and name.startswith(("ours", "Liger")))
                base_gpu = base_gpu or gb
                row: list[object] = [label, dlabel, name, str(g.dtype).removeprefix("torch."), mf.median_ms,
                                     mb.median_ms, gf, gb, total_bytes / gb / 1e6, base_gpu / gb,
                                     mb.peak_gib]  # fmt: skip
                rows.append(row)
                print(" | ".join(_fmt(c) for c in row), flush=True)
            del variants
            torch.cuda.empty_cache()
    return rows


def run_sweep(args: argparse.Namespace) -> None:
    """Our kernel's device time under other tile sizes / backward grids / prefetch (module constants patched)."""
    print("shape | tile elems | bwd programs/SM | prefetch | fwd GPU ms | fwd+bwd GPU ms")
    for label, m, n in SHAPES:
        x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = torch.ones(n, device="cuda", requires_grad=True)
        g = torch.randn(m, n, device="cuda")
        for tile in (2048, 4096, 8192):
            for per_sm in (2, 4, 8):
                for prefetch in (True, False):
                    for attr, value in (("_TILE_ELEMS", tile), ("_BWD_PROGRAMS_PER_SM", per_sm),
                                        ("_BWD_PREFETCH", prefetch)):  # fmt: skip
                        setattr(rms_mod, attr, value)
                    fwd = functools.partial(rms_mod.rms_norm, x, w, EPS)
                    gf = gpu_ms(fwd)
                    gb = gpu_ms(_fwd_bwd(fwd, [x, w], g))
                    print(f"{label} | {tile} | {per_sm} | {prefetch} | {gf:.4f} | {gb:.4f}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--results", default=None, help="append a markdown section to this file")
    parser.add_argument("--iters", type=int, default=50, help="calls per timed window (3 windows, median)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of HF's module")
    parser.add_argument("--sweep", action="store_true", help="sweep our kernel's tile size and backward grid")
    parser.add_argument("--profile", action="store_true", help="print the kernel breakdown of ours and Liger")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernel_rms_norm.py needs a CUDA GPU")
    if args.sweep:
        run_sweep(args)
        return
    header = ["shape", "dtypes", "variant", "out", "fwd ms", "fwd+bwd ms", "fwd GPU ms", "fwd+bwd GPU ms",
              "fwd+bwd GPU GB/s", "x HF (fwd+bwd GPU)", "peak GiB"]  # fmt: skip
    rows = run_benchmark(args)
    notes = (
        f"eps={EPS}; gradients of x and the weight. ms = CUDA-event windows (launch gaps included); GPU ms = sum "
        "of kernel durations (torch.profiler). GB/s = minimum bytes (fwd: read x + write y; bwd: + read x, dy, "
        "write dx) / GPU time. torch F.rms_norm runs on the weight cast to x's dtype and does not round like HF; "
        f"Liger-Kernel {'present' if _HAS_LIGER else 'not installed (no Liger rows)'}."
    )
    title = "RMSNorm kernel vs HF LlamaRMSNorm vs Liger"
    if args.results:
        text = write_results(title, header, rows, args.results, notes)
    else:
        text = "\n".join(" | ".join(_fmt(c) for c in row) for row in rows)
    print(text)


if __name__ == "__main__":
    main()
