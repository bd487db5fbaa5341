"""Hugging Face models on the fused ops of :mod:`lit_accel.ops`: :func:`apply_kernels` patches a LLaMA, Mistral or
Qwen2 model in place with each family's exact numerics; :class:`lit_accel.callbacks.FusedKernels` does it from a
Lightning callback.

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from lit_accel.kernels import apply_kernels
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                   num_attention_heads=4, num_key_value_heads=2)
    >>> sorted(apply_kernels(LlamaForCausalLM(cfg)).patched)
    ['linear_cross_entropy', 'rms_norm', 'rope', 'swiglu']
"""

from lit_accel.kernels.apply import (
    KERNEL_ARCHS,
    KERNEL_NAMES,
    KernelReport,
    apply_kernels,
    kernels_applied,
    remove_kernels,
)

__all__ = [
    "KERNEL_ARCHS",
    "KERNEL_NAMES",
    "KernelReport",
    "apply_kernels",
    "kernels_applied",
    "remove_kernels",
]
