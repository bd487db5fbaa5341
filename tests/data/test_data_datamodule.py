"""TextDataModule end to end: attributes, user corpora, bad input, and checkpoint resume in a real Trainer."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lit_accel.data import TextDataModule


def test_attributes_after_setup(small_kwargs: dict[str, Any]) -> None:
    dm = TextDataModule(**small_kwargs)
    with pytest.raises(RuntimeError, match="vocab_size is available only after"):
        _ = dm.vocab_size
    dm.setup("fit")  # outside a Trainer, setup builds what is missing
    assert isinstance(dm.tokenizer, PreTrainedTokenizerFast)
    assert dm.vocab_size == len(dm.tokenizer) == 1000
    assert dm.eos_token_id == dm.tokenizer.eos_token_id
    assert dm.seq_len == 64
    assert dm.num_train_sequences > 100 and 0 < dm.num_val_tokens <= 256 * 64
    assert len(AutoTokenizer.from_pretrained(dm.tokenizer_dir)) == 1000
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 64) and batch["input_ids"].dtype == torch.long
    assert int(batch["input_ids"].max()) < dm.vocab_size
    val = list(dm.val_dataloader())
    assert sum(len(b["input_ids"]) for b in val) * 64 == dm.num_val_tokens
    assert dm.hparams["seq_len"] == 64


def _write_words(path: Path, n_docs: int, words: int = 200) -> list[str]:
    g = torch.Generator().manual_seed(0)
    vocab = ["alpha", "beta", "gamma", "delta", "the", "of", "and", "python", "lightning", "token"]
    docs = []
    for _ in range(n_docs):
        idx = torch.randint(len(vocab), (words,), generator=g).tolist()
        docs.append(" ".join(vocab[i] for i in idx) + ".\n")
    return docs


def _user_corpus(kind: str, root: Path) -> str:
    docs = _write_words(root, 30)
    if kind == "folder":
        (root / "txt" / "sub").mkdir(parents=True)
        for i, d in enumerate(docs):
            (root / "txt" / ("sub" if i % 2 else "") / f"{i:03d}.txt").write_text(d)
        (root / "txt" / "image.png").write_bytes(b"\x89PNG\x00\x00binary")
        return str(root / "txt")
    if kind == "jsonl":
        (root / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        return str(root / "c.jsonl")
    if kind == "parquet":
        pa = pytest.importorskip("pyarrow")
        pq = pytest.importorskip("pyarrow.parquet")
        pq.write_table(pa.table({"text": docs}), root / "c.parquet")
        return str(root / "c.parquet")
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs})}).save_to_disk(str(root / "ds"))
    return str(root / "ds")


@pytest.mark.parametrize("kind", ["folder", "jsonl", "parquet", "saved_dataset"])
def test_user_corpora(kind: str, tmp_path: Path) -> None:
    corpus = _user_corpus(kind, tmp_path)
    dm = TextDataModule(corpus, bpe_vocab_size=300, seq_len=32, batch_size=2, val_fraction=0.1, cache_dir=str(tmp_path))
    dm.prepare_data()
    dm.setup("fit")
    assert dm._shards is not None and dm._shards.meta["num_documents"] == 30
    assert dm.num_train_sequences > 10 and dm.num_val_tokens >= 32
    text = dm.tokenizer.decode(next(iter(dm.train_dataloader()))["input_ids"][0])
    assert "alpha" in text or "beta" in text or "python" in text


def test_user_tokenizer_dir(small_kwargs: dict[str, Any], tmp_path: Path) -> None:
    dm = TextDataModule(**small_kwargs)
    dm.setup("fit")
    dm.tokenizer.save_pretrained(str(tmp_path / "tok"))
    dm2 = TextDataModule(**{**small_kwargs, "tokenizer": str(tmp_path / "tok"), "cache_dir": str(tmp_path / "c")})
    dm2.setup("fit")
    assert dm2.vocab_size == dm.vocab_size and dm2.num_train_sequences == dm.num_train_sequences


def test_a_non_builder_rank_reads_a_user_tokenizer_without_tokenizer_json(
    small_kwargs: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a byte-level BPE kept as vocab.json + merges.txt (no tokenizer.json): nothing for rank 0 to write, so the other
    # ranks must not wait for a tokenizer.json that never comes
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tok = tmp_path / "tok"
    tok.mkdir()
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    vocab["<|endoftext|>"] = len(vocab)
    (tok / "vocab.json").write_text(json.dumps(vocab))
    (tok / "merges.txt").write_text("#version: 0.2\n")
    (tok / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>", "model_max_length": 1024})
    )
    kwargs = {**small_kwargs, "tokenizer": str(tok), "bpe_vocab_size": None, "cache_dir": str(tmp_path / "c")}
    TextDataModule(**kwargs).prepare_data()  # local rank 0
    assert not (tok / "tokenizer.json").exists()
    monkeypatch.setattr(TextDataModule, "_is_builder", lambda self: (False, 1))
    monkeypatch.setattr(TextDataModule, "setup_timeout_s", 0.5)
    other = TextDataModule(**kwargs)
    other.setup("fit")
    assert other.vocab_size == 257 and other.num_train_sequences > 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seq_len": 1}, "seq_len=1"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"val_fraction": 0.0}, r"val_fraction=0\.0"),
        ({"val_fraction": 0.6}, r"val_fraction=0\.6"),
        ({"bpe_vocab_size": 256}, "bpe_vocab_size=256"),
        ({"bpe_vocab_size": 2**32 + 1}, "bpe_vocab_size=4294967297"),
        ({"tokenizer": "gpt2"}, "tokenizer='gpt2'.*local directory"),
        ({"corpus": "/definitely/not/here"}, "corpus='/definitely/not/here' does not exist"),
        ({"max_val_sequences": 0}, "max_val_sequences=0"),
        ({"max_corpus_bytes": 0}, "max_corpus_bytes=0"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs: dict[str, Any], match: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=match):
        TextDataModule(**{"cache_dir": str(tmp_path), **kwargs})


def test_bad_corpus_contents(tmp_path: Path) -> None:
    (tmp_path / "x.bin").write_bytes(b"abc")
    with pytest.raises(ValueError, match=r"corpus=.*unknown file type"):
        TextDataModule(str(tmp_path / "x.bin"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"corpus=.*no files"):
        TextDataModule(str(tmp_path / "empty"))
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("")
    (tmp_path / "blank" / "b.dat").write_bytes(b"\x00\x00")
    dm = TextDataModule(str(tmp_path / "blank"), cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match=r"corpus=.*has no text"):
        dm.prepare_data()


def test_corpus_too_small(tmp_path: Path) -> None:
    (tmp_path / "tiny.txt").write_text("just a few words here\n")
    dm = TextDataModule(str(tmp_path / "tiny.txt"), bpe_vocab_size=300, seq_len=512, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"too small: it has \d+ tokens.*seq_len=512"):
        dm.setup("fit")


class TinyLM(L.LightningModule):
    """Embedding + linear next-token model that records every training batch it sees."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab_size, 8)
        self.head = nn.Linear(8, vocab_size)
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        ids = batch["input_ids"]
        self.seen.append(ids.clone())
        logits = self.head(self.emb(ids[:, :-1]))
        return nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        ids = batch["input_ids"]
        logits = self.head(self.emb(ids[:, :-1]))
        self.log("val_loss", nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1)))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(
    dm_kwargs: dict[str, Any],
    max_steps: int,
    root: Path,
    ckpt_every: int | None = None,
    ckpt: str | None = None,
    val_every: int | None = None,
) -> tuple[list[torch.Tensor], TextDataModule]:
    dm = TextDataModule(**dm_kwargs)
    dm.setup("fit")
    model = TinyLM(dm.vocab_size)
    callbacks: list[L.Callback] = []
    if val_every is not None:  # checkpoint saved at validation end
        callbacks.append(ModelCheckpoint(dirpath=root / "ckpt", save_last=True))
    elif ckpt_every is not None:  # checkpoint saved in on_train_batch_end
        callbacks.append(ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=ckpt_every, save_last=True))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(callbacks),
        val_check_interval=val_every,
        callbacks=callbacks,
        num_sanity_val_steps=0,
        limit_val_batches=2,
        default_root_dir=str(root),
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*dataloader is not resumable.*")
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
    return model.seen, dm


@pytest.mark.parametrize(
    ("max_corpus_bytes", "n", "at_validation"),
    [
        (1_000_000, 4, False),  # an epoch has thousands of batches: mid-epoch resume
        (1_000_000, 4, True),  # the same, with the checkpoint written at a mid-epoch validation end
        (14_000, 2, False),  # 3 batches per epoch: resume mid-epoch, then cross into the next epoch
        (14_000, None, False),  # checkpoint exactly at the end of an epoch (n = batches per epoch)
    ],
)
def test_resume_continues_with_next_unseen_batch(
    small_kwargs: dict[str, Any], tmp_path: Path, max_corpus_bytes: int, n: int | None, at_validation: bool
) -> None:
    kwargs = {**small_kwargs, "max_corpus_bytes": max_corpus_bytes, "batch_size": 8}
    if n is None:
        probe = TextDataModule(**kwargs)
        probe.setup("fit")
        n = probe.steps_per_epoch
    val_every = n if at_validation else None
    full, dm = _fit(kwargs, 2 * n, tmp_path / "full", val_every=val_every)
    assert len(full) == 2 * n
    if max_corpus_bytes == 1_000_000:
        assert dm.steps_per_epoch > 2 * n
    else:
        assert n <= dm.steps_per_epoch < 2 * n
    first, _ = _fit(kwargs, n, tmp_path / "run", ckpt_every=n, val_every=val_every)
    assert all(torch.equal(a, b) for a, b in zip(first, full[:n]))
    ckpt = tmp_path / "run" / "ckpt" / "last.ckpt"
    assert ckpt.is_file()
    resumed, _ = _fit(kwargs, 2 * n, tmp_path / "run", ckpt_every=n, ckpt=str(ckpt), val_every=val_every)
    assert len(resumed) == n
    assert all(torch.equal(a, b) for a, b in zip(resumed, full[n:]))


def test_non_builder_rank_waits_then_times_out(
    small_kwargs: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(TextDataModule, "_is_builder", lambda self: (False, 1))
    monkeypatch.setattr(TextDataModule, "setup_timeout_s", 0.5)
    missing = TextDataModule(**{**small_kwargs, "cache_dir": str(tmp_path)})
    with pytest.raises(RuntimeError, match=r"rank 1 waited .* for the tokenizer.*prepare_data\(\)"):
        missing.setup("fit")
    built = TextDataModule(**small_kwargs)
    built.prepare_data()  # what local rank 0 does
    built.setup("fit")
    assert built.num_train_sequences > 0
