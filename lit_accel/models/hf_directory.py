"""Hugging Face model directories on disk: write one atomically, read every weight file of one.

Every technique that hands back a plain Hugging Face model (exports of pruned, factorised, merged-LoRA and 2:4
models) writes it through :func:`save_hf_directory`, so all of them share its atomic replace.

Example:
    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp()) / "export"
    >>> _ = write_directory(out, overwrite=False, write=lambda tmp: (tmp / "config.json").write_text("{}"))
    >>> sorted(p.name for p in out.iterdir())
    ['config.json']
    >>> write_directory(out, overwrite=False, write=lambda tmp: None)
    Traceback (most recent call last):
    ...
    FileExistsError: output directory '...' exists and is not empty; choose a new path or pass overwrite.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from safetensors.torch import load_file
from transformers import PreTrainedModel

__all__ = ["check_output_directory", "read_hf_weights", "save_hf_directory", "write_directory"]


def check_output_directory(out: Path, overwrite: bool, name: str = "output directory") -> None:
    """Refuses an output path that exists and is not an empty directory, unless ``overwrite``.

    Raises:
        FileExistsError: Naming the path (as ``name``, e.g. ``--out``) and the two ways out.

    Example:
        >>> check_output_directory(Path("no/such/dir"), overwrite=False)  # a new path is fine
    """
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{name} {str(out)!r} exists and is not empty; choose a new path or pass overwrite.")


def write_directory(out: Path, overwrite: bool, write: Callable[[Path], None]) -> Path:
    """Writes a directory atomically: ``write(tmp)`` fills a temporary folder beside ``out``, which then replaces it.

    A reader sees the old directory or the complete new one, never a half-written one; a failure in ``write``
    leaves ``out`` as it was and removes the temporary folder.

    Raises:
        FileExistsError: ``out`` is not empty and ``overwrite`` is False (see :func:`check_output_directory`).
    """
    check_output_directory(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
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
    return out


def save_hf_directory(
    model: PreTrainedModel, state: dict[str, torch.Tensor], out: Path, tokenizer: Any | None, overwrite: bool
) -> Path:
    """Writes ``model``'s config and the given full ``state`` as safetensors into ``out`` atomically."""

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    write_directory(out, overwrite, write)
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
            try:
                state.update(load_file(str(f)))
            except Exception as err:  # safetensors' errors do not name the file
                raise ValueError(f"model={directory!r}: weight file {str(f)!r} is not readable ({err})") from err
        return state
    bins = sorted(path.glob("pytorch_model*.bin"))
    if not bins:
        raise ValueError(f"model={directory!r} holds no *.safetensors or pytorch_model*.bin weight files.")
    for f in bins:
        state.update(torch.load(f, map_location="cpu", weights_only=True))
    return state
