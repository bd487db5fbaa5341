"""Resuming a DeepSpeed checkpoint on another number of processes, through DeepSpeed's universal checkpoint format.

A ZeRO checkpoint holds one optimizer-state shard per data-parallel rank, and DeepSpeed refuses to load it on
another world size ("Automatic adjustment of ZeRO's optimizer state partitioning with a new world size is not
currently supported"). :func:`load_on_new_world_size` has rank 0 convert it once into DeepSpeed's *universal* format
beside it (:func:`lit_accel.checkpoint_io.universal_copy`: every parameter's fp32 value and optimizer moments as whole
tensors, which any world size and ZeRO stage can load), loads that with DeepSpeed's ``load_universal`` switched on,
and mends what DeepSpeed's universal loader gets wrong. ``LitDeepSpeedStrategy.load_checkpoint`` calls it when the
world size differs (see ``docs/checkpoints.md``).

Example:
    >>> import torch
    >>> opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))])
    >>> shared = torch.tensor(2.0)
    >>> for p in opt.param_groups[0]["params"]:
    ...     opt.state[p]["step"] = shared  # what DeepSpeed's ZeRO-3 universal loader leaves
    >>> _unshare_step_counters(opt)
    >>> a, b = (opt.state[p]["step"] for p in opt.param_groups[0]["params"])
    >>> a is b, float(a), float(b)
    (False, 2.0, 2.0)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

from lit_accel.checkpoint import _deepspeed_records, load_checkpoint_file
from lit_accel.checkpoint_io import UNIVERSAL_LATEST, universal_copy
from lit_accel.strategies.from_file import step_device

__all__ = ["load_on_new_world_size", "restore_group_hyperparameters"]


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
    state_file = root / (root / UNIVERSAL_LATEST).read_text().strip() / "zero" / "optimizer_state.pt"
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
    two steps after the resume, against 0 with separate counters). With fused or capturable Adam the step also goes
    to its parameter's device, where those kernels read it (the converter saved it on the CPU)."""
    seen: set[int] = set()
    for param, state in optimizer.state.items():
        step = state.get("step")
        if isinstance(step, torch.Tensor):
            if id(step) in seen:
                step = step.clone()
            step = step.to(device=step_device(param, optimizer))
            state["step"] = step
            seen.add(id(step))


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
        except Exception as err:  # any failure on rank 0 must reach the others, which wait in the broadcast
            problem = (
                f"ckpt_path {str(path)!r} cannot be resumed on {strategy.world_size} process(es):"
                f" {type(err).__name__}: {err}"
            )
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
