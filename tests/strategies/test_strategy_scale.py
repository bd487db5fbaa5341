"""LitDeepSpeedStrategy's settings for scale (lit_accel.strategies.scale): each argument reaches the DeepSpeed config,
a key of ``config`` wins over it, DeepSpeed's unsupported combinations are refused with the argument named, ``"node"``
resolves to the devices per node at set-up, and ZeRO-3 with hpZ trains on 2 CPU processes as plain ZeRO-3 does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from deepspeed_helpers import REPO
from lightning.pytorch.strategies import DeepSpeedStrategy

from lit_accel.cli import LitAccelCLI
from lit_accel.strategies import LitDeepSpeedStrategy, resolve_strategy
from lit_accel.strategies.scale import ScaleSettings, resolve_for_world

pytest.importorskip("deepspeed")

WORKER = Path(__file__).with_name("scale_cpu_worker.py")


def _zero(strategy: object) -> dict[str, Any]:
    assert isinstance(strategy, LitDeepSpeedStrategy) and isinstance(strategy.config, dict)
    return strategy.config["zero_optimization"]


# ---------------------------------------------------------------------------------------------- reaching the config
def test_scale_arguments_reach_the_deepspeed_config() -> None:
    strategy = LitDeepSpeedStrategy(
        stage=3,
        zero_quantized_weights=True,
        zero_quantized_gradients=True,
        zero_hpz_partition_size=8,
        communication_data_type="fp32",
    )
    zero = _zero(strategy)
    assert zero["zero_quantized_weights"] is True and zero["zero_quantized_gradients"] is True
    assert zero["zero_hpz_partition_size"] == 8 and zero["stage"] == 3
    assert strategy.config["communication_data_type"] == "fp32"
    # Through a registered name, as `init_args` overrides.
    zero = _zero(resolve_strategy("lit_deepspeed_stage_3", zero_hpz_partition_size="node"))
    assert zero["zero_hpz_partition_size"] == "node"
    assert LitDeepSpeedStrategy(communication_data_type="BF16").config["communication_data_type"] == "bf16"  # type: ignore[arg-type]
    # Not given: no key, so DeepSpeed's defaults apply.
    plain = LitDeepSpeedStrategy(stage=3)
    assert not {"zero_quantized_weights", "zero_quantized_gradients", "zero_hpz_partition_size"} & set(_zero(plain))
    assert "communication_data_type" not in plain.config


def test_bucket_overlap_and_contiguity_arguments_reach_the_config() -> None:
    strategy = LitDeepSpeedStrategy(
        stage=3,
        reduce_bucket_size=11,
        allgather_bucket_size=12,
        prefetch_bucket_size=13,
        overlap_comm=False,
        contiguous_gradients=False,
    )
    zero = _zero(strategy)
    sizes = (zero["reduce_bucket_size"], zero["allgather_bucket_size"], zero["stage3_prefetch_bucket_size"])
    assert sizes == (11, 12, 13)
    assert zero["overlap_comm"] is False and zero["contiguous_gradients"] is False


def test_config_keys_win_over_scale_arguments() -> None:
    strategy = LitDeepSpeedStrategy(
        stage=3,
        zero_quantized_weights=True,
        zero_hpz_partition_size=8,
        communication_data_type="fp32",
        config={
            "zero_optimization": {"zero_quantized_weights": False, "zero_hpz_partition_size": 4},
            "communication_data_type": "bf16",
        },
    )
    zero = _zero(strategy)
    assert zero["zero_quantized_weights"] is False and zero["zero_hpz_partition_size"] == 4
    assert strategy.config["communication_data_type"] == "bf16"
    # A ZeRO++ key given only in `config` counts the same (and needs stage 3 the same).
    assert _zero(LitDeepSpeedStrategy(stage=3, config={"zero_optimization": {"zero_quantized_gradients": True}}))[
        "zero_quantized_gradients"
    ]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"stage": 2, "zero_quantized_weights": True}, r"zero_quantized_weights=True \(ZeRO\+\+\) needs ZeRO stage 3"),
        ({"stage": 1, "zero_quantized_gradients": True}, r"zero_quantized_gradients=True .*got stage=1"),
        ({"stage": 2, "zero_hpz_partition_size": "node"}, r"zero_hpz_partition_size='node' .*needs ZeRO stage 3"),
        (
            {"stage": 3, "zero_quantized_weights": True, "config": {"zero_optimization": {"stage": 2}}},
            r"zero_quantized_weights=True .*got stage=2",
        ),
        (
            {"stage": 2, "config": {"zero_optimization": {"zero_quantized_nontrainable_weights": True}}},
            r"zero_quantized_nontrainable_weights=True .*needs ZeRO stage 3",
        ),
        ({"stage": 3, "zero_hpz_partition_size": 0}, r"zero_hpz_partition_size=0; allowed: an integer >= 1"),
        ({"stage": 3, "zero_hpz_partition_size": "nodes"}, r"zero_hpz_partition_size='nodes'; allowed: .*'node'"),
        ({"stage": 3, "zero_hpz_partition_size": True}, r"zero_hpz_partition_size=True; allowed"),
        (
            {"stage": 3, "config": {"zero_optimization": {"zero_hpz_partition_size": -2}}},
            r"zero_optimization.zero_hpz_partition_size=-2; allowed",
        ),
        ({"communication_data_type": "fp8"}, r"communication_data_type='fp8'; allowed: 'fp32', 'bf16', 'fp16'"),
        ({"config": {"communication_data_type": "int8"}}, r"communication_data_type='int8'; allowed"),
        ({"zero_quantized_weights": "yes"}, r"zero_quantized_weights='yes'; allowed: True or False"),
        ({"overlap_comm": "false"}, r"overlap_comm='false'; allowed: True or False"),
        ({"contiguous_gradients": None}, r"contiguous_gradients=None; allowed: True or False"),
        ({"reduce_bucket_size": 0}, r"reduce_bucket_size=0; allowed: a number of elements > 0"),
        (
            {"stage": 3, "zero_quantized_gradients": True, "reduce_scatter": False},
            r"zero_quantized_gradients=True needs reduce_scatter=True",
        ),
        (
            {"stage": 3, "zero_quantized_weights": True, "config": {"torch_autocast": {"enabled": True}}},
            r"zero_quantized_weights=True cannot be combined with DeepSpeed's torch_autocast",
        ),
    ],
)
def test_unsupported_settings_are_refused_at_construction(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LitDeepSpeedStrategy(**kwargs)


def test_settings_alone_validate_and_give_only_what_was_given() -> None:
    assert ScaleSettings().config() == {}
    assert ScaleSettings(zero_quantized_gradients=True).config() == {
        "zero_optimization": {"zero_quantized_gradients": True}
    }
    with pytest.raises(ValueError, match="communication_data_type=3"):
        ScaleSettings(communication_data_type=3)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- at set-up
def test_resolve_for_world_resolves_node_and_checks_the_layout() -> None:
    config: dict[str, Any] = {"zero_optimization": {"stage": 3, "zero_hpz_partition_size": "node"}}
    assert resolve_for_world(config, 4, 16, 4) == {"zero_optimization.zero_hpz_partition_size": 4}
    assert config["zero_optimization"]["zero_hpz_partition_size"] == 4
    assert resolve_for_world({"zero_optimization": {"zero_hpz_partition_size": 16}}, 8, 8, 8) == {}  # clamped
    with pytest.raises(ValueError, match="zero_hpz_partition_size=3 does not divide the world size 16"):
        resolve_for_world({"zero_optimization": {"zero_hpz_partition_size": 3}}, 8, 16, 8)
    for key in ("zero_quantized_weights", "zero_quantized_gradients"):
        with pytest.raises(ValueError, match=f"{key}: ZeRO\\+\\+ quantisation runs DeepSpeed's CUDA quantizer op"):
            resolve_for_world({"zero_optimization": {key: True}}, 2, 2, None)
    quantised = {"zero_optimization": {"zero_quantized_gradients": True}}
    with pytest.raises(ValueError, match="on 3 nodes with 4 device.* each, but each process sees 8 GPU"):
        resolve_for_world(quantised, 4, 12, 8)
    assert resolve_for_world(quantised, 8, 16, 8) == {} and resolve_for_world(quantised, 4, 4, 8) == {}


def _configured(strategy: LitDeepSpeedStrategy, monkeypatch: pytest.MonkeyPatch) -> LitDeepSpeedStrategy:
    """``strategy`` in a Trainer of 2 nodes x 2 CPU devices, its config formatted as at set-up (Lightning's own
    formatting, which needs a module's batch size, left out)."""
    L.Trainer(accelerator="cpu", devices=2, num_nodes=2, strategy=strategy, logger=False)
    strategy.set_world_ranks()
    monkeypatch.setattr(DeepSpeedStrategy, "_format_config", lambda self: None)
    strategy._format_config()
    return strategy


def test_node_resolves_to_the_devices_per_node_at_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    strategy = _configured(LitDeepSpeedStrategy(stage=3, zero_hpz_partition_size="node"), monkeypatch)
    assert strategy.world_size == 4 and _zero(strategy)["zero_hpz_partition_size"] == 2
    assert strategy.derived == {"zero_optimization.zero_hpz_partition_size": 2}
    with pytest.raises(ValueError, match="zero_quantized_weights: ZeRO\\+\\+ quantisation runs DeepSpeed's CUDA"):
        _configured(LitDeepSpeedStrategy(stage=3, zero_quantized_weights=True), monkeypatch)
    with pytest.raises(ValueError, match="zero_hpz_partition_size=3 does not divide the world size 4"):
        _configured(LitDeepSpeedStrategy(stage=3, zero_hpz_partition_size=3), monkeypatch)


def test_cli_takes_the_scale_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    strategy = (
        "{class_path: lit_accel.strategies.LitDeepSpeedStrategy, init_args: {stage: 3, zero_hpz_partition_size: node,"
        " zero_quantized_gradients: true, communication_data_type: fp32}}"
    )
    args = [
        "--config",
        str(REPO / "configs" / "quickstart.yaml"),
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        f"--trainer.strategy={strategy}",
        "--trainer.logger=false",
        "--trainer.callbacks=[]",
    ]
    cli = LitAccelCLI(args=args, run=False)
    zero = _zero(cli.trainer.strategy)
    assert zero["zero_hpz_partition_size"] == "node" and zero["zero_quantized_gradients"] is True
    assert cli.trainer.strategy.config["communication_data_type"] == "fp32"  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------- training
def test_zero3_with_hpz_trains_as_plain_zero3_on_two_cpu_processes(tmp_path: Path) -> None:
    from _helpers import run_torchrun

    ranks = run_torchrun(WORKER, tmp_path, out=tmp_path, nproc=2, timeout=300)
    for rank in ranks:
        runs = rank["runs"]
        assert runs["plain"]["hpz"] == 1 and runs["hpz_node"]["hpz"] == 2 and runs["hpz_2_fp32_comm"]["hpz"] == 2
        assert runs["hpz_node"]["derived"]["zero_optimization.zero_hpz_partition_size"] == 2  # "node": 2 devices
        assert runs["hpz_2_fp32_comm"]["communication_data_type"] == "torch.float32"
        for name, run in runs.items():
            assert run["global_step"] == 4, name
            assert run["master_checks"] == {"edited_rows": True, "other_rows_unchanged": True}, name
    plain = torch.load(tmp_path / "plain.pt")
    for name in ("hpz_node", "hpz_2_fp32_comm"):
        state = torch.load(tmp_path / f"{name}.pt")
        assert state.keys() == plain.keys()
        for key in plain:  # fp32 on the CPU: the secondary partition changes where weights are gathered, not values
            torch.testing.assert_close(state[key], plain[key], rtol=0, atol=1e-6, msg=f"{name} {key}")
