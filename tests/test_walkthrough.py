"""The first hour, as written: every `lit-accel` command of the README and of the configs' and fragments' headers.

Commands run in order in a scratch folder that holds the repository's configs, with tiny sizes added after their
``--config`` files (llama-tiny, a small corpus, 50 steps), so each runs as written on a CPU. Commands whose config
needs a GPU must refuse in one clear line on a machine without one.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
import wandb
from _helpers import REPO

from lit_accel.cli import main

TINY = [
    "--model.model", "llama-tiny",
    "--data.bpe_vocab_size", "512",
    "--data.bpe_train_bytes", "200000",
    "--data.max_corpus_bytes", "400000",
    "--data.seq_len", "64",
    "--data.max_val_sequences", "4",
    "--trainer.max_steps", "50",
    "--trainer.limit_val_batches", "1",
    "--trainer.enable_progress_bar", "false",
]  # fmt: skip
"""Tiny sizes for a CPU: inserted after a command's --config files, so the command's own arguments still win."""


def _commands() -> list[tuple[str, list[str]]]:
    found: list[tuple[str, list[str]]] = []
    readme = (REPO / "README.md").read_text()
    for block in re.findall(r"```bash\n(.*?)```", readme, flags=re.S):
        for line in block.splitlines():
            if line.startswith("lit-accel "):
                found.append(("README.md", shlex.split(line, comments=True)[1:]))
    for path in sorted([*REPO.glob("configs/*.yaml"), *REPO.glob("callbacks/*.yaml")]):
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            command = line.lstrip("# ")
            if command.startswith("lit-accel "):
                found.append((str(path.relative_to(REPO)), shlex.split(command, comments=True)[1:]))
    unique: dict[str, tuple[str, list[str]]] = {}
    for where, args in found:
        unique.setdefault(shlex.join(args), (where, args))
    return list(unique.values())


def _with_tiny_sizes(args: list[str]) -> list[str]:
    if args[0] != "fit" and args[0] != "test":
        return args
    last_config = max(i for i, a in enumerate(args) if a == "--config")
    return [*args[: last_config + 2], *TINY, *args[last_config + 2 :]]


def test_every_documented_command_runs_as_written_or_says_it_needs_a_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    for folder in ("configs", "callbacks"):
        (tmp_path / folder).symlink_to(REPO / folder)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    commands = _commands()
    assert len(commands) >= 12, commands
    ran, refused = [], []
    for where, args in commands:
        line = "lit-accel " + shlex.join(args)
        if any("<" in a for a in args):  # a placeholder (<technique>, <your model dir>): only on GPU lines
            assert any("llama-" in a for a in args), f"{where}: placeholder in a CPU command: {line}"
            continue
        needs_gpu = any(a.startswith("configs/llama-") for a in args)
        if needs_gpu and not torch.cuda.is_available():
            with pytest.raises(SystemExit) as exit_info:
                main(args)
            err = capsys.readouterr().err
            assert exit_info.value.code == 2 and "needs a CUDA GPU" in err and "Traceback" not in err, (where, err)
            refused.append(line)
            continue
        try:
            main(_with_tiny_sizes(args))
        except SystemExit as err:
            assert err.code in (0, None), f"{where}: `{line}` exited with {err.code}: {capsys.readouterr().err}"
        capsys.readouterr()
        wandb.finish()  # each command is its own process in real use: one W&B run each
        ran.append(line)
        if args[:3] == ["fit", "--config", "configs/quickstart.yaml"] and len(args) == 3:
            # one checkpoint copy on disk, not a best and a last of the same weights
            assert [p.name for p in (tmp_path / "runs/quickstart/checkpoints").glob("*.ckpt")] == ["last.ckpt"]
    assert (tmp_path / "exported/quickstart/config.json").is_file()
    assert (tmp_path / "runs/quickstart+lora/checkpoints/last.ckpt").is_file()  # the fine-tune ran under its own name
    assert len(ran) >= 8 and (torch.cuda.is_available() or len(refused) >= 3), (ran, refused)


def test_every_technique_says_what_it_did_at_the_end(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    import lightning as L
    from torch.utils.data import DataLoader

    from lit_accel.callbacks import DropBP, LoRA, LowRankFactorization, SemiStructuredSparsity
    from lit_accel.models import CausalLM

    ids = torch.randint(0, 100, (8, 16), generator=torch.Generator().manual_seed(0))
    expected = {
        "DropBP": "DropBP: dropped 50.0% of the sublayers' backward FLOPs on average",
        "SemiStructuredSparsity": "SemiStructuredSparsity: ended in the sparse phase with",
        "LoRA": "LoRA: trained the adapters of 14 layers (r=4) for 2 steps",
        "LowRankFactorization": "LowRankFactorization: trained 8 factorised layers for 2 steps",
    }
    techniques = (DropBP(sensitivity="uniform"), SemiStructuredSparsity(), LoRA(r=4), LowRankFactorization(rank=8))
    for callback in techniques:
        trainer = L.Trainer(
            accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=[callback],
        )  # fmt: skip
        with caplog.at_level(logging.INFO):
            trainer.fit(CausalLM("llama-tiny", warmup_steps=0), DataLoader([{"input_ids": x} for x in ids], 4))
        assert expected[type(callback).__name__] in caplog.text, caplog.text[-2000:]
