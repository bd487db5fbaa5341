"""Strategy names: ours registered next to Lightning's, resolvable with overrides, an unknown name explained, and the
same names through LitAccelCLI (registered name, class_path + init_args)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, StrategyRegistry

import lit_accel.strategies
from lit_accel.cli import LitAccelCLI
from lit_accel.strategies import (
    LitDeepSpeedStrategy,
    check_cli_strategy,
    check_strategy_name,
    lit_strategy_names,
    resolve_strategy,
)

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[2]
EXPECTED = {
    "lit_deepspeed_stage_1": (1, False, False),
    "lit_deepspeed_stage_2": (2, False, False),
    "lit_deepspeed_stage_3": (3, False, False),
    "lit_deepspeed_stage_2_offload": (2, True, False),
    "lit_deepspeed_stage_3_offload": (3, True, True),
}


def _zero(strategy: object) -> dict:
    assert isinstance(strategy, LitDeepSpeedStrategy)
    assert isinstance(strategy.config, dict)
    return strategy.config["zero_optimization"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_name_is_registered_and_builds_its_stage(name: str) -> None:
    assert name in StrategyRegistry and StrategyRegistry[name]["strategy"] is LitDeepSpeedStrategy
    assert StrategyRegistry[name]["description"]
    stage, offload_optimizer, offload_param = EXPECTED[name]
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=name, logger=False)
    zero = _zero(trainer.strategy)
    assert zero["stage"] == stage
    assert ("offload_optimizer" in zero, "offload_param" in zero) == (offload_optimizer, offload_param)
    assert zero["overlap_comm"] is True and zero["contiguous_gradients"] is True
    assert trainer.strategy.config["zero_allow_untested_optimizer"] is True
    # Sizes are left for set-up, where they are derived from the model.
    assert "reduce_bucket_size" not in zero and "allgather_bucket_size" not in zero


def test_names_are_ours_and_lightnings_stay_lightnings() -> None:
    assert lit_strategy_names() == [*EXPECTED, "lit_ddp"]
    assert type(StrategyRegistry.get("deepspeed_stage_2")) is DeepSpeedStrategy
    assert isinstance(StrategyRegistry.get("ddp"), DDPStrategy)
    lit_accel.strategies.register_strategies()  # idempotent (a re-import, a second call)
    assert StrategyRegistry["lit_deepspeed_stage_3"]["init_params"] == {"stage": 3}


def test_lit_ddp_is_lightnings_ddp_with_bucket_views_and_larger_buckets() -> None:
    assert StrategyRegistry["lit_ddp"]["strategy"] is DDPStrategy and StrategyRegistry["lit_ddp"]["description"]
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy="lit_ddp", logger=False)
    assert type(trainer.strategy) is DDPStrategy
    assert trainer.strategy._ddp_kwargs == {"gradient_as_bucket_view": True, "bucket_cap_mb": 100}
    # An argument given wins over the registered default; the others stay.
    strategy = resolve_strategy("lit_ddp", bucket_cap_mb=25, find_unused_parameters=True)
    assert isinstance(strategy, DDPStrategy)
    assert strategy._ddp_kwargs == {
        "gradient_as_bucket_view": True,
        "bucket_cap_mb": 25,
        "find_unused_parameters": True,
    }
    with pytest.raises(ValueError, match="Unknown strategy 'lit_dpp'.*Did you mean 'lit_ddp'"):
        resolve_strategy("lit_dpp")


def test_resolve_strategy_applies_overrides_over_the_registered_arguments() -> None:
    strategy = resolve_strategy("lit_deepspeed_stage_3_offload", config={"zero_optimization": {"sub_group_size": 7}})
    zero = _zero(strategy)
    assert zero["stage"] == 3 and zero["sub_group_size"] == 7 and "offload_param" in zero
    assert _zero(resolve_strategy("LIT_DEEPSPEED_STAGE_1"))["stage"] == 1  # the Trainer lower-cases names too


def test_unknown_name_lists_ours_and_lightnings() -> None:
    with pytest.raises(ValueError) as err:
        resolve_strategy("lit_deepspeed_stage_4")
    text = str(err.value)
    assert "Unknown strategy 'lit_deepspeed_stage_4'" in text and "Did you mean 'lit_deepspeed_stage_" in text
    for name in [*EXPECTED, "auto", "ddp", "deepspeed_stage_3", "fsdp"]:
        assert name in text, name
    with pytest.raises(ValueError, match="Unknown strategy 'zero3'.*lit_deepspeed_stage_3_offload.*ddp_spawn"):
        check_strategy_name("zero3")


def test_check_strategy_name_passes_known_names_instances_and_dicts() -> None:
    for ok in ("auto", "ddp", "DeepSpeed_Stage_2", "lit_deepspeed_stage_2", DDPStrategy(), None, {"class_path": "x"}):
        check_strategy_name(ok)
    check_cli_strategy({"fit": {"trainer": {"strategy": "lit_deepspeed_stage_1"}}}, "fit")
    with pytest.raises(ValueError, match="Unknown strategy 'nope'"):
        check_cli_strategy({"fit": {"trainer": {"strategy": "nope"}}}, "fit")


class _CheckingCLI(LitAccelCLI):
    """LitAccelCLI with the hook the brief proposes for lit_accel/cli.py."""

    def before_instantiate_classes(self) -> None:
        check_cli_strategy(self.config, self.subcommand)


def _cli_args(strategy: str) -> list[str]:
    # Build on the CPU, as tests/test_configs.py does, with the strategy under test.
    return [
        "--config",
        str(ROOT / "configs" / "quickstart.yaml"),
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        f"--trainer.strategy={strategy}",
        "--trainer.logger=false",
        "--trainer.callbacks=[]",
    ]


def test_cli_takes_a_registered_name_and_rejects_an_unknown_one(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = _CheckingCLI(args=_cli_args("lit_deepspeed_stage_3"), run=False)
    assert _zero(cli.trainer.strategy)["stage"] == 3
    with pytest.raises(ValueError, match="Unknown strategy 'lit_deepspeed_stage3'.*lit_deepspeed_stage_3"):
        _CheckingCLI(args=_cli_args("lit_deepspeed_stage3"), run=False)
    with pytest.raises(ValueError, match="Unknown strategy 'deepspeed_stage_5'.*Did you mean"):
        _CheckingCLI(args=["fit", *_cli_args("deepspeed_stage_5")])  # with a subcommand, before anything runs


def test_cli_takes_class_path_and_init_args_with_a_deepspeed_config(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    strategy = (
        "{class_path: lit_accel.strategies.LitDeepSpeedStrategy, init_args: {stage: 3, offload_optimizer: true,"
        " cpu_adam: false, config: {zero_optimization: {reduce_bucket_size: 12345, stage3_max_live_parameters: 1e8}}}}"
    )
    cli = _CheckingCLI(args=_cli_args(strategy), run=False)
    zero = _zero(cli.trainer.strategy)
    assert zero["stage"] == 3 and zero["reduce_bucket_size"] == 12345 and zero["stage3_max_live_parameters"] == 1e8
    assert "offload_optimizer" in zero and cli.trainer.strategy.config["zero_force_ds_cpu_optimizer"] is False
