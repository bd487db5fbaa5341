"""What the small-scale quality benchmarks (pruning_quality.py, sparse24_quality.py) share: their common arguments,
the embedded-corpus data module and a quiet single-device Trainer that validates only when asked."""

from __future__ import annotations

import argparse
import os

import lightning as L

from lit_accel.data import TextDataModule


def add_quality_arguments(parser: argparse.ArgumentParser) -> None:
    """Device, model size, optimiser, batch, validation, seed and results arguments."""
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--preset", default="llama-tiny")
    parser.add_argument("--layers", type=int, default=4, help="decoder blocks")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--val-batches", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))


def quality_datamodule(args: argparse.Namespace, vocab: int, max_corpus_bytes: int | None) -> TextDataModule:
    """The embedded corpus with a BPE of ``vocab`` tokens, 5% held out for validation."""
    return TextDataModule(
        corpus="stdlib",
        bpe_vocab_size=vocab,
        max_corpus_bytes=max_corpus_bytes,
        val_fraction=0.05,
        seq_len=args.seq,
        batch_size=args.batch,
    )


def quality_trainer(args: argparse.Namespace, steps: int, callbacks: list[L.Callback]) -> L.Trainer:
    """One device (fp32 on CPU, bf16-mixed elsewhere), ``steps`` optimizer steps, no logger or checkpoints."""
    return L.Trainer(
        accelerator=args.accelerator,
        devices=1,
        precision="32-true" if args.accelerator == "cpu" else "bf16-mixed",
        max_steps=steps,
        val_check_interval=None,
        check_val_every_n_epoch=None,
        limit_val_batches=args.val_batches,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def val_loss(trainer: L.Trainer, module: L.LightningModule, dm: TextDataModule) -> float:
    """The validation loss of ``module`` on ``dm``'s validation split."""
    return float(trainer.validate(module, datamodule=dm, verbose=False)[0]["val/loss"])
