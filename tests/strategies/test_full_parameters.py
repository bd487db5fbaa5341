"""``full_parameters``: whole parameters by name, edits kept; a no-op on one device, rank ``modifier_rank``'s values
everywhere under DDP (the DeepSpeed ZeRO-1/2/3 rows are in test_deepspeed_cpu.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _helpers import run_torchrun
from torch import nn

from lit_accel.models import CausalLM
from lit_accel.models.params import full_parameters, gathered

WORKER = Path(__file__).with_name("full_parameters_worker.py")
REPO = Path(__file__).resolve().parents[2]


def test_plain_module_yields_its_own_parameters_by_qualified_name() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Sequential(nn.LayerNorm(3)))
    with full_parameters(model) as params:
        assert list(params) == ["0.weight", "0.bias", "1.0.weight", "1.0.bias"]
        assert all(params[name] is p for name, p in model.named_parameters())


@pytest.mark.parametrize("modifier_rank", [None, 0])
def test_edits_stay_on_a_single_device(modifier_rank: int | None) -> None:
    model = nn.Linear(4, 3)
    before = model.weight.detach().clone()
    with full_parameters(model, modifier_rank=modifier_rank) as params, torch.no_grad():
        params["weight"][0] = 5.0
    assert (model.weight[0] == 5.0).all() and torch.equal(model.weight[1:], before[1:])


def test_a_causal_lm_submodule_and_gradients_flow_after() -> None:
    module = CausalLM("llama-tiny")
    module.configure_model()
    assert module.model is not None
    layer = module.model.model.layers[0].mlp
    with full_parameters(layer, modifier_rank=0) as params, torch.no_grad():
        assert set(params) == {"gate_proj.weight", "up_proj.weight", "down_proj.weight"}
        params["down_proj.weight"].zero_()
    assert float(layer.down_proj.weight.detach().abs().sum()) == 0.0
    loss = module(torch.randint(0, 100, (1, 8)), labels=torch.randint(0, 100, (1, 8))).loss
    loss.backward()
    assert layer.down_proj.weight.grad is not None


def test_modifier_rank_outside_the_world_is_refused() -> None:
    refused = pytest.raises(ValueError, match="modifier_rank=1 is not a rank of this world \\(size 1\\)")
    with refused, full_parameters(nn.Linear(2, 2), modifier_rank=1):
        pass


def test_gathered_is_unchanged_a_no_op_for_ordinary_parameters() -> None:
    layer = nn.Linear(2, 2)
    with gathered(list(layer.parameters()), modifier_rank=0):
        pass


def test_ddp_replicas_take_the_modifier_ranks_values(tmp_path: Path) -> None:
    r0, r1 = run_torchrun(WORKER, tmp_path, out=tmp_path, timeout=120)
    # Read-only use synchronises nothing: each rank keeps its own values.
    assert r0["read_only"]["0.bias"] == [0.0, 0.0] and r1["read_only"]["0.bias"] == [1.0, 1.0]
    assert r0["after_read"] != r1["after_read"]
    # With modifier_rank=1, every rank ends with rank 1's parameters, its edit included.
    assert r0["after_write"] == r1["after_write"]
    assert r0["after_write"]["0.weight"] == [11.0] + [1.0] * 5 and r0["after_write"]["1.bias"] == [1.0, 1.0]
    assert "modifier_rank=2 is not a rank of this world (size 2)" in r0["error"] == r1["error"]
