"""GPU probe of the 2:4 cuSPARSELt path of ``SparseLinear``: verification, correctness, timings (one call, < 5 min).

(a) the in-place refresh (learned packed index + gather) is bit-equal to a fresh ``torch._cslt_compress`` at the
    llama-1b shapes, for W and W^T, bf16, under two successive weights; the layout found; whether the
    optimizer step hook marks the operands stale (fused AdamW does not bump ``_version``);
(b) ``SparseLinear(kernel="cusparselt")`` forward / input gradient / weight gradient against the masked dense
    reference (relative errors; bias, 3-D input, a token count that needs padding), and the fp32 fallback;
(c) timings at llama-1b shapes (16384 tokens): per linear and the MLP block (``benchmarks/sparse24.py``);
(d) a llama-1b training step, dense against 2:4 MLPs (Lightning, bf16-mixed), few steps.

Seen on an H100 (2026-11-25): parts (b)-(d) in 74 s. Part (a) used to include fp16; it hung on an H100 (at
5632 x 2048 and at 256 x 512) and faulted the CUDA context on an H200 (algorithm ids 36-52), so the cuSPARSELt path
is bf16 only now. ``--hang-timeout`` dumps all stacks and exits rather than eating the device call.

Each part runs in its own try/except: an error is printed and the next part runs. Tables go to ``--results``.

    python benchmarks/gpu_sparse24_probe.py --results $OUT/RESULTS.md
    python benchmarks/gpu_sparse24_probe.py --skip step            # parts: verify correct layers mlp step
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import sys
import time
import traceback
import warnings
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import write_results
from sparse24 import LAYER_HEADER, LLAMA_1B_SHAPES, STEP_HEADER, time_layers, time_mlp, time_train_step

from lit_accel.ops import sparse24_gemm as sg
from lit_accel.ops.sparse24 import transposable_24_mask
from lit_accel.sparsity.functional import SparseLinear, masked_linear


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def part_verify(results: str) -> None:
    rows: list[list[Any]] = []
    for dtype in (torch.bfloat16,):  # the path's only dtype: fp16 products faulted or hung (see SUPPORTED_DTYPES)
        for out_f, in_f in LLAMA_1B_SHAPES:
            w = torch.randn(out_f, in_f, device="cuda")
            mask = transposable_24_mask(w)
            t0 = time.perf_counter()
            op = sg.CusparseltWeight(mask, dtype, name=f"{out_f}x{in_f}")
            torch.cuda.synchronize()
            learn_ms = (time.perf_counter() - t0) * 1e3
            row_major = op.index is not None and torch.equal(op.index.long(), mask.reshape(-1).nonzero().squeeze(1))
            results_per_w = []
            for trial in range(2):
                if trial:
                    w.copy_(torch.randn_like(w))  # a new weight under the same mask (copy_ bumps _version)
                op.refresh(w)
                results_per_w.append(op.verify(w))
            if op.mode != "gather":  # a fresh compression of kept zeros is not what this row is about
                rows.append([str(dtype), f"{out_f}x{in_f}", op.mode, row_major, str(results_per_w), "", "", "", 0])
                print(rows[-1], flush=True)
                continue
            # the matmul against a dense reference, with an exact zero at some kept positions
            w0 = w.clone()
            kept = mask.reshape(-1).nonzero().squeeze(1)[:7]
            w0.view(-1)[kept] = 0.0
            op.refresh(w0, force=True)
            x = torch.randn(64, in_f, device="cuda").to(dtype)
            ref = x.double() @ (w0 * mask).to(dtype).double().t()
            zero_err = _rel(op.forward_mm(x), ref)
            g = torch.randn(64, out_f, device="cuda").to(dtype)
            zero_err_t = _rel(op.input_grad_mm(g), g.double() @ (w0 * mask).to(dtype).double())
            v1, v2 = results_per_w
            rows.append(
                [
                    str(dtype).replace("torch.", ""),
                    f"{out_f}x{in_f}",
                    op.mode,
                    row_major,
                    f"{v1.values_equal}/{v2.values_equal}",
                    f"{v1.metadata_equal}/{v2.metadata_equal}",
                    f"{v1.product_equal}/{v2.product_equal}",
                    f"{zero_err:.1e}/{zero_err_t:.1e}",
                    learn_ms,
                ]
            )
            print(rows[-1], flush=True)
            del op
    # the optimizer step hook: fused AdamW updates weights without bumping _version
    p = torch.nn.Parameter(torch.randn(64, 64, device="cuda"))
    opt = torch.optim.AdamW([p], fused=True)
    p.grad = torch.randn_like(p)
    v0, e0 = p._version, sg._EPOCH[0]
    sg._ensure_step_hook()
    opt.step()
    note = (
        f"fused AdamW step: weight _version {v0} -> {p._version}; refresh epoch {e0} -> {sg._EPOCH[0]} "
        "(the global optimizer step hook must advance it)."
    )
    print(note)
    write_results(
        "2:4 cuSPARSELt: in-place refresh against fresh compression",
        [
            "dtype",
            "W (out x in)",
            "mode",
            "values row-major",
            "values bit-equal (W1/W2)",
            "metadata bit-equal",
            "product bit-equal",
            "rel err with kept zeros fwd/dX",
            "learn ms",
        ],
        rows,
        results,
        notes=note
        + " Bit-equality is over both operands (W and W^T); 'learn ms' = the index and metadata for one mask "
        "(first row includes start-up).",
    )


def part_correct(results: str) -> None:
    rows: list[list[Any]] = []
    cases = [((4096,), 2048, 5632, False), ((2, 1000), 5632, 2048, True), ((8, 512), 2048, 2048, False)]
    for lead, in_f, out_f, bias in cases:
        torch.manual_seed(0)
        layer = SparseLinear(in_f, out_f, bias=bias).cuda()
        ref_layer = SparseLinear(in_f, out_f, bias=bias).cuda()
        ref_layer.load_state_dict(layer.state_dict())
        mask = transposable_24_mask(layer.weight.detach())
        layer.set_mask(mask)
        ref_layer.set_mask(mask)
        layer.set_kernel("cusparselt")
        x = torch.randn(*lead, in_f, device="cuda", requires_grad=True)
        xr = x.detach().clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x)
            yr = ref_layer(xr)
        gy = torch.randn_like(y)
        y.backward(gy)
        yr.backward(gy)
        # fp64 reference from the same bf16-rounded operands
        wm = (layer.weight.detach() * mask).bfloat16().double()
        x64, g64 = x.detach().bfloat16().double(), gy.double()
        y64 = x64 @ wm.t() + (layer.bias.detach().bfloat16().double() if bias else 0)
        gx64 = g64 @ wm
        gw64 = g64.reshape(-1, out_f).t() @ x64.reshape(-1, in_f)
        assert layer.weight.grad is not None and ref_layer.weight.grad is not None and x.grad is not None
        rows.append(
            [
                f"{tuple(lead)}x{in_f}->{out_f}" + (" +bias" if bias else ""),
                _rel(y, y64),
                _rel(yr, y64),
                _rel(x.grad, gx64),
                _rel(xr.grad, gx64) if xr.grad is not None else float("nan"),
                _rel(layer.weight.grad, gw64),
                _rel(layer.weight.grad, ref_layer.weight.grad),
                (_rel(layer.bias.grad, ref_layer.bias.grad) if bias else float("nan")),  # type: ignore[union-attr]
            ]
        )
        print(rows[-1], flush=True)
    # fp32 on the GPU: a warning naming the layer, and the masked dense result
    layer = SparseLinear(64, 32).cuda()
    layer.set_mask(transposable_24_mask(layer.weight.detach()))
    layer.set_kernel("cusparselt")
    layer.sparse_name = "probe.fp32"
    x = torch.randn(4, 64, device="cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = layer(x)
    ref = masked_linear(x, layer.weight, layer.bias, layer.mask)  # type: ignore[arg-type]
    fp32_note = (
        f"fp32 input on the GPU: equal to the masked path: {torch.equal(y, ref)}; warning: "
        f"{[str(c.message)[:160] for c in caught]}"
    )
    print(fp32_note)
    write_results(
        "2:4 cuSPARSELt SparseLinear against the masked dense path (bf16 autocast)",
        [
            "case",
            "y err (csl)",
            "y err (masked)",
            "dX err (csl)",
            "dX err (masked)",
            "dW err (csl)",
            "dW csl/masked",
            "db",
        ],
        rows,
        results,
        notes="Relative errors against float64 on the same bf16-rounded operands. " + fp32_note,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hang-timeout", type=float, default=290.0, help="seconds before dumping stacks and exiting")
    parser.add_argument("--skip", nargs="*", default=[], choices=["verify", "correct", "layers", "mlp", "step"])
    args = parser.parse_args()
    t0 = time.time()
    print(
        f"torch {torch.__version__}, cuSPARSELt {torch.backends.cusparselt.version()}, {torch.cuda.get_device_name()}",
        flush=True,
    )
    summary: list[str] = []

    def run(name: str, fn: Any) -> None:
        if name in args.skip:
            return
        print(f"\n===== {name} ({time.time() - t0:.0f} s)", flush=True)
        try:
            fn()
            summary.append(f"{name}: ok")
        except Exception as err:
            traceback.print_exc()
            summary.append(f"{name}: FAILED {err!r}"[:300])

    # A hang anywhere prints every thread's stack and ends the run instead of eating the device call.
    faulthandler.dump_traceback_later(args.hang_timeout, exit=True)
    run("verify", lambda: part_verify(args.results))
    run("correct", lambda: part_correct(args.results))
    run(
        "layers",
        lambda: write_results(
            f"2:4 cuSPARSELt linears, {args.tokens} tokens, bf16",
            LAYER_HEADER,
            time_layers(LLAMA_1B_SHAPES, args.tokens),
            args.results,
            notes="GPU ms with the launch queue kept full (host overhead hidden); 'wall' = CUDA events around "
            "back-to-back SparseLinear fwd+bwd (dense dW included, refresh every iteration), host overhead included.",
        ),
    )
    run(
        "mlp",
        lambda: write_results(
            f"2:4 MLP block fwd+bwd, {args.tokens} tokens (refresh every iteration)",
            ["block", "variant", "wall ms", "x dense"],
            time_mlp(2048, 5632, args.tokens),
            args.results,
        ),
    )
    run(
        "step",
        lambda: write_results(
            "2:4 MLPs: llama-1b training step (Lightning, bf16-mixed, fused AdamW)",
            STEP_HEADER,
            time_train_step("llama-1b", 8, 2048, warmup=4, iters=5, repeats=2),
            args.results,
        ),
    )
    print(f"\n===== summary ({time.time() - t0:.0f} s)")
    print("\n".join(summary))
    if os.path.exists(args.results):
        with open(args.results) as f:
            print(f.read()[-6000:])


if __name__ == "__main__":
    main()
