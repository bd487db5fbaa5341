"""``python -m benchmarks``: run suites, write records, render the results.

    python -m benchmarks list                       # the suites and what each measures
    python -m benchmarks run                        # every suite, real sizes (a GPU machine)
    python -m benchmarks run step kernels           # some suites
    python -m benchmarks run step/hot_path --models llama-1b   # one result, one model preset
    python -m benchmarks run --smoke                # every suite at tiny sizes on any device (CI, on a CPU)
    python -m benchmarks run quality --allow-cpu --jobs 12 --wandb offline   # CPU-scale quality, 12 jobs at once
    python -m benchmarks render                     # benchmarks/RESULTS.md and the README table from the records
    python -m benchmarks render --check             # exit 1 when they differ from what the records give
    python -m benchmarks model [--check]            # docs/scaling.md: the scaling model's predictions (8-1024 GPUs)

Each suite runs in its own process (one suite's crash or out-of-memory does not take the others down); every row it
measures is appended at once to ``benchmarks/records/<suite>.jsonl`` (smoke runs: a temporary folder, never
rendered). The exit status is 1 when any suite failed.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

SUITES: dict[str, str] = {
    "step": "training step: CausalLM in Lightning vs the raw loop; HF eager vs torch.compile vs Liger vs our kernels",
    "kernels": "RMSNorm, SwiGLU, RoPE, fused linear + cross-entropy: ours vs Hugging Face vs Liger-Kernel",
    "dropbp": "DropBP: step time and memory vs dense, longest sequence, validation loss vs wall-clock",
    "lora": "LoRA: training step vs PEFT and the frozen-base floor; the fused LoRA linear; grouped q/k/v and gate/up",
    "sparse24": "2:4 sparsity: cuSPARSELt linears, the MLP block and the training step vs dense; cached plans",
    "pruning": "a pruned model's shape vs the original: training and inference tokens/s",
    "scaling": "tokens/s per GPU from 1 to N GPUs, dense and with each technique",
    "quality": "quality per unit of compute: val loss vs wall-clock and tokens, time to dense's loss, every technique",
}
"""Suite name -> what it measures; each is ``benchmarks/suites/<name>.py``."""

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
RECORDS = ROOT / "records"


def _command(argv: list[str]) -> str:
    return "python -m benchmarks " + " ".join(shlex.quote(a) for a in argv)


_LAUNCHER_VARIABLES = {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"}


def _launcher_variable(name: str) -> bool:
    # What a distributed launcher leaves in the environment (a torchrun, or an in-process DDP fit of the caller):
    # inherited by a suite, it makes Lightning take the suite's own multi-process runs for ranks of another job.
    return (
        name in _LAUNCHER_VARIABLES
        or name.startswith(("TORCHELASTIC_", "LOCAL_WORLD_", "ROLE_", "PL_TRAINER_"))
        or name in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")
    )


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    picked: dict[str, set[str] | None] = {}
    for item in args.suites or list(SUITES):
        suite, _, result = item.partition("/")
        if not result:
            picked[suite] = None  # the whole suite
        elif picked.get(suite, set()) is not None:
            picked.setdefault(suite, set()).add(result)  # type: ignore[union-attr]
    names = list(picked)
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        print(f"benchmarks: unknown suite(s) {', '.join(unknown)}; allowed: {', '.join(SUITES)}", file=sys.stderr)
        return 2
    if not args.smoke and not args.allow_cpu:
        import torch

        if not torch.cuda.is_available():
            print(
                "benchmarks: a real run needs a CUDA GPU and torch sees none; pass --smoke for the tiny CPU run"
                " (records kept apart), or --allow-cpu to time real sizes on the CPU anyway.",
                file=sys.stderr,
            )
            return 2
    if args.records is not None:
        records = Path(args.records)
    elif args.smoke:
        records = Path(tempfile.mkdtemp(prefix="lit_accel_bench_smoke_"))
    else:
        records = RECORDS
    run_id = uuid.uuid4().hex[:12]
    command = _command(argv)
    failed: list[str] = []
    env = {k: v for k, v in os.environ.items() if not _launcher_variable(k)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    if args.smoke:
        import torch

        if not torch.cuda.is_available():
            env.setdefault("TRITON_INTERPRET", "1")  # the Triton kernels run in triton's interpreter on a CPU
    for name in names:
        start = time.monotonic()
        print(f"== {name}: {SUITES[name]}", flush=True)
        one = [sys.executable, "-m", "benchmarks", "_one", name, "--records", str(records), "--run-id", run_id]
        one += ["--command", command] + (["--smoke"] if args.smoke else [])
        if picked[name]:
            one += ["--only", ",".join(sorted(picked[name] or ()))]
        if args.models:
            one += ["--models", args.models]
        one += ["--jobs", str(args.jobs)] + (["--wandb", args.wandb] if args.wandb else [])
        rc = subprocess.run(one, cwd=REPO, env=env).returncode
        took = time.monotonic() - start
        print(f"== {name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {took:.0f} s", flush=True)
        if rc != 0:
            failed.append(name)
    print(f"records: {records}")
    if failed:
        print(f"benchmarks: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _one(args: argparse.Namespace) -> int:
    import importlib

    from benchmarks.harness import Context

    module = importlib.import_module(f"benchmarks.suites.{args.suite}")
    only = set(args.only.split(",")) if args.only else None
    models = set(args.models.split(",")) if args.models else None
    ctx = Context(
        args.suite, args.smoke, Path(args.records), args.run_id, args.command, only, models, args.jobs, args.wandb
    )
    module.run(ctx)
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an int >= 1")
    return value


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="the suites")
    run = sub.add_parser("run", help="run suites and append their records")
    run.add_argument(
        "suites", nargs="*", help=f"SUITE or SUITE/RESULT to run (default: every suite): {', '.join(SUITES)}"
    )
    run.add_argument("--models", default=None, help="comma-separated presets, where a result measures several")
    run.add_argument("--smoke", action="store_true", help="tiny sizes on any device; records kept apart")
    run.add_argument("--records", default=None, help="records folder (default: benchmarks/records; smoke: a temp)")
    run.add_argument("--allow-cpu", action="store_true", help="time real sizes without a GPU")
    run.add_argument(
        "--jobs",
        type=_positive,
        default=1,
        help="independent CPU jobs a suite may run at once (quality), each on its own cores",
    )
    run.add_argument(
        "--wandb", choices=("offline", "online"), default=None, help="also log the quality curves to W&B (grouped runs)"
    )
    render = sub.add_parser("render", help="write RESULTS.md and the README table from the records")
    render.add_argument("--check", action="store_true", help="exit 1 when the files differ from the records'")
    model = sub.add_parser("model", help="write (--check: compare) docs/scaling.md's scaling-model tables")
    model.add_argument("--check", action="store_true", help="exit 1 when docs/scaling.md differs from the model's")
    one = sub.add_parser("_one")  # one suite in this process (what `run` starts per suite)
    one.add_argument("suite")
    one.add_argument("--records", required=True)
    one.add_argument("--run-id", required=True)
    one.add_argument("--command", required=True)
    one.add_argument("--smoke", action="store_true")
    one.add_argument("--only", default=None)
    one.add_argument("--models", default=None)
    one.add_argument("--jobs", type=_positive, default=1)
    one.add_argument("--wandb", choices=("offline", "online"), default=None)
    args = parser.parse_args(argv)
    if args.cmd == "list":
        width = max(map(len, SUITES))
        for name, what in SUITES.items():
            print(f"{name:<{width}}  {what}")
        return 0
    if args.cmd == "run":
        return _run(args, argv)
    if args.cmd == "_one":
        return _one(args)
    if args.cmd == "model":
        from benchmarks.scaling_docs import main as model

        return model(["--check"] if args.check else [])
    from benchmarks.render import render_all

    return render_all(check=args.check)


if __name__ == "__main__":
    sys.exit(main())
