"""Finding and reading the documents of a text corpus.

A corpus is one of:

* ``"stdlib"``: the ``.py`` files of the running interpreter's standard library (no download needed);
* a text file (``.txt``, ``.md``, ``.py``, ... see :data:`TEXT_SUFFIXES`): one document;
* a ``.jsonl`` file: one document per line, taken from the field ``text_field``;
* a ``.parquet`` file: one document per row, taken from the column ``text_field`` (needs ``pyarrow``);
* a folder saved by ``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (needs ``datasets``);
  of a ``DatasetDict`` the ``"train"`` split is used when it has one, otherwise all splits in sorted order;
* any other folder: walked recursively in sorted order; ``.jsonl`` and ``.parquet`` files are read as above, every
  other file is read as UTF-8 text, and files that are binary or not valid UTF-8 (and hidden files/folders) are
  skipped.

Documents are ``(name, text)`` pairs in a deterministic order. Names are unique within a corpus (a relative path,
``path:line`` for JSONL, ``path:row`` for parquet, ``split:index`` for datasets) and decide the train/val split.

Example:
    >>> from lit_accel.data import load_documents
    >>> name, text = next(iter(load_documents("stdlib")))
    >>> name.endswith(".py")
    True
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "STDLIB",
    "TEXT_SUFFIXES",
    "CorpusInfo",
    "cap_bytes",
    "corpus_fingerprint",
    "is_saved_dataset",
    "list_corpus_files",
    "load_documents",
    "stdlib_corpus_files",
    "validate_corpus",
]

STDLIB = "stdlib"
"""The name of the built-in corpus."""

TEXT_SUFFIXES: frozenset[str] = frozenset(
    {
        ".txt", ".text", ".md", ".markdown", ".rst", ".tex", ".org", ".adoc", ".py", ".pyi", ".c", ".h", ".cc",
        ".cpp", ".hpp", ".cu", ".rs", ".go", ".java", ".js", ".ts", ".jsx", ".tsx", ".rb", ".php", ".sh", ".lua",
        ".jl", ".r", ".scala", ".kt", ".swift", ".hs", ".ml", ".sql", ".html", ".htm", ".xml", ".css", ".json",
        ".yaml", ".yml", ".toml", ".ini", ".cfg", ".csv", ".tsv", ".log",
    }
)  # fmt: skip
"""Suffixes accepted for a corpus given as a single text file (a folder accepts any UTF-8 file)."""

_JSONL_SUFFIXES = frozenset({".jsonl"})
_PARQUET_SUFFIXES = frozenset({".parquet"})
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_FINGERPRINT_VERSION = 1


def stdlib_corpus_files() -> list[Path]:
    """List the ``.py`` files of the running interpreter's standard library, sorted.

    ``site-packages``/``dist-packages`` (third-party code) and ``__pycache__`` are excluded.

    Returns:
        The absolute paths, sorted by their path relative to the standard library root.

    Example:
        >>> files = stdlib_corpus_files()
        >>> any(f.name == "os.py" for f in files)
        True
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def is_saved_dataset(path: str | os.PathLike[str]) -> bool:
    """Tell whether ``path`` is a folder written by ``datasets``' ``save_to_disk``.

    Example:
        >>> is_saved_dataset("/nonexistent")
        False
    """
    p = Path(path)
    return p.is_dir() and (
        (p / "dataset_dict.json").is_file() or ((p / "state.json").is_file() and (p / "dataset_info.json").is_file())
    )


def _is_hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def list_corpus_files(corpus: str) -> list[Path]:
    """List the files a corpus is read from, in reading order.

    Args:
        corpus: ``"stdlib"``, a file, or a folder (see the module docstring).

    Returns:
        The files. For a ``save_to_disk`` folder, every file inside it (used only for the change signature).

    Example:
        >>> len(list_corpus_files("stdlib")) > 100
        True
    """
    if corpus == STDLIB:
        return stdlib_corpus_files()
    root = Path(corpus)
    if root.is_file():
        return [root]
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
        files.extend(Path(dirpath) / f for f in filenames if not f.startswith("."))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def validate_corpus(corpus: str) -> None:
    """Check a corpus argument without reading the documents.

    Raises:
        ValueError: if the path does not exist, is a single file of an unknown type, or is a folder with no files.

    Example:
        >>> validate_corpus("stdlib")
    """
    if corpus == STDLIB:
        return
    p = Path(corpus)
    if not p.exists():
        raise ValueError(
            f"corpus={corpus!r} does not exist; pass 'stdlib' (the built-in corpus), a text/.jsonl/.parquet file, "
            "a folder of such files, or a folder written by datasets' save_to_disk."
        )
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix not in TEXT_SUFFIXES | _JSONL_SUFFIXES | _PARQUET_SUFFIXES:
            raise ValueError(
                f"corpus={corpus!r} has an unknown file type {suffix or '(no suffix)'!r}; a single-file corpus must be "
                f".jsonl, .parquet or a text file with one of the suffixes {sorted(TEXT_SUFFIXES)}."
            )
    elif p.is_dir():
        if not is_saved_dataset(p) and not list_corpus_files(corpus):
            raise ValueError(f"corpus={corpus!r} is a folder with no files; it must contain text to train on.")
    else:
        raise ValueError(f"corpus={corpus!r} is neither a file nor a folder.")


def _read_text_file(path: Path, strict: bool) -> str | None:
    data = path.read_bytes()
    if not strict:
        return data.decode("utf-8", errors="replace")
    if b"\x00" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _iter_jsonl(path: Path, name: str, text_field: str) -> Iterator[tuple[str, str]]:
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno} is not valid JSON: {e}") from e
            if not isinstance(record, dict) or text_field not in record:
                raise ValueError(f"{path}:{lineno} has no field text_field={text_field!r}.")
            text = record[text_field]
            if isinstance(text, str) and text:
                yield f"{name}:{lineno}", text


def _iter_parquet(path: Path, name: str, text_field: str) -> Iterator[tuple[str, str]]:
    import pyarrow.parquet as pq  # deferred: pyarrow is optional (the datasets extra), needed only for .parquet

    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        raise ValueError(f"{path} has no column text_field={text_field!r}; columns: {pf.schema_arrow.names}.")
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str) and text:
                yield f"{name}:{row}", text
            row += 1


def _iter_saved_dataset(path: Path, text_field: str) -> Iterator[tuple[str, str]]:
    import datasets  # deferred: datasets is optional (the datasets extra), needed only for save_to_disk folders

    loaded: Any = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        splits = ["train"] if "train" in loaded else sorted(loaded.keys())
        parts = [(s, loaded[s]) for s in splits]
    else:
        parts = [("data", loaded)]
    for split, ds in parts:
        if text_field not in ds.column_names:
            raise ValueError(f"{path} (split {split!r}) has no column text_field={text_field!r}; {ds.column_names}.")
        col = ds.select_columns([text_field])
        for start in range(0, len(col), 1024):
            for i, text in enumerate(col[start : start + 1024][text_field], start):
                if isinstance(text, str) and text:
                    yield f"{split}:{i}", text


def _iter_all(corpus: str, text_field: str) -> Iterator[tuple[str, str]]:
    if corpus == STDLIB:
        root = Path(sysconfig.get_paths()["stdlib"])
        for f in stdlib_corpus_files():
            text = _read_text_file(f, strict=False)
            if text:
                yield f.relative_to(root).as_posix(), text
        return
    root = Path(corpus)
    if is_saved_dataset(root):
        yield from _iter_saved_dataset(root, text_field)
        return
    single = root.is_file()
    for f in list_corpus_files(corpus):
        name = f.name if single else f.relative_to(root).as_posix()
        suffix = f.suffix.lower()
        if suffix in _JSONL_SUFFIXES:
            yield from _iter_jsonl(f, name, text_field)
        elif suffix in _PARQUET_SUFFIXES:
            yield from _iter_parquet(f, name, text_field)
        else:
            text = _read_text_file(f, strict=not single)
            if text:
                yield name, text


def load_documents(
    corpus: str = STDLIB, text_field: str = "text", max_corpus_bytes: int | None = None
) -> Iterator[tuple[str, str]]:
    """Yield the non-empty documents of a corpus as ``(name, text)`` pairs, in a deterministic order.

    Args:
        corpus: ``"stdlib"``, a file or a folder (see the module docstring).
        text_field: the JSON field / column holding the text in ``.jsonl``, ``.parquet`` and datasets corpora.
        max_corpus_bytes: stop after this many UTF-8 bytes of text (the document crossing the limit is cut there).

    Yields:
        ``(name, text)`` pairs; names are unique within the corpus.

    Example:
        >>> docs = list(load_documents("stdlib", max_corpus_bytes=10_000))
        >>> sum(len(t.encode()) for _, t in docs) <= 10_000
        True
    """
    return cap_bytes(_iter_all(corpus, text_field), max_corpus_bytes)


def cap_bytes(docs: Iterable[tuple[str, str]], max_bytes: int | None) -> Iterator[tuple[str, str]]:
    """The ``(name, text)`` documents up to ``max_bytes`` UTF-8 bytes in all; the document crossing it is cut there
    (on a character boundary). None passes everything.

    Example:
        >>> list(cap_bytes([("a", "hello"), ("b", "world")], 7))
        [('a', 'hello'), ('b', 'wo')]
    """
    budget = max_bytes
    for name, text in docs:
        if budget is not None:
            data = text.encode("utf-8", errors="replace")
            if len(data) >= budget:
                cut = data[:budget].decode("utf-8", errors="ignore")
                if cut:
                    yield name, cut
                return
            budget -= len(data)
        yield name, text


@dataclass(frozen=True)
class CorpusInfo:
    """What :func:`corpus_fingerprint` learned about a corpus.

    Attributes:
        fingerprint: hex SHA-256 over the documents' names and texts (and the Python version for ``"stdlib"``).
        num_documents: number of non-empty documents.
        num_bytes: total UTF-8 bytes of text.
    """

    fingerprint: str
    num_documents: int
    num_bytes: int


def _stat_signature(corpus: str, text_field: str, max_corpus_bytes: int | None) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([_FINGERPRINT_VERSION, corpus, text_field, max_corpus_bytes, sys.version]).encode())
    if corpus != STDLIB:
        h.update(str(Path(corpus).resolve()).encode())
    for f in list_corpus_files(corpus):
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def corpus_fingerprint(
    corpus: str = STDLIB,
    text_field: str = "text",
    max_corpus_bytes: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> CorpusInfo:
    """Hash a corpus's content (one streaming pass), memoised on disk by the files' paths, sizes and mtimes.

    The hash covers the documents as :func:`load_documents` yields them, so it changes with ``text_field`` and
    ``max_corpus_bytes``; for ``"stdlib"`` it also covers the Python version.

    Args:
        corpus: see :func:`load_documents`.
        text_field: see :func:`load_documents`.
        max_corpus_bytes: see :func:`load_documents`.
        cache_dir: where to memoise the result (so other ranks and later runs skip the pass); None: no memo.

    Returns:
        A :class:`CorpusInfo`.

    Example:
        >>> info = corpus_fingerprint("stdlib", max_corpus_bytes=10_000)
        >>> info.num_bytes <= 10_000
        True
    """
    memo: Path | None = None
    if cache_dir is not None:
        memo = Path(cache_dir) / "fingerprints" / f"{_stat_signature(corpus, text_field, max_corpus_bytes)}.json"
        if memo.is_file():
            try:
                return CorpusInfo(**json.loads(memo.read_text()))
            except (ValueError, TypeError):
                pass  # a corrupt memo is recomputed below
    h = hashlib.sha256()
    h.update(f"lit_accel-corpus-v{_FINGERPRINT_VERSION}\0".encode())
    if corpus == STDLIB:
        h.update(f"python-{sys.version}\0".encode())
    n_docs = n_bytes = 0
    for name, text in load_documents(corpus, text_field, max_corpus_bytes):
        data = text.encode("utf-8", errors="replace")
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
        n_docs += 1
        n_bytes += len(data)
    info = CorpusInfo(h.hexdigest(), n_docs, n_bytes)
    if memo is not None:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(info.__dict__))
        os.replace(tmp, memo)
    return info
