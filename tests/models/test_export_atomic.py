"""Exports are atomic and have one writer: two exports to one new folder give one winner and a clear error, an
interrupted export leaves nothing under the final name, and ``overwrite`` replaces only what an export wrote."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from _helpers import quiet_trainer, tiny_llama
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, PreTrainedModel

from lit_accel.export import export_checkpoint
from lit_accel.export import main as export_main
from lit_accel.lowrank.lora_callback import LoRA
from lit_accel.models import CausalLM
from lit_accel.models.hf_directory import EXPORT_MANIFEST, save_hf_directory, write_directory

LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 96,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}


def files(write: dict[str, str], delay: float = 0.0) -> Callable[[Path], None]:
    """A write that makes ``write``'s files, pausing ``delay`` seconds after the first (a slow export)."""

    def run(tmp: Path) -> None:
        for i, (name, text) in enumerate(write.items()):
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)
            if i == 0:
                time.sleep(delay)

    return run


def siblings(out: Path) -> list[str]:
    """Everything beside ``out`` that belongs to exports of it (temporary folders, locks)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def contents(folder: Path) -> dict[str, str]:
    found = sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
    return {p.relative_to(folder).as_posix(): p.read_text() for p in found}


def race(jobs: list[Callable[[], Any]]) -> tuple[list[Any], list[BaseException]]:
    """Runs ``jobs`` in threads released together; returns their results and errors."""
    barrier = threading.Barrier(len(jobs))
    results: list[Any] = []
    errors: list[BaseException] = []

    def run(job: Callable[[], Any]) -> None:
        barrier.wait()
        try:
            results.append(job())
        except BaseException as err:  # collected and asserted on below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results, errors


def test_two_concurrent_exports_to_one_new_folder_one_wins(tmp_path: Path) -> None:
    out = tmp_path / "export"
    writes = [{"model.bin": f"weights of {w}", "config.json": f"config of {w}"} for w in ("A", "B")]
    results, errors = race([lambda w=w: write_directory(out, False, files(w, delay=0.5)) for w in writes])  # type: ignore[misc]
    assert len(results) == 1 and len(errors) == 1, errors
    assert isinstance(errors[0], FileExistsError) and str(out) in str(errors[0])
    assert "another export" in str(errors[0]) or "not empty" in str(errors[0])
    # exactly the winner's files, never a mix of the two
    written = contents(out)
    assert written.pop(EXPORT_MANIFEST)
    assert written in [{"model.bin": w["model.bin"], "config.json": w["config.json"]} for w in writes]
    assert siblings(out) == []  # no temporary folder, no lock left


def _export_in_child(out: Path, go: Path, who: str, errors: Path) -> None:
    """A forked process's export (forked, so it starts without importing anything): waits for ``go``, then writes
    slowly; its error, if any, goes to ``errors``."""
    while not go.exists():
        time.sleep(0.01)

    def write(tmp: Path) -> None:
        (tmp / "who").write_text(who)
        time.sleep(1.0)
        (tmp / "config.json").write_text(who)

    try:
        write_directory(out, False, write)
    except FileExistsError as err:
        errors.write_text(str(err))
        raise


def test_two_export_processes_to_one_new_folder_one_wins(tmp_path: Path) -> None:
    out, go = tmp_path / "export", tmp_path / "go"
    fork = multiprocessing.get_context("fork")
    procs = [
        fork.Process(target=_export_in_child, args=(out, go, who, tmp_path / f"error-{who}")) for who in ("A", "B")
    ]
    for p in procs:
        p.start()
    go.touch()
    for p in procs:
        p.join(timeout=60)
    codes = sorted(p.exitcode or 0 for p in procs)
    assert codes[0] == 0 and codes[1] != 0, codes
    (error,) = [f.read_text() for f in tmp_path.glob("error-*")]
    assert str(out) in error and ("another export" in error or "not empty" in error)
    written = contents(out)
    assert written["who"] == written["config.json"] in ("A", "B")
    assert siblings(out) == []


def test_concurrent_cli_exports_of_a_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lm = CausalLM(dict(LLAMA))
    lm.configure_model()
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": lm.state_dict(), "hyper_parameters": dict(lm.hparams)}, ckpt)
    save = PreTrainedModel.save_pretrained

    def slow_save(self: PreTrainedModel, *args: Any, **kwargs: Any) -> Any:
        time.sleep(0.5)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", slow_save)
    out = tmp_path / "exported"
    results, errors = race([lambda: export_checkpoint(ckpt, out), lambda: export_checkpoint(ckpt, out)])
    assert len(results) == 1 and len(errors) == 1 and isinstance(errors[0], FileExistsError), errors
    assert AutoModelForCausalLM.from_pretrained(str(out)).config.hidden_size == 64
    # the command line: a second export to the now full folder exits non-zero, naming --out and --overwrite
    with pytest.raises(FileExistsError, match=r"--out .*exported.* not empty.*--overwrite"):
        export_main(["--ckpt", str(ckpt), "--out", str(out)])


def test_overwrite_replaces_the_previous_export_and_keeps_other_files(tmp_path: Path) -> None:
    out = tmp_path / "export"
    write_directory(out, False, files({"config.json": "old", "model.safetensors": "old", "tokenizer.json": "old"}))
    (out / "notes.txt").write_text("mine")
    (out / "eval").mkdir()
    (out / "eval" / "scores.csv").write_text("1,2")
    (out / "latest").symlink_to("notes.txt")
    inode = (out / "notes.txt").stat().st_ino
    with pytest.raises(FileExistsError, match="not empty"):
        write_directory(out, False, files({"config.json": "new"}))
    write_directory(out, True, files({"config.json": "new", "model.safetensors": "new"}))
    assert (out / "notes.txt").read_text() == "mine" and (out / "eval" / "scores.csv").read_text() == "1,2"
    written = contents(out)
    manifest = written.pop(EXPORT_MANIFEST)
    # the previous export's files are gone or replaced (tokenizer.json was the old export's only); the user's stay
    assert written == {"config.json": "new", "model.safetensors": "new", "notes.txt": "mine", "eval/scores.csv": "1,2"}
    assert (out / "notes.txt").stat().st_ino == inode  # the very same file, not a copy
    assert os.readlink(out / "latest") == "notes.txt"
    assert '"config.json"' in manifest and "notes.txt" not in manifest
    assert siblings(out) == []
    # through the model writer too (CausalLM.save_hf and every exporter use it)
    save_hf_directory(tiny_llama(), tiny_llama().state_dict(), out, tokenizer=None, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").read_bytes() != b"new"
    assert AutoModelForCausalLM.from_pretrained(str(out)).config.num_hidden_layers == 2


def test_overwrite_refuses_model_files_no_export_recorded(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    tiny_llama().save_pretrained(str(plain))  # written by save_pretrained, not by an export: no manifest
    before = {p.name: p.read_bytes() for p in plain.iterdir()}
    with pytest.raises(FileExistsError, match=r"plain.*model files that no lit_accel export recorded.*config\.json"):
        write_directory(plain, True, files({"config.json": "new"}))
    assert {p.name: p.read_bytes() for p in plain.iterdir()} == before
    # a file of the user's that the new export would write is refused as well, and nothing changes
    out = tmp_path / "export"
    write_directory(out, False, files({"config.json": "old"}))
    (out / "results.json").write_text("mine")
    with pytest.raises(FileExistsError, match=r"files of yours that the new export would replace: results\.json"):
        write_directory(out, True, files({"config.json": "new", "results.json": "ours"}))
    written = contents(out)
    assert written.pop(EXPORT_MANIFEST) and written == {"config.json": "old", "results.json": "mine"}
    assert siblings(out) == []


def test_lora_export_dir_with_foreign_model_files_stops_the_fit_at_its_start(tmp_path: Path) -> None:
    base = tmp_path / "base"
    tiny_llama().save_pretrained(str(base))
    (tmp_path / "export" / "adapter").mkdir(parents=True)
    (tmp_path / "export" / "adapter" / "adapter_config.json").write_text("{}")  # someone else's adapter
    lm = CausalLM(str(base), learning_rate=1e-2, warmup_steps=0)
    data = torch.randint(0, 128, (4, 8), generator=torch.Generator().manual_seed(0))
    loader: DataLoader[Any] = DataLoader([{"input_ids": x} for x in data], batch_size=2)  # type: ignore[arg-type]
    cb = LoRA(r=2, export_dir=str(tmp_path / "export"), overwrite=True)
    with pytest.raises(FileExistsError, match=r"LoRA export_dir: .*adapter.*adapter_config\.json"):
        quiet_trainer(max_steps=1, callbacks=[cb]).fit(lm, loader)
    assert (tmp_path / "export" / "adapter" / "adapter_config.json").read_text() == "{}"


def test_interrupted_export_leaves_no_folder_under_the_final_name(tmp_path: Path) -> None:
    out = tmp_path / "export"

    def fails(tmp: Path) -> None:
        (tmp / "config.json").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_directory(out, False, fails)
    assert not out.exists() and siblings(out) == []
    # a process killed while it writes: nothing under the final name; its temporary folder is cleared by the next
    ready = tmp_path / "ready"

    def hangs(tmp: Path) -> None:
        (tmp / "config.json").write_text("half")
        ready.touch()
        time.sleep(120)

    proc = multiprocessing.get_context("fork").Process(target=write_directory, args=(out, False, hangs))
    proc.start()
    deadline = time.monotonic() + 60
    while not ready.exists() and proc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ready.exists(), "the writer did not start"
    os.kill(proc.pid or 0, signal.SIGKILL)
    proc.join(timeout=30)
    assert not out.exists()
    assert any(".lit_accel-tmp-" in name for name in siblings(out))  # what the killed export left, out of the way
    write_directory(out, False, files({"config.json": "whole"}))
    assert contents(out)["config.json"] == "whole"
    assert siblings(out) == []


def test_a_failed_pruning_export_check_publishes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lit_accel.pruning import export as pruning_export
    from lit_accel.pruning.callback import StructuredPruning

    lm = CausalLM(dict(LLAMA), learning_rate=1e-3, warmup_steps=0)
    cb = StructuredPruning(num_layers=1, num_kv_heads=1, intermediate_size=64, hidden_size=48, mask_lr=0.05)
    data = torch.randint(0, 96, (4, 8), generator=torch.Generator().manual_seed(0))
    trainer = quiet_trainer(max_steps=1, callbacks=[cb])
    trainer.fit(lm, DataLoader([{"input_ids": x} for x in data], batch_size=2))  # type: ignore[arg-type]
    ckpt = tmp_path / "pruned.ckpt"
    trainer.save_checkpoint(ckpt)
    checked: list[Path] = []

    def bad_check(folder: Path, *args: Any) -> float:
        checked.append(folder)
        raise RuntimeError("export check failed: logits differ")

    monkeypatch.setattr(pruning_export, "_check_reloaded", bad_check)
    out = tmp_path / "pruned"
    with pytest.raises(RuntimeError, match="export check failed"):
        export_checkpoint(ckpt, out)
    assert checked and checked[0] != out  # the check read the export before it was published
    assert not out.exists() and siblings(out) == []
