"""Reading checkpoints a user hands us runs no code from them: a crafted file is refused, by name, before anything
in it executes, on every path that reads one (``lit-accel export``, pruning detection, reference losses)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _helpers import REPO, worker_env

from lit_accel.checkpoint import _deepspeed_records, load_checkpoint_file, load_lightning_checkpoint
from lit_accel.data.domains import reference_losses_from_checkpoint
from lit_accel.export import export_checkpoint
from lit_accel.pruning.export import is_pruning_checkpoint


class _TouchOnLoad:
    """Unpickling this object creates a file: stands for any code a crafted checkpoint would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (Path.touch, (self.marker,))


def _crafted(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "code-ran"
    ckpt = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": {"model": "llama-tiny"},
                "payload": _TouchOnLoad(marker)}, ckpt)  # fmt: skip
    return ckpt, marker


def test_a_crafted_checkpoint_is_refused_without_running_its_code(tmp_path: Path) -> None:
    ckpt, marker = _crafted(tmp_path)
    with pytest.raises(ValueError, match=r"crafted\.ckpt.*does not unpickle"):
        load_lightning_checkpoint(ckpt)
    with pytest.raises(ValueError, match=r"--ckpt .*crafted\.ckpt"):
        export_checkpoint(ckpt, tmp_path / "out")
    with pytest.raises(ValueError, match=r"reference_losses .*crafted\.ckpt"):
        reference_losses_from_checkpoint(ckpt)
    assert is_pruning_checkpoint(ckpt) is False
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_plain_checkpoints_load_and_broken_ones_are_named(tmp_path: Path) -> None:
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.arange(3.0)}, "epoch": 1, "name": "x"}, good)
    assert load_checkpoint_file(good)["state_dict"]["w"].tolist() == [0.0, 1.0, 2.0]
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    for broken in (truncated, empty):
        with pytest.raises(ValueError, match=f"{broken.name}.*not a readable PyTorch checkpoint"):
            load_lightning_checkpoint(broken)


def test_a_deepspeed_folder_exports_and_a_crafted_file_in_it_is_refused(tmp_path: Path) -> None:
    """A ZeRO-2 checkpoint folder (one CPU process) holds DeepSpeed's own records besides tensors: those load, and a
    file that names anything else is refused before DeepSpeed's consolidation unpickles it."""
    run = tmp_path / "runs" / "quickstart"  # the config's folders, relative to the working directory
    args = [
        "fit", "--config", str(REPO / "configs" / "quickstart.yaml"), "--model.model", "llama-tiny",
        "--data.bpe_vocab_size", "4096", "--data.cache_dir", str(REPO / ".cache" / "lit_accel"),
        "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
        "--trainer.logger", "false", "--trainer.strategy", "lit_deepspeed_stage_2",
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "lit_accel.cli", *args], cwd=tmp_path, env=worker_env(), capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    folder = run / "checkpoints" / "last.ckpt"
    assert folder.is_dir()
    assert export_checkpoint(folder, tmp_path / "out").joinpath("model.safetensors").is_file()
    marker = tmp_path / "code-ran"
    optim = next(folder.rglob("*optim_states.pt"))
    state = load_checkpoint_file(optim, allow=_deepspeed_records())
    torch.save({**state, "payload": _TouchOnLoad(marker)}, optim)
    with pytest.raises(ValueError, match=r"optim_states\.pt.*_TouchOnLoad|optim_states\.pt.*does not unpickle"):
        load_lightning_checkpoint(folder)
    assert not marker.exists()


def test_one_flipped_bit_is_detected_and_named(tmp_path: Path) -> None:
    ckpt = tmp_path / "flipped.ckpt"
    torch.save({"state_dict": {"w": torch.arange(4096.0)}}, ckpt)
    data = bytearray(ckpt.read_bytes())
    # A bit in the middle of the tensor's bytes: torch.load alone would load it as a different value.
    offset = data.find(torch.arange(4096.0)[2000:2001].numpy().tobytes())
    assert offset > 0
    data[offset] ^= 0x01
    ckpt.write_bytes(bytes(data))
    assert torch.load(ckpt, weights_only=True)["state_dict"]["w"][2000] != 2000.0  # what silently happened before
    with pytest.raises(ValueError, match=r"flipped\.ckpt.*does not match its CRC-32"):
        load_lightning_checkpoint(ckpt)
