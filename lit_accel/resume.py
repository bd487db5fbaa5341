"""Checkpoint fixes that make a resumed run continue exactly like an uninterrupted one.

Example:
    >>> complete_epoch_end_loop_state({"state_dict": {}})  # a weights-only checkpoint is left alone
    False
    >>> rng = BatchSeededRNG(base_seed=7)
    >>> rng.begin(epoch=0, batch_idx=3, rank=0, device=torch.device("cpu"))
    >>> a = torch.rand(2)
    >>> rng.end()
    >>> rng.begin(epoch=0, batch_idx=3, rank=0, device=torch.device("cpu"))
    >>> torch.equal(a, torch.rand(2))  # the same batch draws the same numbers, whatever ran before
    True
    >>> rng.end()
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import torch

__all__ = [
    "BatchSeededRNG",
    "batch_seed",
    "complete_epoch_end_loop_state",
    "fill_optimizer_states",
    "keep_global_batch",
    "set_epoch_batches_done",
]

_SEED_MASK = (1 << 63) - 1


def batch_seed(base_seed: int, rank: int, epoch: int, batch_idx: int) -> int:
    """A seed for one training batch, a stable function of its coordinates (the same in every process and run).

    Args:
        base_seed: The run's seed.
        rank: The process's global rank (ranks see other data, so they draw other numbers).
        epoch: ``trainer.current_epoch``.
        batch_idx: The batch's index within the epoch (each micro-batch of an accumulated step has its own).

    Returns:
        A non-negative 63-bit seed.

    Example:
        >>> batch_seed(1234, 0, 0, 5) == batch_seed(1234, 0, 0, 5) != batch_seed(1234, 1, 0, 5)
        True
    """
    # blake2b, not hash(): Python salts str hashes per process, and the seed must survive a restart.
    packed = struct.pack("<4Q", base_seed & _SEED_MASK, rank, epoch, batch_idx)
    return int.from_bytes(hashlib.blake2b(packed, digest_size=8).digest(), "little") & _SEED_MASK


class BatchSeededRNG:
    """Seeds the global generators per training batch, so a resumed run draws what the uninterrupted one drew.

    Lightning does not checkpoint the global generators, and whatever else draws from them between two batches
    (the seed of each new data-loader iterator: validation's, a resumed run's fresh training iterator) shifts the
    stream, so dropout masks after a resume would differ from the uninterrupted run's. Between :meth:`begin` and
    :meth:`end` the CPU generator (and the CUDA generator of ``device``) is seeded from
    :func:`batch_seed`; :meth:`end` puts back the state they had at :meth:`begin`, so code outside the training
    batches sees the stream it would have seen without this class. Only :attr:`base_seed` needs saving.

    Args:
        base_seed: The run's seed; ``None`` takes ``torch.initial_seed()`` at the first :meth:`begin` (the seed
            that ``seed_everything`` set).
    """

    def __init__(self, base_seed: int | None = None) -> None:
        self.base_seed = base_seed
        self._outer: tuple[torch.Tensor, torch.device | None, torch.Tensor | None] | None = None

    def begin(self, epoch: int, batch_idx: int, rank: int, device: torch.device) -> None:
        """Saves the generators' states and seeds them for this batch."""
        if self.base_seed is None:
            self.base_seed = torch.initial_seed()
        seed = batch_seed(self.base_seed, rank, epoch, batch_idx)
        cuda = device if device.type == "cuda" else None
        self._outer = (torch.get_rng_state(), cuda, torch.cuda.get_rng_state(cuda) if cuda is not None else None)
        torch.default_generator.manual_seed(seed)
        if cuda is not None:
            index = cuda.index if cuda.index is not None else torch.cuda.current_device()
            torch.cuda.default_generators[index].manual_seed(seed)

    def end(self) -> None:
        """Puts back the states saved by :meth:`begin` (a no-op without a matching :meth:`begin`)."""
        if self._outer is None:
            return
        cpu, cuda, cuda_state = self._outer
        self._outer = None
        torch.set_rng_state(cpu)
        if cuda is not None and cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, cuda)

    def state_dict(self) -> dict[str, Any]:
        """The run's seed: all a resumed run needs to draw the same numbers."""
        return {"base_seed": self.base_seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`'s seed (a missing one keeps the current)."""
        if state.get("base_seed") is not None:
            self.base_seed = int(state["base_seed"])


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


def keep_global_batch(global_batch: int, world_size: int, batch_size: int) -> int | None:
    """The gradient accumulation that keeps ``global_batch`` sequences per optimizer step on ``world_size``
    processes of ``batch_size`` sequences each, or None when it does not divide evenly.

    Example:
        >>> keep_global_batch(12, world_size=3, batch_size=2)  # saved as 2 processes x 2 sequences x 3 micro-batches
        2
        >>> keep_global_batch(12, world_size=5, batch_size=2) is None
        True
    """
    if global_batch < 1 or world_size < 1 or batch_size < 1:
        raise ValueError(f"global_batch={global_batch}, world_size={world_size}, batch_size={batch_size} must be >= 1")
    per_step = world_size * batch_size
    return global_batch // per_step if global_batch % per_step == 0 else None


def set_epoch_batches_done(checkpoint: dict[str, Any], batches: int) -> bool:
    """Rewrite a checkpoint's fit loop to have run ``batches`` batches of the current epoch (the totals move by the
    same amount): what a resume on another world size or batch size needs, where one saved batch is not one batch
    of the resumed run. Optimizer-step counters (``global_step``, schedulers) are untouched.

    Returns:
        Whether the checkpoint held a fit loop to rewrite.

    Example:
        >>> counts = {k: 6 for k in ("ready", "started", "processed", "completed")}
        >>> progress = {"total": dict(counts), "current": dict(counts)}
        >>> ckpt = {"loops": {"fit_loop": {"epoch_loop.batch_progress": progress}}}
        >>> set_epoch_batches_done(ckpt, 9)
        True
        >>> progress["current"]["processed"], progress["total"]["ready"]
        (9, 9)
    """
    try:
        progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]
        current, total = progress["current"], progress["total"]
    except (KeyError, TypeError):
        return False
    # One shift for every counter keeps their offsets (a save in on_train_batch_end has completed = processed - 1,
    # which tells Lightning where in the batch it stopped).
    shift = batches - int(current.get("processed", 0))
    for key in ("ready", "started", "processed", "completed"):
        if key in current:
            current[key] = max(0, int(current[key]) + shift)
            if key in total:
                total[key] = max(0, int(total[key]) + shift)
    return True


def fill_optimizer_states(
    checkpoint: dict[str, Any], optimizer: torch.optim.Optimizer, named_parameters: Any, key: str
) -> bool:
    """Turns Adam's state by parameter name (``checkpoint[key]``, what a DeepSpeed folder gives a run without
    DeepSpeed) into ``checkpoint["optimizer_states"]`` for ``optimizer``, indexed in its own parameter order, with
    each group's saved hyperparameters. Call it once the optimizer exists and before Lightning restores it.

    Returns:
        Whether there was anything to fill.

    Raises:
        ValueError: The saved groups do not match the optimizer's in number.

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> opt = torch.optim.AdamW([p], lr=0.1)
        >>> saved = {"moments": {"w": {"exp_avg": torch.ones(2), "exp_avg_sq": torch.ones(2), "step": 3.0}},
        ...          "param_groups": [{"lr": 0.05}]}
        >>> ckpt = {"by_name": saved}
        >>> fill_optimizer_states(ckpt, opt, [("w", p)], key="by_name")
        True
        >>> opt.load_state_dict(ckpt["optimizer_states"][0])
        >>> float(opt.state[p]["step"]), opt.param_groups[0]["lr"]
        (3.0, 0.05)
    """
    by_name = checkpoint.pop(key, None)
    if by_name is None:
        return False
    names = {id(p): n for n, p in named_parameters}
    saved_groups = by_name["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(
            f"the checkpoint's optimizer has {len(saved_groups)} parameter groups, this run's"
            f" {len(optimizer.param_groups)}: it was saved with another configure_optimizers"
        )
    state: dict[int, dict[str, Any]] = {}
    groups = []
    index = 0
    for group, saved in zip(optimizer.param_groups, saved_groups):
        ids = []
        for param in group["params"]:
            moments = by_name["moments"].get(names.get(id(param), ""))
            if moments is not None:
                state[index] = {
                    "step": torch.tensor(float(moments.get("step", 0.0))),
                    "exp_avg": moments["exp_avg"].reshape(param.shape),
                    "exp_avg_sq": moments["exp_avg_sq"].reshape(param.shape),
                }
            ids.append(index)
            index += 1
        groups.append({**group, **saved, "params": ids})
    checkpoint["optimizer_states"] = [{"state": state, "param_groups": groups}]
    return True
