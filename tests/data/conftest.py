"""Fixtures for the data tests: one session-wide cache so the small BPE and shards are built once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

SMALL = {"max_corpus_bytes": 1_000_000, "bpe_vocab_size": 1000, "bpe_train_bytes": 500_000}


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lit_accel_cache")


@pytest.fixture
def small_kwargs(shared_cache: Path) -> dict[str, Any]:
    """Arguments for a quick stdlib TextDataModule (1 MB of text, 1000-token BPE) in the shared cache."""
    return {**SMALL, "cache_dir": str(shared_cache), "seq_len": 64, "batch_size": 4}
