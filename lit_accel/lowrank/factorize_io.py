"""Factorised models on disk: a Hugging Face directory that keeps the factors, or a merged plain one.

A Hugging Face config cannot say "this projection is two matrices of rank r", so a directory written by
:func:`save_factorized` holds the unchanged config, the factor weights (``<name>.down.weight``, ``<name>.up.weight``,
``<name>.up.bias``) and :data:`FACTORIZATION_FILE` (layer name -> rank), written in the same atomic step.
:func:`load_factorized` builds the model from the config, applies those ranks, then loads the weights. Plain
``AutoModelForCausalLM.from_pretrained`` would not fail on such a directory but would warn about unexpected
``down``/``up`` keys and leave the projections randomly initialised; for plain-HF users export merged
(:func:`save_merged`, dense weights from :func:`merged_state_dict`) instead.

Under ZeRO-3 both writers are called on every rank (the full state dict is gathered collectively); only rank 0
writes.

Example:
    >>> from lit_accel.lowrank import apply_factorization, save_factorized, load_factorized
    >>> apply_factorization(model, "attention", energy=0.9)  # doctest: +SKIP
    >>> save_factorized(model, "out/llama-factorized")  # doctest: +SKIP
    >>> model = load_factorized("out/llama-factorized")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from lit_accel.lowrank.factorize import rebuild_factorization
from lit_accel.lowrank.factorize_layer import factorization_ranks, factorized_layers
from lit_accel.models.hf_directory import read_hf_weights, save_hf_directory
from lit_accel.models.params import full_state_dict, is_rank_zero, load_full_state_dict

__all__ = ["FACTORIZATION_FILE", "load_factorized", "merged_state_dict", "save_factorized", "save_merged"]

FACTORIZATION_FILE = "lit_accel_factorization.json"
"""The file :func:`save_factorized` writes next to the weights:
``{"format": "lit_accel.factorization", "version": 1, "ranks": {name: r}}``."""


def merged_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The state dict of the merged (dense) model, computed from the factors without changing ``model``.

    Each ``<name>.down.weight`` / ``<name>.up.weight`` / ``<name>.up.bias`` becomes ``<name>.weight`` /
    ``<name>.bias`` (transposed to ``[in, out]`` for a GPT-2 ``Conv1D``).

    Args:
        model: A model holding factorised layers.
        state: Its full state dict if already at hand (under ZeRO-3 from
            :func:`~lit_accel.models.params.full_state_dict`, on rank 0); read from ``model`` otherwise.

    Returns:
        A state dict with the model's original (dense) keys, on CPU.
    """
    full = dict(state) if state is not None else full_state_dict(model)
    for name, layer in factorized_layers(model).items():
        down = full.pop(f"{name}.down.weight")
        up = full.pop(f"{name}.up.weight")
        w = (up.float() @ down.float()).to(up.dtype)
        full[f"{name}.weight"] = (w.t() if layer.dense_type == "conv1d" else w).contiguous()
        bias = full.pop(f"{name}.up.bias", None)
        if bias is not None:
            full[f"{name}.bias"] = bias
    return full


class _ExtraFiles:
    """Writes ``lit_accel_factorization.json`` (and a tokenizer) through ``save_hf_directory``'s tokenizer slot,
    so the file lands inside the same atomic write as the weights (no directory with weights but no ranks)."""

    def __init__(self, ranks: Mapping[str, int], tokenizer: Any | None) -> None:
        self.ranks = dict(ranks)
        self.tokenizer = tokenizer

    def save_pretrained(self, directory: str) -> None:
        payload = {"format": "lit_accel.factorization", "version": 1, "ranks": self.ranks}
        Path(directory, FACTORIZATION_FILE).write_text(json.dumps(payload, indent=2) + "\n")
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)


def _save_dir(
    model: nn.Module, state: dict[str, torch.Tensor], directory: str | os.PathLike[str], extra: Any, overwrite: bool
) -> Path:
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"{type(model).__name__} is not a Hugging Face PreTrainedModel (no save_pretrained)")
    return save_hf_directory(model, state, Path(directory), tokenizer=extra, overwrite=overwrite)  # type: ignore[arg-type]


def save_merged(
    model: nn.Module, directory: str | os.PathLike[str], tokenizer: Any | None = None, overwrite: bool = False
) -> Path:
    """Writes a plain Hugging Face directory of the merged (dense) model; ``model`` itself is not changed.

    ``AutoModelForCausalLM.from_pretrained(directory)`` then gives the factorised model's logits, with no config
    change and no ``lit_accel`` needed; the file is as large as the original dense model. Under ZeRO-3 call it
    on every rank (only rank 0 writes).

    Args:
        model: A Hugging Face model holding factorised layers.
        directory: Destination (written atomically).
        tokenizer: Optional tokenizer written alongside.
        overwrite: Replace a previous export in ``directory`` (the files its ``lit_accel_export.json`` lists);
            other files there are kept.

    Returns:
        The directory.
    """
    state = full_state_dict(model)
    if not is_rank_zero():
        return Path(directory)
    return _save_dir(model, merged_state_dict(model, state), directory, tokenizer, overwrite)


def save_factorized(
    model: nn.Module, directory: str | os.PathLike[str], tokenizer: Any | None = None, overwrite: bool = False
) -> Path:
    """Writes the factorised model: config, factor weights, and ``lit_accel_factorization.json`` (name -> rank).

    Load it with :func:`load_factorized`. The config is the unchanged Hugging Face config, which cannot express a
    factorised projection; plain ``from_pretrained`` on this directory would warn about unexpected ``down``/``up``
    keys and leave those projections randomly initialised, so use :func:`save_merged` for plain-HF consumers.
    Under ZeRO-3 call it on every rank (only rank 0 writes).

    Args:
        model: A Hugging Face model holding factorised layers.
        directory: Destination (written atomically, ranks file included).
        tokenizer: Optional tokenizer written alongside.
        overwrite: Replace a previous export in ``directory`` (the files its ``lit_accel_export.json`` lists);
            other files there are kept.

    Returns:
        The directory.
    """
    state = full_state_dict(model)
    if not is_rank_zero():
        return Path(directory)
    return _save_dir(model, state, directory, _ExtraFiles(factorization_ranks(model), tokenizer), overwrite)


def load_factorized(directory: str | os.PathLike[str], dtype: torch.dtype = torch.float32, **kwargs: Any) -> nn.Module:
    """Loads a directory written by :func:`save_factorized`, keeping the factors (and the saving).

    Builds the model from its config (``AutoModelForCausalLM.from_config``), gives it the factorised structure
    from ``lit_accel_factorization.json`` (:func:`~lit_accel.lowrank.factorize.rebuild_factorization`), then loads
    the weights, checking that every parameter is present with the right shape.

    Args:
        directory: A :func:`save_factorized` directory.
        dtype: Parameter dtype of the model built.
        **kwargs: Passed to ``AutoModelForCausalLM.from_config`` (e.g. ``attn_implementation``).

    Returns:
        The factorised Hugging Face model, in eval mode as ``from_pretrained`` returns it.

    Raises:
        FileNotFoundError: No ``lit_accel_factorization.json`` in ``directory`` (for a merged or plain directory,
            use ``AutoModelForCausalLM.from_pretrained``).

    Example:
        >>> model = load_factorized("out/llama-factorized")  # doctest: +SKIP
    """
    path = Path(directory)
    spec = path / FACTORIZATION_FILE
    if not spec.is_file():
        raise FileNotFoundError(
            f"{str(spec)!r} does not exist: {str(path)!r} was not written by save_factorized. A merged or plain "
            "Hugging Face directory loads with AutoModelForCausalLM.from_pretrained."
        )
    ranks = {str(k): int(v) for k, v in json.loads(spec.read_text())["ranks"].items()}
    config = AutoConfig.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    rebuild_factorization(model, ranks)
    load_full_state_dict(model, read_hf_weights(str(path)))
    model.eval()
    return model
