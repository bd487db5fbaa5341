"""Corpus discovery and reading: the stdlib default and user corpora in every supported format."""

from __future__ import annotations

import json
import sys
import sysconfig
from pathlib import Path

import pytest

from lit_accel.data import corpus_fingerprint, load_documents, stdlib_corpus_files
from lit_accel.data.corpus import validate_corpus


def test_stdlib_files_found_sorted_and_without_site_packages() -> None:
    files = stdlib_corpus_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [f.relative_to(root).as_posix() for f in files]
    assert len(files) > 500
    assert rel == sorted(rel)
    assert all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in r or "dist-packages" in r for r in rel)
    assert "os.py" in rel


def test_stdlib_documents_non_empty_and_limited() -> None:
    docs = list(load_documents("stdlib", max_corpus_bytes=50_000))
    assert docs and all(text for _, text in docs)
    assert sum(len(t.encode()) for _, t in docs) == 50_000
    names = [n for n, _ in docs]
    assert names == sorted(names)


def test_fingerprint_records_python_version(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    a = corpus_fingerprint("stdlib", max_corpus_bytes=20_000)
    assert a == corpus_fingerprint("stdlib", max_corpus_bytes=20_000)
    memo = corpus_fingerprint("stdlib", max_corpus_bytes=20_000, cache_dir=tmp_path)
    assert memo == a and list((tmp_path / "fingerprints").glob("*.json"))
    monkeypatch.setattr(sys, "version", sys.version + " (other build)")
    assert corpus_fingerprint("stdlib", max_corpus_bytes=20_000).fingerprint != a.fingerprint


def test_text_folder_walked_sorted_skipping_binary_and_hidden(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.md").write_text("# title\n")
    (tmp_path / "a.txt").write_text("hello\n")
    (tmp_path / "c.bin").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "d.txt").write_bytes(b"\xff\xfe not utf-8 \xc3")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / ".hidden.txt").write_text("secret")
    docs = list(load_documents(str(tmp_path)))
    assert docs == [("a.txt", "hello\n"), ("b/z.md", "# title\n")]


def test_single_text_file(tmp_path: Path) -> None:
    f = tmp_path / "book.txt"
    f.write_text("once upon a time")
    assert list(load_documents(str(f))) == [("book.txt", "once upon a time")]


def test_jsonl(tmp_path: Path) -> None:
    f = tmp_path / "data.jsonl"
    rows = [{"content": "first"}, {"content": ""}, {"content": "third", "other": 1}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert list(load_documents(str(f), text_field="content")) == [("data.jsonl:1", "first"), ("data.jsonl:3", "third")]
    with pytest.raises(ValueError, match="text_field='text'"):
        list(load_documents(str(f)))


def test_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    f = tmp_path / "data.parquet"
    pq.write_table(pa.table({"text": ["alpha", "beta", None], "n": [1, 2, 3]}), f)
    assert list(load_documents(str(f))) == [("data.parquet:0", "alpha"), ("data.parquet:1", "beta")]


def test_saved_dataset_and_dataset_dict(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["one", "two"]})
    ds.save_to_disk(str(tmp_path / "ds"))
    assert list(load_documents(str(tmp_path / "ds"))) == [("data:0", "one"), ("data:1", "two")]
    dd = datasets.DatasetDict({"train": ds, "test": datasets.Dataset.from_dict({"text": ["three"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert list(load_documents(str(tmp_path / "dd"))) == [("train:0", "one"), ("train:1", "two")]
    no_train = datasets.DatasetDict({"b": ds, "a": datasets.Dataset.from_dict({"text": ["three"]})})
    no_train.save_to_disk(str(tmp_path / "nt"))
    assert [n for n, _ in load_documents(str(tmp_path / "nt"))] == ["a:0", "b:0", "b:1"]


def test_validate_corpus_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"corpus=.*does not exist"):
        validate_corpus(str(tmp_path / "missing"))
    (tmp_path / "x.bin").write_bytes(b"abc")
    with pytest.raises(ValueError, match=r"corpus=.*unknown file type '\.bin'"):
        validate_corpus(str(tmp_path / "x.bin"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"corpus=.*no files"):
        validate_corpus(str(tmp_path / "empty"))
