"""The cuSPARSELt path of SparseLinear: the learned packed index (against stand-in compressors on CPU), the gather
(PyTorch and Triton under the interpreter), fallbacks and bad input on CPU, the refresh trigger; on a GPU
(``gpu`` marker): bit-equality with fresh compression, gradients against the masked dense reference, staleness
after optimizer steps, and the callback in a bf16 Trainer."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from _helpers import quiet_trainer

from lit_accel.ops import sparse24_gemm as sg
from lit_accel.ops.sparse24 import transposable_24_mask
from lit_accel.sparsity import SemiStructuredSparsity, SparseLinear
from lit_accel.sparsity.callback import _tokens_in
from lit_accel.sparsity.functional import masked_linear, transposable_24_mask_reference

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
GPU = torch.cuda.is_available()


def _fake_compress(perm_seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A stand-in for ``torch._cslt_compress``: kept values (row-major) in a fixed scrambled order, then metadata
    (the kept column within each group of 4, as values), like cuSPARSELt's one-buffer layout."""

    def compress(a: torch.Tensor) -> torch.Tensor:
        m, k = a.shape
        kept = a != 0
        assert bool((kept.reshape(m, k // 4, 4).sum(-1) == 2).all())
        values = a[kept]
        perm = torch.randperm(values.numel(), generator=torch.Generator().manual_seed(perm_seed))
        meta = kept.reshape(-1, 4).float().argmax(-1).to(a.dtype)
        return torch.cat([values[perm], meta[: m * k // 16]]).reshape(m, -1)

    return compress


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(16, 32), (64, 48), (80, 272)])
def test_learned_index_reproduces_the_compressor(dtype: torch.dtype, shape: tuple[int, int]) -> None:
    compress = _fake_compress(1)
    w = torch.randn(*shape)
    mask = transposable_24_mask_reference(w)
    index = sg.learn_packed_index(mask, dtype, compress)
    assert index.dtype == torch.int32 and index.numel() == mask.numel() // 2
    fresh = compress((w * mask).to(dtype)).reshape(-1)
    packed = compress(mask.to(dtype)).reshape(-1).clone()  # metadata of the mask, values to be overwritten
    sg.gather_values_(packed[: index.numel()], w, index)
    assert torch.equal(packed.view(torch.int16), fresh.view(torch.int16))


def test_learned_index_past_two_digits() -> None:
    # 320 x 256 = 81920 positions > 256**2: three probe digits
    compress = _fake_compress(2)
    w = torch.randn(320, 256)
    mask = transposable_24_mask_reference(w)
    index = sg.learn_packed_index(mask, torch.bfloat16, compress)
    assert torch.equal(mask.reshape(-1)[index.long()], torch.ones(index.numel(), dtype=torch.bool))
    fresh = compress((w * mask).bfloat16()).reshape(-1)[: index.numel()]
    assert torch.equal(w.reshape(-1)[index.long()].bfloat16(), fresh)


def test_learned_index_refuses_a_buffer_without_the_values() -> None:
    def scrambling(a: torch.Tensor) -> torch.Tensor:
        return torch.full((a.shape[0], a.shape[1] * 9 // 16), 7.0, dtype=a.dtype)

    mask = transposable_24_mask_reference(torch.randn(16, 16))
    with pytest.raises(RuntimeError, match="one to one"):
        sg.learn_packed_index(mask, torch.bfloat16, scrambling)

    def out_of_range(a: torch.Tensor) -> torch.Tensor:
        return torch.full((a.shape[0], a.shape[1] * 9 // 16), 300.0, dtype=a.dtype)

    with pytest.raises(RuntimeError, match="digit"):
        sg.learn_packed_index(mask, torch.bfloat16, out_of_range)


def test_gather_reference_and_bad_input() -> None:
    w = torch.randn(8, 12)
    idx = torch.tensor([5, 0, 95, 17], dtype=torch.int32)
    out = torch.empty(4, dtype=torch.bfloat16)
    sg.gather_values_(out, w, idx, use_kernel=False)
    assert torch.equal(out, w.reshape(-1)[idx.long()].bfloat16())
    with pytest.raises(ValueError, match="contiguous 1-D"):
        sg.gather_values_(torch.empty(3), w, idx)
    with pytest.raises(ValueError, match="contiguous weight"):
        sg.gather_values_(out, w.t(), idx)
    if not INTERPRET:
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            sg.gather_values_(out, w, idx, use_kernel=True)


@pytest.mark.skipif(not INTERPRET, reason="runs in the child pytest under TRITON_INTERPRET=1")
@pytest.mark.parametrize("src_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 1000, 2500])
def test_interp_gather_kernel_matches_reference(src_dtype: torch.dtype, n: int) -> None:
    w = torch.randn(40, 100).to(src_dtype)
    idx = torch.randperm(w.numel())[:n].to(torch.int32)
    got = torch.full((n,), float("nan"), dtype=torch.bfloat16)
    sg.gather_values_(got, w, idx, use_kernel=True)
    want = torch.empty(n, dtype=torch.bfloat16)
    sg.gather_values_reference(want, w, idx)
    if src_dtype == torch.bfloat16:
        assert torch.equal(got, want)
    else:
        # The interpreter's fp32 -> bf16 cast truncates; on the GPU the kernel rounds to nearest even, as torch does
        # (bit-equality there is checked against torch._cslt_compress by the gpu tests).
        assert bool(((got.float() - want.float()).abs() <= want.float().abs() * 2**-7).all())


@pytest.mark.skipif(INTERPRET, reason="the parent run starts the interpreter child")
def test_gather_kernel_under_interpreter(run_in_triton_interpreter: Callable[[str, float], None]) -> None:
    run_in_triton_interpreter(__file__, 600)


def test_shape_and_device_checks() -> None:
    assert sg.check_gemm_shape(2048, 5632) is None
    assert "multiples of 16" in str(sg.check_gemm_shape(2048, 40))
    assert "multiples of 16" in str(sg.check_gemm_shape(8, 64))
    assert "cpu" in str(sg.cusparselt_unsupported_reason("cpu"))
    mask = transposable_24_mask_reference(torch.randn(16, 16))
    with pytest.raises(ValueError, match="cpu"):
        sg.CusparseltWeight(mask, torch.bfloat16, name="l0")
    with pytest.raises(ValueError, match="multiples of 16"):
        sg.CusparseltWeight(transposable_24_mask_reference(torch.randn(8, 16)), torch.bfloat16, name="l1")


def test_sparse_linear_kernel_setting_and_cpu_fallback() -> None:
    layer = SparseLinear(32, 16)
    with pytest.raises(ValueError, match="kernel='fast'"):
        layer.set_kernel("fast")
    m = transposable_24_mask_reference(layer.weight)
    layer.set_mask(m)
    x = torch.randn(3, 32, requires_grad=True)
    want = masked_linear(x, layer.weight, layer.bias, m)
    layer.set_kernel("cusparselt")
    layer.sparse_name = "blocks.0.mlp"
    with pytest.warns(UserWarning, match=r"'blocks.0.mlp'.*cpu.*masked dense path"):
        got = layer(x)
    assert torch.equal(got, want)  # identical numerics on CPU
    got.sum().backward()
    assert layer.weight.grad is not None and x.grad is not None
    assert "kernel=cusparselt" in repr(layer)
    assert list(layer.state_dict()) == ["weight", "bias"]


def test_optimizer_step_marks_packed_operands_stale() -> None:
    # fused AdamW does not bump the parameter's _version: the global step hook must advance the refresh epoch
    sg._ensure_step_hook()
    p = torch.nn.Parameter(torch.randn(4, 4))
    for opt in (torch.optim.AdamW([p], fused=True), torch.optim.SGD([p], lr=0.1)):
        p.grad = torch.randn(4, 4)
        before = sg._EPOCH[0]
        opt.step()
        assert sg._EPOCH[0] > before
    before = sg._EPOCH[0]
    sg.mark_weights_updated()
    assert sg._EPOCH[0] == before + 1


def test_callback_kernel_settings_validated() -> None:
    with pytest.raises(ValueError, match="kernel='cublas'"):
        SemiStructuredSparsity(kernel="cublas")
    with pytest.raises(ValueError, match="min_speedup"):
        SemiStructuredSparsity(min_speedup=0)
    with pytest.raises(ValueError, match="benchmark_tokens"):
        SemiStructuredSparsity(benchmark_tokens=0)
    assert SemiStructuredSparsity().settings.kernel == "auto"  # masked wherever cuSPARSELt cannot run (CPU, fp32)


def test_tokens_in_batch() -> None:
    ids = torch.zeros(4, 32, dtype=torch.long)
    assert _tokens_in({"input_ids": ids}) == 128
    assert _tokens_in((ids, ids)) == 128
    assert _tokens_in({"x": torch.zeros(4, 3)}) is None
    assert _tokens_in(None) is None


def _tiny_fit(accelerator: str, precision: str, callback: SemiStructuredSparsity, steps: int = 3) -> Any:
    from lit_accel.models import CausalLM

    torch.manual_seed(0)
    module = CausalLM("llama-tiny", learning_rate=1e-2, warmup_steps=0)
    data = torch.randint(0, 4096, (8, 32), generator=torch.Generator().manual_seed(0))
    loader: Any = torch.utils.data.DataLoader([{"input_ids": x} for x in data], batch_size=4)  # type: ignore[arg-type]
    trainer = quiet_trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,  # type: ignore[arg-type]
        max_steps=steps,
        callbacks=[callback],
    )
    trainer.fit(module, train_dataloaders=loader)
    return module


def test_callback_cusparselt_on_cpu_warns_and_runs_masked() -> None:
    cb = SemiStructuredSparsity(kernel="cusparselt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _tiny_fit("cpu", "32-true", cb, steps=2)
    assert cb.kernels and set(cb.kernels.values()) == {"masked"}
    assert all("cpu" in r for r in cb.kernel_reasons.values())
    text = " ".join(str(c.message) for c in caught)
    assert "model.layers.0.mlp.down_proj" in text and "masked dense path" in text


# ------------------------------------------------------------------------------------------------------ GPU


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(64, 128), (256, 512), (5632, 2048)])
def test_gpu_refresh_bit_equal_to_fresh_compression(shape: tuple[int, int]) -> None:
    dtype = torch.bfloat16
    w = torch.randn(*shape, device="cuda")
    op = sg.CusparseltWeight(transposable_24_mask(w), dtype, name="t")
    op.refresh(w)
    assert op.mode == "gather", op.fallback_reason
    for _ in range(2):
        result = op.verify(w)
        assert result.ok, result  # products bit-equal; buffer bit-equality is reported by the probe
        w.copy_(torch.randn_like(w))
        assert op.refresh(w)
    assert not op.refresh(w)  # same version, same epoch: nothing to do


@pytest.mark.gpu
@pytest.mark.parametrize("lead,bias", [((256,), False), ((3, 13), True)])
def test_gpu_sparse_linear_matches_masked_reference(lead: tuple[int, ...], bias: bool) -> None:
    torch.manual_seed(0)
    layer = SparseLinear(256, 512, bias=bias).cuda()
    mask = transposable_24_mask(layer.weight.detach())
    layer.set_mask(mask)
    layer.set_kernel("cusparselt")
    x = torch.randn(*lead, 256, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == (*lead, 512)
    gy = torch.randn_like(y)
    y.backward(gy)
    wm = (layer.weight.detach() * mask).bfloat16().double()
    xb = x.detach().bfloat16().double()
    ref_y = xb @ wm.t() + (layer.bias.detach().bfloat16().double() if bias else 0)
    assert _rel(y, ref_y) < 1e-2
    assert x.grad is not None and _rel(x.grad, gy.double() @ wm) < 1e-2
    g2, x2 = gy.double().reshape(-1, 512), xb.reshape(-1, 256)
    assert layer.weight.grad is not None and layer.weight.grad.dtype == torch.float32
    assert _rel(layer.weight.grad, g2.t() @ x2) < 1e-2  # dense: pruned weights get gradient too
    assert layer.weight.grad[~mask].abs().sum() > 0
    if bias:
        assert layer.bias.grad is not None and _rel(layer.bias.grad, g2.sum(0)) < 1e-2


@pytest.mark.gpu
def test_gpu_refresh_after_fused_adamw_step() -> None:
    torch.manual_seed(0)
    layer = SparseLinear(128, 256, bias=False).cuda()
    mask = transposable_24_mask(layer.weight.detach())
    layer.set_mask(mask)
    layer.set_kernel("cusparselt")
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1, fused=True)
    x = torch.randn(64, 128, device="cuda")
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x)
        ref = x.bfloat16().double() @ (layer.weight.detach() * mask).bfloat16().double().t()
        assert _rel(y, ref) < 1e-2  # the packed operands follow the weights the optimizer wrote
        y.float().square().mean().backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.gpu
def test_gpu_backward_after_refresh_raises() -> None:
    layer = SparseLinear(128, 128, bias=False).cuda()
    layer.set_mask(transposable_24_mask(layer.weight.detach()))
    layer.set_kernel("cusparselt")
    x = torch.randn(16, 128, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    sg.mark_weights_updated()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        layer(x)  # refreshes the packed operands under the first forward's backward
    with pytest.raises(RuntimeError, match="modified in place"):
        y.sum().backward()


@pytest.mark.gpu
def test_gpu_fp32_falls_back_with_warning() -> None:
    layer = SparseLinear(64, 32).cuda()
    layer.set_mask(transposable_24_mask(layer.weight.detach()))
    layer.set_kernel("cusparselt")
    layer.sparse_name = "mlp.fp32"
    x = torch.randn(4, 64, device="cuda")
    with pytest.warns(UserWarning, match=r"'mlp.fp32'.*float32.*masked dense path"):
        y = layer(x)
    assert layer.mask is not None
    assert torch.equal(y, masked_linear(x, layer.weight, layer.bias, layer.mask))


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["cusparselt", "auto"])
def test_gpu_callback_bf16_trainer(kernel: str) -> None:
    cb = SemiStructuredSparsity(kernel=kernel, min_speedup=0.01)
    _tiny_fit("gpu", "bf16-mixed", cb, steps=3)
    assert cb.kernels and set(cb.kernels.values()) == {"cusparselt"}, cb.kernel_reasons
    if kernel == "auto":
        assert cb.kernel_timings and all(t.speedup > 0 for t in cb.kernel_timings.values())


@pytest.mark.gpu
def test_gpu_callback_fp32_trainer_warns_and_stays_masked() -> None:
    cb = SemiStructuredSparsity(kernel="cusparselt")
    with pytest.warns(UserWarning, match="float32"):
        _tiny_fit("gpu", "32-true", cb, steps=2)
    assert set(cb.kernels.values()) == {"masked"}


def test_fp16_is_refused_on_the_cusparselt_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # cuSPARSELt 0.8's fp16 products faulted or hung on Hopper: such layers stay on the masked path, with a reason.
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    reason = sg.cusparselt_unsupported_reason(torch.device("cuda"), torch.float16)
    assert reason is not None and "bfloat16 only" in reason and "bf16-mixed" in reason
    assert sg.cusparselt_unsupported_reason(torch.device("cuda"), torch.bfloat16) is None
