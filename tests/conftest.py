"""Shared test set-up: deterministic seeds, CPU threads, GPU marker skipping."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _sparse_warnings_per_test() -> None:
    # SparseLinear warns once per reason and process; each test starts as a fresh process would.
    gemm = sys.modules.get("lit_accel.ops.sparse24_gemm")
    if gemm is not None:
        gemm._WARNED_REASONS.clear()


@pytest.fixture(autouse=True)
def _no_wandb_run_left_behind() -> Iterator[None]:
    # Lightning's WandbLogger adopts a run still open in the process: a test that left one would make the next
    # test's logger write into the previous test's run folder.
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_multi = pytest.mark.skip(reason="needs two or more CUDA GPUs")
    has_gpu = torch.cuda.is_available()
    n_gpu = torch.cuda.device_count() if has_gpu else 0
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)
        if "multigpu" in item.keywords and n_gpu < 2:
            item.add_marker(skip_multi)


@pytest.fixture
def run_in_triton_interpreter() -> Callable[[str, float], None]:
    """Runs the ``interp`` tests of a test file in a child pytest with ``TRITON_INTERPRET=1``.

    The interpreter setting is read when triton is first imported, which torch and lightning do before any test
    module loads, so setting the variable inside this process has no effect.
    """

    def run(test_file: str, timeout: float = 600) -> None:
        pytest.importorskip("triton")
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        cmd = [sys.executable, "-m", "pytest", test_file, "-q", "-x", "-p", "no:cacheprovider", "-k", "interp"]
        root = Path(__file__).resolve().parents[1]
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]

    return run
