"""Low-rank techniques: LoRA adapters (PEFT-compatible) and SVD factorisation of linear layers.

The algorithms, usable without Lightning: ``lora`` (the LoRA layer and its surgery), ``lora_groups`` (linears that
share an input run as one node), ``lora_io`` (PEFT adapter files, merged weights); ``factorize`` (the SVD and its
surgery), ``factorize_layer`` (the factorised linear, reports, counts), ``factorize_io`` (save and load). The
Lightning callbacks: ``lora_callback`` / ``factorize_callback``. The fused LoRA matmul lives in
:mod:`lit_accel.ops.lora`.

Example:
    >>> import lightning as L
    >>> from lit_accel.lowrank import LoRA
    >>> trainer = L.Trainer(callbacks=[LoRA(targets="all-linear", r=16, alpha=32)])  # doctest: +SKIP
"""

from lit_accel.lowrank.factorize import (
    apply_factorization,
    factorize_linear,
    merge_factorization,
    rebuild_factorization,
)
from lit_accel.lowrank.factorize_callback import FactorizationSettings, LowRankFactorization
from lit_accel.lowrank.factorize_io import FACTORIZATION_FILE, load_factorized, save_factorized, save_merged
from lit_accel.lowrank.factorize_layer import FactorizationReport, LowRankLinear, factorization_ranks, format_report
from lit_accel.lowrank.lora import (
    LORA_INITS,
    LoRALinear,
    apply_lora,
    group_shared_inputs,
    lora_layers,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    remove_lora,
    unmerge_lora,
)
from lit_accel.lowrank.lora_callback import LoRA, LoRASettings
from lit_accel.lowrank.lora_groups import SharedInputGroup
from lit_accel.lowrank.lora_io import load_peft_adapter, read_peft_adapter, save_peft_adapter

__all__ = [
    "FACTORIZATION_FILE",
    "LORA_INITS",
    "FactorizationReport",
    "FactorizationSettings",
    "LoRA",
    "LoRALinear",
    "LoRASettings",
    "LowRankFactorization",
    "LowRankLinear",
    "SharedInputGroup",
    "apply_factorization",
    "apply_lora",
    "factorization_ranks",
    "factorize_linear",
    "format_report",
    "group_shared_inputs",
    "load_factorized",
    "load_peft_adapter",
    "lora_layers",
    "lora_parameters",
    "lora_state_dict",
    "merge_factorization",
    "merge_lora",
    "read_peft_adapter",
    "rebuild_factorization",
    "remove_lora",
    "save_factorized",
    "save_merged",
    "save_peft_adapter",
    "unmerge_lora",
]
