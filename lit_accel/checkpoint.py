"""Reading lit_accel checkpoints: a Lightning ``.ckpt`` file or a DeepSpeed checkpoint folder, on CPU.

Example:
    >>> from lit_accel.checkpoint import load_lightning_checkpoint
    >>> load_lightning_checkpoint("no/such.ckpt")
    Traceback (most recent call last):
    ...
    ValueError: --ckpt 'no/such.ckpt' does not exist; pass a Lightning .ckpt file or a DeepSpeed checkpoint folder.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

__all__ = ["load_lightning_checkpoint"]


def load_lightning_checkpoint(ckpt: str | os.PathLike[str]) -> dict[str, Any]:
    """Loads a Lightning checkpoint file, or consolidates a DeepSpeed checkpoint directory into one, on CPU.

    Raises:
        ValueError: If the path does not exist, or is neither a checkpoint file nor a DeepSpeed checkpoint folder.
    """
    path = Path(ckpt)
    if not path.exists():
        raise ValueError(
            f"--ckpt {str(path)!r} does not exist; pass a Lightning .ckpt file or a DeepSpeed checkpoint folder."
        )
    if path.is_dir():
        if not (path / "latest").is_file() and not any(path.glob("*/mp_rank_*_model_states.pt")):
            raise ValueError(
                f"--ckpt {str(path)!r} is a directory but not a DeepSpeed checkpoint (no 'latest' file and no"
                " */mp_rank_*_model_states.pt); pass a Lightning .ckpt file or the folder DeepSpeed wrote."
            )
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "consolidated.ckpt")
            convert_zero_checkpoint_to_fp32_state_dict(str(path), out)
            return torch.load(out, map_location="cpu", weights_only=False)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several unrelated types for a non-checkpoint file
        raise ValueError(f"--ckpt {str(path)!r} is not a readable PyTorch/Lightning checkpoint: {err}") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"--ckpt {str(path)!r} holds no 'state_dict': it is not a Lightning checkpoint.")
    return checkpoint
