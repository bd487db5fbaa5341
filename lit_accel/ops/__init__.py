"""The op layer: one file per op, each a ``@triton.jit`` kernel (or cuBLAS/cuSPARSELt calls), a
``torch.autograd.Function`` and a plain-PyTorch reference that the tests compare against and CPU runs use.

This package is a leaf: it imports torch and triton only (no Lightning, no model structure, no technique), so any
training loop can call it. Patching Hugging Face models with these ops lives one floor up, in
:mod:`lit_accel.kernels`.

Example:
    >>> import torch
    >>> from lit_accel.ops import lora_linear, rms_norm
    >>> lora_linear(torch.randn(3, 16), torch.randn(8, 16), None, torch.randn(2, 16), torch.zeros(8, 2), 1.0).shape
    torch.Size([3, 8])
    >>> rms_norm(torch.randn(3, 16), torch.ones(16), 1e-6).shape
    torch.Size([3, 16])
"""

from lit_accel.ops.linear_cross_entropy import (
    FusedLinearCrossEntropyFunction,
    fused_linear_cross_entropy,
    linear_cross_entropy_reference,
)
from lit_accel.ops.lora import (
    LoRAGroupFunction,
    LoRALinearFunction,
    kernel_available,
    lora_linear,
    lora_linear_group,
    lora_linear_reference,
)
from lit_accel.ops.lowrank_reduce import dy_products, lowrank_reduce
from lit_accel.ops.rms_norm import RMSNormFunction, rms_norm, rms_norm_reference
from lit_accel.ops.rope import RoPEFunction, apply_rope, apply_rope_reference
from lit_accel.ops.swiglu import SwiGLUFunction, swiglu, swiglu_reference

__all__ = [
    "FusedLinearCrossEntropyFunction",
    "LoRAGroupFunction",
    "LoRALinearFunction",
    "RMSNormFunction",
    "RoPEFunction",
    "SwiGLUFunction",
    "apply_rope",
    "apply_rope_reference",
    "dy_products",
    "fused_linear_cross_entropy",
    "kernel_available",
    "linear_cross_entropy_reference",
    "lora_linear",
    "lora_linear_group",
    "lora_linear_reference",
    "lowrank_reduce",
    "rms_norm",
    "rms_norm_reference",
    "swiglu",
    "swiglu_reference",
]
