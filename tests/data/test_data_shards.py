"""Tokenised memory-mapped shards: caching, atomic writes, dtype, packing and the document split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import lit_accel.data.datamodule as dm_module
from lit_accel.data import (
    PackedTokenDataset,
    TextDataModule,
    TokenShards,
    build_shards,
    load_documents,
    split_runs,
    train_bpe_tokenizer,
)


@pytest.fixture(scope="module")
def small_tok() -> Any:
    return train_bpe_tokenizer((t for _, t in load_documents("stdlib", max_corpus_bytes=200_000)), 400)


def test_cache_hit_does_not_retokenise(small_kwargs: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    dm = TextDataModule(**small_kwargs)
    dm.prepare_data()
    dm.setup("fit")
    tokens = dm._shards.tokens_path  # type: ignore[union-attr]
    mtime = tokens.stat().st_mtime_ns

    def boom(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("re-tokenised despite a cache hit")

    monkeypatch.setattr(dm_module, "build_shards", boom)
    monkeypatch.setattr(dm_module, "train_bpe_tokenizer", boom)
    dm2 = TextDataModule(**small_kwargs)
    dm2.prepare_data()
    dm2.setup("fit")
    assert tokens.stat().st_mtime_ns == mtime
    assert dm2.num_train_sequences == dm.num_train_sequences


def test_atomic_write_leaves_nothing_on_crash(tmp_path: Path, small_tok: Any) -> None:
    def docs() -> Any:
        yield from load_documents("stdlib", max_corpus_bytes=100_000)
        raise RuntimeError("crash while tokenising")

    out = tmp_path / "shards" / "key"
    with pytest.raises(RuntimeError, match="crash"):
        build_shards(docs(), small_tok, out, chunk_size=4, progress=False)
    assert not out.exists()
    assert not TokenShards.is_complete(out)
    assert list((tmp_path / "shards").iterdir()) == []


def test_tokens_dtype_content_and_packing(tmp_path: Path, small_tok: Any) -> None:
    docs = list(load_documents("stdlib", max_corpus_bytes=100_000))
    out = build_shards(docs, small_tok, tmp_path / "s", progress=False)
    shards = TokenShards(out)
    tokens = np.memmap(shards.tokens_path, dtype=shards.meta["dtype"], mode="r")
    assert tokens.dtype == np.uint16 and shards.meta["dtype"] == "uint16"
    assert shards.meta["num_documents"] == len(docs) and len(shards.offsets) == len(docs) + 1
    eos = small_tok.eos_token_id
    first = small_tok.backend_tokenizer.encode(docs[0][1], add_special_tokens=False).ids
    assert tokens[: shards.offsets[1]].tolist() == [*first, eos]
    assert all(tokens[o - 1] == eos for o in shards.offsets[1:])

    seq_len = 50
    train, val = shards.split(0.05, seq_len)
    for ds in (train, val):
        total = int(ds.runs[:, 1].sum())
        assert len(ds) == total // seq_len  # ragged tail dropped
        flat = np.concatenate([tokens[s : s + n] for s, n in ds.runs])
        got = np.concatenate([ds[i]["input_ids"].numpy() for i in range(len(ds))])
        assert ds[0]["input_ids"].shape == (seq_len,)
        assert np.array_equal(got, flat[: len(ds) * seq_len])
    with pytest.raises(IndexError):
        train[len(train)]
    limited = PackedTokenDataset(shards.tokens_path, "uint16", train.runs, seq_len, max_sequences=3)
    assert len(limited) == 3 and limited.num_tokens == 150


def test_split_is_by_document_and_disjoint(tmp_path: Path, small_tok: Any) -> None:
    out = build_shards(load_documents("stdlib", max_corpus_bytes=200_000), small_tok, tmp_path / "s", progress=False)
    shards = TokenShards(out)
    train, val = split_runs(shards.offsets, shards.doc_hash, 0.1, 32)
    starts = set(shards.offsets[:-1].tolist())
    ends = set(shards.offsets[1:].tolist())

    def covered(runs: np.ndarray) -> set[int]:
        return {t for s, n in runs for t in range(s, s + n)}

    for runs in (train, val):
        assert all(s in starts and s + n in ends for s, n in runs)  # runs are whole documents
    assert not covered(train) & covered(val)
    assert covered(train) | covered(val) == set(range(int(shards.offsets[-1])))
    again = split_runs(shards.offsets, shards.doc_hash, 0.1, 32)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], val)


def test_split_forces_one_val_sequence() -> None:
    offsets = np.array([0, 5, 100, 200])
    train, val = split_runs(offsets, np.array([0.3, 0.2, 0.9]), val_fraction=0.001, seq_len=50)
    assert val.tolist() == [[5, 95]] and train.tolist() == [[0, 5], [100, 100]]


def test_split_single_document() -> None:
    train, val = split_runs(np.array([0, 1000]), np.array([0.7]), val_fraction=0.1, seq_len=64)
    assert train.tolist() == [[0, 900]] and val.tolist() == [[900, 100]]


def test_split_too_small() -> None:
    with pytest.raises(ValueError, match=r"too small: it has 100 tokens.*seq_len=64 needs at least 64"):
        split_runs(np.array([0, 50, 100]), np.array([0.1, 0.9]), val_fraction=0.1, seq_len=64)
