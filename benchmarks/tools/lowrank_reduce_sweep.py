"""Tile sweeps for the kernels of :mod:`lit_accel.ops.lowrank_reduce` at llama-1b shapes (GPU only).

Times every (BLOCK_M, BLOCK_N, warps, stages, programs per SM) of a small grid for ``lowrank_reduce`` with the
SwiGLU producer (down's dA, N=5632, r=16) and the RMSNorm producer (q/k/v's dA, N=2048, R=48; gate/up's, R=32),
against the unfused pair it replaces (the producer's forward written out + cuBLAS's product), and for
``dy_products`` (u and dB of gate/up, N=5632, and of q/o/down, N=2048, r=16) against cuBLAS's two GEMMs; prints the
best per shape.

    python benchmarks/tools/lowrank_reduce_sweep.py
"""

from __future__ import annotations

import importlib
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.harness import measure
from lit_accel.ops.lowrank_reduce import _DY_GPU_CONFIG, _GPU_CONFIG, dy_products, lowrank_reduce

rms_mod = importlib.import_module("lit_accel.ops.rms_norm")
swiglu_mod = importlib.import_module("lit_accel.ops.swiglu")

WINDOWS = 5


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("benchmarks/tools/lowrank_reduce_sweep.py needs a CUDA GPU")
    m, dt = 16384, torch.bfloat16
    dev = torch.device("cuda")
    cases = []
    g, up = torch.randn(m, 5632, device=dev, dtype=dt), torch.randn(m, 5632, device=dev, dtype=dt)
    cases.append(("swiglu N=5632 R=16", "swiglu", (g, up), 16, lambda: swiglu_mod._recompute_forward(g, up)))
    x = torch.randn(m, 2048, device=dev, dtype=dt)
    w = torch.rand(2048, device=dev) + 0.5
    _, rstd = rms_mod._forward(x, w, 1e-5, dt, x.shape, store_rstd=True)
    for r in (48, 32):
        cases.append((f"rms_norm N=2048 R={r}", "rms_norm", (x, w, rstd), r,
                      lambda: rms_mod._recompute_forward(1e-5, dt, x.shape, x, w, rstd)))  # fmt: skip
    for n in (5632, 2048):
        dy = torch.randn(m, n, device=dev, dtype=dt)
        b = torch.randn(n, 16, device=dev, dtype=dt)
        t = torch.randn(m, 16, device=dev, dtype=dt)
        cases.append((f"dy_products N={n} r=16", "dy", (dy, b, t), 16, lambda dy=dy, b=b, t=t: (dy @ b, dy.t() @ t)))
    grid = list(itertools.product((32, 64, 128), (64, 128, 256), (4, 8), (2, 3), (2, 4)))
    for name, producer, inputs, r, rebuild in cases:
        u = torch.randn(m, r, device=dev, dtype=dt)
        pr = torch.promote_types(dt, torch.float32) if producer == "rms_norm" else None
        if producer == "dy":
            base = measure("unfused", rebuild, warmup=3, iters=20, windows=WINDOWS, device=dev)
        else:
            base = measure(
                "unfused",
                lambda u=u, rebuild=rebuild: u.t() @ rebuild(),
                warmup=3,
                iters=20,
                windows=WINDOWS,
                device=dev,
            )
        results = []
        for cfg in grid:
            if cfg[0] * cfg[1] > 128 * 128 or (cfg[1] == 256 and cfg[2] == 4):
                continue
            try:
                if producer == "dy":
                    fn = lambda cfg=cfg, inputs=inputs: dy_products(*inputs, 1.0, _config=cfg)  # noqa: E731
                else:
                    fn = lambda cfg=cfg, u=u, inputs=inputs, producer=producer, pr=pr: lowrank_reduce(  # noqa: E731
                        u, producer, inputs, 1.0, dt, pr, _config=cfg
                    )
                res = measure(str(cfg), fn, warmup=2, iters=20, windows=WINDOWS, device=dev)
            except Exception as e:  # a config that does not compile (shared memory) is skipped
                print(name, cfg, "failed:", type(e).__name__, str(e)[:80])
                continue
            results.append((res.median_ms, cfg))
        results.sort()
        print(f"== {name}: unfused (rebuild + cuBLAS) {base.median_ms:.4f} ms; best configs:")
        for ms, cfg in results[:6]:
            print(f"   {ms:.4f} ms  BM={cfg[0]} BN={cfg[1]} warps={cfg[2]} stages={cfg[3]} per_sm={cfg[4]}")
        lib = _DY_GPU_CONFIG if producer == "dy" else _GPU_CONFIG
        default = [ms for ms, cfg in results if cfg == lib]
        print(f"   library default {lib}: {default[0] if default else float('nan'):.4f} ms")


if __name__ == "__main__":
    main()
