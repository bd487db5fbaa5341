"""Targets, the Lagrangian constraint (ascent on the multipliers) and evaluation masks that hit the target."""

from __future__ import annotations

import pytest
import torch
from pruning_helpers import tiny_llama

from lit_accel.pruning.masks import L0Masks
from lit_accel.pruning.targets import Lagrangian, PruningTarget, constraint_loss, lagrangian_loss, ramped_target


def test_target_validation_names_argument_and_allowed() -> None:
    masks = L0Masks(tiny_llama())
    with pytest.raises(ValueError, match=r"num_kv_heads=3 must be an int in \[1, 2\]"):
        PruningTarget(num_kv_heads=3).keep(masks.shape)
    with pytest.raises(ValueError, match="param_ratio must be in"):
        PruningTarget(param_ratio=1.5)
    with pytest.raises(ValueError, match="cannot be combined"):
        PruningTarget(param_ratio=0.5, hidden_size=8)
    with pytest.raises(ValueError, match="explicit dims"):
        PruningTarget()
    with pytest.raises(ValueError, match=r"keep\['hidden'\]=0"):
        masks.set_keep({"hidden": 0})


def test_ramp_and_loss_formula() -> None:
    assert [ramped_target(0.4, s, 4) for s in (0, 2, 4, 8)] == [0.0, 0.2, 0.4, 0.4]
    s, l1, l2 = torch.tensor([0.2, 0.6]), torch.tensor(1.5), torch.tensor(3.0)
    expected = ((1.5 * -0.2 + 3.0 * 0.04) + (1.5 * 0.2 + 3.0 * 0.04)) / 2
    assert float(lagrangian_loss(s, 0.4, l1, l2)) == pytest.approx(expected)


@pytest.mark.parametrize(
    "target", [PruningTarget(num_layers=2, num_kv_heads=1, hidden_size=40), PruningTarget(param_ratio=0.6)]
)
def test_ascent_moves_expected_size_to_target(target: PruningTarget) -> None:
    masks = L0Masks(tiny_llama(layers=3))
    masks.set_keep(target.keep(masks.shape))
    lagrangian = Lagrangian(target)
    opt = torch.optim.AdamW(
        [
            {"params": masks.parameters(), "lr": 0.1, "weight_decay": 0.0},
            {"params": lagrangian.parameters(), "lr": 0.1, "weight_decay": 0.0},
        ]
    )
    finals = target.sparsities(masks.shape)
    _, first = constraint_loss(masks, target, lagrangian, step=0, warmup_steps=0)
    for step in range(150):
        loss, metrics = constraint_loss(masks, target, lagrangian, step=step, warmup_steps=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 0:
            # Sparsity below target: ascent makes lambda_1 negative, so the penalty rewards more sparsity.
            assert all(float(lagrangian.lambda_1[g].detach()) < 0 for g in finals if finals[g] > 0)
    for group, final in finals.items():
        gap0 = abs(first[f"expected_sparsity/{group}"] - final)
        gap = abs(metrics[f"expected_sparsity/{group}"] - final)
        assert gap <= 0.5 * gap0 + 0.02, (group, gap0, gap)


def test_deterministic_masks_hit_target_exactly() -> None:
    target = PruningTarget(num_layers=2, num_kv_heads=1, intermediate_size=50, hidden_size=38)
    masks = L0Masks(tiny_llama(layers=3))
    masks.set_keep(target.keep(masks.shape))
    with torch.no_grad():
        for gate in masks.groups().values():
            gate.log_alpha.normal_(0.0, 2.0)
    z = masks.eval()()
    assert int(z["head_layer"].ne(0).sum()) == 2 and int(z["mlp"].ne(0).sum()) == 2
    assert z["heads"].ne(0).sum(-1).tolist() == [1, 1, 1]
    assert z["intermediate"].ne(0).sum(-1).tolist() == [50, 50, 50]
    assert int(z["hidden"].ne(0).sum()) == 38
    # The kept units are those with the largest log_alpha.
    top = torch.topk(masks.hidden.log_alpha.detach(), 38).indices
    assert bool(z["hidden"][top].ne(0).all())
