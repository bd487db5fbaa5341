"""cuSPARSELt plans kept across calls (lit_accel.kernels.cusparselt): off and explained on CPU; on the GPU, products
bit-equal to torch._cslt_sparse_mm for the forward and input-gradient layouts, and a SparseLinear through them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from lit_accel.kernels import cusparselt
from lit_accel.kernels.sparse24 import transposable_24_mask


@pytest.fixture
def plan_cache() -> Iterator[None]:
    before = dict(cusparselt._state)
    cusparselt.set_plan_cache(True)
    yield
    cusparselt._state.update(before)


def test_set_plan_cache_validates_and_cpu_explains_why_it_is_off(plan_cache: None) -> None:
    with pytest.raises(ValueError, match="enabled must be a bool"):
        cusparselt.set_plan_cache("yes")  # type: ignore[arg-type]
    if torch.cuda.is_available():
        pytest.skip("checks the CPU behaviour")
    assert cusparselt.plan_cache_unavailable_reason() == "CUDA is not available"
    assert not cusparselt.plan_cache_enabled()  # enabled, but nothing to run it on


def test_compute_type_candidates_start_with_the_current_release_value() -> None:
    # CUSPARSE_COMPUTE_32F is 2 in cuSPARSELt 0.6-0.7; the other positions are tried after it, each once.
    assert cusparselt._COMPUTE_CANDIDATES[0] == 2
    assert sorted(cusparselt._COMPUTE_CANDIDATES) == [0, 1, 2, 3]
    assert (cusparselt._ROW, cusparselt._COL) == (2, 1)  # cusparse.h's cusparseOrder_t


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("m", "k", "n"), [(512, 256, 128), (5632, 2048, 1024), (2048, 5632, 1024)])
def test_gpu_cached_plan_equals_torch(plan_cache: None, dtype: torch.dtype, m: int, k: int, n: int) -> None:
    assert cusparselt.plan_cache_enabled(), cusparselt.plan_cache_unavailable_reason()
    w = torch.randn(m, k, device="cuda")
    packed = torch._cslt_compress((w * transposable_24_mask(w)).to(dtype))
    cache = cusparselt.SparsePlanCache("test")
    for _ in range(3):  # the first call builds and checks the plan, the next ones reuse it
        rows = torch.randn(n, k, device="cuda", dtype=dtype)
        got = cache.matmul(packed, rows, m, alg_id=0)
        assert torch.equal(got, torch._cslt_sparse_mm(packed, rows.t(), transpose_result=True, alg_id=0))
    assert cusparselt.plan_cache_enabled(), cusparselt._state["disabled_reason"]
    assert len(cache.plans) == 1 and cusparselt._state["compute"] is not None


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
