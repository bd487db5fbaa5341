"""2:4 masks: validity, optimality against brute force over the 90 patterns, tie determinism, dtypes; the
Triton kernel against the reference under the CPU interpreter (in a child pytest, as tests/kernels does)."""

from __future__ import annotations

import functools
import itertools
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lit_accel.ops.sparse24 import transposable_24_mask, transposable_24_mask_triton
from lit_accel.sparsity.functional import (
    check_24_shape,
    flip_rate,
    rowwise_24_mask,
    transposable_24_mask_reference,
    transposable_patterns,
)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
ROOT = Path(__file__).resolve().parents[2]


def _assert_transposable(m: torch.Tensor) -> None:
    r, c = m.shape
    b = m.reshape(r // 4, 4, c // 4, 4).int()
    assert (b.sum(1) == 2).all(), "a column of a 4x4 block does not keep exactly 2"
    assert (b.sum(3) == 2).all(), "a row of a 4x4 block does not keep exactly 2"


@functools.cache
def _brute_force_patterns() -> tuple[torch.Tensor, ...]:
    """Every 4x4 0/1 matrix (all 65536, independently of the library's enumeration) with row and column sums 2."""
    bits = torch.tensor(list(itertools.product((0, 1), repeat=16)), dtype=torch.float64).reshape(-1, 4, 4)
    ok = (bits.sum(1) == 2).all(1) & (bits.sum(2) == 2).all(1)
    return tuple(bits[ok])


def _brute_force_best(w: torch.Tensor) -> torch.Tensor:
    """Per 4x4 block the largest kept sum of |w| over every valid pattern, block by block."""
    a = w.abs().double()
    r, c = a.shape
    best = torch.empty(r // 4, c // 4, dtype=torch.float64)
    valid = _brute_force_patterns()
    assert len(valid) == 90
    for i in range(r // 4):
        for j in range(c // 4):
            blk = a[4 * i : 4 * i + 4, 4 * j : 4 * j + 4]
            best[i, j] = max(float((blk * p).sum()) for p in valid)
    return best


def _kept(w: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    r, c = w.shape
    return (w.abs().double() * m).reshape(r // 4, 4, c // 4, 4).sum((1, 3))


def test_patterns_are_the_90_transposable_ones() -> None:
    p = transposable_patterns()
    assert p.shape == (90, 4, 4)
    assert len({tuple(x.flatten().tolist()) for x in p}) == 90
    assert (p.sum(1) == 2).all() and (p.sum(2) == 2).all()


@pytest.mark.parametrize("shape", [(4, 4), (8, 12), (12, 8)])
@pytest.mark.parametrize("seed", [0, 1])
def test_transposable_is_optimal_vs_brute_force(shape: tuple[int, int], seed: int) -> None:
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    m = transposable_24_mask_reference(w)
    assert m.dtype == torch.bool and m.shape == w.shape
    _assert_transposable(m)
    torch.testing.assert_close(_kept(w, m), _brute_force_best(w), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_transposable_valid_and_dtype_independent(dtype: torch.dtype) -> None:
    w = torch.randn(64, 96).to(dtype)
    m = transposable_24_mask_reference(w)
    _assert_transposable(m)
    # The mask is a function of |w| as float32: the same values in fp32 give the same mask.
    assert torch.equal(m, transposable_24_mask_reference(w.float()))
    assert transposable_24_mask(w).equal(m)  # CPU dispatch: the reference


def test_ties_are_deterministic() -> None:
    # All-equal blocks: every pattern ties; the first pattern of the fixed enumeration wins, every time.
    w = torch.ones(8, 8)
    m = transposable_24_mask_reference(w)
    first = transposable_patterns()[0].bool()
    assert torch.equal(m, first.repeat(2, 2))
    assert torch.equal(m, transposable_24_mask_reference(-w))
    assert torch.equal(rowwise_24_mask(torch.ones(2, 8)), torch.tensor([[1, 1, 0, 0] * 2] * 2).bool())


def test_rowwise_keeps_two_largest_per_group() -> None:
    w = torch.randn(16, 32, dtype=torch.bfloat16)
    m = rowwise_24_mask(w)
    g = m.reshape(16, 8, 4)
    assert (g.sum(-1) == 2).all()
    a = w.float().abs().reshape(16, 8, 4)
    kept_min = a.masked_fill(~g, float("inf")).min(-1).values
    dropped_max = a.masked_fill(g, float("-inf")).max(-1).values
    assert (kept_min >= dropped_max).all()
    assert rowwise_24_mask(torch.randn(3, 4)).shape == (3, 4)  # rows need not be a multiple of 4


def test_transposable_never_keeps_less_than_rowwise_constraint_allows() -> None:
    # The row-wise mask is the unconstrained optimum per row group; transposable keeps at most that much.
    w = torch.randn(32, 32)
    assert float(_kept(w, transposable_24_mask_reference(w)).sum()) <= float(_kept(w, rowwise_24_mask(w)).sum())


@pytest.mark.parametrize("shape", [(6, 8), (8, 6), (8,), (2, 4, 4)])
def test_bad_shapes_raise_naming_the_shape(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=str(shape).replace("(", r"\(").replace(")", r"\)")):
        transposable_24_mask_reference(torch.zeros(*shape))
    with pytest.raises(ValueError, match="shape"):
        transposable_24_mask(torch.zeros(*shape))


def test_rowwise_bad_shape_and_check_24_shape() -> None:
    with pytest.raises(ValueError, match=r"\(4, 6\)"):
        rowwise_24_mask(torch.zeros(4, 6))
    assert check_24_shape(torch.zeros(6, 8), transposable=False) is None
    assert check_24_shape(torch.zeros(8, 8), transposable=True) is None


def test_flip_rate() -> None:
    a = torch.tensor([[True, False, True, False]])
    assert flip_rate(a, a) == 0.0
    assert flip_rate(a, ~a) == 1.0
    assert flip_rate(a, torch.tensor([[True, True, False, False]])) == 0.5
    assert flip_rate(torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.bool)) == 0.0
    with pytest.raises(ValueError, match="shape"):
        flip_rate(a, a.t())


def test_use_kernel_true_without_interpreter_raises() -> None:
    if INTERPRET:
        pytest.skip("the kernel can run here")
    with pytest.raises(ValueError, match="use_kernel=True"):
        transposable_24_mask(torch.randn(8, 8), use_kernel=True)


if not INTERPRET:

    @pytest.mark.skipif(sys.platform != "linux", reason="triton is Linux-only")
    def test_triton_interpreter_cases_in_subprocess(run_in_triton_interpreter: Callable[[str, float], None]) -> None:
        run_in_triton_interpreter(str(Path(__file__)), 300)

else:

    @pytest.mark.parametrize("shape", [(4, 4), (8, 12), (36, 20), (64, 136)])
    def test_interp_kernel_matches_reference(shape: tuple[int, int]) -> None:
        w = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
        got = transposable_24_mask(w, use_kernel=True)
        exp = transposable_24_mask_reference(w)
        _assert_transposable(got)
        # Equal kept magnitude per block; the masks themselves are equal unless two patterns tie within rounding.
        torch.testing.assert_close(_kept(w, got), _kept(w, exp), rtol=1e-6, atol=1e-6)
        assert (got == exp).float().mean() > 0.99

    def test_interp_kernel_ties_and_strides() -> None:
        w = torch.ones(8, 8)
        assert torch.equal(transposable_24_mask_triton(w), transposable_24_mask_reference(w))
        wt = torch.randn(12, 8).t()  # non-contiguous
        torch.testing.assert_close(
            _kept(wt, transposable_24_mask_triton(wt)),
            _kept(wt, transposable_24_mask_reference(wt)),
            rtol=1e-6,
            atol=1e-6,
        )
