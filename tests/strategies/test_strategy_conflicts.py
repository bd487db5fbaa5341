"""DeepSpeed config keys that conflict with a callback: a clear error at set-up naming the key and the callback."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lit_accel.callbacks import DropBP, LoRA, SemiStructuredSparsity, StructuredPruning, Throughput
from lit_accel.models import CausalLM
from lit_accel.strategies import CONFLICTS, ConfigConflict, LitDeepSpeedStrategy, check_callback_conflicts

pytest.importorskip("deepspeed")

OFFLOAD_PARAM = {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}


def test_parameter_offload_conflicts_with_2_4_sparsity() -> None:
    with pytest.raises(ValueError) as err:
        check_callback_conflicts(OFFLOAD_PARAM, [Throughput(), SemiStructuredSparsity()])
    text = str(err.value)
    assert text.startswith("DeepSpeed config key zero_optimization.offload_param={'device': 'cpu'} conflicts with")
    assert "callback SemiStructuredSparsity" in text and "full weights on the accelerator" in text
    assert "Fix: remove zero_optimization.offload_param" in text
    # Optimizer offload alone, or an offload section whose device is none, is fine.
    for zero in (
        {"stage": 3, "offload_param": {"device": "none"}},
        {"stage": 2, "offload_optimizer": {"device": "cpu"}},
    ):
        check_callback_conflicts({"zero_optimization": zero}, [SemiStructuredSparsity()])


def test_structured_pruning_conflicts_with_a_config_optimizer_not_with_zero3() -> None:
    pruning = StructuredPruning(param_ratio=0.5)
    for stage in (1, 2, 3):  # ZeRO-3 included: the masks and multipliers are gathered where they are read
        check_callback_conflicts({"zero_optimization": {"stage": stage}}, [pruning])
    config = {"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}
    unpruned = r"key optimizer=\{'type': 'AdamW'.*StructuredPruning.*without ever being pruned"
    with pytest.raises(ValueError, match=unpruned):
        check_callback_conflicts(config, [pruning])
    # Every conflict found is reported at once.
    with pytest.raises(ValueError) as err:
        check_callback_conflicts({**config, **OFFLOAD_PARAM}, [pruning, SemiStructuredSparsity()])
    assert str(err.value).count("conflicts with callback") == 2


def test_no_conflict_without_those_callbacks_and_subclasses_match() -> None:
    check_callback_conflicts(OFFLOAD_PARAM, [DropBP(target=0.5), LoRA(), Throughput()])
    check_callback_conflicts(None, [SemiStructuredSparsity()])

    class MySparsity(SemiStructuredSparsity):
        pass

    with pytest.raises(ValueError, match="callback SemiStructuredSparsity"):
        check_callback_conflicts(OFFLOAD_PARAM, [MySparsity()])
    custom = ConfigConflict("Throughput", "wall_clock_breakdown", lambda v: v is True, "it times steps", "drop it")
    with pytest.raises(ValueError, match="wall_clock_breakdown=True conflicts with callback Throughput"):
        check_callback_conflicts({"wall_clock_breakdown": True}, [Throughput()], rules=[*CONFLICTS, custom])


def test_the_strategy_raises_at_setup_before_deepspeed_starts() -> None:
    data = DataLoader([{"input_ids": torch.zeros(8, dtype=torch.long)}] * 2, batch_size=1)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        strategy="lit_deepspeed_stage_3_offload",
        callbacks=[SemiStructuredSparsity()],
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    with pytest.raises(ValueError, match="zero_optimization.offload_param=.*callback SemiStructuredSparsity"):
        trainer.fit(CausalLM("llama-tiny"), train_dataloaders=data)
    assert not torch.distributed.is_initialized()  # refused before any process group or engine existed
    strategy = LitDeepSpeedStrategy(stage=3, config={"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}})
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=strategy,
        callbacks=[StructuredPruning(param_ratio=0.5)],
        max_steps=1,
        logger=False,
    )
    with pytest.raises(ValueError, match="key optimizer=.* conflicts with callback StructuredPruning"):
        trainer.fit(CausalLM("llama-tiny"), train_dataloaders=data)
