"""cuSPARSELt plans kept across calls: wall time of a 2:4 product with torch's per-call plan, with a
cached plan (lit_accel.ops.cusparselt) and of the dense matmul, at the llama-1b MLP / attention shapes.

Each variant runs back to back in windows of ``--iters`` calls bracketed by CUDA events (so host time that the GPU
cannot hide shows up, as in training), plus the host time per call (the Python + library time to issue it). The
cached-plan products are checked bit-equal to torch's first (the cache turns itself off otherwise).

    python benchmarks/cusparselt_plans.py --results $OUT/RESULTS.md
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import measure, write_results

from lit_accel.ops import cusparselt
from lit_accel.ops.sparse24 import transposable_24_mask
from lit_accel.ops.sparse24_gemm import select_alg

SHAPES = [("gate/up 2048->5632", 5632, 2048), ("down 5632->2048", 2048, 5632), ("q/o 2048->2048", 2048, 2048)]


def _host_ms(fn: Callable[[], object], iters: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    host = (time.perf_counter() - t0) * 1e3 / iters
    torch.cuda.synchronize()
    return host


def _variants(
    x: torch.Tensor,
    wm: torch.Tensor,
    packed: torch.Tensor,
    alg: int,
    cache: cusparselt.SparsePlanCache | None,
    out_f: int,
) -> dict[str, Callable[[], object]]:
    variants: dict[str, Callable[[], object]] = {
        "dense F.linear (cuBLAS)": lambda: F.linear(x, wm),
        "2:4 torch._cslt_sparse_mm (plan per call)": lambda: torch._cslt_sparse_mm(
            packed, x.t(), transpose_result=True, alg_id=alg
        ),
    }
    if cache is not None:
        variants["2:4 cached plan"] = lambda: cache.matmul(packed, x, out_f, alg)
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8 * 2048)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/cusparselt_plans.py needs a CUDA GPU")
    cusparselt.set_plan_cache(True)
    dtype, rows = torch.bfloat16, []
    for label, out_f, in_f in SHAPES:
        w = torch.randn(out_f, in_f, device="cuda")
        wm = (w * transposable_24_mask(w)).to(dtype)
        packed = torch._cslt_compress(wm)
        x = torch.randn(args.tokens, in_f, device="cuda", dtype=dtype)
        alg = select_alg(packed, x)
        cache = cusparselt.SparsePlanCache(label)
        cache.matmul(packed, x, out_f, alg)  # builds and checks the plan
        ok = cusparselt.plan_cache_enabled()
        variants = _variants(x, wm, packed, alg, cache if ok else None, out_f)
        base = None
        for name, fn in variants.items():
            m = measure(name, fn, warmup=3, iters=args.iters, repeats=3)
            host = _host_ms(fn, args.iters)
            base = base or m.median_ms
            rows.append([label, name, m.median_ms, m.spread_ms, host, base / m.median_ms])
            print(rows[-1], flush=True)
        if not ok:
            print(f"{label}: plan cache off: {cusparselt._state['disabled_reason']}", flush=True)
    write_results(
        f"cuSPARSELt plans kept across calls: 2:4 forward products, {args.tokens} tokens, bf16",
        ["shape", "variant", "ms per call (back to back)", "spread ms", "host ms per call", "speed vs dense"],
        rows,
        args.results,
        notes="Windows of back-to-back calls bracketed by CUDA events (host time the GPU cannot hide included);"
        " host ms = Python + library time to issue one call. Transposable masks; algorithm ids chosen by"
        " select_alg for both 2:4 variants.",
    )


if __name__ == "__main__":
    main()
