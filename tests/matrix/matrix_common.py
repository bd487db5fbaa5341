"""The distributed test matrix: its rows, the tiny model and fixed batch, and the launchers of the worker.

Shared by ``matrix_worker.py`` (which trains every row), ``test_matrix.py`` (which asserts on the worker's JSON) and
``make_table.py`` (which turns that JSON into ``docs/compatibility.md``). Importing it pulls in ``lit_accel`` and
Lightning only through :data:`ROWS`' factories, which run in the worker.

One launch per strategy runs every row (Trainer start-up and process-group set-up are paid once, not per row):

- ``single``: ``python matrix_worker.py single OUT BASE`` (one CPU device);
- ``ddp``: ``python -m torch.distributed.run --standalone --nproc_per_node 2 matrix_worker.py ddp OUT BASE``
  (``lit_ddp``: Lightning's DDP with gradients as bucket views, over gloo, 2 CPU processes);
- ``deepspeed``: the same launcher with ``matrix_worker.py deepspeed OUT BASE``: ``LitDeepSpeedStrategy`` ZeRO-1,
  then ZeRO-2, then ZeRO-3 (fp32, DeepSpeed's CPU accelerator over gloo, 2 processes), writing ``zero1.json``,
  ``zero2.json`` and ``zero3.json`` (keys ``zero1`` ... in the results).

Each writes ``OUT/<strategy>.json``: ``{"strategy", "world_size", "seconds", "versions", "rows": {row id: [result of
rank 0, result of rank 1, ...]}}``, the per-rank results gathered on rank 0 with ``all_gather_object``; the rows'
checkpoints go to ``OUT/<strategy>/<row id>/``. What a result holds is described in ``matrix_worker.py``.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from _helpers import REPO, torchrun_command, worker_env

HERE = Path(__file__).resolve().parent
WORKER = HERE / "matrix_worker.py"

STRATEGIES: tuple[str, ...] = ("single", "ddp")
"""The CPU strategies of the matrix: one device, and DDP over gloo with :data:`DDP_PROCESSES` processes."""
DEEPSPEED_STAGES: tuple[int, ...] = (1, 2, 3)
DEEPSPEED_RUNS: tuple[str, ...] = tuple(f"zero{s}" for s in DEEPSPEED_STAGES)
"""The DeepSpeed columns (``LitDeepSpeedStrategy``, fp32, on the CPU over gloo, :data:`DDP_PROCESSES` processes):
one launch (``matrix_worker.py deepspeed``) runs them one after the other and writes ``zero1.json`` ...
``zero3.json``."""
LAUNCHES: tuple[str, ...] = (*STRATEGIES, "deepspeed")
"""The worker launches: each strategy of :data:`STRATEGIES`, and one for all of :data:`DEEPSPEED_RUNS`."""
ALL_RUNS: tuple[str, ...] = (*STRATEGIES, *DEEPSPEED_RUNS)

# The run every row trains: a 2-layer LLaMA (GQA: 4 query heads over 2 KV heads) saved as a pretrained directory,
# so LoRA's adapter-only checkpoints (which rebuild the base from it) are exercised; one fixed global batch of
# GLOBAL_BATCH sequences, split over the ranks under DDP, repeated so that an epoch is longer than the run and
# the resume checkpoint is mid-epoch; a high learning rate, so the loss falls within a few steps.
VOCAB = 128
SEQ_LEN = 16
GLOBAL_BATCH = 8
EPOCH_BATCHES = 8
LEARNING_RATE = 1e-2
MAX_STEPS = 7
"""Optimizer steps of the uninterrupted run."""
RESUME_AT = 4
"""The step whose checkpoint the resumed run starts from (and trains on to :data:`MAX_STEPS`)."""
LOSS_ATOL = 1e-6
"""Largest difference allowed between the resumed run's losses and the uninterrupted run's."""
MODEL_CONFIG: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
N_LINEARS = 14  # 2 decoder layers x (q, k, v, o, gate, up, down)


def make_base(directory: Path) -> Path:
    """Writes the pretrained model every row starts from (idempotent) and returns its directory."""
    if (directory / "config.json").is_file():
        return directory
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**MODEL_CONFIG)).save_pretrained(str(directory))
    return directory


# ------------------------------------------------------------------------------------------------------------------
# Rows
# ------------------------------------------------------------------------------------------------------------------


def _dropbp() -> Any:
    from lit_accel.callbacks import DropBP

    # Measured at step 1, before the resume checkpoint: the resumed run must take the allocation from it.
    return DropBP(target=0.5, sensitivity_at=1, seed=3)


def _sparse24() -> Any:
    from lit_accel.callbacks import SemiStructuredSparsity

    # Dense step 0, masks from step 1, refreshed at steps 1, 3, 5: the resumed run (steps 4-6) refreshes at 5.
    return SemiStructuredSparsity(targets="mlp", dense_warmup_steps=1, mask_refresh_every=2)


def _pruning() -> Any:
    from lit_accel.callbacks import StructuredPruning

    return StructuredPruning(num_layers=1, num_kv_heads=1, intermediate_size=64, seed=1)


def _lora(targets: str = "all-linear") -> Any:
    from lit_accel.callbacks import LoRA

    return LoRA(targets=targets, r=4, alpha=8)


def _factorize(targets: str = "attention") -> Any:
    from lit_accel.callbacks import LowRankFactorization

    return LowRankFactorization(targets=targets, rank=8)


def _throughput() -> Any:
    from lit_accel.callbacks import Throughput

    return Throughput(log_every_n_steps=1)


def _kernels() -> Any:
    from lit_accel.callbacks import FusedKernels

    return FusedKernels()


@dataclass(frozen=True)
class Row:
    """One row of the matrix: callbacks that train together, or that must refuse to at set-up."""

    id: str
    """pytest id and JSON key."""
    label: str
    """The row's name in the table; a pair names its callbacks in the order the Trainer gets them."""
    make: Callable[[], list[Any]]
    """Fresh callbacks for one fit (the technique callbacks, in the order given to the Trainer)."""
    expect: dict[str, Any] = field(default_factory=dict)
    """Facts the worker reports about the uninterrupted run (see ``matrix_worker.facts``) and their expected
    values: proof that each technique really acted, beyond the loss."""
    error: str | None = None
    """For a combination that must be refused: a regex the set-up error's message must match (``re.search``)."""
    error_type: str = "ValueError"
    """The class name of the expected error."""
    ddp_equals_single: bool = True
    """Whether DDP's loss (mean over the ranks' halves of the batch) must follow the single-device loss on the whole
    batch. False for DropBP: each rank measures the sensitivities on its half and they are averaged, which is not
    the whole batch's measurement, so the allocated rates (hence the masks) may legitimately differ."""


_DROPBP_FACTS = {"dropbp.measured": True, "dropbp.dropped_some_sublayers": True, "dropbp.grads_skipped": True}
_SPARSE_FACTS = {"sparse24.layers": 6, "sparse24.phase": "sparse", "sparse24.refreshes": 3}
_LORA_ALL = {"lora.layers": N_LINEARS, "lora.other_trainable": 0, "lora.checkpoint_adapter_only": True}
_LORA_MLP = {**_LORA_ALL, "lora.layers": 6}
_FACTORIZE_FACTS = {"factorize.layers": 8, "factorize.factors_trainable": True, "factorize.checkpoint_ranks": True}

ROWS: tuple[Row, ...] = (
    Row("dense", "none (plain CausalLM)", lambda: []),
    Row("dropbp", "DropBP", lambda: [_dropbp()], dict(_DROPBP_FACTS), ddp_equals_single=False),
    Row("sparse24", "SemiStructuredSparsity (2:4)", lambda: [_sparse24()], dict(_SPARSE_FACTS)),
    Row(
        "pruning",
        "StructuredPruning",
        lambda: [_pruning()],
        {"pruning.masks_in_state_dict": True, "pruning.masks_moved": True, "pruning.checkpoint_record": True},
    ),
    Row("lora", "LoRA", lambda: [_lora()], dict(_LORA_ALL)),
    Row(
        "factorize",
        "LowRankFactorization",
        lambda: [_factorize()],
        dict(_FACTORIZE_FACTS),
    ),
    Row("throughput", "Throughput", lambda: [_throughput()], {"throughput.tokens_per_sec_logged": True}),
    Row(
        "kernels",
        "FusedKernels (CPU: PyTorch references)",
        lambda: [_kernels()],
        {"kernels.patched": {"linear_cross_entropy": 1, "rms_norm": 5, "rope": 2, "swiglu": 2}},
    ),
    Row(
        "dropbp+lora",
        "DropBP + LoRA",
        lambda: [_dropbp(), _lora()],
        {**_DROPBP_FACTS, **_LORA_ALL},
        ddp_equals_single=False,
    ),
    Row(
        "dropbp+sparse24",
        "DropBP + 2:4",
        lambda: [_sparse24(), _dropbp()],
        {**_DROPBP_FACTS, **_SPARSE_FACTS},
        ddp_equals_single=False,
    ),
    Row(
        "factorize+lora",
        "LowRankFactorization (attention) + LoRA (MLP)",
        lambda: [_factorize("attention"), _lora("mlp")],
        {**_LORA_MLP, **_FACTORIZE_FACTS},
    ),
    Row(
        "lora+factorize",
        "LoRA (MLP) + LowRankFactorization (attention)",
        lambda: [_lora("mlp"), _factorize("attention")],
        {**_LORA_MLP, **_FACTORIZE_FACTS},
    ),
    Row(
        "factorize+lora-same",
        "LowRankFactorization + LoRA, same layers",
        lambda: [_factorize("attention"), _lora("attention")],
        error=r"is factorised by LowRankFactorization; LoRA and SVD factorisation cannot be applied to the same",
    ),
    Row(
        "lora+factorize-same",
        "LoRA + LowRankFactorization, same layers",
        lambda: [_lora("attention"), _factorize("attention")],
        error=r"cannot factorise .*already carry LoRA adapters",
    ),
    Row(
        "pruning+lora",
        "StructuredPruning + LoRA",
        lambda: [_pruning(), _lora()],
        error=r"StructuredPruning cannot be combined with LoRA in one run",
    ),
    Row(
        "pruning+sparse24",
        "StructuredPruning + 2:4",
        lambda: [_pruning(), _sparse24()],
        error=r"StructuredPruning cannot be combined with SemiStructuredSparsity in one run",
    ),
)
ROW_BY_ID = {row.id: row for row in ROWS}

# ------------------------------------------------------------------------------------------------------------------
# What changes under DeepSpeed (the zero1/zero2/zero3 runs)
# ------------------------------------------------------------------------------------------------------------------

_ZERO3_PRUNING = r"zero_optimization\.stage=3 conflicts with callback StructuredPruning"
DEEPSPEED_REFUSED: dict[tuple[str, int], str] = {
    # LitDeepSpeedStrategy's conflict check (setup_environment) runs before the callbacks' own pair checks.
    **{(row_id, 3): _ZERO3_PRUNING for row_id in ("pruning", "pruning+lora", "pruning+sparse24")},
}
"""(row, ZeRO stage) -> the set-up ``ValueError`` (regex) a row refuses DeepSpeed with, where it differs from the
row's own :attr:`Row.error`: StructuredPruning refuses ZeRO-3."""

DEEPSPEED_FACTS: dict[tuple[str, int], dict[str, Any]] = {
    # ZeRO-3 reduces the gradients into its flat fp32 partitions: the optimizer's parameters are those partitions,
    # whose .grad is always set, so "a parameter had no gradient" cannot be observed there (the drop mask still is).
    **{(row_id, 3): {"dropbp.grads_skipped": None} for row_id in ("dropbp", "dropbp+lora", "dropbp+sparse24")},
    # FusedKernels leaves the fused head + loss out under ZeRO-3 on purpose: lm_head.weight is partitioned.
    ("kernels", 3): {"kernels.patched": {"rms_norm": 5, "rope": 2, "swiglu": 2}},
}
"""(row, ZeRO stage) -> changes to the row's expected facts under DeepSpeed (None: not checked there)."""

KNOWN_FAILURES: dict[tuple[str, str], tuple[str, str]] = {}
"""(row, run) -> (a short line for the table, why the row fails there): real failures of lit_accel under DeepSpeed,
found by this matrix and not fixed yet. Their tests are xfailed with the reason; the table shows them failing."""


def row_for(row: Row, strategy: str | None) -> Row:
    """``row`` as judged under ``strategy`` (a key of :data:`ALL_RUNS`): its DeepSpeed refusal and facts."""
    if strategy not in DEEPSPEED_RUNS:
        return row
    stage = int(str(strategy)[len("zero") :])
    error = DEEPSPEED_REFUSED.get((row.id, stage), row.error)
    expect = {**row.expect, **DEEPSPEED_FACTS.get((row.id, stage), {})}
    expect = {k: v for k, v in expect.items() if v is not None}
    error_type = "ValueError" if (row.id, stage) in DEEPSPEED_REFUSED else row.error_type
    return replace(row, error=error, expect=expect, error_type=error_type)


# ------------------------------------------------------------------------------------------------------------------
# Launching the worker
# ------------------------------------------------------------------------------------------------------------------


def worker_command(strategy: str, out_dir: Path, base_dir: Path) -> list[str]:
    """The command line that runs every row under ``strategy`` (one of :data:`STRATEGIES`)."""
    if strategy == "single":
        return [sys.executable, str(WORKER), strategy, str(out_dir), str(base_dir)]
    if strategy in ("ddp", "deepspeed"):
        return torchrun_command(WORKER, strategy, out_dir, base_dir)
    raise ValueError(f"strategy={strategy!r}; allowed: {LAUNCHES}")


@dataclass
class Launch:
    """The outcome of one worker launch."""

    strategy: str
    returncode: int
    output: str
    seconds: float
    results: dict[str, Any] | None
    """The worker's JSON, or None when it wrote none."""

    def failure(self) -> str:
        """Why the launch gave no results (for an assertion message)."""
        return f"{self.strategy} worker exited {self.returncode} after {self.seconds:.0f} s:\n{self.output[-8000:]}"


def runs_of(launch: str) -> tuple[str, ...]:
    """The runs (JSON files) one launch writes: :data:`DEEPSPEED_RUNS` for ``deepspeed``, else the strategy's own."""
    return DEEPSPEED_RUNS if launch == "deepspeed" else (launch,)


def run_matrix(out_dir: Path, strategies: tuple[str, ...] = LAUNCHES, timeout: float = 600) -> dict[str, Launch]:
    """Runs the worker once per launch (:data:`LAUNCHES`), all at the same time, and returns the outcome of each run
    (keyed as :data:`ALL_RUNS`; the DeepSpeed runs share their launch's exit status, output and time)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    base = make_base(out_dir / "base")
    procs: dict[str, tuple[subprocess.Popen[str], float]] = {}
    for strategy in strategies:
        # A kept results directory may hold an earlier run: ModelCheckpoint would not overwrite its checkpoints.
        for run in runs_of(strategy):
            shutil.rmtree(out_dir / run, ignore_errors=True)
            (out_dir / f"{run}.json").unlink(missing_ok=True)
        log = open(out_dir / f"{strategy}.log", "w")  # noqa: SIM115  # closed when the process is collected
        cmd = worker_command(strategy, out_dir, base)
        proc = subprocess.Popen(cmd, env=worker_env(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
        log.close()
        procs[strategy] = (proc, time.perf_counter())
    launches: dict[str, Launch] = {}
    deadline = time.perf_counter() + timeout
    for strategy, (proc, start) in procs.items():
        try:
            code = proc.wait(timeout=max(1.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        seconds = time.perf_counter() - start
        output = (out_dir / f"{strategy}.log").read_text(errors="replace")
        for run in runs_of(strategy):
            path = out_dir / f"{run}.json"
            results = json.loads(path.read_text()) if code == 0 and path.is_file() else None
            launches[run] = Launch(run, code, output, seconds, results)
    return launches


def load_results(directory: Path) -> dict[str, dict[str, Any]]:
    """The ``<run>.json`` files (:data:`ALL_RUNS`) of a finished matrix run in ``directory``."""
    found = {
        s: json.loads((directory / f"{s}.json").read_text()) for s in ALL_RUNS if (directory / f"{s}.json").is_file()
    }
    if not found:
        raise FileNotFoundError(f"no {', '.join(f'{s}.json' for s in ALL_RUNS)} in {directory}")
    return found


# ------------------------------------------------------------------------------------------------------------------
# Checks (shared by the test, which asserts them, and make_table.py, which reports them)
# ------------------------------------------------------------------------------------------------------------------

MIN_LOSS_DROP = 0.02
"""The uninterrupted run's last loss must be below ``(1 - MIN_LOSS_DROP)`` times its first."""
DDP_SINGLE_ATOL = 1e-4
"""Largest difference allowed between DDP's loss (mean over ranks) and the single-device loss, per step."""


def _max_abs(a: list[float], b: list[float]) -> float:
    if len(a) != len(b):
        return float("inf")
    return max((abs(x - y) for x, y in zip(a, b)), default=0.0)


def row_problems(row: Row, run: dict[str, Any]) -> list[str]:
    """Everything wrong with ``row``'s results in one strategy's JSON ``run``; empty when the row passes.

    A refused combination must raise the expected error on every rank before any step. Any other row, on every
    rank: trains ``MAX_STEPS`` steps on the fixed batch with finite losses, the last below ``1 - MIN_LOSS_DROP``
    times the first; its facts show each technique acted; the run resumed from the step-``RESUME_AT`` checkpoint
    sees the same batches and decisions, has the same losses (within ``LOSS_ATOL``) and ends with bit-identical
    weights and callback state. Under DDP, in addition, every rank ends both runs with bit-identical weights and
    callback state, made the same decisions, and trained on its own share of the batch.
    """
    row = row_for(row, run.get("strategy"))
    per_rank = run.get("rows", {}).get(row.id)
    if per_rank is None:
        return [f"no result for row {row.id!r} in the {run.get('strategy')} run"]
    world = int(run.get("world_size", 1))
    if len(per_rank) != world:
        return [f"{len(per_rank)} rank results for world size {world}"]
    problems: list[str] = []
    for rank, res in enumerate(per_rank):
        at = f"rank {rank}: " if world > 1 else ""
        err = res.get("error") or {}
        if row.error is not None:
            if res["status"] != "error":
                problems.append(f"{at}trained, but this combination must be refused at set-up")
                continue
            if err["type"] != row.error_type or not re.search(row.error, err["message"]):
                problems.append(
                    f"{at}expected {row.error_type} matching {row.error!r}, got {err['type']}: {err['message'][:400]}"
                )
            if err["global_step"] != 0:
                problems.append(f"{at}refused only at step {err['global_step']}, not at set-up")
            continue
        if res["status"] != "ok":
            problems.append(f"{at}{err.get('type')}: {err.get('message', '')[:600]}\n{err.get('traceback', '')}")
            continue
        full, resumed = res["full"], res["resumed"]
        if full["global_step"] != MAX_STEPS or full["steps"] != list(range(MAX_STEPS)):
            problems.append(
                f"{at}ran steps {full['steps']} (global_step {full['global_step']}), not 0..{MAX_STEPS - 1}"
            )
        if len(set(full["batches"])) != 1:
            problems.append(f"{at}the batch changed between steps: {full['batches']}")
        losses, lm = full["losses"], full["lm_losses"]
        if not all(math.isfinite(x) for x in losses + lm):
            problems.append(f"{at}non-finite loss: {losses} / LM {lm}")
        elif not lm or not lm[-1] < (1 - MIN_LOSS_DROP) * lm[0]:
            problems.append(f"{at}the loss did not fall by {MIN_LOSS_DROP:.0%} over {MAX_STEPS} steps: {lm}")
        facts = res["facts"]
        if facts.get("trained") is not True:
            problems.append(f"{at}no trainable parameter changed")
        wrong = {k: (facts.get(k), v) for k, v in row.expect.items() if facts.get(k) != v}
        if wrong:
            problems.append(f"{at}facts (got, expected): {wrong}")
        crashed = res["crashed"]
        crash = (crashed.get("error") or {}).get("message", "")
        if f"simulated crash at step {RESUME_AT}" not in crash:
            problems.append(f"{at}the interrupted run did not crash as planned at step {RESUME_AT}: {crash[:300]!r}")
        if crashed["steps"] != list(range(RESUME_AT)) or _max_abs(crashed["lm_losses"], lm[:RESUME_AT]) > LOSS_ATOL:
            problems.append(
                f"{at}the interrupted run's first steps differ from the uninterrupted run's: steps "
                f"{crashed['steps']}, LM losses {crashed['lm_losses']} vs {lm[:RESUME_AT]}"
            )
        if resumed["steps"] != list(range(RESUME_AT, MAX_STEPS)):
            problems.append(f"{at}the resumed run ran steps {resumed['steps']}, not {RESUME_AT}..{MAX_STEPS - 1}")
        if resumed["batches"] != full["batches"][RESUME_AT:]:
            problems.append(f"{at}the resumed run saw other batches")
        if resumed["probes"] != full["probes"][RESUME_AT:]:
            problems.append(
                f"{at}the resumed run decided otherwise: {resumed['probes']} vs {full['probes'][RESUME_AT:]}"
            )
        diff = max(_max_abs(resumed["losses"], losses[RESUME_AT:]), _max_abs(resumed["lm_losses"], lm[RESUME_AT:]))
        if diff > LOSS_ATOL:
            problems.append(
                f"{at}resumed losses differ by {diff:.3g}: {resumed['lm_losses']} vs {lm[RESUME_AT:]} (LM loss)"
            )
        if res["resume"]["differing"]:
            differing = res["resume"]["differing"]
            problems.append(
                f"{at}the resumed run ends with other weights or callback state (max |diff| "
                f"{res['resume']['state_max_abs_diff']:.3g}) in {len(differing)} entries: {differing[:8]}"
            )
    if world > 1 and row.error is None and all(r["status"] == "ok" for r in per_rank):
        first = per_rank[0]
        for rank, res in enumerate(per_rank[1:], start=1):
            for run_name in ("full", "resumed"):
                a, b = first[run_name]["state"], res[run_name]["state"]
                differing = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
                if differing:
                    problems.append(f"ranks 0 and {rank} differ after the {run_name} run in: {differing[:8]}")
                if first[run_name]["probes"] != res[run_name]["probes"]:
                    problems.append(f"ranks 0 and {rank} made other decisions in the {run_name} run")
            if first["facts"] != res["facts"]:
                problems.append(f"ranks 0 and {rank} report other facts: {first['facts']} vs {res['facts']}")
            if first["full"]["batches"][0] == res["full"]["batches"][0]:
                problems.append(f"ranks 0 and {rank} trained on the same data (each must take its own share)")
    return problems


def ddp_vs_single(row: Row, single: dict[str, Any], ddp: dict[str, Any]) -> float | None:
    """Largest per-step difference between DDP's LM loss (mean over the ranks) and the single-device LM loss of the
    uninterrupted run; None when either run has no losses for ``row``."""
    s_rows, d_rows = single.get("rows", {}).get(row.id), ddp.get("rows", {}).get(row.id)
    if not s_rows or not d_rows or any(r["status"] != "ok" for r in (*s_rows, *d_rows)):
        return None
    ranks = [r["full"]["lm_losses"] for r in d_rows]
    mean = [sum(step) / len(step) for step in zip(*ranks)]
    return _max_abs(mean, s_rows[0]["full"]["lm_losses"])
