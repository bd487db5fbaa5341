"""LoRA on linears that share an input (q/k/v, gate/up), per layer vs as one group, at llama-1b shapes (GPU only).

For each sublayer input, forward + backward time of:

* ``floor``     - the frozen projections alone (``F.linear``, the input requiring grad; autograd sums the dX);
* ``per layer`` - one ``lora_linear`` per projection (the fused path: the low-rank term written first, the base
  GEMM accumulating into it);
* ``group``     - :func:`lit_accel.ops.lora.lora_linear_group` (one rank projection of the shared input, the
  low-rank term written first and the base GEMMs accumulating into it, one ``dX`` for the group).

The input is produced by the fused RMSNorm (q/k/v, gate/up) or SwiGLU (down) kernel, so ``recompute_input`` works as
in a model; ``o`` reads a plain tensor. Also the cost of beta = 1 on the base GEMMs alone.

Usage::

    python benchmarks/lora_group.py --results benchmarks/RESULTS.md [--tokens 16384] [--rank 16]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import measure, write_results

from lit_accel.ops import rms_norm, swiglu
from lit_accel.ops.lora import lora_linear, lora_linear_group
from lit_accel.ops.recompute import request_recompute

HIDDEN, MLP, KV = 2048, 5632, 256  # llama-1b (TinyLlama-1.1B)
GROUPS = [("q/k/v", "norm", [HIDDEN, KV, KV]), ("gate/up", "norm", [MLP, MLP]), ("o", "plain", [HIDDEN]),
          ("down", "swiglu", [HIDDEN])]  # fmt: skip


class _Consumer:
    """Keeps the fused kernels recording recompute recipes while the benchmark runs (as a LoRA layer would)."""


def _variants(m: int, producer: str, outs: list[int], r: int) -> dict[str, Callable[[], object]]:
    dev, dt = torch.device("cuda"), torch.bfloat16
    in_f = MLP if producer == "swiglu" else HIDDEN
    if producer == "norm":
        h = torch.randn(m, in_f, device=dev, dtype=dt, requires_grad=True)
        wn = torch.randn(in_f, device=dev, dtype=dt)
        make_x: Callable[[], torch.Tensor] = lambda: rms_norm(h, wn, 1e-5)  # noqa: E731
    elif producer == "swiglu":
        gate = torch.randn(m, in_f, device=dev, dtype=dt, requires_grad=True)
        up = torch.randn(m, in_f, device=dev, dtype=dt, requires_grad=True)
        make_x = lambda: swiglu(gate, up)  # noqa: E731
    else:
        x0 = torch.randn(m, in_f, device=dev, dtype=dt, requires_grad=True)
        make_x = lambda: x0 * 1  # noqa: E731
    ws = [torch.randn(o, in_f, device=dev, dtype=dt) / in_f**0.5 for o in outs]
    a_s = [(torch.randn(r, in_f, device=dev) / in_f**0.5).requires_grad_() for _ in outs]
    b_s = [torch.randn(o, r, device=dev, requires_grad=True) for o in outs]
    grads = [torch.randn(m, o, device=dev, dtype=dt) for o in outs]
    params = [t for t in (*a_s, *b_s)]

    def floor() -> None:
        x = make_x()
        torch.autograd.backward([F.linear(x, w) for w in ws], grads)

    def per_layer() -> None:
        x = make_x()
        with torch.autocast("cuda", dtype=dt):
            ys = [lora_linear(x, w, None, a, b, 2.0, recompute_input=True) for w, a, b in zip(ws, a_s, b_s)]
        torch.autograd.backward(ys, grads)

    def group() -> None:
        x = make_x()
        with torch.autocast("cuda", dtype=dt):
            ys = lora_linear_group(x, ws, [None] * len(ws), a_s, b_s, [2.0] * len(ws), recompute_input=True)
        torch.autograd.backward(ys, grads)

    def clear() -> None:
        for p in params:
            p.grad = None

    def wrap(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            fn()
            clear()

        return run

    return {"floor": wrap(floor), "per layer": wrap(per_layer), "group": wrap(group)}


def _profile(title: str, fn: Callable[[], None], calls: int = 10) -> None:
    """Prints the CUDA kernels of ``calls`` calls of ``fn``, by total time (per call)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in events) / calls / 1000
    print(f"-- {title}: kernel time {total:.3f} ms per call")
    for e in events[:14]:
        print(f"   {e.device_time_total / calls / 1000:7.3f} ms {e.count // calls:3d}x  {e.key[:110]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--results", default=None)
    parser.add_argument("--profile", action="store_true", help="print each variant's CUDA kernels (torch.profiler)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("lora_group.py needs a CUDA GPU")
    consumer = _Consumer()
    request_recompute(consumer)
    rows = []
    for name, producer, outs in GROUPS:
        base = None
        for variant, fn in _variants(args.tokens, producer, outs, args.rank).items():
            if args.profile:
                _profile(f"{name} {variant}", fn)
            res = measure(f"{name} {variant}", fn, warmup=5, iters=20, repeats=5)
            base = base or res.median_ms
            rows.append([name, variant, round(res.median_ms, 3), round(res.spread_ms, 3),
                         round(res.median_ms / base, 3), round(res.median_ms - base, 3)])  # fmt: skip
            print(rows[-1], flush=True)
    # beta = 1 on the base GEMM alone: writing a fresh output vs adding into one.
    dev, dt = torch.device("cuda"), torch.bfloat16
    for in_f, out_f in ((HIDDEN, HIDDEN), (HIDDEN, MLP), (MLP, HIDDEN), (HIDDEN, KV)):
        x = torch.randn(args.tokens, in_f, device=dev, dtype=dt)
        w = torch.randn(out_f, in_f, device=dev, dtype=dt)
        y = torch.randn(args.tokens, out_f, device=dev, dtype=dt)
        b0 = measure("beta0", lambda x=x, w=w: torch.mm(x, w.t()), warmup=5, iters=20, repeats=5)
        b1 = measure("beta1", lambda x=x, w=w, y=y: y.addmm_(x, w.t()), warmup=5, iters=20, repeats=5)
        rows.append([f"GEMM {in_f}->{out_f}", "beta=0 vs beta=1", round(b0.median_ms, 3), round(b1.median_ms, 3),
                     round(b1.median_ms / b0.median_ms, 3), round(b1.median_ms - b0.median_ms, 3)])  # fmt: skip
        print(rows[-1], flush=True)
    header = ["input", "variant", "fwd+bwd ms (beta=0 ms)", "spread ms (beta=1 ms)", "x first row", "ms over first row"]
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(map(str, row)))
    if args.results:
        write_results(
            f"LoRA on shared inputs: per layer vs group (M={args.tokens}, r={args.rank}, bf16, fp32 adapters)",
            header,
            rows,
            args.results,
            notes="recompute_input=True for the LoRA variants; fwd+bwd per call, medians of 5 windows of 20 calls.",
        )


if __name__ == "__main__":
    main()
