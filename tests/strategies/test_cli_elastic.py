"""`lit-accel fit --ckpt_path` resumes a DeepSpeed checkpoint written by 2 processes on 1 process.

The command that DeepSpeed alone refuses ("The checkpoint being loaded used a DP world size of 2 but the current
world size is 1"): 2 processes train 4 steps under ZeRO-2 (fp32, 4 sequences per process and step) and checkpoint
at step 2; `lit-accel fit --trainer.devices 1 --ckpt_path <step 2>` resumes it on one process, which brings back the
global batch of 8 through 2 micro-batches per step, and ends with the weights of the uninterrupted run.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from _helpers import REPO, worker_env

pytest.importorskip("deepspeed")


def _config(tmp: Path, name: str) -> Path:
    cfg = {
        "seed_everything": 7,
        "trainer": {
            "accelerator": "cpu",
            "default_root_dir": str(tmp / f"run_{name}"),  # the CLI's config.yaml goes there, not into the checkout
            "strategy": {
                "class_path": "lit_accel.strategies.LitDeepSpeedStrategy",
                "init_args": {"stage": 2, "bf16": False},
            },
            "max_steps": 4,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "logger": False,
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(tmp / f"ckpt_{name}"), "every_n_train_steps": 2, "save_top_k": -1},
                }
            ],
        },
        "model": {"model": "llama-tiny", "warmup_steps": 1, "learning_rate": 1e-2},
        "data": {"corpus": "stdlib", "max_corpus_bytes": 300_000, "bpe_vocab_size": 512, "bpe_train_bytes": 200_000,
                 "seq_len": 32, "batch_size": 4, "max_val_sequences": 8, "cache_dir": str(tmp / "cache")},
    }  # fmt: skip
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _fit(nproc: int, *args: str) -> str:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "lit_accel.cli", "fit", *args]  # fmt: skip
    proc = subprocess.run(command, env=worker_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stderr


def test_fit_resumes_a_two_process_zero2_checkpoint_on_one_process(tmp_path: Path) -> None:
    from lit_accel.checkpoint import load_lightning_checkpoint
    from lit_accel.data import TextDataModule

    TextDataModule(corpus="stdlib", max_corpus_bytes=300_000, bpe_vocab_size=512, bpe_train_bytes=200_000,
                   seq_len=32, batch_size=4, cache_dir=str(tmp_path / "cache")).prepare_data()  # fmt: skip
    _fit(2, "--config", str(_config(tmp_path, "two")), "--trainer.devices", "2")
    saved = tmp_path / "ckpt_two" / "epoch=0-step=2.ckpt"
    log = _fit(1, "--config", str(_config(tmp_path, "one")), "--trainer.devices", "1", "--ckpt_path", str(saved))
    assert "universal checkpoint format" in log and "accumulate_grad_batches 1 -> 2" in log
    straight = load_lightning_checkpoint(tmp_path / "ckpt_two" / "epoch=0-step=4.ckpt")
    resumed = load_lightning_checkpoint(tmp_path / "ckpt_one" / "epoch=0-step=4.ckpt")
    assert resumed["global_step"] == straight["global_step"] == 4
    a, b = straight["state_dict"], resumed["state_dict"]
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst < 1e-4, worst  # fp32 sums over 2 processes vs 2 micro-batches of one
