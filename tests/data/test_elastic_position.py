"""TextDataModule's resume position on another world size: the fit loop's counters and the kept global batch.

A fake trainer stands in for Lightning's (world size, accumulation, the loaded checkpoint the connector holds), with
the fit-loop state Lightning saves mid-epoch (in ``on_train_batch_end``: ``completed = processed - 1``) and at an
epoch's end.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from lightning.pytorch.trainer.states import TrainerFn

from lit_accel.data import TextDataModule

SAVED = {"epoch": 0, "batches_done": 4, "batch_size": 2, "world_size": 2, "accumulate_grad_batches": 3}


def _counts(ready: int, completed: int) -> dict[str, int]:
    return {"ready": ready, "started": ready, "processed": ready, "completed": completed}


def _checkpoint(batches: dict[str, int], epochs: dict[str, int]) -> dict[str, Any]:
    return {
        "loops": {
            "fit_loop": {
                "epoch_progress": {"total": dict(epochs), "current": dict(epochs)},
                "epoch_loop.batch_progress": {"total": dict(batches), "current": dict(batches), "is_last_batch": False},
            }
        }
    }


def _resume(checkpoint: dict[str, Any], world: int, fn: TrainerFn = TrainerFn.FITTING) -> SimpleNamespace:
    trainer = SimpleNamespace(
        world_size=world,
        accumulate_grad_batches=1,
        state=SimpleNamespace(fn=fn),
        strategy=SimpleNamespace(),
        lightning_module=SimpleNamespace(automatic_optimization=True),
        _checkpoint_connector=SimpleNamespace(_loaded_checkpoint=checkpoint),
    )
    dm = TextDataModule(batch_size=2)
    dm.trainer = trainer  # type: ignore[assignment]
    dm.load_state_dict(dict(SAVED))
    return trainer


def test_mid_epoch_counters_move_to_the_new_batches_keeping_their_offsets() -> None:
    # 4 batches of 2 on 2 ranks = 16 sequences = 8 batches of 2 on one rank; saved after batch 4's end hook
    ckpt = _checkpoint(_counts(4, 3), _counts(0, 0))
    trainer = _resume(ckpt, world=1)
    current = ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]
    assert (current["processed"], current["completed"]) == (8, 7)
    assert trainer.accumulate_grad_batches == 6  # 2 x 2 x 3 sequences per step, now on one rank of 2


def test_an_epoch_end_checkpoint_starts_the_next_epoch_from_its_first_batch() -> None:
    ckpt = _checkpoint(_counts(4, 4), {"ready": 1, "started": 1, "processed": 1, "completed": 0})
    trainer = _resume(ckpt, world=1)
    fit_loop = ckpt["loops"]["fit_loop"]
    assert fit_loop["epoch_progress"]["current"]["completed"] == 1  # the epoch is complete
    assert fit_loop["epoch_loop.batch_progress"]["current"]["processed"] == 0  # not the old epoch's 8 batches
    assert trainer.accumulate_grad_batches == 6


def test_validation_and_an_unchanged_layout_leave_everything_as_saved() -> None:
    for world, fn in ((2, TrainerFn.FITTING), (1, TrainerFn.VALIDATING)):
        ckpt = _checkpoint(_counts(4, 3), _counts(0, 0))
        trainer = _resume(ckpt, world=world, fn=fn)
        assert ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"] == 4, fn
        assert trainer.accumulate_grad_batches == 1, fn  # the Trainer's own value
