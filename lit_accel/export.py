"""``lit-accel export``: turn a Lightning or DeepSpeed checkpoint into a Hugging Face model directory.

A checkpoint of a run with the ``LoRA`` callback (adapter-only or full) is exported as the merged plain model by
default, or as a PEFT adapter with ``--peft-adapter``; the LoRA settings come from the checkpoint and an adapter-only
checkpoint rebuilds its base from ``hyper_parameters["model"]`` (the pretrained directory the run fine-tuned), after
checking that the folder still holds the model the adapters were trained on (the fingerprint the checkpoint recorded).

The output folder is written beside ``--out`` and renamed into place (see
:func:`lit_accel.models.hf_directory.write_directory`): ``--out`` gets the complete export or nothing, a concurrent
export to it fails, and ``--overwrite`` replaces only a previous export there, keeping the user's other files.

Example:
    $ lit-accel export --ckpt runs/quickstart/checkpoints/last.ckpt --out exported/quickstart
    $ lit-accel export --ckpt runs/lora/checkpoints/last.ckpt --out exported/lora-adapter --peft-adapter
    >>> from lit_accel.export import export_checkpoint
    >>> export_checkpoint("last.ckpt", "exported/model")  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from transformers import AutoTokenizer

from lit_accel.checkpoint import load_lightning_checkpoint
from lit_accel.lowrank.factorize import rebuild_factorization
from lit_accel.lowrank.factorize_io import save_merged
from lit_accel.lowrank.lora import apply_lora
from lit_accel.lowrank.lora_io import check_lora_base, merged_state_dict, save_peft_adapter
from lit_accel.models.causal_lm import CausalLM
from lit_accel.models.hf_directory import check_output_directory, save_hf_directory
from lit_accel.models.params import load_full_state_dict
from lit_accel.models.structure import StructurePatterns
from lit_accel.pruning.export import export_loaded_pruning_checkpoint, is_pruning_checkpoint_dict

__all__ = ["export_checkpoint", "lora_settings_from_checkpoint", "main"]


def lora_settings_from_checkpoint(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The ``LoRA`` callback's record in a checkpoint (settings, adapted layer names, adapter_only), or None.

    Read from ``checkpoint["lit_accel"]["lora"]``, else from the callback's state in ``checkpoint["callbacks"]``.
    """
    record = (checkpoint.get("lit_accel") or {}).get("lora")
    if isinstance(record, dict):
        return record
    for key, value in (checkpoint.get("callbacks") or {}).items():
        if str(key).startswith("LoRA") and isinstance(value, dict) and "settings" in value:
            adapter_only = not any(".base_layer." in k for k in checkpoint.get("state_dict", {}))
            return {**value, "adapter_only": adapter_only}
    return None


def export_checkpoint(
    ckpt: str | os.PathLike[str],
    out: str | os.PathLike[str],
    overwrite: bool = False,
    tokenizer: str | None = None,
    peft_adapter: bool = False,
) -> Path:
    """Writes the model of a ``CausalLM`` checkpoint as a Hugging Face directory.

    Args:
        ckpt: A Lightning ``.ckpt`` file, or a DeepSpeed checkpoint folder (any ZeRO stage).
        out: The output directory; must not exist or be empty unless ``overwrite``.
        overwrite: Replace a previous export in ``out`` (the files its ``lit_accel_export.json`` lists); other files
            there are kept.
        tokenizer: A tokenizer directory to copy in; by default the one the run trained with, if still on disk.
        peft_adapter: For a LoRA run, write a PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``)
            instead of the merged model.

    Returns:
        The output directory.

    Raises:
        FileExistsError: ``out`` is not empty and ``overwrite`` is False, holds model files no export recorded, or is
            being written by another export.
        ValueError: The checkpoint is not a lit_accel one, or (adapter-only LoRA) its base folder now holds another
            model than the one the adapters were trained on; the message names both and what differs.
    """
    out_path = Path(out)
    check_output_directory(out_path, overwrite, name="--out", flag="--overwrite")
    checkpoint = load_lightning_checkpoint(ckpt)
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    if "model" not in hparams:
        raise ValueError(f"--ckpt {str(ckpt)!r} has no CausalLM hyper-parameters; was it written by lit_accel?")
    if is_pruning_checkpoint_dict(checkpoint):
        # A StructuredPruning run: the model to hand back is the physically smaller one its masks describe
        # (built there: the full CausalLM below is not needed).
        if peft_adapter:
            raise ValueError(f"--peft-adapter: --ckpt {str(ckpt)!r} is from a StructuredPruning run, not a LoRA run.")
        return export_loaded_pruning_checkpoint(checkpoint, ckpt, out_path, overwrite, tokenizer)
    lora = lora_settings_from_checkpoint(checkpoint)
    saved_config = (checkpoint.get("lit_accel") or {}).get("config")
    if saved_config is not None and lora is None:
        # The config as trained (tokenizer's eos id, overrides): every weight is in the checkpoint, so the original
        # model directory is not needed (it may have moved) and is not read.
        module = CausalLM(model=saved_config)
    else:
        # LightningCLI adds bookkeeping entries (e.g. `_instantiator`, `_class_path`) to the saved hyper-parameters.
        accepted = inspect.signature(CausalLM.__init__).parameters
        module = CausalLM(**{k: v for k, v in hparams.items() if k in accepted})
    if lora is not None and lora.get("adapter_only"):
        _check_lora_base(ckpt, hparams, lora, module)  # before the base is loaded: it may be large
    module.configure_model()
    assert module.model is not None
    if saved_config is not None and saved_config.get("eos_token_id") is not None:
        module.model.config.eos_token_id = saved_config["eos_token_id"]
    state = {k[len("model.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    sparse = (checkpoint.get("lit_accel") or {}).get("sparsity24")
    if sparse and sparse.get("phase") == "sparse":
        # A 2:4 run keeps training the dense weight; the model it evaluates is W * M, so that is what is written.
        for name, mask in sparse.get("masks", {}).items():
            key = f"{name}.weight"
            if key in state:
                state[key] = state[key] * mask.to(state[key].dtype)
    if lora is None and peft_adapter:
        raise ValueError(f"--peft-adapter: --ckpt {str(ckpt)!r} is not from a run with the LoRA callback.")
    ranks = _factorization_ranks(checkpoint)
    if ranks:
        if lora is not None:
            raise ValueError(
                f"--ckpt {str(ckpt)!r} is from a run with both LoRA and LowRankFactorization; exporting that pair is"
                " not supported. Export in the run instead: LoRA(export_dir=..., export='merged')."
            )
        # A LowRankFactorization run: the rebuilt model gets the trained factorised structure before loading.
        rebuild_factorization(module.model, ranks)
    if lora is not None:
        return _export_lora(module, state, lora, out_path, overwrite, tokenizer, checkpoint, peft_adapter)
    load_full_state_dict(module.model, state)
    tok_dir = tokenizer or (checkpoint.get("lit_accel") or {}).get("tokenizer_dir")
    tok = None
    if tok_dir and Path(tok_dir).is_dir():
        tok = AutoTokenizer.from_pretrained(tok_dir)
    elif tokenizer:
        raise ValueError(f"--tokenizer {tokenizer!r} is not a directory.")
    if ranks:
        # Written dense (factors multiplied out) so plain from_pretrained loads it with no config change.
        return save_merged(module.model, out_path, tokenizer=tok, overwrite=overwrite)
    return save_hf_directory(module.model, module.model.state_dict(), out_path, tokenizer=tok, overwrite=overwrite)


def _factorization_ranks(checkpoint: dict[str, Any]) -> dict[str, int] | None:
    """Layer name -> rank of a LowRankFactorization run, from the checkpoint (None for other runs)."""
    ranks = ((checkpoint.get("lit_accel") or {}).get("factorization") or {}).get("ranks")
    if ranks is None:
        for key, value in (checkpoint.get("callbacks") or {}).items():
            if str(key).startswith("LowRankFactorization") and isinstance(value, dict):
                ranks = value.get("ranks")
    return {str(k): int(v) for k, v in ranks.items()} if ranks else None


def _check_lora_base(ckpt: str | os.PathLike[str], hparams: dict[str, Any], lora: dict[str, Any], module: Any) -> None:
    """An adapter-only checkpoint rebuilds its base from its model folder: it must be there, and the one trained on."""
    base_dir = module.source.pretrained_dir
    if base_dir is None:
        raise ValueError(
            "the checkpoint holds only LoRA adapters, but its model hyper-parameter"
            f" {hparams.get('model')!r} is not a pretrained directory to rebuild the base from."
        )
    recorded = lora.get("base")
    if not isinstance(recorded, dict):
        rank_zero_warn(
            f"--ckpt {str(ckpt)!r} holds only LoRA adapters and no record of the base model they were trained on"
            f" (written before checkpoints recorded it); merging them into {base_dir!r} unchecked."
        )
        return
    check_lora_base(recorded, base_dir, f"--ckpt {str(ckpt)!r}")


def _export_lora(
    module: Any,
    state: dict[str, torch.Tensor],
    lora: dict[str, Any],
    out_path: Path,
    overwrite: bool,
    tokenizer: str | None,
    checkpoint: dict[str, Any],
    peft_adapter: bool,
) -> Path:
    settings = dict(lora["settings"])
    layers = list(lora.get("layers") or [])
    patterns = settings.get("patterns")
    apply_lora(
        module.model,
        # The exact layers adapted in training (as anchored names), else the recorded targets.
        targets=["^" + re.escape(n) + "$" for n in layers] if layers else settings["targets"],
        r=settings["r"],
        alpha=settings["alpha"],
        dropout=settings["dropout"],
        init=settings["init"],
        use_rslora=settings["use_rslora"],
        base_dtype=settings.get("base_dtype"),
        patterns=StructurePatterns(**patterns) if patterns else None,
    )
    if lora.get("adapter_only"):
        result = module.model.load_state_dict(state, strict=False)
        lora_keys = {k for k in module.model.state_dict() if k.endswith((".lora_A", ".lora_B"))}
        missing = sorted(lora_keys & set(result.missing_keys))
        if result.unexpected_keys or missing:
            raise ValueError(
                "the LoRA checkpoint does not fit the rebuilt model: "
                f"unexpected keys {result.unexpected_keys[:8]}, missing adapter keys {missing[:8]}"
            )
    else:
        load_full_state_dict(module.model, state)
    if peft_adapter:
        base = module.source.pretrained_dir
        return save_peft_adapter(module.model, out_path, base_model_name_or_path=base, overwrite=overwrite)
    tok_dir = tokenizer or (checkpoint.get("lit_accel") or {}).get("tokenizer_dir") or module.source.pretrained_dir
    tok = None
    if tok_dir and Path(tok_dir).is_dir() and (Path(tok_dir) / "tokenizer_config.json").is_file():
        tok = AutoTokenizer.from_pretrained(tok_dir)
    elif tokenizer:
        raise ValueError(f"--tokenizer {tokenizer!r} is not a tokenizer directory.")
    return save_hf_directory(
        module.model, merged_state_dict(module.model), out_path, tokenizer=tok, overwrite=overwrite
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``lit-accel export``."""
    parser = argparse.ArgumentParser(
        prog="lit-accel export", description="Write a Hugging Face model directory from a lit_accel checkpoint."
    )
    parser.add_argument("--ckpt", required=True, help="Lightning .ckpt file or DeepSpeed checkpoint folder")
    parser.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a previous export in --out (the files its lit_accel_export.json lists); other files are kept",
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory to include (default: the run's)")
    parser.add_argument(
        "--peft-adapter",
        action="store_true",
        help="for a LoRA run: write a PEFT adapter instead of the merged model (the default)",
    )
    args = parser.parse_args(argv)
    path = export_checkpoint(
        args.ckpt, args.out, overwrite=args.overwrite, tokenizer=args.tokenizer, peft_adapter=args.peft_adapter
    )
    print(f"exported {args.ckpt} -> {path}")
