"""The one source of truth for the structure of a decoder-only transformer.

Every technique (DropBP, 2:4 sparsity, structured pruning, LoRA) asks this module where the decoder blocks are,
which module is each block's attention and MLP sublayer, which pre-norm feeds it, which linears it holds and
what role each plays, and how many heads and KV groups the attention has. Nothing else in ``lit_accel`` should
hard-code module names of a Hugging Face architecture.

Supported out of the box (``config.model_type`` in :data:`SUPPORTED_ARCHS`; ``*ForCausalLM`` and the base
``*Model``, also when wrapped, e.g. by ``peft``: blocks are found by name below any prefix): LLaMA, Mistral, Qwen2,
Qwen3 (per-head q/k norms), Gemma, Gemma 2 and Gemma 3 text (sandwich norms: a pre- and a post-norm around each
sublayer; Gemma 3 also per-head q/k norms), Phi-3 (fused ``qkv_proj`` and ``gate_up_proj``), OLMo 2 (post-norms
only; q/k norms over the whole projection), the mixture-of-experts Mixtral and Qwen3-MoE (the MLP sublayer is the
sparse MoE block: router and experts, whose weights are 3-D tensors rather than linears), and GPT-2
(``GPT2LMHeadModel``, ``GPT2Model``). Any other transformer works when described with :class:`StructurePatterns`.

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    >>> s = get_structure(LlamaForCausalLM(cfg))
    >>> [sub.name for sub in s.sublayers()][:2]
    ['model.layers.0.self_attn', 'model.layers.0.mlp']
    >>> s.attention.kv_group_size, s.blocks[0].attention.roles["k"]
    (2, 'model.layers.0.self_attn.k_proj')
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lit_accel.models.architectures import (
    PATTERN_EXAMPLE,
    SUPPORTED_ARCHS,
    StructurePatterns,
    as_patterns,
    hf_patterns,
    join_name,
)
from lit_accel.models.params import full_shape
from lit_accel.strategies.sizing import param_numel

__all__ = [
    "SUPPORTED_ARCHS",
    "AttentionShape",
    "Block",
    "ExpertsShape",
    "ModelStructure",
    "StructurePatterns",
    "Sublayer",
    "as_patterns",
    "get_structure",
    "is_linear",
    "linear_in_out_features",
]

SublayerKind = Literal["attention", "mlp"]


# --------------------------------------------------------------------------------------------------------------
# Linears
# --------------------------------------------------------------------------------------------------------------


def _is_plain_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a linear layer as far as ``lit_accel`` is concerned.

    That is an ``nn.Linear`` (or subclass), a transformers GPT-2 ``Conv1D``, a factorised projection (a module
    with ``is_factorized_linear = True``, ``in_features`` and ``out_features``), or a wrapper that follows the
    ``peft`` convention of holding the original linear at ``.base_layer`` (LoRA and similar adapters). Wrappers
    count as one linear under their original name; their inner adapter linears are not listed separately.

    Args:
        module: Any module.

    Returns:
        True for a linear layer or a ``base_layer`` wrapper of one.
    """
    if _is_plain_linear(module):
        return True
    # A factorised projection (lit_accel.lowrank.factorize_layer.LowRankLinear) stands where a linear stood.
    if getattr(module, "is_factorized_linear", False):
        return True
    base = getattr(module, "base_layer", None)
    return isinstance(base, nn.Module) and is_linear(base)


def linear_in_out_features(module: nn.Module) -> tuple[int, int]:
    """Input and output features of a linear layer, whatever its weight layout.

    ``nn.Linear`` stores its weight as ``[out, in]``; GPT-2's ``Conv1D`` as ``[in, out]``. The sizes are read
    from module attributes, never from ``weight.shape``, so they stay right when DeepSpeed ZeRO-3 has
    partitioned the weight to an empty tensor.

    Args:
        module: An ``nn.Linear``, a ``Conv1D``, a ``base_layer`` wrapper of one, or any module with integer
            ``in_features`` and ``out_features`` attributes.

    Returns:
        ``(in_features, out_features)``.

    Raises:
        TypeError: ``module`` is not a linear layer.

    Example:
        >>> linear_in_out_features(Conv1D(nf=192, nx=64))
        (64, 192)
    """
    if isinstance(module, Conv1D):
        return int(module.nx), int(module.nf)
    if isinstance(module, nn.Linear):
        return int(module.in_features), int(module.out_features)
    base = getattr(module, "base_layer", None)
    if isinstance(base, nn.Module):
        return linear_in_out_features(base)
    fin, fout = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if isinstance(fin, int) and isinstance(fout, int):
        return fin, fout
    raise TypeError(f"{type(module).__name__} is not a linear layer (nn.Linear, transformers Conv1D or a wrapper)")


def _collect_linears(module: nn.Module, prefix: str) -> dict[str, nn.Module]:
    out: dict[str, nn.Module] = {}
    for name, child in module.named_children():
        qual = f"{prefix}.{name}" if prefix else name
        if is_linear(child):
            out[qual] = child
        else:
            out.update(_collect_linears(child, qual))
    return out


# --------------------------------------------------------------------------------------------------------------
# Dataclasses
# --------------------------------------------------------------------------------------------------------------


@dataclass
class AttentionShape:
    """Head layout of the self-attention, shared by all blocks.

    Example:
        >>> a = AttentionShape(num_heads=8, num_kv_heads=2, head_dim=16, hidden_size=128)
        >>> a.kv_group_size, a.kv_group(5), list(a.query_heads(1))
        (4, 1, [4, 5, 6, 7])
    """

    num_heads: int
    """Number of query heads."""
    num_kv_heads: int
    """Number of key/value heads (``== num_heads`` without grouped-query attention)."""
    head_dim: int
    """Size of one head."""
    hidden_size: int
    """Model (residual stream) width."""

    def __post_init__(self) -> None:
        for name in ("num_heads", "num_kv_heads", "head_dim", "hidden_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"AttentionShape.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"AttentionShape: num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )

    @property
    def kv_group_size(self) -> int:
        """Query heads that share one key/value head."""
        return self.num_heads // self.num_kv_heads

    def kv_group(self, query_head: int) -> int:
        """Index of the key/value head that query head ``query_head`` reads.

        Args:
            query_head: Query head index in ``[0, num_heads)``.

        Returns:
            KV head index in ``[0, num_kv_heads)``.
        """
        if not 0 <= query_head < self.num_heads:
            raise ValueError(f"query_head must be in [0, {self.num_heads}), got {query_head}")
        return query_head // self.kv_group_size

    def query_heads(self, kv_head: int) -> range:
        """Query heads that read KV head ``kv_head`` (the inverse of :meth:`kv_group`)."""
        if not 0 <= kv_head < self.num_kv_heads:
            raise ValueError(f"kv_head must be in [0, {self.num_kv_heads}), got {kv_head}")
        return range(kv_head * self.kv_group_size, (kv_head + 1) * self.kv_group_size)


@dataclass
class ExpertsShape:
    """Layout of a sparse mixture-of-experts MLP (Mixtral, Qwen3-MoE): a router and ``num_experts`` SwiGLU experts.

    Example:
        >>> e = ExpertsShape(num_experts=8, experts_per_token=2, intermediate_size=14336, hidden_size=4096)
        >>> e.active_fraction
        0.25
    """

    num_experts: int
    """Experts in the block."""
    experts_per_token: int
    """Experts each token is routed to (top-k)."""
    intermediate_size: int
    """Hidden width of one expert's MLP."""
    hidden_size: int
    """Residual width."""
    router_name: str | None = None
    """Qualified name of the router (a module with a ``[num_experts, hidden]`` weight), if found."""
    experts_name: str | None = None
    """Qualified name of the module holding the experts' weights, if found."""

    def __post_init__(self) -> None:
        for name in ("num_experts", "experts_per_token", "intermediate_size", "hidden_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ExpertsShape.{name} must be a positive int, got {value!r}")
        if self.experts_per_token > self.num_experts:
            raise ValueError(
                f"ExpertsShape: experts_per_token={self.experts_per_token} exceeds num_experts={self.num_experts}"
            )

    @property
    def active_fraction(self) -> float:
        """Fraction of the experts each token runs through."""
        return self.experts_per_token / self.num_experts

    def forward_flops_per_token(self) -> float:
        """Matmul FLOPs of one token through the block: the router and its ``experts_per_token`` SwiGLU experts."""
        h, i = self.hidden_size, self.intermediate_size
        return 2.0 * h * self.num_experts + self.experts_per_token * 2.0 * 3 * h * i


@dataclass
class Sublayer:
    """One residual sublayer: ``x + post_norm(module(norm(x)))`` (either norm may be absent).

    LLaMA-style blocks have only the pre-norm; Gemma 2/3 have both (sandwich norms); OLMo 2 only the post-norm.
    """

    kind: SublayerKind
    """``"attention"`` or ``"mlp"``."""
    block_index: int
    """Index of the block that holds it (0 = nearest the embedding)."""
    name: str
    """Qualified name of the attention or MLP module in the model, e.g. ``model.layers.0.self_attn``."""
    module: nn.Module = field(repr=False)
    """The attention or MLP module itself; its output (first element if a tuple) is added to the residual."""
    norm_name: str | None
    """Qualified name of the pre-norm feeding it, e.g. ``model.layers.0.input_layernorm``; None if it has none."""
    norm: nn.Module | None = field(repr=False)
    """The pre-norm module; None if it has none."""
    linears: dict[str, nn.Module] = field(repr=False)
    """Qualified name -> every linear (``nn.Linear``, GPT-2 ``Conv1D``, adapter wrapper) inside the sublayer."""
    roles: dict[str, str] = field(default_factory=dict)
    """Role -> qualified linear name. Attention: ``q``, ``k``, ``v``, ``o`` (GPT-2, Phi-3: fused ``qkv`` whose
    output is ``[q | k | v]``, with ``num_kv_heads`` heads each for k and v, and ``o``). MLP: ``gate``, ``up``,
    ``down`` (Phi-3: fused ``gate_up`` whose output is ``[gate | up]``, and ``down``; GPT-2 and plain MLPs: ``up``,
    ``down``; a mixture-of-experts block: none, its experts are not linears)."""
    post_norm_name: str | None = None
    """Qualified name of a norm applied to the sublayer's output before it joins the residual (Gemma 2/3's
    ``post_attention_layernorm``/``post_feedforward_layernorm``, OLMo 2's); None if there is none."""
    post_norm: nn.Module | None = field(default=None, repr=False)
    """That norm module; None if there is none."""
    inner_norms: dict[str, str] = field(default_factory=dict)
    """Role -> qualified name of a norm inside the sublayer: ``q_norm`` and ``k_norm`` (Qwen3, Gemma 3: over one
    head, shared by all heads; OLMo 2: over the whole q or k projection)."""
    experts: ExpertsShape | None = None
    """For a mixture-of-experts MLP, its layout; None for a dense sublayer."""

    @property
    def path_modules(self) -> tuple[nn.Module, ...]:
        """The modules the sublayer's branch runs through, in order: pre-norm, module, post-norm (those present)."""
        return tuple(m for m in (self.norm, self.module, self.post_norm) if m is not None)

    @property
    def norm_names(self) -> tuple[str, ...]:
        """Qualified names of every norm of the sublayer: pre-norm, post-norm and inner norms."""
        names = [n for n in (self.norm_name, self.post_norm_name) if n is not None]
        return (*names, *self.inner_norms.values())

    def linear(self, role: str) -> nn.Module:
        """The linear that plays ``role`` (see :attr:`roles`).

        Raises:
            KeyError: The sublayer has no linear with that role; the message lists the roles it has.
        """
        if role not in self.roles:
            raise KeyError(f"{self.kind} sublayer {self.name!r} has no role {role!r}; it has {sorted(self.roles)}")
        return self.linears[self.roles[role]]


@dataclass
class Block:
    """One decoder block: an attention sublayer followed by an MLP sublayer."""

    index: int
    """Position in forward order (0 = nearest the embedding)."""
    name: str
    """Qualified module name, e.g. ``model.layers.0``."""
    module: nn.Module = field(repr=False)
    """The block module."""
    attention: Sublayer
    """Its self-attention sublayer."""
    mlp: Sublayer
    """Its feed-forward sublayer."""


@dataclass
class ModelStructure:
    """Where everything is in a decoder-only transformer. Build it with :func:`get_structure`.

    Example:
        >>> s = get_structure(model)  # doctest: +SKIP
        >>> for sub in s.sublayers():  # doctest: +SKIP
        ...     print(sub.kind, sub.name, sub.roles)
    """

    arch: str
    """``config.model_type`` (one of :data:`SUPPORTED_ARCHS`), or the ``arch`` given in :class:`StructurePatterns`
    (``"custom"`` by default)."""
    model: nn.Module = field(repr=False)
    """The root module the names are relative to."""
    blocks: list[Block] = field(repr=False)
    """Decoder blocks in forward order."""
    hidden_size: int
    """Residual stream width."""
    intermediate_size: int
    """MLP hidden width."""
    attention: AttentionShape
    """Head layout of the self-attention."""
    vocab_size: int
    """Vocabulary size (0 when unknown)."""
    max_position_embeddings: int | None
    """Longest sequence the position encoding was built for, if known."""
    embedding_name: str | None
    """Qualified name of the token embedding, if any."""
    lm_head_name: str | None
    """Qualified name of the output projection; None for a base model. Its weight may be tied to the embedding."""
    final_norm_name: str | None
    """Qualified name of the norm after the last block, if any."""
    position_embedding_name: str | None = None
    """Qualified name of a learned position embedding (GPT-2 ``wpe``), if any."""

    @property
    def num_layers(self) -> int:
        """Number of decoder blocks."""
        return len(self.blocks)

    @property
    def is_moe(self) -> bool:
        """Whether any MLP sublayer is a mixture of experts."""
        return any(block.mlp.experts is not None for block in self.blocks)

    @property
    def qk_norm(self) -> Literal["none", "head", "projection"]:
        """Where the attention normalises q and k: ``"none"``, per ``"head"`` (Qwen3, Gemma 3: one
        ``head_dim``-wide weight shared by all heads) or over the whole ``"projection"`` (OLMo 2)."""
        attn = self.blocks[0].attention
        name = attn.inner_norms.get("q_norm")
        if name is None:
            return "none"
        weight = getattr(self.model.get_submodule(name), "weight", None)
        if isinstance(weight, torch.Tensor) and full_shape(weight)[-1] == self.attention.head_dim:
            return "head"
        return "projection"

    @property
    def tied_embeddings(self) -> bool:
        """Whether the LM head shares its weight with the token embedding."""
        if self.lm_head_name is None or self.embedding_name is None:
            return False
        head_w = getattr(self.model.get_submodule(self.lm_head_name), "weight", None)
        emb_w = getattr(self.model.get_submodule(self.embedding_name), "weight", None)
        return head_w is not None and head_w is emb_w

    def sublayers(self) -> list[Sublayer]:
        """Attention and MLP sublayer of every block, in forward order."""
        return [sub for block in self.blocks for sub in (block.attention, block.mlp)]

    def linears(self, include_lm_head: bool = False) -> dict[str, nn.Module]:
        """Qualified name -> every linear in the decoder blocks, in forward order.

        Args:
            include_lm_head: Also include the LM head (last), if the model has one.

        Returns:
            A new dict; linears are ``nn.Linear``, GPT-2 ``Conv1D`` or ``base_layer`` wrappers of one.
        """
        out: dict[str, nn.Module] = {}
        for sub in self.sublayers():
            out.update(sub.linears)
        if include_lm_head and self.lm_head_name is not None:
            out[self.lm_head_name] = self.model.get_submodule(self.lm_head_name)
        return out

    def num_parameters(
        self, *, include_embeddings: bool = True, include_lm_head: bool = True, linears_only: bool = False
    ) -> int:
        """Count parameters, each shared tensor once (correct under ZeRO-3 partitioning).

        Args:
            include_embeddings: Count the token (and learned position) embeddings.
            include_lm_head: Count the LM head. A tied head is counted when this or ``include_embeddings`` is
                True, once.
            linears_only: Count only the weights and biases of the decoder-block linears (and of the LM head
                if ``include_lm_head``); norms, embeddings and other parameters are left out.

        Returns:
            Number of scalar parameters.
        """

        def params_of(name: str | None) -> dict[int, torch.Tensor]:
            if name is None:
                return {}
            return {id(p): p for p in self.model.get_submodule(name).parameters()}

        if linears_only:
            kept: dict[int, torch.Tensor] = {}
            for module in self.linears(include_lm_head=include_lm_head).values():
                kept.update({id(p): p for p in module.parameters()})
        else:
            kept = {id(p): p for p in self.model.parameters()}
            if not include_embeddings:
                for name in (self.embedding_name, self.position_embedding_name):
                    for key in params_of(name):
                        kept.pop(key, None)
            if not include_lm_head:
                for key in params_of(self.lm_head_name):
                    kept.pop(key, None)
            if include_lm_head:
                kept.update(params_of(self.lm_head_name))
        return sum(param_numel(p) for p in kept.values())


def _few(names: list[str], n: int = 12) -> str:
    shown = ", ".join(repr(x) for x in names[:n])
    return shown + (f", ... ({len(names)} in all)" if len(names) > n else "")


def _child(root: nn.Module, root_name: str, path: str, field_name: str) -> nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError:
        existing = [n for n, _ in root.named_modules() if n]
        raise ValueError(
            f"StructurePatterns.{field_name}={path!r} matches no module under {root_name or 'the model'!r}; "
            f"modules there: {_few(existing)}"
        ) from None


def _root_module(model: nn.Module, name: str | None, field_name: str, blocks: list[Block]) -> nn.Module | None:
    if name is None:
        return None
    try:
        return model.get_submodule(name)
    except AttributeError:
        inside = tuple(b.name + "." for b in blocks)
        outside = [n for n, _ in model.named_modules() if n and not n.startswith(inside)]
        raise ValueError(
            f"StructurePatterns.{field_name}={name!r} matches no module; modules outside the blocks: {_few(outside)}"
        ) from None


def _make_sublayer(
    kind: SublayerKind,
    index: int,
    block: nn.Module,
    block_name: str,
    path: str,
    norm_path: str | None,
    roles: dict[str, str],
    field_prefix: str,
    post_norm_path: str | None = None,
    inner_norms: Mapping[str, str] | None = None,
    optional_roles: bool = False,
) -> Sublayer:
    module = _child(block, block_name, path, field_prefix)
    name = join_name(block_name, path)
    norm = _child(block, block_name, norm_path, f"{field_prefix}_norm") if norm_path is not None else None
    post = _child(block, block_name, post_norm_path, f"{field_prefix}_post_norm") if post_norm_path else None
    linears = _collect_linears(module, name)
    qual_roles: dict[str, str] = {}
    for role, rel in roles.items():
        if optional_roles and not _has_child(module, rel):
            continue
        target = _child(module, name, rel, f"{field_prefix}_roles[{role!r}]")
        if not is_linear(target):
            raise ValueError(
                f"StructurePatterns.{field_prefix}_roles[{role!r}]={rel!r} is a {type(target).__name__}, "
                f"not a linear layer"
            )
        qual_roles[role] = join_name(name, rel)
    qual_inner: dict[str, str] = {}
    for role, rel in (inner_norms or {}).items():
        _child(module, name, rel, f"{field_prefix}_inner_norms[{role!r}]")
        qual_inner[role] = join_name(name, rel)
    return Sublayer(
        kind=kind,
        block_index=index,
        name=name,
        module=module,
        norm_name=join_name(block_name, norm_path) if norm_path is not None else None,
        norm=norm,
        linears=linears,
        roles=qual_roles,
        post_norm_name=join_name(block_name, post_norm_path) if post_norm_path else None,
        post_norm=post,
        inner_norms=qual_inner,
    )


def _has_child(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def _experts_shape(model: nn.Module, sub: Sublayer, p: StructurePatterns, hidden: int) -> ExpertsShape | None:
    # A block is a mixture of experts when its MLP holds the experts module the patterns name (Qwen3-MoE keeps
    # dense MLPs in some layers). Counts come from the modules, falling back to the config.
    if p.mlp_experts is None or not _has_child(sub.module, p.mlp_experts):
        return None
    experts = sub.module.get_submodule(p.mlp_experts)
    router = sub.module.get_submodule(p.mlp_router) if p.mlp_router and _has_child(sub.module, p.mlp_router) else None
    config = getattr(model, "config", None)
    num = _first(
        _cfg_int(experts, "num_experts"),
        _cfg_int(router, "num_experts"),
        _cfg_int(config, "num_local_experts", "num_experts"),
    )
    top_k = _first(_cfg_int(router, "top_k"), _cfg_int(sub.module, "top_k"), _cfg_int(config, "num_experts_per_tok"))
    width = _first(
        _cfg_int(experts, "intermediate_dim"), _cfg_int(config, "moe_intermediate_size", "intermediate_size")
    )
    if num is None or top_k is None or width is None:
        raise ValueError(
            f"{sub.name}: cannot read the mixture of experts' layout (num_experts={num}, experts_per_token={top_k}, "
            f"intermediate_size={width}) from its modules or the config"
        )
    return ExpertsShape(
        num_experts=num,
        experts_per_token=top_k,
        intermediate_size=width,
        hidden_size=hidden,
        router_name=join_name(sub.name, p.mlp_router) if router is not None and p.mlp_router else None,
        experts_name=join_name(sub.name, p.mlp_experts),
    )


def _build_blocks(model: nn.Module, p: StructurePatterns) -> list[Block]:
    try:
        regex = re.compile(p.blocks)
    except re.error as err:
        raise ValueError(f"StructurePatterns.blocks={p.blocks!r} is not a valid regex: {err}") from None
    matched = [(n, m) for n, m in model.named_modules() if n and regex.fullmatch(n)]
    if not matched:
        # Blocks nearly always live in a ModuleList: show those first, they are what the regex should hit.
        lists = [f"{n}.0..{len(m) - 1}" for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
        top = [n for n, _ in model.named_children()]
        raise ValueError(
            f"StructurePatterns.blocks={p.blocks!r} matches no module name (re.fullmatch); "
            f"module lists in the model: {_few(lists) or 'none'}; top-level modules: {_few(top)}"
        )
    block_names = [n for n, _ in matched]
    for n in block_names:
        outer = next((o for o in block_names if n.startswith(o + ".")), None)
        if outer is not None:
            raise ValueError(
                f"StructurePatterns.blocks={p.blocks!r} matches nested modules {outer!r} and {n!r}; "
                "anchor it so that it matches the blocks only"
            )
    blocks = []
    for i, (name, module) in enumerate(matched):
        attn = _make_sublayer(
            "attention",
            i,
            module,
            name,
            p.attention,
            p.attention_norm,
            p.attention_roles,
            "attention",
            post_norm_path=p.attention_post_norm,
            inner_norms=p.attention_inner_norms,
        )
        mlp = _make_sublayer(
            "mlp",
            i,
            module,
            name,
            p.mlp,
            p.mlp_norm,
            p.mlp_roles,
            "mlp",
            post_norm_path=p.mlp_post_norm,
            optional_roles=p.mlp_experts is not None,
        )
        blocks.append(Block(index=i, name=name, module=module, attention=attn, mlp=mlp))
    return blocks


def _embedding_shape(embedding: nn.Module | None) -> tuple[int | None, int | None]:
    weight = getattr(embedding, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None, None
    shape = full_shape(weight)
    if len(shape) != 2:
        return None, None
    return int(shape[0]), int(shape[1])


def _cfg_int(config: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _first(*values: int | None) -> int | None:
    return next((v for v in values if v is not None), None)


def _unsupported(model: nn.Module, model_type: str | None) -> ValueError:
    what = f"config.model_type={model_type!r}" if model_type else "no Hugging Face config"
    return ValueError(
        f"get_structure does not know {type(model).__name__} ({what}). Supported architectures: "
        f"{', '.join(SUPPORTED_ARCHS)}. For any other transformer, describe it with patterns, e.g. "
        f"get_structure(model, {PATTERN_EXAMPLE}). If this is a LightningModule, pass the Hugging Face model it "
        "holds (e.g. `module.model`)."
    )


def get_structure(model: nn.Module, patterns: StructurePatterns | None = None) -> ModelStructure:
    """Find the blocks, sublayers, norms, linears and head layout of a decoder-only transformer.

    Args:
        model: A Hugging Face model of an architecture in :data:`SUPPORTED_ARCHS` (causal LM or base model,
            possibly wrapped e.g. by ``peft``), or any ``nn.Module`` when ``patterns`` is given.
        patterns: Names of the blocks and their parts, for a model that is not a supported HF architecture.
            When given, they are used even for a supported one; shapes they leave out come from
            ``model.config`` if present.

    Returns:
        The model's :class:`ModelStructure`; names are relative to ``model``.

    Raises:
        ValueError: The architecture is not supported and no patterns were given; a pattern matches nothing
            (the message names the field, the pattern and modules that exist); or a shape cannot be determined.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> s = get_structure(GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4)))
        >>> s.arch, s.num_layers, s.blocks[1].mlp.roles["up"]
        ('gpt2', 2, 'transformer.h.1.mlp.c_fc')
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if patterns is None:
        if not isinstance(model_type, str) or model_type not in SUPPORTED_ARCHS:
            raise _unsupported(model, model_type)
        patterns = hf_patterns(model, model_type)

    blocks = _build_blocks(model, patterns)
    embedding = _root_module(model, patterns.embedding, "embedding", blocks)
    _root_module(model, patterns.lm_head, "lm_head", blocks)
    _root_module(model, patterns.final_norm, "final_norm", blocks)
    _root_module(model, patterns.position_embedding, "position_embedding", blocks)

    emb_rows, emb_cols = _embedding_shape(embedding)
    first_attn = next(iter(blocks[0].attention.linears.values()), None)
    hidden = _first(
        patterns.hidden_size,
        _cfg_int(config, "hidden_size", "n_embd", "d_model"),
        emb_cols,
        linear_in_out_features(first_attn)[0] if first_attn is not None else None,
    )
    if hidden is None:
        raise ValueError("StructurePatterns.hidden_size is required: the model has no config, embedding or linears")
    num_heads = _first(patterns.num_heads, _cfg_int(config, "num_attention_heads", "n_head"))
    if num_heads is None:
        raise ValueError(
            "StructurePatterns.num_heads is required: the model has no config with num_attention_heads, "
            f"e.g. {PATTERN_EXAMPLE}"
        )
    num_kv = _first(patterns.num_kv_heads, _cfg_int(config, "num_key_value_heads"), num_heads)
    head_dim = _first(patterns.head_dim, _cfg_int(config, "head_dim"), hidden // num_heads)
    for block in blocks:
        block.mlp.experts = _experts_shape(model, block.mlp, patterns, hidden)
    mlp0 = blocks[0].mlp
    up_name = next((mlp0.roles[r] for r in ("up", "gate", "gate_up") if r in mlp0.roles), None)
    up_name = up_name or next(iter(mlp0.linears), None)
    up_width = linear_in_out_features(mlp0.linears[up_name])[1] if up_name is not None else None
    if up_name is not None and up_name == mlp0.roles.get("gate_up") and up_width is not None:
        up_width //= 2
    intermediate = _first(
        patterns.intermediate_size,
        _cfg_int(config, "intermediate_size", "n_inner", "ffn_dim"),
        up_width,
        mlp0.experts.intermediate_size if mlp0.experts is not None else None,
    )
    if intermediate is None:
        raise ValueError("StructurePatterns.intermediate_size is required: the MLP has no linear to read it from")
    vocab = _first(patterns.vocab_size, _cfg_int(config, "vocab_size"), emb_rows, 0)
    max_pos = _first(patterns.max_position_embeddings, _cfg_int(config, "max_position_embeddings", "n_positions"))
    assert num_kv is not None and head_dim is not None and vocab is not None

    return ModelStructure(
        arch=patterns.arch,
        model=model,
        blocks=blocks,
        hidden_size=hidden,
        intermediate_size=intermediate,
        attention=AttentionShape(num_heads=num_heads, num_kv_heads=num_kv, head_dim=head_dim, hidden_size=hidden),
        vocab_size=vocab,
        max_position_embeddings=max_pos,
        embedding_name=patterns.embedding,
        lm_head_name=patterns.lm_head,
        final_norm_name=patterns.final_norm,
        position_embedding_name=patterns.position_embedding,
    )
