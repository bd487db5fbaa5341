"""ZeRO settings derived from a model's size: the rule, and how the size is read off a LightningModule.

The rule (``d`` = hidden size, ``P`` = parameter count; all values are numbers of elements, as DeepSpeed counts):

=====================================  ==========================================  =================================
DeepSpeed key                          derived value                               DeepSpeed's default
=====================================  ==========================================  =================================
``reduce_bucket_size``                 ``clamp(d*d, 2**22, 5e8)``, at most ``P``   ``5e8``
``allgather_bucket_size`` (ZeRO-1/2)   same as ``reduce_bucket_size``              ``5e8``
``stage3_prefetch_bucket_size``        ``clamp(0.9*d*d, 2**22, 5e8)``, <= ``P``    ``5e7``
``stage3_param_persistence_threshold`` ``10*d``                                    ``1e5``
=====================================  ==========================================  =================================

Why (key meanings from DeepSpeed's configuration reference, https://www.deepspeed.ai/docs/config-json/, "ZeRO
Optimizations for FP16 Training", and ``deepspeed/runtime/zero/config.py``):

* ``reduce_bucket_size`` / ``allgather_bucket_size``: "Number of elements reduced/allreduced [allgathered] at a
  time. Limits the memory required for the allgather for large model sizes". With ``overlap_comm`` ZeRO-2 keeps
  several buckets in flight (Hugging Face's DeepSpeed guide puts the extra memory at ``4.5 x`` the two bucket sizes),
  so a fixed ``5e8`` (1 GB of bf16 gradients per bucket) costs several GB whatever the model: the buckets should
  grow with the model. ``d*d`` is one attention projection: the size Hugging Face Transformers fills in for
  ``"auto"`` (``transformers.integrations.deepspeed.HfTrainerDeepSpeedConfig.trainer_config_finalize``). The floor
  ``2**22`` (8 MiB of bf16) keeps small models' messages out of the latency-bound range; the bucket never exceeds
  the model (``P``), whose gradient buffer would otherwise be mostly empty.
* ``stage3_prefetch_bucket_size``: "Maximum number of parameter elements to fetch ahead of use" -- about one
  projection matrix ahead (``0.9*d*d``, again Transformers' ``"auto"``), with the same floor and cap.
* ``stage3_param_persistence_threshold``: "Do not partition parameters smaller than this threshold. Smaller values
  use less memory, but can greatly increase communication (especially latency-bound messages)". ``10*d`` (also
  Transformers' rule) keeps norm gains and biases (``d`` elements) whole on every rank and partitions every matrix.

``stage3_max_live_parameters`` and ``stage3_max_reuse_distance`` keep DeepSpeed's ``1e9``; ``sub_group_size`` is
DeepSpeed's ``1e9`` (Lightning's ``1e12`` makes one group of all parameters for the offloaded optimizer step).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "BUCKET_FLOOR",
    "DEEPSPEED_BUCKET_DEFAULT",
    "ModelSize",
    "derived_zero_settings",
    "local_partition_span",
    "model_size",
    "param_numel",
]

BUCKET_FLOOR = 2**22
"""Smallest derived bucket (elements): 8 MiB of bf16, large enough for bandwidth-bound collectives."""
DEEPSPEED_BUCKET_DEFAULT = 500_000_000
"""DeepSpeed's own default bucket size (elements), the cap of the derived ones."""

_HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model", "dim", "embed_dim")


@dataclass(frozen=True)
class ModelSize:
    """What the rule needs to know about a model; either may be unknown (``None``)."""

    num_params: int | None
    """Total parameters (full sizes under ZeRO-3, whose local tensors are empty shards)."""
    hidden_size: int | None
    """Width of the residual stream (``d``)."""

    def describe(self) -> str:
        params = f"{self.num_params / 1e6:,.1f}M parameters" if self.num_params else "unknown parameter count"
        hidden = f"hidden size {self.hidden_size}" if self.hidden_size else "unknown hidden size"
        return f"{params}, {hidden}"


def derived_zero_settings(size: ModelSize, stage: int) -> dict[str, int]:
    """The ``zero_optimization`` settings the rule gives for ``size`` at ZeRO ``stage`` (empty if ``d`` is unknown).

    Example:
        >>> zero3 = derived_zero_settings(ModelSize(num_params=6_700_000_000, hidden_size=4096), stage=3)
        >>> list(zero3.values())  # reduce_bucket_size, stage3_prefetch_bucket_size, stage3_param_persistence_threshold
        [16777216, 15099494, 40960]
    """
    d = size.hidden_size
    if not d or stage not in (1, 2, 3):
        return {}

    def bucket(elements: float) -> int:
        value = int(min(max(elements, BUCKET_FLOOR), DEEPSPEED_BUCKET_DEFAULT))
        return min(value, size.num_params) if size.num_params else value

    out = {"reduce_bucket_size": bucket(d * d)}
    if stage in (1, 2):
        out["allgather_bucket_size"] = out["reduce_bucket_size"]
    else:
        out["stage3_prefetch_bucket_size"] = bucket(0.9 * d * d)
        out["stage3_param_persistence_threshold"] = 10 * d
    return out


def model_size(module: nn.Module) -> ModelSize:
    """Reads the parameter count and hidden size of a LightningModule (or any module), built or not.

    The hidden size comes from a Hugging Face config (``module.config`` -- ``CausalLM`` has it before its model is
    built -- or the config of a submodule), else from the widest ``nn.Embedding``, else from the most common
    ``in_features`` of the ``nn.Linear`` layers. The count is ``None`` while the module has no parameters yet.
    """
    total = sum(param_numel(p) for p in module.parameters())
    return ModelSize(num_params=total or None, hidden_size=_hidden_size(module))


def _hidden_size(module: nn.Module) -> int | None:
    configs: list[Any] = []
    with contextlib.suppress(Exception):  # a property that fails before the model is built
        configs.append(getattr(module, "config", None))
    configs += [getattr(m, "config", None) for m in module.modules()]
    for config in configs:
        for key in _HIDDEN_KEYS:
            value = getattr(config, key, None) if config is not None and not isinstance(config, dict) else None
            if isinstance(value, int) and value > 0:
                return value
    embeddings = [m for m in module.modules() if isinstance(m, nn.Embedding)]
    if embeddings:
        return max(m.embedding_dim for m in embeddings)
    widths = Counter(m.in_features for m in module.modules() if isinstance(m, nn.Linear))
    return widths.most_common(1)[0][0] if widths else None


def local_partition_span(param: nn.Parameter, partition_numel: int) -> tuple[int, int]:
    """Where this rank's ZeRO-3 partition of ``param`` starts in the flattened whole, and how many of its
    ``partition_numel`` elements are real (the last rank's partition is padded when the size does not divide).

    Example:
        >>> local_partition_span(torch.nn.Parameter(torch.zeros(10)), 4)  # one process: rank 0
        (0, 4)
    """
    group = getattr(param, "ds_process_group", None)
    rank = torch.distributed.get_rank(group=group) if torch.distributed.is_initialized() else 0
    start = partition_numel * rank
    return start, max(0, min(partition_numel, param_numel(param) - start))


def param_numel(param: torch.Tensor) -> int:
    """The whole element count of ``param`` (``ds_numel`` under ZeRO-3, where the tensor itself is a partition)."""
    return int(getattr(param, "ds_numel", param.numel()))
