"""Checkpoint writes are crash-proof and resume loads are verified (lit_accel.checkpoint_io): a save replaces the file
in one step from a temporary beside it, a failed or killed save leaves the previous checkpoint and no temporary, and
a damaged ``ckpt_path`` fails naming the file. The kill test SIGKILLs real training runs during their saves with
``$TMPDIR`` on another filesystem, where Lightning's own writer leaves truncated checkpoints and stray copies.

Run as a script (``python tests/test_checkpoint_io.py zygote``), this file is the kill test's process factory."""

from __future__ import annotations

import io
import json
import os
import random
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from torch.utils.data import DataLoader

import lit_accel.checkpoint_io as cio
from lit_accel.checkpoint import load_checkpoint_file
from lit_accel.checkpoint_io import (
    AtomicCheckpointIO,
    discard_path,
    publish_folder,
    remove_stale_temporaries,
    restore_displaced,
    temporary_path,
    use_atomic_checkpoint_io,
)

fcntl = pytest.importorskip("fcntl")
TEMPORARY = re.compile(r"^\..+\.(tmp|old)-\d+-[0-9a-f]{16}$")


def _state(value: float) -> dict[str, Any]:
    return {"state_dict": {"w": torch.full((1000,), value)}, "global_step": int(value)}


# ---------------------------------------------------------------------------------------------------- unit
def test_a_save_reaches_its_name_only_through_one_replace_from_beside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    final = tmp_path / "sub" / "last.ckpt"  # the folder is created
    replaced: list[tuple[Path, Path, bool]] = []
    real_replace = os.replace

    def spy(src: Any, dst: Any) -> None:
        # What is under the final name just before the switch: the previous checkpoint, complete.
        replaced.append((Path(src), Path(dst), Path(dst).exists() and load_checkpoint_file(dst)["global_step"] == 1))
        real_replace(src, dst)

    AtomicCheckpointIO().save_checkpoint(_state(1), final)
    monkeypatch.setattr(cio.os, "replace", spy)
    AtomicCheckpointIO().save_checkpoint(_state(2), final)
    ((src, dst, previous_intact),) = replaced
    assert dst == final and src.parent == final.parent and TEMPORARY.match(src.name), src
    assert src.name.startswith(".last.ckpt.tmp-") and previous_intact
    assert load_checkpoint_file(final)["global_step"] == 2
    assert sorted(p.name for p in final.parent.iterdir()) == ["last.ckpt"]


def test_a_save_that_fails_halfway_keeps_the_previous_checkpoint_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    final = tmp_path / "last.ckpt"
    writer = AtomicCheckpointIO()
    writer.save_checkpoint(_state(1), final)
    real_save = torch.save

    def half_then_fail(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        buffer = io.BytesIO()
        real_save(obj, buffer)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        writer.save_checkpoint(_state(2), final)
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint_file(final)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_stale_temporaries_of_killed_saves_go_and_live_ones_stay(tmp_path: Path) -> None:
    token = "4242-0123456789abcdef"
    stale_same = temporary_path(tmp_path / "last.ckpt", token)
    stale_step = temporary_path(tmp_path / "epoch=0-step=7.ckpt", token)  # a name never saved again
    stale_folder = temporary_path(tmp_path / "epoch=0-step=8.ckpt", token)
    live = temporary_path(tmp_path / "epoch=0-step=9.ckpt", token)
    other_suffix = temporary_path(tmp_path / "weights.pt", token)
    for f in (stale_same, stale_step, live, other_suffix):
        f.write_bytes(b"partial")
    (stale_folder / "checkpoint").mkdir(parents=True)
    (stale_folder / "checkpoint" / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    unrelated = [tmp_path / ".last.ckpt.tmp", tmp_path / "notes.txt", tmp_path / ".last.ckpt.tmp-1-xyz"]
    for f in unrelated:
        f.write_text("keep")
    writer = os.open(live, os.O_RDWR)  # a save in progress holds its temporary's lock
    fcntl.flock(writer, fcntl.LOCK_EX)
    try:
        AtomicCheckpointIO().save_checkpoint(_state(1), tmp_path / "last.ckpt")
        left = {p.name for p in tmp_path.iterdir()}
    finally:
        os.close(writer)
    assert left == {"last.ckpt", live.name, other_suffix.name, *(f.name for f in unrelated)}
    assert remove_stale_temporaries(tmp_path, ".ckpt") == [live]  # its writer is gone now


def _bytes_of(value: float) -> bytes:
    return torch.tensor([value]).numpy().tobytes()


def test_truncated_empty_or_flipped_checkpoints_fail_naming_the_file(tmp_path: Path) -> None:
    good = tmp_path / "good.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.arange(5000.0)}}, good)
    data = good.read_bytes()
    broken = {
        "truncated.ckpt": data[: len(data) // 2],
        "empty.ckpt": b"",
        # one tensor value changed: the file still parses, only the record's CRC-32 tells
        "flipped.ckpt": data.replace(_bytes_of(2000.0), _bytes_of(2001.0)),
    }
    assert broken["flipped.ckpt"] != data
    writer = AtomicCheckpointIO()
    for name, content in broken.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=rf"ckpt_path '.*{re.escape(name)}'"):
            writer.load_checkpoint(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="absent.ckpt"):
        writer.load_checkpoint(tmp_path / "absent.ckpt")
    # map_location as TorchCheckpointIO's: Lightning's identity function, or anything torch.load takes.
    assert writer.load_checkpoint(good)["state_dict"]["w"][4999] == 4999.0
    assert writer.load_checkpoint(good, map_location="cpu")["state_dict"]["w"].device.type == "cpu"


class _Custom:
    pass


def test_loads_are_weights_only_and_allow_names_what_a_checkpoint_may_hold(tmp_path: Path) -> None:
    ckpt = tmp_path / "custom.ckpt"
    torch.save({"state_dict": {}, "extra": _Custom()}, ckpt)
    with pytest.raises(ValueError, match=r"custom\.ckpt.*_Custom.*AtomicCheckpointIO\(allow=\["):
        AtomicCheckpointIO().load_checkpoint(ckpt, weights_only=False)  # not honoured: the file is not trusted
    assert isinstance(AtomicCheckpointIO(allow=[_Custom]).load_checkpoint(ckpt)["extra"], _Custom)


def test_installed_only_over_lightnings_plain_default(tmp_path: Path) -> None:
    class Custom(TorchCheckpointIO):
        pass

    plain = L.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path)
    assert use_atomic_checkpoint_io(plain) and isinstance(plain.strategy.checkpoint_io, AtomicCheckpointIO)
    assert not use_atomic_checkpoint_io(plain)  # already there
    given = L.Trainer(accelerator="cpu", logger=False, plugins=[TorchCheckpointIO()], default_root_dir=tmp_path)
    assert use_atomic_checkpoint_io(given)  # the same class given explicitly: same format, same behaviour
    custom = Custom()
    kept = L.Trainer(accelerator="cpu", logger=False, plugins=[custom], default_root_dir=tmp_path)
    assert not use_atomic_checkpoint_io(kept) and kept.strategy.checkpoint_io is custom
    wrapped = L.Trainer(accelerator="cpu", logger=False, plugins=[AsyncCheckpointIO()], default_root_dir=tmp_path)
    assert use_atomic_checkpoint_io(wrapped)
    outer = wrapped.strategy.checkpoint_io
    assert isinstance(outer, AsyncCheckpointIO) and isinstance(outer.checkpoint_io, AtomicCheckpointIO)
    custom_inside = L.Trainer(
        accelerator="cpu", logger=False, plugins=[AsyncCheckpointIO(Custom())], default_root_dir=tmp_path
    )
    assert not use_atomic_checkpoint_io(custom_inside)


class _Tiny(L.LightningModule):
    """A linear layer and a ``ballast`` buffer that sets the checkpoint's size; installs the writer at setup, as
    CausalLM does, when ``atomic``."""

    def __init__(self, ballast: int = 16, atomic: bool = True) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.register_buffer("ballast", torch.randn(ballast))
        self.atomic = atomic

    def setup(self, stage: str) -> None:
        if self.atomic:
            use_atomic_checkpoint_io(self.trainer)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader() -> DataLoader[torch.Tensor]:
    return DataLoader(torch.randn(64, 4, generator=torch.Generator().manual_seed(0)), batch_size=4)  # type: ignore[arg-type]


def _trainer(folder: Path, max_steps: int, **kw: Any) -> L.Trainer:
    checkpoint = ModelCheckpoint(dirpath=folder, every_n_train_steps=1, save_top_k=1, save_last=True)
    return L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[checkpoint], **kw,
    )  # fmt: skip


@pytest.mark.parametrize("strategy", ["auto", "ddp"])
def test_installed_at_setup_it_writes_every_checkpoint_and_reads_the_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, strategy: str
) -> None:
    saved: list[str] = []
    loaded: list[str] = []
    real_save, real_load = AtomicCheckpointIO.save_checkpoint, AtomicCheckpointIO.load_checkpoint

    def save(self: AtomicCheckpointIO, checkpoint: dict[str, Any], path: Any, **kwargs: Any) -> None:
        saved.append(Path(path).name)
        real_save(self, checkpoint, path, **kwargs)

    def load(self: AtomicCheckpointIO, path: Any, **kwargs: Any) -> dict[str, Any]:
        loaded.append(Path(path).name)
        return real_load(self, path, **kwargs)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", save)
    monkeypatch.setattr(AtomicCheckpointIO, "load_checkpoint", load)
    environ = dict(os.environ)
    try:
        _trainer(tmp_path, 2, strategy=strategy).fit(_Tiny(), _loader())
        assert saved == ["epoch=0-step=1.ckpt", "last.ckpt", "epoch=0-step=2.ckpt", "last.ckpt"]
        trainer = _trainer(tmp_path, 3, strategy=strategy)
        trainer.fit(_Tiny(), _loader(), ckpt_path="last")
    finally:
        # DDP leaves its process group and MASTER_PORT behind: a later subprocess would find the port taken.
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)
    assert loaded == ["last.ckpt"] and trainer.global_step == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch=0-step=3.ckpt", "last.ckpt"]


def test_a_damaged_last_checkpoint_stops_the_resume_naming_it(tmp_path: Path) -> None:
    _trainer(tmp_path, 1).fit(_Tiny(), _loader())
    last = tmp_path / "last.ckpt"
    last.write_bytes(last.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"ckpt_path '.*last\.ckpt' is not a readable PyTorch checkpoint"):
        _trainer(tmp_path, 2).fit(_Tiny(), _loader(), ckpt_path="last")


# ---------------------------------------------------------------------------------------------------- folders
def _folder(path: Path, content: str) -> Path:
    (path / "checkpoint").mkdir(parents=True)
    (path / "checkpoint" / "mp_rank_00_model_states.pt").write_text(content)
    (path / "latest").write_text("checkpoint")
    return path


@pytest.mark.parametrize("swap", ["exchange", "two renames"])
def test_a_folder_is_published_over_the_old_one_and_a_displaced_one_comes_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, swap: str
) -> None:
    final = _folder(tmp_path / "last.ckpt", "old")
    if swap == "two renames":  # a filesystem that cannot swap two names (NFS ...)
        monkeypatch.setattr(cio, "_exchange", lambda a, b: False)
    elif not cio._exchange(_folder(tmp_path / "a", "a"), _folder(tmp_path / "b", "b")):
        pytest.skip("this filesystem cannot swap two names atomically")
    publish_folder(_folder(tmp_path / ".last.ckpt.tmp-1-0123456789abcdef", "new"), final, "1-0123456789abcdef")
    assert (final / "checkpoint" / "mp_rank_00_model_states.pt").read_text() == "new"
    assert not any(TEMPORARY.match(p.name) for p in tmp_path.iterdir())
    # Killed between the two renames: the old folder is complete under a recoverable name and is put back.
    os.rename(final, temporary_path(final, "1-0123456789abcdef", kind="old"))
    assert restore_displaced(final) and (final / "latest").is_file()
    assert not restore_displaced(final)


def test_a_folder_is_discarded_without_being_seen_half_deleted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _folder(tmp_path / "epoch=0-step=2.ckpt", "x")
    seen: list[bool] = []
    real_remove = cio._remove
    monkeypatch.setattr(cio, "_remove", lambda p: (seen.append(folder.exists()), real_remove(p))[1])
    discard_path(folder)
    assert seen == [False] and list(tmp_path.iterdir()) == []
    link = tmp_path / "last.ckpt"
    target = _folder(tmp_path / "kept.ckpt", "x")
    link.symlink_to(target.name)
    discard_path(link)  # the link goes, never what it points to
    assert not link.exists() and (target / "latest").is_file()


# ---------------------------------------------------------------------------------------------------- kill test
KILLS = 8
BALLAST = 4_000_000  # floats: a 16 MB checkpoint, so a save takes long enough to be killed in


def _zygote() -> None:
    """Imports Lightning once, then forks one training run per request read from stdin (``writer folder max_steps``),
    reporting ``pid``, each ``save <step>`` as it starts, ``resumed <step>``, and ``exit <status>``."""
    import lit_accel.checkpoint_io  # noqa: F401  (imported before forking, like everything else)

    def say(text: str) -> None:
        os.write(1, (text + "\n").encode())

    class Report(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            say(f"resumed {trainer.global_step}")

        def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, ckpt: dict[str, Any]) -> None:
            say(f"save {trainer.global_step}")

    for line in sys.stdin:
        writer, folder, max_steps = line.split()
        pid = os.fork()
        if pid == 0:
            try:
                last = Path(folder) / "last.ckpt"
                trainer = _trainer(Path(folder), int(max_steps))
                trainer.callbacks.append(Report())
                module = _Tiny(BALLAST, atomic=writer == "atomic")
                trainer.fit(module, _loader(), ckpt_path=str(last) if last.exists() else None)
                code = 0
            except BaseException as err:  # reported to the test, which shows it
                say(f"error {type(err).__name__}: {str(err)[:300]}")
                code = 1
            os._exit(code)
        say(f"pid {pid}")
        _, status = os.waitpid(pid, 0)
        say(f"exit {status}")


class _Zygote:
    def __init__(self, tmpdir: Path) -> None:
        env = {**os.environ, "TMPDIR": str(tmpdir), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "zygote"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, env=env,
        )  # fmt: skip
        self.lines: list[str] = []

    def run(self, writer: str, folder: Path, max_steps: int) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{writer} {folder} {max_steps}\n".encode())
        self.proc.stdin.flush()
        return int(self.read("pid ").split()[1])

    def read(self, prefix: str, timeout: float = 120) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            line = self.proc.stdout.readline().decode().strip() if ready else ""
            assert line, f"no {prefix!r} from the training run; it said: {self.lines[-8:]}"
            self.lines.append(line)
            if line.startswith(prefix):
                return line
            assert not line.startswith(("error", "exit")), f"the training run ended: {self.lines[-8:]}"

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _leftovers(folder: Path, tmpdir: Path) -> list[str]:
    return sorted([p.name for p in folder.iterdir() if TEMPORARY.match(p.name)] + [p.name for p in tmpdir.iterdir()])


def kill_during_saves(
    writer: str, folder: Path, tmpdir: Path, kills: int = KILLS, seed: int = 0, caught: list[str] | None = None
) -> list[str]:
    """Trains, SIGKILLs the run at random instants of its saves ``kills`` times (each run resuming from
    ``last.ckpt``), then lets one run finish; returns every problem seen (empty when the writer is crash-proof).
    ``writer``: ``"atomic"`` (the module installs AtomicCheckpointIO at setup) or ``"torch"`` (Lightning's own).
    ``caught`` receives the temporaries found right after each kill (a kill that landed inside a write)."""
    rng = random.Random(seed)
    problems: list[str] = []
    caught = [] if caught is None else caught
    zygote = _Zygote(tmpdir)
    good_step = -1
    try:
        for attempt in range(kills):
            pid = zygote.run(writer, folder, 10_000)
            resumed = int(zygote.read("resumed ").split()[1])
            if good_step >= 0 and resumed != good_step:
                problems.append(f"attempt {attempt}: resumed at step {resumed}, last.ckpt held {good_step}")
            # Each step saves twice, a step checkpoint and then last.ckpt: wait for the start of one of the first
            # few saves, then kill within about one save's duration (the time the previous save took).
            times = []
            for _ in range(rng.randint(2, 5)):
                zygote.read("save ")
                times.append(time.monotonic())
            time.sleep(rng.uniform(0.0, 1.2 * (times[-1] - times[-2])))
            os.kill(pid, signal.SIGKILL)
            zygote.read("exit ")
            caught.extend(_leftovers(folder, tmpdir))
            for ckpt in sorted(folder.glob("epoch=*.ckpt")):  # a step checkpoint under its name is complete too
                try:
                    load_checkpoint_file(ckpt)
                except ValueError as err:
                    problems.append(f"attempt {attempt}: {err}")
                    ckpt.unlink()
            last = folder / "last.ckpt"
            if not last.exists():
                if good_step >= 0:
                    problems.append(f"attempt {attempt}: last.ckpt is gone")
                continue
            try:
                good_step = load_checkpoint_file(last)["global_step"]
            except ValueError as err:
                problems.append(f"attempt {attempt}: {err}")
                last.unlink()  # what a user would do; the next run starts over
                good_step = -1
        zygote.run(writer, folder, max(good_step, 0) + 2)
        zygote.read("resumed ")
        status = zygote.read("exit ")
        if status != "exit 0":
            problems.append(f"the final run failed: {zygote.lines[-4:]}")
        elif load_checkpoint_file(folder / "last.ckpt")["global_step"] != max(good_step, 0) + 2:
            problems.append("the final run's last.ckpt is not at its last step")
        left = _leftovers(folder, tmpdir)
        if left:
            problems.append(f"temporary files left after the final run's saves: {left}")
    finally:
        zygote.close()
    return problems


def _other_filesystem_tmpdir(folder: Path) -> Path:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == folder.stat().st_dev or not os.access(shm, os.W_OK):
        pytest.skip("needs /dev/shm on another filesystem than the checkpoint folder")
    return Path(tempfile.mkdtemp(prefix="lit-accel-kill-", dir=shm))


@pytest.mark.slow
def test_runs_killed_during_saves_always_leave_a_loadable_last_checkpoint(tmp_path: Path) -> None:
    """SIGKILL at random instants of the saves, with $TMPDIR on another filesystem (fsspec's transaction then
    copies the finished file onto its name: Lightning's own writer leaves truncated checkpoints and full-size copies
    in $TMPDIR here). Every previous last.ckpt must load and resume, and no temporary survive a finished run."""
    folder = tmp_path / "ckpts"
    folder.mkdir()
    tmpdir = _other_filesystem_tmpdir(folder)
    try:
        caught: list[str] = []
        assert kill_during_saves("atomic", folder, tmpdir, caught=caught) == []
        assert caught, "no kill landed inside a write"  # (about 7 in 8 do)
    finally:
        for p in tmpdir.iterdir():
            p.unlink()
        tmpdir.rmdir()


if __name__ == "__main__":
    if sys.argv[1:] == ["zygote"]:
        _zygote()
    else:  # python tests/test_checkpoint_io.py torch|atomic [kills]: what a writer leaves behind
        io_name = sys.argv[1]
        with tempfile.TemporaryDirectory() as tmp:
            shm = Path(tempfile.mkdtemp(prefix="lit-accel-kill-", dir="/dev/shm"))
            caught: list[str] = []
            kills = int(sys.argv[2]) if len(sys.argv) > 2 else KILLS
            found = kill_during_saves(io_name, Path(tmp), shm, kills=kills, caught=caught)
            print(json.dumps({"problems": found, "temporaries after kills": caught}, indent=1))
            for p in shm.iterdir():
                p.unlink()
            shm.rmdir()
