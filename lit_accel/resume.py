"""Checkpoint fixes that make a resumed run continue exactly like an uninterrupted one.

Example:
    >>> complete_epoch_end_loop_state({"state_dict": {}})  # a weights-only checkpoint is left alone
    False
"""

from __future__ import annotations

from typing import Any

__all__ = ["complete_epoch_end_loop_state"]


def _zero_current(progress: Any) -> None:
    if isinstance(progress, dict) and isinstance(progress.get("current"), dict):
        progress["current"] = dict.fromkeys(progress["current"], 0)


def complete_epoch_end_loop_state(checkpoint: dict[str, Any]) -> bool:
    """Rewrite the fit-loop state of a checkpoint saved in ``on_train_epoch_end`` to "next epoch, nothing run yet".

    Lightning saves such a checkpoint between ``epoch_progress.increment_processed()`` and ``increment_completed()``
    (``FitLoop.on_advance_end``), with the epoch's batch counters full. For epoch-based training it resumes from it
    correctly (``RestartStage.RESUMED_ON_EPOCH_END``). When training is iteration-based (``max_steps`` set,
    ``max_epochs`` unset) ``FitLoop.restarting`` is forced on, the loop restarts in ``RESTARTED_ON_EPOCH_END``
    and re-enters the finished epoch: without validation at that epoch end it trains one extra batch there, and
    in either case ``FitLoop.on_advance_end`` then counts the epoch as processed a second time, so every later
    epoch calls ``sampler.set_epoch(current_epoch + 1)``, ``on_train_epoch_*`` hooks fire one step late, and the
    run diverges from an uninterrupted one (any DataLoader, not only ours).

    Completing the epoch and clearing the per-epoch counters (what ``FitLoop.on_advance_end`` and
    ``_TrainingEpochLoop.reset`` do in an uninterrupted run) makes both kinds of training start the next epoch
    exactly as they would have without the interruption. Totals (``global_step``, logger steps) are untouched.
    Other checkpoints (mid-epoch, ``on_validation_end``, ``on_train_batch_end``) are left as they are.

    Returns:
        Whether the checkpoint was changed.
    """
    try:
        fit_loop = checkpoint["loops"]["fit_loop"]
        epochs = fit_loop["epoch_progress"]
        batches = fit_loop["epoch_loop.batch_progress"]
        in_epoch_end = all(
            p["ready"] == p["started"] == p["processed"] == p["completed"] + 1
            for p in (epochs["total"], epochs["current"])
        )
        current = batches["current"]
        batches_done = current["ready"] == current["started"] == current["processed"] == current["completed"]
    except (KeyError, TypeError):
        return False
    if not (in_epoch_end and batches_done):
        return False
    for counts in (epochs["total"], epochs["current"]):
        counts["completed"] += 1
    _zero_current(batches)
    batches["is_last_batch"] = False
    _zero_current(fit_loop.get("epoch_loop.scheduler_progress"))
    optim = fit_loop.get("epoch_loop.automatic_optimization.optim_progress")
    if isinstance(optim, dict) and isinstance(optim.get("optimizer"), dict):
        for part in optim["optimizer"].values():
            _zero_current(part)
    val_batches = fit_loop.get("epoch_loop.val_loop.batch_progress")
    if isinstance(val_batches, dict) and isinstance(val_batches.get("total"), dict):
        # Lightning clears this at every epoch start: it counts the validation runs within the epoch.
        val_batches["total"] = dict.fromkeys(val_batches["total"], 0)
    return True
