"""Hugging Face model directories on disk: write one atomically, read every weight file of one.

Every technique that hands back a plain Hugging Face model (exports of pruned, factorised, merged-LoRA and 2:4
models) writes it through :func:`save_hf_directory`, so all of them share its atomic replace.

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> import tempfile, pathlib
    >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                   num_attention_heads=2, num_key_value_heads=1)
    >>> model = LlamaForCausalLM(cfg)
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "tiny"
    >>> _ = save_hf_directory(model, model.state_dict(), out, tokenizer=None, overwrite=False)
    >>> torch.equal(read_hf_weights(str(out))["model.norm.weight"], model.model.norm.weight)
    True
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from safetensors.torch import load_file
from transformers import PreTrainedModel

__all__ = ["read_hf_weights", "save_hf_directory"]


def save_hf_directory(
    model: PreTrainedModel, state: dict[str, torch.Tensor], out: Path, tokenizer: Any | None, overwrite: bool
) -> Path:
    """Writes ``model``'s config and the given full ``state`` as safetensors into ``out`` atomically."""
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"output directory {str(out)!r} exists and is not empty; pass overwrite=True or a new path."
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        tmp.chmod(0o755)  # mkdtemp makes it private; a model directory is meant to be shared
        if out.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            backup.rmdir()
            out.rename(backup)
            tmp.rename(out)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rank_zero_info(f"lit_accel: wrote Hugging Face model to {out}")
    return out


def read_hf_weights(directory: str) -> dict[str, torch.Tensor]:
    """Reads every weight file of a Hugging Face model directory (safetensors, or PyTorch bins without unpickling)."""

    path = Path(directory)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        # Sharded checkpoints: read exactly the shards the index names (a directory may also hold, e.g., a
        # consolidated copy of the same weights).
        files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        files = sorted(path.glob("*.safetensors"))
    state: dict[str, torch.Tensor] = {}
    if files:
        for f in files:
            state.update(load_file(str(f)))
        return state
    bins = sorted(path.glob("pytorch_model*.bin"))
    if not bins:
        raise ValueError(f"model={directory!r} holds no *.safetensors or pytorch_model*.bin weight files.")
    for f in bins:
        state.update(torch.load(f, map_location="cpu", weights_only=True))
    return state
