"""Tokenise a corpus once into a memory-mapped token file, split it by document, and pack fixed-length sequences.

On disk a built shard folder holds:

* ``tokens.bin``: every document's token ids followed by the eos id, concatenated (``uint16``, or ``uint32`` when
  the vocabulary has more than 65536 entries);
* ``doc_offsets.npy``: ``int64[num_documents + 1]``, where document ``i`` occupies ``tokens[off[i]:off[i+1]]``;
* ``doc_hash.npy``: ``float64[num_documents]``, a hash of each document's name mapped to [0, 1), which decides the
  train/val split (so the split does not depend on the order, ``seq_len`` or the seed);
* ``meta.json``: counts, dtype and the keys it was built from.

The folder is written under a temporary name and renamed into place, so a crash never leaves a folder that looks
complete. The split and the packing happen when loading, so changing ``val_fraction`` or ``seq_len`` needs no
re-tokenisation.

Example:
    >>> import tempfile
    >>> from lit_accel.data import load_documents, train_bpe_tokenizer
    >>> docs = list(load_documents("stdlib", max_corpus_bytes=100_000))
    >>> tok = train_bpe_tokenizer((t for _, t in docs), vocab_size=400)
    >>> out = build_shards(docs, tok, tempfile.mkdtemp() + "/shards", progress=False)
    >>> shards = TokenShards(out)
    >>> train, val = shards.split(val_fraction=0.1, seq_len=64)
    >>> train[0]["input_ids"].shape
    torch.Size([64])
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from lit_accel.data.tokenizer import token_dtype

__all__ = [
    "SHARD_FORMAT_VERSION",
    "PackedTokenDataset",
    "TokenShards",
    "build_shards",
    "document_hash",
    "heldout_runs",
    "split_runs",
]

SHARD_FORMAT_VERSION = 1
"""Bumped whenever the on-disk layout or the tokenisation rule changes (it is part of the cache key)."""

_META = "meta.json"


def document_hash(name: str) -> float:
    """Map a document name to a number in [0, 1), uniformly and deterministically.

    Example:
        >>> 0.0 <= document_hash("os.py") < 1.0
        True
    """
    return (
        int.from_bytes(hashlib.sha256(b"split\0" + name.encode("utf-8", errors="replace")).digest()[:8], "big") / 2**64
    )


def _chunks(it: Iterable[tuple[str, str]], size: int) -> Iterator[list[tuple[str, str]]]:
    iterator = iter(it)
    while chunk := list(islice(iterator, size)):
        yield chunk


def build_shards(
    documents: Iterable[tuple[str, str]],
    tokenizer: PreTrainedTokenizerFast,
    out_dir: str | os.PathLike[str],
    *,
    total_bytes: int | None = None,
    chunk_size: int = 256,
    progress: bool = True,
    extra_meta: dict[str, Any] | None = None,
) -> Path:
    """Tokenise documents (eos appended to each) into a shard folder, atomically.

    Args:
        documents: ``(name, text)`` pairs, e.g. from :func:`~lit_accel.data.load_documents`.
        tokenizer: a fast tokenizer with an eos token; special tokens are not added other than the eos.
        out_dir: the final folder; it must not exist yet (an existing complete folder is left untouched).
        total_bytes: the corpus's size, for the progress bar.
        chunk_size: documents per ``encode_batch`` call.
        progress: show a tqdm progress bar.
        extra_meta: more fields to record in ``meta.json`` (e.g. the cache-key inputs).

    Returns:
        ``out_dir``.

    Raises:
        ValueError: if the documents hold no text.
    """
    out = Path(out_dir)
    if (out / _META).is_file():
        return out
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token; it is needed to separate documents.")
    dtype = token_dtype(len(tokenizer))
    backend = tokenizer.backend_tokenizer
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        offsets: list[int] = [0]
        hashes: list[float] = []
        n_tokens = 0
        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="Tokenising corpus", disable=not progress)
        with bar, (tmp / "tokens.bin").open("wb") as f:
            for chunk in _chunks(documents, chunk_size):
                encodings = backend.encode_batch([text for _, text in chunk], add_special_tokens=False)
                for (name, text), enc in zip(chunk, encodings):
                    ids: np.ndarray = np.asarray([*enc.ids, eos], dtype=dtype)
                    f.write(ids.tobytes())
                    n_tokens += len(ids)
                    offsets.append(n_tokens)
                    hashes.append(document_hash(name))
                    bar.update(len(text.encode("utf-8", errors="replace")))
        if not hashes:
            raise ValueError("the corpus has no text: every document is empty.")
        np.save(tmp / "doc_offsets.npy", np.asarray(offsets, dtype=np.int64))
        np.save(tmp / "doc_hash.npy", np.asarray(hashes, dtype=np.float64))
        meta = {
            "format_version": SHARD_FORMAT_VERSION,
            "dtype": np.dtype(dtype).name,
            "num_tokens": n_tokens,
            "num_documents": len(hashes),
            "vocab_size": len(tokenizer),
            "eos_token_id": eos,
            **(extra_meta or {}),
        }
        (tmp / _META).write_text(json.dumps(meta, indent=1))
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / _META).is_file():  # another process finished the same build first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _runs(offsets: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Merge consecutive selected documents into ``(start, length)`` token runs."""
    runs: list[tuple[int, int]] = []
    for i in np.flatnonzero(mask):
        start, end = int(offsets[i]), int(offsets[i + 1])
        if runs and runs[-1][0] + runs[-1][1] == start:
            runs[-1] = (runs[-1][0], runs[-1][1] + end - start)
        else:
            runs.append((start, end - start))
    return np.asarray(runs, dtype=np.int64).reshape(-1, 2)


def _split_masks(
    offsets: np.ndarray, doc_hash: np.ndarray, val_fraction: float, seq_len: int, test_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    # Val grows from the bottom of the hash range, test from the top, each until it holds one full sequence (test
    # only while train keeps one): the shares never meet, and neither depends on seq_len unless it must grow.
    lengths = np.diff(offsets)
    n_docs = len(doc_hash)
    order = np.argsort(doc_hash, kind="stable")
    is_val = doc_hash < val_fraction
    n_val = int(lengths[is_val].sum())
    for i in order:
        if n_val >= seq_len or is_val.sum() >= n_docs - 1:
            break
        if not is_val[i]:
            is_val[i] = True
            n_val += int(lengths[i])
    is_test = np.zeros(n_docs, dtype=bool)
    if test_fraction > 0.0 and n_docs >= 3:
        is_test = (doc_hash >= 1.0 - test_fraction) & ~is_val
        n_test = int(lengths[is_test].sum())
        n_train = int(lengths.sum()) - n_val - n_test
        for i in order[::-1]:
            if n_test >= seq_len or is_val[i]:
                break
            if not is_test[i] and n_train - int(lengths[i]) >= seq_len and (~is_val & ~is_test).sum() > 1:
                is_test[i] = True
                n_test += int(lengths[i])
                n_train -= int(lengths[i])
    return is_val, is_test


def split_runs(
    offsets: np.ndarray, doc_hash: np.ndarray, val_fraction: float, seq_len: int, test_fraction: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Split documents into train and val token runs (and leave a test share out of train).

    A document goes to val when its name hash is below ``val_fraction``, to the test share (:func:`heldout_runs`)
    when it is at or above ``1 - test_fraction``; the rest is train. If that gives val fewer than ``seq_len``
    tokens (always at least one document is needed), more documents are moved to val in order of their hash until it
    has one full sequence; the test share likewise from the other end, while train keeps one sequence. A corpus of
    a single document is split inside it: its last ``val_fraction`` of tokens (at least ``seq_len``) become val;
    corpora of fewer than 3 documents have no test share.

    Args:
        offsets: ``int64[num_documents + 1]`` document boundaries in the token file.
        doc_hash: ``float64[num_documents]`` from :func:`document_hash`.
        val_fraction: the fraction of documents for validation, in (0, 0.5].
        seq_len: tokens per packed sequence.
        test_fraction: the fraction of documents held out for testing, in [0, 0.5).

    Returns:
        ``(train_runs, val_runs)``, each ``int64[k, 2]`` of ``(start, length)``.

    Raises:
        ValueError: if train or val would hold fewer than ``seq_len`` tokens.

    Example:
        >>> off = np.array([0, 10, 20, 30]); h = np.array([0.9, 0.001, 0.5])
        >>> train, val = split_runs(off, h, val_fraction=0.01, seq_len=5)
        >>> val.tolist(), train.tolist()
        ([[10, 10]], [[0, 10], [20, 10]])
        >>> split_runs(off, h, val_fraction=0.01, seq_len=5, test_fraction=0.01)[0].tolist()  # doc 0 is test's
        [[20, 10]]
    """
    n_docs = len(doc_hash)
    total = int(offsets[-1])
    lengths = np.diff(offsets)
    if n_docs == 1:
        n_val = max(int(np.ceil(total * val_fraction)), seq_len)
        train = np.asarray([[0, total - n_val]], dtype=np.int64)
        val = np.asarray([[total - n_val, n_val]], dtype=np.int64)
        n_train = total - n_val
    else:
        is_val, is_test = _split_masks(offsets, doc_hash, val_fraction, seq_len, test_fraction)
        n_val = int(lengths[is_val].sum())
        n_train = total - n_val - int(lengths[is_test].sum())
        train, val = _runs(offsets, ~is_val & ~is_test), _runs(offsets, is_val)
    if n_train < seq_len or n_val < seq_len:
        raise ValueError(
            f"the corpus is too small: it has {total} tokens in {n_docs} document(s) (train {max(n_train, 0)}, val "
            f"{n_val}), but seq_len={seq_len} needs at least {seq_len} tokens in each of train and val (at least "
            f"{2 * seq_len} in all, more when documents are uneven); use a larger corpus or max_corpus_bytes, or a "
            "smaller seq_len."
        )
    return train, val


def heldout_runs(
    offsets: np.ndarray, doc_hash: np.ndarray, val_fraction: float, seq_len: int, test_fraction: float
) -> np.ndarray:
    """The token runs of the documents :func:`split_runs` (with the same arguments) held out for testing.

    Example:
        >>> off = np.array([0, 10, 20, 30]); h = np.array([0.9, 0.001, 0.5])
        >>> heldout_runs(off, h, val_fraction=0.01, seq_len=5, test_fraction=0.01).tolist()
        [[0, 10]]
    """
    if len(doc_hash) < 3:
        return np.zeros((0, 2), dtype=np.int64)
    return _runs(offsets, _split_masks(offsets, doc_hash, val_fraction, seq_len, test_fraction)[1])


class PackedTokenDataset(Dataset[dict[str, torch.Tensor]]):
    """Fixed-length sequences packed from token runs of a memory-mapped token file.

    The runs are concatenated (documents keep their eos separators) and cut into ``seq_len`` pieces; the ragged tail
    is dropped. The file is opened lazily, so the dataset pickles cheaply into DataLoader workers.

    Args:
        path: the ``tokens.bin`` file.
        dtype: its NumPy dtype name (``"uint16"`` or ``"uint32"``).
        runs: ``int64[k, 2]`` of ``(start, length)``.
        seq_len: tokens per sample.
        max_sequences: keep only the first this many sequences (None: all).

    Example:
        >>> ds = PackedTokenDataset("tokens.bin", "uint16", np.array([[0, 1000]]), seq_len=128)  # doctest: +SKIP
        >>> len(ds), ds[0]["input_ids"].shape  # doctest: +SKIP
        (7, torch.Size([128]))
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        dtype: str,
        runs: np.ndarray,
        seq_len: int,
        max_sequences: int | None = None,
    ) -> None:
        self.path = str(path)
        self.dtype = dtype
        self.runs = np.asarray(runs, dtype=np.int64).reshape(-1, 2)
        self.seq_len = seq_len
        self._cum = np.concatenate([[0], np.cumsum(self.runs[:, 1])]).astype(np.int64)
        n = int(self._cum[-1]) // seq_len
        self.num_sequences = n if max_sequences is None else min(n, max_sequences)
        self._tokens: np.ndarray | None = None

    @property
    def num_tokens(self) -> int:
        """Tokens in the sequences served (``len(self) * seq_len``)."""
        return self.num_sequences * self.seq_len

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_tokens"] = None
        return state

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.num_sequences:
            raise IndexError(f"index {index} out of range for {self.num_sequences} sequences")
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r")
        pos, need = index * self.seq_len, self.seq_len
        j = int(np.searchsorted(self._cum, pos, side="right")) - 1
        pieces = []
        while need:
            start, length = self.runs[j]
            off = pos - int(self._cum[j])
            take = min(need, int(length) - off)
            pieces.append(self._tokens[start + off : start + off + take])
            need -= take
            pos += take
            j += 1
        ids = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        return {"input_ids": torch.from_numpy(ids.astype(np.int64))}


class TokenShards:
    """A built shard folder (see the module docstring).

    Args:
        path: the folder written by :func:`build_shards`.

    Attributes:
        meta: the contents of ``meta.json``.
        offsets: document boundaries.
        doc_hash: per-document split hashes.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.meta: dict[str, Any] = json.loads((self.path / _META).read_text())
        self.offsets: np.ndarray = np.load(self.path / "doc_offsets.npy")
        self.doc_hash: np.ndarray = np.load(self.path / "doc_hash.npy")

    @staticmethod
    def is_complete(path: str | os.PathLike[str]) -> bool:
        """Whether ``path`` holds a finished build."""
        return (Path(path) / _META).is_file()

    @property
    def tokens_path(self) -> Path:
        """The ``tokens.bin`` file."""
        return self.path / "tokens.bin"

    def split(
        self, val_fraction: float, seq_len: int, max_val_sequences: int | None = None, test_fraction: float = 0.0
    ) -> tuple[PackedTokenDataset, PackedTokenDataset]:
        """Split by document (:func:`split_runs`) and pack both sides into datasets of ``seq_len`` sequences.

        Returns:
            ``(train, val)``; val keeps at most ``max_val_sequences`` sequences; the ``test_fraction`` share
            (:meth:`test_split`) is in neither.
        """
        train_runs, val_runs = split_runs(self.offsets, self.doc_hash, val_fraction, seq_len, test_fraction)
        dtype = self.meta["dtype"]
        train = PackedTokenDataset(self.tokens_path, dtype, train_runs, seq_len)
        val = PackedTokenDataset(self.tokens_path, dtype, val_runs, seq_len, max_val_sequences)
        return train, val

    def test_split(
        self, val_fraction: float, test_fraction: float, seq_len: int, max_sequences: int | None = None
    ) -> PackedTokenDataset:
        """The documents :meth:`split` held out for testing (:func:`heldout_runs`), packed (maybe no sequence)."""
        runs = heldout_runs(self.offsets, self.doc_hash, val_fraction, seq_len, test_fraction)
        return PackedTokenDataset(self.tokens_path, self.meta["dtype"], runs, seq_len, max_sequences)
