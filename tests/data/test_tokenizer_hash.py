"""The tokenizer hash names the tokenization, not the other files of the directory it lives in."""

from __future__ import annotations

from pathlib import Path

from lit_accel.data.tokenizer import hash_tokenizer_dir


def test_hash_ignores_weights_and_follows_tokenizer_files(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text('{"model": "bpe"}')
    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"weights v1")
    first = hash_tokenizer_dir(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"weights v2 after more training")
    (tmp_path / "config.json").write_text("{}")
    assert hash_tokenizer_dir(tmp_path) == first
    (tmp_path / "tokenizer.json").write_text('{"model": "bpe", "changed": true}')
    assert hash_tokenizer_dir(tmp_path) != first
    (tmp_path / "merges.txt").write_text("a b")
    assert len({first, hash_tokenizer_dir(tmp_path)}) == 2
