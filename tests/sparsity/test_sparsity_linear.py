"""SparseLinear / masked_linear against a plain masked-dense reference: outputs and gradients; masked decay."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_accel.sparsity.functional import (
    SparseLinear,
    masked_decay_,
    masked_linear,
    rowwise_24_mask,
    transposable_24_mask_reference,
)


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, m: torch.Tensor, g: torch.Tensor):
    """Forward x (W*M)^T + b; dX = dY (W*M); dW dense = dY^T x (not masked); db = sum dY."""
    wm = w * m
    y = x @ wm.t() + (b if b is not None else 0)
    g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
    return y, g @ wm, g2.t() @ x2, g2.sum(0)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(), (3,)])
@pytest.mark.parametrize("rowwise", [True, False])
def test_masked_linear_matches_reference(bias: bool, lead: tuple[int, ...], rowwise: bool) -> None:
    torch.manual_seed(0)
    w = torch.randn(12, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(12, dtype=torch.float64, requires_grad=True) if bias else None
    x = torch.randn(*lead, 5, 16, dtype=torch.float64, requires_grad=True)
    m = rowwise_24_mask(w) if rowwise else transposable_24_mask_reference(w)
    y = masked_linear(x, w, b, m)
    g = torch.randn_like(y)
    params = [x, w] + ([b] if b is not None else [])
    got = torch.autograd.grad(y, params, g)
    ry, rgx, rgw, rgb = _reference(x.detach(), w.detach(), b.detach() if b is not None else None, m, g)
    torch.testing.assert_close(y, ry)
    torch.testing.assert_close(got[0], rgx)
    torch.testing.assert_close(got[1], rgw)  # dense: pruned weights get gradient too
    assert got[1][~m].abs().sum() > 0
    if b is not None:
        torch.testing.assert_close(got[2], rgb)


def test_sparse_linear_module_state_dict_and_dense_toggle() -> None:
    torch.manual_seed(1)
    base = nn.Linear(8, 4)
    layer = SparseLinear.from_linear(base)
    assert layer.weight is base.weight and layer.bias is base.bias
    x = torch.randn(2, 8)
    torch.testing.assert_close(layer(x), base(x))  # no mask: dense
    m = transposable_24_mask_reference(layer.weight)
    layer.set_mask(m)
    torch.testing.assert_close(layer(x), x @ (base.weight * m).t() + base.bias)
    assert list(layer.state_dict()) == ["weight", "bias"]
    plain = nn.Linear(8, 4)
    plain.load_state_dict(layer.state_dict())
    with pytest.raises(ValueError, match="shape"):
        layer.set_mask(torch.ones(8, 4, dtype=torch.bool))
    layer.set_mask(None)
    torch.testing.assert_close(layer(x), base(x))
    assert "sparse=False" in repr(layer)


def test_sparse_linear_only_input_or_weight_grad() -> None:
    layer = SparseLinear(8, 4, bias=False)
    layer.set_mask(rowwise_24_mask(layer.weight))
    x = torch.randn(3, 8)
    layer(x).sum().backward()  # x needs no grad
    assert layer.weight.grad is not None
    layer.weight.requires_grad_(False)
    xg = x.clone().requires_grad_()
    layer(xg).sum().backward()
    assert xg.grad is not None


def test_autocast_bf16_grads_in_param_dtype() -> None:
    layer = SparseLinear(16, 8)
    layer.set_mask(transposable_24_mask_reference(layer.weight))
    x = torch.randn(4, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.dtype == torch.float32
    assert x.grad is not None and x.grad.dtype == torch.float32
    assert layer.mask is not None
    ref = x.detach() @ (layer.weight.detach() * layer.mask).t() + layer.bias.detach()
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)


def test_masked_decay_only_touches_pruned() -> None:
    w = torch.randn(4, 8)
    m = rowwise_24_mask(w)
    g = torch.zeros(4, 8)
    masked_decay_(g, w, m, 2e-4)
    torch.testing.assert_close(g, 2e-4 * w * (~m))
    gb = torch.zeros(4, 8, dtype=torch.bfloat16)
    masked_decay_(gb, w.bfloat16(), m, 0.5)
    assert (gb[m] == 0).all() and gb.dtype == torch.bfloat16
