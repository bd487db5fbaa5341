"""Resuming a DeepSpeed run on another number of processes (2 -> 1, 2 -> 3, 3 -> 2), every technique and ZeRO stage.

Four launches of ``elastic_worker.py`` (CPU, gloo, fp32) share one module fixture:

1. 2 processes train every (technique, stage) run from scratch for ``MAX_STEPS`` steps with 3 micro-batches of 2
   sequences per step and process (a global batch of 12), checkpointing at step ``SAVE_AT``;
2. 1 process resumes the ZeRO-2 runs (every technique) and the ZeRO-1 and ZeRO-3 dense runs from step ``SAVE_AT``;
3. 3 processes resume the ZeRO-3 runs (every technique; pruning under ZeRO-2 where it refuses ZeRO-3), and train
   every technique under ZeRO-1 from scratch;
4. 2 processes resume those 3-process ZeRO-1 runs.

Every resumed run is started with ``accumulate_grad_batches=1``: ``TextDataModule(keep_global_batch=True)`` must
bring back the global batch of 12 (accumulation 6 on one process, 2 on three), so the resumed run sees exactly the
sequences the uninterrupted run saw in each step, and ends where it ended: the same weights within fp32 summation
order (the reduction over 1, 2 or 3 processes adds in another order), the same held-out loss, the same technique
state (DropBP's generator and rates, 2:4 masks, pruning masks and multipliers, LoRA adapters) and learning rates.
The checkpoint folder itself is never changed: the universal copy lives beside it and is converted once.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from _helpers import run_torchrun

from lit_accel.checkpoint_io import UNIVERSAL_MARKER, universal_path

pytest.importorskip("deepspeed")

WORKER = Path(__file__).with_name("elastic_worker.py")
TECHNIQUES = ("dense", "dropbp", "sparsity24", "pruning", "lora")
BATCH, SAVE_AT, MAX_STEPS = 2, 2, 4
GLOBAL_BATCH = 12
WEIGHT_ATOL = 1e-4  # fp32 Adam steps from gradients summed over another number of processes (seen: 1.8e-5)
LOSS_RTOL = 1e-5
STOCHASTIC = {"pruning": (0.05, 0.02)}
"""Technique -> (weight atol, held-out loss rtol) where a resume on another world size cannot repeat the run exactly:
StructuredPruning samples its hard-concrete masks once per micro-batch (the same on every rank), and which sequences
share a micro-batch depends on the world size, so the resumed run draws other, equally distributed masks."""


def _pruning_stage3() -> bool:
    from lit_accel.strategies.conflicts import CONFLICTS

    return not any(c.callback == "StructuredPruning" and c.key == "zero_optimization.stage" for c in CONFLICTS)


def _plans() -> dict[str, tuple[int, list[dict[str, Any]]]]:
    def spec(name: str, strategy: str, technique: str, accumulate: int = 1, source: str | None = None) -> dict:
        return {"name": name, "strategy": strategy, "technique": technique, "accumulate": accumulate,
                "source": source}  # fmt: skip

    stage3 = {t: "zero3" if t != "pruning" or _pruning_stage3() else "zero2" for t in TECHNIQUES}
    from_two = [spec(f"s2_zero2_{t}", "zero2", t, 3) for t in TECHNIQUES]
    from_two += [spec(f"s2_{stage3[t]}_{t}", stage3[t], t, 3) for t in TECHNIQUES if stage3[t] == "zero3"]
    from_two.append(spec("s2_zero1_dense", "zero1", "dense", 3))
    from_two += [spec(f"s2_ddp_{t}", "ddp", t, 3) for t in ("dense", "lora")]
    to_one = [spec(f"r21_zero2_{t}", "zero2", t, source=f"s2_zero2_{t}") for t in TECHNIQUES]
    to_one += [spec(f"r21_{s}_dense", s, "dense", source=f"s2_{s}_dense") for s in ("zero1", "zero3")]
    to_one.append(spec("r21_zero2_dense_from_ddp", "zero2", "dense", source="s2_ddp_dense"))
    to_one.append(spec("r21_single_dense_from_zero2", "ddp", "dense", source="s2_zero2_dense"))
    to_three = [spec(f"r23_{stage3[t]}_{t}", stage3[t], t, source=f"s2_{stage3[t]}_{t}") for t in TECHNIQUES]
    to_three += [spec(f"r23_zero3_{t}_from_ddp", "zero3", t, source=f"s2_ddp_{t}") for t in ("dense", "lora")]
    to_three += [spec(f"r23_ddp_{t}_from_zero3", "ddp", t, source=f"s2_zero3_{t}") for t in ("dense", "lora")]
    to_three += [spec(f"s3_zero1_{t}", "zero1", t, 2) for t in TECHNIQUES]
    back_to_two = [spec(f"r32_zero1_{t}", "zero1", t, source=f"s3_zero1_{t}") for t in TECHNIQUES]
    return {"from_two": (2, from_two), "to_one": (1, to_one), "to_three": (3, to_three), "to_two": (2, back_to_two)}


def _folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    if folder.is_file():  # a DDP checkpoint
        return hashlib.sha256(folder.read_bytes()).hexdigest()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            digest.update(str(p.relative_to(folder)).encode() + b"\0" + p.read_bytes())
    return digest.hexdigest()


def _checkpoint(out: Path, source: str) -> Path:
    return out / source / f"epoch=0-step={SAVE_AT}.ckpt"


@pytest.fixture(scope="module")
def elastic(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from lit_accel.data import TextDataModule
    from lit_accel.models import CausalLM

    kept = os.environ.get("LIT_ACCEL_ELASTIC_DIR")  # keep (and reuse) the launches' results there
    out = Path(kept) if kept else tmp_path_factory.mktemp("elastic")
    out.mkdir(parents=True, exist_ok=True)
    cache, base = out / "cache", out / "base"
    if not base.is_dir():  # a kept folder keeps its base: LoRA refuses adapters over another one
        lm = CausalLM("llama-tiny")
        lm.configure_model()
        assert lm.model is not None
        lm.model.save_pretrained(str(base))
    data = TextDataModule(corpus="stdlib", max_corpus_bytes=300_000, bpe_vocab_size=512, bpe_train_bytes=200_000,
                          seq_len=32, batch_size=BATCH, cache_dir=str(cache))  # fmt: skip
    data.prepare_data()  # once here, not raced by the launches
    runs: dict[str, dict[str, Any]] = {}
    specs: dict[str, dict[str, Any]] = {}
    digests: dict[str, str] = {}
    markers: dict[str, float] = {}
    for plan_name, (nproc, plan) in _plans().items():
        for s in plan:
            s["ckpt_path"] = None if s["source"] is None else str(_checkpoint(out, s["source"]))
            specs[s["name"]] = s
        plan_file, done = out / f"{plan_name}.json", out / f"{plan_name}.ranks.json"
        plan_file.write_text(json.dumps(plan))
        if not done.is_file():
            done.write_text(
                json.dumps(run_torchrun(WORKER, out, plan_file, cache, base, out=out, nproc=nproc, timeout=600))
            )
        ranks = json.loads(done.read_text())
        for s in plan:
            state = torch.load(out / f"{s['name']}.pt")
            runs[s["name"]] = {"ranks": [r["runs"][s["name"]] for r in ranks], "state": state}
        if plan_name == "from_two":
            digests = {s["name"]: _folder_digest(_checkpoint(out, s["name"])) for s in plan}
        if plan_name == "to_one":
            markers = {
                s["source"]: (universal_path(_checkpoint(out, s["source"])) / UNIVERSAL_MARKER).stat().st_mtime_ns
                for s in plan
                if not s["source"].startswith("s2_ddp")
            }
    return {"out": out, "runs": runs, "specs": specs, "digests": digests, "markers": markers}


def _step_samples(rec: dict[str, Any], accumulate: int) -> list[set[int]]:
    per_step = BATCH * accumulate
    steps = len(rec["samples"]) // per_step
    return [set(rec["samples"][i * per_step : (i + 1) * per_step]) for i in range(steps)]


def _global_steps(ranks: list[dict[str, Any]], accumulate: int) -> list[set[int]]:
    per_rank = [_step_samples(r, accumulate) for r in ranks]
    return [set().union(*(p[i] for p in per_rank)) for i in range(len(per_rank[0]))]


RESUMED = [name for _, plan in _plans().values() for name in (s["name"] for s in plan) if name.startswith("r")]


@pytest.mark.parametrize("name", RESUMED)
def test_resumed_run_continues_the_uninterrupted_one(elastic: dict[str, Any], name: str) -> None:
    spec = elastic["specs"][name]
    source = elastic["specs"][spec["source"]]
    resumed, straight = elastic["runs"][name], elastic["runs"][spec["source"]]
    world, saved_world = len(resumed["ranks"]), len(straight["ranks"])
    assert GLOBAL_BATCH % (world * BATCH) == 0
    accumulate = GLOBAL_BATCH // (world * BATCH)
    # The global batch came back through gradient accumulation, on every rank.
    assert [r["accumulate"] for r in resumed["ranks"]] == [accumulate] * world
    assert all(r["global_step"] == MAX_STEPS for r in resumed["ranks"])
    # Each optimizer step after the resume saw exactly the uninterrupted run's sequences; none twice.
    after = _global_steps(straight["ranks"], source["accumulate"])[SAVE_AT:]
    assert _global_steps(resumed["ranks"], accumulate) == after
    seen = [h for r in resumed["ranks"] for h in r["samples"]]
    assert len(seen) == (MAX_STEPS - SAVE_AT) * GLOBAL_BATCH
    # The same learning rates, weights, held-out loss and technique state at the end.
    assert resumed["ranks"][0]["lrs"][-1][1] == pytest.approx(straight["ranks"][0]["lrs"][-1][1], rel=1e-12)
    a, b = resumed["state"], straight["state"]
    assert a.keys() == b.keys()
    weight_atol, loss_rtol = STOCHASTIC.get(spec["technique"], (WEIGHT_ATOL, LOSS_RTOL))
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < weight_atol, (name, worst, f"{saved_world} -> {world}")
    loss, loss_ref = resumed["ranks"][0]["final_loss"], straight["ranks"][0]["final_loss"]
    assert math.isfinite(loss) and loss == pytest.approx(loss_ref, rel=loss_rtol)
    state, state_ref = resumed["ranks"][0]["technique_state"], straight["ranks"][0]["technique_state"]
    assert state.keys() == state_ref.keys()
    for callback in state:
        if spec["technique"] not in STOCHASTIC:
            _assert_close(state[callback], state_ref[callback], f"{name}: {callback}")
    # Every rank agrees.
    assert all(r["technique_state"] == resumed["ranks"][0]["technique_state"] for r in resumed["ranks"])


def _assert_close(a: Any, b: Any, where: str) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list) and a and isinstance(a[0], float):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=1e-5), where
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7), where
    else:
        assert a == b, where


def test_checkpoints_are_unchanged_and_converted_once(elastic: dict[str, Any]) -> None:
    out = elastic["out"]
    for name, digest in elastic["digests"].items():
        assert _folder_digest(_checkpoint(out, name)) == digest, name
    # The 2 -> 3 resumes reused the copies the 2 -> 1 resumes made (a universal copy fits any world size).
    for source, mtime in elastic["markers"].items():
        marker = universal_path(_checkpoint(out, source)) / UNIVERSAL_MARKER
        assert marker.stat().st_mtime_ns == mtime, source
        assert json.loads(marker.read_text())["world_size"] == 2
