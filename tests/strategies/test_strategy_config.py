"""LitDeepSpeedStrategy's config: LLM defaults, settings derived from the model's size, and the user's values
(init arguments, ``config`` dict / JSON file / env var, either DeepSpeed name of a key) always winning."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
from torch import nn

from lit_accel.models import CausalLM
from lit_accel.strategies import LitDeepSpeedStrategy, ModelSize, derived_zero_settings, model_size
from lit_accel.strategies.sizing import BUCKET_FLOOR

pytest.importorskip("deepspeed")

TINY = ModelSize(num_params=1_000_000, hidden_size=128)
ONE_B = ModelSize(num_params=1_100_000_000, hidden_size=2048)
SEVEN_B = ModelSize(num_params=6_700_000_000, hidden_size=4096)


def _zero(strategy: LitDeepSpeedStrategy) -> dict:
    assert isinstance(strategy.config, dict)
    return strategy.config["zero_optimization"]


# ---------------------------------------------------------------------------------------------- the rule
def test_rule_scales_with_hidden_size_between_floor_and_model_size() -> None:
    assert derived_zero_settings(SEVEN_B, 2) == {"reduce_bucket_size": 4096**2, "allgather_bucket_size": 4096**2}
    assert derived_zero_settings(SEVEN_B, 3) == {
        "reduce_bucket_size": 4096**2,
        "stage3_prefetch_bucket_size": int(0.9 * 4096**2),
        "stage3_param_persistence_threshold": 40960,
    }
    # d*d of a 1B model (2048^2) sits at the floor; 0.9*d*d is raised to it.
    assert derived_zero_settings(ONE_B, 3)["stage3_prefetch_bucket_size"] == BUCKET_FLOOR
    # A model smaller than the floor: buckets of the whole model, never more.
    assert derived_zero_settings(TINY, 1) == {"reduce_bucket_size": 1_000_000, "allgather_bucket_size": 1_000_000}
    # Unknown parameter count: the floor alone; unknown width or ZeRO off: nothing derived.
    assert derived_zero_settings(ModelSize(None, 128), 2)["reduce_bucket_size"] == BUCKET_FLOOR
    assert derived_zero_settings(ModelSize(10**9, None), 3) == {} and derived_zero_settings(SEVEN_B, 0) == {}
    # Capped at DeepSpeed's own default.
    assert derived_zero_settings(ModelSize(None, 40_000), 2)["reduce_bucket_size"] == 500_000_000


def test_model_size_reads_configs_embeddings_and_linears() -> None:
    module = CausalLM("llama-tiny")
    assert model_size(module) == ModelSize(num_params=None, hidden_size=128)  # before configure_model
    module.configure_model()
    size = model_size(module)
    assert size.hidden_size == 128 and size.num_params == sum(p.numel() for p in module.parameters())
    assert model_size(nn.Sequential(nn.Embedding(10, 48), nn.Linear(48, 96))).hidden_size == 48
    assert model_size(nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 32), nn.Linear(32, 8))).hidden_size == 32
    assert model_size(nn.Module()) == ModelSize(None, None)


# ---------------------------------------------------------------------------------------------- derived vs given
def test_unset_sizes_are_derived_at_setup_and_recorded() -> None:
    strategy = LitDeepSpeedStrategy(stage=3)
    filled = strategy.derive_defaults(SEVEN_B, before_partitioning=True)
    assert filled == {"stage3_param_persistence_threshold": 40960}  # all zero.Init reads
    strategy.derive_defaults(SEVEN_B)
    zero = _zero(strategy)
    assert zero["reduce_bucket_size"] == 4096**2 and zero["stage3_prefetch_bucket_size"] == int(0.9 * 4096**2)
    assert strategy.derived == {f"zero_optimization.{k}": v for k, v in derived_zero_settings(SEVEN_B, 3).items()}
    assert "derived: stage3_param_persistence_threshold=40960" in strategy.describe()


def test_init_arguments_win_over_derived_values() -> None:
    strategy = LitDeepSpeedStrategy(stage=2, reduce_bucket_size=123, allgather_bucket_size=456)
    assert strategy.derive_defaults(SEVEN_B) == {}
    assert (_zero(strategy)["reduce_bucket_size"], _zero(strategy)["allgather_bucket_size"]) == (123, 456)
    strategy = LitDeepSpeedStrategy(stage=3, prefetch_bucket_size=7, param_persistence_threshold=8)
    strategy.derive_defaults(SEVEN_B)
    zero = _zero(strategy)
    assert (zero["stage3_prefetch_bucket_size"], zero["stage3_param_persistence_threshold"]) == (7, 8)
    assert zero["reduce_bucket_size"] == 4096**2 and set(strategy.derived) == {"zero_optimization.reduce_bucket_size"}


@pytest.mark.parametrize("key", ["prefetch_bucket_size", "stage3_prefetch_bucket_size"])
def test_config_values_win_under_either_deepspeed_name(key: str) -> None:
    strategy = LitDeepSpeedStrategy(stage=3, config={"zero_optimization": {key: 99, "reduce_bucket_size": 5e7}})
    strategy.derive_defaults(SEVEN_B)
    zero = _zero(strategy)
    assert zero[key] == 99 and zero["reduce_bucket_size"] == 5e7
    other = {"prefetch_bucket_size", "stage3_prefetch_bucket_size"} - {key}
    assert not other & set(zero)  # never both names (DeepSpeed would see two values)
    assert set(strategy.derived) == {"zero_optimization.stage3_param_persistence_threshold"}


def test_config_wins_over_init_arguments_and_merges_with_them() -> None:
    strategy = LitDeepSpeedStrategy(
        stage=2,
        reduce_bucket_size=1,
        offload_optimizer=True,
        config={"zero_optimization": {"stage": 3, "reduce_bucket_size": 2, "offload_optimizer": {"pin_memory": True}}},
    )
    zero = _zero(strategy)
    assert zero["stage"] == 3 and zero["reduce_bucket_size"] == 2 and strategy.zero_stage_3
    # Nested sections merge: the init arguments' offload section keeps its device, the user's pin_memory wins.
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_optimizer"]["pin_memory"] is True
    assert zero["overlap_comm"] is True  # a default the user's config did not mention stays


def test_auto_asks_for_the_derived_value_and_lightning_fills_its_own_keys() -> None:
    hf_style = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "bf16": {"enabled": "auto"},
        "zero_optimization": {
            "stage": 3,
            "reduce_bucket_size": "auto",
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
        },
    }
    strategy = LitDeepSpeedStrategy(config=hf_style)
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping", "bf16"):
        assert key not in strategy.config, key  # Lightning sets them from the Trainer
    strategy.derive_defaults(SEVEN_B)
    assert _zero(strategy)["stage3_param_persistence_threshold"] == 40960
    assert hf_style["zero_optimization"]["reduce_bucket_size"] == "auto"  # the caller's dict is not modified
    unknown = LitDeepSpeedStrategy(config={"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}})
    unknown.derive_defaults(ModelSize(None, None))
    assert "reduce_bucket_size" not in _zero(unknown)  # nothing to derive from: DeepSpeed's default


def test_config_from_a_json_file_and_from_the_environment(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1, "reduce_bucket_size": 77}}))
    zero = _zero(LitDeepSpeedStrategy(stage=3, config=str(path)))
    assert zero["stage"] == 1 and zero["reduce_bucket_size"] == 77 and zero["overlap_comm"] is True
    monkeypatch.setenv("PL_DEEPSPEED_CONFIG_PATH", str(path))
    assert _zero(LitDeepSpeedStrategy())["reduce_bucket_size"] == 77


def test_invalid_arguments_are_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="stage=4; allowed: 0, 1, 2, 3"):
        LitDeepSpeedStrategy(stage=4)
    with pytest.raises(ValueError, match="reduce_bucket_size=-1"):
        LitDeepSpeedStrategy(reduce_bucket_size=-1)
    with pytest.raises(ValueError, match="offload_param .*needs ZeRO stage 3, got stage=2"):
        LitDeepSpeedStrategy(stage=2, offload_parameters=True)
    LitDeepSpeedStrategy(stage=2, config={"zero_optimization": {"offload_param": {"device": "none"}}})


def test_offload_keeps_deepspeeds_cpu_optimizer_check_unless_cpu_adam_is_off() -> None:
    assert "zero_force_ds_cpu_optimizer" not in LitDeepSpeedStrategy(stage=2, offload_optimizer=True).config
    strategy = LitDeepSpeedStrategy(stage=2, offload_optimizer=True, cpu_adam=False)
    assert strategy.config["zero_force_ds_cpu_optimizer"] is False
    given = LitDeepSpeedStrategy(cpu_adam=False, config={"zero_force_ds_cpu_optimizer": True})
    assert given.config["zero_force_ds_cpu_optimizer"] is True


# ---------------------------------------------------------------------------------------------- precision
def _precision(strategy: LitDeepSpeedStrategy, precision: str | None = None) -> str:
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=strategy, precision=precision, logger=False)  # type: ignore[arg-type]
    strategy.choose_precision()
    return str(trainer.precision)


def test_bf16_is_the_default_unless_refused_or_given_otherwise() -> None:
    strategy = LitDeepSpeedStrategy()
    with pytest.warns(UserWarning, match="trains in bf16 .*To train in fp32, pass bf16=False"):
        assert _precision(strategy) == "bf16-mixed"
    assert strategy.derived == {"precision": "bf16-mixed"}
    assert _precision(LitDeepSpeedStrategy(bf16=False)) == "32-true"
    assert _precision(LitDeepSpeedStrategy(), "16-mixed") == "16-mixed"
    assert _precision(LitDeepSpeedStrategy(config={"fp16": {"enabled": True}})) == "16-mixed"
    assert _precision(LitDeepSpeedStrategy(config={"bf16": {"enabled": False}})) == "32-true"
    given = LitDeepSpeedStrategy(config={"bf16": {"enabled": True}})
    assert _precision(given) == "bf16-mixed" and given.derived == {}
    with pytest.raises(ValueError, match="bf16=True conflicts with the Trainer's precision='16-mixed'"):
        _precision(LitDeepSpeedStrategy(bf16=True), "16-mixed")


def test_describe_names_stage_offload_and_size() -> None:
    strategy = LitDeepSpeedStrategy(stage=3, offload_optimizer=True, offload_parameters=True)
    strategy.model_size = SEVEN_B
    strategy.derive_defaults(SEVEN_B)
    text = strategy.describe()
    assert "ZeRO stage 3 + offload_optimizer, offload_param, fp32" in text
    assert "6,700.0M parameters, hidden size 4096" in text and f"reduce_bucket_size={4096**2}" in text
