"""Models: the ``CausalLM`` LightningModule, size presets, structure discovery, FLOPs and parameter helpers."""

from lit_accel.models.causal_lm import CausalLM, warmup_cosine
from lit_accel.models.flops import backward_flops, flops_per_token, lm_head_flops, sublayer_flops
from lit_accel.models.params import (
    full_parameters,
    full_state_dict,
    gathered,
    is_partitioned,
    load_full_state_dict,
)
from lit_accel.models.presets import PRESETS, ModelSource, preset_config, resolve_model_source
from lit_accel.models.structure import (
    SUPPORTED_ARCHS,
    AttentionShape,
    Block,
    ModelStructure,
    StructurePatterns,
    Sublayer,
    get_structure,
    is_linear,
    linear_in_out_features,
)

__all__ = [
    "PRESETS",
    "SUPPORTED_ARCHS",
    "AttentionShape",
    "Block",
    "CausalLM",
    "ModelSource",
    "ModelStructure",
    "StructurePatterns",
    "Sublayer",
    "backward_flops",
    "flops_per_token",
    "full_parameters",
    "full_state_dict",
    "gathered",
    "get_structure",
    "is_linear",
    "is_partitioned",
    "linear_in_out_features",
    "lm_head_flops",
    "load_full_state_dict",
    "preset_config",
    "resolve_model_source",
    "sublayer_flops",
    "warmup_cosine",
]
