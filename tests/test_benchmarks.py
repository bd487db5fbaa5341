"""The benchmark suites: every suite runs end to end at tiny sizes on a CPU, and the published figures (RESULTS.md,
the README's table, the goals) are exactly what the records give."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from _helpers import REPO

sys.path.insert(0, str(REPO))
from benchmarks.__main__ import SUITES
from benchmarks.render import SPEC, Result, _goal_rows, load_results

KEYS = {"suite", "result", "title", "row", "notes", "run", "device", "versions", "commit", "command", "date", "smoke"}


def _bench(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env["WANDB_MODE"] = "disabled"
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    out = tmp_path_factory.mktemp("bench_smoke")
    proc = _bench("run", "--smoke", "--records", str(out), timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return {
        path.stem: [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for path in out.glob("*.jsonl")
    }


def test_every_suite_runs_and_records_in_smoke_mode(smoke: dict[str, list[dict]]) -> None:
    assert set(smoke) == set(SUITES)
    for suite, records in smoke.items():
        assert records, suite
        runs = {r["run"] for r in records}
        assert len(runs) == 1, suite  # one invocation, one run id
        for record in records:
            assert set(record) >= KEYS, (suite, set(KEYS) - set(record))
            assert record["smoke"] is True and record["suite"] == suite and record["row"], record
            assert record["command"].startswith("python -m benchmarks run"), record["command"]
            timed = [k for k in record["row"] if k.endswith("windows")]
            assert all(record["row"][k] >= 5 for k in timed), record  # a timed figure is a median of >= 5 windows


def test_quality_smoke_records_curves_and_summaries_of_every_comparison(smoke: dict[str, list[dict]]) -> None:
    by_result: dict[str, list[dict]] = {}
    for r in smoke["quality"]:
        by_result.setdefault(r["result"], []).append(r["row"])
    comparisons = {"pretrain": "dense", "dropbp_settings": "dense", "finetune": "full fine-tuning"}
    comparisons["pruning"] = "same shape from scratch"
    assert set(by_result) == set(comparisons) | {f"{c}_curves" for c in comparisons}
    for comparison, baseline in comparisons.items():
        rows = by_result[comparison]
        assert rows[0]["variant"] == baseline and rows[0]["time to target vs baseline"] == 1.0
        curves: dict[str, list[dict]] = {}
        for p in by_result[f"{comparison}_curves"]:
            curves.setdefault(p["variant"], []).append(p)
        assert [r["variant"] for r in rows] == list(curves)  # a summary row per curve, the baseline first
        for points in curves.values():
            assert [p["step"] for p in points] == sorted({p["step"] for p in points})
            assert [p["train seconds"] for p in points] == sorted(p["train seconds"] for p in points)
            assert all(p["tokens"] == p["step"] * 4 * 32 for p in points)  # smoke: 4 x 32 tokens a step
    # Every fine-tuning run starts from the same pretrained model: one first point, shared.
    starts = {(p["step"], p["val loss"]) for p in by_result["finetune_curves"] if p["step"] == 0}
    assert len(starts) == 1


def test_every_goal_and_headline_names_a_result_and_column_a_suite_produces(smoke: dict[str, list[dict]]) -> None:
    produced: dict[str, set[str]] = {}
    for records in smoke.values():
        for r in records:
            produced.setdefault(f"{r['suite']}/{r['result']}", set()).update(r["row"])
    spec = yaml.safe_load(SPEC.read_text())
    for goal in spec["goals"]:
        assert goal["result"] in produced, goal
        assert goal["column"] in produced[goal["result"]], goal
        assert set(goal.get("match") or {}) <= produced[goal["result"]], goal
        assert goal["op"] in (">=", "<=", ">", "<"), goal
        assert set(goal.get("require") or {}) <= produced[goal["result"]], goal
    for item in spec["headlines"]:
        assert item["result"] in produced, item
        for match in (item.get("rows") or {}).values():
            assert set(match) <= produced[item["result"]], item


def test_results_and_readme_are_what_the_records_give() -> None:
    proc = _bench("render", "--check", timeout=120)
    assert proc.returncode == 0, proc.stderr
    results = load_results()
    spec = yaml.safe_load(SPEC.read_text())
    # every goal is shown with a measured value (a miss is shown as one, never left out)
    for goal in spec["goals"]:
        result = results.get(goal["result"])
        assert result is not None and result.find(goal.get("match") or {}) is not None, goal


def test_a_goal_with_a_requirement_is_met_only_when_the_row_meets_it_too() -> None:
    rows = [
        {"variant": "a", "time to target": 0.8, "reached target": "3/3"},
        {"variant": "b", "time to target": 0.8, "reached target": "2/3"},
        {"variant": "c", "time to target": None, "reached target": "0/3"},
        {"variant": "d", "time to target": float("nan"), "reached target": "0/3"},
        {"variant": "e", "time to target": 0.9, "seeds": 3},
    ]
    stamp = {"suite": "quality", "result": "x", "title": "T", "commit": "0123456789ab", "device": "CPU"}
    result = Result([{**stamp, "row": row} for row in rows])
    goal = {"result": "quality/x", "setting": "s", "column": "time to target", "op": "<", "target": 1.0}
    goal["require"] = {"reached target": "3/3"}
    spec = {"goals": [{**goal, "goal": v, "match": {"variant": v}} for v in "abcd"]}
    # A YAML value matches a cell of another type as text, as ``match`` does; a missing cell is named.
    spec["goals"] += [{**goal, "goal": "e", "match": {"variant": "e"}, "require": {"seeds": "3"}}]
    spec["goals"] += [{**goal, "goal": "e2", "match": {"variant": "e"}, "require": {"reached target": "3/3"}}]
    a, b, c, d, e, e2 = _goal_rows({"quality/x": result}, spec)
    assert a[3:5] == ["0.8", "**met**"]
    assert b[3:5] == ["0.8 (reached target 2/3)", "**not met**"]
    assert c[3:5] == d[3:5] == ["none (not reached)", "**not met**"]
    assert e[3:5] == ["0.9", "**met**"]
    assert e2[3:5] == ["0.9 (reached target missing)", "**not met**"]


def test_smoke_records_are_never_published(tmp_path: Path) -> None:
    records = tmp_path / "records"
    records.mkdir()
    stamp = {"run": "a", "device": "d", "versions": {}, "commit": "c", "command": "x", "date": "2026-01-01 00:00 UTC"}
    row = {"suite": "step", "result": "r", "title": "T", "notes": "", **stamp}
    lines = [
        json.dumps({**row, "row": {"v": 1.0}, "smoke": False}),
        json.dumps({**row, "row": {"v": 9.0}, "smoke": True}),
    ]
    (records / "step.jsonl").write_text("\n".join(lines) + "\n")
    (result,) = load_results(records).values()
    assert result.rows == [{"v": 1.0}]


def test_a_real_run_without_a_gpu_is_refused_in_one_line() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = _bench("run", "step", timeout=120)
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr and "--smoke" in proc.stderr
    proc = _bench("run", "nosuch", "--smoke", timeout=120)
    assert proc.returncode == 2 and "unknown suite(s) nosuch; allowed: step, kernels" in proc.stderr
