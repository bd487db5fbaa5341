"""Fused LoRA linear: the reference against PEFT, the fused path against the reference.

The fused path is plain torch (cuBLAS calls on CUDA), so these tests run it on the CPU as is. Where the output is wide
or the input comes from a fused producer it also takes the ``lowrank_reduce`` kernels on CUDA; on the CPU those run
only under ``TRITON_INTERPRET=1``, which must be set before triton is first imported (torch/lightning import it
early), so when this process was not started with it, one test runs this file's interpreter cases in a child pytest
with the variable set.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lit_accel.ops import LoRALinearFunction, kernel_available, lora_linear, lora_linear_reference
from lit_accel.ops.lora import _addmm_writes_fp32, _fused, lora_linear_group, lora_linear_uses_fused

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
ROOT = Path(__file__).resolve().parents[2]


def _make(
    m: int,
    in_f: int,
    out_f: int,
    r: int,
    *,
    bias: bool = True,
    layout: str = "out_in",
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    lead: tuple[int, ...] = (),
) -> dict[str, torch.Tensor | None]:
    """Random LoRA inputs; B is random (not PEFT's zero init) so the adapter path is actually tested."""
    w = torch.randn(out_f, in_f, device=device, dtype=dtype) / in_f**0.5
    if layout == "in_out":
        w = w.t().contiguous()
    return {
        "x": torch.randn(*lead, m, in_f, device=device, dtype=dtype, requires_grad=True),
        "weight": w,
        "bias": torch.randn(out_f, device=device, dtype=dtype) if bias else None,
        "lora_a": (torch.randn(r, in_f, device=device) / in_f**0.5).requires_grad_(),
        "lora_b": (torch.randn(out_f, r, device=device) / r**0.5).requires_grad_(),
    }


class _Consumer:
    """Stands for a LoRA layer asking the fused kernels to record recompute recipes (while it is alive)."""


def _took_fused_path(y: torch.Tensor) -> bool:
    """Whether ``LoRALinearFunction`` made ``y`` (its output is reshaped once after it)."""
    node = y.grad_fn
    return node is not None and any("LoRALinearFunction" in type(f).__name__ for f, _ in node.next_functions)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def _grads(y: torch.Tensor, t: dict[str, torch.Tensor | None], g: torch.Tensor) -> list[torch.Tensor]:
    inputs = [t["x"], t["lora_a"], t["lora_b"]]
    return list(torch.autograd.grad(y, inputs, g))  # type: ignore[arg-type]


def _manual(t: dict[str, torch.Tensor | None], s: float, layout: str, xd: torch.Tensor | None = None) -> torch.Tensor:
    x, w, b, a, bb = t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"]
    assert x is not None and w is not None and a is not None and bb is not None
    w_oi = w if layout == "out_in" else w.t()
    y = x @ w_oi.t() + ((xd if xd is not None else x) @ a.t()) @ bb.t() * s
    return y + b if b is not None else y


# ---------------------------------------------------------------------------------------------------------------
# Reference vs hand-written formula and vs PEFT
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("bias", [True, False])
def test_reference_matches_formula(layout: str, bias: bool) -> None:
    t = _make(7, 24, 40, 4, bias=bias, layout=layout, lead=(3,))
    y = lora_linear_reference(**t, scaling=1.5, weight_layout=layout)  # type: ignore[arg-type]
    ym = _manual(t, 1.5, layout)
    torch.testing.assert_close(y, ym, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    for a, b in zip(_grads(y, t, g), _grads(ym, t, g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _peft_layer(t: dict[str, torch.Tensor | None], r: int, alpha: float, p: float, layout: str) -> torch.nn.Module:
    peft = pytest.importorskip("peft")
    from transformers.pytorch_utils import Conv1D

    w, b = t["weight"], t["bias"]
    assert w is not None
    if layout == "out_in":
        base: torch.nn.Module = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    else:
        assert b is not None, "transformers' Conv1D always has a bias"
        base = Conv1D(w.shape[1], w.shape[0])
    with torch.no_grad():
        base.weight.copy_(w)
        if b is not None:
            base.bias.copy_(b)
    holder = torch.nn.Sequential()
    holder.add_module("proj", base)
    cfg = peft.LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=p, target_modules=["proj"], fan_in_fan_out=layout == "in_out"
    )
    model = peft.get_peft_model(holder, cfg)
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(t["lora_a"])
        layer.lora_B["default"].weight.copy_(t["lora_b"])
    return layer


@pytest.mark.parametrize(
    ("layout", "bias", "p"),
    [
        ("out_in", True, 0.0),
        ("out_in", False, 0.0),
        ("out_in", True, 0.25),
        ("in_out", True, 0.0),
        ("in_out", True, 0.3),
    ],
)
def test_reference_equals_peft_bitwise(layout: str, bias: bool, p: float) -> None:
    r, alpha = 4, 8.0
    t = _make(9, 32, 48, r, bias=bias, layout=layout, lead=(2,))
    layer = _peft_layer(t, r, alpha, p, layout)
    layer.train()
    x = t["x"]
    assert x is not None
    torch.manual_seed(123)
    y_peft = layer(x)
    g = torch.randn_like(y_peft)
    gx_peft, ga_peft, gb_peft = torch.autograd.grad(
        y_peft, [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight], g
    )
    torch.manual_seed(123)
    y = lora_linear(**t, scaling=alpha / r, dropout_p=p, training=True, weight_layout=layout)  # type: ignore[arg-type]
    gx, ga, gb = _grads(y, t, g)
    for ours, theirs in ((y, y_peft), (gx, gx_peft), (ga, ga_peft), (gb, gb_peft)):
        assert torch.equal(ours, theirs), (ours - theirs).abs().max()


def test_reference_dropout_semantics() -> None:
    t = _make(16, 32, 32, 4)
    x = t["x"]
    assert x is not None
    # Inactive dropout draws nothing from the RNG, as PEFT's nn.Identity / eval-mode nn.Dropout.
    for p, training in ((0.0, True), (0.5, False)):
        torch.manual_seed(5)
        y = lora_linear_reference(**t, scaling=2.0, dropout_p=p, training=training)  # type: ignore[arg-type]
        after = torch.rand(1)
        torch.manual_seed(5)
        assert torch.equal(after, torch.rand(1))
        torch.testing.assert_close(y, _manual(t, 2.0, "out_in"))
    # Active dropout is exactly one F.dropout call on x.
    torch.manual_seed(5)
    y = lora_linear_reference(**t, scaling=2.0, dropout_p=0.5, training=True)  # type: ignore[arg-type]
    torch.manual_seed(5)
    xd = F.dropout(x, 0.5, training=True)
    torch.testing.assert_close(y, _manual(t, 2.0, "out_in", xd=xd), rtol=1e-5, atol=1e-5)


def test_reference_mixed_dtypes_follow_peft() -> None:
    # bf16 base with fp32 adapters: PEFT computes the adapter in fp32 and casts the sum back to bf16.
    t = _make(8, 32, 16, 4, dtype=torch.bfloat16)
    y = lora_linear_reference(**t, scaling=2.0)  # type: ignore[arg-type]
    assert y.dtype == torch.bfloat16
    x, w, b, a, bb = (t[k] for k in ("x", "weight", "bias", "lora_a", "lora_b"))
    assert x is not None and w is not None and a is not None and bb is not None
    expect = (F.linear(x, w, b) + F.linear(F.linear(x.float(), a), bb) * 2.0).to(torch.bfloat16)
    assert torch.equal(y, expect)
    # Under autocast, F.linear casts the adapters to the autocast dtype too.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y2 = lora_linear(**{**t, "x": x.float(), "weight": w.float()}, scaling=2.0)  # type: ignore[arg-type]
    assert y2.dtype == torch.bfloat16


def test_cpu_dispatch_uses_reference() -> None:
    t = _make(5, 16, 16, 2)
    assert not kernel_available(**t)  # type: ignore[arg-type]  # CPU: reference by default, interpreter or not
    y = lora_linear(**t, scaling=1.0, use_kernel=False)  # type: ignore[arg-type]
    torch.testing.assert_close(y, lora_linear_reference(**t, scaling=1.0))  # type: ignore[arg-type]
    assert not _took_fused_path(y)
    assert not _took_fused_path(lora_linear(**t, scaling=1.0))  # type: ignore[arg-type]
    assert _took_fused_path(lora_linear(**t, scaling=1.0, use_kernel=True))  # type: ignore[arg-type]


def test_uses_fused_decides_as_lora_linear_runs() -> None:
    t = _make(5, 24, 40, 3)  # no alignment or rank limit on the fused path: any shape
    args = (t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], 1.0)
    assert lora_linear_uses_fused(*args) is False  # type: ignore[arg-type]
    assert lora_linear_uses_fused(*args, use_kernel=True) is True  # type: ignore[arg-type]
    assert lora_linear_uses_fused(*args, use_kernel=False) is False  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dropout_p"):
        lora_linear_uses_fused(*args, dropout_p=1.0, use_kernel=False)  # type: ignore[arg-type]
    # the probe for fp32 products straight from cuBLAS: never on the CPU, and a pure function of device and dtype
    assert _addmm_writes_fp32(torch.device("cpu"), torch.bfloat16) is False


def test_use_kernel_true_unsupported_raises() -> None:
    x, w, a, b = torch.zeros(3, 16), torch.zeros(16, 16), torch.zeros(4, 16), torch.zeros(16, 4)
    trainable = torch.zeros(16, 16, requires_grad=True)
    cases = [
        ((x, trainable, None, a, b), "frozen"),  # the fused path returns no dW
        ((x, w.double(), None, a, b), "weight dtype"),
        ((torch.zeros(0, 16), w, None, a, b), "empty"),
        ((x.long(), w.long(), None, a, b), "floating-point"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=rf"use_kernel=True.*{match}"):
            lora_linear(*args, 1.0, use_kernel=True)  # type: ignore[misc]
    # By default a trainable base takes the reference, which gives it its gradient.
    y = lora_linear(x, trainable, None, a, b, 1.0)
    assert torch.autograd.grad(y.sum(), trainable)[0].shape == (16, 16)


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"lora_a": torch.zeros(4, 17)}, "lora_a"),
        ({"lora_a": torch.zeros(4)}, "lora_a"),
        ({"lora_b": torch.zeros(32, 3)}, "lora_b"),
        ({"lora_b": torch.zeros(31, 4)}, "lora_b"),
        ({"bias": torch.zeros(7)}, "bias"),
        ({"x": torch.zeros(3, 15)}, "in_features"),
        ({"weight": torch.zeros(32)}, "weight"),
        ({"weight_layout": "oi"}, "weight_layout"),
        ({"dropout_p": 1.0}, "dropout_p"),
        ({"dropout_p": -0.1}, "dropout_p"),
        ({"scaling": float("nan")}, "scaling"),
    ],
)
def test_bad_input_raises(change: dict[str, object], match: str) -> None:
    args: dict[str, object] = {
        "x": torch.zeros(3, 16),
        "weight": torch.zeros(32, 16),
        "bias": None,
        "lora_a": torch.zeros(4, 16),
        "lora_b": torch.zeros(32, 4),
        "scaling": 1.0,
    }
    args.update(change)
    with pytest.raises(ValueError, match=match):
        lora_linear(**args)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------
# Fused path (plain torch: runs on the CPU as is)
# ---------------------------------------------------------------------------------------------------------------


def _check_fused(
    m: int,
    in_f: int,
    out_f: int,
    r: int,
    layout: str,
    bias: bool,
    p: float,
    lead: tuple[int, ...] = (),
) -> None:
    """The fused path against the fp32 formula, given the same keep-mask."""
    s = 1.75
    t = _make(m, in_f, out_f, r, bias=bias, layout=layout, lead=lead)
    x = t["x"]
    assert x is not None
    torch.manual_seed(7)
    y = _fused(**t, scaling=s, dropout_p=p, training=True, weight_layout=layout)  # type: ignore[arg-type]
    xd = None
    if p > 0:
        # The fused path draws one bool keep-mask with bernoulli_ on the flattened x.
        torch.manual_seed(7)
        keep = torch.empty(x.reshape(-1, in_f).shape, dtype=torch.bool).bernoulli_(1.0 - p)
        xd = x * keep.view(x.shape) / (1.0 - p)
    ref = _manual(t, s, layout, xd=xd)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(y)
    for name, a, b in zip(("dx", "dA", "dB"), _grads(y, t, g), _grads(ref, t, g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda e, n=name: f"{n}: {e}")  # type: ignore[misc]


@pytest.mark.parametrize(
    ("m", "in_f", "out_f", "r"), [(1, 16, 16, 1), (33, 48, 16, 8), (7, 16, 48, 4), (5, 24, 40, 20), (9, 13, 7, 3)]
)
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_fused_matches_reference(m: int, in_f: int, out_f: int, r: int, layout: str, p: float) -> None:
    _check_fused(m, in_f, out_f, r, layout, bias=m != 1, p=p, lead=(2,))


def test_fused_only_adapters_need_grad() -> None:
    # x without grad (first layer): no dX, dA still needs u = dY B.
    t = _make(9, 16, 32, 4)
    x = t["x"]
    assert x is not None
    t["x"] = x.detach()
    y = lora_linear(**t, scaling=2.0, use_kernel=True)  # type: ignore[arg-type]
    ref = lora_linear_reference(**t, scaling=2.0)  # type: ignore[arg-type]
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [t["lora_a"], t["lora_b"]], g)  # type: ignore[list-item]
    exp = torch.autograd.grad(ref, [t["lora_a"], t["lora_b"]], g)  # type: ignore[list-item]
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_fused_half_precision_adapter_grads_keep_param_dtype() -> None:
    t = _make(17, 32, 16, 4, dtype=torch.float16)
    y = lora_linear(**t, scaling=2.0, use_kernel=True)  # type: ignore[arg-type]
    assert y.dtype == torch.float16
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [t["x"], t["lora_a"], t["lora_b"]], g)  # type: ignore[list-item]
    assert got[0].dtype == torch.float16
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.float32  # the adapters' own dtype
    t32 = {k: (v.detach().float().requires_grad_() if v is not None else None) for k, v in t.items()}
    ref = _manual(t32, 2.0, "out_in")
    exp = torch.autograd.grad(ref, [t32["x"], t32["lora_a"], t32["lora_b"]], g.float())  # type: ignore[list-item]
    assert _rel(y, ref) < 2e-3
    for a, b in zip(got, exp):
        assert _rel(a, b) < 2e-3


def test_function_apply_direct() -> None:
    t = _make(6, 16, 16, 2)
    x, w, a, b = t["x"], t["weight"], t["lora_a"], t["lora_b"]
    y = LoRALinearFunction.apply(x, w, None, a, b, 0.5, None, 0.0, "out_in")
    torch.testing.assert_close(y, lora_linear_reference(x, w, None, a, b, 0.5), rtol=1e-4, atol=1e-4)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------
# The fused path with the lowrank_reduce kernels, under the CPU interpreter
# ---------------------------------------------------------------------------------------------------------------

if not INTERPRET:

    @pytest.mark.skipif(sys.platform != "linux", reason="triton is Linux-only")
    def test_triton_interpreter_cases_in_subprocess(run_in_triton_interpreter: Callable[[str, float], None]) -> None:
        run_in_triton_interpreter(str(Path(__file__)), 600)

else:

    @pytest.mark.parametrize(
        ("m", "in_f", "out_f", "r", "layout", "p"),
        [(33, 48, 16, 8, "out_in", 0.0), (7, 16, 48, 20, "in_out", 0.3), (1, 16, 16, 1, "out_in", 0.0)],
    )
    def test_interp_fused_with_one_read_dy_products(
        m: int, in_f: int, out_f: int, r: int, layout: str, p: float
    ) -> None:
        # Under the interpreter the fused path takes u and dB from lowrank_reduce.dy_products, as on CUDA.
        _check_fused(m, in_f, out_f, r, layout, bias=True, p=p, lead=(2,))

    def test_interp_group_with_one_read_dy_products() -> None:
        c = _group_case([32, 16, 16], [4, 2, 4], [False, True, False], dtype=torch.float32)
        x, ws, bs, a_s, b_s = c["x"], c["weights"], c["biases"], c["lora_as"], c["lora_bs"]
        ys = lora_linear_group(x, ws, bs, a_s, b_s, [2.0, 0.5, 2.0])  # type: ignore[arg-type]
        refs = [lora_linear_reference(x, *args) for args in zip(ws, bs, a_s, b_s, [2.0, 0.5, 2.0])]  # type: ignore[call-overload]
        gs = [torch.randn_like(r) for r in refs]
        got = torch.autograd.grad(ys, [x, *a_s, *b_s], gs)  # type: ignore[misc]
        exp = torch.autograd.grad(refs, [x, *a_s, *b_s], gs)  # type: ignore[misc]
        for k, (a, b) in enumerate(zip(got, exp)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda e, k=k: f"input {k}: {e}")  # type: ignore[misc]

    @pytest.mark.parametrize(("ranks", "reduced"), [([4, 8], True), ([40, 40], False)])
    def test_interp_group_reduces_over_the_producer_only_within_the_kernel_rank_limit(
        ranks: list[int], reduced: bool
    ) -> None:
        # A recipe with a reduce: the group takes it for a summed rank <= lowrank_reduce.MAX_RANK, else it rebuilds
        # x and multiplies with cuBLAS (the kernel's tiles would spill or overflow shared memory on the GPU).
        from lit_accel.ops.lowrank_reduce import lowrank_reduce
        from lit_accel.ops.recompute import register_recompute, request_recompute

        consumer = _Consumer()
        request_recompute(consumer)
        c = _group_case([48, 48], ranks, [False, False], dtype=torch.float32)
        h = c["x"]
        reductions: list[int] = []

        def reduce(t: torch.Tensor, *, u: torch.Tensor, scale: float) -> torch.Tensor:
            reductions.append(1)
            return lowrank_reduce(u, "plain", (t.reshape(-1, t.shape[-1]) * 3.0,), scale, torch.float32)

        grads = {}
        for recompute in (False, True):
            x = h * 3.0  # type: ignore[operator]
            register_recompute(x, lambda t: t * 3.0, h, reduce=reduce)
            ys = lora_linear_group(x, c["weights"], c["biases"], c["lora_as"], c["lora_bs"], [1.5, 1.5],  # type: ignore[arg-type]
                                   recompute_input=recompute)  # fmt: skip
            grads[recompute] = torch.autograd.grad(sum(y.sum() for y in ys), [h, *c["lora_as"]])  # type: ignore[misc]
        assert len(reductions) == (1 if reduced else 0)
        for a, b in zip(grads[False], grads[True]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        del consumer


# ---------------------------------------------------------------------------------------------------------------
# GPU: real shapes, bf16
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(("in_f", "out_f"), [(2048, 2048), (2048, 5632), (5632, 2048)])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_gpu_fused_bf16_real_shapes(in_f: int, out_f: int, p: float) -> None:
    m, r, s = 8 * 2048, 16, 2.0
    t = _make(m, in_f, out_f, r, dtype=torch.bfloat16, device="cuda")
    assert kernel_available(**t)  # type: ignore[arg-type]
    torch.manual_seed(3)
    y = _fused(**t, scaling=s, dropout_p=p, training=True, weight_layout="out_in")  # type: ignore[arg-type]
    g = torch.randn_like(y)
    got = _grads(y, t, g)
    # Reference in fp32 on upcast inputs, with the same keep-mask the fused path drew.
    x, w, b, a, bb = (t[k] for k in ("x", "weight", "bias", "lora_a", "lora_b"))
    assert x is not None and w is not None and b is not None and a is not None and bb is not None
    x32 = x.detach().float().requires_grad_()
    a32, b32 = a.detach().clone().requires_grad_(), bb.detach().clone().requires_grad_()
    xd = x32
    if p > 0:
        torch.manual_seed(3)
        keep = torch.empty(x.shape, dtype=torch.bool, device="cuda").bernoulli_(1.0 - p)
        xd = x32 * keep / (1.0 - p)
    # torch's default keeps TF32 off for fp32 matmuls, so this is a true fp32 reference.
    ref = x32 @ w.float().t() + b.float() + (xd @ a32.t()) @ b32.t() * s
    exp = torch.autograd.grad(ref, [x32, a32, b32], g.float())
    assert _rel(y, ref) < 1e-2
    for name, got_g, exp_g in zip(("dx", "dA", "dB"), got, exp):
        assert _rel(got_g, exp_g) < 1e-2, name


@pytest.mark.gpu
def test_gpu_autocast_and_dispatch() -> None:
    t = _make(4096, 2048, 256, 16, device="cuda")  # fp32 params, fp32 x
    assert not kernel_available(**t)  # type: ignore[arg-type]  # fp32 without autocast: reference
    # Asked for, the fused path runs in fp32 too (torch keeps TF32 off for fp32 matmuls by default).
    y32 = lora_linear(**t, scaling=1.0, use_kernel=True)  # type: ignore[arg-type]
    assert y32.dtype == torch.float32
    assert _rel(y32, lora_linear_reference(**t, scaling=1.0)) < 1e-4  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="frozen"):
        lora_linear(**{**t, "weight": t["weight"].clone().requires_grad_()}, scaling=1.0, use_kernel=True)  # type: ignore[arg-type, union-attr]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert kernel_available(**t)  # type: ignore[arg-type]
        y = lora_linear(**t, scaling=1.0)  # type: ignore[arg-type]
        ref = lora_linear_reference(**t, scaling=1.0)  # type: ignore[arg-type]
    assert y.dtype == ref.dtype == torch.bfloat16
    assert _rel(y, ref) < 1e-2


# ---------------------------------------------------------------------------------------------------------------
# Linears sharing one input: lora_linear_group (cuBLAS calls; plain torch on the CPU)
# ---------------------------------------------------------------------------------------------------------------


def _group_case(
    outs: list[int], ranks: list[int], biases: list[bool], dtype: torch.dtype = torch.float64, device: str = "cpu"
) -> dict[str, object]:
    in_f = 24
    gen = torch.Generator(device=device).manual_seed(11)

    def rnd(*shape: int, grad: bool = False) -> torch.Tensor:
        t = torch.randn(*shape, generator=gen, device=device, dtype=dtype)
        return t.requires_grad_() if grad else t

    return {
        "x": rnd(2, 5, in_f, grad=True),
        "weights": [rnd(o, in_f) for o in outs],
        "biases": [rnd(o) if b else None for o, b in zip(outs, biases)],
        "lora_as": [rnd(r, in_f, grad=True) for r in ranks],
        "lora_bs": [rnd(o, r, grad=True) for o, r in zip(outs, ranks)],
    }


@pytest.mark.parametrize(
    ("outs", "ranks", "biases", "scalings", "used"),
    [
        ([32, 8, 8], [4, 4, 4], [False, False, False], [2.0, 2.0, 2.0], [0, 1, 2]),  # q/k/v-like, one scaling
        ([40, 40], [3, 5], [True, False], [0.5, 1.75], [0, 1]),  # gate/up-like, own ranks and scalings
        ([16, 8, 8], [2, 2, 2], [False, True, False], [1.0, 1.0, 1.0], [0, 2]),  # an output nobody uses
        ([16], [4], [True], [3.0], [0]),  # one linear
    ],
)
def test_group_matches_reference(
    outs: list[int], ranks: list[int], biases: list[bool], scalings: list[float], used: list[int]
) -> None:
    c = _group_case(outs, ranks, biases)
    x, ws, bs, a_s, b_s = c["x"], c["weights"], c["biases"], c["lora_as"], c["lora_bs"]
    ys = lora_linear_group(x, ws, bs, a_s, b_s, scalings)  # type: ignore[arg-type]
    refs = [lora_linear_reference(x, *args) for args in zip(ws, bs, a_s, b_s, scalings)]  # type: ignore[call-overload]
    assert len(ys) == len(outs)
    for y, ref in zip(ys, refs):
        assert y.shape == ref.shape and y.dtype == ref.dtype
        torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    gs = [torch.randn_like(refs[i]) for i in used]
    inputs = [x, *a_s, *b_s]  # type: ignore[misc]
    got = torch.autograd.grad([ys[i] for i in used], inputs, gs, allow_unused=True)
    exp = torch.autograd.grad([refs[i] for i in used], inputs, gs, allow_unused=True)
    for k, (a, b) in enumerate(zip(got, exp)):
        if b is None:
            assert a is None, f"input {k} of an unused output got a gradient"
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda e, k=k: f"input {k}: {e}")  # type: ignore[misc]


def test_group_low_precision_and_adapter_dtypes() -> None:
    """bf16 compute with fp32 adapters (autocast's case): bf16 outputs, fp32 adapter gradients, close to fp64."""
    c = _group_case([32, 8], [4, 4], [False, False])
    x64 = c["x"]
    xb = x64.detach().to(torch.bfloat16).requires_grad_()  # type: ignore[union-attr]
    wb = [w.to(torch.bfloat16) for w in c["weights"]]  # type: ignore[attr-defined]
    a32 = [a.detach().float().requires_grad_() for a in c["lora_as"]]  # type: ignore[attr-defined]
    b32 = [b.detach().float().requires_grad_() for b in c["lora_bs"]]  # type: ignore[attr-defined]
    ys = lora_linear_group(xb, wb, [None, None], a32, b32, [2.0, 2.0])
    assert all(y.dtype == torch.bfloat16 for y in ys)
    gs = [torch.randn_like(y) for y in ys]
    got = torch.autograd.grad(ys, [xb, *a32, *b32], gs)
    assert got[0].dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in got[1:])
    refs = [lora_linear_reference(x64, w, None, a, b, 2.0) for w, a, b in zip(c["weights"], c["lora_as"], c["lora_bs"])]  # type: ignore[arg-type, call-overload]
    exp = torch.autograd.grad(refs, [x64, *c["lora_as"], *c["lora_bs"]], [g.double() for g in gs])  # type: ignore[misc]
    for y, ref in zip(ys, refs):
        assert _rel(y, ref) < 2e-2
    for a, b in zip(got, exp):
        assert _rel(a, b) < 2e-2


def test_group_recomputes_input_from_its_producer() -> None:
    """With recompute_input the group saves the producer's inputs, reruns it once in backward, and equals saving x."""
    from lit_accel.ops.recompute import register_recompute, request_recompute

    consumer = _Consumer()
    request_recompute(consumer)
    c = _group_case([16, 8], [2, 3], [False, False])
    h = c["x"]
    runs = []

    def producer(t: torch.Tensor) -> torch.Tensor:
        runs.append(1)
        return t * 3.0

    grads = {}
    for recompute in (False, True):
        x = h * 3.0  # type: ignore[operator]
        register_recompute(x, producer, h)
        ys = lora_linear_group(x, c["weights"], c["biases"], c["lora_as"], c["lora_bs"], [1.5, 1.5],  # type: ignore[arg-type]
                               recompute_input=recompute)  # fmt: skip
        grads[recompute] = torch.autograd.grad(sum(y.sum() for y in ys), [h, *c["lora_as"]])  # type: ignore[misc]
    assert len(runs) == 1  # once for the whole group, in the recompute run's backward
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    del consumer


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"biases": [None]}, "one length"),
        ({"lora_bs": []}, "one length"),
        ({"lora_as": [torch.zeros(4, 23), torch.zeros(4, 24)]}, "lora_a must have shape"),
        ({"weights": [torch.zeros(8, 20), torch.zeros(8, 24)]}, "in_features"),
    ],
)
def test_group_bad_input_raises(change: dict[str, object], match: str) -> None:
    args: dict[str, object] = {
        "x": torch.zeros(3, 24),
        "weights": [torch.zeros(8, 24), torch.zeros(8, 24)],
        "biases": [None, None],
        "lora_as": [torch.zeros(4, 24), torch.zeros(4, 24)],
        "lora_bs": [torch.zeros(8, 4), torch.zeros(8, 4)],
        "scalings": [1.0, 1.0],
    }
    args.update(change)
    with pytest.raises(ValueError, match=match):
        lora_linear_group(**args)  # type: ignore[arg-type]


@pytest.mark.gpu
@pytest.mark.parametrize("r", [16, 48])  # 3 x 48 = 144 > lowrank_reduce.MAX_RANK: the cuBLAS fallbacks
def test_gpu_group_bf16_real_shapes(r: int) -> None:
    """q/k/v at llama-1b shapes, bf16 under autocast with fp32 adapters, against an fp32 reference."""
    m, in_f, s = 8 * 2048, 2048, 2.0
    gen = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(m, in_f, device="cuda", generator=gen, dtype=torch.bfloat16).requires_grad_()
    ws = [
        torch.randn(o, in_f, device="cuda", generator=gen, dtype=torch.bfloat16) / in_f**0.5 for o in (2048, 256, 256)
    ]
    a_s = [(torch.randn(r, in_f, device="cuda", generator=gen) / in_f**0.5).requires_grad_() for _ in ws]
    b_s = [torch.randn(w.shape[0], r, device="cuda", generator=gen).requires_grad_() for w in ws]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ys = lora_linear_group(x, ws, [None] * 3, a_s, b_s, [s] * 3)
    gs = [torch.randn_like(y) for y in ys]
    got = torch.autograd.grad(ys, [x, *a_s, *b_s], gs)
    x32 = x.detach().float().requires_grad_()
    refs = [x32 @ w.float().t() + (x32 @ a.t()) @ b.t() * s for w, a, b in zip(ws, a_s, b_s)]
    exp = torch.autograd.grad(refs, [x32, *a_s, *b_s], [g.float() for g in gs])
    for y, ref in zip(ys, refs):
        assert y.dtype == torch.bfloat16 and _rel(y, ref) < 1e-2
    for k, (a, b) in enumerate(zip(got, exp)):
        assert _rel(a, b) < 1e-2, k
