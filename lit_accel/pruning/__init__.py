"""Structured pruning (Sheared-LLaMA): learn L0 masks, constrain them to a target, export a smaller HF model.

- :mod:`~lit_accel.pruning.masks`: hard-concrete gates and :class:`L0Masks` (layers, KV groups, MLP channels,
  hidden dims), with the exact expected parameter count.
- :mod:`~lit_accel.pruning.apply`: :func:`apply_masks` runs a Hugging Face model under the masks through hooks.
- :mod:`~lit_accel.pruning.targets`: :class:`PruningTarget` (dims, a preset or a ratio), the Lagrangian constraint and
  its multipliers.
- :mod:`~lit_accel.pruning.export`: :func:`export_pruned` removes the masked units and folds the gates in;
  :func:`export_pruned_gathered` does it for a DeepSpeed ZeRO-3 partitioned model (gathered to rank 0);
  :func:`export_pruned_checkpoint` does it from a checkpoint (``lit-accel export``).
- :mod:`~lit_accel.pruning.report`: per-layer expected / kept / target sizes and their W&B charts.
- :mod:`~lit_accel.pruning.callback`: :class:`StructuredPruning`, the Lightning callback that runs it all in a fit.

Families (:data:`PRUNABLE_ARCHS`): LLaMA, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3 (text), Phi-3 and OLMo 2;
:func:`check_prunable` refuses mixture-of-experts models (Mixtral, Qwen3-MoE) and GPT-2 with the reason.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    >>> target = PruningTarget(num_layers=1, num_kv_heads=1, intermediate_size=64, hidden_size=32)
    >>> masks = L0Masks(model)
    >>> masks.set_keep(target.keep(masks.shape))
    >>> lagrangian = Lagrangian(target)
    >>> with apply_masks(model, masks.train()):
    ...     loss = model(torch.randint(0, 128, (1, 8)), labels=torch.randint(0, 128, (1, 8))).loss
    >>> penalty, metrics = constraint_loss(masks, target, lagrangian, step=0, warmup_steps=10)
    >>> (loss + penalty).backward()
    >>> export_pruned(model, masks).config.hidden_size
    32
"""

from lit_accel.pruning.apply import MaskHooks, apply_masks, masked_rms_norm
from lit_accel.pruning.callback import StructuredPruning, StructuredPruningSettings
from lit_accel.pruning.export import (
    export_loaded_pruning_checkpoint,
    export_pruned,
    export_pruned_checkpoint,
    export_pruned_gathered,
    is_pruning_checkpoint,
    is_pruning_checkpoint_dict,
)
from lit_accel.pruning.masks import (
    PRUNABLE_ARCHS,
    HardConcrete,
    L0Masks,
    PrunableShape,
    check_prunable,
    count_params,
)
from lit_accel.pruning.report import architecture_charts, architecture_report
from lit_accel.pruning.targets import (
    TARGET_PRESETS,
    Lagrangian,
    PruningTarget,
    constraint_loss,
    lagrangian_loss,
    preset_dims,
    ramped_target,
)

__all__ = [
    "PRUNABLE_ARCHS",
    "TARGET_PRESETS",
    "HardConcrete",
    "L0Masks",
    "Lagrangian",
    "MaskHooks",
    "PrunableShape",
    "PruningTarget",
    "StructuredPruning",
    "StructuredPruningSettings",
    "apply_masks",
    "architecture_charts",
    "architecture_report",
    "check_prunable",
    "constraint_loss",
    "count_params",
    "export_loaded_pruning_checkpoint",
    "export_pruned",
    "export_pruned_checkpoint",
    "export_pruned_gathered",
    "is_pruning_checkpoint",
    "is_pruning_checkpoint_dict",
    "lagrangian_loss",
    "masked_rms_norm",
    "preset_dims",
    "ramped_target",
]
