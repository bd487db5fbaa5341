"""LoRA: low-rank adapters on the linears of a causal LM, numerically equal to PEFT's, with PEFT's file format.

The functional core (no Lightning): :func:`apply_lora` wraps the selected linears in :class:`LoRALinear` and freezes
everything else; :func:`merge_lora` / :func:`unmerge_lora` fold the adapters into the base weights and back;
:func:`remove_lora` gives back a plain Hugging Face model; :func:`save_peft_adapter` / :func:`load_peft_adapter`
write and read ``adapter_config.json`` + ``adapter_model.safetensors`` exactly as ``peft`` does, so
``PeftModel.from_pretrained(base, directory)`` gives the same logits (``peft`` itself is not needed at run time).

A wrapped linear keeps the original module at ``.base_layer`` (so :func:`~lit_accel.models.structure.is_linear`
still sees one linear under its original name) and holds two parameters: ``lora_A`` ``[r, in]`` and ``lora_B``
``[out, r]``. Its state-dict keys are ``<name>.base_layer.weight`` (``.bias``), ``<name>.lora_A`` and
``<name>.lora_B``. The forward is ``base(x) + scaling * (dropout(x) @ A^T) @ B^T`` with ``scaling = alpha / r``
(``alpha / sqrt(r)`` with rsLoRA), computed by :func:`lit_accel.ops.lora.lora_linear` (a fused Triton kernel on
CUDA, PyTorch elsewhere); dropout draws one ``F.dropout`` mask per call, as PEFT does, so a seeded run consumes the
same random numbers.

Adapters are kept in fp32 (as PEFT's default ``autocast_adapter_dtype=True``) so the optimizer updates fp32 values;
under autocast the matmuls run in the autocast dtype. ``base_dtype=torch.bfloat16`` stores the frozen base weights
of the adapted linears in bf16: a frozen weight needs no fp32 master copy (use it with ``bf16-mixed`` precision).

DeepSpeed ZeRO-3: every read or write of base weights or adapters (PiSSA's SVD, merge/unmerge, saving, loading) is
done inside :func:`~lit_accel.models.params.gathered`, with ``modifier_rank=0`` for writes, so adapters are never
saved empty and merges are not lost; call those functions on every rank.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
    ...                                      num_attention_heads=4, vocab_size=128))
    >>> layers = apply_lora(model, targets="attention", r=4, alpha=8)
    >>> sorted(layers)[0], tuple(layers["model.layers.0.self_attn.q_proj"].lora_A.shape)
    ('model.layers.0.self_attn.k_proj', (4, 64))
    >>> sum(p.numel() for p in lora_parameters(model))
    2048
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lit_accel.models.params import gathered, is_partitioned, is_rank_zero
from lit_accel.models.structure import StructurePatterns, get_structure, linear_in_out_features
from lit_accel.models.surgery import match_linears, replace_module
from lit_accel.ops.lora import lora_linear, lora_linear_group_kernel
from lit_accel.ops.recompute import request_recompute

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "LORA_INITS",
    "LoRALinear",
    "SharedInputGroup",
    "apply_lora",
    "group_shared_inputs",
    "load_peft_adapter",
    "lora_layers",
    "lora_parameters",
    "lora_state_dict",
    "merge_lora",
    "merged_state_dict",
    "parse_dtype",
    "read_peft_adapter",
    "remove_lora",
    "save_peft_adapter",
    "unmerge_lora",
]

LORA_INITS = ("gaussian", "pissa")
"""Adapter initialisations: ``gaussian`` (PEFT's default ``init_lora_weights=True``: A kaiming-uniform, B zero)
and ``pissa`` (principal singular vectors; the base keeps the residual)."""

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."

_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}


def parse_dtype(value: str | torch.dtype | None, argument: str = "base_dtype") -> torch.dtype | None:
    """``"bfloat16"`` / ``"bf16"`` / ``torch.bfloat16`` ... -> ``torch.dtype``; None stays None.

    Raises:
        ValueError: For any other value; the message names ``argument`` and what is allowed.
    """
    if value is None or isinstance(value, torch.dtype):
        if isinstance(value, torch.dtype) and value not in _DTYPES.values():
            raise ValueError(f"{argument}={value!r} is not allowed; use one of {sorted(set(_DTYPES))} or None")
        return value
    key = str(value).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"{argument}={value!r} is not allowed; use one of {sorted(set(_DTYPES))} or None")
    return _DTYPES[key]


def _scaling(r: int, alpha: float, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


# Roles of the linears that read one sublayer input (the attention's normed input, the MLP's).
_SHARED_INPUT_ROLES = (("attention", ("q", "k", "v")), ("mlp", ("gate", "up")))
# Where groups run: on CUDA the per-layer path is cuBLAS too, so grouping only changes the rounding order; on the
# CPU the per-layer path is PEFT's computation, bit for bit, and stays so (tests add "cpu" to run groups there).
_GROUP_DEVICES: tuple[str, ...] = ("cuda",)


class SharedInputGroup:
    """LoRA layers that read the same input (a block's q/k/v, its gate/up), computed together on CUDA.

    The first member called with an input computes every member's output with
    :func:`~lit_accel.ops.lora.lora_linear_group` (one rank projection of the input, one input gradient, one
    rebuild of the input under ``recompute_input``) and hands the others theirs when they are called with that
    very tensor (same object, not modified in place since, same grad and autocast modes). Any other call (another
    input, a member called twice, dropout active, a CPU tensor, inference mode, a ZeRO-3 partitioned weight,
    ``torch.compile``) runs the member on its own, so the result never depends on the grouping beyond the rounding of
    the compute dtype. A pre-hook that hands each member a new tensor defeats the sharing (each member then computes
    the group again: correct, but the shared work is repeated). Module hooks still run:
    every member is still called through ``__call__``.
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
            if m.merged or m.weight_layout != "out_in" or (m.dropout > 0.0 and m.training):
                return None
            if any(is_partitioned(p) for p in m.base_layer.parameters(recurse=False)):
                # ZeRO-3 gathers a member's weight only around its own forward. Checked on the stored parameters:
                # a cast copy of a partition (_base_tensors) no longer looks partitioned.
                return None
            w, b = m._base_tensors(x)
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


class LoRALinear(nn.Module):
    """A frozen linear (``nn.Linear`` or GPT-2 ``Conv1D``) plus a trainable low-rank update.

    ``y = base(x) + scaling * (dropout(x) @ lora_A^T) @ lora_B^T``. Create it with :func:`apply_lora` (which also
    initialises the adapters); constructed directly, ``lora_A`` and ``lora_B`` are zero.

    Args:
        base_layer: The linear to adapt; kept (frozen) at ``.base_layer``.
        r: Rank, ``1 <= r <= min(in, out)``.
        alpha: LoRA alpha; ``scaling = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).
        dropout: Dropout probability on the adapter's input, in ``[0, 1)``.
        use_rslora: Rank-stabilised scaling.
        init: ``"gaussian"`` or ``"pissa"`` (recorded; used by :func:`save_peft_adapter`).
        recompute_input: On the fused CUDA path, rebuild the input in the backward from the saved inputs of the
            fused kernel that produced it (RMSNorm, SwiGLU) instead of keeping it from the forward (see
            :func:`~lit_accel.ops.lora.lora_linear`): less activation memory, one extra memory-bound kernel.
            Off for a layer built directly; :func:`apply_lora` and the LoRA callback turn it on by default.
    """

    lora_A0: torch.Tensor | None
    lora_B0: torch.Tensor | None

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "gaussian",
        recompute_input: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, (nn.Linear, Conv1D)):
            raise TypeError(f"LoRALinear adapts nn.Linear or transformers Conv1D, not {type(base_layer).__name__}")
        self.in_features, self.out_features = linear_in_out_features(base_layer)
        if not 1 <= r <= min(self.in_features, self.out_features):
            raise ValueError(
                f"r={r} is not allowed for a linear of in={self.in_features}, out={self.out_features}; r must be in"
                f" [1, {min(self.in_features, self.out_features)}]"
            )
        self.base_layer = base_layer
        self.r = int(r)
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        self.use_rslora = bool(use_rslora)
        self.init = init
        self.recompute_input = bool(recompute_input)
        if self.recompute_input:
            request_recompute(self)  # the fused kernels record their outputs only while such a layer lives
        self.scaling = _scaling(self.r, self.alpha, self.use_rslora)
        self.merged = False
        # Set by apply_lora for layers that share their input with siblings (a plain attribute, not a submodule).
        self.shared_input_group: SharedInputGroup | None = None
        self.weight_layout: Literal["out_in", "in_out"] = "in_out" if isinstance(base_layer, Conv1D) else "out_in"
        weight = base_layer.weight
        device = weight.device
        self.lora_A = nn.Parameter(torch.zeros(self.r, self.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.r, device=device, dtype=torch.float32))
        # PiSSA's initial adapters (A0, B0): the base holds W - s*B0@A0, so the update to the original weight is
        # s*(B@A - B0@A0). Not persistent: recomputed from the original weight whenever LoRA is applied.
        self.register_buffer("lora_A0", None, persistent=False)
        self.register_buffer("lora_B0", None, persistent=False)
        if is_partitioned(weight):
            # ZeRO-3 gathers a module's own parameters before its forward; the base weight belongs to the child,
            # whose forward is not called here, so it is registered as an external parameter of this module.
            import deepspeed

            for p in base_layer.parameters(recurse=False):
                deepspeed.zero.register_external_parameter(self, p)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha:g},"
            f" scaling={self.scaling:g}, dropout={self.dropout:g}, merged={self.merged}"
        )

    # ------------------------------------------------------------------ parameters
    def _params(self) -> list[nn.Parameter]:
        return [*self.base_layer.parameters(recurse=False), self.lora_A, self.lora_B]

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` in the base weight's layout, fp32 (needs whole tensors: gather under ZeRO-3)."""
        delta = (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scaling
        return delta.T if self.weight_layout == "in_out" else delta

    def pissa_delta_weight(self) -> torch.Tensor | None:
        """``scaling * B0 @ A0`` (what PiSSA took out of the base) in the base's layout, or None."""
        if self.lora_A0 is None or self.lora_B0 is None:
            return None
        delta = (self.lora_B0.float() @ self.lora_A0.float()) * self.scaling
        return delta.T if self.weight_layout == "in_out" else delta

    @torch.no_grad()
    def merge(self) -> None:
        """``W += scaling * B @ A`` (in the base's layout); the forward then runs the base only."""
        if self.merged:
            return
        with gathered(self._params(), modifier_rank=0):
            w = self.base_layer.weight
            w.copy_((w.float() + self.delta_weight()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Inverse of :meth:`merge` (exact within the rounding of the base weight's dtype)."""
        if not self.merged:
            return
        with gathered(self._params(), modifier_rank=0):
            w = self.base_layer.weight
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
        self.merged = False

    # ------------------------------------------------------------------ forward
    def _base_tensors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The base weight and bias as the forward computes with them for input ``x``."""
        weight: torch.Tensor = self.base_layer.weight
        bias: torch.Tensor | None = self.base_layer.bias
        if not torch.is_autocast_enabled(x.device.type) and weight.dtype != x.dtype:
            # A base stored in another dtype than the activations (base_dtype=bf16 without autocast) computes in
            # the activations' dtype. The adapters are passed as they are: as in PEFT, the adapter path runs in
            # their dtype (fp32) unless autocast is on, and the result is cast back to the base output's dtype.
            weight = weight.to(x.dtype)
            bias = bias if bias is None else bias.to(x.dtype)
        return weight, bias

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        if self.shared_input_group is not None and not args and not kwargs:
            y = self.shared_input_group.output(self, x)
            if y is not None:
                return y
        weight, bias = self._base_tensors(x)
        return lora_linear(
            x,
            weight,
            bias,
            self.lora_A,
            self.lora_B,
            self.scaling,
            dropout_p=self.dropout,
            training=self.training,
            weight_layout=self.weight_layout,
            recompute_input=self.recompute_input,
        )


def group_shared_inputs(model: nn.Module, patterns: StructurePatterns | None = None) -> list[SharedInputGroup]:
    """Groups the :class:`LoRALinear` layers of each block that read one input (q/k/v; gate/up).

    :func:`apply_lora` calls it; call it again after replacing layers by hand. A model whose structure is not
    known (no supported architecture, no ``patterns``) gets no groups: every layer then runs on its own.

    Args:
        model: The model holding the LoRA layers.
        patterns: Module-name patterns for a model that is not a supported architecture.

    Returns:
        The groups formed (each of two or more layers); earlier groups of these layers are replaced.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        ...                                      num_attention_heads=4, vocab_size=128))
        >>> _ = apply_lora(model, r=4, alpha=8)  # calls group_shared_inputs itself
        >>> [g.roles for g in group_shared_inputs(model)]
        [('q', 'k', 'v'), ('gate', 'up'), ('q', 'k', 'v'), ('gate', 'up')]
    """
    for layer in model.modules():
        if isinstance(layer, LoRALinear):
            layer.shared_input_group = None
    try:
        structure = get_structure(model, patterns)
    except ValueError:
        return []
    named = dict(model.named_modules())
    groups = []
    for block in structure.blocks:
        for kind, roles in _SHARED_INPUT_ROLES:
            sub = block.attention if kind == "attention" else block.mlp
            adapted = [(r, named[sub.roles[r]]) for r in roles if r in sub.roles]
            adapted = [(r, m) for r, m in adapted if isinstance(m, LoRALinear)]
            members = [m for _, m in adapted]
            if len(members) > 1:
                group = SharedInputGroup(members, [r for r, _ in adapted])
                for m in members:
                    m.shared_input_group = group
                groups.append(group)
    return groups


# ---------------------------------------------------------------------------------------------------------------
# Applying, merging, removing
# ---------------------------------------------------------------------------------------------------------------


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Qualified name -> every :class:`LoRALinear` in ``model``, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (``lora_A``, ``lora_B`` of every layer) of ``model``."""
    return [p for layer in lora_layers(model).values() for p in (layer.lora_A, layer.lora_B)]


@torch.no_grad()
def _init_gaussian(layer: LoRALinear) -> None:
    # PEFT's init_lora_weights=True: A as nn.Linear's default init (kaiming-uniform, a=sqrt(5)), B zero.
    with gathered([layer.lora_A, layer.lora_B], modifier_rank=0):
        nn.init.kaiming_uniform_(layer.lora_A, a=math.sqrt(5))
        nn.init.zeros_(layer.lora_B)


@torch.no_grad()
def _init_pissa(layer: LoRALinear) -> None:
    # PEFT's init_lora_weights="pissa": the top-r singular triplets of W ([out, in]) split evenly into B and A,
    # scaled so that scaling * B @ A is the rank-r truncation; the base keeps the residual.
    with gathered(layer._params(), modifier_rank=0):
        base_w = layer.base_layer.weight
        if base_w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"PiSSA needs a float32/16 or bfloat16 base weight, got {base_w.dtype}")
        w = base_w.float()
        w = w.T if layer.weight_layout == "in_out" else w
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        sr = s[: layer.r] / layer.scaling
        a = torch.diag(torch.sqrt(sr)) @ vh[: layer.r]
        b = u[:, : layer.r] @ torch.diag(torch.sqrt(sr))
        layer.lora_A.copy_(a)
        layer.lora_B.copy_(b)
        residual = w - layer.scaling * b @ a
        base_w.copy_((residual.T if layer.weight_layout == "in_out" else residual).to(base_w.dtype))
        layer.lora_A0 = a.detach().clone()
        layer.lora_B0 = b.detach().clone()


def apply_lora(
    model: nn.Module,
    targets: str | Sequence[str] = "all-linear",
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    init: str = "gaussian",
    use_rslora: bool = False,
    base_dtype: str | torch.dtype | None = None,
    patterns: StructurePatterns | None = None,
    recompute_inputs: bool = True,
) -> dict[str, LoRALinear]:
    """Freezes ``model`` and adds LoRA adapters to the selected linears.

    Every parameter of the model (embeddings, norms, LM head included) gets ``requires_grad=False``; only the new
    ``lora_A`` / ``lora_B`` train. Idempotent: layers that are already :class:`LoRALinear` are kept as they are.

    Args:
        model: A Hugging Face causal LM (LLaMA, Mistral, Qwen2, GPT-2), or any transformer with ``patterns``.
        targets: ``"attention"``, ``"mlp"``, ``"all-linear"``, role names (``q``, ``k``, ``v``, ``o``, ``gate``,
            ``up``, ``down``, GPT-2 ``qkv``), module-name suffixes (``q_proj``) or regular expressions over
            qualified names (see :func:`~lit_accel.models.surgery.match_linears`). The LM head is never adapted.
        r: Rank of the adapters, ``1 <= r <= min(in, out)`` of every selected linear.
        alpha: Scaling numerator, ``> 0``.
        dropout: Dropout on the adapter input, in ``[0, 1)``.
        init: ``"gaussian"`` (PEFT's default: A kaiming-uniform, B zero, so the model is unchanged) or ``"pissa"``
            (A, B from the top-``r`` singular vectors; the base keeps ``W - scaling * B @ A``).
        use_rslora: ``scaling = alpha / sqrt(r)`` instead of ``alpha / r``.
        base_dtype: Cast the frozen base weights of the adapted linears to this dtype (e.g. ``"bfloat16"``);
            None leaves them as they are. Ignored for ZeRO-3 partitioned weights, whose dtype DeepSpeed sets.
        patterns: Module-name patterns for a model that is not a supported architecture.
        recompute_inputs: New layers rebuild their input in the backward from the fused RMSNorm / SwiGLU kernel
            that produced it instead of keeping it (``LoRALinear.recompute_input``): with the hot-path kernels on,
            the activation memory of a LoRA step drops to about the frozen model's, for one extra memory-bound
            kernel per adapted input.

    Returns:
        Qualified name -> :class:`LoRALinear` for every selected linear (new and already adapted).

    Raises:
        ValueError: A bad ``r`` / ``alpha`` / ``dropout`` / ``init`` / ``base_dtype`` (the message names it);
            ``targets`` matching nothing (the message lists the model's linears); ``r`` larger than a selected
            linear allows (the message names the layer and its shape).
    """
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r={r!r} is not allowed; r must be an int >= 1")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"alpha={alpha!r} is not allowed; alpha must be a number > 0")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout!r} is not allowed; dropout must be in [0, 1)")
    if init not in LORA_INITS:
        raise ValueError(f"init={init!r} is not allowed; init must be one of {LORA_INITS}")
    if not isinstance(recompute_inputs, bool):
        raise ValueError(f"recompute_inputs={recompute_inputs!r} is not allowed; recompute_inputs must be a bool")
    dtype = parse_dtype(base_dtype)
    selected = match_linears(model, targets, patterns=patterns)
    for name, module in selected.items():
        if isinstance(module, LoRALinear):
            continue
        if getattr(module, "is_factorized_linear", False):
            raise ValueError(
                f"{name} is factorised by LowRankFactorization; LoRA and SVD factorisation cannot be applied to the"
                " same layer. Exclude it from one of the two `targets` (e.g. factorise 'attention', adapt 'mlp')."
            )
        if type(module) not in (nn.Linear, Conv1D):
            # A subclass (e.g. a 2:4 SparseLinear) computes something else in its forward; LoRALinear reads the base
            # weight directly, so wrapping it would silently drop that behaviour (the 2:4 mask, say).
            raise ValueError(
                f"{name} is a {type(module).__name__}, not a plain nn.Linear / Conv1D; apply_lora adapts plain linears"
                " only (a 2:4 sparse layer's mask or another library's wrapper would be bypassed). Exclude it from"
                " `targets`."
            )
        fin, fout = linear_in_out_features(module)
        if r > min(fin, fout):
            raise ValueError(
                f"r={r} is larger than linear {name} allows: its shape is in={fin}, out={fout}, so r must be <="
                f" {min(fin, fout)}; lower r or leave this layer out of targets"
            )
    # Factorised projections (LowRankFactorization) stay trainable: their factors are new weights that must train to
    # recover the truncation error, whichever of the two callbacks ran first.
    factor_params = {
        id(p) for m in model.modules() if getattr(m, "is_factorized_linear", False) for p in m.parameters()
    }
    for p in model.parameters():
        if id(p) not in factor_params:
            p.requires_grad_(False)
    out: dict[str, LoRALinear] = {}
    for name, module in selected.items():
        if isinstance(module, LoRALinear):
            out[name] = module
            continue
        layer = LoRALinear(
            module,
            r=r,
            alpha=float(alpha),
            dropout=float(dropout),
            use_rslora=use_rslora,
            init=init,
            recompute_input=recompute_inputs,
        )
        layer.train(module.training)  # a new module starts in training mode; follow the model's
        if init == "pissa":
            _init_pissa(layer)
        else:
            _init_gaussian(layer)
        if dtype is not None and not any(is_partitioned(p) for p in module.parameters()):
            # Under ZeRO-3 DeepSpeed owns the storage dtype (zero.Init's, its bf16/fp16 config): `.to` would only
            # convert the empty local tensors and leave the partitions in another dtype.
            module.to(dtype)
        replace_module(model, name, layer)
        out[name] = layer
    for layer in out.values():
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    group_shared_inputs(model, patterns)
    return out


def merge_lora(model: nn.Module) -> None:
    """Folds every adapter into its base weight (``W += scaling * B @ A``); forwards then skip the adapters."""
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undoes :func:`merge_lora`."""
    for layer in lora_layers(model).values():
        layer.unmerge()


@torch.no_grad()
def remove_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replaces every :class:`LoRALinear` by its base linear, giving back a plain model.

    Args:
        model: A model with LoRA layers.
        merge: Fold the adapters in first (the fine-tuned model). With ``merge=False`` the adapters are dropped
            and the original weights come back (for PiSSA the principal part is added back to the residual).

    Returns:
        ``model`` (changed in place). Parameters stay frozen (``requires_grad=False``).
    """
    for name, layer in lora_layers(model).items():
        if merge:
            layer.merge()
        else:
            layer.unmerge()
            if layer.lora_A0 is not None:
                with gathered(layer._params(), modifier_rank=0):
                    w = layer.base_layer.weight
                    delta = layer.pissa_delta_weight()
                    assert delta is not None
                    w.copy_((w.float() + delta).to(w.dtype))
        replace_module(model, name, layer.base_layer)
    return model


def _gathered_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Yields each LoRA layer with its parameters gathered (read-only) under ZeRO-3."""
    for name, layer in lora_layers(model).items():
        with gathered(layer._params()):
            yield name, layer


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<name>.lora_A": ..., "<name>.lora_B": ...}``: the adapters on CPU (whole under ZeRO-3: call on all ranks)."""
    state: dict[str, torch.Tensor] = {}
    for name, layer in _gathered_layers(model):
        state[f"{name}.lora_A"] = layer.lora_A.detach().to("cpu").clone()
        state[f"{name}.lora_B"] = layer.lora_B.detach().to("cpu").clone()
    return state


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the plain model with every adapter folded in, on CPU; the model is not changed.

    Keys are those of the original model (``<name>.weight``, not ``<name>.base_layer.weight``). Merged weights are
    ``promote(base dtype, fp32)``. Under ZeRO-3 call it on all ranks (ranks other than 0 get an empty dict).
    """
    from lit_accel.models.params import full_state_dict

    state = full_state_dict(model)
    deltas: dict[str, torch.Tensor] = {}
    for name, layer in _gathered_layers(model):
        if not layer.merged:
            deltas[name] = layer.delta_weight().to("cpu")
    if not state:
        return state
    for name in lora_layers(model):
        state.pop(f"{name}.lora_A", None)
        state.pop(f"{name}.lora_B", None)
        for key in [k for k in state if k.startswith(f"{name}.base_layer.")]:
            value = state.pop(key)
            plain = f"{name}.{key[len(name) + len('.base_layer.') :]}"
            if key == f"{name}.base_layer.weight" and name in deltas:
                value = (value.float() + deltas[name]).to(torch.promote_types(value.dtype, torch.float32))
            state[plain] = value
    return state


# ---------------------------------------------------------------------------------------------------------------
# PEFT format
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _AdapterSettings:
    r: int
    alpha: float
    dropout: float
    use_rslora: bool
    init: str
    fan_in_fan_out: bool


def _common_settings(layers: Mapping[str, LoRALinear]) -> _AdapterSettings:
    first = next(iter(layers.values()))
    for name, layer in layers.items():
        mine = (layer.r, layer.alpha, layer.dropout, layer.use_rslora, layer.init)
        theirs = (first.r, first.alpha, first.dropout, first.use_rslora, first.init)
        if mine != theirs:
            raise ValueError(
                f"LoRA layer {name} has (r, alpha, dropout, use_rslora, init)={mine} but others have {theirs}; a PEFT"
                " adapter file holds one setting for all layers"
            )
    return _AdapterSettings(
        r=first.r,
        alpha=first.alpha,
        dropout=first.dropout,
        use_rslora=first.use_rslora,
        init=first.init,
        fan_in_fan_out=any(layer.weight_layout == "in_out" for layer in layers.values()),
    )


def _target_modules(model: nn.Module, names: Sequence[str]) -> list[str] | str:
    """PEFT ``target_modules``: module-name suffixes when they select exactly ``names``, else a full-match regex."""
    chosen = set(names)
    inner = tuple(f"{n}." for n in chosen)
    candidates = [n for n, _ in model.named_modules() if n and not n.startswith(inner)]
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in chosen})
    selected = {n for n in candidates if any(n == s or n.endswith("." + s) for s in suffixes)}
    if selected == chosen:
        return suffixes
    return "(?:" + "|".join(re.escape(n) for n in names) + ")"


def _num(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def _check_out_dir(directory: Path, overwrite: bool) -> None:
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())) and not overwrite:
        raise FileExistsError(
            f"directory {str(directory)!r} exists and is not empty; pass overwrite=True or a new path"
        )


def _write_atomically(directory: Path, files: Mapping[str, Any], overwrite: bool) -> None:
    from safetensors.torch import save_file

    _check_out_dir(directory, overwrite)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        for fname, content in files.items():
            if fname.endswith(".safetensors"):
                save_file(content, str(tmp / fname), metadata={"format": "pt"})
            else:
                (tmp / fname).write_text(content)
        if directory.exists():
            backup = directory.with_name(directory.name + ".replaced")
            shutil.rmtree(backup, ignore_errors=True)
            directory.rename(backup)
            tmp.rename(directory)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            tmp.rename(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_peft_adapter(
    model: nn.Module,
    directory: str | Path,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes the adapters as a PEFT LoRA adapter: ``adapter_config.json`` + ``adapter_model.safetensors``.

    ``PeftModel.from_pretrained(base, directory)`` on the original base model then gives the same logits. Keys are
    ``base_model.model.<name>.lora_A.weight`` / ``.lora_B.weight``. A PiSSA adapter is written as PEFT's converted
    LoRA (``path_initial_model_for_weight_conversion``): rank ``2r`` with ``A' = [A; A0]``, ``B' = [B, -B0]`` and
    doubled alpha, so it applies to the original (not the residual) base weights.

    Under DeepSpeed ZeRO-3 call it on every rank: the adapters are gathered (never written empty) and rank 0 writes.
    The directory is written next to its destination and renamed into place.

    Args:
        model: The model holding :class:`LoRALinear` layers (the Hugging Face model, not the LightningModule, so
            that names match the base model PEFT will load).
        directory: Output directory; must not exist or be empty unless ``overwrite``.
        base_model_name_or_path: Recorded in the config (e.g. the base model's directory).
        overwrite: Replace a non-empty directory.

    Raises:
        ValueError: The model has no LoRA layer.
        FileExistsError: ``directory`` is not empty and ``overwrite`` is False.
    """
    out = Path(directory)
    layers = lora_layers(model)
    if not layers:
        raise ValueError("save_peft_adapter: the model has no LoRA layer (call apply_lora first); nothing to save")
    partitioned = any(is_partitioned(p) for layer in layers.values() for p in (layer.lora_A, layer.lora_B))
    if partitioned or is_rank_zero():
        # Under ZeRO-3 on every rank, before the collective gathering (so that no rank is left waiting in it). Else
        # on rank 0 only, the rank that writes: another rank reaching this line after rank 0 wrote would see the
        # directory it just filled and refuse.
        _check_out_dir(out, overwrite)
    settings = _common_settings(layers)
    pissa = any(layer.lora_A0 is not None for layer in layers.values())
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in _gathered_layers(model):
        a, b = layer.lora_A.detach().float().cpu(), layer.lora_B.detach().float().cpu()
        if a.numel() == 0 or b.numel() == 0:
            raise RuntimeError(f"LoRA layer {name} has an empty adapter after gathering; refusing to save it")
        if pissa:
            assert layer.lora_A0 is not None and layer.lora_B0 is not None
            a = torch.cat([a, layer.lora_A0.float().cpu()], dim=0)
            b = torch.cat([b, -layer.lora_B0.float().cpu()], dim=1)
        tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = a.contiguous()
        tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = b.contiguous()
    if not is_rank_zero():
        return out
    r, alpha = settings.r, settings.alpha
    if pissa:
        r, alpha = 2 * r, alpha * (math.sqrt(2) if settings.use_rslora else 2)
    config: dict[str, Any] = {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "exclude_modules": None,
        "fan_in_fan_out": settings.fan_in_fan_out,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": _num(alpha),
        "lora_bias": False,
        "lora_dropout": settings.dropout,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": r,
        "rank_pattern": {},
        "revision": None,
        "target_modules": _target_modules(model, list(layers)),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": settings.use_rslora,
    }
    files = {ADAPTER_WEIGHTS_NAME: tensors, ADAPTER_CONFIG_NAME: json.dumps(config, indent=2, sort_keys=True) + "\n"}
    _write_atomically(out, files, overwrite)
    return out


def read_peft_adapter(directory: str | Path) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """Reads a PEFT LoRA adapter directory: its config and ``{module name: {"A": ..., "B": ...}}``.

    Raises:
        ValueError: Missing files, a non-LoRA adapter, or settings this module cannot reproduce (DoRA, biases,
            per-layer ranks, embedding adapters); the message names them.
    """
    from safetensors.torch import load_file

    path = Path(directory)
    cfg_path = path / ADAPTER_CONFIG_NAME
    if not cfg_path.is_file():
        raise ValueError(f"{str(path)!r} holds no {ADAPTER_CONFIG_NAME}: it is not a PEFT adapter directory")
    config = json.loads(cfg_path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"adapter at {str(path)!r} has peft_type={config.get('peft_type')!r}; only LORA is supported")
    for key, ok in (("use_dora", False), ("lora_bias", False)):
        if config.get(key, ok) != ok:
            raise ValueError(f"adapter at {str(path)!r} has {key}={config.get(key)!r}; only {key}={ok} is supported")
    if config.get("bias", "none") != "none":
        raise ValueError(f"adapter at {str(path)!r} has bias={config.get('bias')!r}; only 'none' is supported")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise ValueError(f"adapter at {str(path)!r} has a {key}; per-layer ranks/alphas are not supported")
    weights = path / ADAPTER_WEIGHTS_NAME
    if weights.is_file():
        flat = load_file(str(weights))
    elif (path / "adapter_model.bin").is_file():
        flat = torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"{str(path)!r} holds no {ADAPTER_WEIGHTS_NAME} (or adapter_model.bin)")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if m is None:
            raise ValueError(f"adapter at {str(path)!r} holds {key!r}, which is not a LoRA A/B weight of a linear")
        modules.setdefault(m.group(1), {})[m.group(2)] = tensor
    incomplete = [n for n, t in modules.items() if set(t) != {"A", "B"}]
    if incomplete:
        raise ValueError(f"adapter at {str(path)!r} lacks lora_A or lora_B for {incomplete[:5]}")
    if not modules:
        raise ValueError(f"adapter at {str(path)!r} holds no LoRA weights")
    return config, modules


@torch.no_grad()
def load_peft_adapter(model: nn.Module, directory: str | Path, patterns: StructurePatterns | None = None) -> None:
    """Loads a PEFT LoRA adapter (``PeftModel.save_pretrained`` output) into ``model``.

    If the model has no LoRA layers yet they are applied with the adapter's settings (rank from the weights;
    ``lora_alpha``, ``lora_dropout``, ``use_rslora`` and ``init_lora_weights`` from the config, so a PiSSA adapter
    saved without conversion gets its residual base as PEFT would). Under ZeRO-3 call it on every rank.

    Raises:
        ValueError: A module named in the adapter is missing or not a linear, or its shape does not fit the
            adapter (the message names the module, the adapter's shapes and the base's shape); or the adapter has
            settings that are not supported (see :func:`read_peft_adapter`).
    """
    config, modules = read_peft_adapter(directory)
    present = dict(model.named_modules())
    for name, t in modules.items():
        module = present.get(name)
        if module is None:
            raise ValueError(f"the adapter adapts {name!r}, which this model does not have")
        if not isinstance(module, (nn.Linear, Conv1D, LoRALinear)):
            raise ValueError(f"the adapter adapts {name!r}, which is a {type(module).__name__}, not a linear")
        fin, fout = linear_in_out_features(module)
        a_shape, b_shape = tuple(t["A"].shape), tuple(t["B"].shape)
        if (
            len(a_shape) != 2
            or len(b_shape) != 2
            or a_shape[1] != fin
            or b_shape[0] != fout
            or a_shape[0] != b_shape[1]
        ):
            raise ValueError(
                f"adapter shapes do not fit module {name!r}: lora_A {a_shape} and lora_B {b_shape} need a base of"
                f" in={a_shape[1] if len(a_shape) == 2 else '?'}, out={b_shape[0] if b_shape else '?'}, but the"
                f" model's {name} has in={fin}, out={fout}; is this the base model the adapter was trained on?"
            )
    ranks = {int(t["A"].shape[0]) for t in modules.values()}
    if len(ranks) != 1:
        raise ValueError(f"the adapter has layers of different ranks {sorted(ranks)}; one rank is supported")
    r = ranks.pop()
    existing = lora_layers(model)
    if existing:
        missing = sorted(set(modules) - set(existing))
        if missing:
            raise ValueError(f"the model has LoRA layers but not on {missing[:5]}, which the adapter adapts")
        layers = {n: existing[n] for n in modules}
        for name, layer in layers.items():
            if layer.r != r:
                raise ValueError(f"LoRA layer {name} has r={layer.r} but the adapter has r={r}")
    else:
        init_cfg = str(config.get("init_lora_weights", True)).lower()
        layers = apply_lora(
            model,
            targets=["^" + re.escape(n) + "$" for n in modules],
            r=r,
            alpha=float(config.get("lora_alpha", 8)),
            dropout=float(config.get("lora_dropout", 0.0)),
            init="pissa" if init_cfg.startswith("pissa") else "gaussian",
            use_rslora=bool(config.get("use_rslora", False)),
            patterns=patterns,
        )
    for name, layer in layers.items():
        with gathered([layer.lora_A, layer.lora_B], modifier_rank=0):
            layer.lora_A.copy_(modules[name]["A"].to(layer.lora_A.dtype))
            layer.lora_B.copy_(modules[name]["B"].to(layer.lora_B.dtype))
