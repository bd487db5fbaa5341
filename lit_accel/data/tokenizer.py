"""Tokenizers: a byte-level BPE trained locally on the corpus, or a local Hugging Face tokenizer directory.

Example:
    >>> from lit_accel.data import load_documents, train_bpe_tokenizer
    >>> texts = (t for _, t in load_documents("stdlib", max_corpus_bytes=200_000))
    >>> tok = train_bpe_tokenizer(texts, vocab_size=500, out_dir="/tmp/lit_accel_doc_bpe")
    >>> tok.decode(tok.encode("def f(x):\\n    return x")) == "def f(x):\\n    return x"
    True
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

__all__ = [
    "EOS_TOKEN",
    "bpe_training_texts",
    "hash_tokenizer_dir",
    "load_tokenizer",
    "token_dtype",
    "train_bpe_tokenizer",
]

EOS_TOKEN = "<|endoftext|>"
"""The end-of-document token of the locally trained BPE (appended after every document)."""


def token_dtype(vocab_size: int) -> type:
    """The smallest unsigned NumPy dtype that holds every token id.

    Example:
        >>> token_dtype(32000).__name__, token_dtype(70000).__name__
        ('uint16', 'uint32')
    """
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def bpe_training_texts(documents: Iterable[tuple[str, str]], total_bytes: int, max_bytes: int | None) -> Iterator[str]:
    """Choose, deterministically, about ``max_bytes`` of text spread over the whole corpus for BPE training.

    Each document is kept when a hash of its name falls below ``max_bytes / total_bytes`` (so the sample does not
    favour the start of the sorted order), until ``max_bytes`` have been yielded.

    Args:
        documents: ``(name, text)`` pairs.
        total_bytes: the corpus's total UTF-8 bytes.
        max_bytes: the budget; None uses everything.

    Example:
        >>> list(bpe_training_texts([("a", "x"), ("b", "y")], total_bytes=2, max_bytes=None))
        ['x', 'y']
    """
    keep = 1.0 if max_bytes is None or total_bytes <= max_bytes else max_bytes / total_bytes
    used = 0
    for name, text in documents:
        if keep < 1.0:
            u = int.from_bytes(hashlib.sha256(b"bpe\0" + name.encode()).digest()[:8], "big") / 2**64
            if u >= keep:
                continue
        if max_bytes is not None and used >= max_bytes:
            return
        used += len(text.encode("utf-8", errors="replace"))
        yield text


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike[str] | None = None
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (GPT-2 style, ``<|endoftext|>`` as eos) on ``texts``.

    Training is deterministic: the same texts in the same order give an identical ``tokenizer.json``.

    Args:
        texts: the training texts.
        vocab_size: total vocabulary size including the 256 byte tokens and the eos token (at least 257).
        out_dir: if given, save there with ``save_pretrained`` (written to a temporary folder and renamed, so a
            crash never leaves a half-written tokenizer); ``AutoTokenizer.from_pretrained(out_dir)`` loads it.

    Returns:
        The tokenizer.

    Raises:
        ValueError: if ``vocab_size`` is below 257.
    """
    if vocab_size < 257:
        raise ValueError(f"bpe_vocab_size={vocab_size} must be at least 257 (256 bytes + the eos token).")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=EOS_TOKEN)
    if out_dir is not None:
        out = Path(out_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            hf.save_pretrained(str(tmp))
            try:
                os.replace(tmp, out)
            except OSError:
                if not (out / "tokenizer.json").is_file():  # another process won the race with the same result
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return hf


def load_tokenizer(path: str | os.PathLike[str]) -> PreTrainedTokenizerFast:
    """Load a fast tokenizer from a local Hugging Face tokenizer directory.

    Args:
        path: a directory holding ``tokenizer.json`` (and usually ``tokenizer_config.json``).

    Raises:
        ValueError: if ``path`` is not a local directory, has no fast tokenizer, or the tokenizer has no eos token.

    Example:
        >>> load_tokenizer("gpt2")  # doctest: +SKIP
        Traceback (most recent call last):
        ValueError: tokenizer='gpt2' is not a local directory ...
    """
    p = Path(path)
    if not p.is_dir():
        raise ValueError(
            f"tokenizer={str(path)!r} is not a local directory; pass 'bpe' (train one on the corpus) or the path of a "
            "local Hugging Face tokenizer directory (nothing is downloaded; save a hub tokenizer with "
            "AutoTokenizer.from_pretrained(id).save_pretrained(dir) on a machine with internet first)."
        )
    tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise ValueError(f"tokenizer={str(path)!r} is not a fast tokenizer (it needs a tokenizer.json).")
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer={str(path)!r} has no eos token; set eos_token in its tokenizer_config.json.")
    return tok


_TOKENIZER_FILE_PATTERNS = (
    "tokenizer*.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab*",
    "merges*.txt",
    "*.model",
    "*.tiktoken",
)


def _is_tokenizer_file(name: str) -> bool:
    return not name.startswith(".") and any(fnmatch.fnmatch(name, p) for p in _TOKENIZER_FILE_PATTERNS)


def hash_tokenizer_dir(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 over the names and contents of the tokenizer files in a directory (sorted).

    Only files that define the tokenization count (``tokenizer.json``, ``tokenizer_config.json``, vocabularies,
    merges, sentencepiece models, special-token maps): a model directory used as the tokenizer would otherwise get a
    new hash, and the corpus a new tokenization, every time its weights change.

    Example:
        >>> len(hash_tokenizer_dir("/tmp"))  # doctest: +SKIP
        64
    """
    h = hashlib.sha256()
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file() and _is_tokenizer_file(p.name))
    for f in files:
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        h.update(f.read_bytes())
        h.update(b"\0")
    return h.hexdigest()
