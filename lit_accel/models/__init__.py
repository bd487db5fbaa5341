"""Models: the ``CausalLM`` LightningModule, size presets, parameter helpers and model structure discovery."""

from lit_accel.models.causal_lm import CausalLM, warmup_cosine
from lit_accel.models.params import full_state_dict, gathered, is_partitioned, load_full_state_dict
from lit_accel.models.presets import PRESETS, ModelSource, preset_config, resolve_model_source

__all__ = [
    "PRESETS",
    "CausalLM",
    "ModelSource",
    "full_state_dict",
    "gathered",
    "is_partitioned",
    "load_full_state_dict",
    "preset_config",
    "resolve_model_source",
    "warmup_cosine",
]
