"""Physically remove what the deterministic masks zero, giving a plain, smaller Hugging Face model.

:func:`export_pruned` takes the evaluation masks of :class:`~lit_accel.pruning.masks.L0Masks` (or any mask dict of
the same layout) and builds a new model of the same class whose logits equal those of the masked model (the model
under :func:`~lit_accel.pruning.apply.apply_masks` with the masks in evaluation mode), for every family in
:data:`~lit_accel.pruning.masks.PRUNABLE_ARCHS`:

- whole decoder blocks whose ``head_layer`` and ``mlp`` gates are both 0 are dropped and the rest renumbered;
- KV groups with gate 0 are dropped with their query heads (q/k/v rows, or the matching rows of each third of a
  fused ``qkv_proj``; o_proj columns; OLMo 2's whole-projection q/k norm weights);
- intermediate channels with gate 0 are dropped (gate/up rows, or both halves of a fused ``gate_up_proj``;
  down_proj columns);
- hidden dims with gate 0 are dropped from every weight that reads or writes the residual stream, the
  embedding, every norm over the hidden dims (pre-, post- and final norms) and the LM head.

Per-head q/k norms (Qwen3, Gemma 3) are shared by all heads and copied whole.

Kept gate values (fractional in general) are folded into the weights: a head gate into o_proj's columns, an
intermediate gate into down_proj's columns, and the hidden gate into the embedding and every norm weight (the norm
output is what the masked model multiplies by the hidden gate). The ``head_layer`` / ``mlp`` gate and the hidden
gate of what a sublayer writes to the residual go into o_proj/down_proj rows, or, where a post-norm follows the
sublayer (Gemma 2/3, OLMo 2), into that norm's weight, as the masked model applies them after it. Folding a
multiplier ``z`` into a Gemma norm, whose weight means ``1 + w``, stores ``(1 + w) * z - 1``. The masked model's
norms normalise over the kept hidden dims only (see :mod:`lit_accel.pruning.apply`), which is exactly what the
exported model's norms do over their smaller width.

A tied LM head stays tied: the hidden gate is then folded into the shared embedding matrix, which applies it both
to the embedding output and to the logits (``(w * n) @ (E * z)^T == (w * n * z) @ E^T``), so the final norm's
weight is sliced without the gate. Untied, the gate goes into the final norm's weight as into every other norm.

**Scaled embeddings (Gemma).** Gemma multiplies the embedding output by ``sqrt(config.hidden_size)``, so the
exported model, with a smaller ``hidden_size``, scales by ``sqrt(kept)`` instead. The ratio ``c = sqrt(hidden) /
sqrt(kept)`` is folded into the embedding weights, which makes the residual stream exactly the masked model's. A
tied LM head would then see the embedding times ``c`` too, so the final norm's weight is divided by ``c``
(``(w / c * n) @ (c * E)^T == (w * n) @ E^T``): the logits are exact; only the final norm's output (the last
hidden state a caller may ask for) differs, by ``1 / c`` and, as with any tied head, by the hidden gate.

The export needs the same number of KV heads and intermediate channels in every kept block (a Hugging Face config
has one of each); :meth:`L0Masks.deterministic` always gives that, as the paper's target architecture is uniform.

:func:`export_pruned_gathered` exports a model whose parameters DeepSpeed ZeRO-3 partitions (called on every rank,
it gathers the weights one module at a time into a CPU copy on rank 0, which prunes it).
:func:`export_pruned_checkpoint` does the same from a checkpoint of a
:class:`~lit_accel.pruning.callback.StructuredPruning` run, a ZeRO-3 checkpoint folder included (``lit-accel export
--ckpt CKPT --out DIR`` calls it for such a checkpoint), then reloads the directory with plain ``from_pretrained`` and
checks its logits.

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
import inspect
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from lit_accel.checkpoint import deepspeed_client_state_file, load_checkpoint_file, load_lightning_checkpoint
from lit_accel.models.causal_lm import CausalLM
from lit_accel.models.hf_directory import check_output_directory, save_hf_directory
from lit_accel.models.params import full_state_dict, is_partitioned, is_rank_zero, load_full_state_dict
from lit_accel.models.structure import Block, ModelStructure, get_structure
from lit_accel.pruning.apply import apply_masks, norm_style
from lit_accel.pruning.masks import MASK_GROUPS, L0Masks, check_prunable

__all__ = [
    "export_loaded_pruning_checkpoint",
    "export_pruned",
    "export_pruned_checkpoint",
    "export_pruned_gathered",
    "is_pruning_checkpoint",
    "is_pruning_checkpoint_dict",
]


def _nonzero(z: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(z != 0, as_tuple=True)[0]


def _uniform_count(name: str, counts: list[int]) -> int:
    if len(set(counts)) != 1:
        raise ValueError(
            f"export_pruned: masks keep {counts} {name} in the kept layers; a Hugging Face config needs the same "
            "number in every layer (use L0Masks.deterministic(), which keeps the same count per layer)"
        )
    return counts[0]


def _copy(dst: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Copy into ``dst``'s weight (and bias); returns the tensors written."""
    dst_weight = getattr(dst, "weight", None)
    assert isinstance(dst_weight, torch.Tensor)
    dst_weight.copy_(weight)
    dst_bias = getattr(dst, "bias", None)
    if isinstance(dst_bias, torch.Tensor):
        assert bias is not None
        dst_bias.copy_(bias)
        return [dst_weight, dst_bias]
    return [dst_weight]


def _embed_scale(embedding: nn.Module, dtype: torch.dtype) -> float:
    """The factor a scaled embedding (Gemma's ``embed_scale``) multiplies its output by, as its forward rounds it."""
    scale = getattr(embedding, "embed_scale", None)
    if isinstance(scale, torch.Tensor):
        return float(scale.to(dtype))
    return float(scale) if isinstance(scale, (int, float)) else 1.0


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
        model: A Hugging Face model of a family in :data:`~lit_accel.pruning.masks.PRUNABLE_ARCHS` (causal LM or
            base), with full (not ZeRO-3 partitioned: see :func:`export_pruned_gathered`) parameters. It is not
            modified.
        masks: The :class:`L0Masks` (their deterministic masks are used) or a dict of gate tensors with keys
            ``head_layer``, ``mlp``, ``heads``, ``intermediate``, ``hidden`` and their shapes.

    Returns:
        The pruned model, in evaluation mode, with the dtype of ``model`` and a config whose
        ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size``,
        ``hidden_size`` and ``head_dim`` describe it; ``save_pretrained`` / ``from_pretrained`` round-trip it.

    Raises:
        ValueError: ``masks`` is missing, lacks a group, keeps nothing of a group, or keeps different numbers of
            heads or channels in different layers; the model is ZeRO-3 partitioned or not prunable
            (:func:`~lit_accel.pruning.masks.check_prunable`: mixture of experts, GPT-2).

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
            "export_pruned: the model's parameters are ZeRO-3 partitioned; call export_pruned_gathered on every "
            "rank (it gathers them to rank 0), or export from a full copy (e.g. a saved directory loaded with "
            "from_pretrained)"
        )
    zs = masks.deterministic() if isinstance(masks, L0Masks) else masks
    missing = [g for g in MASK_GROUPS if g not in zs]
    if missing:
        raise ValueError(f"export_pruned: masks lack groups {missing}; required groups are {list(MASK_GROUPS)}")
    first = next(model.parameters())
    dtype, device = first.dtype, first.device
    zs = {k: v.detach().to(device=device, dtype=torch.float32) for k, v in zs.items()}
    src = get_structure(model)
    check_prunable(src)
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
    """Copy the kept slices of ``src`` into ``dst`` with the gates folded in (computed in float32).

    Raises:
        RuntimeError: A parameter of ``dst`` was not written (an architecture holding weights this export does not
            know would otherwise keep random values).
    """
    zh = zs["hidden"][hid]
    offset = norm_style(src.arch).offset
    written: list[torch.Tensor] = []

    def f32(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.float32)

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype)

    def copy(dst_module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        written.extend(_copy(dst_module, weight, bias))

    def module(structure: ModelStructure, name: str) -> nn.Module:
        return structure.model.get_submodule(name)

    def copy_norm(src_norm: nn.Module, dst_norm: nn.Module, scale: torch.Tensor | float) -> None:
        # The norm multiplies by (weight + offset): fold `scale` into that product, store it less the offset.
        effective = (f32(_weight(src_norm))[hid] + offset) * scale
        copy(dst_norm, cast(effective - offset))

    assert src.embedding_name is not None and dst.embedding_name is not None
    src_emb, dst_emb = module(src, src.embedding_name), module(dst, dst.embedding_name)
    # A scaled embedding multiplies by sqrt(hidden_size) of its config: make up for the smaller one (module docstring).
    emb_ratio = _embed_scale(src_emb, dtype) / _embed_scale(dst_emb, dtype)
    copy(dst_emb, cast(f32(_weight(src_emb))[:, hid] * zh * emb_ratio))
    if src.final_norm_name is not None and dst.final_norm_name is not None:
        # A tied head already carries the gate through the embedding matrix, and its ratio, which the norm undoes.
        final_scale = 1.0 / emb_ratio if src.tied_embeddings else zh
        copy_norm(module(src, src.final_norm_name), module(dst, dst.final_norm_name), final_scale)
    elif src.tied_embeddings and emb_ratio != 1.0:
        raise ValueError(
            "export_pruned: a scaled embedding tied to the LM head needs a final norm to make up for the new scale"
        )
    if src.lm_head_name is not None and dst.lm_head_name is not None and not src.tied_embeddings:
        head = module(src, src.lm_head_name)
        copy(module(dst, dst.lm_head_name), _weight(head)[:, hid], _bias(head))

    heads, kv_heads, inter = src.attention.num_heads, src.attention.num_kv_heads, src.intermediate_size
    for new_block, block in zip(dst.blocks, blocks):
        i = block.index
        groups = group_keep[i]
        # Query heads of the kept KV groups, then their weight rows (head-major layout: head h = rows h*d..h*d+d-1).
        q_heads = (groups[:, None] * g + torch.arange(g, device=groups.device)[None, :]).reshape(-1)
        q_rows = (q_heads[:, None] * d + torch.arange(d, device=groups.device)[None, :]).reshape(-1)
        kv_rows = (groups[:, None] * d + torch.arange(d, device=groups.device)[None, :]).reshape(-1)
        # One gate per query head (its group's gate), spread over the head's d output columns.
        head_gate = zs["heads"][i][groups].repeat_interleave(g * d)
        attn, new_attn = block.attention, new_block.attention

        # Per sublayer: the scale of what it writes to the residual stream (its layer gate times the hidden gate)
        # goes into its post-norm if it has one, else into the rows of its output linear.
        out_scale = {}
        for sub, new_sub, layer_gate in (
            (attn, new_attn, zs["head_layer"][i]),
            (block.mlp, new_block.mlp, zs["mlp"][i]),
        ):
            if sub.norm is not None:
                assert new_sub.norm is not None
                copy_norm(sub.norm, new_sub.norm, zh)
            if sub.post_norm is not None:
                assert new_sub.post_norm is not None
                copy_norm(sub.post_norm, new_sub.post_norm, zh * layer_gate)
                out_scale[sub.kind] = torch.ones_like(zh)
            else:
                out_scale[sub.kind] = zh * layer_gate

        if "qkv" in attn.roles:
            # Fused [q | k | v] (Phi-3): the kept rows of each part, at its offset in the fused output.
            rows = torch.cat([q_rows, heads * d + kv_rows, (heads + kv_heads) * d + kv_rows])
            role_rows = [("qkv", rows)]
        else:
            role_rows = [("q", q_rows), ("k", kv_rows), ("v", kv_rows)]
        for role, rows in role_rows:
            lin = attn.linear(role)
            b = _bias(lin)
            copy(new_attn.linear(role), _weight(lin)[rows][:, hid], None if b is None else b[rows])
        for role, name in attn.inner_norms.items():
            w = _weight(module(src, name))
            if src.qk_norm == "projection":  # OLMo 2: one weight per q / k row, kept with its head
                w = w[q_rows if role == "q_norm" else kv_rows]
            copy(module(dst, new_attn.inner_norms[role]), w)
        o = attn.linear("o")
        o_w = f32(_weight(o))[hid][:, q_rows] * head_gate[None, :] * out_scale["attention"][:, None]
        o_b = _bias(o)
        copy(new_attn.linear("o"), cast(o_w), None if o_b is None else cast(f32(o_b)[hid] * out_scale["attention"]))

        chans = chan_keep[i]
        if "gate_up" in block.mlp.roles:
            # Fused [gate | up] (Phi-3): the kept channels of both halves.
            mlp_rows = [("gate_up", torch.cat([chans, inter + chans]))]
        else:
            mlp_rows = [("gate", chans), ("up", chans)]
        for role, rows in mlp_rows:
            lin = block.mlp.linear(role)
            b = _bias(lin)
            copy(new_block.mlp.linear(role), _weight(lin)[rows][:, hid], None if b is None else b[rows])
        down = block.mlp.linear("down")
        down_w = f32(_weight(down))[hid][:, chans] * zs["intermediate"][i][chans][None, :] * out_scale["mlp"][:, None]
        down_b = _bias(down)
        copy(
            new_block.mlp.linear("down"),
            cast(down_w),
            None if down_b is None else cast(f32(down_b)[hid] * out_scale["mlp"]),
        )

    done = {id(t) for t in written}
    missing = [name for name, p in dst.model.named_parameters() if id(p) not in done]
    if missing:
        raise RuntimeError(
            f"export_pruned: {dst.arch} has parameters this export does not fill: {missing[:6]}; it cannot prune "
            "this architecture exactly"
        )


def export_pruned_gathered(
    model: PreTrainedModel, masks: L0Masks | dict[str, torch.Tensor] | None = None
) -> PreTrainedModel | None:
    """:func:`export_pruned` on rank 0 for a model that may be DeepSpeed ZeRO-3 partitioned; call it on every rank.

    Under ZeRO-3 the masks are gathered (on every rank) and the model's weights are gathered one module at a time
    into a CPU copy on rank 0 (:func:`~lit_accel.models.params.full_state_dict`), which is pruned there: the full
    model is never whole on an accelerator, and only at this export. Otherwise rank 0 prunes the model itself.

    Args:
        model: As for :func:`export_pruned`, partitioned or not.
        masks: As for :func:`export_pruned`.

    Returns:
        The pruned model (on the CPU when ``model`` is partitioned) on rank 0, ``None`` on the other ranks.

    Raises:
        ValueError: As :func:`export_pruned`.
    """
    zs = masks.deterministic() if isinstance(masks, L0Masks) else masks  # collective under ZeRO-3
    if not any(is_partitioned(p) for p in model.parameters()):
        return export_pruned(model, zs) if is_rank_zero() else None
    state = full_state_dict(model)  # collective; rank 0 gets every tensor on the CPU, the others nothing
    if not is_rank_zero():
        return None
    dtype, default = next(model.parameters()).dtype, torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the model's dtype: a 7B model never exists in fp32 here
    try:
        full = type(model)(copy.deepcopy(model.config))
    finally:
        torch.set_default_dtype(default)
    load_full_state_dict(full, state)
    return export_pruned(full, zs)


# --------------------------------------------------------------------------------------------- from a checkpoint
def is_pruning_checkpoint(ckpt: str | os.PathLike[str]) -> bool:
    """Whether ``ckpt`` (a Lightning ``.ckpt`` file or a DeepSpeed checkpoint folder) is from a StructuredPruning run.

    Reads the checkpoint memory-mapped (tensors are not loaded), so it is cheap even for a large model. Anything
    unreadable is reported as False (the ordinary exporter then explains what is wrong with it).
    """
    path = Path(ckpt)
    try:
        if path.is_dir():
            states = deepspeed_client_state_file(path)
            if states is None:
                return False
            checkpoint = load_checkpoint_file(states, mmap=True, verify=False)
        elif path.is_file():
            checkpoint = load_checkpoint_file(path, mmap=True, verify=False)
        else:
            return False
    except Exception:  # not a zip-format torch file, or no checkpoint at all
        return False
    return is_pruning_checkpoint_dict(checkpoint)


def is_pruning_checkpoint_dict(checkpoint: Any) -> bool:
    """Whether a checkpoint already loaded (a Lightning checkpoint dict, or a DeepSpeed ``*_model_states.pt`` dict)
    is from a StructuredPruning run: it has the callback's record (``checkpoint["lit_accel"]["pruning"]``) or mask
    weights (``pruning.masks.`` in a key of its ``state_dict``, or of the DeepSpeed ``module``).

    The one test behind :func:`is_pruning_checkpoint` and ``lit-accel export``'s choice of exporter.
    """
    if not isinstance(checkpoint, dict):
        return False
    if isinstance((checkpoint.get("lit_accel") or {}).get("pruning"), dict):
        return True
    state = checkpoint.get("state_dict") or checkpoint.get("module") or {}
    return isinstance(state, dict) and any("pruning.masks." in str(k) for k in state)


def export_pruned_checkpoint(
    ckpt: str | os.PathLike[str],
    out: str | os.PathLike[str],
    overwrite: bool = False,
    tokenizer: str | None = None,
    verify: bool = True,
) -> Path:
    """Write the physically pruned model of a StructuredPruning checkpoint as a plain Hugging Face directory.

    The model is rebuilt from the config saved in the checkpoint (the source model directory is not needed), its
    weights and the masks' ``log_alpha`` are loaded from the ``state_dict``, the deterministic masks are those of the
    target recorded by the callback, and :func:`export_pruned` removes the masked units. ``lit-accel export --ckpt
    CKPT --out DIR`` calls this for a pruning checkpoint.

    Args:
        ckpt: A Lightning ``.ckpt`` file or a DeepSpeed checkpoint folder of a StructuredPruning run.
        out: The output directory; must not exist or be empty unless ``overwrite``.
        overwrite: Replace a previous export in ``out`` (the files its ``lit_accel_export.json`` lists); other files
            there are kept.
        tokenizer: A tokenizer directory to copy in; by default the one the run trained with, if still on disk.
        verify: Reload the written directory with ``AutoModelForCausalLM.from_pretrained`` and check that its
            logits equal the masked model's at evaluation (a few random tokens), before it is renamed into place:
            an export that fails the check leaves nothing at ``out``.

    Returns:
        The output directory.

    Raises:
        ValueError: The checkpoint has no masks or no target record, or a tokenizer path that is not a directory.
        FileExistsError: ``out`` is not empty and ``overwrite`` is False.
        RuntimeError: ``verify`` found logits that differ from the masked model's.
    """
    out_path = Path(out)
    check_output_directory(out_path, overwrite, name="--out", flag="--overwrite")
    checkpoint = load_lightning_checkpoint(ckpt)
    return export_loaded_pruning_checkpoint(checkpoint, ckpt, out_path, overwrite, tokenizer, verify)


def export_loaded_pruning_checkpoint(
    checkpoint: dict[str, Any],
    ckpt: str | os.PathLike[str],
    out_path: Path,
    overwrite: bool = False,
    tokenizer: str | None = None,
    verify: bool = True,
) -> Path:
    """:func:`export_pruned_checkpoint` on a checkpoint already read by
    :func:`lit_accel.checkpoint.load_lightning_checkpoint` (``ckpt`` only names it in messages), so ``lit-accel
    export`` reads a large checkpoint once; ``out_path`` has been checked by the caller."""
    extra = checkpoint.get("lit_accel") or {}
    state = checkpoint["state_dict"]
    prefix = "pruning.masks."
    mask_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not mask_state:
        raise ValueError(
            f"--ckpt {str(ckpt)!r} holds no pruning masks ({prefix}* in its state_dict), which every"
            " StructuredPruning checkpoint holds: it is incomplete or not from a StructuredPruning run"
        )
    record = extra.get("pruning")
    if not isinstance(record, dict) or "keep" not in record:
        raise ValueError(
            f"--ckpt {str(ckpt)!r} has masks but no record of the pruning target (checkpoint['lit_accel']['pruning'], "
            "written by StructuredPruning.on_save_checkpoint); export from the trained module with "
            "StructuredPruning(export_dir=...) or lit_accel.pruning.export_pruned instead"
        )
    saved_config = extra.get("config")
    if saved_config is not None:
        module = CausalLM(model=saved_config)
    else:
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        accepted = inspect.signature(CausalLM.__init__).parameters
        module = CausalLM(**{k: v for k, v in hparams.items() if k in accepted})
    module.configure_model()
    model = module.model
    assert model is not None
    if saved_config is not None and saved_config.get("eos_token_id") is not None:
        model.config.eos_token_id = saved_config["eos_token_id"]
    load_full_state_dict(model, {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")})
    masks = L0Masks(model)
    masks.load_state_dict(mask_state)
    masks.set_keep({k: int(v) for k, v in record["keep"].items()})
    masks.eval()
    small = export_pruned(model, masks)
    tok_dir = tokenizer or extra.get("tokenizer_dir")
    tok = None
    if tok_dir and Path(tok_dir).is_dir():
        tok = AutoTokenizer.from_pretrained(tok_dir)
    elif tokenizer:
        raise ValueError(f"--tokenizer {tokenizer!r} is not a directory.")
    errors: list[float] = []

    def check(tmp: Path) -> None:
        # The check reads the temporary folder, so a model that fails it is never published under `out_path`.
        errors.append(_check_reloaded(tmp, model, masks, out_path))

    save_hf_directory(
        small, small.state_dict(), out_path, tokenizer=tok, overwrite=overwrite, check=check if verify else None
    )
    n_full = sum(p.numel() for p in model.parameters())
    n_small = sum(p.numel() for p in small.parameters())
    c = small.config
    rank_zero_info(
        f"lit_accel: pruned model {n_small:,} parameters ({n_small / n_full:.1%} of {n_full:,}): "
        f"layers {c.num_hidden_layers}, heads {c.num_attention_heads} (KV {c.num_key_value_heads}), "
        f"intermediate {c.intermediate_size}, hidden {c.hidden_size}"
    )
    if errors:
        rank_zero_info(f"lit_accel: from_pretrained({str(out_path)!r}) loads it; max logit difference {errors[0]:.2e}")
    return out_path


@torch.no_grad()
def _check_reloaded(folder: Path, model: PreTrainedModel, masks: L0Masks, out: Path) -> float:
    """Reload ``folder`` (the export for ``out``, before it is renamed there) with plain ``from_pretrained`` and
    compare its logits with the masked model's (relative)."""
    reloaded = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    vocab = int(model.config.vocab_size)
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    try:
        with apply_masks(model, masks):
            expected = model(input_ids=ids).logits.float()
    finally:
        model.train(was_training)
    got = reloaded(input_ids=ids).logits.float()
    err = float((got - expected).abs().max() / expected.abs().max().clamp_min(1.0))
    if not err < 1e-3:
        raise RuntimeError(
            f"export check failed: the model exported for {str(out)!r}, reloaded, gives logits that differ from the"
            f" masked model's by {err:.2e} (relative), so it was not written there; please report this with the"
            " checkpoint's config"
        )
    return err
