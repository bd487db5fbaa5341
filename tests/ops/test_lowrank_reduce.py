"""lowrank_reduce: s * u^T Y with Y rebuilt from its producer's inputs, against the product with Y written out.

The Triton kernel runs on CPU only under ``TRITON_INTERPRET=1`` (fp32, small shapes), in a child pytest; GPU tests
run bf16 at llama-1b shapes.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _producer_output(producer: str, inputs: tuple[torch.Tensor, ...], y_dtype: torch.dtype) -> torch.Tensor:
    """Y as the producer's forward kernel writes it (the recompute path of rms_norm / swiglu)."""
    rms_mod = importlib.import_module("lit_accel.ops.rms_norm")  # the package re-exports a function of that name
    swiglu_mod = importlib.import_module("lit_accel.ops.swiglu")

    if producer == "plain":
        return inputs[0]
    if producer == "rms_norm":
        x2, w, rstd = inputs
        return rms_mod._recompute_forward(1e-5, y_dtype, x2.shape, x2, w, rstd)
    return swiglu_mod._recompute_forward(*inputs)


def _inputs(producer: str, m: int, n: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device=device).manual_seed(m * 1000 + n)
    x = torch.randn(m, n, generator=gen, device=device, dtype=dtype)
    if producer == "plain":
        return (x,)
    if producer == "swiglu":
        return (x, torch.randn(m, n, generator=gen, device=device, dtype=dtype))
    rms_mod = importlib.import_module("lit_accel.ops.rms_norm")
    w = torch.rand(n, generator=gen, device=device) + 0.5
    _, rstd = rms_mod._forward(x, w, 1e-5, dtype, x.shape, store_rstd=True)
    assert rstd is not None
    return (x, w, rstd)


def _check(producer: str, m: int, n: int, r: int, dtype: torch.dtype, device: str, tol: float) -> None:
    from lit_accel.ops.lowrank_reduce import lowrank_reduce

    inputs = _inputs(producer, m, n, dtype, device)
    y_dtype = dtype
    y = _producer_output(producer, inputs, y_dtype)
    u = torch.randn(m, r, device=device, dtype=dtype)
    prod_round = torch.promote_types(inputs[0].dtype, inputs[1].dtype) if producer == "rms_norm" else None
    got = lowrank_reduce(u, producer, inputs, 1.75, y_dtype, prod_round=prod_round)
    exp = 1.75 * u.double().t() @ y.to(dtype).double()
    assert got.dtype == torch.float32 and got.shape == (r, n)
    err = ((got.double() - exp).norm() / exp.norm()).item()
    assert err < tol, f"{producer} m={m} n={n} r={r}: relative error {err:.3g}"


def test_takes_only_low_precision_cuda_or_the_interpreter_and_small_ranks() -> None:
    from lit_accel.ops.lowrank_reduce import MAX_RANK, takes

    cpu = torch.zeros(2, 2)
    assert takes(cpu, 16) == INTERPRET
    assert not takes(cpu, MAX_RANK + 1)
    if torch.cuda.is_available():
        assert takes(cpu.cuda().bfloat16(), 16) and not takes(cpu.cuda(), 16)  # fp32 would run in TF32


def test_unknown_producer_is_refused() -> None:
    pytest.importorskip("triton")
    from lit_accel.ops.lowrank_reduce import PRODUCERS, lowrank_reduce

    with pytest.raises(ValueError, match="producer must be one of"):
        lowrank_reduce(torch.zeros(4, 2), "gelu", (torch.zeros(4, 8),), 1.0, torch.float32)
    assert PRODUCERS == ("plain", "rms_norm", "swiglu")


if not INTERPRET:

    @pytest.mark.skipif(sys.platform != "linux", reason="triton is Linux-only")
    def test_triton_interpreter_cases_in_subprocess(run_in_triton_interpreter: Callable[[str, float], None]) -> None:
        run_in_triton_interpreter(str(Path(__file__)), 300)

else:

    @pytest.mark.parametrize("producer", ["plain", "rms_norm", "swiglu"])
    @pytest.mark.parametrize(("m", "n", "r"), [(1, 16, 1), (37, 40, 5), (100, 70, 33), (64, 48, 16)])
    def test_interp_matches_the_product_with_y_written_out(producer: str, m: int, n: int, r: int) -> None:
        _check(producer, m, n, r, torch.float32, "cpu", 1e-5)


def _check_dy(m: int, n: int, r: int, dtype: torch.dtype, device: str, tol: float) -> None:
    from lit_accel.ops.lowrank_reduce import dy_products

    gen = torch.Generator(device=device).manual_seed(m + n + r)
    dy = torch.randn(m, n, generator=gen, device=device, dtype=dtype)
    b = torch.randn(n, r, generator=gen, device=device, dtype=dtype)
    t_wide = torch.randn(m, r + 3, generator=gen, device=device, dtype=dtype)
    t = t_wide[:, 1 : 1 + r]  # a column slice of a group's rank projection: row stride r + 3
    u, db = dy_products(dy, b, t, 0.75)
    assert u.dtype == dtype and u.shape == (m, r) and db.dtype == torch.float32 and db.shape == (n, r)
    exp_u = dy.double() @ b.double()
    exp_db = 0.75 * dy.double().t() @ t.double()
    for name, got, exp in (("u", u, exp_u), ("dB", db, exp_db)):
        err = ((got.double() - exp).norm() / exp.norm()).item()
        assert err < tol, f"{name} m={m} n={n} r={r}: relative error {err:.3g}"


if INTERPRET:

    @pytest.mark.parametrize(("m", "n", "r"), [(1, 16, 1), (37, 40, 5), (100, 70, 33), (64, 48, 16)])
    def test_interp_dy_products(m: int, n: int, r: int) -> None:
        _check_dy(m, n, r, torch.float32, "cpu", 1e-5)

    def test_interp_no_rows() -> None:
        from lit_accel.ops.lowrank_reduce import dy_products, lowrank_reduce

        u, db = dy_products(torch.zeros(0, 24), torch.randn(24, 4), torch.zeros(0, 4), 1.0)
        assert u.shape == (0, 4) and db.shape == (24, 4) and not db.any()
        g = lowrank_reduce(torch.zeros(0, 4), "plain", (torch.zeros(0, 24),), 1.0, torch.float32)
        assert g.shape == (4, 24) and not g.any()


@pytest.mark.gpu
@pytest.mark.parametrize(("n", "r"), [(2048, 16), (5632, 16), (256, 16), (2048, 20)])
def test_gpu_dy_products_bf16_llama_1b_shapes(n: int, r: int) -> None:
    _check_dy(8 * 2048, n, r, torch.bfloat16, "cuda", 1e-2)  # u is rounded to bf16 once, like cuBLAS's


@pytest.mark.gpu
@pytest.mark.parametrize("producer", ["plain", "rms_norm", "swiglu"])
@pytest.mark.parametrize(("n", "r"), [(2048, 48), (5632, 16), (2048, 32), (256, 16)])
def test_gpu_bf16_llama_1b_shapes(producer: str, n: int, r: int) -> None:
    # Y's bits are rebuilt exactly; only the fp32 summation order differs from the matmul of the written-out Y.
    _check(producer, 8 * 2048, n, r, torch.bfloat16, "cuda", 1e-4)
