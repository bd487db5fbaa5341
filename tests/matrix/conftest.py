"""The distributed test matrix's one run, shared by ``test_matrix.py`` and ``test_ranks.py``: every launch of
``matrix_worker.py`` (``matrix_common.LAUNCHES``) at the same time, once per pytest session.

Set ``LIT_ACCEL_MATRIX_DIR`` to keep the results (then ``python tests/matrix/make_table.py --results DIR``); with
``LIT_ACCEL_MATRIX_REUSE=1`` as well, the tests read the results kept there instead of running the matrix again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from matrix_common import ALL_RUNS, Launch, run_matrix


@pytest.fixture(scope="session")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Launch]:
    """Run -> the outcome of its launch (``matrix_common.ALL_RUNS``)."""
    kept = os.environ.get("LIT_ACCEL_MATRIX_DIR")
    out = Path(kept) if kept else tmp_path_factory.mktemp("matrix")
    if kept and os.environ.get("LIT_ACCEL_MATRIX_REUSE") == "1":
        found = {run: out / f"{run}.json" for run in ALL_RUNS}
        return {
            run: Launch(run, 0, f"kept in {out}", 0.0, json.loads(p.read_text()) if p.is_file() else None, out)
            for run, p in found.items()
        }
    return run_matrix(out, timeout=500)
