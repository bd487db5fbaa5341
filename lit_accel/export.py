"""``lit-accel export``: turn a Lightning or DeepSpeed checkpoint into a Hugging Face model directory.

Example:
    $ lit-accel export --ckpt runs/quickstart/checkpoints/last.ckpt --out exported/quickstart
    >>> from lit_accel.export import export_checkpoint
    >>> export_checkpoint("last.ckpt", "exported/model")  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import inspect
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["export_checkpoint", "load_lightning_checkpoint", "main"]


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
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

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


def export_checkpoint(
    ckpt: str | os.PathLike[str],
    out: str | os.PathLike[str],
    overwrite: bool = False,
    tokenizer: str | None = None,
) -> Path:
    """Writes the model of a ``CausalLM`` checkpoint as a Hugging Face directory.

    Args:
        ckpt: A Lightning ``.ckpt`` file, or a DeepSpeed checkpoint folder (any ZeRO stage).
        out: The output directory; must not exist or be empty unless ``overwrite``.
        overwrite: Replace an existing non-empty output directory.
        tokenizer: A tokenizer directory to copy in; by default the one the run trained with, if still on disk.

    Returns:
        The output directory.
    """
    from transformers import AutoTokenizer

    from lit_accel.models.causal_lm import CausalLM, save_hf_directory
    from lit_accel.models.params import load_full_state_dict

    out_path = Path(out)
    if out_path.exists() and (not out_path.is_dir() or any(out_path.iterdir())) and not overwrite:
        raise FileExistsError(
            f"--out {str(out_path)!r} exists and is not empty; choose a new path or pass --overwrite."
        )
    checkpoint = load_lightning_checkpoint(ckpt)
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    if "model" not in hparams:
        raise ValueError(f"--ckpt {str(ckpt)!r} has no CausalLM hyper-parameters; was it written by lit_accel?")
    # LightningCLI adds bookkeeping entries (e.g. `_instantiator`, `_class_path`) to the saved hyper-parameters.
    accepted = inspect.signature(CausalLM.__init__).parameters
    module = CausalLM(**{k: v for k, v in hparams.items() if k in accepted})
    module.configure_model()
    assert module.model is not None
    state = {k[len("model.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    load_full_state_dict(module.model, state)
    tok_dir = tokenizer or (checkpoint.get("lit_accel") or {}).get("tokenizer_dir")
    tok = None
    if tok_dir and Path(tok_dir).is_dir():
        tok = AutoTokenizer.from_pretrained(tok_dir)
    elif tokenizer:
        raise ValueError(f"--tokenizer {tokenizer!r} is not a directory.")
    return save_hf_directory(module.model, module.model.state_dict(), out_path, tokenizer=tok, overwrite=overwrite)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``lit-accel export``."""
    parser = argparse.ArgumentParser(
        prog="lit-accel export", description="Write a Hugging Face model directory from a lit_accel checkpoint."
    )
    parser.add_argument("--ckpt", required=True, help="Lightning .ckpt file or DeepSpeed checkpoint folder")
    parser.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory to include (default: the run's)")
    args = parser.parse_args(argv)
    path = export_checkpoint(args.ckpt, args.out, overwrite=args.overwrite, tokenizer=args.tokenizer)
    print(f"exported {args.ckpt} -> {path}")
