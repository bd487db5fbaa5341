"""cuSPARSELt plans kept across calls (lit_accel.ops.cusparselt): off and explained on CPU; on the GPU, products
bit-equal to torch._cslt_sparse_mm for the forward and input-gradient layouts, and a SparseLinear through them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from lit_accel.ops import cusparselt
from lit_accel.ops.sparse24 import transposable_24_mask


@pytest.fixture
def plan_cache() -> Iterator[None]:
    before = dict(cusparselt._state)
    cusparselt.set_plan_cache(True)
    yield
    cusparselt._state.clear()  # keys a test added (a cached "unavailable" reason) must not outlive it
    cusparselt._state.update(before)


def test_env_switch_values() -> None:
    assert cusparselt._enabled_by(None) and cusparselt._enabled_by("") and cusparselt._enabled_by("1")
    assert not any(cusparselt._enabled_by(v) for v in ("0", "false", "OFF", " no "))


def test_set_plan_cache_validates_and_cpu_explains_why_it_is_off(plan_cache: None) -> None:
    with pytest.raises(ValueError, match="enabled must be a bool"):
        cusparselt.set_plan_cache("yes")  # type: ignore[arg-type]
    if torch.cuda.is_available():
        pytest.skip("checks the CPU behaviour")
    assert cusparselt.plan_cache_unavailable_reason() == "CUDA is not available"
    assert not cusparselt.plan_cache_enabled()  # enabled, but nothing to run it on


def test_binding_refuses_releases_whose_enums_differ(plan_cache: None, monkeypatch: pytest.MonkeyPatch) -> None:
    # CUSPARSE_COMPUTE_32F is 2 from cuSPARSELt 0.6 on (32I 0, 16F 1, 32F 2); older releases are refused rather than
    # guessed: a plan with the wrong compute type can fault the CUDA context.
    assert cusparselt._COMPUTE_32F == 2
    assert (cusparselt._ROW, cusparselt._COL) == (2, 1)  # cusparse.h's cusparseOrder_t
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cusparselt, "version", lambda: 502)
    cusparselt._state.pop("unavailable", None)
    reason = cusparselt.plan_cache_unavailable_reason()
    assert reason is not None and "502 is older than 0.6" in reason
    assert not cusparselt.plan_cache_enabled()
    cusparselt._state.pop("unavailable", None)  # found again, unpatched, by the next test


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("m", "k", "n"), [(512, 256, 128), (5632, 2048, 64), (5632, 2048, 1024), (2048, 5632, 1024), (2048, 2048, 16)]
)
def test_gpu_cached_plan_equals_torch(plan_cache: None, m: int, k: int, n: int) -> None:
    dtype = torch.bfloat16  # the only dtype bound (fp16 faulted or hung in cuSPARSELt 0.8 on Hopper)
    from lit_accel.ops.sparse24_gemm import select_alg

    assert cusparselt.plan_cache_enabled(), cusparselt.plan_cache_unavailable_reason()
    w = torch.randn(m, k, device="cuda")
    packed = torch._cslt_compress((w * transposable_24_mask(w)).to(dtype))
    # algorithm 0 and the one the layers would use (select_alg times them all), each with its own plan
    alg_ids = sorted({0, select_alg(packed, torch.randn(n, k, device="cuda", dtype=dtype))})
    cache = cusparselt.SparsePlanCache("test")
    for alg_id in alg_ids:
        for _ in range(3):  # the first call builds and checks the plan, the next ones reuse it
            rows = torch.randn(n, k, device="cuda", dtype=dtype)
            got = cache.matmul(packed, rows, m, alg_id=alg_id)
            ref = torch._cslt_sparse_mm(packed, rows.t(), transpose_result=True, alg_id=alg_id)
            assert torch.equal(got, ref), alg_id
    torch.cuda.synchronize()
    assert cusparselt.plan_cache_enabled(), cusparselt._state["disabled_reason"]
    assert len(cache.plans) == len(alg_ids)


@pytest.mark.gpu
def test_gpu_sparse_linear_through_cached_plans(plan_cache: None) -> None:
    from lit_accel.sparsity import SparseLinear

    torch.manual_seed(0)
    layer = SparseLinear(256, 512, bias=False).cuda()
    mask = transposable_24_mask(layer.weight.detach())
    layer.set_mask(mask)
    layer.set_kernel("cusparselt")
    x = torch.randn(64, 256, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    y.backward(torch.ones_like(y))
    assert cusparselt.plan_cache_enabled(), cusparselt._state["disabled_reason"]
    wm = (layer.weight.detach() * mask).bfloat16().double()
    ref = x.detach().bfloat16().double() @ wm.t()
    assert float((y.double() - ref).norm() / ref.norm()) < 1e-2
    assert x.grad is not None
    ref_g = torch.ones(64, 512, dtype=torch.float64, device="cuda") @ wm
    assert float((x.grad.double() - ref_g).norm() / ref_g.norm()) < 1e-2


def test_loaded_version_in_torchs_form(monkeypatch: pytest.MonkeyPatch) -> None:
    # cusparseLtGetProperty gives major, minor, patch separately; 0.8.0 must read 800 like torch's version(), not 8
    # (that first form turned the cache off on the GPU: "older than 0.6").
    import ctypes

    values = {0: 0, 1: 8, 2: 0}

    class Lib:
        @staticmethod
        def cusparseLtGetProperty(prop: int, out: Any) -> int:
            ctypes.cast(out, ctypes.POINTER(ctypes.c_int))[0] = values[prop]
            return 0

    monkeypatch.setattr(cusparselt, "_load", lambda: Lib())
    assert cusparselt._loaded_version() == 800
    values.update({1: 6, 2: 2})
    assert cusparselt._loaded_version() == 602 >= cusparselt._MIN_VERSION
