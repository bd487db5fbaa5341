"""LoRA layers that read one input (a block's q/k/v, its gate/up), computed together as one autograd node on CUDA.

:class:`SharedInputGroup` is what a :class:`~lit_accel.lowrank.LoRALinear` asks first in its forward (when
:func:`~lit_accel.lowrank.group_shared_inputs`, which :func:`~lit_accel.lowrank.apply_lora` calls, gave it a group):
the first member called with an input computes every member's output with
:func:`~lit_accel.ops.lora.lora_linear_group_kernel` (one rank projection of the input, one input gradient, one
rebuild of the input under ``recompute_input``) and hands the others theirs when they are called with that very
tensor. This module holds the group itself; finding the groups of a model is set-up, next to ``apply_lora``.
Fused projections (GPT-2's ``c_attn``, Phi-3's ``qkv_proj`` / ``gate_up_proj``) are one linear already and form no
group; neither do the 3-D expert weights of a mixture of experts, which carry no adapters.

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from lit_accel.lowrank import apply_lora
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
    ...                                      num_attention_heads=4, vocab_size=128))
    >>> layers = apply_lora(model, r=4, alpha=8)
    >>> layers["model.layers.0.self_attn.q_proj"].shared_input_group.roles
    ('q', 'k', 'v')
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from lit_accel.models.params import is_partitioned
from lit_accel.ops.lora import lora_linear_group_kernel

if TYPE_CHECKING:  # for annotations only: lora.py imports this module at run time
    from lit_accel.lowrank.lora import LoRALinear

__all__ = ["SharedInputGroup"]

# Where groups run: on CUDA the per-layer path is the fused one too, so grouping only changes the rounding order; on
# the CPU the per-layer path is PEFT's computation, bit for bit, and stays so (tests add "cpu" to run groups there).
_GROUP_DEVICES: tuple[str, ...] = ("cuda",)


class SharedInputGroup:
    """LoRA layers that read the same input (a block's q/k/v, its gate/up), computed together on CUDA.

    The first member called with an input computes every member's output with
    :func:`~lit_accel.ops.lora.lora_linear_group_kernel` and hands the others theirs when they are called with that
    very tensor (same object, not modified in place since, same grad and autocast modes). Any other call (another
    input, a member called twice, dropout active, a CPU tensor, inference mode, a ZeRO-3 partitioned weight, a member
    with ``use_kernel=False``, ``torch.compile``) runs the member on its own, so the result never depends on the
    grouping beyond the rounding of the compute dtype. A pre-hook that hands each member a new tensor defeats the
    sharing (each member then computes the group again: correct, but the shared work is repeated). Module hooks
    still run: every member is still called through ``__call__``.

    Args:
        members: The layers, in the order of ``roles``.
        roles: Their roles in their sublayer (``("q", "k", "v")``, ``("gate", "up")``), when known.

    Example:
        >>> from lit_accel.lowrank import LoRALinear
        >>> q, k = LoRALinear(torch.nn.Linear(8, 8), r=2, alpha=4), LoRALinear(torch.nn.Linear(8, 4), r=2, alpha=4)
        >>> group = SharedInputGroup([q, k], ("q", "k"))
        >>> group.output(q, torch.randn(3, 8)) is None  # a CPU tensor: q runs on its own
        True
    """

    def __init__(self, members: Sequence[LoRALinear], roles: Sequence[str] = ()) -> None:
        self.members = list(members)
        self.roles = tuple(roles)
        """The members' roles in their sublayer (``("q", "k", "v")``, ``("gate", "up")``), when known."""
        self._pending: tuple[weakref.ref[torch.Tensor], tuple[Any, ...], dict[int, torch.Tensor]] | None = None

    def _settings(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor | None]] | None:
        """The members' base weights and biases as the group runs them, or None when it cannot take ``x``."""
        if x.device.type not in _GROUP_DEVICES or x.numel() == 0 or torch.compiler.is_compiling():
            return None
        if x.shape[-1] != self.members[0].in_features:
            return None  # the layer's own path raises the clear error
        weights: list[torch.Tensor] = []
        biases: list[torch.Tensor | None] = []
        for m in self.members:
            if m.merged or m.weight_layout != "out_in" or (m.dropout > 0.0 and m.training) or m.use_kernel is False:
                return None
            if any(is_partitioned(p) for p in m.base_layer.parameters(recurse=False)):
                # ZeRO-3 gathers a member's weight only around its own forward. Checked on the stored parameters:
                # a cast copy of a partition (base_tensors) no longer looks partitioned.
                return None
            w, b = m.base_tensors(x)
            # The group returns no dW / db: a trainable base runs per layer.
            if w.device != x.device or (torch.is_grad_enabled() and (
                    w.requires_grad or (b is not None and b.requires_grad))):  # fmt: skip
                return None
            weights.append(w)
            biases.append(b)
        return weights, biases

    def output(self, member: LoRALinear, x: torch.Tensor) -> torch.Tensor | None:
        """``member``'s output for ``x`` from the group, or None when the member must run on its own."""
        index = next((i for i, m in enumerate(self.members) if m is member), None)
        if index is None or x.is_inference() or torch.is_inference_mode_enabled():
            # Inference tensors keep no version counter to tell an in-place change; a member that is not this group's
            # (an nn.DataParallel replica shares the group object) runs alone.
            self._pending = None
            return None
        pending = self._pending
        # Served only for the very tensor (unchanged since) under the same grad and autocast modes: an output made
        # without autograd, or in another dtype, must not reach a call that expects otherwise.
        key = (x._version, torch.is_grad_enabled(), torch.is_autocast_enabled(x.device.type),
               torch.get_autocast_dtype(x.device.type))  # fmt: skip
        if pending is not None and pending[0]() is x and pending[1] == key and id(member) in pending[2]:
            y = pending[2].pop(id(member))
            if not pending[2]:
                self._pending = None
            return y
        self._pending = None
        settings = self._settings(x)
        if settings is None:
            return None
        weights, biases = settings
        outs = lora_linear_group_kernel(
            x,
            weights,
            biases,
            [m.lora_A for m in self.members],
            [m.lora_B for m in self.members],
            [m.scaling for m in self.members],
            recompute_input=all(m.recompute_input for m in self.members),
        )
        others = {id(m): y for m, y in zip(self.members, outs, strict=True) if m is not member}
        self._pending = (weakref.ref(x), key, others)
        return outs[index]
