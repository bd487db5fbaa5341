"""Fused linear + cross-entropy vs the Hugging Face computation vs Liger-Kernel, at LLaMA shapes (GPU only).

For each shape (tokens N x hidden H x vocabulary V, bf16 hidden and head), forward and forward+backward time and
peak memory above the inputs of:

* ``HF (lm_head + fp32 CE)`` - :func:`lit_accel.ops.linear_cross_entropy_reference`: ``F.linear`` then
  ``F.cross_entropy`` on ``logits.float()``, what ``LlamaForCausalLM`` + ``ForCausalLMLoss`` run;
* ``ours`` - :func:`lit_accel.ops.linear_cross_entropy.fused_linear_cross_entropy` with the automatic chunk
  and with each ``--chunks`` size;
* ``Liger`` - ``LigerFusedLinearCrossEntropyFunction`` with its default bf16 weight-gradient accumulation and with
  ``accum_dtype=torch.float32`` (ours always accumulates in fp32), when ``import liger_kernel`` works.

The forward of the fused variants already computes the gradients (inputs require grad), so their forward and
forward+backward times are close; the HF forward is only the loss. ``--autocast`` runs the fp32-master-weight case
(fp32 hidden and head under bf16 autocast) instead.

Usage::

    python benchmarks/kernel_linear_cross_entropy.py --results benchmarks/RESULTS.md [--chunks 1024 2048 4096 8192]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import measure, write_results

from lit_accel.ops.linear_cross_entropy import fused_linear_cross_entropy, linear_cross_entropy_reference

# llama-1b: 8 x 2048 tokens of hidden 2048; llama-125m: 16 x 2048 tokens of hidden 768; LLaMA-2's vocabulary.
SHAPES = [("llama-1b", 16384, 2048, 32000), ("llama-125m", 32768, 768, 32000)]


def _liger() -> Any | None:
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
    except Exception:  # any import failure just drops the Liger rows
        return None
    return LigerFusedLinearCrossEntropyFunction


def _liger_loss(fn: Any, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, accum: torch.dtype | None) -> torch.Tensor:
    # apply(_input, weight, target, bias, ce_weight, ignore_index, lse_square_scale, label_smoothing, reduction,
    # softcap, return_z_loss, accum_dtype); newer versions return a tuple (loss, z_loss, ...).
    args: tuple[Any, ...] = (x, w, y, None, None, -100, 0.0, 0.0, "mean", None, False)
    out = fn.apply(*args, accum) if accum is not None else fn.apply(*args)
    return out[0] if isinstance(out, tuple) else out


def variants(
    n: int, h: int, v: int, chunks: list[int], autocast: bool
) -> tuple[dict[str, Callable[[], torch.Tensor]], list[torch.Tensor]]:
    """Per variant, a closure returning the loss; and the tensors whose gradients fwd+bwd asks for."""
    dev = torch.device("cuda")
    dt = torch.float32 if autocast else torch.bfloat16
    x = torch.randn(n, h, device=dev).to(dt).requires_grad_()
    # logits std ~3, the range of a trained LM's head, so the softmax is not uniform
    w = (torch.randn(v, h, device=dev) * (3.0 / h**0.5)).to(dt).requires_grad_()
    y = torch.randint(0, v, (n,), device=dev)
    y[torch.rand(n, device=dev) < 0.1] = -100

    out: dict[str, Callable[[], torch.Tensor]] = {
        "HF (lm_head + fp32 CE)": lambda: linear_cross_entropy_reference(x, w, y),  # type: ignore[return-value,arg-type]
        "ours (auto chunk)": lambda: fused_linear_cross_entropy(x, w, y),  # type: ignore[return-value,arg-type]
    }
    for c in chunks:
        out[f"ours (chunk {c})"] = lambda c=c: fused_linear_cross_entropy(x, w, y, chunk_size=c)  # type: ignore[misc]
    liger = _liger()
    if liger is not None:
        out["Liger (bf16 dW accumulation)"] = lambda: _liger_loss(liger, x, w, y, None)
        out["Liger (accum_dtype=fp32)"] = lambda: _liger_loss(liger, x, w, y, torch.float32)
    return out, [x, w]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--chunks", type=int, nargs="*", default=[1024, 2048, 4096, 8192], help="tokens per chunk")
    parser.add_argument("--shapes", nargs="*", default=[s[0] for s in SHAPES], choices=[s[0] for s in SHAPES])
    parser.add_argument("--autocast", action="store_true", help="fp32 hidden/head under bf16 autocast")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--results", default=None, help="append a markdown section to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernel_linear_cross_entropy.py needs a CUDA GPU")

    header = ["shape", "variant", "fwd ms", "fwd+bwd ms", "spread ms", "x HF (fwd+bwd)", "peak GiB above inputs"]
    rows: list[list[object]] = []
    for label, n, h, v in SHAPES:
        if label not in args.shapes:
            continue
        steps, params = variants(n, h, v, args.chunks, args.autocast)
        base_ms = None
        for name, fn in steps.items():
            ctx = torch.autocast("cuda", dtype=torch.bfloat16) if args.autocast else nullcontext()

            def fwd(fn: Callable[[], torch.Tensor] = fn, ctx: Any = ctx) -> object:
                with ctx:
                    return fn().detach()

            def fwd_bwd(
                fn: Callable[[], torch.Tensor] = fn, ctx: Any = ctx, params: list[torch.Tensor] = params
            ) -> object:
                with ctx:
                    loss = fn()
                return torch.autograd.grad(loss, params)

            torch.cuda.synchronize()
            resident = torch.cuda.memory_allocated() / 2**30
            try:
                mf = measure(name, fwd, iters=args.iters)
                mb = measure(name, fwd_bwd, iters=args.iters)
            except torch.OutOfMemoryError:
                rows.append([f"{label} {n}x{h}x{v}", name, "OOM", "OOM", "", "", ""])
                torch.cuda.empty_cache()
                continue
            base_ms = base_ms or mb.median_ms
            rows.append([f"{label} {n}x{h}x{v}", name, mf.median_ms, mb.median_ms, mb.spread_ms,
                         base_ms / mb.median_ms, mb.peak_gib - resident])  # fmt: skip
            print(" | ".join(str(c) if not isinstance(c, float) else f"{c:.3f}" for c in rows[-1]), flush=True)
        del steps, params
        torch.cuda.empty_cache()

    mode = "fp32 hidden/head under bf16 autocast" if args.autocast else "bf16 hidden/head"
    title = f"Fused linear + cross-entropy: {mode}, 10% ignored labels"
    notes = (
        "x HF = HF fwd+bwd ms / this fwd+bwd ms (higher is faster). Peak = max allocated during fwd+bwd minus the "
        "inputs resident before (gradients returned count). Fused variants compute gradients in the forward."
    )
    if args.results:
        text = write_results(title, header, rows, args.results, notes)
    else:
        from harness import _fmt

        text = "\n".join(" | ".join(_fmt(c) for c in row) for row in rows)
    print(text)


if __name__ == "__main__":
    main()
