"""The distributed test matrix: its rows, its runs (a strategy on a process layout), the tiny model and fixed batch,
and the launchers of the worker.

Shared by ``matrix_worker.py`` (which trains every row), the tests (which assert on the worker's JSON) and
``make_table.py`` (which turns that JSON into ``docs/compatibility.md``). Importing it imports ``lit_accel`` once, to
ask whether ZeRO-3 refuses StructuredPruning (:data:`ZERO3_REFUSES_PRUNING`); the rows' callbacks are built by
:data:`ROWS`' factories, in the worker.

The runs (:data:`RUNS`) are ``single`` (one CPU device); ``ddp`` (``lit_ddp``: Lightning's DDP with gradients as
bucket views, over gloo) and ``zero1``..``zero3`` (``LitDeepSpeedStrategy`` in fp32 on DeepSpeed's CPU accelerator
over gloo) with 2 processes, every row; the same four with 4 processes (``ddp-4``, ``zero1-4`` ...), the
single-technique rows (:data:`WIDE_ROWS`); and ZeRO-1/2/3 on 2 "nodes" x 2 processes on localhost (``zero1-2x2``
...), :data:`NODE_ROWS`. One launch trains several runs one after the other (Trainer start-up and process-group
set-up are paid once, not per row), :data:`LAUNCHES`:

- ``single``: ``python matrix_worker.py single OUT BASE``;
- ``ddp``, ``deepspeed`` (zero1, zero2, zero3) and ``ranks4`` (ddp-4, zero1-4, zero2-4, zero3-4):
  ``python -m torch.distributed.run --standalone --nproc_per_node N matrix_worker.py LAUNCH OUT BASE``;
- ``nodes2x2`` (zero1-2x2, zero2-2x2, zero3-2x2): that launcher twice at once, as two machines would run it
  (:func:`worker_commands`): ``--nnodes 2 --nproc-per-node 2`` with a c10d rendezvous on ``127.0.0.1``. Lightning
  reads each process's node, local and global rank from torchrun's environment (``TorchElasticEnvironment``); the
  Trainer says ``num_nodes=2, devices=2``.

Each run writes ``OUT/<run>.json``: ``{"strategy": run, "world_size", "seconds", "versions", "rows": {row id: [result
of rank 0, result of rank 1, ...]}}``, the per-rank results gathered on rank 0
with ``all_gather_object``; the rows' checkpoints, the uninterrupted run's final weights (``final.pt``) and LoRA's
exports go to ``OUT/<run>/<row id>/``. What a result holds is described in ``matrix_worker.py``.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from _helpers import DDP_PROCESSES, REPO, torchrun_command, worker_env

HERE = Path(__file__).resolve().parent
WORKER = HERE / "matrix_worker.py"

WIDE_PROCESSES = 4
"""Processes of the wider runs (``ddp-4``, ``zero1-4`` ...; ``2 x 2`` for the two-node runs)."""
WIDE_ROWS: tuple[str, ...] = ("dense", "dropbp", "sparse24", "pruning", "lora", "factorize", "throughput", "kernels")
"""The rows the 4-process runs train: every technique alone (the pairs run with 2 processes)."""
WIDE_RESUME_ROWS: tuple[str, ...] = ("dense",)
"""The rows the 4-process runs also crash and resume (4 optimizer shards under ZeRO; DDP's bucket order)."""
NODE_ROWS: tuple[str, ...] = ("dropbp+lora",)
"""The rows the two-node runs train: DropBP's agreement and LoRA's adapter-only checkpoints and exports."""
DEEPSPEED_STAGES: tuple[int, ...] = (1, 2, 3)


@dataclass(frozen=True)
class Run:
    """One column of the matrix: a strategy on a process layout, and the rows it trains."""

    name: str
    """The JSON file's name and the key of the results."""
    strategy: str
    """``single``, ``ddp`` or ``zero1`` / ``zero2`` / ``zero3`` (what ``matrix_worker.make_strategy`` builds)."""
    nodes: int = 1
    """The Trainer's ``num_nodes``."""
    devices: int = 1
    """Processes per node (the Trainer's ``devices``)."""
    rows: tuple[str, ...] | None = None
    """The ids of the rows it trains (None: every row)."""
    resume_rows: tuple[str, ...] | None = None
    """The rows whose crashed and resumed runs it also trains (None: every row); the other rows' uninterrupted run
    writes the step-:data:`RESUME_AT` checkpoint itself, which the facts read."""

    def resumes(self, row_id: str) -> bool:
        """Whether this run trains ``row_id``'s crashed and resumed runs."""
        return self.resume_rows is None or row_id in self.resume_rows

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices

    @property
    def stage(self) -> int | None:
        """The ZeRO stage, or None for a run without DeepSpeed."""
        return int(self.strategy[len("zero") :]) if self.strategy.startswith("zero") else None


_RUNS = (
    Run("single", "single"),
    Run("ddp", "ddp", devices=DDP_PROCESSES),
    *(Run(f"zero{s}", f"zero{s}", devices=DDP_PROCESSES) for s in DEEPSPEED_STAGES),
    *(
        Run(f"{name}-{WIDE_PROCESSES}", name, devices=WIDE_PROCESSES, rows=WIDE_ROWS, resume_rows=WIDE_RESUME_ROWS)
        for name in ("ddp", *(f"zero{stage}" for stage in DEEPSPEED_STAGES))
    ),
    *(Run(f"zero{s}-2x2", f"zero{s}", nodes=2, devices=2, rows=NODE_ROWS) for s in DEEPSPEED_STAGES),
)
RUNS: dict[str, Run] = {run.name: run for run in _RUNS}
ALL_RUNS: tuple[str, ...] = tuple(RUNS)
TWO_PROCESS_RUNS: tuple[str, ...] = ("single", "ddp", *(f"zero{s}" for s in DEEPSPEED_STAGES))
"""The columns of the main table: one device, then DDP and ZeRO-1/2/3 with :data:`DDP_PROCESSES` processes."""
DEEPSPEED_RUNS: tuple[str, ...] = tuple(r.name for r in _RUNS if r.stage is not None)
WIDER_RUNS: tuple[str, ...] = tuple(r for r in ALL_RUNS if r not in TWO_PROCESS_RUNS)
"""The columns of the second table: 4 processes, and 2 nodes x 2 processes."""
LAUNCHES: dict[str, tuple[str, ...]] = {
    "single": ("single",),
    "ddp": ("ddp",),
    "deepspeed": tuple(f"zero{s}" for s in DEEPSPEED_STAGES),
    "ranks4": tuple(r.name for r in _RUNS if r.world_size == WIDE_PROCESSES and r.nodes == 1),
    "nodes2x2": tuple(r.name for r in _RUNS if r.nodes == 2),
}
"""Launch -> the runs it trains, one after the other (all of a launch's runs share its process layout)."""

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
DDP_RESUME_ATOL = 1e-6
"""DDP with more than 2 processes: largest difference allowed between the resumed run's final weights and the
uninterrupted run's (everywhere else they must be bit-identical). DDP rebuilds its gradient buckets in the order the
gradients became ready after its first step, but a resumed run's first step still uses the initial buckets, so
gloo's ring all-reduce sums some elements' contributions from the ranks in another order: with more than two ranks
that changes the last bits (with two, ``a + b == b + a``). DropBP's rows are exact there too: with
``find_unused_parameters=True`` DDP never rebuilds its buckets."""
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
    """Whether a multi-process run (DDP or DeepSpeed) must follow the single-device run on the whole batch: its loss
    (mean over the ranks' shares of the batch) and its final weights. False for DropBP: each rank measures the
    sensitivities on its share and they are averaged, which is not the whole batch's measurement, so the allocated
    rates (hence the masks) may legitimately differ."""
    near_ties: bool = False
    """Whether the row decides by comparing magnitudes that can tie within rounding: a transposable 2:4 mask is the
    best-scoring of several patterns per 4x4 block, and two patterns can score within 1e-7 (under ZeRO-3 one block
    of 3000 flips at the step-5 refresh: scores 0.05814782 vs 0.05814775 on one device, the other way round there).
    A multi-process run then follows the single-device run only up to the first decision that differs."""
    export: bool = False
    """Whether the uninterrupted run's LoRA also writes its PEFT adapter and the merged model at the end of training
    (``export="both"`` to ``<row dir>/export``)."""


_DROPBP_FACTS = {"dropbp.measured": True, "dropbp.dropped_some_sublayers": True, "dropbp.grads_skipped": True}
_SPARSE_FACTS = {"sparse24.layers": 6, "sparse24.phase": "sparse", "sparse24.refreshes": 3}
_LORA_ALL = {"lora.layers": N_LINEARS, "lora.other_trainable": 0, "lora.checkpoint_adapter_only": True}
_LORA_MLP = {**_LORA_ALL, "lora.layers": 6}
_FACTORIZE_FACTS = {"factorize.layers": 8, "factorize.factors_trainable": True, "factorize.checkpoint_ranks": True}

ROWS: tuple[Row, ...] = (
    Row("dense", "none (plain CausalLM)", lambda: []),
    Row("dropbp", "DropBP", lambda: [_dropbp()], dict(_DROPBP_FACTS), ddp_equals_single=False),
    Row("sparse24", "SemiStructuredSparsity (2:4)", lambda: [_sparse24()], dict(_SPARSE_FACTS), near_ties=True),
    Row(
        "pruning",
        "StructuredPruning",
        lambda: [_pruning()],
        {"pruning.masks_in_state_dict": True, "pruning.masks_moved": True, "pruning.checkpoint_record": True},
    ),
    Row("lora", "LoRA", lambda: [_lora()], dict(_LORA_ALL), export=True),
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
        {
            "kernels.patched": {"linear_cross_entropy": 1, "rms_norm": 5, "rope": 2, "swiglu": 2},
            "kernels.lm_head_forwards": 0,
        },
    ),
    Row(
        "dropbp+lora",
        "DropBP + LoRA",
        lambda: [_dropbp(), _lora()],
        {**_DROPBP_FACTS, **_LORA_ALL},
        ddp_equals_single=False,
        export=True,
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


def rows_of(run: str) -> tuple[Row, ...]:
    """The rows ``run`` (a key of :data:`RUNS`) trains, in :data:`ROWS` order."""
    wanted = RUNS[run].rows
    return ROWS if wanted is None else tuple(row for row in ROWS if row.id in wanted)


RUN_ROWS: tuple[tuple[str, Row], ...] = tuple((run, row) for run in ALL_RUNS for row in rows_of(run))
"""Every (run, row) the matrix trains."""

# ------------------------------------------------------------------------------------------------------------------
# What changes under DeepSpeed (the zero1/zero2/zero3 runs)
# ------------------------------------------------------------------------------------------------------------------


def _zero3_refuses_pruning() -> bool:
    """Whether ``LitDeepSpeedStrategy``'s conflict check refuses StructuredPruning under ZeRO-3. Older versions of
    lit_accel did; StructuredPruning now gathers its partitioned masks and multipliers and trains there. The matrix
    judges either way: a clean set-up refusal on every rank, or every check of a row that trains."""
    from lit_accel.callbacks import StructuredPruning
    from lit_accel.strategies.conflicts import check_callback_conflicts

    try:
        check_callback_conflicts({"zero_optimization": {"stage": 3}}, [StructuredPruning(param_ratio=0.5)])
    except ValueError:
        return True
    return False


ZERO3_REFUSES_PRUNING = _zero3_refuses_pruning()
_ZERO3_PRUNING = r"zero_optimization\.stage=3 conflicts with callback StructuredPruning"
DEEPSPEED_REFUSED: dict[tuple[str, int], str] = {
    # LitDeepSpeedStrategy's conflict check (setup_environment) runs before the callbacks' own pair checks.
    **{(row_id, 3): _ZERO3_PRUNING for row_id in ("pruning", "pruning+lora", "pruning+sparse24")},
}
if not ZERO3_REFUSES_PRUNING:
    DEEPSPEED_REFUSED.clear()
"""(row, ZeRO stage) -> the set-up ``ValueError`` (regex) a row refuses DeepSpeed with, where it differs from the
row's own :attr:`Row.error`: StructuredPruning refuses ZeRO-3."""

DEEPSPEED_FACTS: dict[tuple[str, int], dict[str, Any]] = {
    # ZeRO-3 reduces the gradients into its flat fp32 partitions: the optimizer's parameters are those partitions,
    # whose .grad is always set, so "a parameter had no gradient" cannot be observed there (the drop mask still is).
    **{(row_id, 3): {"dropbp.grads_skipped": None} for row_id in ("dropbp", "dropbp+lora", "dropbp+sparse24")},
}
"""(row, ZeRO stage) -> changes to the row's expected facts under DeepSpeed (None: not checked there)."""

KNOWN_FAILURES: dict[tuple[str, str], tuple[str, str]] = {}
"""(row, run) -> (a short line for the table, why the row fails there): real failures of lit_accel under DeepSpeed,
found by this matrix and not fixed yet. Their tests are xfailed with the reason; the table shows them failing."""


def row_for(row: Row, run: str | None) -> Row:
    """``row`` as judged under ``run`` (a key of :data:`RUNS`): its DeepSpeed refusal and facts."""
    stage = RUNS[run].stage if run in RUNS else None
    if stage is None:
        return row
    error = DEEPSPEED_REFUSED.get((row.id, stage), row.error)
    expect = {**row.expect, **DEEPSPEED_FACTS.get((row.id, stage), {})}
    expect = {k: v for k, v in expect.items() if v is not None}
    error_type = "ValueError" if (row.id, stage) in DEEPSPEED_REFUSED else row.error_type
    return replace(row, error=error, expect=expect, error_type=error_type)


# ------------------------------------------------------------------------------------------------------------------
# Launching the worker
# ------------------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker_commands(launch: str, out_dir: Path, base_dir: Path) -> list[list[str]]:
    """The command lines that run ``launch`` (a key of :data:`LAUNCHES`), all started at once: one, or one per node
    for the two-node launch (torchrun's c10d rendezvous on a free local port; the first command hosts its store)."""
    runs = [RUNS[r] for r in LAUNCHES[launch]]
    nodes, devices = runs[0].nodes, runs[0].devices
    args = (WORKER, launch, out_dir, base_dir)
    if runs[0].strategy == "single":
        return [[sys.executable, *map(str, args)]]
    if nodes == 1:
        return [torchrun_command(*args, nproc=devices)]
    endpoint = f"127.0.0.1:{_free_port()}"
    rdzv = ["--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", f"matrix-{launch}"]
    return [
        [
            *(sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc-per-node", str(devices)),
            *(*rdzv, "--rdzv-conf", f"is_host={str(node == 0).lower()}"),
            *map(str, args),
        ]
        for node in range(nodes)
    ]


@dataclass
class Launch:
    """The outcome of one worker launch."""

    strategy: str
    returncode: int
    output: str
    seconds: float
    results: dict[str, Any] | None
    """The worker's JSON, or None when it wrote none."""
    directory: Path
    """The results directory (``<run>/<row id>/`` holds each row's files)."""

    def failure(self) -> str:
        """Why the launch gave no results (for an assertion message)."""
        return f"{self.strategy} worker exited {self.returncode} after {self.seconds:.0f} s:\n{self.output[-8000:]}"


def run_matrix(out_dir: Path, launches: tuple[str, ...] = tuple(LAUNCHES), timeout: float = 600) -> dict[str, Launch]:
    """Starts every launch (:data:`LAUNCHES`) at the same time and returns the outcome of each run (keyed as
    :data:`ALL_RUNS`; the runs of one launch share its exit status, output and time)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    base = make_base(out_dir / "base")
    procs: dict[str, tuple[list[subprocess.Popen[str]], float]] = {}
    for launch in launches:
        # A kept results directory may hold an earlier run: ModelCheckpoint would not overwrite its checkpoints.
        for run in LAUNCHES[launch]:
            shutil.rmtree(out_dir / run, ignore_errors=True)
            (out_dir / f"{run}.json").unlink(missing_ok=True)
        started = []
        # DeepSpeed imports a module that calls torch.compile at import time, which loads the inductor compiler:
        # about 6 s of CPU per process, for nothing (neither the matrix nor lit_accel compiles anything).
        env = worker_env(TORCHDYNAMO_DISABLE="1")
        for i, cmd in enumerate(worker_commands(launch, out_dir, base)):
            log = open(out_dir / f"{launch}.{i}.log", "w")  # noqa: SIM115  # closed when the process is collected
            started.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True))
            log.close()
        procs[launch] = (started, time.perf_counter())
    outcomes: dict[str, Launch] = {}
    deadline = time.perf_counter() + timeout
    for launch, (started, start) in procs.items():
        codes = []
        for proc in started:
            try:
                codes.append(proc.wait(timeout=max(1.0, deadline - time.perf_counter())))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(proc.wait())
        seconds = time.perf_counter() - start
        code = next((c for c in codes if c != 0), 0)
        output = "\n".join((out_dir / f"{launch}.{i}.log").read_text(errors="replace") for i in range(len(started)))
        for run in LAUNCHES[launch]:
            path = out_dir / f"{run}.json"
            results = json.loads(path.read_text()) if code == 0 and path.is_file() else None
            outcomes[run] = Launch(run, code, output, seconds, results, out_dir)
    return outcomes


def results_of(matrix: dict[str, Launch], run: str) -> dict[str, Any]:
    """The JSON of ``run`` in the matrix fixture's outcome; fails the test with the launch's output when missing."""
    launch = matrix[run]
    assert launch.results is not None, launch.failure()
    return launch.results


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
SINGLE_LOSS_ATOL = 1e-4
"""Largest difference allowed between a multi-process run's LM loss (mean over the ranks) and the single-device LM
loss, per step (fp32; the ranks' shares of the batch are equal, so the mean of their losses is the whole batch's)."""
SINGLE_WEIGHTS_ATOL = 5e-4
"""Largest difference allowed between an element of a multi-process run's final weights and the single-device run's
(fp32, after :data:`MAX_STEPS` AdamW steps at lr :data:`LEARNING_RATE`; measured up to 1.3e-4). The reductions sum
in another order, and where an element's gradient is near zero AdamW's normalised update magnifies that rounding;
a twentieth of one step's size (lr) still catches a rank's contribution lost or counted twice."""


def _max_abs(a: list[float], b: list[float]) -> float:
    if len(a) != len(b):
        return float("inf")
    return max((abs(x - y) for x, y in zip(a, b)), default=0.0)


def _resume_problems(res: dict[str, Any], spec: Run | None) -> list[str]:
    """What is wrong with one rank's crashed and resumed runs (see :func:`row_problems`)."""
    problems: list[str] = []
    full, resumed = res["full"], res["resumed"]
    losses, lm = full["losses"], full["lm_losses"]
    crashed = res["crashed"]
    crash = (crashed.get("error") or {}).get("message", "")
    if f"simulated crash at step {RESUME_AT}" not in crash:
        problems.append(f"the interrupted run did not crash as planned at step {RESUME_AT}: {crash[:300]!r}")
    if crashed["steps"] != list(range(RESUME_AT)) or _max_abs(crashed["lm_losses"], lm[:RESUME_AT]) > LOSS_ATOL:
        problems.append(
            f"the interrupted run's first steps differ from the uninterrupted run's: steps "
            f"{crashed['steps']}, LM losses {crashed['lm_losses']} vs {lm[:RESUME_AT]}"
        )
    if resumed["steps"] != list(range(RESUME_AT, MAX_STEPS)):
        problems.append(f"the resumed run ran steps {resumed['steps']}, not {RESUME_AT}..{MAX_STEPS - 1}")
    if resumed["batches"] != full["batches"][RESUME_AT:]:
        problems.append("the resumed run saw other batches")
    if resumed["probes"] != full["probes"][RESUME_AT:]:
        problems.append(f"the resumed run decided otherwise: {resumed['probes']} vs {full['probes'][RESUME_AT:]}")
    diff = max(_max_abs(resumed["losses"], losses[RESUME_AT:]), _max_abs(resumed["lm_losses"], lm[RESUME_AT:]))
    if diff > LOSS_ATOL:
        problems.append(f"resumed losses differ by {diff:.3g}: {resumed['lm_losses']} vs {lm[RESUME_AT:]} (LM loss)")
    differing = res["resume"]["differing"]
    ddp_order = spec is not None and spec.strategy == "ddp" and spec.world_size > 2
    if ddp_order and all(k.startswith("module/") for k in differing):
        # Not bit-exact there: see DDP_RESUME_ATOL.
        if res["resume"]["state_max_abs_diff"] > DDP_RESUME_ATOL:
            problems.append(
                f"the resumed run's weights differ by {res['resume']['state_max_abs_diff']:.3g} (> {DDP_RESUME_ATOL:g})"
            )
    elif differing:
        problems.append(
            f"the resumed run ends with other weights or callback state (max |diff| "
            f"{res['resume']['state_max_abs_diff']:.3g}) in {len(differing)} entries: {differing[:8]}"
        )
    return problems


def row_problems(row: Row, run: dict[str, Any]) -> list[str]:
    """Everything wrong with ``row``'s results in one strategy's JSON ``run``; empty when the row passes.

    A refused combination must raise the expected error on every rank before any step. Any other row, on every
    rank: trains ``MAX_STEPS`` steps on the fixed batch with finite losses, the last below ``1 - MIN_LOSS_DROP``
    times the first; its facts show each technique acted; the run resumed from the step-``RESUME_AT`` checkpoint
    (where the run resumes the row, :meth:`Run.resumes`) sees the same batches and decisions, has the same losses
    (within ``LOSS_ATOL``) and ends with bit-identical weights and callback state (DDP with more than 2 processes:
    within ``DDP_RESUME_ATOL``). With several processes, in addition, every rank ends both runs with bit-identical
    weights and callback state, made the same decisions, had the same gradients after the all-reduce (without
    DeepSpeed), and trained on its own share of the batch.
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
        full = res["full"]
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
        spec = RUNS.get(str(run.get("strategy")))
        if spec is None or spec.resumes(row.id):
            problems += [at + p for p in _resume_problems(res, spec)]
    if world > 1 and row.error is None and all(r["status"] == "ok" for r in per_rank):
        first = per_rank[0]
        for rank, res in enumerate(per_rank[1:], start=1):
            for run_name in ("full", "resumed"):
                if first[run_name] is None or res[run_name] is None:
                    continue  # a row this run does not resume
                a, b = first[run_name]["state"], res[run_name]["state"]
                differing = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
                if differing:
                    problems.append(f"ranks 0 and {rank} differ after the {run_name} run in: {differing[:8]}")
                if first[run_name]["probes"] != res[run_name]["probes"]:
                    problems.append(f"ranks 0 and {rank} made other decisions in the {run_name} run")
            if first["facts"] != res["facts"]:
                problems.append(f"ranks 0 and {rank} report other facts: {first['facts']} vs {res['facts']}")
            a, b = first["full"].get("grad_digests"), res["full"].get("grad_digests")
            if a is not None and b is not None and a != b:
                steps = [i for i, (x, y) in enumerate(zip(a, b)) if x != y] if len(a) == len(b) else "all"
                problems.append(f"ranks 0 and {rank} had other gradients after the all-reduce at steps {steps}")
        if len({res["full"]["batches"][0] for res in per_rank}) != world:
            problems.append("two ranks trained on the same data (each must take its own share)")
    return problems


def loss_vs_single(row: Row, single: dict[str, Any], run: dict[str, Any], steps: int = MAX_STEPS) -> float | None:
    """Largest difference over the first ``steps`` steps between ``run``'s LM loss and the single-device LM loss of
    the uninterrupted run, each the mean over its ranks (the ranks' shares of the batch are equal, so that is the
    whole batch's loss; any run may stand in for ``single``); None when either run has no losses for ``row``."""
    s_rows, d_rows = single.get("rows", {}).get(row.id), run.get("rows", {}).get(row.id)
    if not s_rows or not d_rows or any(r["status"] != "ok" for r in (*s_rows, *d_rows)):
        return None

    def mean(per_rank: list[dict[str, Any]]) -> list[float]:
        return [sum(step) / len(step) for step in zip(*(r["full"]["lm_losses"] for r in per_rank))]

    return _max_abs(mean(d_rows)[:steps], mean(s_rows)[:steps])


def final_weights_path(directory: Path, run: str, row_id: str) -> Path:
    """The uninterrupted run's final weights (whole, rank 0's), which the worker saves for every row that trains."""
    return directory / run / row_id / "final.pt"


def load_weights(path: Path) -> dict[str, Any]:
    """A state dict the worker saved (tensors only)."""
    import torch

    return dict(torch.load(path, map_location="cpu", weights_only=True))


def weights_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Largest elementwise difference between two state dicts; inf when their keys, shapes or integer entries
    differ."""
    import torch

    if a.keys() != b.keys():
        return float("inf")
    worst = 0.0
    for k, va in a.items():
        vb = b[k]
        if va.shape != vb.shape:
            return float("inf")
        if not va.is_floating_point():
            if not torch.equal(va, vb):
                return float("inf")
        elif va.numel():
            worst = max(worst, float((va.double() - vb.double()).abs().max()))
    return worst


def weights_vs_single(row: Row, directory: Path, run: str) -> float | None:
    """Largest difference between ``run``'s final weights and the single-device run's; None when either is missing."""
    mine, single = final_weights_path(directory, run, row.id), final_weights_path(directory, "single", row.id)
    if not mine.is_file() or not single.is_file():
        return None
    return weights_diff(load_weights(mine), load_weights(single))
