"""Named LLaMA-architecture size presets and resolution of a ``model`` argument to a Hugging Face config.

A ``model`` argument is one of: a preset name (``llama-tiny`` ... ``llama-1b``), a config dict (any Hugging Face
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
from transformers import AutoConfig, LlamaConfig, PretrainedConfig

__all__ = ["PRESETS", "ModelSource", "preset_config", "resolve_model_source"]

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


def preset_config(name: str, **overrides: Any) -> LlamaConfig:
    """Builds the ``LlamaConfig`` of a preset.

    Args:
        name: One of ``PRESETS``.
        **overrides: Config fields to change (e.g. ``vocab_size=8192``).

    Raises:
        ValueError: If ``name`` is not a preset.
    """
    if name not in PRESETS:
        raise ValueError(f"model={name!r} is not a known preset; allowed presets: {sorted(PRESETS)}.")
    return LlamaConfig(**{**_COMMON, **PRESETS[name], **overrides})


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
