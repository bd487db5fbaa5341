"""Fused LoRA linear vs unfused torch LoRA vs the frozen base matmul alone, at llama-1b shapes (GPU only).

For each projection shape, forward and forward+backward time of:

* ``base``   - frozen ``F.linear(x, W)`` with ``x`` requiring grad: the forward GEMM + the dX GEMM (the floor);
* ``torch``  - :func:`lit_accel.ops.lora_linear_reference` (PEFT's computation, unfused);
* ``ours, fused`` - the CUDA default (:class:`lit_accel.ops.LoRALinearFunction`): the low-rank term written first,
  the cuBLAS base GEMM adding into it (beta = 1); in the backward ``u`` and ``dB`` from one read of ``dY``
  (``dy_products``) where the output is wide.

Usage::

    python benchmarks/lora_kernel.py --results benchmarks/RESULTS.md [--tokens 16384] [--rank 16] [--dropout 0.0]
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

from lit_accel.ops import lora_linear_reference
from lit_accel.ops.lora import _fused

# llama-1b (TinyLlama-1.1B): hidden 2048, MLP 5632, 32 query heads / 4 KV heads of 64 -> k/v project to 256.
SHAPES = [("q/o 2048->2048", 2048, 2048), ("gate/up 2048->5632", 2048, 5632), ("down 5632->2048", 5632, 2048),
          ("k/v 2048->256", 2048, 256)]  # fmt: skip


def _steps(
    m: int, in_f: int, out_f: int, r: int, p: float, adapter_dtype: torch.dtype
) -> dict[str, tuple[Callable[[], object], Callable[[], object]]]:
    """Per variant: (forward only, forward + backward) closures on shared tensors."""
    dev, dt = torch.device("cuda"), torch.bfloat16
    x = torch.randn(m, in_f, device=dev, dtype=dt, requires_grad=True)
    w = torch.randn(out_f, in_f, device=dev, dtype=dt) / in_f**0.5
    a = (torch.randn(r, in_f, device=dev) / in_f**0.5).to(adapter_dtype).requires_grad_()
    b = (torch.randn(out_f, r, device=dev) * 0.01).to(adapter_dtype).requires_grad_()
    g = torch.randn(m, out_f, device=dev, dtype=dt)
    s = 2.0

    def base() -> torch.Tensor:
        return F.linear(x, w)

    def ref() -> torch.Tensor:
        return lora_linear_reference(x, w, None, a, b, s, p, True)

    def fused() -> torch.Tensor:
        return _fused(x, w, None, a, b, s, p, True, "out_in")

    def pair(
        fn: Callable[[], torch.Tensor], params: list[torch.Tensor]
    ) -> tuple[Callable[[], object], Callable[[], object]]:
        def fwd() -> object:
            return fn()

        def fwd_bwd() -> object:
            return torch.autograd.grad(fn(), params, g)

        return fwd, fwd_bwd

    return {
        "base (frozen, dX only)": pair(base, [x]),
        "torch LoRA (unfused)": pair(ref, [x, a, b]),
        "ours, fused (default)": pair(fused, [x, a, b]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8 * 2048, help="M = batch x sequence")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--adapter-dtype", choices=["bf16", "fp32"], default="bf16",
                        help="fp32: torch path computes the adapter in fp32 as PEFT does without autocast")  # fmt: skip
    parser.add_argument("--results", default=None, help="append a markdown section to this file")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/lora_kernel.py needs a CUDA GPU")
    adapter_dtype = torch.float32 if args.adapter_dtype == "fp32" else torch.bfloat16

    header = ["shape", "variant", "fwd ms", "fwd+bwd ms", "fwd+bwd spread ms", "x base (fwd+bwd)", "peak GiB"]
    rows: list[list[object]] = []
    for label, in_f, out_f in SHAPES:
        steps = _steps(args.tokens, in_f, out_f, args.rank, args.dropout, adapter_dtype)
        base_ms = None
        for name, (fwd, fwd_bwd) in steps.items():
            torch.manual_seed(0)
            mf = measure(name, fwd, iters=args.iters)
            mb = measure(name, fwd_bwd, iters=args.iters)
            base_ms = base_ms or mb.median_ms
            rows.append([label, name, mf.median_ms, mb.median_ms, mb.spread_ms, mb.median_ms / base_ms, mb.peak_gib])
            print(" | ".join(str(c) if not isinstance(c, float) else f"{c:.3f}" for c in rows[-1]), flush=True)
        del steps
        torch.cuda.empty_cache()

    title = (f"LoRA kernel: M={args.tokens}, r={args.rank}, dropout={args.dropout}, bf16 activations/base, "
             f"{args.adapter_dtype} adapters")  # fmt: skip
    notes = (
        "base = frozen F.linear with x requiring grad (forward GEMM + dX GEMM), the floor a LoRA layer adds to; "
        "torch LoRA = lora_linear_reference (PEFT's computation); ours = LoRALinearFunction (cuBLAS GEMMs)."
    )
    if args.results:
        text = write_results(title, header, rows, args.results, notes)
    else:
        from harness import _fmt

        text = "\n".join(" | ".join(_fmt(c) for c in row) for row in rows)
    print(text)


if __name__ == "__main__":
    main()
