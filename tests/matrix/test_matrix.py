"""The distributed test matrix, CPU rows: every technique alone and the pairs that compose (or must refuse), on one
CPU device, under DDP over gloo with 2 processes, and under DeepSpeed ZeRO-1/2/3 (``LitDeepSpeedStrategy`` on the
CPU over gloo, 2 processes); every technique alone also with 4 processes, and DropBP + LoRA on 2 nodes x 2
processes (``test_ranks.py`` asserts what only those show).

The rows are ``matrix_common.ROWS``, the runs ``matrix_common.RUNS``. The session fixture (``conftest.py``) starts
every launch of ``matrix_worker.py`` at the same time, and each launch trains its runs' rows (a handful of steps of a
2-layer LLaMA on one fixed batch, then again from a mid-run checkpoint); the tests below only read the JSON and the
final weights it wrote. What each row must show is ``matrix_common.row_problems``: runs, loss finite and falling,
the technique acted, ranks bit-identical (with ZeRO-3's partitions gathered), resume bit-exact (DeepSpeed: from its
checkpoint folder); a refused pair raises the expected error at set-up on every rank. Every multi-process run of a
row without DropBP starts from the single-device run's weights and follows its loss and final weights.
``docs/compatibility.md`` is generated from the same results by ``make_table.py``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from make_table import DOC, README, TABLE_END, TABLE_START, WIDER_TABLE_END, WIDER_TABLE_START, render_table
from matrix_common import (
    ALL_RUNS,
    KNOWN_FAILURES,
    MAX_STEPS,
    MODEL_CONFIG,
    RESUME_AT,
    ROW_BY_ID,
    RUN_ROWS,
    RUNS,
    SINGLE_LOSS_ATOL,
    SINGLE_WEIGHTS_ATOL,
    WIDER_RUNS,
    ZERO3_REFUSES_PRUNING,
    Launch,
    Row,
    loss_vs_single,
    results_of,
    row_for,
    row_problems,
    rows_of,
    weights_vs_single,
)

results = results_of


@pytest.mark.parametrize("strategy", ALL_RUNS)
def test_each_launch_ran_every_row_on_every_rank(matrix: dict[str, Launch], strategy: str) -> None:
    run = results(matrix, strategy)
    assert run["strategy"] == strategy
    assert run["world_size"] == RUNS[strategy].world_size
    assert list(run["rows"]) == [row.id for row in rows_of(strategy)]


@pytest.mark.parametrize(("strategy", "row"), RUN_ROWS, ids=[f"{run}-{row.id}" for run, row in RUN_ROWS])
def test_row(matrix: dict[str, Launch], row: Row, strategy: str) -> None:
    """Every check of ``row_problems``; the DeepSpeed runs (``zero1``..``zero3``, also with 4 processes and on 2
    nodes) with the row's DeepSpeed refusal and facts (``matrix_common.row_for``). A known failure of lit_accel under
    DeepSpeed (``KNOWN_FAILURES``) is xfailed with its reason while it still fails, and fails the test (so that the
    entry is removed) once fixed."""
    problems = row_problems(row, results(matrix, strategy))
    known = KNOWN_FAILURES.get((row.id, strategy))
    if known is not None:
        assert problems, f"{row.id} under {strategy} passes now: remove it from KNOWN_FAILURES"
        pytest.xfail(f"{known[1]} | found: {problems[0].splitlines()[0][:500]}")
    assert not problems, "\n".join(problems)


REFUSED_UNDER_DEEPSPEED = [
    (run, row) for run, row in RUN_ROWS if RUNS[run].stage is not None and row_for(row, run).error is not None
]


@pytest.mark.parametrize(
    ("strategy", "row"), REFUSED_UNDER_DEEPSPEED, ids=[f"{run}-{row.id}" for run, row in REFUSED_UNDER_DEEPSPEED]
)
def test_deepspeed_refusals_are_the_clear_set_up_error(matrix: dict[str, Launch], strategy: str, row: Row) -> None:
    """Under the real ``lit_deepspeed_stage_N`` run, each refusal (the row's own, or ``DEEPSPEED_REFUSED``) is the
    expected ValueError, before any step, on every rank (the same as ``test_row``, named here so that the refusals
    stand out)."""
    judged = row_for(row, strategy)
    assert judged.error is not None
    for res in results(matrix, strategy)["rows"][row.id]:
        assert res["status"] == "error" and res["error"]["global_step"] == 0, res["error"]
        assert res["error"]["type"] == judged.error_type, res["error"]
        assert re.search(judged.error, res["error"]["message"]), res["error"]["message"]


FOLLOWERS = [(run, row) for run, row in RUN_ROWS if run != "single" and row.error is None and row.ddp_equals_single]


@pytest.mark.parametrize(("strategy", "row"), FOLLOWERS, ids=[f"{run}-{row.id}" for run, row in FOLLOWERS])
def test_follows_the_single_device_run(matrix: dict[str, Launch], strategy: str, row: Row) -> None:
    """Each rank trains on its share of the single-device batch; averaged gradients make DDP and ZeRO-1/2/3 (2 and 4
    processes) the same optimisation: same start, same decisions, losses within SINGLE_LOSS_ATOL, final weights within
    SINGLE_WEIGHTS_ATOL (fp32). A row that decides by magnitudes (``Row.near_ties``) may decide otherwise from its
    second decision on; it follows the single-device run up to there."""
    single, run = results(matrix, "single"), results(matrix, strategy)
    reference = single["rows"][row.id][0]["full"]
    assert reference["initial"], "the single-device run recorded no initial weights"
    for rank, res in enumerate(run["rows"][row.id]):
        assert res["status"] == "ok", res["error"]
        differing = sorted(k for k in reference["initial"] if res["full"]["initial"].get(k) != reference["initial"][k])
        assert not differing, f"rank {rank} started from other weights than the single-device run: {differing[:8]}"
    probes = run["rows"][row.id][0]["full"]["probes"]
    steps = next((i for i, (a, b) in enumerate(zip(probes, reference["probes"])) if a != b), MAX_STEPS)
    decided = [i for i, p in enumerate(reference["probes"][:steps]) if p]
    if steps < MAX_STEPS:
        assert row.near_ties, f"decided otherwise at step {steps}: {probes[steps]} vs {reference['probes'][steps]}"
        assert len({str(p) for p in reference["probes"][:steps] if p}) > 2, f"only the first decisions agree: {decided}"
    loss = loss_vs_single(row, single, run, steps)
    assert loss is not None and loss <= SINGLE_LOSS_ATOL, loss
    if steps == MAX_STEPS:
        weights = weights_vs_single(row, matrix[strategy].directory, strategy)
        assert weights is not None and weights <= SINGLE_WEIGHTS_ATOL, weights


@pytest.mark.parametrize("doc", [DOC, README], ids=lambda p: p.name)
def test_docs_table_is_current(matrix: dict[str, Launch], doc: Path) -> None:
    """The tables between the markers are what the results give: the main one in DOC and the README, the one of the
    wider runs (4 processes, 2 nodes) in DOC."""
    text = doc.read_text()
    runs = {s: results(matrix, s) for s in ALL_RUNS}
    tables = [(TABLE_START, TABLE_END, render_table(runs))]
    if doc == DOC:
        tables.append((WIDER_TABLE_START, WIDER_TABLE_END, render_table(runs, WIDER_RUNS)))
    for start, end, fresh in tables:
        assert start in text and end in text, f"{doc} has no generated table {start}"
        current = text.split(start, 1)[1].split(end, 1)[0].strip()
        assert current == fresh.strip(), f"{doc} is out of date: run `python tests/matrix/make_table.py`\n{fresh}"


# (row, ZeRO stage, the set-up error expected, or None where the callbacks accept the strategy)
DEEPSPEED_SET_UP = [
    *(("sparse24", stage, None) for stage in (1, 2, 3)),
    *(("dropbp+sparse24", stage, None) for stage in (1, 2, 3)),
    ("pruning", 1, None),
    ("pruning", 2, None),
    ("pruning", 3, "StructuredPruning does not support DeepSpeed ZeRO stage 3" if ZERO3_REFUSES_PRUNING else None),
]


@pytest.mark.parametrize(("row_id", "stage", "error"), DEEPSPEED_SET_UP)
def test_deepspeed_set_up_checks(row_id: str, stage: int, error: str | None) -> None:
    """The callbacks' own set-up checks, without a run: each ``setup`` gets a stand-in Trainer holding Lightning's
    ``DeepSpeedStrategy`` of the given ZeRO stage (the real runs are the ``zero1``..``zero3`` columns of
    ``test_row``)."""
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
    ("lora", _set(1, "full", "grad_digests", to=lambda v: ["other", *v[1:]]), "other gradients after the all-reduce"),
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
    ("pruning+lora", _set(0, "error", "message", to="something else"), "expected ValueError matching"),
]


@pytest.mark.parametrize(("row_id", "change", "says"), ZERO3_CAUGHT, ids=[f"{r}: {s}" for r, _, s in ZERO3_CAUGHT])
def test_the_checks_catch_a_broken_zero3_result(matrix: dict[str, Launch], row_id: str, change: Any, says: str) -> None:
    run = results(matrix, "zero3")
    assert not row_problems(ROW_BY_ID[row_id], run)
    problems = row_problems(ROW_BY_ID[row_id], _mutated(run, row_id, change))
    assert any(says in p for p in problems), problems


WIDER_CAUGHT = [  # (run, row, change, what row_problems must then say): the 4-process and two-node results
    ("ddp-4", "dense", _set(2, "resume", "state_max_abs_diff", to=1e-3), "resumed run's weights differ by"),
    ("ddp-4", "dense", _set(0, "resume", "differing", to=["callback/x"]), "other weights or callback state"),
    ("ddp-4", "dropbp", _set(3, "full", "probes", to=lambda v: [{"x": 1}, *v[1:]]), "ranks 0 and 3 made other"),
    ("zero3-4", "lora", _set(3, "full", "state", LORA_B, to="0"), "ranks 0 and 3 differ after the full run"),
    ("zero3-2x2", "dropbp+lora", _set(2, "resumed", "state", LORA_B, to="0"), "ranks 0 and 2 differ after the resumed"),
]


@pytest.mark.parametrize(
    ("strategy", "row_id", "change", "says"), WIDER_CAUGHT, ids=[f"{r}-{row}: {s}" for r, row, _, s in WIDER_CAUGHT]
)
def test_the_checks_catch_a_broken_wider_result(
    matrix: dict[str, Launch], strategy: str, row_id: str, change: Any, says: str
) -> None:
    run = results(matrix, strategy)
    assert not row_problems(ROW_BY_ID[row_id], run)
    problems = row_problems(ROW_BY_ID[row_id], _mutated(run, row_id, change))
    assert any(says in p for p in problems), problems
