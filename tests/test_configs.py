"""Every YAML in configs/, callbacks/ and recipes/ parses and builds (model, data, callbacks, logger)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.strategies import StrategyRegistry

from lit_accel.cli import LitAccelCLI

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
FRAGMENTS = sorted((ROOT / "callbacks").glob("*.yaml"))
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
# Build on CPU whatever the config targets; the strategy name is checked against Lightning's registry instead.
CPU = ["--trainer.accelerator=cpu", "--trainer.strategy=auto", "--trainer.devices=1", "--trainer.precision=32-true"]


def _every_key_has_a_comment(path: Path) -> list[str]:
    missing = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith(":") and not stripped.startswith("- "):
            continue  # a section header whose keys carry the comments
        if stripped.startswith("- class_path") or stripped.startswith("class_path") or stripped == "init_args:":
            continue
        if "#" not in line:
            missing.append(f"{path.name}:{n}: {stripped}")
    return missing


@pytest.mark.parametrize("path", CONFIGS + RECIPES, ids=lambda p: p.name)
def test_config_builds(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # relative run folders land in the temporary directory
    raw = yaml.safe_load(path.read_text())
    strategy = raw.get("trainer", {}).get("strategy", "auto")
    if isinstance(strategy, dict):  # class_path + init_args: the class builds with them (no process is started)
        module, name = strategy["class_path"].rsplit(".", 1)
        getattr(importlib.import_module(module), name)(**strategy.get("init_args", {}))
    else:
        assert strategy == "auto" or strategy in StrategyRegistry or strategy in ("ddp", "fsdp", "deepspeed")
    cli = LitAccelCLI(args=["--config", str(path), *CPU], run=False)
    # `data:` is TextDataModule's arguments, or class_path + init_args of a subclass (MultiDomainDataModule).
    data = raw["data"].get("init_args", raw["data"])
    assert cli.model.config.vocab_size >= data["bpe_vocab_size"]
    assert cli.datamodule.seq_len <= cli.model.config.max_position_embeddings
    assert not _every_key_has_a_comment(path)


@pytest.mark.parametrize("path", FRAGMENTS, ids=lambda p: p.name)
def test_fragment_composes_with_a_run(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    base = ROOT / "configs" / "quickstart.yaml"
    before = LitAccelCLI(args=["--config", str(base), *CPU], run=False).trainer.callbacks
    cli = LitAccelCLI(args=["--config", str(base), "--config", str(path), *CPU], run=False)
    added = yaml.safe_load(path.read_text())["trainer"]["callbacks+"]
    assert len(cli.trainer.callbacks) == len(before) + len(added)
    assert not _every_key_has_a_comment(path)


OVERLAYS = sorted((ROOT / "benchmarks").glob("*-smoke.yaml"))


@pytest.mark.parametrize("path", OVERLAYS, ids=lambda p: p.name)
def test_benchmark_overlay_composes_with_its_base(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU smoke overlays (``--config BASE --config OVERLAY``) name their base and build on top of it."""
    monkeypatch.chdir(tmp_path)
    bases = [line.split(":", 1)[1].strip() for line in path.read_text().splitlines() if line.startswith("# base:")]
    assert len(bases) == 1, f"{path.name} must name its base config in one '# base: <path>' line"
    base = ROOT / bases[0]
    overlay = yaml.safe_load(path.read_text())
    cli = LitAccelCLI(args=["--config", str(base), "--config", str(path), *CPU], run=False)
    assert cli.trainer.max_steps == overlay["trainer"]["max_steps"]
    names = [type(c).__name__ for c in cli.trainer.callbacks]
    for cb in overlay["trainer"]["callbacks"]:
        assert cb["class_path"].rsplit(".", 1)[1] in names
    for key, value in overlay.get("data", {}).get("init_args", {}).items():
        assert getattr(cli.datamodule, key) == value, key
    assert not _every_key_has_a_comment(path)
