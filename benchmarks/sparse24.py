"""2:4 sparse linears on the GPU (cuSPARSELt) against dense, at llama-1b shapes: layers, the MLP block, the step.

Three levels, each dense against sparse in the same process on the same GPU:

* ``layers``: per weight shape, forward and input gradient, GPU time with the launch queue kept full (host
  overhead hidden) from :func:`lit_accel.ops.sparse24_gemm.compare_layer`, plus the wall time of a whole
  ``SparseLinear`` forward + backward (dense weight gradient included) with the packed operands refreshed every
  iteration, as training does (bf16 autocast over fp32 master weights).
* ``mlp``: a LLaMA MLP block (gate, up, SiLU * up, down), forward + backward, refresh every iteration.
* ``step``: ``CausalLM`` in a Lightning ``Trainer`` (bf16-mixed, fused AdamW): dense, ``SemiStructuredSparsity``
  on the MLPs with ``kernel="auto"`` (cuSPARSELt where it measured faster) and with ``kernel="masked"``.

    python benchmarks/sparse24.py                          # all three at llama-1b shapes, 16384 tokens
    python benchmarks/sparse24.py --parts layers mlp --results $OUT/RESULTS.md
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import measure, write_results

from lit_accel.ops.sparse24 import transposable_24_mask
from lit_accel.ops.sparse24_gemm import compare_layer, mark_weights_updated
from lit_accel.sparsity.functional import SparseLinear

LLAMA_1B_SHAPES = [(5632, 2048), (2048, 5632), (2048, 2048)]
"""(out, in): gate/up projection, down projection, attention q/o projection."""


def wall_ms(step: Callable[[], Any]) -> float:
    """Median CUDA-event time per call over windows of back-to-back calls, host overhead included."""
    return measure("", step).median_ms


def _sparse_layers(modules: list[SparseLinear], kernel: str | None) -> None:
    for m in modules:
        if kernel is None:
            m.set_mask(None)
        else:
            m.set_mask(transposable_24_mask(m.weight.detach()))
            m.set_kernel(kernel)


def _fwd_bwd(module: nn.Module, x: torch.Tensor, refresh: bool) -> Callable[[], None]:
    def step() -> None:
        if refresh:
            mark_weights_updated()  # as after an optimizer step: the packed operands are rebuilt from the weights
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = module(x)
        y.backward(torch.ones_like(y))
        for p in module.parameters():
            p.grad = None
        x.grad = None

    return step


def time_layers(shapes: list[tuple[int, int]], tokens: int) -> list[list[Any]]:
    """Rows: shape, GPU-time fwd / dX dense and sparse and their ratio, refresh, host ms per sparse call, the wall
    ratio of fwd + dX (+ refresh) back to back (what ``kernel="auto"`` also weighs), and the wall time of a
    SparseLinear fwd+bwd dense / cuSPARSELt (refresh each iteration) and its ratio."""
    rows: list[list[Any]] = []
    for out_f, in_f in shapes:
        t = compare_layer(out_f, in_f, tokens)
        layer = SparseLinear(in_f, out_f, bias=False).cuda()
        x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        _sparse_layers([layer], None)
        dense = wall_ms(_fwd_bwd(layer, x, False))
        _sparse_layers([layer], "cusparselt")
        sparse = wall_ms(_fwd_bwd(layer, x, True))
        rows.append(
            [
                f"{in_f}->{out_f}",
                t.dense_fwd_ms,
                t.sparse_fwd_ms,
                t.dense_fwd_ms / t.sparse_fwd_ms,
                t.dense_dx_ms,
                t.sparse_dx_ms,
                t.dense_dx_ms / t.sparse_dx_ms,
                t.refresh_ms,
                t.gpu_speedup,
                t.sparse_host_ms,
                t.wall_speedup,
                dense,
                sparse,
                dense / sparse,
            ]
        )
        print(rows[-1], flush=True)
        del layer, x
    return rows


LAYER_HEADER = [
    "linear (in->out)",
    "dense fwd ms",
    "sparse fwd ms",
    "fwd x",
    "dense dX ms",
    "sparse dX ms",
    "dX x",
    "refresh ms",
    "fwd+dX+refresh x (GPU)",
    "host ms / sparse call",
    "fwd+dX+refresh x (wall)",
    "fwd+bwd wall dense ms",
    "fwd+bwd wall sparse ms",
    "wall x",
]


class LlamaMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with SparseLinear projections."""

    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = SparseLinear(hidden, inter, bias=False)
        self.up_proj = SparseLinear(hidden, inter, bias=False)
        self.down_proj = SparseLinear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def time_mlp(hidden: int, inter: int, tokens: int) -> list[list[Any]]:
    """Rows: variant, wall ms of the MLP block forward + backward, ratio to dense."""
    mlp = LlamaMLP(hidden, inter).cuda()
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layers = [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    rows: list[list[Any]] = []
    dense = float("nan")
    for name, kernel in (("dense", None), ("2:4 masked dense", "masked"), ("2:4 cuSPARSELt", "cusparselt")):
        _sparse_layers(layers, kernel)
        ms = wall_ms(_fwd_bwd(mlp, x, kernel == "cusparselt"))
        dense = ms if kernel is None else dense
        rows.append([f"MLP {hidden}->{inter}->{hidden}", name, ms, dense / ms])
        print(rows[-1], flush=True)
    del mlp, x
    return rows


def time_train_step(preset: str, batch: int, seq: int, warmup: int, iters: int, repeats: int) -> list[list[Any]]:
    """Rows: variant, median ms/step, ratio to dense, peak GiB (CausalLM in a Lightning Trainer)."""
    from train_step import lightning_loop

    from lit_accel.sparsity import SemiStructuredSparsity

    rows: list[list[Any]] = []
    dense = float("nan")
    variants: list[tuple[str, Any]] = [
        ("dense", None),
        ("2:4 MLPs, kernel=auto (cuSPARSELt where faster)", "auto"),
        ("2:4 MLPs, kernel=masked", "masked"),
    ]
    for name, kernel in variants:
        torch.manual_seed(0)
        callbacks = [] if kernel is None else [SemiStructuredSparsity(targets="mlp", kernel=kernel)]
        r = lightning_loop(preset, batch, seq, warmup, iters, repeats, callbacks=callbacks, name=name)
        dense = r.median_ms if kernel is None else dense
        extra = ""
        if callbacks:
            cb = callbacks[0]
            n_sparse = sum(1 for k in cb.kernels.values() if k == "cusparselt")
            extra = f"{n_sparse}/{len(cb.kernels)} layers on cuSPARSELt"
        rows.append([preset, f"{batch}x{seq}", name, r.median_ms, r.spread_ms, dense / r.median_ms, r.peak_gib, extra])
        print(rows[-1], flush=True)
        gc.collect()
        torch.cuda.empty_cache()
    return rows


STEP_HEADER = ["model", "batch", "variant", "median ms/step", "spread ms", "speed vs dense", "peak GiB", "note"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["layers", "mlp", "step"], choices=["layers", "mlp", "step"])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--step", default="llama-1b:8:2048", help="preset:batch:seq_len of the training step")
    parser.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
    args = parser.parse_args()
    if "layers" in args.parts:
        rows = time_layers(LLAMA_1B_SHAPES, args.tokens)
        print(write_results(f"2:4 cuSPARSELt linears, {args.tokens} tokens, bf16", LAYER_HEADER, rows, args.results))
    if "mlp" in args.parts:
        rows = time_mlp(2048, 5632, args.tokens)
        print(
            write_results(
                f"2:4 MLP block fwd+bwd, {args.tokens} tokens",
                ["block", "variant", "ms", "x dense"],
                rows,
                args.results,
            )
        )
    if "step" in args.parts:
        preset, b, s = args.step.split(":")
        rows = time_train_step(preset, int(b), int(s), warmup=4, iters=5, repeats=2)
        print(write_results("2:4 MLPs: training step", STEP_HEADER, rows, args.results))


if __name__ == "__main__":
    main()
