"""The distributed test matrix, CPU rows: every technique alone and the pairs that compose (or must refuse),
on one CPU device, under DDP over gloo with 2 processes, and under DeepSpeed ZeRO-1/2/3 (``LitDeepSpeedStrategy`` on
the CPU over gloo, 2 processes).

The rows are ``matrix_common.ROWS``. The module fixture launches ``matrix_worker.py`` once per strategy (DeepSpeed:
one launch for the three stages), all at the same time, and each launch trains every row (a handful of steps of a
2-layer LLaMA on one fixed batch, then again from a mid-run checkpoint); the tests below only read the JSON it wrote.
What each row must show is ``matrix_common.row_problems``: runs, loss finite and falling, the technique acted, ranks
bit-identical (DDP; DeepSpeed with ZeRO-3's partitions gathered), resume bit-exact (DeepSpeed: from its checkpoint
folder); a refused pair raises the expected error at set-up on every rank. ``docs/compatibility.md`` is generated
from the same results by ``make_table.py``.

Set ``LIT_ACCEL_MATRIX_DIR`` to keep the results (then ``python tests/matrix/make_table.py --results DIR``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from _helpers import DDP_PROCESSES
from make_table import DOC, README, TABLE_END, TABLE_START, render_table
from matrix_common import (
    ALL_RUNS,
    DDP_SINGLE_ATOL,
    DEEPSPEED_REFUSED,
    KNOWN_FAILURES,
    MAX_STEPS,
    MODEL_CONFIG,
    RESUME_AT,
    ROW_BY_ID,
    ROWS,
    Launch,
    Row,
    ddp_vs_single,
    row_problems,
    run_matrix,
)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Launch]:
    kept = os.environ.get("LIT_ACCEL_MATRIX_DIR")
    out = Path(kept) if kept else tmp_path_factory.mktemp("matrix")
    return run_matrix(out, timeout=500)


def results(matrix: dict[str, Launch], strategy: str) -> dict[str, Any]:
    launch = matrix[strategy]
    assert launch.results is not None, launch.failure()
    return launch.results


@pytest.mark.parametrize("strategy", ALL_RUNS)
def test_each_launch_ran_every_row_on_every_rank(matrix: dict[str, Launch], strategy: str) -> None:
    run = results(matrix, strategy)
    assert run["strategy"] == strategy
    assert run["world_size"] == (1 if strategy == "single" else DDP_PROCESSES)
    assert list(run["rows"]) == [row.id for row in ROWS]


@pytest.mark.parametrize("strategy", ALL_RUNS)
@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_row(matrix: dict[str, Launch], row: Row, strategy: str) -> None:
    """Every check of ``row_problems``; the DeepSpeed runs (``zero1``..``zero3``) with the row's DeepSpeed refusal
    and facts (``matrix_common.row_for``). A known failure of lit_accel under DeepSpeed (``KNOWN_FAILURES``) is
    xfailed with its reason while it still fails, and fails the test (so that the entry is removed) once fixed."""
    problems = row_problems(row, results(matrix, strategy))
    known = KNOWN_FAILURES.get((row.id, strategy))
    if known is not None:
        assert problems, f"{row.id} under {strategy} passes now: remove it from KNOWN_FAILURES"
        pytest.xfail(f"{known[1]} | found: {problems[0].splitlines()[0][:500]}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(("row_id", "strategy"), sorted(DEEPSPEED_REFUSED))
def test_deepspeed_refusals_are_the_clear_set_up_error(matrix: dict[str, Launch], row_id: str, strategy: int) -> None:
    """Under the real ``lit_deepspeed_stage_N`` run, each refusal is the expected ValueError, before any step, on
    every rank (the same as ``test_row``, named here so that the refusals stand out)."""
    run = results(matrix, f"zero{strategy}")
    for res in run["rows"][row_id]:
        assert res["status"] == "error" and res["error"]["global_step"] == 0, res["error"]
        assert res["error"]["type"] == "ValueError", res["error"]
        assert re.search(DEEPSPEED_REFUSED[(row_id, strategy)], res["error"]["message"]), res["error"]["message"]


DDP_ROWS = [row for row in ROWS if row.error is None and row.ddp_equals_single]


@pytest.mark.parametrize("row", DDP_ROWS, ids=[row.id for row in DDP_ROWS])
def test_ddp_follows_the_single_device_run(matrix: dict[str, Launch], row: Row) -> None:
    # Each rank trains on half of the single-device batch; averaged gradients make DDP the same optimisation.
    diff = ddp_vs_single(row, results(matrix, "single"), results(matrix, "ddp"))
    assert diff is not None and diff <= DDP_SINGLE_ATOL, diff


@pytest.mark.parametrize("doc", [DOC, README], ids=lambda p: p.name)
def test_docs_table_is_current(matrix: dict[str, Launch], doc: Path) -> None:
    text = doc.read_text()
    assert TABLE_START in text and TABLE_END in text, f"{doc} has no generated table"
    current = text.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0].strip()
    fresh = render_table({s: results(matrix, s) for s in ALL_RUNS}).strip()
    assert current == fresh, f"{doc} is out of date: run `python tests/matrix/make_table.py`\n{fresh}"


# (row, ZeRO stage, the set-up error expected, or None where the callbacks accept the strategy)
DEEPSPEED_SET_UP = [
    *(("sparse24", stage, None) for stage in (1, 2, 3)),
    *(("dropbp+sparse24", stage, None) for stage in (1, 2, 3)),
    ("pruning", 1, None),
    ("pruning", 2, None),
    ("pruning", 3, "StructuredPruning does not support DeepSpeed ZeRO stage 3"),
]


@pytest.mark.parametrize(("row_id", "stage", "error"), DEEPSPEED_SET_UP)
def test_deepspeed_set_up_checks(row_id: str, stage: int, error: str | None) -> None:
    """The callbacks' own set-up checks, without a run: each ``setup`` gets a stand-in Trainer holding Lightning's
    ``DeepSpeedStrategy`` of the given ZeRO stage (the real runs are the ``zero1``..``zero3`` columns of
    ``test_row``, where ``LitDeepSpeedStrategy``'s conflict check refuses StructuredPruning at ZeRO-3 first)."""
    pytest.importorskip("deepspeed")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from lit_accel.models import CausalLM

    callbacks = ROW_BY_ID[row_id].make()
    trainer: Any = SimpleNamespace(strategy=DeepSpeedStrategy(stage=stage), callbacks=callbacks)
    module = CausalLM({"model_type": "llama", **MODEL_CONFIG})

    def set_up() -> None:
        for cb in callbacks:
            cb.setup(trainer, module, "fit")

    if error is None:
        set_up()
    else:
        with pytest.raises(ValueError, match=error):
            set_up()


def _mutated(run: dict[str, Any], row_id: str, change: Any) -> dict[str, Any]:
    copy = json.loads(json.dumps(run))
    change(copy["rows"][row_id])
    return copy


def _set(*path: Any, to: Any) -> Any:
    """A change that sets ``ranks[path[0]][path[1]]...`` to ``to`` (or to ``to(old value)`` if callable)."""

    def change(ranks: list[Any]) -> None:
        target: Any = ranks
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = to(target[path[-1]]) if callable(to) else to

    return change


def _same_data(ranks: list[Any]) -> None:
    ranks[1]["full"]["batches"] = ranks[0]["full"]["batches"]


LORA_B = "module/model.model.layers.0.mlp.up_proj.lora_B"
CAUGHT = [  # (row, change to the DDP results, what row_problems must then say)
    ("lora", _set(1, "full", "state", LORA_B, to="0"), "ranks 0 and 1 differ after the full run"),
    ("lora", _set(1, "resumed", "state", LORA_B, to="0"), "ranks 0 and 1 differ after the resumed run"),
    ("lora", _set(1, "resumed", "probes", to=[{"x": 1}] * (MAX_STEPS - RESUME_AT)), "decided otherwise"),
    ("lora", _same_data, "trained on the same data"),
    ("lora", _set(0, "resumed", "lm_losses", to=lambda v: [v[0] + 1e-3, *v[1:]]), "resumed losses differ"),
    ("lora", _set(0, "resume", "differing", to=["module/x"]), "other weights or callback state"),
    ("lora", _set(0, "full", "lm_losses", to=lambda v: v[::-1]), "did not fall"),
    ("lora", _set(0, "full", "losses", to=lambda v: [float("nan"), *v[1:]]), "non-finite"),
    ("lora", _set(0, "full", "batches", to=lambda v: ["other", *v[1:]]), "the batch changed"),
    ("lora", _set(0, "facts", "lora.checkpoint_adapter_only", to=False), "facts"),
    ("lora", _set(0, "crashed", "error", to=None), "did not crash"),
    ("pruning+lora", _set(0, "status", to="ok"), "must be refused"),
    ("pruning+lora", _set(1, "error", "global_step", to=2), "not at set-up"),
    ("pruning+lora", _set(1, "error", "message", to="something else"), "expected ValueError matching"),
]


@pytest.mark.parametrize(("row_id", "change", "says"), CAUGHT, ids=[f"{r}: {says}" for r, _, says in CAUGHT])
def test_the_checks_catch_a_broken_result(matrix: dict[str, Launch], row_id: str, change: Any, says: str) -> None:
    run = results(matrix, "ddp")
    assert not row_problems(ROW_BY_ID[row_id], run)
    problems = row_problems(ROW_BY_ID[row_id], _mutated(run, row_id, change))
    assert any(says in p for p in problems), problems


ZERO3_CAUGHT = [  # the same checks catch a broken DeepSpeed (ZeRO-3) result
    ("lora", _set(1, "full", "state", LORA_B, to="0"), "ranks 0 and 1 differ after the full run"),
    ("lora", _set(0, "resume", "differing", to=["module/x"]), "other weights or callback state"),
    ("pruning", _set(0, "error", "message", to="something else"), "expected ValueError matching"),
]


@pytest.mark.parametrize(("row_id", "change", "says"), ZERO3_CAUGHT, ids=[f"{r}: {s}" for r, _, s in ZERO3_CAUGHT])
def test_the_checks_catch_a_broken_zero3_result(matrix: dict[str, Launch], row_id: str, change: Any, says: str) -> None:
    run = results(matrix, "zero3")
    assert not row_problems(ROW_BY_ID[row_id], run)
    problems = row_problems(ROW_BY_ID[row_id], _mutated(run, row_id, change))
    assert any(says in p for p in problems), problems
