"""The model families :func:`~lit_accel.models.structure.get_structure` knows, and how to describe any other.

:class:`StructurePatterns` names the blocks and their parts of a transformer; each supported Hugging Face
architecture (:data:`SUPPORTED_ARCHS`, by ``config.model_type``) has its patterns here, found below any prefix so
that wrapped models (``peft``'s ``base_model.model.``) work too.

Example:
    >>> "gemma3_text" in SUPPORTED_ARCHS and "qwen3_moe" in SUPPORTED_ARCHS
    True
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

__all__ = ["PATTERN_EXAMPLE", "SUPPORTED_ARCHS", "StructurePatterns", "as_patterns", "hf_patterns", "join_name"]


@dataclass
class StructurePatterns:
    """Describe your own transformer so that :func:`get_structure` (and every technique) can work on it.

    Block names are matched with ``re.fullmatch`` against ``model.named_modules()``; the other names are dotted
    paths relative to a block (or to a sublayer, for roles) or to the root (for ``embedding`` etc.). Shapes not
    given are read from ``model.config`` when there is one, else inferred where possible.

    Example:
        >>> patterns = StructurePatterns(
        ...     blocks=r"encoder\\.layers\\.\\d+", attention="attn", mlp="ff",
        ...     attention_norm="norm1", mlp_norm="norm2", num_heads=4,
        ...     attention_roles={"q": "q", "k": "k", "v": "v", "o": "out"}, mlp_roles={"up": "fc1", "down": "fc2"})
        >>> structure = get_structure(my_model, patterns)  # doctest: +SKIP
    """

    blocks: str
    """Regex that fully matches the qualified names of the blocks, e.g. ``r"encoder\\.layers\\.\\d+"``."""
    attention: str
    """Name of the attention module relative to a block, e.g. ``"attn"``."""
    mlp: str
    """Name of the MLP module relative to a block, e.g. ``"ff"``."""
    attention_norm: str | None = None
    """Name of the norm before attention, relative to a block; None if there is none."""
    mlp_norm: str | None = None
    """Name of the norm before the MLP, relative to a block; None if there is none."""
    attention_roles: dict[str, str] = field(default_factory=dict)
    """Role (``q``, ``k``, ``v``, ``o`` or ``qkv``) -> linear name relative to the attention module."""
    mlp_roles: dict[str, str] = field(default_factory=dict)
    """Role (``gate``, ``up``, ``down`` or ``gate_up``) -> linear name relative to the MLP module. Roles whose
    module is missing in a block are left out there when the block's MLP is a mixture of experts."""
    attention_post_norm: str | None = None
    """Name of a norm applied to the attention output (before the residual add), relative to a block."""
    mlp_post_norm: str | None = None
    """Name of a norm applied to the MLP output (before the residual add), relative to a block."""
    attention_inner_norms: dict[str, str] = field(default_factory=dict)
    """Role (``q_norm``, ``k_norm``) -> norm name relative to the attention module."""
    mlp_experts: str | None = None
    """Name, relative to the MLP module, of the module holding a mixture of experts' weights; a block whose MLP has
    no such child is a dense MLP."""
    mlp_router: str | None = None
    """Name, relative to the MLP module, of a mixture of experts' router."""
    embedding: str | None = None
    """Qualified name of the token embedding, if any."""
    lm_head: str | None = None
    """Qualified name of the output projection, if any."""
    final_norm: str | None = None
    """Qualified name of the final norm, if any."""
    position_embedding: str | None = None
    """Qualified name of a learned position embedding, if any (counted as an embedding by ``num_parameters``)."""
    num_heads: int | None = None
    """Query heads; required when the model has no ``config``."""
    num_kv_heads: int | None = None
    """Key/value heads; defaults to ``num_heads``."""
    head_dim: int | None = None
    """Head size; defaults to ``hidden_size // num_heads``."""
    hidden_size: int | None = None
    """Residual width; defaults to the config, the embedding width or the first attention linear's input."""
    intermediate_size: int | None = None
    """MLP width; defaults to the config or the output of the MLP's ``up`` (else first) linear."""
    vocab_size: int | None = None
    """Vocabulary size; defaults to the config or the embedding's rows (0 if neither)."""
    max_position_embeddings: int | None = None
    """Longest sequence; defaults to the config (None if unknown)."""
    arch: str = "custom"
    """Name reported in :attr:`ModelStructure.arch`."""


@dataclass(frozen=True)
class _HFSpec:
    blocks: str
    attention: str
    mlp: str
    attention_norm: str | None
    mlp_norm: str | None
    attention_roles: dict[str, str]
    mlp_roles: dict[str, str]
    embedding: str
    final_norm: str
    position_embedding: str | None = None
    attention_post_norm: str | None = None
    mlp_post_norm: str | None = None
    attention_inner_norms: dict[str, str] = field(default_factory=dict)
    mlp_experts: str | None = None
    mlp_router: str | None = None


_LLAMA_LIKE = _HFSpec(
    blocks="layers",
    attention="self_attn",
    mlp="mlp",
    attention_norm="input_layernorm",
    mlp_norm="post_attention_layernorm",
    attention_roles={"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"},
    mlp_roles={"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
    embedding="embed_tokens",
    final_norm="norm",
)
_QK_NORMS = {"q_norm": "q_norm", "k_norm": "k_norm"}
_QWEN3 = dataclasses.replace(_LLAMA_LIKE, attention_inner_norms=_QK_NORMS)
_GEMMA2 = dataclasses.replace(
    _LLAMA_LIKE,
    mlp_norm="pre_feedforward_layernorm",
    attention_post_norm="post_attention_layernorm",
    mlp_post_norm="post_feedforward_layernorm",
)
_HF_SPECS: dict[str, _HFSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _QWEN3,
    "gemma": _LLAMA_LIKE,
    "gemma2": _GEMMA2,
    "gemma3_text": dataclasses.replace(_GEMMA2, attention_inner_norms=_QK_NORMS),
    "phi3": dataclasses.replace(
        _LLAMA_LIKE,
        attention_roles={"qkv": "qkv_proj", "o": "o_proj"},
        mlp_roles={"gate_up": "gate_up_proj", "down": "down_proj"},
    ),
    "olmo2": dataclasses.replace(
        _LLAMA_LIKE,
        attention_norm=None,
        mlp_norm=None,
        attention_post_norm="post_attention_layernorm",
        mlp_post_norm="post_feedforward_layernorm",
        attention_inner_norms=_QK_NORMS,
    ),
    "mixtral": dataclasses.replace(_LLAMA_LIKE, mlp_roles={}, mlp_experts="experts", mlp_router="gate"),
    # Qwen3-MoE keeps dense MLPs in ``mlp_only_layers``: those blocks get the usual roles.
    "qwen3_moe": dataclasses.replace(_QWEN3, mlp_experts="experts", mlp_router="gate"),
    "gpt2": _HFSpec(
        blocks="h",
        attention="attn",
        mlp="mlp",
        attention_norm="ln_1",
        mlp_norm="ln_2",
        attention_roles={"qkv": "c_attn", "o": "c_proj"},
        mlp_roles={"up": "c_fc", "down": "c_proj"},
        embedding="wte",
        final_norm="ln_f",
        position_embedding="wpe",
    ),
}
SUPPORTED_ARCHS: tuple[str, ...] = tuple(_HF_SPECS)
"""``config.model_type`` values :func:`get_structure` understands without patterns."""

PATTERN_EXAMPLE = (  # quoted in error messages that suggest describing a model
    "StructurePatterns(blocks=r'encoder\\.layers\\.\\d+', attention='attn', mlp='ff', "
    "attention_norm='norm1', mlp_norm='norm2', num_heads=8)"
)


def as_patterns(value: Any, owner: str) -> StructurePatterns | None:
    r"""A callback's ``patterns`` argument as a :class:`StructurePatterns`: one, a dict of its fields (YAML), or None.

    Raises:
        ValueError: Naming ``owner`` (e.g. ``"DropBP"``) and the value, for anything else or a dict with unknown or
            missing fields.

    Example:
        >>> as_patterns({"blocks": r"layers\.\d+", "attention": "attn", "mlp": "ff"}, "DropBP").mlp
        'ff'
    """
    if value is None or isinstance(value, StructurePatterns):
        return value
    if isinstance(value, Mapping):
        try:
            return StructurePatterns(**value)
        except TypeError as err:
            raise ValueError(f"{owner} patterns={value!r} is not a valid StructurePatterns: {err}") from None
    raise ValueError(
        f"{owner} patterns={value!r} is not allowed; patterns must be a StructurePatterns, a dict of its fields, "
        "or None"
    )


def join_name(prefix: str, name: str) -> str:
    """``prefix.name``, or ``name`` when ``prefix`` is empty (the root)."""
    return f"{prefix}.{name}" if prefix else name


def hf_patterns(model: nn.Module, arch: str) -> StructurePatterns:
    """The patterns of ``model``, a Hugging Face model of architecture ``arch`` (one of :data:`SUPPORTED_ARCHS`).

    Raises:
        ValueError: The model has no block list next to an embedding where the architecture puts them.
    """
    spec = _HF_SPECS[arch]
    modules = dict(model.named_modules())
    # Search for the block list below any prefix so wrapped models (peft's ``base_model.model.``) work too.
    base: str | None = None
    for name, module in modules.items():
        if not isinstance(module, nn.ModuleList):
            continue
        if name == spec.blocks:
            base = ""
        elif name.endswith("." + spec.blocks):
            base = name[: -len(spec.blocks) - 1]
        else:
            continue
        if join_name(base, spec.embedding) in modules:
            break
        base = None
    if base is None:
        raise ValueError(
            f"{type(model).__name__} has config.model_type={arch!r} but no ModuleList named {spec.blocks!r} next to "
            f"an embedding {spec.embedding!r}; pass StructurePatterns(...) to describe it, e.g. {PATTERN_EXAMPLE}"
        )
    lm_heads = [n for n in modules if n == "lm_head" or n.endswith(".lm_head")]
    final_norm = join_name(base, spec.final_norm)
    pos = join_name(base, spec.position_embedding) if spec.position_embedding else None
    return StructurePatterns(
        blocks=re.escape(join_name(base, spec.blocks)) + r"\.\d+",
        attention=spec.attention,
        mlp=spec.mlp,
        attention_norm=spec.attention_norm,
        mlp_norm=spec.mlp_norm,
        attention_roles=dict(spec.attention_roles),
        mlp_roles=dict(spec.mlp_roles),
        embedding=join_name(base, spec.embedding),
        lm_head=lm_heads[0] if lm_heads else None,
        final_norm=final_norm if final_norm in modules else None,
        position_embedding=pos if pos in modules else None,
        attention_post_norm=spec.attention_post_norm,
        mlp_post_norm=spec.mlp_post_norm,
        attention_inner_norms=dict(spec.attention_inner_norms),
        mlp_experts=spec.mlp_experts,
        mlp_router=spec.mlp_router,
        arch=arch,
    )
