"""Resuming a DeepSpeed checkpoint on another number of processes, through DeepSpeed's universal checkpoint format.

A ZeRO checkpoint holds one optimizer-state shard per data-parallel rank, and DeepSpeed refuses to load it on
another world size ("Automatic adjustment of ZeRO's optimizer state partitioning with a new world size is not
currently supported"). DeepSpeed's answer is its *universal* format (``deepspeed.checkpoint.ds_to_universal``): every
parameter's fp32 master value and optimizer moments as whole tensors, ``zero/<parameter>/{fp32,exp_avg,...}.pt``,
which any world size and ZeRO stage can load (``checkpoint: {load_universal: true}``).

:func:`saved_world_size` reads a folder's world size from its file names (nothing is unpickled);
:func:`universal_copy` converts it once into a folder beside it, ``<name>.universal`` (the source is never
changed), and reuses that copy while it matches the source (a fingerprint of the source's files); a copy that no
longer matches is rebuilt. The copy is written under a temporary name and renamed into place, so a kill during the
conversion leaves no half-written copy under the final name. ``LitDeepSpeedStrategy.load_checkpoint`` calls these
when the world size differs (see ``docs/checkpoints.md``).

Example:
    >>> from pathlib import Path
    >>> universal_path(Path("ckpts/last.ckpt"))
    PosixPath('ckpts/last.ckpt.universal')
    >>> parse_rank_file("bf16_zero_pp_rank_3_mp_rank_00_optim_states.pt")
    3
    >>> parse_rank_file("mp_rank_00_model_states.pt") is None
    True
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

from lit_accel.checkpoint import _deepspeed_records, load_checkpoint_file
from lit_accel.checkpoint_io import MANIFEST_NAME, discard_path, new_token, temporary_path

__all__ = [
    "UNIVERSAL_MARKER",
    "UNIVERSAL_SUFFIX",
    "load_on_new_world_size",
    "parse_rank_file",
    "restore_group_hyperparameters",
    "saved_world_size",
    "universal_copy",
    "universal_path",
]

UNIVERSAL_SUFFIX = ".universal"
"""The universal copy of ``<folder>`` is ``<folder>.universal`` beside it (not a ``.ckpt`` name, so nothing that
looks for checkpoints picks it up)."""
UNIVERSAL_MARKER = "lit_accel_universal.json"
"""The file in a universal copy naming its source and the source's fingerprint (written last)."""
_LATEST = "latest_universal"  # the tag file DeepSpeed reads when load_universal is on
_OPTIM = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


def universal_path(checkpoint: str | os.PathLike[str]) -> Path:
    """Where the universal copy of a DeepSpeed checkpoint folder lives: ``<folder>.universal`` beside it."""
    path = Path(checkpoint)
    return path.with_name(path.name + UNIVERSAL_SUFFIX)


def parse_rank_file(name: str) -> int | None:
    """The data-parallel rank of a ZeRO optimizer-state file name, or None for any other file."""
    match = _OPTIM.match(name)
    return int(match.group(1)) if match else None


def _tag(folder: Path) -> str:
    return (folder / "latest").read_text().strip()


def saved_world_size(folder: str | os.PathLike[str]) -> int | None:
    """The data-parallel world size a DeepSpeed checkpoint folder was saved with, from its optimizer-state file
    names (one per rank; nothing is read), or None when it holds no ZeRO optimizer state (a module-only save).

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / "latest").write_text("checkpoint")
        10
        >>> (root / "checkpoint").mkdir()
        >>> for r in range(3):
        ...     _ = (root / "checkpoint" / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"")
        >>> saved_world_size(root)
        3
    """
    root = Path(folder)
    ranks = {parse_rank_file(p.name) for p in (root / _tag(root)).iterdir()}
    ranks.discard(None)
    return len(ranks) or None


def _fingerprint(folder: Path) -> str:
    """What identifies one save of ``folder``: its manifest (every file with its size, written by every lit_accel
    save) and ``latest``; for a folder without a manifest, every file's relative path, size and mtime."""
    digest = hashlib.sha256()
    manifest = folder / MANIFEST_NAME
    if manifest.is_file():
        digest.update(manifest.read_bytes())
    else:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                stat = p.stat()
                digest.update(f"{p.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    digest.update((folder / "latest").read_bytes())
    return digest.hexdigest()


def _matching_copy(source: Path, copy: Path, fingerprint: str) -> bool:
    marker = copy / UNIVERSAL_MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except ValueError:
        return False
    return bool(info.get("fingerprint") == fingerprint and (copy / _LATEST).is_file())


def _verify_copy(copy: Path) -> None:
    """Every ``.pt`` of the copy holds tensors, containers and DeepSpeed's records only (DeepSpeed unpickles them
    without restriction), with every record's CRC-32 intact."""
    records = _deepspeed_records()
    for f in sorted(copy.rglob("*.pt")):
        load_checkpoint_file(f, mmap=True, name="the universal copy", allow=records)


def _convert(source: Path, staging: Path, tag: str) -> None:
    # deferred: importing deepspeed is slow; only a resume on another world size converts
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(
        input_folder=str(source / tag),
        output_folder=str(staging / f"{tag}_universal"),
        num_extract_workers=1,  # in-process: a conversion inside a training process must not fork workers
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # Lightning's engine does not record universal_checkpoint_info; nothing is lost
    )
    chatter = io.StringIO()  # ds_to_universal prints every step; the caller logs one line instead
    with contextlib.redirect_stdout(chatter):
        ds_to_universal.main(args)
    (staging / _LATEST).write_text(f"{tag}_universal")


def universal_copy(checkpoint: str | os.PathLike[str]) -> tuple[Path, bool]:
    """The universal copy of a DeepSpeed checkpoint folder, converted now unless a matching one exists.

    Call on one process (rank 0); the others wait. The source folder is only read. DeepSpeed's converter unpickles
    the source's files, so check the source first (``verify_deepspeed_folder``); a reused copy is checked here.

    Args:
        checkpoint: A complete DeepSpeed checkpoint folder (``latest`` tag, ZeRO stage 1, 2 or 3).

    Returns:
        ``(copy, converted)``: the folder to load with DeepSpeed's ``load_universal`` on, and whether it was
        converted now (False: an existing copy of the same save was reused).

    Raises:
        ValueError: The source holds no ZeRO optimizer state, or DeepSpeed cannot convert it (its message kept).
    """
    source = Path(checkpoint)
    tag = _tag(source)
    if saved_world_size(source) is None:
        raise ValueError(
            f"{str(source)!r} holds no ZeRO optimizer state (a weights-only save), so it cannot be converted to"
            " DeepSpeed's universal format; load it on the world size that saved it"
        )
    copy = universal_path(source)
    fingerprint = _fingerprint(source)
    if _matching_copy(source, copy, fingerprint):
        _verify_copy(copy)
        return copy, False
    staging = temporary_path(copy, new_token())
    staging.mkdir(parents=True)
    try:
        try:
            _convert(source, staging, tag)
        except (AssertionError, RuntimeError, KeyError, ValueError, NotImplementedError) as err:
            raise ValueError(
                f"DeepSpeed could not convert {str(source)!r} to its universal checkpoint format: {err}"
            ) from err
        info: dict[str, Any] = {
            "source": str(source.resolve()),
            "fingerprint": fingerprint,
            "world_size": saved_world_size(source),
            "tag": tag,
        }
        (staging / UNIVERSAL_MARKER).write_text(json.dumps(info, indent=1))
        if copy.exists():
            discard_path(copy)  # a copy of an earlier save under this name
        os.replace(staging, copy)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return copy, True


def restore_group_hyperparameters(copy: str | os.PathLike[str], optimizer: Any) -> int:
    """Puts each optimizer parameter group's saved hyperparameters back after a ZeRO-3 universal load.

    DeepSpeed's ZeRO-3 universal loader (``load_hp_checkpoint_state_from_checkpoint_dir_stage3``) gives every
    parameter group the hyperparameters of the *first* saved group, so with the usual two groups (weights with
    weight decay, norms and biases without) the second group would resume with weight decay; ZeRO-1/2's loader
    restores each group from its own. Here group ``i`` of the torch optimizer under ZeRO-3 takes saved group
    ``i``'s values (everything but ``params``) from the copy's ``zero/optimizer_state.pt``.

    Args:
        copy: The universal copy (:func:`universal_copy`'s folder).
        optimizer: The torch optimizer that ZeRO-3 steps (``engine.optimizer.optimizer``).

    Returns:
        How many groups were set.

    Raises:
        ValueError: The copy's saved groups do not match the optimizer's in number.
    """
    root = Path(copy)
    state_file = root / (root / _LATEST).read_text().strip() / "zero" / "optimizer_state.pt"
    saved = load_checkpoint_file(state_file, name="the universal copy", allow=_deepspeed_records())
    groups = saved["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(
            f"{str(state_file)!r} holds {len(groups)} optimizer parameter groups, the optimizer has"
            f" {len(optimizer.param_groups)}: the checkpoint was saved with another configure_optimizers"
        )
    for group, saved_group in zip(optimizer.param_groups, groups):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
    return len(groups)


def _unshare_step_counters(optimizer: Any) -> None:
    """Gives every optimizer state its own ``step`` tensor.

    DeepSpeed's ZeRO-3 universal loader stores one and the same ``step`` tensor in the state of every sub-group;
    torch's Adam increments ``step`` in place, so with two parameter groups the shared counter advanced twice per
    optimizer step and Adam's bias correction drifted from the uninterrupted run's (measured: 1.6e-3 in the weights
    two steps after the resume, against 0 with separate counters)."""
    seen: set[int] = set()
    for state in optimizer.state.values():
        step = state.get("step")
        if isinstance(step, torch.Tensor):
            if id(step) in seen:
                state["step"] = step.clone()
            seen.add(id(state["step"]))


def load_on_new_world_size(strategy: Any, path: Path, saved: int) -> dict[str, Any]:
    """Loads a DeepSpeed checkpoint folder saved by ``saved`` processes on ``strategy``'s world size: rank 0 converts
    it once into its universal copy (:func:`universal_copy`) or reuses that copy, then every rank loads the copy with
    DeepSpeed's ``load_universal`` switched on for this load only, and mends what DeepSpeed's universal loader
    leaves wrong (:func:`_unshare_step_counters`; under ZeRO-3, :func:`restore_group_hyperparameters`).

    Args:
        strategy: The ``LitDeepSpeedStrategy``, set up (its engine built).
        path: The checkpoint folder, already verified.
        saved: The world size it was saved with (:func:`saved_world_size`).

    Returns:
        Lightning's checkpoint dict (DeepSpeed's client state).

    Raises:
        ValueError: On every rank, when rank 0 could not convert the folder (the reason kept).
    """
    problem, copy = None, None
    if strategy.is_global_zero:
        try:
            folder, converted = universal_copy(path)
            copy = str(folder)
            rank_zero_info(
                f"LitDeepSpeedStrategy: {str(path)!r} was saved by {saved} process(es), this run has"
                f" {strategy.world_size}: {'converted it to' if converted else 'reusing'} DeepSpeed's universal"
                f" checkpoint format in {copy!r}"
            )
        except (ValueError, OSError) as err:
            problem = f"ckpt_path {str(path)!r} cannot be resumed on {strategy.world_size} process(es): {err}"
    problem, copy = strategy.broadcast((problem, copy))
    if problem is not None:
        raise ValueError(problem)
    module = strategy.lightning_module
    assert copy is not None and module is not None
    fitting = module.trainer.state.fn == TrainerFn.FITTING
    engine = strategy.deepspeed_engine
    before = engine._config.load_universal_checkpoint
    engine._config.load_universal_checkpoint = True  # DeepSpeed reads it at every load: on for this one only
    try:
        _, client_state = engine.load_checkpoint(
            copy,
            load_optimizer_states=fitting,
            load_lr_scheduler_states=False,
            load_module_strict=module.strict_loading,
        )
    finally:
        engine._config.load_universal_checkpoint = before
    if client_state is None:
        raise ValueError(f"DeepSpeed loaded no state from the universal copy {copy!r} of {str(path)!r}")
    if fitting:
        _unshare_step_counters(engine.optimizer.optimizer)
    if strategy.zero_stage_3 and fitting:
        restore_group_hyperparameters(copy, engine.optimizer.optimizer)
    return dict(client_state)
