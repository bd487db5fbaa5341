"""LoRA layers that share an input (q/k/v, gate/up) computed as one group: same results, same hooks, safe fallbacks.

On the CPU groups are off by default (the per-layer path there is PEFT's exact computation); these tests turn them on
for the CPU through ``_GROUP_DEVICES`` and compare against the per-layer path in fp64.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from lora_helpers import VOCAB, randomize_adapters, tiny_gpt2, tiny_llama

import lit_accel.lowrank.lora_groups as groups_mod
from lit_accel.lowrank.lora import LoRALinear, apply_lora, group_shared_inputs, lora_layers
from lit_accel.lowrank.lora_groups import SharedInputGroup


@pytest.fixture
def groups_on_cpu(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Groups run on the CPU; yields a list that grows by one per group computation."""
    calls: list[int] = []
    real = groups_mod.lora_linear_group_kernel

    def counting(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(groups_mod, "_GROUP_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(groups_mod, "lora_linear_group_kernel", counting)
    yield calls


def _model(**kwargs: object) -> torch.nn.Module:
    model = tiny_llama(layers=2).double().train()
    apply_lora(model, r=4, alpha=8, **kwargs)  # type: ignore[arg-type]
    randomize_adapters(model)
    return model.double()


def _loss_and_grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    loss = model(input_ids=ids, labels=ids).loss
    params = [p for p in model.parameters() if p.requires_grad]
    return loss.detach(), list(torch.autograd.grad(loss, params))


def test_apply_lora_groups_siblings_that_share_an_input() -> None:
    model = tiny_llama(layers=2)
    apply_lora(model, r=4, alpha=8)
    layers = lora_layers(model)
    for i in range(2):
        attn = [layers[f"model.layers.{i}.self_attn.{n}_proj"] for n in "qkv"]
        mlp = [layers[f"model.layers.{i}.mlp.{n}_proj"] for n in ("gate", "up")]
        assert attn[0].shared_input_group is not None and attn[0].shared_input_group.members == attn
        assert mlp[0].shared_input_group is not None and mlp[0].shared_input_group.members == mlp
        assert layers[f"model.layers.{i}.self_attn.o_proj"].shared_input_group is None
        assert layers[f"model.layers.{i}.mlp.down_proj"].shared_input_group is None
    # Only the adapted members group; a lone adapted sibling runs on its own.
    partial = tiny_llama(layers=1)
    apply_lora(partial, targets=["q_proj", "v_proj", "gate_proj"], r=4, alpha=8)
    got = lora_layers(partial)
    group = got["model.layers.0.self_attn.q_proj"].shared_input_group
    assert group is not None and group.members == [got["model.layers.0.self_attn.q_proj"],
                                                    got["model.layers.0.self_attn.v_proj"]]  # fmt: skip
    assert group.roles == ("q", "v")
    assert got["model.layers.0.mlp.gate_proj"].shared_input_group is None
    # GPT-2's q/k/v is one Conv1D: nothing to group.
    gpt2 = tiny_gpt2(layers=1)
    apply_lora(gpt2, r=4, alpha=8)
    assert all(layer.shared_input_group is None for layer in lora_layers(gpt2).values())


def test_groups_equal_the_per_layer_path(groups_on_cpu: list[int]) -> None:
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    model = _model()
    loss_g, grads_g = _loss_and_grads(model, ids)
    assert len(groups_on_cpu) == 4  # q/k/v and gate/up of two blocks, once each
    for layer in lora_layers(model).values():
        layer.shared_input_group = None
    loss_p, grads_p = _loss_and_grads(model, ids)
    assert len(groups_on_cpu) == 4
    torch.testing.assert_close(loss_g, loss_p, rtol=1e-12, atol=1e-12)
    assert len(grads_g) == len(grads_p) == 2 * 14
    for a, b in zip(grads_g, grads_p):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_group_falls_back_when_it_cannot_serve_the_call(groups_on_cpu: list[int]) -> None:
    model = _model()
    attn = model.model.layers[0].self_attn
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    x = torch.randn(2, 3, 64, dtype=torch.float64)

    def alone(layer: LoRALinear, inp: torch.Tensor) -> torch.Tensor:
        group, layer.shared_input_group = layer.shared_input_group, None
        try:
            return layer(inp)
        finally:
            layer.shared_input_group = group

    # Served from the group: one computation for the three calls.
    outs = [q(x), k(x), v(x)]
    assert len(groups_on_cpu) == 1
    for layer, y in zip((q, k, v), outs):
        torch.testing.assert_close(y, alone(layer, x), rtol=1e-12, atol=1e-12)
    # Another tensor with the same values is another input: k computes its own group (and q its own after that).
    q(x)
    y_k = k(x.clone())
    assert len(groups_on_cpu) == 3
    torch.testing.assert_close(y_k, alone(k, x), rtol=1e-12, atol=1e-12)
    # An input changed in place after the group ran is not served the stale outputs.
    x2 = x.clone()
    q(x2)
    x2.mul_(2)
    torch.testing.assert_close(k(x2), alone(k, x2), rtol=1e-12, atol=1e-12)
    # Another grad mode: k is not served an output made without autograd.
    with torch.no_grad():
        q(x)
    y_k = k(x)
    assert y_k.grad_fn is not None and len(groups_on_cpu) == 7
    # Dropout in training mode: every layer draws its own mask, so no group.
    before = len(groups_on_cpu)
    for layer in (q, k, v):
        layer.dropout = 0.1
    q(x), k(x), v(x)
    assert len(groups_on_cpu) == before
    model.eval()
    q(x), k(x), v(x)
    assert len(groups_on_cpu) == before + 1
    # A merged member: the base alone, no group.
    for layer in (q, k, v):
        layer.dropout = 0.0
    k.merge()
    torch.testing.assert_close(k(x), k.base_layer(x), rtol=0, atol=0)
    q(x)
    assert len(groups_on_cpu) == before + 1


def test_group_shared_inputs_without_a_known_structure_groups_nothing() -> None:
    layer = LoRALinear(torch.nn.Linear(8, 8), r=2, alpha=4)
    model = torch.nn.Sequential(layer)
    assert group_shared_inputs(model) == []
    assert layer.shared_input_group is None
    group = SharedInputGroup([layer])
    assert group.output(layer, torch.randn(2, 8)) is None  # a CPU tensor: the layer runs alone


def test_inference_mode_and_foreign_members_run_alone(groups_on_cpu: list[int]) -> None:
    model = _model().eval()
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    before = len(groups_on_cpu)
    # Inference tensors have no version counter: the group steps aside instead of failing (Lightning validates,
    # tests and predicts under inference_mode).
    with torch.inference_mode():
        got = model(input_ids=ids).logits
    assert len(groups_on_cpu) == before
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # A layer that is not a member (e.g. an nn.DataParallel replica sharing the group object) runs alone.
    attn = model.model.layers[0].self_attn
    stranger = LoRALinear(torch.nn.Linear(64, 64).double(), r=2, alpha=4)
    assert attn.q_proj.shared_input_group.output(stranger, torch.randn(2, 64, dtype=torch.float64)) is None


def test_partitioned_sibling_is_refused_even_when_the_weight_is_cast(groups_on_cpu: list[int]) -> None:
    model = tiny_llama(layers=1).float().train()
    apply_lora(model, r=4, alpha=8)
    attn = model.model.layers[0].self_attn
    attn.k_proj.base_layer.weight.ds_id = 7  # what a DeepSpeed ZeRO-3 partition carries
    x = torch.randn(2, 3, 64, dtype=torch.float64)  # without autocast the base weight is cast to x's dtype
    attn.q_proj(x)
    assert groups_on_cpu == []


def test_a_member_on_the_peft_path_keeps_the_group_aside(groups_on_cpu: list[int]) -> None:
    model = _model()
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 3, 64, dtype=torch.float64)
    attn.k_proj.use_kernel = False  # PEFT's computation for k: the group (a fused path) steps aside for all
    attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    assert groups_on_cpu == []
