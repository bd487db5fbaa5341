"""Quality at small scale: validation loss of 2:4 sparse training against dense, and of a pruned + continued model
against the same shape trained from scratch.

    python -m benchmarks run quality

Both train on the embedded corpus (a BPE tokenizer trained on it, 5% of the documents held out for validation) in a
quiet single-device Lightning ``Trainer`` (bf16-mixed on a GPU, fp32 on a CPU), AdamW with a linear warm-up and a
cosine decay; every run of a table starts from the same seed and sees the same batches in the same order.

- ``sparse24``: ``llama-tiny`` with 4 blocks (vocab 1024), 16 x 64 tokens a step, 300 steps, lr 2e-3 (warm-up
  steps / 20, cosine to 0.1): dense (the baseline), ``SemiStructuredSparsity`` on the MLP linears from step 0, and
  with the paper's schedule (dense warm-up for the first 10% of the steps, dense fine-tune for the last 10%);
  transposable masks refreshed every 40 steps, masked decay 2e-4, the masked dense kernel (the cuSPARSELt path
  computes the same numbers; the kernel changes the speed only). 'minus dense' = this run's validation loss -
  dense's.
- ``sparse24_125m`` (a GPU only): the same comparison at ``llama-125m`` (12 blocks, vocab 32000), 16 x 1024 tokens a
  step, 600 steps, lr 6e-4.
- ``pruning``: ``llama-tiny`` with 4 blocks (vocab 1024): a dense source trained 400 steps; ``StructuredPruning`` to
  3 blocks, 1 KV group, MLP 192, hidden 96 for 60 steps (weights and masks train together), exported to a
  physically smaller model (checked to give the masked model's validation loss); that model trained 240 more steps;
  against the same shape from a random init trained 300 steps (the steps the pruned model trained after the source
  existed).

The validation loss is measured once per run on up to 16 validation batches (``trainer.validate``); 'train seconds' is
the wall-clock of one fit (set-up included), not a benchmark timing.

Smoke (``--smoke``, a CPU): the same runs with ``llama-tiny`` (4 blocks, vocab 1024) on the first 200 kB of the corpus,
4 x 32 tokens a step, a handful of steps each, 2 validation batches; no ``sparse24_125m``.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch

from benchmarks.harness import Context, free_memory
from lit_accel.callbacks import SemiStructuredSparsity, StructuredPruning
from lit_accel.data import TextDataModule
from lit_accel.models import CausalLM
from lit_accel.pruning import export_pruned

__all__ = ["run"]


@dataclass(frozen=True)
class Setup:
    """One table's model, data and optimiser settings."""

    preset: str = "llama-tiny"
    layers: int = 4
    vocab: int = 1024
    lr: float = 2e-3
    seq: int = 64
    batch: int = 16
    val_batches: int = 16
    corpus_bytes: int | None = 2_000_000
    seed: int = 0


@dataclass(frozen=True)
class Sparse24Run:
    setup: Setup
    steps: int = 300


@dataclass(frozen=True)
class PruningRun:
    setup: Setup
    target: tuple[int, int, int, int] = (3, 1, 192, 96)
    """Kept layers, KV heads, MLP channels, hidden dims."""
    source_steps: int = 400
    prune_steps: int = 60
    continue_steps: int = 240


_free = free_memory


def _accelerator(device: torch.device) -> str:
    return "gpu" if device.type == "cuda" else "cpu"


def _datamodule(setup: Setup) -> TextDataModule:
    """The embedded corpus with a BPE of ``setup.vocab`` tokens, 5% held out for validation."""
    return TextDataModule(
        corpus="stdlib",
        bpe_vocab_size=setup.vocab,
        max_corpus_bytes=setup.corpus_bytes,
        val_fraction=0.05,
        seq_len=setup.seq,
        batch_size=setup.batch,
    )


def _trainer(ctx: Context, setup: Setup, steps: int, callbacks: list[L.Callback]) -> L.Trainer:
    """One device (bf16-mixed on a GPU, fp32 on a CPU), ``steps`` optimizer steps, no logger or checkpoints; validates
    only when asked."""
    gpu = ctx.device.type == "cuda"
    return L.Trainer(
        accelerator=_accelerator(ctx.device),
        devices=1,
        precision="bf16-mixed" if gpu else "32-true",
        max_steps=steps,
        val_check_interval=None,
        check_val_every_n_epoch=None,
        limit_val_batches=setup.val_batches,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def _val_loss(trainer: L.Trainer, module: L.LightningModule, dm: TextDataModule, what: str) -> float:
    """The validation loss of ``module`` on ``dm``'s validation split; raises unless finite."""
    loss = float(trainer.validate(module, datamodule=dm, verbose=False)[0]["val/loss"])
    if not math.isfinite(loss):
        raise RuntimeError(f"{what}: validation loss {loss}")
    return loss


def _precision(ctx: Context) -> str:
    return "bf16-mixed" if ctx.device.type == "cuda" else "fp32"


# ---------------------------------------------------------------------------------------------------- 2:4


def sparse24(ctx: Context, result: str, cfg: Sparse24Run) -> None:
    s, steps = cfg.setup, cfg.steps
    warmup = steps // 20
    tenth = steps // 10
    table = ctx.table(
        result,
        f"2:4 sparse training quality: validation loss against dense ({s.preset}, {s.layers} blocks)",
        notes=(
            f"{s.preset}, {s.layers} blocks, vocab {s.vocab}, on the embedded corpus"
            + (f" (first {s.corpus_bytes:,} bytes)" if s.corpus_bytes else "")
            + f", {_precision(ctx)}, batch {s.batch}x{s.seq} = {s.batch * s.seq} tokens/step, {steps} steps, AdamW "
            f"lr {s.lr}, warm-up {warmup} + cosine to 0.1 x; same seed ({s.seed}), init, batches and schedule in "
            "every run. Baseline: dense, the same Trainer without the callback. SemiStructuredSparsity on the MLP "
            "linears (transposable masks refreshed every 40 steps, masked decay 2e-4, masked kernel: the "
            "cuSPARSELt path computes the same numbers). 'val loss' on up to "
            f"{s.val_batches} validation batches after the last step; 'minus dense' = val loss - dense's; 'train "
            "seconds' = wall-clock of the fit (set-up included), one run each, not a benchmark timing."
        ),
    )
    dm = _datamodule(s)
    variants: list[tuple[str, SemiStructuredSparsity | None]] = [
        ("dense", None),
        ("2:4 MLPs from step 0", SemiStructuredSparsity(targets="mlp", dense_warmup_steps=0, kernel="masked")),
        (
            f"2:4 MLPs, dense warm-up {tenth} steps + dense fine-tune last 10%",
            SemiStructuredSparsity(
                targets="mlp", dense_warmup_steps=tenth, dense_finetune_fraction=0.1, kernel="masked"
            ),
        ),
    ]
    dense_loss: float | None = None
    for name, cb in variants:
        L.seed_everything(s.seed)
        overrides = {"num_hidden_layers": s.layers, "vocab_size": s.vocab}
        module = CausalLM(
            s.preset, config_overrides=overrides, learning_rate=s.lr, warmup_steps=warmup, min_lr_ratio=0.1
        )
        trainer = _trainer(ctx, s, steps, [cb] if cb is not None else [])
        t0 = time.perf_counter()
        trainer.fit(module, datamodule=dm)
        seconds = time.perf_counter() - t0
        if cb is not None and cb.refreshes < 1:
            raise RuntimeError(f"{name}: no 2:4 mask was ever set")
        loss = _val_loss(trainer, module, dm, name)
        dense_loss = loss if dense_loss is None else dense_loss
        table.add(
            {"run": name, "steps": steps, "val loss": loss, "minus dense": loss - dense_loss, "train seconds": seconds}
        )
        del trainer, module
        _free()


# ---------------------------------------------------------------------------------------------------- pruning


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def pruning(ctx: Context, cfg: PruningRun) -> None:
    s = cfg.setup
    layers, kv, inter, hidden = cfg.target
    total = cfg.prune_steps + cfg.continue_steps
    table = ctx.table(
        "pruning",
        "Structured pruning quality at small scale: pruned + continued vs from scratch",
        notes=(
            f"{s.preset} with {s.layers} blocks (vocab {s.vocab}) on the embedded corpus"
            + (f" (first {s.corpus_bytes:,} bytes)" if s.corpus_bytes else "")
            + f", {_precision(ctx)}, batch {s.batch}x{s.seq} = {s.batch * s.seq} tokens/step, AdamW lr {s.lr} "
            "warm-up 10 + cosine to 0.1 x per run, seed "
            f"{s.seed}. Source: dense, {cfg.source_steps} steps. Pruned: StructuredPruning from the source to the "
            f"target {','.join(map(str, cfg.target))} (layers, KV heads, MLP, hidden) for {cfg.prune_steps} steps "
            f"(Lagrangian warm-up {cfg.prune_steps // 2}), exported to a physically smaller model (checked to give "
            f"the masked model's validation loss), then {cfg.continue_steps} more steps. Baseline: the same shape "
            f"from a random init trained {total} steps, the steps the pruned model trained after the source "
            f"existed. 'val loss' on up to {s.val_batches} validation batches; 'params' = parameter count."
        ),
    )
    dm = _datamodule(s)
    overrides = {"num_hidden_layers": s.layers, "vocab_size": s.vocab}
    hp: dict[str, Any] = {"learning_rate": s.lr, "warmup_steps": 10, "min_lr_ratio": 0.1}

    def fit(module: CausalLM, steps: int, callbacks: list[L.Callback], what: str) -> float:
        trainer = _trainer(ctx, s, steps, callbacks)
        trainer.fit(module, datamodule=dm)
        return _val_loss(trainer, module, dm, what)

    with tempfile.TemporaryDirectory() as tmp:
        L.seed_everything(s.seed)
        source = CausalLM(s.preset, config_overrides=overrides, **hp)
        source_loss = fit(source, cfg.source_steps, [], "source")
        source_dir = os.path.join(tmp, "source")
        source.save_hf(source_dir)
        table.add(
            {
                "model": "source (dense)",
                "params": _params(source),
                "training steps after the source": f"{cfg.source_steps} (its own)",
                "val loss": source_loss,
            }
        )
        del source
        _free()

        L.seed_everything(s.seed)
        pruned = CausalLM(source_dir, **hp)
        cb = StructuredPruning(
            num_layers=layers,
            num_kv_heads=kv,
            intermediate_size=inter,
            hidden_size=hidden,
            lagrangian_warmup_steps=cfg.prune_steps // 2,
        )
        masked_loss = fit(pruned, cfg.prune_steps, [cb], "pruned, masked")
        assert pruned.model is not None
        small = export_pruned(pruned.model.cpu(), cb.masks).float()
        pruned_dir = os.path.join(tmp, "pruned")
        small.save_pretrained(pruned_dir)
        n_small = _params(small)
        table.add(
            {
                "model": "pruned, masked (end of pruning)",
                "params": n_small,
                "training steps after the source": cfg.prune_steps,
                "val loss": masked_loss,
            }
        )
        del pruned, cb
        _free()

        L.seed_everything(s.seed)
        cont = CausalLM(pruned_dir, **hp)
        exported_loss = _val_loss(_trainer(ctx, s, 0, []), cont, dm, "pruned, exported")
        # bf16 on a GPU: the smaller model's products round differently from the masked ones.
        tol = 2e-2 if ctx.device.type == "cuda" else 1e-3
        if abs(exported_loss - masked_loss) > tol * abs(masked_loss):
            raise RuntimeError(f"the exported model's val loss {exported_loss} != the masked model's {masked_loss}")
        table.add(
            {
                "model": "pruned, exported (no further training)",
                "params": n_small,
                "training steps after the source": cfg.prune_steps,
                "val loss": exported_loss,
            }
        )
        cont_loss = fit(cont, cfg.continue_steps, [], "pruned + continued")
        table.add(
            {
                "model": "pruned + continued",
                "params": n_small,
                "training steps after the source": total,
                "val loss": cont_loss,
            }
        )
        del cont
        _free()

        L.seed_everything(s.seed)
        scratch = CausalLM(small.config.to_dict(), **hp)
        scratch_loss = fit(scratch, total, [], "from scratch")
        table.add(
            {
                "model": "same shape from scratch",
                "params": _params(scratch),
                "training steps after the source": total,
                "val loss": scratch_loss,
            }
        )
        del scratch, small
        _free()


# ---------------------------------------------------------------------------------------------------- run


def run(ctx: Context) -> None:
    if ctx.device.type == "cpu":
        torch.set_num_threads(max(1, os.cpu_count() or 2))
    if ctx.smoke:
        tiny = Setup(seq=32, batch=4, val_batches=2, corpus_bytes=200_000)
        sparse24(ctx, "sparse24", Sparse24Run(tiny, steps=10))
        pruning(ctx, PruningRun(tiny, source_steps=4, prune_steps=4, continue_steps=2))
        return
    gpu = ctx.device.type == "cuda"
    # The whole corpus on a GPU, as the 2:4 comparison always had there; its first 2 MB on a CPU.
    if ctx.wants("sparse24"):
        sparse24(ctx, "sparse24", Sparse24Run(Setup(corpus_bytes=None if gpu else 2_000_000)))
    if ctx.wants("pruning"):
        pruning(ctx, PruningRun(Setup()))
    if gpu and ctx.wants("sparse24_125m"):
        big = Setup(preset="llama-125m", layers=12, vocab=32000, lr=6e-4, seq=1024, batch=16, corpus_bytes=None)
        sparse24(ctx, "sparse24_125m", Sparse24Run(big, steps=600))
