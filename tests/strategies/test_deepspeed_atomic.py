"""LitDeepSpeedStrategy writes checkpoint folders atomically and checks them before loading: every rank writes into a
temporary folder that rank 0 swaps into place after the ``latest`` tag, so the previous complete folder survives a
failed or killed save; an incomplete or damaged folder fails naming what is wrong. Two CPU processes over gloo.

Run under torchrun (``test_deepspeed_atomic.py OUT MODE``), this file is the worker; every rank writes
``OUT/rank<r>.json`` with what it saw."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("deepspeed")

STEPS_FIRST = 2
TEMPORARY = re.compile(r"^\..+\.(tmp|old)-\d+-[0-9a-f]{16}$")


# ---------------------------------------------------------------------------------------------------- worker
def _module() -> Any:
    import lightning as L

    class Small(L.LightningModule):
        """Parameter sizes that are no multiple of 2, so ZeRO pads its partitions."""

        def __init__(self) -> None:
            super().__init__()
            self.first = torch.nn.Linear(7, 13)
            self.second = torch.nn.Linear(13, 3)

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            return self.second(torch.relu(self.first(batch))).pow(2).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    torch.manual_seed(0)
    return Small()


def _fit(out: Path, max_steps: int, ckpt_path: Path | None = None) -> Any:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader

    from lit_accel.strategies import LitDeepSpeedStrategy

    trainer = L.Trainer(
        accelerator="cpu", devices=int(os.environ.get("WORLD_SIZE", "1")), max_steps=max_steps,
        strategy=LitDeepSpeedStrategy(stage=2, bf16=False), logger=False, enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=out / "ckpts", every_n_train_steps=1, save_top_k=1, save_last=True)],
    )  # fmt: skip
    data = torch.randn(32, 7, generator=torch.Generator().manual_seed(0))
    trainer.fit(_module(), DataLoader(data, batch_size=2), ckpt_path=str(ckpt_path) if ckpt_path else None)  # type: ignore[arg-type]
    return trainer


def _step_of(folder: Path) -> int:
    from lit_accel.checkpoint import _deepspeed_records, load_checkpoint_file

    state = load_checkpoint_file(folder / "checkpoint" / "mp_rank_00_model_states.pt", allow=_deepspeed_records())
    return int(state["global_step"])


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _largest_record_middle(path: Path) -> int:
    """The offset of the middle byte of the largest record of a torch zip file (a tensor's data)."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
    return info.header_offset + 30 + name_len + extra_len + info.file_size // 2


def _expect_failure(out: Path, ckpt_path: Path, max_steps: int) -> str:
    try:
        _fit(out, max_steps, ckpt_path)
    except Exception as err:  # every rank must fail, with the same words
        return f"{type(err).__name__}: {err}"
    return "no error"


def atomic(out: Path, rank: int) -> dict[str, Any]:
    import torch.distributed as dist
    from deepspeed.runtime.engine import DeepSpeedEngine

    import lit_accel.checkpoint_io as cio

    ckpts = out / "ckpts"
    last = ckpts / "last.ckpt"
    rec: dict[str, Any] = {}
    _fit(out, STEPS_FIRST)
    if rank == 0:
        rec["first"] = {"listing": _listing(ckpts), "last": _listing(last), "step": _step_of(last)}

    # A save that fails on every rank after DeepSpeed wrote every shard: the previous folder stays.
    real_save = DeepSpeedEngine.save_checkpoint

    def save_then_fail(self: Any, *args: Any, **kwargs: Any) -> bool:
        real_save(self, *args, **kwargs)
        raise RuntimeError("simulated failure after the shards were written")

    DeepSpeedEngine.save_checkpoint = save_then_fail  # type: ignore[method-assign]
    rec["failed_save"] = _expect_failure(out, last, STEPS_FIRST + 1)
    DeepSpeedEngine.save_checkpoint = real_save  # type: ignore[method-assign]
    if rank == 0:
        cio.verify_deepspeed_folder(last)
        rec["after_failure"] = {"listing": _listing(ckpts), "step": _step_of(last)}

    # Killed between the two renames of a filesystem that cannot swap names: the old folder is moved aside; a
    # resume by path puts it back. The next saves then go through the two renames (no atomic exchange).
    if rank == 0:
        os.rename(last, cio.temporary_path(last, "1-0123456789abcdef", kind="old"))
    dist.barrier()
    cio._exchange = lambda a, b: False  # type: ignore[assignment]
    trainer = _fit(out, STEPS_FIRST + 2, last)
    rec["resumed_step"] = trainer.global_step
    if rank == 0:
        rec["after_resume"] = {"listing": _listing(ckpts), "step": _step_of(last)}

        # Damaged copies of a good folder.
        def broken(name: str) -> Path:
            copy = out / name
            shutil.copytree(last, copy)
            return copy

        (broken("no_latest.ckpt") / "latest").unlink()
        shard = next((broken("truncated.ckpt") / "checkpoint").glob("*rank_1*optim_states.pt"))
        shard.write_bytes(shard.read_bytes()[:-64])
        next((broken("missing.ckpt") / "checkpoint").glob("*rank_1*optim_states.pt")).unlink()
        shard = next((broken("flipped.ckpt") / "checkpoint").glob("*rank_1*optim_states.pt"))
        data = bytearray(shard.read_bytes())
        data[_largest_record_middle(shard)] ^= 0x10  # a bit of a tensor: same size, only the CRC-32 tells
        shard.write_bytes(bytes(data))
    dist.barrier()
    names = ("no_latest", "truncated", "missing", "flipped")
    rec["broken"] = {name: _expect_failure(out, out / f"{name}.ckpt", STEPS_FIRST + 3) for name in names}
    return rec


def kill(out: Path, rank: int) -> dict[str, Any]:
    """Saves at steps 1 and 2; at step 3, after the step folder, rank 0 dies by SIGKILL in the middle of writing
    last.ckpt's shards (its model states written, its optimizer states half written)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    real_save = TorchCheckpointEngine.save
    written: list[str] = []

    def save(self: Any, state_dict: Any, path: str) -> None:
        if rank == 0 and (written or state_dict.get("global_step") == STEPS_FIRST + 1):
            written.append(path)  # step 3: the step folder's two files, then last.ckpt's two
            if len(written) == 4:
                with open(path, "wb") as f:
                    f.write(b"PK\x03\x04 half a file")
                os.kill(os.getpid(), signal.SIGKILL)
        real_save(self, state_dict, path)

    TorchCheckpointEngine.save = save  # type: ignore[method-assign]
    _fit(out, STEPS_FIRST + 2)
    return {}


def resume(out: Path, rank: int) -> dict[str, Any]:
    last = out / "ckpts" / "last.ckpt"
    rec: dict[str, Any] = {}
    if rank == 0:
        rec["before"] = {"listing": _listing(out / "ckpts"), "step": _step_of(last)}
    trainer = _fit(out, STEPS_FIRST + 2, last)
    rec["resumed_to"] = trainer.global_step
    if rank == 0:
        rec["after"] = {"listing": _listing(out / "ckpts"), "step": _step_of(last)}
    return rec


# ---------------------------------------------------------------------------------------------------- tests
def _run(out: Path, mode: str, expect_success: bool = True) -> list[dict[str, Any]]:
    from _helpers import run_torchrun, torchrun_command, worker_env

    if expect_success:
        return run_torchrun(Path(__file__), out, mode, out=out, timeout=300)
    proc = subprocess.run(
        torchrun_command(Path(__file__), out, mode), env=worker_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0, "the killed run finished"
    return []


def test_folders_are_swapped_in_whole_and_damaged_ones_are_refused(tmp_path: Path) -> None:
    r0, r1 = (r["result"] for r in _run(tmp_path, "atomic"))
    first = r0["first"]
    # A folder per save, only the newest step kept, no temporary left; the manifest and the tag sealed last.ckpt.
    assert first["listing"] == [f"epoch=0-step={STEPS_FIRST}.ckpt", "last.ckpt"] and first["step"] == STEPS_FIRST
    assert {"checkpoint", "latest", "lit_accel_manifest.json"} <= set(first["last"])
    # The failed save: raised on both ranks, the previous folders intact and no temporary left.
    assert r0["failed_save"] == r1["failed_save"] == "RuntimeError: simulated failure after the shards were written"
    assert r0["after_failure"] == {"listing": first["listing"], "step": STEPS_FIRST}
    # The moved-aside folder came back and resumed; the following saves went through two renames.
    assert r0["resumed_step"] == r1["resumed_step"] == STEPS_FIRST + 2
    assert r0["after_resume"] == {
        "listing": [f"epoch=0-step={STEPS_FIRST + 2}.ckpt", "last.ckpt"],
        "step": STEPS_FIRST + 2,
    }
    broken = r0["broken"]
    assert broken == r1["broken"]
    shard = r"checkpoint/.*rank_1.*optim_states\.pt"
    expected = {
        "no_latest": r"ckpt_path '.*no_latest\.ckpt' is not a complete DeepSpeed checkpoint: .*'latest'",
        "truncated": rf"ckpt_path '.*truncated\.ckpt' is not the checkpoint that was saved: {shard} has \d+ bytes",
        "missing": rf"ckpt_path '.*missing\.ckpt' is not the checkpoint that was saved: {shard} is missing",
        "flipped": rf"ckpt_path '.*flipped\.ckpt/{shard}' is corrupt: record .* does not match its CRC-32",
    }
    for name, pattern in expected.items():
        assert re.match("ValueError: " + pattern, broken[name]), (name, broken[name])


@pytest.mark.slow
def test_a_run_killed_while_writing_shards_resumes_from_the_previous_folder(tmp_path: Path) -> None:
    _run(tmp_path, "kill", expect_success=False)
    ckpts = tmp_path / "ckpts"
    assert any(TEMPORARY.match(p.name) for p in ckpts.iterdir()), "the kill did not land inside a save"
    from lit_accel.checkpoint_io import verify_deepspeed_folder

    verify_deepspeed_folder(ckpts / "last.ckpt")  # the previous folder, complete
    r0, r1 = (r["result"] for r in _run(tmp_path, "resume"))
    assert r0["before"]["step"] == STEPS_FIRST
    assert r0["resumed_to"] == r1["resumed_to"] == STEPS_FIRST + 2
    # The killed save's temporary folder went with the next save.
    assert r0["after"]["step"] == STEPS_FIRST + 2
    assert not [name for name in r0["after"]["listing"] if TEMPORARY.match(name)]


if __name__ == "__main__":
    out_dir, mode_name = Path(sys.argv[1]), sys.argv[2]
    rank_id = int(os.environ.get("RANK", "0"))
    result = {"atomic": atomic, "kill": kill, "resume": resume}[mode_name](out_dir, rank_id)
    (out_dir / f"rank{rank_id}.json").write_text(json.dumps({"rank": rank_id, "result": result}, indent=1))
