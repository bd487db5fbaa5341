"""The locally trained byte-level BPE and local tokenizer directories."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from lit_accel.data import EOS_TOKEN, load_documents, load_tokenizer, token_dtype, train_bpe_tokenizer
from lit_accel.data.tokenizer import bpe_training_texts


def _texts() -> list[str]:
    return [t for _, t in load_documents("stdlib", max_corpus_bytes=300_000)]


def test_bpe_is_deterministic_and_loadable(tmp_path: Path) -> None:
    texts = _texts()
    train_bpe_tokenizer(texts, 600, tmp_path / "a")
    train_bpe_tokenizer(iter(texts), 600, tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "a"))
    assert len(tok) == 600
    assert tok.eos_token == EOS_TOKEN
    assert tok.convert_tokens_to_ids(EOS_TOKEN) == tok.eos_token_id


@pytest.mark.parametrize(
    "text",
    ["def f(x):\n    return x ** 2\n", "  leading spaces\ttabs\r\n", "ünïcödé 日本語 🐍", "<|endoftext|> as text"],
)
def test_bpe_round_trips(tmp_path: Path, text: str) -> None:
    tok = train_bpe_tokenizer(_texts(), 500)
    ids = tok.backend_tokenizer.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text


def test_training_sample_is_deterministic_and_bounded() -> None:
    docs = list(load_documents("stdlib", max_corpus_bytes=400_000))
    a = list(bpe_training_texts(docs, 400_000, 100_000))
    assert a == list(bpe_training_texts(docs, 400_000, 100_000))
    assert 0 < sum(len(t.encode()) for t in a[:-1]) < 100_000


def test_bad_vocab_size() -> None:
    with pytest.raises(ValueError, match="bpe_vocab_size=256"):
        train_bpe_tokenizer(["abc"], 256)


def test_load_tokenizer_needs_local_dir(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tokenizer='gpt2' is not a local directory"):
        load_tokenizer("gpt2")
    train_bpe_tokenizer(_texts(), 400, tmp_path / "t")
    assert load_tokenizer(tmp_path / "t").eos_token == EOS_TOKEN


def test_token_dtype() -> None:
    assert token_dtype(65536) is np.uint16
    assert token_dtype(65537) is np.uint32
