"""LoRA: low-rank adapters on the linears of a causal LM, numerically equal to PEFT's.

The functional core (no Lightning): :func:`apply_lora` wraps the selected linears in :class:`LoRALinear` and freezes
everything else; :func:`merge_lora` / :func:`unmerge_lora` fold the adapters into the base weights and back;
:func:`remove_lora` gives back a plain Hugging Face model. PEFT's adapter files and the merged state dict of an
export are in :mod:`lit_accel.lowrank.lora_io`; the q/k/v and gate/up layers that share an input run as a
:class:`~lit_accel.lowrank.lora_groups.SharedInputGroup` on CUDA.

Families: every one :func:`~lit_accel.models.structure.get_structure` knows. Phi-3's fused ``qkv_proj`` and
``gate_up_proj`` are one linear each (one adapter each, PEFT's layout; nothing to group). In Mixtral and Qwen3-MoE
the experts' weights are 3-D tensors, not linears, so the experts stay frozen without adapters and the router is
never adapted: the attention (and Qwen3-MoE's dense ``mlp_only_layers``) are adapted, with a warning naming the
mixture-of-experts blocks (see :func:`~lit_accel.models.surgery.match_linears`).

A wrapped linear keeps the original module at ``.base_layer`` (so :func:`~lit_accel.models.structure.is_linear`
still sees one linear under its original name) and holds two parameters: ``lora_A`` ``[r, in]`` and ``lora_B``
``[out, r]``. Its state-dict keys are ``<name>.base_layer.weight`` (``.bias``), ``<name>.lora_A`` and
``<name>.lora_B``. The forward is ``base(x) + scaling * (dropout(x) @ A^T) @ B^T`` with ``scaling = alpha / r``
(``alpha / sqrt(r)`` with rsLoRA), computed as :func:`lit_accel.ops.lora.lora_linear` does (the fused cuBLAS path
on CUDA, PEFT's own computation elsewhere; ``LoRALinear.use_kernel`` chooses otherwise); on the PEFT path dropout
draws one ``F.dropout`` mask per call, as PEFT does, so a seeded run consumes the same random numbers.

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

import math
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lit_accel.lowrank.lora_groups import SharedInputGroup
from lit_accel.models.params import gathered, is_partitioned
from lit_accel.models.structure import StructurePatterns, get_structure, linear_in_out_features
from lit_accel.models.surgery import match_linears, replace_module
from lit_accel.ops.lora import lora_linear, lora_linear_unchecked, lora_linear_uses_fused
from lit_accel.ops.recompute import request_recompute

__all__ = [
    "LORA_INITS",
    "LoRALinear",
    "apply_lora",
    "gathered_lora_layers",
    "group_shared_inputs",
    "lora_layers",
    "lora_parameters",
    "lora_state_dict",
    "merge_lora",
    "parse_dtype",
    "remove_lora",
    "unmerge_lora",
]

LORA_INITS = ("gaussian", "pissa")
"""Adapter initialisations: ``gaussian`` (PEFT's default ``init_lora_weights=True``: A kaiming-uniform, B zero)
and ``pissa`` (principal singular vectors; the base keeps the residual)."""

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
        init: ``"gaussian"`` or ``"pissa"`` (recorded; used by :func:`~lit_accel.lowrank.save_peft_adapter`).
        recompute_input: On the fused CUDA path, rebuild the input in the backward from the saved inputs of the
            fused kernel that produced it (RMSNorm, SwiGLU) instead of keeping it from the forward (see
            :func:`~lit_accel.ops.lora.lora_linear`): less activation memory, one extra memory-bound kernel.
            Off for a layer built directly; :func:`apply_lora` and the LoRA callback turn it on by default.

    Raises:
        TypeError: ``base_layer`` is not an ``nn.Linear`` or ``Conv1D``.
        ValueError: ``r``, ``alpha`` or ``dropout`` out of range (the message names it and what is allowed).

    Example:
        >>> layer = LoRALinear(nn.Linear(16, 8), r=2, alpha=4)
        >>> layer(torch.randn(3, 16)).shape, layer.scaling
        (torch.Size([3, 8]), 2.0)
    """

    lora_A0: torch.Tensor | None
    lora_B0: torch.Tensor | None

    use_kernel: bool | None = None
    """The forward's path, as :func:`~lit_accel.ops.lora.lora_linear`'s ``use_kernel``: None (default) the fused
    cuBLAS path on CUDA in bf16/fp16 and PEFT's exact computation elsewhere; True the fused path on any device (how
    the CPU tests run it); False PEFT's computation everywhere (the layer's shared-input group steps aside too)."""

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
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout={dropout!r} is not allowed; dropout must be in [0, 1)")
        if not math.isfinite(_scaling(int(r), float(alpha), bool(use_rslora))):
            raise ValueError(f"alpha={alpha!r} is not allowed; alpha must be a finite number")
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
        # Input signature -> whether the forward takes the fused path (see _uses_fused).
        self._paths: dict[tuple[Any, ...], bool] = {}
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
            import deepspeed  # deferred: a heavy optional dependency, present whenever a weight is partitioned

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
    def base_tensors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
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

    def _uses_fused(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
        """Whether this call takes the fused path, decided (and the arguments checked) once per input signature.

        The key holds everything :func:`~lit_accel.ops.lora.lora_linear_uses_fused` looks at (dtypes, devices,
        widths, ``requires_grad``, the grad and autocast modes, the settings a user may reassign), never values.
        """
        dev = x.device
        key = (
            x.dtype,
            dev,
            x.shape[-1:],
            x.numel() == 0,
            torch.is_grad_enabled(),
            torch.is_autocast_enabled(dev.type),
            torch.get_autocast_dtype(dev.type),
            weight.dtype,
            weight.device,
            weight.requires_grad,
            None if bias is None else (bias.dtype, bias.requires_grad),
            self.lora_A.device,
            self.lora_B.device,
            self.dropout,
            self.use_kernel,
        )
        fused = self._paths.get(key)
        if fused is None:
            fused = lora_linear_uses_fused(
                x, weight, bias, self.lora_A, self.lora_B, self.scaling, self.dropout, self.weight_layout,
                self.use_kernel,
            )  # fmt: skip
            if len(self._paths) >= 64:  # a layer meets a handful of signatures; never let the table grow unbounded
                self._paths.clear()
            self._paths[key] = fused
        return fused

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        if self.shared_input_group is not None and not args and not kwargs:
            y = self.shared_input_group.output(self, x)
            if y is not None:
                return y
        weight, bias = self.base_tensors(x)
        if torch.compiler.is_compiling():
            # A traced graph guards on what the choice depends on anyway; a dict on the module would only add guards.
            return lora_linear(
                x, weight, bias, self.lora_A, self.lora_B, self.scaling, self.dropout, self.training,
                self.weight_layout, self.use_kernel, self.recompute_input,
            )  # fmt: skip
        return lora_linear_unchecked(
            x, weight, bias, self.lora_A, self.lora_B, self.scaling, self.dropout, self.training, self.weight_layout,
            self._uses_fused(x, weight, bias), self.recompute_input,
        )  # fmt: skip


def group_shared_inputs(model: nn.Module, patterns: StructurePatterns | None = None) -> list[SharedInputGroup]:
    """Groups the :class:`LoRALinear` layers of each block that read one input (q/k/v; gate/up).

    :func:`apply_lora` calls it; call it again after replacing layers by hand. A model whose structure is not
    known (no supported architecture, no ``patterns``) gets no groups: every layer then runs on its own. A fused
    projection (GPT-2's ``c_attn``, Phi-3's ``qkv_proj`` and ``gate_up_proj``: roles ``qkv``, ``gate_up``) is already
    one linear reading its input once, so it joins no group; a mixture-of-experts MLP has no adapted linears.

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
        model: A Hugging Face causal LM of a supported family (LLaMA, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3, OLMo 2,
            Mixtral, Qwen3-MoE, GPT-2), or any transformer with ``patterns``.
        targets: ``"attention"``, ``"mlp"``, ``"all-linear"``, role names (``q``, ``k``, ``v``, ``o``, ``gate``,
            ``up``, ``down``; GPT-2 and Phi-3 ``qkv``, Phi-3 ``gate_up``), module-name suffixes (``q_proj``) or regular
            expressions over qualified names (see :func:`~lit_accel.models.surgery.match_linears`). The LM head is
            never adapted. Phi-3's fused ``qkv_proj`` / ``gate_up_proj`` get one adapter each, as PEFT gives them.
            In Mixtral and Qwen3-MoE the experts' weights are 3-D tensors, not linears: they stay frozen without
            adapters (a warning names the blocks), the router is never adapted, and ``targets`` that select
            nothing else (``"mlp"`` on Mixtral) are a ``ValueError``.
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
            ``targets`` matching nothing (the message lists the model's linears, or says that only
            mixture-of-experts MLPs were selected); ``r`` larger than a selected linear allows (the message names
            the layer and its shape).
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
    selected = match_linears(model, targets, patterns=patterns, technique="LoRA")
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


def gathered_lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Yields each LoRA layer with its parameters gathered (read-only) under ZeRO-3."""
    for name, layer in lora_layers(model).items():
        with gathered(layer._params()):
            yield name, layer


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<name>.lora_A": ..., "<name>.lora_B": ...}``: the adapters on CPU (whole under ZeRO-3: call on all ranks)."""
    state: dict[str, torch.Tensor] = {}
    for name, layer in gathered_lora_layers(model):
        state[f"{name}.lora_A"] = layer.lora_A.detach().to("cpu").clone()
        state[f"{name}.lora_B"] = layer.lora_B.detach().to("cpu").clone()
    return state
