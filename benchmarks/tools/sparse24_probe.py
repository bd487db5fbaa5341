"""GPU probe of the 2:4 cuSPARSELt path of ``SparseLinear``: the in-place refresh verified, then the ``sparse24``
suite's parts (one call, each part on its own so that one failing leaves the others' output).

(a) ``verify``: the in-place refresh (learned packed index + gather) is bit-equal to a fresh ``torch._cslt_compress``
    at the llama-1b shapes, for W and W^T, bf16, under two successive weights; the layout found; a product with
    exact zeros at kept positions against a dense reference; whether the optimizer step hook marks the operands
    stale (fused AdamW does not bump ``_version``);
(b) ``correct``, ``layers``, ``mlp``, ``plans``, ``step``: the ``sparse24`` suite's ``sparse_linear``, ``linears``,
    ``mlp_block``, ``plans`` and ``step`` results (``benchmarks/suites/sparse24.py``), at its real sizes except
    ``--tokens`` and ``--refresh-every`` (the step's mask-refresh interval, which is also its timing window).

fp16 is not probed: its products hung on an H100 (at 5632 x 2048 and at 256 x 512) and faulted the CUDA context on
an H200 (algorithm ids 36-52), so the cuSPARSELt path is bf16 only. ``--hang-timeout`` dumps all stacks and exits
rather than hanging. Rows are printed as they are measured and written as records (suite ``sparse24_probe``) to
``--records`` (default: a temporary folder); they are never rendered into RESULTS.md.

    python benchmarks/tools/sparse24_probe.py
    python benchmarks/tools/sparse24_probe.py --skip step --records $OUT/probe
    python benchmarks/tools/sparse24_probe.py --refresh-every 5          # parts: verify correct layers mlp plans step
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.harness import Context
from benchmarks.suites.sparse24 import REAL, linears, mlp_block, plans, sparse_linear, step
from lit_accel.ops import sparse24_gemm as sg
from lit_accel.ops.sparse24 import transposable_24_mask

PARTS = ("verify", "correct", "layers", "mlp", "plans", "step")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def part_verify(ctx: Context) -> None:
    rows: list[dict[str, Any]] = []
    dtype = torch.bfloat16  # the path's only dtype: fp16 products faulted or hung (see SUPPORTED_DTYPES)
    for out_f, in_f in REAL.shapes:
        w = torch.randn(out_f, in_f, device="cuda")
        mask = transposable_24_mask(w)
        t0 = time.perf_counter()
        op = sg.CusparseltWeight(mask, dtype, name=f"{out_f}x{in_f}")
        torch.cuda.synchronize()
        learn_ms = (time.perf_counter() - t0) * 1e3
        row_major = op.index is not None and torch.equal(op.index.long(), mask.reshape(-1).nonzero().squeeze(1))
        verified = []
        for trial in range(2):
            if trial:
                w.copy_(torch.randn_like(w))  # a new weight under the same mask (copy_ bumps _version)
            op.refresh(w)
            verified.append(op.verify(w))
        row: dict[str, Any] = {"dtype": "bfloat16", "W (out x in)": f"{out_f}x{in_f}", "mode": op.mode}
        row["values row-major"] = row_major
        if op.mode != "gather":  # a fresh compression of kept zeros is not what this row is about
            rows.append({**row, "verify (W1/W2)": str(verified), "learn ms": learn_ms})
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
        v1, v2 = verified
        row.update(
            {
                "values bit-equal (W1/W2)": f"{v1.values_equal}/{v2.values_equal}",
                "metadata bit-equal": f"{v1.metadata_equal}/{v2.metadata_equal}",
                "product bit-equal": f"{v1.product_equal}/{v2.product_equal}",
                "rel err with kept zeros fwd/dX": f"{zero_err:.1e}/{zero_err_t:.1e}",
                "learn ms": learn_ms,
            }
        )
        rows.append(row)
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
    print(note, flush=True)
    table = ctx.table(
        "verify",
        "2:4 cuSPARSELt: in-place refresh against fresh compression",
        notes=note + " Bit-equality is over both operands (W and W^T); 'learn ms' = the index and metadata for one "
        "mask (first row includes start-up).",
    )
    for row in rows:
        table.add(row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", default=None, help="records folder (default: a temporary folder)")
    parser.add_argument("--tokens", type=int, default=REAL.tokens)
    parser.add_argument("--refresh-every", type=int, default=REAL.refresh_every, help="the step's refresh interval")
    parser.add_argument("--hang-timeout", type=float, default=590.0, help="seconds before dumping stacks and exiting")
    parser.add_argument("--skip", nargs="*", default=[], choices=PARTS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/tools/sparse24_probe.py needs a CUDA GPU")
    records = Path(args.records or tempfile.mkdtemp(prefix="sparse24_probe_"))
    ctx = Context("sparse24_probe", False, records, uuid.uuid4().hex[:12])
    sizes = dataclasses.replace(REAL, tokens=args.tokens, refresh_every=args.refresh_every)
    reason = sg.cusparselt_unsupported_reason(ctx.device, torch.bfloat16)
    t0 = time.time()
    print(
        f"torch {torch.__version__}, cuSPARSELt {torch.backends.cusparselt.version()}, {torch.cuda.get_device_name()}"
        + ("" if reason is None else f"; cuSPARSELt cannot run: {reason}"),
        flush=True,
    )
    summary: list[str] = []

    def run(name: str, fn: Callable[[], None]) -> None:
        if name in args.skip:
            return
        print(f"\n===== {name} ({time.time() - t0:.0f} s)", flush=True)
        try:
            fn()
            summary.append(f"{name}: ok")
        except Exception as err:
            traceback.print_exc()
            summary.append(f"{name}: FAILED {err!r}"[:300])

    # A hang anywhere prints every thread's stack and ends the run.
    faulthandler.dump_traceback_later(args.hang_timeout, exit=True)
    run("verify", lambda: part_verify(ctx))
    run("correct", lambda: sparse_linear(ctx, sizes, reason))
    run("layers", lambda: linears(ctx, sizes, reason))
    run("mlp", lambda: mlp_block(ctx, sizes, reason))
    run("plans", lambda: plans(ctx, sizes, reason))
    run("step", lambda: step(ctx, sizes, reason))
    print(f"\n===== summary ({time.time() - t0:.0f} s)")
    print("\n".join(summary))
    print(f"records: {records / 'sparse24_probe.jsonl'}")


if __name__ == "__main__":
    main()
