"""The fused LoRA SwiGLU MLP input (lit_accel.kernels.lora_mlp) against PEFT's computation: outputs, gradients, the
recompute recipe it registers for the down projection, and the reduction over its output.

The Triton kernels run on CPU only under ``TRITON_INTERPRET=1`` (fp32, small shapes), in a child pytest; GPU tests
run bf16 at llama-1b shapes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _case(
    m: int, d_in: int, inter: int, r_g: int, r_u: int, dtype: torch.dtype, device: str
) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(m + d_in + inter)

    def rnd(*shape: int, scale: float = 1.0, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=dt) * scale

    return {
        "x": rnd(2, m, d_in).requires_grad_(),
        "w_g": rnd(inter, d_in, scale=d_in**-0.5),
        "w_u": rnd(inter, d_in, scale=d_in**-0.5),
        "a_g": rnd(r_g, d_in, scale=d_in**-0.5, dt=torch.float32).requires_grad_(),
        "a_u": rnd(r_u, d_in, scale=d_in**-0.5, dt=torch.float32).requires_grad_(),
        "b_g": rnd(inter, r_g, scale=0.1, dt=torch.float32).requires_grad_(),
        "b_u": rnd(inter, r_u, scale=0.1, dt=torch.float32).requires_grad_(),
    }


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _check(m: int, d_in: int, inter: int, r_g: int, r_u: int, dtype: torch.dtype, device: str, tol: float) -> None:
    from lit_accel.kernels.lora_mlp import lora_swiglu, lora_swiglu_reference
    from lit_accel.kernels.recompute import recompute_recipe, request_recompute

    class Consumer:
        pass

    consumer = Consumer()
    request_recompute(consumer)
    c = _case(m, d_in, inter, r_g, r_u, dtype, device)
    names = ["x", "a_g", "a_u", "b_g", "b_u"]
    ctx = torch.autocast("cuda", dtype=dtype) if device == "cuda" else torch.autocast("cpu", enabled=False)
    with ctx:
        h = lora_swiglu(c["x"], c["w_g"], c["w_u"], c["a_g"], c["a_u"], c["b_g"], c["b_u"], 2.0, 0.75)
    assert h.shape == (2, m, inter) and h.dtype == dtype
    # fp32 reference on upcast inputs (PEFT's formula).
    ref_in = {k: v.detach().double().requires_grad_(k in names) for k, v in c.items()}
    ref = lora_swiglu_reference(*(ref_in[k] for k in ("x", "w_g", "w_u", "a_g", "a_u", "b_g", "b_u")), 2.0, 0.75)
    assert _rel(h, ref) < tol
    # The recipe the down projection reads: the same bits again, and the reduction over h without writing it.
    recipe = recompute_recipe(h)
    assert recipe is not None and recipe.reduce is not None
    assert torch.equal(recipe.run(*recipe.inputs), h)
    u = torch.randn(2 * m, 16, device=device, dtype=dtype)
    g = recipe.reduce(*recipe.inputs, u=u, scale=1.5)
    assert g.dtype == torch.float32 and _rel(g, 1.5 * u.double().t() @ h.reshape(-1, inter).double()) < 1e-4
    gh = torch.randn_like(h)
    got = torch.autograd.grad(h, [c[k] for k in names], gh)
    exp = torch.autograd.grad(ref, [ref_in[k] for k in names], gh.double())
    for name, a, b in zip(names, got, exp):
        assert a.dtype == c[name].dtype, name
        assert _rel(a, b) < tol, f"{name}: {_rel(a, b):.3g}"
    del consumer


if not INTERPRET:

    @pytest.mark.skipif(sys.platform != "linux", reason="triton is Linux-only")
    def test_triton_interpreter_cases_in_subprocess(run_in_triton_interpreter: Callable[[str, float], None]) -> None:
        run_in_triton_interpreter(str(Path(__file__)), 300)

else:

    @pytest.mark.parametrize(
        ("m", "d_in", "inter", "r_g", "r_u"), [(5, 16, 24, 2, 2), (37, 32, 48, 4, 5), (16, 16, 33, 20, 1)]
    )
    def test_interp_matches_peft_formula(m: int, d_in: int, inter: int, r_g: int, r_u: int) -> None:
        _check(m, d_in, inter, r_g, r_u, torch.float32, "cpu", 1e-5)


@pytest.mark.gpu
def test_gpu_bf16_llama_1b_shapes() -> None:
    _check(2048, 2048, 5632, 16, 16, torch.bfloat16, "cuda", 2e-2)
