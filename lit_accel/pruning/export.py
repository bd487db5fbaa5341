"""Physically remove what the deterministic masks zero, giving a plain, smaller Hugging Face model.

:func:`export_pruned` takes the evaluation masks of :class:`~lit_accel.pruning.masks.L0Masks` (or any mask dict of
the same layout) and builds a new model of the same class whose logits equal those of the masked model (the model
under :func:`~lit_accel.pruning.apply.apply_masks` with the masks in evaluation mode):

- whole decoder blocks whose ``head_layer`` and ``mlp`` gates are both 0 are dropped and the rest renumbered;
- KV groups with gate 0 are dropped with their query heads (q/k/v rows, o_proj columns);
- intermediate channels with gate 0 are dropped (gate/up rows, down_proj columns);
- hidden dims with gate 0 are dropped from every weight that reads or writes the residual stream, the
  embedding, every RMSNorm and the LM head.

Kept gate values (fractional in general) are folded into the weights: a head gate and the ``head_layer`` gate into
o_proj's columns and rows, an intermediate gate and the ``mlp`` gate into down_proj, the hidden gate into the
embedding, o_proj/down_proj rows and every RMSNorm weight (the norm output is what the masked model multiplies by
the hidden gate). The masked model's RMSNorm normalises over the kept hidden dims only (see
:mod:`lit_accel.pruning.apply`), which is exactly what the exported model's RMSNorm does over its smaller width.

A tied LM head stays tied: the hidden gate is then folded into the shared embedding matrix, which applies it both
to the embedding output and to the logits (``(w * n) @ (E * z)^T == (w * n * z) @ E^T``), so the final norm's
weight is sliced without the gate. Untied, the gate goes into the final norm's weight as into every other norm.

The export needs the same number of KV heads and intermediate channels in every kept block (a Hugging Face config
has one of each); :meth:`L0Masks.deterministic` always gives that, as the paper's target architecture is uniform.

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
    ...                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    >>> masks = L0Masks(model, keep={"layers": 2, "heads": 1, "intermediate": 64, "hidden": 48})
    >>> small = export_pruned(model, masks)
    >>> c = small.config
    >>> c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size, c.hidden_size
    (2, 2, 1, 64, 48)
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import PreTrainedModel

from lit_accel.models.params import is_partitioned
from lit_accel.models.structure import Block, ModelStructure, get_structure
from lit_accel.pruning.masks import MASK_GROUPS, L0Masks

__all__ = ["export_pruned"]


def _nonzero(z: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(z != 0, as_tuple=True)[0]


def _uniform_count(name: str, counts: list[int]) -> int:
    if len(set(counts)) != 1:
        raise ValueError(
            f"export_pruned: masks keep {counts} {name} in the kept layers; a Hugging Face config needs the same "
            "number in every layer (use L0Masks.deterministic(), which keeps the same count per layer)"
        )
    return counts[0]


def _copy(dst: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    dst_weight = getattr(dst, "weight", None)
    assert isinstance(dst_weight, torch.Tensor)
    dst_weight.copy_(weight)
    dst_bias = getattr(dst, "bias", None)
    if isinstance(dst_bias, torch.Tensor):
        assert bias is not None
        dst_bias.copy_(bias)


def _weight(module: nn.Module) -> torch.Tensor:
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"export_pruned: {type(module).__name__} has no weight tensor")
    return w.detach()


def _bias(module: nn.Module) -> torch.Tensor | None:
    b = getattr(module, "bias", None)
    return b.detach() if isinstance(b, torch.Tensor) else None


@torch.no_grad()
def export_pruned(model: PreTrainedModel, masks: L0Masks | dict[str, torch.Tensor] | None = None) -> PreTrainedModel:
    """A new, physically smaller model of ``model``'s class that computes what the masked model computes.

    Args:
        model: A Hugging Face LLaMA, Mistral or Qwen2 model (causal LM or base), with full (not ZeRO-3
            partitioned) parameters. It is not modified.
        masks: The :class:`L0Masks` (their deterministic masks are used) or a dict of gate tensors with keys
            ``head_layer``, ``mlp``, ``heads``, ``intermediate``, ``hidden`` and their shapes.

    Returns:
        The pruned model, in evaluation mode, with the dtype of ``model`` and a config whose
        ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size``,
        ``hidden_size`` and ``head_dim`` describe it; ``save_pretrained`` / ``from_pretrained`` round-trip it.

    Raises:
        ValueError: ``masks`` is missing, lacks a group, keeps nothing of a group, or keeps different numbers of
            heads or channels in different layers; the model is ZeRO-3 partitioned.

    Example:
        >>> small = export_pruned(model, masks)  # doctest: +SKIP
        >>> small.save_pretrained("out/pruned")  # doctest: +SKIP
    """
    if masks is None:
        raise ValueError(
            "export_pruned: masks=None; pass the L0Masks learned for this model (or a dict of their "
            "deterministic values with keys " + ", ".join(MASK_GROUPS) + ")"
        )
    if any(is_partitioned(p) for p in model.parameters()):
        raise ValueError(
            "export_pruned: the model's parameters are ZeRO-3 partitioned; export from a full copy "
            "(e.g. the saved Hugging Face directory loaded with from_pretrained)"
        )
    zs = masks.deterministic() if isinstance(masks, L0Masks) else masks
    missing = [g for g in MASK_GROUPS if g not in zs]
    if missing:
        raise ValueError(f"export_pruned: masks lack groups {missing}; required groups are {list(MASK_GROUPS)}")
    first = next(model.parameters())
    dtype, device = first.dtype, first.device
    zs = {k: v.detach().to(device=device, dtype=torch.float32) for k, v in zs.items()}
    src = get_structure(model)
    attn_shape = src.attention
    g, d = attn_shape.kv_group_size, attn_shape.head_dim

    hidden_keep = _nonzero(zs["hidden"])
    blocks = [b for b in src.blocks if zs["head_layer"][b.index] != 0 or zs["mlp"][b.index] != 0]
    if hidden_keep.numel() == 0 or not blocks:
        raise ValueError("export_pruned: the masks keep no hidden dims or no layers; nothing would remain")
    group_keep = {b.index: _nonzero(zs["heads"][b.index]) for b in blocks}
    chan_keep = {b.index: _nonzero(zs["intermediate"][b.index]) for b in blocks}
    n_kv = _uniform_count("KV heads", [len(v) for v in group_keep.values()])
    n_inter = _uniform_count("intermediate channels", [len(v) for v in chan_keep.values()])
    if n_kv == 0 or n_inter == 0:
        raise ValueError("export_pruned: the masks keep no KV heads or no intermediate channels in a kept layer")

    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(blocks)
    config.num_attention_heads = n_kv * g
    config.num_key_value_heads = n_kv
    config.intermediate_size = n_inter
    config.hidden_size = int(hidden_keep.numel())
    # head_dim is never pruned; it must be explicit once hidden_size / num_heads no longer gives it.
    config.head_dim = d
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == src.num_layers:
        config.layer_types = [layer_types[b.index] for b in blocks]
    new_model = type(model)(config)
    # nn.Module.to directly: PreTrainedModel.to is wrapped by a decorator that hides its signature from mypy.
    nn.Module.to(new_model, device=device, dtype=dtype)
    new_model.eval()
    dst = get_structure(new_model)
    _fill(src, dst, zs, blocks, hidden_keep, group_keep, chan_keep, g, d, dtype)
    return new_model


def _fill(
    src: ModelStructure,
    dst: ModelStructure,
    zs: dict[str, torch.Tensor],
    blocks: list[Block],
    hid: torch.Tensor,
    group_keep: dict[int, torch.Tensor],
    chan_keep: dict[int, torch.Tensor],
    g: int,
    d: int,
    dtype: torch.dtype,
) -> None:
    """Copy the kept slices of ``src`` into ``dst`` with the gates folded in (computed in float32)."""
    zh = zs["hidden"][hid]

    def f32(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.float32)

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype)

    assert src.embedding_name is not None and dst.embedding_name is not None
    emb = _weight(src.model.get_submodule(src.embedding_name))
    _copy(dst.model.get_submodule(dst.embedding_name), cast(f32(emb)[:, hid] * zh))
    if src.final_norm_name is not None and dst.final_norm_name is not None:
        norm_w = f32(_weight(src.model.get_submodule(src.final_norm_name)))[hid]
        # A tied head already carries the gate through the embedding matrix (see the module docstring).
        _copy(dst.model.get_submodule(dst.final_norm_name), cast(norm_w if src.tied_embeddings else norm_w * zh))
    if src.lm_head_name is not None and dst.lm_head_name is not None and not src.tied_embeddings:
        head = src.model.get_submodule(src.lm_head_name)
        _copy(dst.model.get_submodule(dst.lm_head_name), _weight(head)[:, hid], _bias(head))

    for new_block, block in zip(dst.blocks, blocks):
        i = block.index
        groups = group_keep[i]
        # Query heads of the kept KV groups, then their weight rows (head-major layout: head h = rows h*d..h*d+d-1).
        q_heads = (groups[:, None] * g + torch.arange(g, device=groups.device)[None, :]).reshape(-1)
        q_rows = (q_heads[:, None] * d + torch.arange(d, device=groups.device)[None, :]).reshape(-1)
        kv_rows = (groups[:, None] * d + torch.arange(d, device=groups.device)[None, :]).reshape(-1)
        # One gate per query head (its group's gate), spread over the head's d output columns.
        head_gate = zs["heads"][i][groups].repeat_interleave(g * d)
        layer_attn, layer_mlp = zs["head_layer"][i], zs["mlp"][i]

        for sub, new_sub in ((block.attention, new_block.attention), (block.mlp, new_block.mlp)):
            assert sub.norm is not None and new_sub.norm is not None
            _copy(new_sub.norm, cast(f32(_weight(sub.norm))[hid] * zh))

        for role, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows)):
            lin = block.attention.linear(role)
            b = _bias(lin)
            _copy(new_block.attention.linear(role), _weight(lin)[rows][:, hid], None if b is None else b[rows])
        o = block.attention.linear("o")
        scale_rows = (layer_attn * zh)[:, None]
        o_w = f32(_weight(o))[hid][:, q_rows] * head_gate[None, :] * scale_rows
        o_b = _bias(o)
        _copy(
            new_block.attention.linear("o"), cast(o_w), None if o_b is None else cast(f32(o_b)[hid] * layer_attn * zh)
        )

        chans = chan_keep[i]
        for role in ("gate", "up"):
            lin = block.mlp.linear(role)
            b = _bias(lin)
            _copy(new_block.mlp.linear(role), _weight(lin)[chans][:, hid], None if b is None else b[chans])
        down = block.mlp.linear("down")
        down_w = f32(_weight(down))[hid][:, chans] * zs["intermediate"][i][chans][None, :] * (layer_mlp * zh)[:, None]
        down_b = _bias(down)
        _copy(
            new_block.mlp.linear("down"),
            cast(down_w),
            None if down_b is None else cast(f32(down_b)[hid] * layer_mlp * zh),
        )
