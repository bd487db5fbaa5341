"""Shared plumbing for techniques that change a model's modules (LoRA, SVD factorisation, 2:4 sparsity).

- :func:`find_hf_model`: the ``nn.Module`` a LightningModule trains (its one Hugging Face model, whatever the
  attribute, or the module itself).
- :func:`run_after_configure_model`: run a function on the model right after ``configure_model`` builds it, which is
  before Lightning builds the optimizer and before the strategy wraps or shards the model, so the optimizer only
  ever sees the final parameters and DeepSpeed ZeRO-3 partitions new ones like any other.
- :func:`match_linears`: which decoder-block linears a ``targets`` argument selects (presets, roles or name patterns)
  on every supported family, with an error that lists the model's linears when nothing matches; a mixture of
  experts' MLP (Mixtral, Qwen3-MoE) has no linears to select (its experts are 3-D tensors, its router is never
  selected), which a warning or, when nothing else is selected, the error says.
- :func:`replace_module`: swap a submodule by qualified name.

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
    ...                                      num_attention_heads=4, vocab_size=128))
    >>> sorted(match_linears(model, "attention"))[:2]
    ['model.layers.0.self_attn.k_proj', 'model.layers.0.self_attn.o_proj']
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from transformers import PreTrainedModel

from lit_accel.models.params import full_shape
from lit_accel.models.structure import ModelStructure, StructurePatterns, Sublayer, get_structure

__all__ = [
    "MODEL_ATTR",
    "ROLES",
    "TARGET_PRESETS",
    "find_hf_model",
    "match_linears",
    "replace_module",
    "run_after_configure_model",
]

TARGET_PRESETS = ("attention", "mlp", "all-linear")
"""``targets`` presets: the attention projections, the MLP projections, or every decoder-block linear (Phi-3's fused
``qkv_proj`` / ``gate_up_proj`` included; a mixture of experts' MLP has none: see :func:`match_linears`)."""


MODEL_ATTR = "lit_accel_model_attr"
"""A LightningModule may name the attribute that holds its model in this class attribute (``"net"``)."""


def _outermost_hf_models(root: nn.Module) -> list[tuple[str, nn.Module]]:
    found: list[tuple[str, nn.Module]] = []
    inside: list[str] = []
    for name, module in root.named_modules():
        if not name or any(name == p or name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, PreTrainedModel):
            found.append((name, module))
            inside.append(name)
    return found


def find_hf_model(pl_module: nn.Module) -> nn.Module:
    """The model a LightningModule trains, for the techniques to work on.

    In order: the attribute named by the module's ``lit_accel_model_attr`` (e.g. ``lit_accel_model_attr =
    "net"``); its ``.model`` when that is a module (``CausalLM``); the one Hugging Face ``PreTrainedModel`` among
    its submodules, whatever the attribute is called; else the module itself (a LightningModule that is the model,
    or one that ``structure`` patterns describe).

    Raises:
        ValueError: When ``lit_accel_model_attr`` names no module, or several Hugging Face models are held (the
            message names them and how to pick one).

    Example:
        >>> import lightning as L
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> class Module(L.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64,
        ...             num_hidden_layers=1, num_attention_heads=2, vocab_size=64))
        >>> type(find_hf_model(Module())).__name__
        'LlamaForCausalLM'
    """
    attr = getattr(type(pl_module), MODEL_ATTR, None)
    if attr is not None:
        named = getattr(pl_module, attr, None)
        if not isinstance(named, nn.Module):
            raise ValueError(
                f"{type(pl_module).__name__}.{MODEL_ATTR}={attr!r}, but the module's {attr!r} is"
                f" {type(named).__name__}, not an nn.Module; name the attribute that holds the model."
            )
        return named
    inner = getattr(pl_module, "model", None)
    if isinstance(inner, nn.Module):
        return inner
    held = _outermost_hf_models(pl_module)
    if len(held) > 1:
        names = ", ".join(f"{name} ({type(m).__name__})" for name, m in held)
        raise ValueError(
            f"{type(pl_module).__name__} holds several Hugging Face models ({names}); name the one to train in a"
            f" class attribute: {MODEL_ATTR} = {held[0][0]!r}."
        )
    return held[0][1] if held else pl_module


def run_after_configure_model(pl_module: L.LightningModule, fn: Callable[[nn.Module], Any], tag: str) -> None:
    """Arranges for ``fn(model)`` to run right after ``pl_module.configure_model()`` (call it from a callback's
    ``setup``). If the model already exists (built in ``__init__``, or ``configure_model`` already ran), ``fn`` runs
    at the end of the next ``configure_model`` call all the same, which Lightning makes before the optimizer exists.

    ``tag`` names the technique; registering the same tag twice (e.g. ``fit`` then ``validate`` with one callback)
    keeps a single registration, and ``fn`` runs once per model (a module already processed is skipped by the
    technique itself, which must be idempotent).
    """
    registry: dict[str, Callable[[nn.Module], Any]] = pl_module.__dict__.setdefault("_lit_accel_after_configure", {})
    registry[tag] = fn
    if pl_module.__dict__.get("_lit_accel_configure_wrapped"):
        return
    original = pl_module.configure_model

    def configure_model() -> None:
        original()
        model = find_hf_model(pl_module)
        for run in list(pl_module.__dict__["_lit_accel_after_configure"].values()):
            run(model)

    pl_module.configure_model = configure_model  # type: ignore[method-assign]
    pl_module.__dict__["_lit_accel_configure_wrapped"] = True


def match_linears(
    model: nn.Module,
    targets: str | Sequence[str],
    structure: ModelStructure | None = None,
    patterns: StructurePatterns | None = None,
    *,
    technique: str | None = None,
) -> dict[str, nn.Module]:
    """Selects decoder-block linears by preset or name pattern.

    Works on every supported family. Phi-3 fuses q/k/v into one linear (role ``qkv``, ``qkv_proj``) and gate/up
    into another (role ``gate_up``, ``gate_up_proj``): each is selected whole, by its fused role, its name or a
    preset; the split roles (``q``, ``gate``, ...) select nothing there (a warning says which fused role to use).

    Mixture-of-experts MLPs (Mixtral, Qwen3-MoE): the experts' weights are 3-D tensors inside one module, not
    linears, and the router is never selected, so nothing in such an MLP can be chosen. When ``targets`` would
    select MLP linears (the ``mlp`` / ``all-linear`` presets, the roles ``gate`` / ``up`` / ``down`` / ``gate_up``,
    MLP projection names, a pattern that matches an expert weight's name) and a block's MLP is a mixture of
    experts, a warning names the model, those blocks and why their experts stay dense and untouched, provided other
    linears are still selected (the attention, dense MLP blocks such as Qwen3-MoE's ``mlp_only_layers``); if
    nothing is selected at all it is a ``ValueError`` saying so.

    Args:
        model: The model.
        targets: ``"attention"``, ``"mlp"``, ``"all-linear"``, a regular expression matched (``re.search``) against
            qualified module names, or a list of such patterns / role names (``q``, ``k``, ``v``, ``o``, ``gate``,
            ``up``, ``down``; GPT-2 and Phi-3 ``qkv``, Phi-3 ``gate_up``) / module-name suffixes (``q_proj``).
            Role names are always matched as roles, never as patterns. The LM head is never selected.
        structure: The model's structure, if already known.
        patterns: Module-name patterns for a model that is not a supported architecture.
        technique: Who is asking (``"LoRA"``, ...), to start the messages with.

    Returns:
        Qualified name -> linear module, in forward order.

    Raises:
        ValueError: If nothing matches (the message lists the model's linears, or says that the targets select
            only mixture-of-experts MLPs, or which fused role to name instead); if a pattern is not a valid regex.

    Example:
        >>> from transformers import Phi3Config, Phi3ForCausalLM
        >>> phi3 = Phi3ForCausalLM(Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        ...     num_attention_heads=4, num_key_value_heads=2, vocab_size=128, pad_token_id=0, eos_token_id=0))
        >>> list(match_linears(phi3, ["qkv", "gate_up"]))
        ['model.layers.0.self_attn.qkv_proj', 'model.layers.0.mlp.gate_up_proj']
    """
    structure = structure or get_structure(model, patterns)
    prefix = f"{technique}: " if technique else ""
    routers = tuple(sub.experts.router_name for sub in structure.sublayers() if sub.experts and sub.experts.router_name)

    def is_router(name: str) -> bool:
        return any(name == r or name.startswith(r + ".") for r in routers)

    linears = {n: m for n, m in structure.linears().items() if not is_router(n)}
    preset = targets if isinstance(targets, str) and targets in TARGET_PRESETS else None
    roles = {name: role for sub in structure.sublayers() for role, name in sub.roles.items()}
    wanted: list[str] = []
    if preset is not None:
        kinds = ("attention", "mlp") if preset == "all-linear" else (preset,)
        chosen = {n: m for sub in structure.sublayers() if sub.kind in kinds for n, m in sub.linears.items()}
        chosen = {n: m for n, m in chosen.items() if n in linears}
    else:
        wanted = [targets] if isinstance(targets, str) else list(targets)
        if not wanted:
            raise ValueError(f"{prefix}targets is empty; use one of {TARGET_PRESETS} or name patterns.")
        suffixes = {name.split(".")[-1] for name in linears}
        role_names = {*ROLES, *roles.values()}  # a custom StructurePatterns may name other roles
        regexes: dict[str, re.Pattern[str]] = {}
        for pattern in wanted:
            if pattern in role_names or pattern in suffixes:
                continue
            try:
                regexes[pattern] = re.compile(pattern)
            except re.error as err:
                raise ValueError(
                    f"{prefix}targets pattern {pattern!r} is not a valid regular expression ({err}); use a preset"
                    f" {TARGET_PRESETS}, a role {ROLES} or a module name"
                ) from None

        def selects(pattern: str, name: str) -> bool:
            # A role or a module's own name is matched exactly: as a regex, "o" would match every "..._proj", "up"
            # Phi-3's gate_up_proj and "gate" a mixture of experts' router.
            if pattern in role_names:
                return roles.get(name) == pattern
            if pattern in suffixes:
                return name.split(".")[-1] == pattern
            return regexes[pattern].search(name) is not None

        chosen = {name: module for name, module in linears.items() if any(selects(p, name) for p in wanted)}
    moe = _moe_mlps_hit(structure, preset, wanted, chosen)
    fused = _fused_role_hint(structure, model, wanted, set(roles.values()))
    if not chosen:
        if moe:
            raise ValueError(prefix + _moe_message(structure, model, targets, moe, selected=0))
        names = list(linears)
        shown = ", ".join(names[:14]) + (f", ... ({len(names)} in all)" if len(names) > 14 else "")
        raise ValueError(
            f"{prefix}targets={targets!r} matches no linear of this model.{fused} Use a preset {TARGET_PRESETS}, roles"
            f" {sorted(set(roles.values()))}, or patterns over these names: {shown}"
        )
    if moe:
        rank_zero_warn(prefix + _moe_message(structure, model, targets, moe, selected=len(chosen)))
    if fused:
        rank_zero_warn(f"{prefix}targets={targets!r}:{fused}")
    return chosen


ROLES = ("q", "k", "v", "o", "qkv", "gate", "up", "down", "gate_up")
"""Every role name a ``targets`` entry may use (see :attr:`~lit_accel.models.structure.Sublayer.roles`)."""

_FUSED_ROLES = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}
_MLP_ROLES = frozenset({"gate", "up", "down", "gate_up"})
_MLP_NAMES = frozenset({"gate_proj", "up_proj", "down_proj", "gate_up_proj"})


def _expert_names(structure: ModelStructure, sub: Sublayer) -> tuple[list[str], str]:
    """Names a pattern meant for an MoE block's MLP would match, and an example expert weight for messages."""
    assert sub.experts is not None
    names = [f"{sub.name}.{n}" for n in sorted(_MLP_NAMES)]
    example = ""
    experts_name = sub.experts.experts_name
    if experts_name is not None:
        experts = structure.model.get_submodule(experts_name)
        for pname, param in experts.named_parameters():
            names.append(f"{experts_name}.{pname}")
            if not example and param.dim() == 3:
                example = f"{experts_name}.{pname} {list(full_shape(param))}"
    return names, example


def _moe_mlps_hit(
    structure: ModelStructure, preset: str | None, wanted: list[str], chosen: Mapping[str, nn.Module]
) -> list[Sublayer]:
    """The mixture-of-experts MLPs that ``targets`` would select if their experts were linears."""
    dense_mlp_names = {n.split(".")[-1] for b in structure.blocks if b.mlp.experts is None for n in b.mlp.linears}
    hit = []
    for block in structure.blocks:
        sub = block.mlp
        if sub.experts is None or any(n in chosen for n in sub.linears):
            continue  # a dense MLP, or experts that are linears and were selected like any other
        if preset is not None:
            if preset in ("mlp", "all-linear"):
                hit.append(sub)
            continue
        names, _ = _expert_names(structure, sub)
        for p in wanted:
            if p in ROLES:
                if p in _MLP_ROLES:
                    break
                continue
            if p in _MLP_NAMES or p in dense_mlp_names:
                break
            try:
                if any(re.search(p, n) for n in names):
                    break
            except re.error:
                continue
        else:
            continue
        hit.append(sub)
    return hit


def _model_name(structure: ModelStructure, model: nn.Module) -> str:
    return f"{type(model).__name__} (model_type {structure.arch!r})"


def _moe_message(
    structure: ModelStructure, model: nn.Module, targets: str | Sequence[str], moe: list[Sublayer], selected: int
) -> str:
    blocks = ", ".join(str(sub.block_index) for sub in moe)
    _, example = _expert_names(structure, moe[0])
    example = f" (e.g. {example})" if example else ""
    why = (
        f"in {_model_name(structure, model)} the MLP of block(s) {blocks} is a mixture of experts: its expert"
        f" weights are 3-D tensors{example}, not linears, and its router is never selected"
    )
    if selected:
        return (
            f"targets={targets!r} select MLP linears, but {why}; those experts stay dense and untouched (not"
            f" adapted, sparsified or factorised). {selected} linear(s) outside them are selected."
        )
    attention = sorted({r for b in structure.blocks for r in b.attention.roles})
    return (
        f"targets={targets!r} match no linear: they point at the MLP, but {why}, so nothing is left to select."
        f" Target the attention instead: targets='attention' or roles {attention}."
    )


def _fused_role_hint(structure: ModelStructure, model: nn.Module, wanted: list[str], present: set[str]) -> str:
    """Words for split roles (``q``, ``gate``, ...) that a model fuses into one linear, else ``""``."""
    hints = []
    for fused, parts in _FUSED_ROLES.items():
        asked = [p for p in wanted if p in parts and p not in present]
        if asked and fused in present:
            hints.append(
                f" Role(s) {asked} select nothing: {_model_name(structure, model)} computes {', '.join(parts)} with"
                f" one linear per block (role {fused!r}); name {fused!r} to select it whole."
            )
    return "".join(hints)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Replaces the submodule at qualified ``name`` with ``new`` and returns the old one."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old
