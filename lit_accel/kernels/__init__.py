"""Triton kernels, one file per op: ``@triton.jit`` kernel(s), a ``torch.autograd.Function`` and a plain-PyTorch
reference that the tests compare against and that CPU runs use; plus :func:`apply_kernels`, which patches a Hugging
Face LLaMA/Mistral/Qwen2 model to use them.

Example:
    >>> import torch
    >>> from lit_accel.kernels import lora_linear, rms_norm
    >>> lora_linear(torch.randn(3, 16), torch.randn(8, 16), None, torch.randn(2, 16), torch.zeros(8, 2), 1.0).shape
    torch.Size([3, 8])
    >>> rms_norm(torch.randn(3, 16), torch.ones(16), 1e-6).shape
    torch.Size([3, 16])
"""

from lit_accel.kernels.apply import (
    KERNEL_ARCHS,
    KERNEL_NAMES,
    KernelReport,
    apply_kernels,
    kernels_applied,
    remove_kernels,
)
from lit_accel.kernels.linear_cross_entropy import (
    FusedLinearCrossEntropyFunction,
    fused_linear_cross_entropy,
    linear_cross_entropy_reference,
)
from lit_accel.kernels.lora import (
    LoRAGroupFunction,
    LoRALinearFunction,
    kernel_available,
    lora_linear,
    lora_linear_group,
    lora_linear_reference,
)
from lit_accel.kernels.lowrank_reduce import dy_products, lowrank_reduce
from lit_accel.kernels.rms_norm import RMSNormFunction, rms_norm, rms_norm_reference
from lit_accel.kernels.rope import RoPEFunction, apply_rope, apply_rope_reference
from lit_accel.kernels.swiglu import SwiGLUFunction, swiglu, swiglu_reference

__all__ = [
    "KERNEL_ARCHS",
    "KERNEL_NAMES",
    "FusedLinearCrossEntropyFunction",
    "KernelReport",
    "LoRAGroupFunction",
    "LoRALinearFunction",
    "RMSNormFunction",
    "RoPEFunction",
    "SwiGLUFunction",
    "apply_kernels",
    "apply_rope",
    "apply_rope_reference",
    "dy_products",
    "fused_linear_cross_entropy",
    "kernel_available",
    "kernels_applied",
    "linear_cross_entropy_reference",
    "lora_linear",
    "lora_linear_group",
    "lora_linear_reference",
    "lowrank_reduce",
    "remove_kernels",
    "rms_norm",
    "rms_norm_reference",
    "swiglu",
    "swiglu_reference",
]
