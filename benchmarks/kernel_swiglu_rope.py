"""SwiGLU and RoPE kernels vs Hugging Face's PyTorch composition vs Liger-Kernel, at llama-1b / llama-125m shapes.

For each op and shape, forward and forward+backward time (CUDA events, medians of repeats, see harness.py) of:

* ``HF``    - the composition HF LLaMA runs (``F.silu(gate) * up``; ``apply_rotary_pos_emb``);
* ``ours``  - :func:`lit_accel.ops.swiglu.swiglu` / :func:`lit_accel.ops.rope.apply_rope`;
* ``liger`` - ``liger_kernel.ops.swiglu.LigerSiLUMulFunction`` / ``liger_kernel.ops.rope.LigerRopeFunction``
  when ``import liger_kernel`` works (skipped otherwise).

Inputs are built as in a bf16-mixed LLaMA step: the MLP's gate/up are bf16 ``[tokens, intermediate]`` linear
outputs; q/k are bf16 ``proj(x).view(B, S, H, D).transpose(1, 2)`` views of the projection outputs (gradients are
taken w.r.t. those outputs, so the cost of undoing the views in backward is included) and cos/sin come from a
real ``LlamaRotaryEmbedding``: fp32 (what HF gives under autocast, where the hidden states are fp32; HF's and our
result is then fp32) and bf16. "saved MiB" is what autograd keeps for backward (distinct storages, counted with
saved-tensor hooks); "fwd GB/s" is the ideal traffic (inputs read once, outputs written once) over the forward time.

Usage::

    python benchmarks/kernel_swiglu_rope.py --results benchmarks/RESULTS.md [--only swiglu|rope] [--iters 20]
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import _fmt, measure, write_results

from lit_accel.ops.rope import apply_rope
from lit_accel.ops.swiglu import swiglu

# (label, tokens, intermediate): llama-1b (TinyLlama-1.1B, 8 x 2048 tokens) and llama-125m (16 x 2048 tokens).
SWIGLU_SHAPES = [("llama-1b", 16384, 5632), ("llama-125m", 32768, 2048)]
# (label, B, S, Hq, Hkv, D)
ROPE_SHAPES = [("llama-1b", 8, 2048, 32, 4, 64), ("llama-125m", 16, 2048, 12, 12, 64)]

Step = Callable[[], object]
Variant = tuple[str, Step, Step, float, float]  # name, fwd, fwd+bwd, ideal fwd bytes, saved bytes


def _liger() -> tuple[Any, Any]:
    """Liger's autograd functions, or (None, None) when liger-kernel is not importable."""
    try:
        from liger_kernel.ops.rope import LigerRopeFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except Exception:  # ImportError, or a triton/torch version it does not support
        return None, None
    return LigerSiLUMulFunction, LigerRopeFunction


def _saved_bytes(fn: Callable[[], object]) -> float:
    """Bytes of distinct storages autograd saves for backward while ``fn`` runs."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return float(sum(seen.values()))


def _pair(fn: Callable[[], Any], params: Sequence[torch.Tensor]) -> tuple[Step, Step]:
    """(forward, forward + backward) closures. The output gradients take each output's own strides
    (``randn_like``), as SDPA's backward returns ``dq``/``dk`` shaped like the q/k it was given."""
    sample = fn()
    grads = tuple(torch.randn_like(o) for o in (sample if isinstance(sample, tuple) else (sample,)))
    del sample

    def fwd() -> object:  # grad mode on, as in training: includes saving for backward
        return fn()

    def fwd_bwd() -> object:
        out = fn()
        outs = out if isinstance(out, tuple) else (out,)
        return torch.autograd.grad(outs, list(params), grads)

    return fwd, fwd_bwd


def swiglu_variants(tokens: int, inter: int) -> list[Variant]:
    """HF / ours / Liger SwiGLU on bf16 ``[tokens, inter]`` gate and up."""
    dev, dt = torch.device("cuda"), torch.bfloat16
    gate = torch.randn(tokens, inter, device=dev, dtype=dt, requires_grad=True)
    up = torch.randn(tokens, inter, device=dev, dtype=dt, requires_grad=True)
    nbytes = 3.0 * tokens * inter * dt.itemsize

    def hf() -> torch.Tensor:
        return F.silu(gate) * up

    def ours() -> torch.Tensor:
        return swiglu(gate, up)

    fns: list[tuple[str, Callable[[], Any], list[torch.Tensor]]] = [("HF", hf, [gate, up]), ("ours", ours, [gate, up])]
    liger_swiglu, _ = _liger()
    if liger_swiglu is not None:
        # Liger's backward writes its gradients into the saved inputs' memory: give it its own copies.
        lg = gate.detach().clone().requires_grad_()
        lu = up.detach().clone().requires_grad_()

        def liger() -> torch.Tensor:
            out: torch.Tensor = liger_swiglu.apply(lg, lu)
            return out

        fns.append(("liger", liger, [lg, lu]))
    out: list[Variant] = []
    for name, fn, params in fns:
        fwd, fwd_bwd = _pair(fn, params)
        out.append((name, fwd, fwd_bwd, nbytes, _saved_bytes(fn)))
    return out


def rope_variants(b: int, s: int, hq: int, hkv: int, d: int, cs_dtype: torch.dtype) -> list[Variant]:
    """HF / ours / Liger RoPE on HF-layout bf16 q/k and cos/sin of ``cs_dtype`` from LlamaRotaryEmbedding."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    dev, dt = torch.device("cuda"), torch.bfloat16
    qp = torch.randn(b, s, hq * d, device=dev, dtype=dt, requires_grad=True)  # q_proj / k_proj outputs
    kp = torch.randn(b, s, hkv * d, device=dev, dtype=dt, requires_grad=True)
    cfg = LlamaConfig(hidden_size=hq * d, num_attention_heads=hq, num_key_value_heads=hkv, head_dim=d)
    pos = torch.arange(s, device=dev)[None]
    cos, sin = LlamaRotaryEmbedding(cfg).to(dev)(torch.empty(1, device=dev, dtype=cs_dtype), pos)
    out_dt = torch.promote_types(dt, cs_dtype)
    elems = b * s * (hq + hkv) * d

    def views(qx: torch.Tensor, kx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return qx.view(b, s, hq, d).transpose(1, 2), kx.view(b, s, hkv, d).transpose(1, 2)

    def hf() -> tuple[torch.Tensor, torch.Tensor]:
        q, k = views(qp, kp)
        qe, ke = apply_rotary_pos_emb(q, k, cos, sin)
        return qe, ke

    def ours() -> tuple[torch.Tensor, torch.Tensor]:
        q, k = views(qp, kp)
        return apply_rope(q, k, cos, sin)

    def ours_bf16() -> tuple[torch.Tensor, torch.Tensor]:
        q, k = views(qp, kp)
        return apply_rope(q, k, cos, sin, out_dtype=dt)

    fns: list[tuple[str, Callable[[], Any], list[torch.Tensor], torch.dtype]] = [
        ("HF", hf, [qp, kp], out_dt),
        ("ours", ours, [qp, kp], out_dt),
    ]
    if out_dt != dt:
        fns.append(("ours, out_dtype=bf16", ours_bf16, [qp, kp], dt))
    _, liger_rope = _liger()
    if liger_rope is not None:
        # Liger rotates in place in its (contiguous) copy of q/k; for HF-layout inputs that copy is a no-op, so
        # it would overwrite qp/kp: give it its own. Its output is in q's dtype (bf16) whatever cos's dtype.
        lq = qp.detach().clone().requires_grad_()
        lk = kp.detach().clone().requires_grad_()

        def liger() -> tuple[torch.Tensor, torch.Tensor]:
            q, k = views(lq, lk)
            qe, ke = liger_rope.apply(q, k, cos, sin)
            return qe, ke

        fns.append(("liger", liger, [lq, lk], dt))
    out: list[Variant] = []
    for name, fn, params, odt in fns:
        fwd, fwd_bwd = _pair(fn, params)
        nbytes = float(elems * (dt.itemsize + odt.itemsize))
        out.append((name, fwd, fwd_bwd, nbytes, _saved_bytes(fn)))
    return out


HEADER = ["op", "shape", "variant", "fwd ms", "fwd+bwd ms", "x HF (fwd+bwd)", "fwd GB/s", "saved MiB", "peak GiB"]


def run(only: str, iters: int) -> list[list[object]]:
    """Measures every variant; returns the table rows (printed as they come)."""
    cases: list[tuple[str, str, Callable[[], list[Variant]]]] = []
    if only in ("all", "swiglu"):
        for label, m, n in SWIGLU_SHAPES:
            cases.append(("swiglu", f"{label} {m}x{n}", functools.partial(swiglu_variants, m, n)))
    if only in ("all", "rope"):
        for label, b, s, hq, hkv, d in ROPE_SHAPES:
            for cs in (torch.float32, torch.bfloat16):
                shape = f"{label} B{b} S{s} Hq{hq} Hkv{hkv} D{d}, cos {str(cs).replace('torch.', '')}"
                cases.append(("rope", shape, functools.partial(rope_variants, b, s, hq, hkv, d, cs)))
    rows: list[list[object]] = []
    for op, shape, make in cases:
        base = None
        try:
            variants = make()
        except Exception as e:  # e.g. a peer library rejecting these inputs while building its case
            print(f"{op} {shape}: skipped ({type(e).__name__}: {e})", flush=True)
            continue
        for name, fwd, fwd_bwd, nbytes, saved in variants:
            try:
                mf = measure(name, fwd, iters=iters)
                mb = measure(name, fwd_bwd, iters=iters)
            except Exception as e:  # one failing peer must not lose the other rows
                rows.append([op, shape, name, f"error: {type(e).__name__}", "", "", "", "", ""])
                print(f"{op} {shape} {name}: {type(e).__name__}: {e}", flush=True)
                continue
            base = base or mb.median_ms
            row: list[object] = [op, shape, name, mf.median_ms, mb.median_ms, mb.median_ms / base,
                                 nbytes / mf.median_ms / 1e6, saved / 2**20, max(mf.peak_gib, mb.peak_gib)]  # fmt: skip
            rows.append(row)
            print(" | ".join(_fmt(c) for c in row), flush=True)
        torch.cuda.empty_cache()
    return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--only", choices=["all", "swiglu", "rope"], default="all")
    parser.add_argument("--iters", type=int, default=20, help="calls per timed window (3 windows, median)")
    parser.add_argument("--results", default=None, help="append a markdown section to this file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernel_swiglu_rope.py needs a CUDA GPU")
    rows = run(args.only, args.iters)
    liger = "liger-kernel " + ("present" if _liger()[0] is not None else "not importable: no liger rows")
    notes = (
        f"bf16 activations; x HF = fwd+bwd time over HF's for the same shape; {liger}. "
        "With fp32 cos (bf16-mixed autocast) HF's and our default outputs are fp32 (HF semantics), Liger's bf16; "
        "'ours, out_dtype=bf16' is what attention under autocast consumes anyway."
    )
    if args.results:
        text = write_results("SwiGLU and RoPE kernels", HEADER, rows, args.results, notes)
    else:
        text = (
            "| " + " | ".join(HEADER) + " |\n" + "\n".join("| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows)
        )
    print(text)


if __name__ == "__main__":
    main()
