"""Triton kernels, one file per op: ``@triton.jit`` kernel(s), a ``torch.autograd.Function`` and a plain-PyTorch
reference that the tests compare against and that CPU runs use.

Example:
    >>> import torch
    >>> from lit_accel.kernels import lora_linear
    >>> lora_linear(torch.randn(3, 16), torch.randn(8, 16), None, torch.randn(2, 16), torch.zeros(8, 2), 1.0).shape
    torch.Size([3, 8])
"""

from lit_accel.kernels.lora import LoRALinearFunction, kernel_available, lora_linear, lora_linear_reference

__all__ = ["LoRALinearFunction", "kernel_available", "lora_linear", "lora_linear_reference"]
