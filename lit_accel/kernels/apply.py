"""Patch a Hugging Face decoder in place so its hot path runs on ``lit_accel``'s Triton kernels.

Architectures (:data:`KERNEL_ARCHS`): LLaMA, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3 (text), Phi-3, OLMo 2,
Mixtral and Qwen3-MoE. :func:`apply_kernels` swaps, per module instance (the class and every other model are
untouched), each with the family's exact numerics:

- each ``*RMSNorm`` (pre-norms, post-norms, q/k norms and the final norm) for :func:`lit_accel.ops.rms_norm`:
  LLaMA's rounding (x_hat rounded to the input dtype, then times ``w``), Gemma's ``x_hat * (1 + w)`` computed in
  fp32 and rounded once, and OLMo 2's ``x_hat * w`` rounded once;
- each dense MLP's ``act(gate) * up`` for :func:`lit_accel.ops.swiglu`: SiLU (SwiGLU) or gelu-tanh (Gemma's GeGLU),
  on separate ``gate_proj``/``up_proj`` or on the two halves of Phi-3's fused ``gate_up_proj`` (the projections are
  still called as modules, so LoRA, 2:4 or factorised linears and their hooks keep working). Mixture-of-experts
  MLPs keep Hugging Face's experts forward (:attr:`KernelReport.notes` says so);
- the rotary embedding of q and k for :func:`lit_accel.kernels.apply_rope`, whole or partial (Phi-3's
  ``partial_rotary_factor``), with whatever frequencies the model's rotary tables hold (Llama-3 scaling, Gemma 3's
  local and global bases);
- in training mode with ``labels``, the LM head and loss for :func:`lit_accel.kernels.fused_linear_cross_entropy`,
  so the (tokens x vocabulary) logits are never materialised: such a forward returns ``logits=None``. Gemma 2's
  final-logit soft-cap is applied inside the fused loss, and mixture-of-experts models add their router's
  load-balancing loss as their own forward does. In eval mode (validation, generation) the model returns logits
  and HF's loss as before. Under DeepSpeed ZeRO-3 the head's partitioned weight (and bias) are registered as
  external parameters of the ``*ForCausalLM`` (``deepspeed.zero.register_external_parameter``), whose forward the
  fused loss runs in: ZeRO-3 gathers them for that forward and its backward and reduces their gradients into the
  partitions (see :func:`apply_kernels`).

Every patched forward dispatches per call: the Triton kernel for CUDA tensors it supports, the plain-PyTorch
reference (HF's own formula) otherwise, warning once per module when a CUDA call falls back. Module hooks (DropBP,
pruning masks) still fire because the modules are still called through ``__call__``. :func:`remove_kernels` undoes
everything. The rotary patch replaces ``apply_rotary_pos_emb`` in the architecture's ``modeling_*`` module with a
dispatcher that calls the kernel only inside the forward of an attention module patched here; other models of the
same architecture in the process keep HF's function.

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    >>> report = apply_kernels(model)
    >>> report.counts()
    {'rms_norm': 5, 'swiglu': 2, 'rope': 2, 'linear_cross_entropy': 1}
    >>> remove_kernels(model).counts()
    {'rms_norm': 5, 'swiglu': 2, 'rope': 2, 'linear_cross_entropy': 1}
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast

from lit_accel.models.structure import get_structure
from lit_accel.ops.linear_cross_entropy import (
    fused_linear_cross_entropy_fallback_reason,
    fused_linear_cross_entropy_kernel,
    linear_cross_entropy_reference,
)
from lit_accel.ops.rms_norm import rms_norm_fallback_reason, rms_norm_kernel, rms_norm_reference
from lit_accel.ops.rope import rope_fallback_reason, rope_kernel
from lit_accel.ops.swiglu import Activation, swiglu_fallback_reason, swiglu_kernel

__all__ = ["KERNEL_ARCHS", "KERNEL_NAMES", "KernelReport", "apply_kernels", "kernels_applied", "remove_kernels"]

KERNEL_NAMES: tuple[str, ...] = ("rms_norm", "swiglu", "rope", "linear_cross_entropy")
"""The kernels :func:`apply_kernels` can switch on, by the name its keyword arguments use."""

KERNEL_ARCHS: tuple[str, ...] = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "olmo2",
    "mixtral",
    "qwen3_moe",
)
"""``config.model_type`` values whose modules :func:`apply_kernels` knows how to patch."""

_GEMMA_ARCHS = ("gemma", "gemma2", "gemma3_text")
"""Architectures whose RMSNorm computes ``x_hat * (1 + w)`` in fp32 and then rounds (the others round x_hat first and
multiply by ``w``)."""

_MARK = "_lit_accel_kernel"  # instance attribute naming the kernel a module's forward was patched with
_ACTIVATIONS: dict[str, Activation] = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
"""``config.hidden_act`` (``hidden_activation`` for Gemma) -> the gated-MLP kernel's activation."""


@dataclass
class KernelReport:
    """What :func:`apply_kernels` (or :func:`remove_kernels`) did.

    Example:
        >>> KernelReport(patched={"rms_norm": ["model.norm"]}).counts()
        {'rms_norm': 1}
    """

    patched: dict[str, list[str]] = field(default_factory=dict)
    """Kernel name -> qualified names of the modules patched (or restored) for it."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Kernel name -> why it was not applied anywhere (e.g. the MLP activation is neither SiLU nor gelu-tanh)."""
    notes: dict[str, str] = field(default_factory=dict)
    """Kernel name -> what it left out where it was applied (e.g. the experts of a mixture-of-experts MLP)."""

    def counts(self) -> dict[str, int]:
        """Number of modules per kernel, in :data:`KERNEL_NAMES` order."""
        order = {name: i for i, name in enumerate(KERNEL_NAMES)}
        return {name: len(self.patched[name]) for name in sorted(self.patched, key=lambda n: order.get(n, len(order)))}


# --------------------------------------------------------------------------------------------------------------
# Per-call dispatch helpers
# --------------------------------------------------------------------------------------------------------------


def _warn_fallback(module: nn.Module, kernel: str, reason: str) -> None:
    # Once per module instance and kernel: the record lives on the module, so another model in the process (or a
    # new module at a recycled id) still gets its own warning.
    warned = module.__dict__.setdefault("_lit_accel_warned", set())
    if kernel in warned:
        return
    warned.add(kernel)
    name = getattr(module, "_lit_accel_name", type(module).__name__)
    warnings.warn(
        f"lit_accel kernels: {name} runs the PyTorch reference instead of the {kernel} Triton kernel: {reason}",
        stacklevel=3,
    )


_reasons: dict[tuple[Any, ...], str | None] = {}


def _cached_reason(key: tuple[Any, ...], compute: Callable[[], str | None]) -> str | None:
    # Whether a kernel takes an input depends only on dtypes, devices, widths and flags that are all in the key, so
    # the argument checks run once per combination instead of on every call (each patched forward runs dozens of
    # times per step). The answer is a pure function of the key: sharing it between models is safe.
    if key not in _reasons:
        _reasons[key] = compute()
    return _reasons[key]


def _sig(*tensors: torch.Tensor | None) -> tuple[Any, ...]:
    return tuple(None if t is None else (t.dtype, t.device, t.shape[-1], t.dim(), t.numel() == 0) for t in tensors)


def _kernel_device(t: torch.Tensor) -> bool:
    # Under TRITON_INTERPRET=1 the kernels also take CPU tensors (that is how CI tests them end to end).
    return t.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


def _autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    if t.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return None


def _rms_norm_forward(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    weight = self.weight
    eps, offset, cast_mode = self.__dict__["_lit_accel_norm"]
    if _kernel_device(hidden_states):
        # Under autocast the output of every patched norm is either read by linears, which cast to the autocast
        # dtype anyway (pre-norms, the final norm), or has that dtype in HF too, because its input came out of an
        # autocast linear (post-norms and q/k norms). So writing that dtype directly halves the store of an fp32
        # residual stream without changing any value downstream.
        out_dtype = _autocast_dtype(hidden_states)
        reason = _cached_reason(
            ("rms_norm", out_dtype, cast_mode, *_sig(hidden_states, weight)),
            lambda: rms_norm_fallback_reason(
                hidden_states, weight, out_dtype, weight_offset=offset, cast_mode=cast_mode
            ),
        )
        if reason is not None:
            _warn_fallback(self, "rms_norm", reason)
            return rms_norm_reference(hidden_states, weight, eps, weight_offset=offset, cast_mode=cast_mode)
        # Checked once per signature above.
        return rms_norm_kernel(hidden_states, weight, eps, out_dtype, weight_offset=offset, cast_mode=cast_mode)
    return rms_norm_reference(hidden_states, weight, eps, weight_offset=offset, cast_mode=cast_mode)


def _gated_mlp_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    activation, fused = self.__dict__["_lit_accel_mlp"]
    if fused:
        # Phi-3's one gate_up_proj: its output is [gate | up]; the kernel reads the two halves in place.
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        act_fn = self.activation_fn
    else:
        gate, up = self.gate_proj(x), self.up_proj(x)
        act_fn = self.act_fn
    if _kernel_device(gate):
        reason = _cached_reason(
            ("swiglu", activation, *_sig(gate, up)),
            lambda: swiglu_fallback_reason(gate, up, activation),
        )
        if reason is None:
            return self.down_proj(swiglu_kernel(gate, up, activation))  # checked once per signature above
        _warn_fallback(self, "swiglu", reason)
    return self.down_proj(act_fn(gate) * up)


# The rotary dispatcher is installed once per modeling module; a thread-local depth counter says whether the
# current call comes from inside an attention forward that apply_kernels patched.
_rope_state = threading.local()
_rope_originals: dict[str, Callable[..., Any]] = {}


def _rope_active() -> bool:
    return getattr(_rope_state, "depth", 0) > 0


def _make_rope_dispatcher(original: Callable[..., Any]) -> Callable[..., Any]:
    def apply_rotary_pos_emb(
        q: torch.Tensor,
        k: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        position_ids: Any = None,
        unsqueeze_dim: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not _rope_active() or not _kernel_device(q):
            if position_ids is None:
                return original(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)  # type: ignore[no-any-return]
            return original(q, k, cos, sin, position_ids, unsqueeze_dim)  # type: ignore[no-any-return]
        # HF's result is fp32 under bf16-mixed (bf16 q times fp32 cos); attention casts it to the autocast dtype
        # anyway, so the kernel writes that dtype directly (same values: fp32 math, one rounding).
        out_dtype = _autocast_dtype(q)
        grad_cos = torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad)
        reason = _cached_reason(
            ("rope", unsqueeze_dim, out_dtype, grad_cos, *_sig(q, k, cos, sin)),
            lambda: rope_fallback_reason(q, k, cos, sin, unsqueeze_dim, out_dtype),
        )
        if reason is not None:
            _warn_fallback(_rope_state.module, "rope", reason)
            return original(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)  # type: ignore[no-any-return]
        return rope_kernel(q, k, cos, sin, unsqueeze_dim, out_dtype)  # checked once per signature above

    apply_rotary_pos_emb._lit_accel_original = original  # type: ignore[attr-defined]
    return apply_rotary_pos_emb


def _install_rope_dispatcher(modeling: types.ModuleType) -> None:
    current = getattr(modeling, "apply_rotary_pos_emb")  # noqa: B009  (mypy: a module attribute)
    if getattr(current, "_lit_accel_original", None) is None:
        _rope_originals[modeling.__name__] = current
        setattr(modeling, "apply_rotary_pos_emb", _make_rope_dispatcher(current))  # noqa: B010


def _attention_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
    _rope_state.depth = getattr(_rope_state, "depth", 0) + 1
    previous = getattr(_rope_state, "module", None)
    _rope_state.module = self
    try:
        return self.__dict__["_lit_accel_inner_forward"](*args, **kwargs)
    finally:
        _rope_state.depth -= 1
        _rope_state.module = previous


def _shifted_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    # HF's ForCausalLMLoss: pad one ignored label at the end, then drop the first, so token t predicts label t+1.
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def _causal_lm_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
    inner = self.__dict__["_lit_accel_inner_forward"]
    labels = kwargs.get("labels")
    logits_to_keep = kwargs.get("logits_to_keep", 0)
    head = self.lm_head
    use_fused = (
        self.training
        and labels is not None
        # Only input_ids may come by position (every *ForCausalLM takes it first); anything else keeps HF's path.
        and len(args) <= 1
        and not (args and "input_ids" in kwargs)
        and isinstance(logits_to_keep, int)
        and logits_to_keep == 0
    )
    if not use_fused:
        return inner(*args, **kwargs)
    if type(head) is not nn.Linear:
        # The head changed after apply_kernels (e.g. LoRA or factorisation on lm_head): its own forward must run, or
        # the fused loss would silently skip the adapter.
        _warn_fallback(self, "linear_cross_entropy", f"lm_head is now a {type(head).__name__}")
        return inner(*args, **kwargs)
    reason = _head_not_gathered(head)
    if reason is not None:
        _warn_fallback(self, "linear_cross_entropy", reason)
        return inner(*args, **kwargs)  # lm_head's own forward gathers its partitioned weight
    kwargs = dict(kwargs)
    if args:
        kwargs["input_ids"] = args[0]
    kwargs.pop("labels")
    kwargs.pop("logits_to_keep", None)
    num_items = kwargs.get("num_items_in_batch")
    config = self.config
    # Mixture-of-experts models add the router's load-balancing loss, as their own forward does.
    router_aux = getattr(config, "router_aux_loss_coef", None) is not None and bool(
        kwargs.get("output_router_logits", getattr(config, "output_router_logits", False))
    )
    if router_aux:
        kwargs["output_router_logits"] = True
    outputs = self.model(**kwargs)
    hidden = outputs.last_hidden_state
    assert labels is not None
    targets = _shifted_labels(labels).to(hidden.device)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    # Gemma 2 soft-caps the final logits (``cap * tanh(logits / cap)``) before its loss; the fused loss does the same.
    softcap = getattr(config, "final_logit_softcapping", None)
    if _kernel_device(hidden):
        reason = _cached_reason(
            ("linear_cross_entropy", _autocast_dtype(flat_hidden), *_sig(flat_hidden, head.weight, head.bias)),
            lambda: fused_linear_cross_entropy_fallback_reason(flat_hidden, head.weight, flat_targets, head.bias),
        )
        if reason is None:
            # Checked once per signature above; labels come from HF's shift and lie in [0, V) or are ignored.
            loss = fused_linear_cross_entropy_kernel(
                flat_hidden, head.weight, flat_targets, head.bias, num_items_in_batch=num_items, softcap=softcap
            )
        else:
            _warn_fallback(self, "linear_cross_entropy", reason)
            loss = linear_cross_entropy_reference(
                flat_hidden, head.weight, flat_targets, head.bias, num_items_in_batch=num_items, softcap=softcap
            )
    else:
        loss = linear_cross_entropy_reference(
            flat_hidden, head.weight, flat_targets, head.bias, num_items_in_batch=num_items, softcap=softcap
        )
    loss = cast("torch.Tensor", loss)  # without return_z_loss both paths return the loss alone
    if router_aux:
        # The causal LM's own modeling module (loaded: its class lives there) defines the loss its forward adds.
        aux_loss = sys.modules[type(self).__module__].load_balancing_loss_func(
            outputs.router_logits, self.num_experts, self.num_experts_per_tok, kwargs.get("attention_mask")
        )
        loss = loss + self.router_aux_loss_coef * aux_loss.to(loss.device)
        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=None,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
        )
    return CausalLMOutputWithPast(
        loss=loss, logits=None, hidden_states=outputs.hidden_states, attentions=outputs.attentions
    )


# --------------------------------------------------------------------------------------------------------------
# Finding and patching modules
# --------------------------------------------------------------------------------------------------------------


def _find_causal_lm(model: nn.Module) -> tuple[str, nn.Module] | None:
    for name, module in model.named_modules():
        if type(module).__name__.endswith("ForCausalLM") and hasattr(module, "lm_head") and hasattr(module, "model"):
            return name, module
    return None


def _patch(module: nn.Module, name: str, kernel: str, forward: Callable[..., Any]) -> bool:
    if module.__dict__.get(_MARK) == kernel:
        return False
    # A forward another tool set on the instance (rather than the class) is kept: wrapping forwards call it, and
    # remove_kernels puts it back.
    module.__dict__["_lit_accel_previous_forward"] = module.__dict__.get("forward")
    module.__dict__["_lit_accel_inner_forward"] = module.forward
    module.forward = types.MethodType(forward, module)  # type: ignore[method-assign]
    module.__dict__[_MARK] = kernel
    module.__dict__["_lit_accel_name"] = name
    return True


def _is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


_EXTERNAL = "_lit_accel_external"  # instance attribute: the parameters registered below, to unregister them


def _head_params(head: nn.Module) -> list[torch.Tensor]:
    # What the fused loss reads from the head outside the head's forward: its weight (under tied embeddings the
    # embedding's weight: the same Parameter) and its bias. The final norm and everything else it reads runs inside
    # a module's forward (self.model), where ZeRO-3 gathers them itself.
    return [p for p in (head.weight, getattr(head, "bias", None)) if isinstance(p, torch.Tensor)]


def _register_external(lm: nn.Module, head: nn.Module) -> str | None:
    """Registers the partitioned parameters of ``head`` as ZeRO-3 external parameters of ``lm``.

    ZeRO-3 gathers a module's own parameters in that module's forward pre-hook and releases them after its forward;
    the fused loss reads ``lm_head.weight`` in ``lm``'s forward, outside ``lm_head``'s. Registered as an external
    parameter of ``lm``, the weight is gathered by ``lm``'s forward pre-hook, kept while ``lm``'s forward runs (also
    through a tied embedding's own gather and release inside it), gathered again by ``lm``'s pre-backward hook and
    its gradient reduced into the partitions like any other. Registration only records the parameter on ``lm``
    (no communication), but every rank must do it, or the ranks would gather different parameters: every rank runs
    :func:`apply_kernels` on the same model.

    Returns:
        None once registered, else why it cannot be.
    """
    params = [p for p in _head_params(head) if _is_partitioned(p)]
    if not params:
        return None
    not_params = [type(p).__name__ for p in params if not isinstance(p, nn.Parameter)]
    if not_params:
        return f"lm_head holds a partitioned {not_params[0]} that is not an nn.Parameter"
    try:
        # Deferred: DeepSpeed is optional and slow to import; it is installed whenever a parameter is partitioned.
        from deepspeed.runtime.zero.partition_parameters import register_external_parameter
    except ImportError as err:
        return f"deepspeed.zero.register_external_parameter cannot be imported ({err})"
    registered = lm.__dict__.setdefault(_EXTERNAL, {})
    for p in params:
        register_external_parameter(lm, p)
        registered[id(p)] = p
    return None


def _unregister_external(lm: nn.Module) -> None:
    registered = lm.__dict__.pop(_EXTERNAL, None)
    if not registered:
        return
    # Deferred: only reached where apply_kernels registered a partitioned parameter, so DeepSpeed is installed.
    from deepspeed.runtime.zero.partition_parameters import unregister_external_parameter

    for p in registered.values():
        if id(p) in getattr(lm, "_external_params", {}):
            unregister_external_parameter(lm, p)


def _head_not_gathered(head: nn.Module) -> str | None:
    """None when every parameter the fused loss reads from ``head`` holds its whole tensor now, else why not.

    Under ZeRO-3 a partitioned parameter is whole while a module that owns it, or registered it as an external
    parameter, runs its forward: here the ``*ForCausalLM``, where :func:`apply_kernels` registered it. A weight
    partitioned only after :func:`apply_kernels` (a model built outside ``zero.Init`` and partitioned by
    ``deepspeed.initialize``) is gathered too: inside the engine's forward DeepSpeed gathers a partitioned parameter
    that is read outside its module's forward and registers it with the module running (DeepSpeed >= 0.19.8, which
    lit_accel requires). What is left is a forward run outside the engine or without the module hooks
    (``lm.forward(...)`` rather than ``lm(...)``).
    """
    # A partitioned parameter's ds_shape is its whole shape; between gathers it holds an empty tensor.
    params = _head_params(head)
    if all(not _is_partitioned(p) or p.shape == p.ds_shape for p in params):  # type: ignore[attr-defined]
        return None
    return (
        "lm_head.weight is partitioned by DeepSpeed ZeRO-3 and was not gathered for this forward (run outside"
        " DeepSpeed's engine or without the module's hooks); Hugging Face's head and loss run"
    )


def apply_kernels(
    model: nn.Module,
    *,
    rms_norm: bool = True,
    swiglu: bool = True,
    rope: bool = True,
    linear_cross_entropy: bool = True,
    strict: bool = False,
) -> KernelReport:
    """Patch ``model``'s modules in place to use the Triton kernels (see the module docstring).

    Idempotent: modules already patched are left alone. Safe on CPU: every patched forward runs HF's formula
    (the kernels' references) on CPU tensors.

    Args:
        model: A Hugging Face model of an architecture in :data:`KERNEL_ARCHS` (``*ForCausalLM`` or the base
            ``*Model``), possibly wrapped (PEFT, a LightningModule's ``.model``).
        rms_norm: Patch every RMSNorm.
        swiglu: Patch every dense gated MLP whose activation is SiLU or gelu-tanh (SwiGLU or GeGLU).
        rope: Patch the rotary embedding of every attention module.
        linear_cross_entropy: Patch the ``*ForCausalLM`` forward so training steps with labels use the fused
            LM head + loss (not applied when ``lm_head`` is not a plain ``nn.Linear``, e.g. adapted by LoRA: then
            HF's head and loss run, with a warning). Under DeepSpeed ZeRO-3 (``lm_head.weight`` already partitioned,
            as for a model built in ``configure_model`` under ``zero.Init``) the head's weight, which a tied
            embedding shares, and bias are registered as external parameters of the ``*ForCausalLM``, so that its
            forward pre-hook gathers them (call it on every rank, as any model surgery under ZeRO-3). A weight
            partitioned only after this call is gathered and registered by DeepSpeed's engine itself, in the first
            forward that reads it.
        strict: Raise instead of warning when the architecture or a requested kernel cannot be applied.

    Returns:
        A :class:`KernelReport` of the modules patched and the kernels skipped with their reason.

    Raises:
        ValueError: ``strict`` and the architecture is not one of :data:`KERNEL_ARCHS`, or a requested kernel
            cannot be applied.
    """
    requested = {"rms_norm": rms_norm, "swiglu": swiglu, "rope": rope, "linear_cross_entropy": linear_cross_entropy}
    for key, value in requested.items():
        if not isinstance(value, bool):
            raise TypeError(f"apply_kernels: {key} must be True or False; got {value!r}")
    report = KernelReport()

    def skip(kernel: str, reason: str) -> None:
        if strict:
            raise ValueError(f"apply_kernels: cannot apply {kernel}: {reason}")
        report.skipped[kernel] = reason
        warnings.warn(f"lit_accel kernels: {kernel} not applied: {reason}", stacklevel=3)

    config = getattr(model, "config", None)
    found = _find_causal_lm(model)
    if config is None and found is not None:
        config = getattr(found[1], "config", None)
    if config is None:
        for module in model.modules():
            config = getattr(module, "config", None)
            if config is not None:
                break
    arch = getattr(config, "model_type", None)
    if arch not in KERNEL_ARCHS:
        reason = f"config.model_type={arch!r} is not supported; supported: {', '.join(KERNEL_ARCHS)}"
        for kernel, wanted in requested.items():
            if wanted:
                skip(kernel, reason)
        return report

    structure = get_structure(model)
    names = {id(m): n for n, m in model.named_modules()}
    # The module that defines the attention class is the one whose ``apply_rotary_pos_emb`` that attention calls
    # (``gemma3_text`` lives in ``transformers.models.gemma3``).
    modeling = importlib.import_module(type(structure.blocks[0].attention.module).__module__)

    if rms_norm:
        # Pre-norms, post-norms (Gemma 2/3, OLMo 2), q/k norms (Qwen3, Gemma 3, OLMo 2) and the final norm.
        norm_names = [n for sub in structure.sublayers() for n in sub.norm_names]
        if structure.final_norm_name is not None:
            norm_names.append(structure.final_norm_name)
        norms = [model.get_submodule(n) for n in norm_names]
        done = report.patched.setdefault("rms_norm", [])
        offset, cast_mode = (1.0, "gemma") if arch in _GEMMA_ARCHS else (0.0, "llama")
        if arch == "olmo2":
            cast_mode = "gemma"  # OLMo 2 multiplies by the weight in fp32 and rounds after, as Gemma does
        for norm in norms:
            eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
            if not (isinstance(eps, float) and isinstance(getattr(norm, "weight", None), torch.Tensor)):
                skip("rms_norm", f"{names[id(norm)]} ({type(norm).__name__}) is not an RMSNorm with weight and eps")
                continue
            _patch(norm, names[id(norm)], "rms_norm", _rms_norm_forward)
            norm.__dict__["_lit_accel_norm"] = (float(eps), offset, cast_mode)
            done.append(names[id(norm)])

    if swiglu:
        act_name = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
        activation = _ACTIVATIONS.get(str(act_name))
        if activation is None:
            skip(
                "swiglu",
                f"config.hidden_act={act_name!r}; the gated-MLP kernel takes one of {sorted(_ACTIVATIONS)}",
            )
        else:
            done = report.patched.setdefault("swiglu", [])
            moe_blocks = []
            for block in structure.blocks:
                mlp = block.mlp.module
                if block.mlp.experts is not None:
                    moe_blocks.append(block.mlp.name)
                    continue
                fused = hasattr(mlp, "gate_up_proj") and hasattr(mlp, "activation_fn")
                if not fused and not all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
                    skip("swiglu", f"{block.mlp.name} has no gate_proj/up_proj/down_proj/act_fn or gate_up_proj")
                    continue
                _patch(mlp, block.mlp.name, "swiglu", _gated_mlp_forward)
                mlp.__dict__["_lit_accel_mlp"] = (activation, fused)
                done.append(block.mlp.name)
            if moe_blocks:
                # Experts run inside HF's experts module (a loop over 3-D weights), which no kernel here replaces.
                report.notes["swiglu"] = (
                    f"{len(moe_blocks)} mixture-of-experts MLPs keep Hugging Face's experts forward"
                )
                if not done:
                    report.patched.pop("swiglu")

    if rope:
        if not hasattr(modeling, "apply_rotary_pos_emb"):
            skip("rope", f"{modeling.__name__} has no apply_rotary_pos_emb")
        else:
            _install_rope_dispatcher(modeling)
            done = report.patched.setdefault("rope", [])
            for block in structure.blocks:
                _patch(block.attention.module, block.attention.name, "rope", _attention_forward)
                done.append(block.attention.name)

    if linear_cross_entropy:
        if found is None:
            skip("linear_cross_entropy", f"{type(model).__name__} holds no *ForCausalLM with an lm_head")
        else:
            name, lm = found
            head = lm.lm_head
            if type(head) is not nn.Linear:
                skip("linear_cross_entropy", f"lm_head is a {type(head).__name__}, not a plain nn.Linear")
            elif (unregistered := _register_external(lm, head)) is not None:
                skip("linear_cross_entropy", f"lm_head.weight is partitioned by DeepSpeed ZeRO-3 and {unregistered}")
            else:
                _patch(lm, name or type(lm).__name__, "linear_cross_entropy", _causal_lm_forward)
                report.patched.setdefault("linear_cross_entropy", []).append(name or type(lm).__name__)
    return report


def remove_kernels(model: nn.Module) -> KernelReport:
    """Undo :func:`apply_kernels` on ``model``: every patched module runs its class's forward again.

    The rotary dispatcher stays installed in the ``modeling_*`` module; with no patched attention module it
    calls HF's function, so behaviour is HF's.
    """
    report = KernelReport()
    for name, module in model.named_modules():
        kernel = module.__dict__.pop(_MARK, None)
        if kernel is None:
            continue
        previous = module.__dict__.pop("_lit_accel_previous_forward", None)
        module.__dict__.pop("forward", None)
        if previous is not None:
            module.forward = previous  # type: ignore[method-assign]
        for key in ("_lit_accel_name", "_lit_accel_inner_forward", "_lit_accel_norm", "_lit_accel_mlp"):
            module.__dict__.pop(key, None)
        _unregister_external(module)
        report.patched.setdefault(kernel, []).append(name)
    return report


def kernels_applied(model: nn.Module) -> dict[str, int]:
    """Kernel name -> number of modules of ``model`` currently patched with it."""
    counts: dict[str, int] = {}
    for module in model.modules():
        kernel = module.__dict__.get(_MARK)
        if kernel is not None:
            counts[kernel] = counts.get(kernel, 0) + 1
    return counts
