"""Reading lit_accel checkpoints: a Lightning ``.ckpt`` file or a DeepSpeed checkpoint folder, on CPU.

Example:
    >>> from lit_accel.checkpoint import load_lightning_checkpoint
    >>> load_lightning_checkpoint("no/such.ckpt")
    Traceback (most recent call last):
    ...
    ValueError: --ckpt 'no/such.ckpt' does not exist; pass a Lightning .ckpt file or a DeepSpeed checkpoint folder.
"""

from __future__ import annotations

import importlib
import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

__all__ = ["deepspeed_client_state_file", "load_checkpoint_file", "load_lightning_checkpoint"]


# The DeepSpeed classes its checkpoint folders hold besides tensors (optimizer-state files: the loss scaler, the ZeRO
# stage, the addresses of parameter fragments): plain records, allowed by exact name and nothing else.
_DEEPSPEED_RECORDS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def _deepspeed_records() -> list[Any]:
    # Imported by name here, not at the top: importing deepspeed is slow (and it is absent off Linux), and only
    # DeepSpeed folders need these.
    found = []
    for qualified in _DEEPSPEED_RECORDS:
        module, _, name = qualified.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # another DeepSpeed release: its files then name what they need
            continue
    return found


def deepspeed_client_state_file(folder: str | os.PathLike[str]) -> Path | None:
    """Rank 0's model-states file of a DeepSpeed checkpoint folder: the one holding Lightning's checkpoint dict.

    DeepSpeed names it ``<tag>/mp_rank_00_model_states.pt``, and ``<tag>/zero_pp_rank_0_mp_rank_00_model_states.pt``
    under ZeRO-3 (each data-parallel rank then writes its own). The tag is the one the folder's ``latest`` file
    names, else the only one there is.

    Returns:
        The file, or ``None`` when ``folder`` holds none.

    Example:
        >>> deepspeed_client_state_file("no/such/folder") is None
        True
    """
    root = Path(folder)
    tags: list[Path] = []
    try:
        latest = (root / "latest").read_text().strip()
    except OSError:
        latest = ""
    if latest and (root / latest).is_dir():
        tags = [root / latest]
    elif root.is_dir():
        tags = sorted(p for p in root.iterdir() if p.is_dir())
    for tag in tags:
        for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
            if (tag / name).is_file():
                return tag / name
    return None


def _check_crc(path: str | os.PathLike[str], name: str) -> None:
    # torch.load does not verify the CRC-32 that torch.save's zip records carry, so one flipped bit would load as a
    # silently different tensor; reading every record once is the price of knowing.
    if not zipfile.is_zipfile(path):
        return  # not a zip-format torch file: torch.load says what it is, or refuses it
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise ValueError(f"{name} {str(path)!r} is not a readable PyTorch checkpoint (corrupt: {err})") from None
    if bad is not None:
        raise ValueError(
            f"{name} {str(path)!r} is corrupt: record {bad!r} does not match its CRC-32 (a flipped bit or a damaged "
            "copy); use an earlier checkpoint or copy the file again"
        )


def load_checkpoint_file(
    path: str | os.PathLike[str],
    *,
    mmap: bool = False,
    name: str = "--ckpt",
    allow: Sequence[Any] = (),
    verify: bool = True,
    map_location: Any = "cpu",
) -> Any:
    """Reads one torch checkpoint file on CPU without running code from it.

    ``torch.load`` runs with ``weights_only=True``: tensors, numbers, strings and plain containers are rebuilt, and
    any other pickled object (which could run arbitrary code while loading) is refused. Every checkpoint lit_accel
    and Lightning write is made of those.

    Args:
        path: The file.
        mmap: Map the tensors instead of reading them (cheap when only metadata is needed).
        name: How messages name the path (the argument it came from).
        allow: Classes or functions allowed besides those (e.g. DeepSpeed's loss-scaler record).
        verify: Check every record's CRC-32 first (reads the whole file once more). Off only for a cheap look at
            metadata that a verified load follows.
        map_location: Where tensors go, as ``torch.load``'s argument (CPU unless a caller needs otherwise).

    Raises:
        ValueError: Naming the file: it holds other objects (and which), a record fails its CRC-32 check (a
            flipped bit), or it is not a readable torch file (truncated, empty, foreign).

    Example:
        >>> import tempfile, torch
        >>> f = tempfile.mktemp(suffix=".ckpt"); torch.save({"state_dict": {"w": torch.ones(2)}}, f)
        >>> load_checkpoint_file(f)["state_dict"]["w"].tolist()
        [1.0, 1.0]
    """
    if verify:
        _check_crc(path, name)
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found is None:  # not a pickle torch understands at all: a foreign or damaged file
            raise ValueError(
                f"{name} {str(path)!r} is not a readable PyTorch checkpoint (corrupt or not one)"
            ) from None
        raise ValueError(
            f"{name} {str(path)!r} holds objects other than tensors and plain containers ({found.group(1)}), which "
            "lit_accel does not unpickle: loading them could run code from the file"
        ) from None
    except Exception as err:  # torch raises several unrelated types for a truncated or foreign file
        raise ValueError(f"{name} {str(path)!r} is not a readable PyTorch checkpoint: {err}") from err


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
        if not (path / "latest").is_file() and deepspeed_client_state_file(path) is None:
            raise ValueError(
                f"--ckpt {str(path)!r} is a directory but not a DeepSpeed checkpoint (no 'latest' file and no"
                " */*mp_rank_00_model_states.pt); pass a Lightning .ckpt file or the folder DeepSpeed wrote."
            )
        # DeepSpeed's consolidation unpickles its files without restriction: every file is checked first, so it
        # only ever reads files made of tensors, containers and DeepSpeed's own records.
        records = _deepspeed_records()
        for f in sorted(path.rglob("*.pt")):
            load_checkpoint_file(f, mmap=True, allow=records)
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "consolidated.ckpt")
            convert_zero_checkpoint_to_fp32_state_dict(str(path), out)
            return load_checkpoint_file(out)
    checkpoint = load_checkpoint_file(path)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"--ckpt {str(path)!r} holds no 'state_dict': it is not a Lightning checkpoint.")
    return checkpoint
