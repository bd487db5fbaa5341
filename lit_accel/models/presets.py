"""Named model presets and resolution of a ``model`` argument to a Hugging Face config.

A ``model`` argument is one of: a preset name (``llama-tiny`` ... ``llama-1b``, or a family preset such as
``qwen3-0.6b``, ``gemma3-1b`` or ``mixtral-tiny``: see :data:`PRESETS`), a config dict (any Hugging Face
``model_type``), a local directory holding a Hugging Face model (``config.json`` + weights), or a hub id that
already has a local copy in the Hugging Face cache. Nothing is downloaded: the plugin must run on machines
without internet access, so a hub id with no local copy is an error that says how to fetch it first.

Example:
    >>> from lit_accel.models.presets import resolve_model_source
    >>> source = resolve_model_source("llama-tiny")
    >>> source.config.hidden_size
    128
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import try_to_load_from_cache
from transformers import AutoConfig, PretrainedConfig

__all__ = ["FAMILY_PRESETS", "PRESETS", "ModelSource", "preset_config", "resolve_model_source"]

# Shapes follow common open models so that benchmark figures compare with published ones: llama-125m is the
# GPT-3-small shape (134M parameters with an untied 32k vocabulary), llama-1b is TinyLlama-1.1B.
PRESETS: dict[str, dict[str, Any]] = {
    "llama-tiny": dict(
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=4096,
        max_position_embeddings=1024,
    ),
    "llama-20m": dict(
        hidden_size=384,
        intermediate_size=1024,
        num_hidden_layers=8,
        num_attention_heads=6,
        num_key_value_heads=2,
        vocab_size=8192,
        max_position_embeddings=2048,
    ),
    "llama-125m": dict(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        vocab_size=32000,
        max_position_embeddings=2048,
    ),
    "llama-350m": dict(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=32000,
        max_position_embeddings=2048,
    ),
    "llama-1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
    ),
}

# One small real model per family (random init: the shapes, not the weights), and a tiny one of each for tests.
# A mixture-of-experts family has no small release: its non-tiny preset keeps the real model's layer shape with
# fewer layers, as its comment says. Every key not given takes the transformers config's default for the family
# (e.g. Gemma 3's local/global rope bases and 5:1 sliding-window pattern).
_TINY: dict[str, Any] = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    vocab_size=4096,
    max_position_embeddings=1024,
)
FAMILY_PRESETS: dict[str, dict[str, Any]] = {
    # Qwen3-0.6B: 28 blocks, 16 query / 8 KV heads of 128 (wider than hidden/heads), per-head q/k norms.
    "qwen3-0.6b": dict(
        model_type="qwen3",
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        max_position_embeddings=40960,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    ),
    "qwen3-tiny": dict(model_type="qwen3", **_TINY, tie_word_embeddings=True),
    # Gemma-2-2B: sandwich norms, GeGLU, final-logit softcap 30, attention softcap 50, 4096-token sliding window.
    "gemma2-2b": dict(
        model_type="gemma2",
        hidden_size=2304,
        intermediate_size=9216,
        num_hidden_layers=26,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        vocab_size=256000,
        max_position_embeddings=8192,
        query_pre_attn_scalar=256,
        final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
        sliding_window=4096,
    ),
    "gemma2-tiny": dict(model_type="gemma2", **_TINY, query_pre_attn_scalar=32, sliding_window=64),
    # Gemma-3-1B (text): sandwich norms, per-head q/k norms, 512-token sliding window on 5 of every 6 blocks.
    "gemma3-1b": dict(
        model_type="gemma3_text",
        hidden_size=1152,
        intermediate_size=6912,
        num_hidden_layers=26,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        vocab_size=262144,
        max_position_embeddings=32768,
        query_pre_attn_scalar=256,
        sliding_window=512,
    ),
    "gemma3-tiny": dict(model_type="gemma3_text", **_TINY, query_pre_attn_scalar=32, sliding_window=64),
    # Phi-3-mini (3.8B): fused qkv_proj and gate_up_proj, 32 heads of 96.
    "phi3-mini": dict(
        model_type="phi3",
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32064,
        max_position_embeddings=4096,
    ),
    # Half the head rotated, as Phi-4-mini does (partial_rotary_factor 0.75 there).
    "phi3-tiny": dict(model_type="phi3", **{**_TINY, "head_dim": None}, partial_rotary_factor=0.5),
    # OLMo-2-1B: post-norms only, q/k norms over the whole projection.
    "olmo2-1b": dict(
        model_type="olmo2",
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=100352,
        max_position_embeddings=4096,
        rope_theta=500000.0,
        rms_norm_eps=1e-6,
    ),
    "olmo2-tiny": dict(model_type="olmo2", **{**_TINY, "head_dim": None}),
    # Qwen3-30B-A3B's block (128 experts of width 768, top 8; 32 query / 4 KV heads of 128) with 4 of its 48 blocks.
    "qwen3-moe-3b": dict(
        model_type="qwen3_moe",
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_experts=128,
        num_experts_per_tok=8,
        num_hidden_layers=4,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        vocab_size=151936,
        max_position_embeddings=40960,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
    ),
    # The second block is a dense MLP (``mlp_only_layers``), as Qwen3-MoE allows.
    "qwen3-moe-tiny": dict(
        model_type="qwen3_moe",
        **_TINY,
        moe_intermediate_size=96,
        num_experts=4,
        num_experts_per_tok=2,
        mlp_only_layers=[1],
    ),
    "mixtral-tiny": dict(
        model_type="mixtral", **{**_TINY, "head_dim": None}, num_local_experts=4, num_experts_per_tok=2
    ),
}
"""Family presets: the ``model_type``, then the config fields. Special tokens follow :data:`PRESETS`' LLaMA ones
(eos 0, no bos or pad), so every preset trains with the same tokenizers."""
PRESETS.update(FAMILY_PRESETS)

_COMMON: dict[str, Any] = dict(
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    initializer_range=0.02,
    hidden_act="silu",
    attention_bias=False,
    mlp_bias=False,
    attention_dropout=0.0,
    bos_token_id=None,
    eos_token_id=0,
    pad_token_id=None,
    use_cache=False,
)


@dataclass
class ModelSource:
    """Where a model comes from: a config to build from scratch, or a local directory to load weights from."""

    config: PretrainedConfig
    """The Hugging Face config (overrides already applied)."""
    pretrained_dir: str | None = None
    """A local directory with weights to load, or ``None`` to initialise randomly."""
    description: str = ""
    """How the source was resolved, for logs and error messages."""


_SPECIAL_TOKENS: dict[str, Any] = dict(bos_token_id=None, eos_token_id=0, pad_token_id=None, use_cache=False)


def preset_config(name: str, **overrides: Any) -> PretrainedConfig:
    """Builds the Hugging Face config of a preset (a ``LlamaConfig`` for the ``llama-*`` presets).

    Args:
        name: One of ``PRESETS``.
        **overrides: Config fields to change (e.g. ``vocab_size=8192``).

    Raises:
        ValueError: If ``name`` is not a preset.

    Example:
        >>> preset_config("gemma3-tiny").model_type, preset_config("qwen3-0.6b").head_dim
        ('gemma3_text', 128)
    """
    if name not in PRESETS:
        raise ValueError(f"model={name!r} is not a known preset; allowed presets: {sorted(PRESETS)}.")
    fields = dict(PRESETS[name])
    model_type = fields.pop("model_type", "llama")
    if model_type == "llama":
        return AutoConfig.for_model("llama", **{**_COMMON, **fields, **overrides})
    fields = {k: v for k, v in fields.items() if v is not None}
    return AutoConfig.for_model(model_type, **{**_SPECIAL_TOKENS, **fields, **overrides})


def _hub_cache_dir(repo_id: str) -> str | None:
    """Returns the snapshot directory of ``repo_id`` in the local Hugging Face cache, if a copy exists."""
    found = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(found, str) and os.path.isfile(found):
        return os.path.dirname(found)
    return None


def resolve_model_source(model: str | dict[str, Any], config_overrides: dict[str, Any] | None = None) -> ModelSource:
    """Resolves a ``model`` argument to a :class:`ModelSource` without touching the network.

    Args:
        model: A preset name, a config dict (with ``model_type``), a local model directory, or a hub id that is
            already in the local Hugging Face cache.
        config_overrides: Config fields to change after resolution (e.g. ``{"vocab_size": 8192}``).

    Raises:
        ValueError: For an unknown name, a directory without ``config.json``, or a hub id with no local copy.
    """
    overrides = dict(config_overrides or {})
    if isinstance(model, dict):
        if "model_type" not in model:
            raise ValueError(
                "model=<dict> must contain 'model_type' (e.g. {'model_type': 'llama', 'hidden_size': 256, ...});"
                f" got keys {sorted(model)}."
            )
        fields = {k: v for k, v in model.items() if k != "model_type"}
        config = AutoConfig.for_model(model["model_type"], **{**fields, **overrides})
        return ModelSource(config=config, description=f"config dict ({model['model_type']})")
    if not isinstance(model, str) or not model:
        raise ValueError(f"model must be a preset name, a config dict or a local directory; got {model!r}.")
    if model in PRESETS:
        return ModelSource(config=preset_config(model, **overrides), description=f"preset {model}")
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"model={model!r} is a directory but holds no config.json; pass a Hugging Face model directory"
                " (as written by `save_pretrained` or `lit-accel export`)."
            )
        config = AutoConfig.from_pretrained(str(path), local_files_only=True, **overrides)
        return ModelSource(config=config, pretrained_dir=str(path), description=f"local directory {path}")
    if path.exists():
        raise ValueError(f"model={model!r} is a file; pass a Hugging Face model directory or a preset name.")
    looks_like_hub_id = model.count("/") == 1 and not model.startswith((".", "/", "~"))
    if looks_like_hub_id:
        cached = _hub_cache_dir(model)
        if cached is not None:
            config = AutoConfig.from_pretrained(cached, local_files_only=True, **overrides)
            return ModelSource(config=config, pretrained_dir=cached, description=f"hub cache copy of {model}")
        raise ValueError(
            f"model={model!r} looks like a Hugging Face hub id, but there is no local copy and lit_accel never"
            f" downloads at run time. On a machine with internet run `hf download {model} --local-dir <dir>`"
            " (or `huggingface-cli download ...`), then pass model=<dir>; or pick a preset:"
            f" {sorted(PRESETS)}."
        )
    raise ValueError(
        f"model={model!r} is neither a preset ({sorted(PRESETS)}), nor an existing local directory, nor a hub id"
        " of the form 'org/name'."
    )
