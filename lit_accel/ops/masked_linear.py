"""Masked linear with a dense weight gradient: ``y = x (W*M)^T + b``, ``dX = dY (W*M)``, ``dW = dY^T x``.

The numerics that every 2:4 sparse path must reproduce (:mod:`lit_accel.ops.sparse24_gemm` falls back to it), on
any device and dtype.

Example:
    >>> import torch
    >>> masked_linear(torch.ones(1, 4), torch.ones(2, 4), None, torch.ones(2, 4, dtype=torch.bool)).tolist()
    [[4.0, 4.0]]
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["MaskedLinearFunction", "masked_linear"]


class MaskedLinearFunction(torch.autograd.Function):
    """``y = x (W*M)^T + b`` with ``dX = dY (W*M)`` and the *dense* weight gradient ``dW = dY^T x``.

    The dense ``dW`` is the paper's choice: the pruned weights keep learning, so a mask refresh can bring them
    back. (Plain autograd through ``W * M`` would give ``dW * M`` and freeze them.) This is the masked dense path:
    the numerics a sparse-tensor-core path must reproduce.
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor
    ) -> torch.Tensor:
        w_masked = weight * mask.to(weight.dtype)
        ctx.save_for_backward(x, w_masked)
        ctx.has_bias = bias is not None
        return F.linear(x, w_masked, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w_masked = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = grad_out @ w_masked
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[1]:
            gw = g2.t() @ x.reshape(-1, x.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb, None


def masked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
    """``x (W*M)^T + b`` with a dense weight gradient (see :class:`MaskedLinearFunction`).

    Under autocast the operands are cast to the autocast dtype first, as ``F.linear`` would; the gradients
    flow back through those casts to the parameters' own dtypes.

    Example:
        >>> w = torch.ones(4, 4, requires_grad=True)
        >>> y = masked_linear(torch.ones(1, 4), w, None, torch.eye(4, dtype=torch.bool))
        >>> y.tolist(), y.sum().backward(), w.grad.sum().item()
        ([[1.0, 1.0, 1.0, 1.0]], None, 16.0)
    """
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and x.is_floating_point():
        dtype = torch.get_autocast_dtype(dev)
        with torch.autocast(dev, enabled=False):
            b = bias.to(dtype) if bias is not None else None
            out: torch.Tensor = MaskedLinearFunction.apply(x.to(dtype), weight.to(dtype), b, mask)
        return out
    result: torch.Tensor = MaskedLinearFunction.apply(x, weight, bias, mask)
    return result
