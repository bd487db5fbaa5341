"""Throughput callback, the W&B logger's offline/online decision and the W&B chart helper."""

from __future__ import annotations

import warnings
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
import wandb
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from lit_accel.models import CausalLM
from lit_accel.observe import (
    PEAK_FLOPS,
    BarChart,
    LineChart,
    Throughput,
    WandbCharts,
    WandbLogger,
    model_flops_per_token,
    other_loggers,
    wandb_credentials_present,
    wandb_loggers,
)


def test_throughput_logs_tokens_mfu_and_uses_model_flops(tmp_path) -> None:
    module = CausalLM("llama-tiny", warmup_steps=1)
    data = torch.randint(0, 4096, (24, 32))
    loader = DataLoader([{"input_ids": x} for x in data], batch_size=4)
    cb = Throughput(peak_flops=1e12, log_every_n_steps=2)
    logger = CSVLogger(tmp_path)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=6,
        logger=logger,
        callbacks=[cb],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        accumulate_grad_batches=1,
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=loader)
    m = cb.last_metrics
    assert m["throughput/tokens_per_sec"] > 0 and m["throughput/step_time_ms"] > 0
    expected = model_flops_per_token(module, 32)
    assert cb.resolved_flops_per_token == pytest.approx(expected) and cb.settings.flops_per_token is None
    # tokens/s x FLOPs/token over the peak is the MFU, by definition.
    assert m["throughput/mfu"] == pytest.approx(m["throughput/tokens_per_sec_per_device"] * expected / 1e12)
    # 6N is the dominant term; the attention term adds a little on top.
    n_matmul = sum(p.numel() for n, p in module.model.named_parameters() if p.ndim == 2 and "embed" not in n)
    assert 6 * n_matmul <= expected < 6 * n_matmul * 1.5
    logger.save()
    text = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "throughput/tokens_per_sec" in text


def test_throughput_counts_optimizer_steps_under_accumulation(tmp_path) -> None:
    module = CausalLM("llama-tiny", warmup_steps=1)
    loader = DataLoader([{"input_ids": x} for x in torch.randint(0, 4096, (32, 16))], batch_size=2)
    cb = Throughput(log_every_n_steps=2)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=4,
        logger=False,
        callbacks=[cb],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        accumulate_grad_batches=2,
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=loader)
    # Two optimizer steps of 2 micro-batches of 2x16 tokens per logging interval.
    m = cb.last_metrics
    assert m["throughput/tokens_per_sec_per_device"] * m["throughput/step_time_ms"] / 1e3 == pytest.approx(64)
    assert "throughput/mfu" not in m  # no peak known on CPU


def test_throughput_validates_arguments() -> None:
    with pytest.raises(ValueError, match="peak_flops must be > 0"):
        Throughput(peak_flops=0)
    with pytest.raises(ValueError, match="log_every_n_steps must be >= 1"):
        Throughput(log_every_n_steps=0)
    with pytest.raises(ValueError, match="flops_per_token must be > 0 FLOPs or None; got 'many'"):
        Throughput(flops_per_token="many")  # type: ignore[arg-type]
    assert PEAK_FLOPS["H100"]["half"] == 989e12 and PEAK_FLOPS["A100"]["half"] == 312e12


def test_wandb_logger_is_offline_without_credentials(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert not wandb_credentials_present()
    assert WandbLogger(save_dir=str(tmp_path / "runs")).offline is True
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert WandbLogger(save_dir=str(tmp_path / "runs")).offline is False
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert WandbLogger(save_dir=str(tmp_path / "runs")).offline is True
    assert WandbLogger(save_dir=str(tmp_path / "runs"), offline=False).offline is False
    with pytest.raises(ValueError, match="log_model=True needs an online run"):
        WandbLogger(save_dir=str(tmp_path / "runs"), offline=True, log_model=True)


class RecordingWandbLogger(WandbLogger):
    """A WandbLogger whose run is a recorder (no wandb process, no files); ``fail`` makes every log raise."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__(offline=True)
        self.logged: list[dict[str, Any]] = []
        self.fail = fail

    @property
    def experiment(self) -> Any:
        def log(payload: dict[str, Any]) -> None:
            if self.fail:
                raise RuntimeError("the run is finished")
            self.logged.append(payload)

        return SimpleNamespace(log=log)


def test_wandb_charts_log_a_table_and_its_charts_to_every_wandb_logger_from_rank_zero() -> None:
    first, second, csv = RecordingWandbLogger(), RecordingWandbLogger(), CSVLogger("unused")
    trainer = SimpleNamespace(is_global_zero=True, loggers=[first, csv, second], global_step=5)
    assert wandb_loggers(trainer) == [first, second] and other_loggers(trainer) == [csv]  # type: ignore[arg-type]
    rows = [[0, 1.0, 0.5], [1, 2.0, 0.25]]
    charts = {
        "demo/bar": BarChart("layer", "kept", "kept per layer"),
        "demo/lines": LineChart("layer", ("kept", "rate"), "kept and rate per layer"),
    }
    assert WandbCharts("Demo").log(trainer, "demo/table", ["layer", "kept", "rate"], rows, charts)  # type: ignore[arg-type]
    for logger in (first, second):
        (payload,) = logger.logged
        assert set(payload) == {"demo/table", "demo/bar", "demo/lines", "trainer/global_step"}
        assert payload["trainer/global_step"] == 5
        assert isinstance(payload["demo/table"], wandb.Table) and payload["demo/table"].data == rows
    # Other ranks log nothing, and nor does a trainer without a W&B logger.
    elsewhere = SimpleNamespace(is_global_zero=False, loggers=[first], global_step=5)
    assert not WandbCharts("Demo").log(elsewhere, "demo/table", ["layer"], [[0]])  # type: ignore[arg-type]
    assert len(first.logged) == 1


def test_wandb_charts_never_raise_and_warn_once_naming_the_callback() -> None:
    trainer = SimpleNamespace(is_global_zero=True, loggers=[RecordingWandbLogger(fail=True)], global_step=0)
    charts = WandbCharts("SomeCallback")
    with pytest.warns(UserWarning, match="SomeCallback: could not log the W&B table 'x/table'.*the run is finished"):
        assert not charts.log(trainer, "x/table", ["a"], [[1]])  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not charts.log(trainer, "x/table", ["a"], [[1]])  # type: ignore[arg-type]
    # A chart naming a column the table lacks is a failure too, reported (once) instead of raised.
    ok = SimpleNamespace(is_global_zero=True, loggers=[RecordingWandbLogger()], global_step=0)
    bad = {"x/chart": LineChart("missing", ("a",), "t")}
    with pytest.warns(UserWarning, match="Other: could not log"):
        assert not WandbCharts("Other").log(ok, "x/table", ["a"], [[1]], bad)  # type: ignore[arg-type]
