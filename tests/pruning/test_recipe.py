"""recipes/prune_continue in TINY mode, end to end on CPU: prune -> export -> continue -> export, resumable.

The script runs as a user would run it (``TINY=1 recipes/prune_continue/run.sh``), with a CSV logger instead of W&B
so that the test can read the losses. The first run is interrupted during pruning (a simulated crash after the
step-20 checkpoint); the second resumes that stage from its last checkpoint and finishes the others; a third run
skips every stage, and a fourth with another TARGET is refused.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[2]
RUN_SH = ROOT / "recipes" / "prune_continue" / "run.sh"
# The TINY target (prune_tiny.yaml): 3 blocks, 1 KV head (2 query heads of 32), MLP 192, hidden 96, vocab 1024.
TARGET = LlamaConfig(
    hidden_size=96,
    intermediate_size=192,
    num_hidden_layers=3,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    vocab_size=1024,
    tie_word_embeddings=False,
)


def _csv(stage: str) -> str:
    logger = "--trainer.logger=lightning.pytorch.loggers.CSVLogger"
    return f"{logger} --trainer.logger.init_args.save_dir=csv_{stage} --trainer.enable_progress_bar=false"


def _run(cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    bin_dir = Path(sys.executable).parent
    full_env = {
        **os.environ,
        "TINY": "1",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",  # _helpers.CrashAtStep
        "LIT_ACCEL": f"{sys.executable} -m lit_accel.cli",
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": "2",
        "CONTINUE_ARGS": _csv("continue"),
        **env,
    }
    return subprocess.run(["bash", str(RUN_SH)], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600)


def _train_losses(log_root: Path) -> dict[int, float]:
    out: dict[int, float] = {}
    for metrics in sorted(log_root.rglob("metrics.csv")):
        for row in csv.DictReader(metrics.open()):
            if row.get("train/loss"):
                out[int(row["step"])] = float(row["train/loss"])
    return out


@pytest.mark.slow
def test_tiny_recipe_prunes_exports_continues_and_resumes(tmp_path: Path) -> None:
    crash = "--trainer.callbacks+=_helpers.CrashAtStep --trainer.callbacks.init_args.step=25"
    first = _run(tmp_path, PRUNE_ARGS=f"{_csv('prune')} {crash}")
    assert first.returncode != 0 and "simulated crash at step 25" in first.stderr, first.stderr[-3000:]
    run = tmp_path / "runs" / "prune_continue_tiny"
    assert (run / "prune" / "checkpoints" / "last.ckpt").is_file() and not (run / "prune.done").exists()

    second = _run(tmp_path, PRUNE_ARGS=_csv("prune"))
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-6000:]
    log = second.stdout + second.stderr
    assert "Restoring states from the checkpoint path" in log  # the pruning stage resumed, not restarted
    assert "lit_accel: reference losses" not in log  # ... and kept the source model's reference losses
    assert "from_pretrained(" in log and "loads it" in log  # the export reloaded and checked the pruned model

    # The pruning stage measured the reference losses on the source model, once, before its first step.
    first_log = first.stdout + first.stderr
    assert "lit_accel: reference losses" in first_log
    # The exported model is a plain LLaMA of exactly the target's parameter count.
    pruned = AutoModelForCausalLM.from_pretrained(run / "pruned")
    expected = sum(p.numel() for p in LlamaForCausalLM(TARGET).parameters())
    assert sum(p.numel() for p in pruned.parameters()) == expected
    c = pruned.config
    assert (c.num_hidden_layers, c.num_key_value_heads, c.intermediate_size, c.hidden_size) == (3, 1, 192, 96)
    assert (run / "pruned" / "tokenizer.json").is_file()

    # Continued pre-training: finite losses that fall, then the final export loads.
    losses = _train_losses(tmp_path / "csv_continue")
    assert sorted(losses) == list(range(4, 60, 5))  # logged every 5 steps
    values = torch.tensor([losses[s] for s in sorted(losses)])
    assert bool(torch.isfinite(values).all())
    assert float(values[-3:].mean()) < float(values[:3].mean()) - 0.1, values.tolist()
    final = AutoModelForCausalLM.from_pretrained(run / "final")
    assert final.config.hidden_size == 96
    assert not torch.equal(final.model.embed_tokens.weight, pruned.model.embed_tokens.weight)

    # A third run finds every stage finished and starts nothing.
    third = _run(tmp_path)
    assert third.returncode == 0, third.stderr[-3000:]
    assert third.stdout.count("skipped") == 4
    # Another target over the finished stages: refused, nothing reported as if it were the new model.
    other = _run(tmp_path, TARGET="0.5")
    assert other.returncode == 2 and "holds the outputs of a run with other inputs" in other.stderr, other.stderr
    assert "pruned model:" not in other.stdout
