"""The quality suite's arithmetic (loss at equal wall-clock, time to target, budgets, summaries over seeds) and its
validation-curve callback (the clock stops while validating; W&B plots loss against the wall-clock)."""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import pytest
import torch
from _helpers import MemoryLogger

from benchmarks.quality_curves import Curve, Point, ValCurve, loss_at, spread, steps_for_time, summarize, time_to


def _curve(variant: str, seed: int, pts: list[tuple[float, float]], tokens_per_s: int = 100) -> Curve:
    return Curve(variant, seed, [Point(t, int(t), int(t * tokens_per_s), loss) for t, loss in pts])


def test_loss_at_interpolates_inside_and_is_nan_outside() -> None:
    pts = _curve("a", 0, [(10.0, 4.0), (20.0, 3.0), (40.0, 2.0)]).points
    assert loss_at(pts, 10.0) == 4.0
    assert loss_at(pts, 15.0) == pytest.approx(3.5)
    assert loss_at(pts, 30.0) == pytest.approx(2.5)
    assert loss_at(pts, 40.0) == 2.0
    assert math.isnan(loss_at(pts, 41.0)) and math.isnan(loss_at(pts, 9.0)) and math.isnan(loss_at([], 1.0))


def test_time_to_takes_the_first_crossing_on_any_axis() -> None:
    # Not monotonic: crosses 2.5 between 20 and 30 s, rises, crosses again later.
    pts = _curve("a", 0, [(10.0, 4.0), (20.0, 3.0), (30.0, 2.0), (40.0, 3.0), (50.0, 1.0)]).points
    assert time_to(pts, 2.5) == pytest.approx(25.0)
    assert time_to(pts, 2.5, lambda p: float(p.tokens)) == pytest.approx(2500.0)
    assert time_to(pts, 5.0) == 10.0  # already below at the first point
    assert math.isnan(time_to(pts, 0.5))


def test_steps_for_time_scales_and_rounds_to_the_validation_interval() -> None:
    assert steps_for_time(200, 0.5) == 400
    assert steps_for_time(200, 0.7, multiple=25) == 275  # 285.7 -> nearest multiple of 25
    assert steps_for_time(200, 100.0, multiple=25) == 25  # at least one interval
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="time_ratio"):
            steps_for_time(200, bad)


def test_spread_ignores_nan() -> None:
    assert spread([1.0, math.nan, 3.0]) == (2.0, 1.0, 3.0)
    assert all(math.isnan(v) for v in spread([math.nan]))


def test_summarize_pairs_each_seed_with_its_baseline() -> None:
    curves = []
    for seed, shift in ((0, 0.0), (1, 0.5)):
        curves.append(_curve("dense", seed, [(10.0, 4.0 + shift), (20.0, 3.0 + shift), (40.0, 2.0 + shift)]))
        # Twice as fast per token, same loss per token: reaches dense's final loss at half its time.
        curves.append(
            _curve("fast", seed, [(5.0, 4.0 + shift), (10.0, 3.0 + shift), (20.0, 2.0 + shift)], tokens_per_s=200)
        )
        # Slower than dense and never reaches its final loss.
        curves.append(_curve("slow", seed, [(10.0, 4.5 + shift), (20.0, 3.6 + shift), (30.0, 3.0 + shift)]))
    rows = {r["variant"]: r for r in summarize(curves, "dense")}
    assert list(rows) == ["dense", "fast", "slow"]
    dense, fast, slow = rows["dense"], rows["fast"], rows["slow"]
    assert dense["time to target vs baseline"] == 1.0 and dense["reached target"] == "2/2"
    assert fast["time to target vs baseline"] == pytest.approx(0.5)
    assert fast["tokens to target vs baseline"] == pytest.approx(1.0)
    assert fast["reached target"] == "2/2" and fast["seeds"] == 2
    # Equal time = the seed's shortest run's end (fast, 20 s): dense 3.0, fast 2.0, slow 3.6 (+ the seed's shift).
    assert fast["minus baseline at equal time"] == pytest.approx(-1.0)
    assert slow["minus baseline at equal time"] == pytest.approx(0.6)
    assert fast["val loss at equal time"] == pytest.approx(2.25)  # mean of 2.0 and 2.5
    assert fast["val loss at equal time (min..max)"] == "2.000..2.500"
    assert math.isnan(slow["time to target vs baseline"]) and slow["reached target"] == "0/2"
    assert slow["time to target vs baseline (min..max)"] == "-"
    with pytest.raises(ValueError, match="no 'dense' curve"):
        summarize([c for c in curves if not (c.variant == "dense" and c.seed == 1)], "dense")


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Linear(4, 1)

    def training_step(self, batch: Any, idx: int) -> torch.Tensor:
        return self.w(batch[0]).pow(2).mean()

    def validation_step(self, batch: Any, idx: int) -> None:
        time.sleep(0.2)  # validation time must not count as training time
        self.log("val/loss", self.w(batch[0]).pow(2).mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_val_curve_stops_the_clock_while_validating_and_plots_against_it() -> None:
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 4)), batch_size=4)
    curve, logger = ValCurve(tokens_per_step=16, start=Point(100.0, 10, 160, 9.9)), MemoryLogger()
    trainer = L.Trainer(
        max_steps=6, val_check_interval=2, limit_val_batches=2, num_sanity_val_steps=2, logger=logger,
        callbacks=[curve], enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    t0 = time.perf_counter()
    trainer.fit(_Tiny(), train_dataloaders=data, val_dataloaders=data)
    wall = time.perf_counter() - t0
    assert [p.step for p in curve.points] == [12, 14, 16]  # sanity check not recorded; continues the start
    assert [p.tokens for p in curve.points] == [192, 224, 256]
    seconds = [p.seconds - 100.0 for p in curve.points]
    assert seconds == sorted(seconds) and seconds[-1] <= curve.train_seconds
    # Three validations of 2 batches x 0.2 s (and a 2-batch sanity check) ran; none of it is training time.
    assert wall - curve.train_seconds >= 1.2 and curve.train_seconds < wall - 1.2 + 0.3
    assert ("quality/*", "quality/train_seconds") in logger.defined
    logged = [m for m in logger.logged if "quality/val_loss" in m]
    assert [m["quality/train_seconds"] for m in logged] == [p.seconds for p in curve.points]
    assert [m["quality/val_loss"] for m in logged] == [p.loss for p in curve.points]


def test_a_table_can_name_another_device_for_jobs_run_beside_the_gpu(tmp_path: Any) -> None:
    import json

    from benchmarks.harness import Context

    ctx = Context("quality", smoke=True, records=tmp_path, run_id="r", command="c", jobs=3, wandb="offline")
    assert (ctx.jobs, ctx.wandb) == (3, "offline")
    ctx.table("a", "A").add({"v": 1.0})
    ctx.table("b", "B", device="CPU (x86_64, 16 cores)").add({"v": 2.0})
    records = [json.loads(line) for line in (tmp_path / "quality.jsonl").read_text().splitlines()]
    assert records[0]["device"] == ctx.stamp["device"]
    assert records[1]["device"] == "CPU (x86_64, 16 cores)" and records[1]["commit"] == ctx.stamp["commit"]


def test_overlay_chart_is_a_wandb_line_series_of_every_curve() -> None:
    pytest.importorskip("wandb")
    from benchmarks.quality_curves import overlay_chart

    curves = [
        _curve("dense", 0, [(1.0, 4.0), (2.0, 3.0)]),
        _curve("DropBP 0.5", 0, [(0.7, 4.1), (1.4, 3.2), (2.1, 2.9)]),
    ]
    chart = overlay_chart(curves, "pretrain")
    rows = chart.table.data
    assert chart.table.columns == ["step", "lineKey", "lineVal"]  # x (training seconds), run, val loss
    assert {r[1] for r in rows} == {"dense / seed 0", "DropBP 0.5 / seed 0"}
    assert sorted((r[0], r[2]) for r in rows if r[1] == "DropBP 0.5 / seed 0") == [(0.7, 4.1), (1.4, 3.2), (2.1, 2.9)]
