"""Run identity: a resume refuses another configuration's checkpoint, and two live runs cannot share a folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_accel.callbacks import DropBP
from lit_accel.data import TextDataModule
from lit_accel.models import CausalLM
from lit_accel.run_identity import LOCK_NAME, FolderLock, run_stamp, stamp_differences


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("run_identity_cache")


def _fit(
    cache: Path,
    ckpt_dir: Path,
    *,
    lr: float = 1e-3,
    callbacks: list[Any] | None = None,
    ckpt_path: str | None = None,
    max_steps: int = 2,
    **module_kwargs: Any,
) -> CausalLM:
    data = TextDataModule(
        corpus="stdlib",
        max_corpus_bytes=200_000,
        bpe_vocab_size=512,
        bpe_train_bytes=100_000,
        seq_len=32,
        batch_size=2,
        max_val_sequences=2,
        cache_dir=str(cache),
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_last=True), *(callbacks or [])],
    )
    lm = CausalLM("llama-tiny", learning_rate=lr, warmup_steps=0, **module_kwargs)
    trainer.fit(lm, datamodule=data, ckpt_path=ckpt_path)
    return lm


def test_the_stamp_ignores_speed_and_reporting_settings() -> None:
    a = run_stamp({"learning_rate": 1e-3, "kernels": None}, {"corpus": "x", "batch_size": 8}, {}, "a")
    b = run_stamp({"learning_rate": 1e-3, "kernels": True}, {"corpus": "x", "batch_size": 4}, {}, "b")
    assert stamp_differences(a, b) == []
    c = run_stamp({"learning_rate": 1e-3}, {"corpus": "y"}, {"DropBP": {"target": 0.5, "log_every_n_steps": 1}}, "c")
    assert stamp_differences(a, c) == [
        "data.corpus: 'x' in the checkpoint, 'y' now",
        "techniques: none in the checkpoint, DropBP now",
    ]
    d = run_stamp({"learning_rate": 1e-3}, {"corpus": "y"}, {"DropBP": {"target": 0.3, "log_every_n_steps": 5}}, "d")
    assert stamp_differences(c, d) == ["DropBP.target: 0.5 in the checkpoint, 0.3 now"]


def test_resume_of_another_configuration_is_refused_before_loading(tmp_path: Path, cache: Path) -> None:
    _fit(cache, tmp_path / "ckpt", lr=1e-3)
    last = tmp_path / "ckpt" / "last.ckpt"
    record = torch.load(last, weights_only=True)["lit_accel"]["run"]
    assert record["model"]["learning_rate"] == 1e-3 and record["techniques"] == {} and len(record["run_id"]) == 12

    with pytest.raises(ValueError, match=r"model\.learning_rate: 0\.001 in the checkpoint, 0\.002 now"):
        _fit(cache, tmp_path / "other", lr=2e-3, ckpt_path=str(last), max_steps=4)
    with pytest.raises(ValueError, match="techniques: none in the checkpoint, DropBP now"):
        _fit(cache, tmp_path / "other", callbacks=[DropBP(sensitivity="uniform")], ckpt_path=str(last), max_steps=4)
    # run_checks="warn": resumes, with the differences in the warning
    with pytest.warns(UserWarning, match="learning_rate"):
        _fit(cache, tmp_path / "warned", lr=2e-3, ckpt_path=str(last), max_steps=3, run_checks="warn")
    # the same configuration resumes, and keeps the run id
    lm = _fit(cache, tmp_path / "same", ckpt_path=str(last), max_steps=3)
    assert lm._run_id == record["run_id"]


def test_last_of_another_run_in_the_folder_names_this_runs_own(tmp_path: Path, cache: Path) -> None:
    folder = tmp_path / "shared"
    _fit(cache, folder, lr=1e-3)
    _fit(cache, folder, lr=2e-3)  # a second configuration: ModelCheckpoint versions its names (last-v1.ckpt)
    assert (folder / "last-v1.ckpt").exists()
    with pytest.raises(ValueError, match=r"own checkpoints beside it: last\.ckpt"):
        _fit(cache, folder, lr=1e-3, ckpt_path=str(folder / "last-v1.ckpt"), max_steps=3)


def test_a_folder_in_use_by_a_live_run_is_refused(tmp_path: Path, cache: Path) -> None:
    folder = tmp_path / "busy"
    folder.mkdir()
    # another live process holds the folder
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (folder / LOCK_NAME).write_text(
            json.dumps({"run_id": "feedbeef0000", "host": os.uname().nodename, "pid": holder.pid, "started": 0.0})
        )
        with pytest.raises(RuntimeError, match=r"in use by another run \(run feedbeef0000"):
            _fit(cache, folder)
        assert not list(folder.glob("*.ckpt"))  # refused before any save
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale and taken over; released when the fit ends
    _fit(cache, folder)
    assert (folder / "last.ckpt").exists() and not (folder / LOCK_NAME).exists()


def test_folder_lock_takes_over_dead_and_own_locks(tmp_path: Path) -> None:
    lock = FolderLock(tmp_path, run_id="a")
    lock.acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    again = FolderLock(tmp_path, run_id="b")  # an earlier fit of this process that crashed without releasing
    again.acquire()
    lock.release()  # no longer a's: left in place
    assert json.loads((tmp_path / LOCK_NAME).read_text())["run_id"] == "b"
    again.release()
    assert not (tmp_path / LOCK_NAME).exists()
    other_host = {"run_id": "c", "host": "elsewhere", "pid": 1, "started": 0.0}
    (tmp_path / LOCK_NAME).write_text(json.dumps(other_host))
    with pytest.raises(RuntimeError, match="on elsewhere"):
        FolderLock(tmp_path, run_id="d").acquire()


def test_another_hosts_lock_is_taken_over_once_its_lease_runs_out(tmp_path: Path) -> None:
    record = {"run_id": "c", "host": "node7", "pid": 1, "started": 0.0, "heartbeat_s": 30.0}
    (tmp_path / LOCK_NAME).write_text(json.dumps(record))
    with pytest.raises(RuntimeError, match=r"in use by another run \(run c, process 1 on node7"):
        FolderLock(tmp_path, run_id="d", lease_s=600).acquire()  # refreshed just now: alive
    old = time.time() - 700
    os.utime(tmp_path / LOCK_NAME, (old, old))  # a requeued job: node7's run died 700 s ago
    lock = FolderLock(tmp_path, run_id="d", lease_s=600)
    with pytest.warns(UserWarning, match=r"taking over the lock .* run c on node7: it was last refreshed 7\d\d s"):
        lock.acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["run_id"] == "d"
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_held_lock_keeps_its_lease_fresh_and_a_namesake_process_is_refused(tmp_path: Path) -> None:
    lock = FolderLock(tmp_path, run_id="a", lease_s=1.0, heartbeat_s=0.05)
    lock.acquire()
    try:
        os.utime(tmp_path / LOCK_NAME, (0, 0))
        deadline = time.time() + 5
        while (tmp_path / LOCK_NAME).stat().st_mtime < 1 and time.time() < deadline:
            time.sleep(0.02)
        assert time.time() - (tmp_path / LOCK_NAME).stat().st_mtime < 5  # the heartbeat refreshed it
        # another container with this hostname and, in its own pid namespace, this very pid: not ours, alive
        record = json.loads((tmp_path / LOCK_NAME).read_text())
        (tmp_path / LOCK_NAME).write_text(json.dumps({**record, "run_id": "x", "process": "another"}))
        with pytest.raises(RuntimeError, match=r"in use by another run \(run x"):
            FolderLock(tmp_path, run_id="b").acquire()
        lock.release()  # not ours any more: left in place
        assert json.loads((tmp_path / LOCK_NAME).read_text())["run_id"] == "x"
    finally:
        lock.release()
    with pytest.raises(ValueError, match=r"heartbeat_s=5.0, lease_s=1.0; allowed: 0 < heartbeat_s < lease_s"):
        FolderLock(tmp_path, run_id="c", lease_s=1.0, heartbeat_s=5.0)


def test_a_lock_whose_run_stopped_without_releasing_lets_go(tmp_path: Path) -> None:
    running = [True]
    lock = FolderLock(tmp_path, run_id="a", lease_s=1.0, heartbeat_s=0.05, alive=lambda: running[0])
    lock.acquire()
    time.sleep(0.2)
    assert (tmp_path / LOCK_NAME).exists()
    running[0] = False  # e.g. the fit raised in a notebook: Lightning calls no teardown hook of the module
    deadline = time.time() + 5
    while (tmp_path / LOCK_NAME).exists() and time.time() < deadline:
        time.sleep(0.02)
    assert not (tmp_path / LOCK_NAME).exists()
    lock.release()


def test_a_lock_takes_the_run_id_the_checkpoint_restores(tmp_path: Path) -> None:
    lock = FolderLock(tmp_path, run_id="fresh")
    lock.acquire()
    lock.retag("resumed")
    assert json.loads((tmp_path / LOCK_NAME).read_text())["run_id"] == "resumed"
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_special_token_ids_follow_the_tokenizer_not_the_stamp() -> None:
    from transformers import LlamaConfig

    from lit_accel.run_identity import architecture

    a = {"model": {"architecture": architecture(LlamaConfig(eos_token_id=2, bos_token_id=1))}}
    b = {"model": {"architecture": architecture(LlamaConfig(eos_token_id=0, bos_token_id=0, pad_token_id=3))}}
    assert stamp_differences(a, b) == []
    newer = {"model": {"architecture": {**a["model"]["architecture"], "a_key_of_a_later_transformers": True}}}
    assert stamp_differences(a, newer) == [] and stamp_differences(newer, a) == []
    c = {"model": {"architecture": architecture(LlamaConfig(eos_token_id=2, hidden_size=64))}}
    assert any("hidden_size" in d for d in stamp_differences(a, c))


def test_run_checks_is_validated() -> None:
    with pytest.raises(ValueError, match="run_checks='strict'; allowed: error, warn"):
        CausalLM("llama-tiny", run_checks="strict")  # type: ignore[arg-type]


def test_a_moved_model_directory_is_the_same_run_another_architecture_is_not(tmp_path: Path, cache: Path) -> None:
    lm = CausalLM("llama-tiny")
    lm.configure_model()
    assert lm.model is not None
    for name in ("a", "b"):
        lm.model.save_pretrained(str(tmp_path / name))
    _fit_dir = tmp_path / "ckpt"
    L.seed_everything(0)
    trainer_kwargs = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False}
    first = CausalLM(str(tmp_path / "a"), warmup_steps=0)
    run = L.Trainer(max_steps=1, callbacks=[ModelCheckpoint(dirpath=_fit_dir, save_last=True)], **trainer_kwargs)
    data = TextDataModule(
        corpus="stdlib", max_corpus_bytes=200_000, bpe_vocab_size=512, seq_len=32, batch_size=2,
        cache_dir=str(cache), tokenizer="bpe",
    )  # fmt: skip
    with pytest.warns(UserWarning, match="tokenizer='bpe' with the pretrained model"):
        run.fit(first, datamodule=data)
    moved = CausalLM(str(tmp_path / "b"), warmup_steps=0)  # the same weights and config in another folder
    L.Trainer(max_steps=2, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt2")], **trainer_kwargs).fit(
        moved, datamodule=data, ckpt_path=str(_fit_dir / "last.ckpt")
    )
    wider = CausalLM(str(tmp_path / "b"), warmup_steps=0, config_overrides={"rms_norm_eps": 0.001})
    with pytest.raises(ValueError, match=r"model\.architecture\.rms_norm_eps: [0-9.e-]+ in the checkpoint, 0\.001 now"):
        L.Trainer(max_steps=2, **trainer_kwargs).fit(wider, datamodule=data, ckpt_path=str(_fit_dir / "last.ckpt"))
