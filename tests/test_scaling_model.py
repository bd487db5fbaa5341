"""The scaling model (``benchmarks/scaling_model.py``): it reproduces every measured 1 -> 2 GPU point within its stated
tolerance, behaves as communication must (more GPUs never help, accumulation does, LoRA sends less, ZeRO-3 sends
what DeepSpeed sends), counts what lit_accel counts, and ``docs/scaling.md`` holds what it gives now."""

from __future__ import annotations

import doctest
import itertools
import sys

import pytest
from _helpers import REPO

sys.path.insert(0, str(REPO))  # benchmarks/ lives at the repository root, as in test_benchmarks

from benchmarks import scaling_docs, scaling_model
from benchmarks.scaling_model import (
    READINGS,
    SHAPES,
    STRATEGIES,
    TOLERANCE,
    UNEXPLAINED,
    VARIANTS,
    ScalingModel,
    load_records,
    variant_flops,
    variant_params,
)

COUNTS = (1, 2, 8, 64, 1024)


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return load_records()


@pytest.fixture(scope="module", params=READINGS)
def model(request: pytest.FixtureRequest, records: list[dict]) -> ScalingModel:
    return ScalingModel(records, request.param)


def test_every_measured_point_is_reproduced_within_the_tolerance(model: ScalingModel) -> None:
    points = {(p.strategy, p.variant): p for p in model.points}
    assert set(points) >= {("ddp", v) for v in VARIANTS} | {("lit_ddp", "dense"), ("lit_ddp", "dropbp")}
    assert set(UNEXPLAINED) <= set(points), "an unexplained point must be a measured one"
    for key, p in points.items():
        predicted = model.predict_point(p)
        if key in UNEXPLAINED:
            assert predicted < p.efficiency, f"{key}: the model must stay pessimistic where it cannot explain"
        else:
            assert abs(predicted - p.efficiency) <= TOLERANCE, f"{key}: model {predicted:.3f}, measured {p.efficiency}"


def test_fitted_terms_are_physical(model: ScalingModel) -> None:
    o = model.overheads
    assert o.fixed_ms > 0 and o.per_call_ms > 0
    assert (o.per_mb_ms > 0) if model.reading == "moved" else (0 < o.wire_fraction < 1)


def test_efficiency_never_rises_with_more_gpus(model: ScalingModel) -> None:
    for name, variant, strategy in itertools.product(SHAPES, VARIANTS, STRATEGIES):
        effs = [model.predict(name, variant, strategy, n).efficiency for n in COUNTS]
        assert effs[0] == 1.0
        assert all(b <= a + 1e-9 for a, b in itertools.pairwise(effs)), (name, variant, strategy, effs)


def test_gradient_accumulation_and_a_larger_batch_raise_efficiency(model: ScalingModel) -> None:
    for strategy, n in itertools.product(STRATEGIES, (8, 64, 1024)):
        base = model.predict("llama-1b", "dense", strategy, n).efficiency
        assert model.predict("llama-1b", "dense", strategy, n, batch_scale=2.0).efficiency > base
        if strategy != "lit_deepspeed_stage_3":  # ZeRO-3 gathers and reduces every micro-batch
            assert model.predict("llama-1b", "dense", strategy, n, accumulation=4).efficiency > base


def test_overlap_off_costs_efficiency(model: ScalingModel) -> None:
    for strategy in STRATEGIES:
        on, off = (model.predict("llama-7b", "dense", strategy, 64, overlap=o) for o in (True, False))
        assert off.efficiency < on.efficiency


def test_what_each_strategy_and_technique_sends(model: ScalingModel) -> None:
    for name, n in itertools.product(SHAPES, (8, 1024)):
        sent = {s: model.predict(name, "dense", s, n).moved_mb for s in STRATEGIES}
        # ZeRO-1/2 all-reduce the bf16 gradients and all-gather the parameters; ZeRO-3 gathers twice and
        # reduce-scatters: 1.5x a DDP all-reduce of the same dtype each; DDP sends fp32.
        assert sent["lit_deepspeed_stage_3"] == pytest.approx(1.5 * sent["ddp"] / 2, rel=1e-6)
        assert sent["lit_deepspeed_stage_2"] == pytest.approx(sent["lit_deepspeed_stage_3"], rel=1e-6)
        zero2, zero3 = (
            model.predict(name, "dense", s, n, accumulation=4).moved_mb
            for s in ("lit_deepspeed_stage_2", "lit_deepspeed_stage_3")
        )
        assert zero3 > zero2 > sent["lit_deepspeed_stage_2"]
        for strategy in STRATEGIES:
            lora, dense, drop = (model.predict(name, v, strategy, n).moved_mb for v in ("lora", "dense", "dropbp"))
            assert lora < dense
            # DDP all-reduces whole buckets, dropped slots included; DeepSpeed skips dropped gradients.
            assert drop == pytest.approx(dense) if STRATEGIES[strategy].zero_stage == 0 else drop < dense


def test_dropbp_shortens_the_window_that_hides_communication(model: ScalingModel) -> None:
    for name in SHAPES:
        dense, drop = model.compute[name, "dense"], model.compute[name, "dropbp"]
        assert drop.backward_ms < dense.backward_ms
        assert drop.forward_ms == pytest.approx(dense.forward_ms, rel=0.05)


def test_compute_rows_say_where_they_come_from(model: ScalingModel) -> None:
    assert set(model.compute) == set(itertools.product(SHAPES, VARIANTS))
    for (name, _), c in model.compute.items():
        assert c.ms > 0 and 0 < c.forward_ms < c.ms
        assert c.source in ("measured", "measured ratio") or c.source.startswith("FLOP-scaled from ")
        if name == "llama-125m":
            assert c.source == "measured"
    assert model.compute["llama-7b", "dense"].source == "FLOP-scaled from llama-1b"


def test_shapes_counts_and_flops_are_lit_accels(records: list[dict]) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lit_accel.models.flops import flops_per_token
    from lit_accel.models.presets import PRESETS
    from lit_accel.models.structure import get_structure

    for name, shape in SHAPES.items():
        config = dict(
            hidden_size=shape.hidden,
            num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads,
            num_key_value_heads=shape.kv_heads,
            intermediate_size=shape.intermediate,
            vocab_size=shape.vocab,
        )
        if name in PRESETS:
            assert {k: PRESETS[name][k] for k in config} == config
        with torch.device("meta"):
            hf = LlamaForCausalLM(LlamaConfig(**config))
        assert shape.params() == sum(p.numel() for p in hf.parameters())
        assert variant_flops(shape, "dense")[1] == flops_per_token(get_structure(hf), seq_len=2048)
    lora_row = next(
        r["row"] for r in records if r["suite"] == "lora" and r["result"] == "train_step" and r["row"]["trainable M"]
    )
    assert round(variant_params(SHAPES["llama-1b"], "lora")[1] / 1e6, 1) == lora_row["trainable M"]


def test_bucket_sizes_are_lit_accels() -> None:
    from lit_accel.strategies.ddp import LIT_DDP_STRATEGIES
    from lit_accel.strategies.sizing import ModelSize, derived_zero_settings

    assert STRATEGIES["lit_ddp"].bucket_mib == LIT_DDP_STRATEGIES["lit_ddp"][1]["bucket_cap_mb"]
    for shape in SHAPES.values():
        derived = derived_zero_settings(ModelSize(shape.params(), shape.hidden), stage=2)
        assert scaling_model.zero_bucket_elements(shape, shape.params()) == derived["reduce_bucket_size"]


def test_docstring_examples() -> None:
    for module in (scaling_model, scaling_docs):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0, module.__name__


def test_docs_page_is_current() -> None:
    assert (REPO / "docs" / "scaling.md").is_file()
    assert scaling_docs.main(["--check"]) == 0, "docs/scaling.md holds old tables; run python -m benchmarks model"
