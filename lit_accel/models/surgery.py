"""Shared plumbing for techniques that change a model's modules (LoRA, SVD factorisation, 2:4 sparsity).

- :func:`find_hf_model`: the ``nn.Module`` a LightningModule trains (its one Hugging Face model, whatever the
  attribute, or the module itself).
- :func:`run_after_configure_model`: run a function on the model right after ``configure_model`` builds it, which is
  before Lightning builds the optimizer and before the strategy wraps or shards the model, so the optimizer only
  ever sees the final parameters and DeepSpeed ZeRO-3 partitions new ones like any other.
- :func:`match_linears`: which decoder-block linears a ``targets`` argument selects (presets or name patterns),
  with an error that lists the model's linears when nothing matches.
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
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
from torch import nn
from transformers import PreTrainedModel

from lit_accel.models.structure import ModelStructure, StructurePatterns, get_structure

__all__ = [
    "MODEL_ATTR",
    "TARGET_PRESETS",
    "find_hf_model",
    "match_linears",
    "replace_module",
    "run_after_configure_model",
]

TARGET_PRESETS = ("attention", "mlp", "all-linear")
"""``targets`` presets: the attention projections, the MLP projections, or every decoder-block linear."""


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
) -> dict[str, nn.Module]:
    """Selects decoder-block linears by preset or name pattern.

    Args:
        model: The model.
        targets: ``"attention"``, ``"mlp"``, ``"all-linear"``, a regular expression matched (``re.search``) against
            qualified module names, or a list of such patterns / role names (``q``, ``k``, ``v``, ``o``, ``gate``,
            ``up``, ``down``; GPT-2 also ``qkv``) / module-name suffixes (``q_proj``). The LM head is never selected.
        structure: The model's structure, if already known.
        patterns: Module-name patterns for a model that is not a supported architecture.

    Returns:
        Qualified name -> linear module, in forward order.

    Raises:
        ValueError: If nothing matches; the message lists the model's linear names.
    """
    structure = structure or get_structure(model, patterns)
    linears = structure.linears()
    if isinstance(targets, str) and targets in TARGET_PRESETS:
        if targets == "all-linear":
            return linears
        kind = "attention" if targets == "attention" else "mlp"
        return {n: m for sub in structure.sublayers() if sub.kind == kind for n, m in sub.linears.items()}
    wanted = [targets] if isinstance(targets, str) else list(targets)
    if not wanted:
        raise ValueError(f"targets is empty; use one of {TARGET_PRESETS} or name patterns.")
    roles = {name: role for sub in structure.sublayers() for role, name in sub.roles.items()}
    role_names = set(roles.values())
    suffixes = {name.split(".")[-1] for name in linears}

    def selects(pattern: str, name: str) -> bool:
        # A role or a module's own name is matched exactly: as a regex, "o" would match every "..._proj".
        if pattern in role_names:
            return roles.get(name) == pattern
        if pattern in suffixes:
            return name.split(".")[-1] == pattern
        return re.search(pattern, name) is not None

    chosen = {name: module for name, module in linears.items() if any(selects(p, name) for p in wanted)}
    if not chosen:
        names = list(linears)
        shown = ", ".join(names[:14]) + (f", ... ({len(names)} in all)" if len(names) > 14 else "")
        raise ValueError(
            f"targets={targets!r} matches no linear of this model. Use a preset {TARGET_PRESETS}, roles"
            f" {sorted(set(roles.values()))}, or patterns over these names: {shown}"
        )
    return chosen


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Replaces the submodule at qualified ``name`` with ``new`` and returns the old one."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old
