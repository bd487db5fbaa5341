"""Every supported model family: structure, presets, the CausalLM module, and DropBP in a real Trainer.

The families are the tiny presets of ``_helpers.FAMILIES``; each test compares against the Hugging Face model's own
forward and backward. ``DROPBP_SUPPORT`` states what the DropBP tests here assert per family (the README's family
table is built from it and the other techniques' ``*_SUPPORT`` tables).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from _helpers import FAMILIES, MOE_FAMILIES, quiet_trainer_kwargs, tiny_family
from torch import nn
from torch.utils.data import DataLoader

from lit_accel.dropbp import DropBP, apply_dropbp
from lit_accel.models import CausalLM
from lit_accel.models.flops import backward_flops, sublayer_flops
from lit_accel.models.presets import FAMILY_PRESETS, preset_config
from lit_accel.models.structure import get_structure

DROPBP_SUPPORT: dict[str, str] = {
    family: ("yes (MLP sublayer = whole MoE block, router included)" if family in MOE_FAMILIES else "yes")
    for family in FAMILIES
}
"""Family -> what the DropBP tests below assert for it."""

# Per family: (attention roles, MLP roles of block 0, pre-norm?, post-norm?, q/k norm layout, MoE?)
EXPECTED: dict[str, tuple[set[str], set[str], bool, bool, str, bool]] = {
    "llama": ({"q", "k", "v", "o"}, {"gate", "up", "down"}, True, False, "none", False),
    "qwen3": ({"q", "k", "v", "o"}, {"gate", "up", "down"}, True, False, "head", False),
    "gemma2": ({"q", "k", "v", "o"}, {"gate", "up", "down"}, True, True, "none", False),
    "gemma3": ({"q", "k", "v", "o"}, {"gate", "up", "down"}, True, True, "head", False),
    "phi3": ({"qkv", "o"}, {"gate_up", "down"}, True, False, "none", False),
    "olmo2": ({"q", "k", "v", "o"}, {"gate", "up", "down"}, False, True, "projection", False),
    "mixtral": ({"q", "k", "v", "o"}, set(), True, False, "none", True),
    "qwen3_moe": ({"q", "k", "v", "o"}, set(), True, False, "head", True),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_structure_of_each_family(family: str) -> None:
    model = tiny_family(family)
    s = get_structure(model)
    attn_roles, mlp_roles, pre, post, qk, moe = EXPECTED[family]
    block = s.blocks[0]
    assert set(block.attention.roles) == attn_roles and set(block.mlp.roles) == mlp_roles
    assert (block.attention.norm is not None, block.attention.post_norm is not None) == (pre, post)
    assert (block.mlp.norm is not None, block.mlp.post_norm is not None) == (pre, post)
    assert s.qk_norm == qk and s.is_moe == moe
    assert (s.num_layers, s.hidden_size, s.attention.num_heads, s.attention.num_kv_heads) == (2, 128, 4, 2)
    # Every norm parameter of the blocks belongs to exactly one sublayer's norms: none is missed.
    named = dict(model.named_modules())
    owned = {f"{n}.weight" for sub in s.sublayers() for n in sub.norm_names}
    in_blocks = {n for n, p in model.named_parameters() if ".layers." in n and "norm" in n}
    assert owned == in_blocks
    # Every linear of a block is in a sublayer, and the roles cover them all (MoE blocks have none).
    block_linears = {n for n, m in named.items() if ".layers.0." in n and isinstance(m, nn.Linear)}
    assert block_linears == set(block.attention.linears) | set(block.mlp.linears)
    assert set(block.attention.roles.values()) | set(block.mlp.roles.values()) == block_linears
    if family == "phi3":
        qkv = block.attention.linear("qkv")
        a = s.attention
        assert qkv.out_features == (a.num_heads + 2 * a.num_kv_heads) * a.head_dim
        assert block.mlp.linear("gate_up").out_features == 2 * s.intermediate_size
    if family == "qwen3_moe":
        # The tiny preset keeps block 1 dense (``mlp_only_layers``): its MLP has roles and no experts.
        assert s.blocks[1].mlp.experts is None and set(s.blocks[1].mlp.roles) == {"gate", "up", "down"}


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_flops_count_the_router_and_the_active_experts_only(family: str) -> None:
    model = tiny_family(family)
    s = get_structure(model)
    mlp = s.blocks[0].mlp
    experts = mlp.experts
    assert experts is not None and experts.experts_per_token == 2 and experts.num_experts == 4
    router = model.get_submodule(str(experts.router_name))
    weights = model.get_submodule(str(experts.experts_name))
    h, i = s.hidden_size, experts.intermediate_size
    assert router.weight.shape == (experts.num_experts, h)
    assert weights.gate_up_proj.shape == (experts.num_experts, 2 * i, h)
    per_token = 2 * h * experts.num_experts + 2 * 2 * 3 * h * i  # router + top-2 of SwiGLU experts
    assert sublayer_flops(s, mlp, seq_len=16) == per_token
    assert backward_flops(s, mlp, seq_len=16, batch_tokens=3) == 2 * 3 * per_token


def _params(model: nn.Module) -> int:
    seen: dict[int, int] = {}
    for p in model.parameters():
        seen[id(p)] = p.numel()
    return sum(seen.values())


# The parameter counts of the released models whose shapes the presets copy (the MoE preset keeps 4 of 48 blocks).
RELEASED = {
    "qwen3-0.6b": 0.596e9,
    "gemma2-2b": 2.614e9,
    "gemma3-1b": 1.000e9,
    "phi3-mini": 3.821e9,
    "olmo2-1b": 1.485e9,
    "qwen3-moe-3b": 3.115e9,
}


@pytest.mark.parametrize("name", list(RELEASED))
def test_family_presets_have_the_released_shapes(name: str) -> None:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(preset_config(name))
    assert _params(model) == pytest.approx(RELEASED[name], rel=1e-3)
    get_structure(model)  # every preset is a supported architecture


def test_every_family_preset_has_a_tiny_twin() -> None:
    types = {FAMILY_PRESETS[name]["model_type"] for name in FAMILY_PRESETS}
    tiny = {FAMILY_PRESETS[name]["model_type"] for name in FAMILY_PRESETS if name.endswith("-tiny")}
    assert types == tiny
    assert set(FAMILIES.values()) - {"llama-tiny"} == {n for n in FAMILY_PRESETS if n.endswith("-tiny")}


# ---------------------------------------------------------------------------------------------------------- training


class _Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self, n: int, seq_len: int, vocab: int) -> None:
        self.data = torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.data[i]}


def _fit(module: CausalLM, steps: int, callbacks: list[L.Callback], samples: int = 32) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, callbacks=callbacks, **quiet_trainer_kwargs())
    trainer.fit(module, DataLoader(_Tokens(samples, 16, 256), batch_size=4))
    return trainer


class _Losses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        self.losses.append(float(outputs["loss"]))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_causal_lm_trains_every_family_preset(family: str) -> None:
    L.seed_everything(0)
    module = CausalLM(FAMILIES[family], config_overrides={"vocab_size": 256}, learning_rate=3e-3, warmup_steps=1)
    losses = _Losses()
    _fit(module, 6, [losses], samples=4)  # one batch, seen every step: its loss must fall
    assert all(torch.isfinite(torch.tensor(losses.losses)))
    assert losses.losses[-1] < losses.losses[0]


def _detached_branch_grads(model: nn.Module, ids: torch.Tensor, dropped: int) -> dict[str, torch.Tensor | None]:
    # The hand-written reference of a dropped sublayer: ``x + branch(x).detach()``, the branch ending at the
    # post-norm where the family has one.
    sub = get_structure(model).sublayers()[dropped]
    last = sub.post_norm if sub.post_norm is not None else sub.module

    def detach(_m: nn.Module, _args: Any, output: Any) -> Any:
        return (output[0].detach(), *output[1:]) if isinstance(output, tuple) else output.detach()

    handle = last.register_forward_hook(detach)
    try:
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
    finally:
        handle.remove()
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("dropped", [0, 1])
def test_dropbp_drops_the_whole_branch_of_every_family(family: str, dropped: int) -> None:
    model = tiny_family(family, attention_dropout=0.0)
    model.eval()  # no dropout, no MoE jitter: the two passes must compute the same function
    ids = torch.randint(0, 256, (2, 12))
    want = _detached_branch_grads(model, ids, dropped)
    controller = apply_dropbp(model)
    mask = [False] * controller.num_sublayers
    mask[dropped] = True
    controller.set_mask(mask)
    model.zero_grad(set_to_none=True)
    model(ids, labels=ids).loss.backward()
    sub = controller.sublayers[dropped]
    branch = {id(p) for m in sub.path_modules for p in m.parameters()}
    for name, p in model.named_parameters():
        if id(p) in branch:
            assert p.grad is None, f"{name} of the dropped {sub.kind} sublayer got a gradient"
        else:
            ref = want[name]
            assert ref is not None and p.grad is not None, name
            torch.testing.assert_close(p.grad, ref, rtol=1e-5, atol=1e-6, msg=name)
    controller.remove()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_dropbp_callback_in_a_trainer_on_every_family(family: str) -> None:
    L.seed_everything(0)
    module = CausalLM(FAMILIES[family], config_overrides={"vocab_size": 256}, learning_rate=1e-3, warmup_steps=1)
    cb = DropBP(target=0.5, sensitivity="auto", sensitivity_at=2)
    losses = _Losses()
    _fit(module, 8, [cb, losses])
    assert cb.num_sublayers == 4 and cb.measured
    assert cb.allocated_rates is not None and len(cb.allocated_rates) == 4 and max(cb.allocated_rates) > 0
    assert all(torch.isfinite(torch.tensor(losses.losses)))


def test_family_table_is_current() -> None:
    import make_family_table as table  # tests/models is on sys.path while its tests run

    block = table.table()
    for column, (path, name) in table.COLUMNS.items():
        support = getattr(table._load(path), name)
        assert set(support) == set(FAMILIES), f"{path}::{name} must state every family for column {column!r}"
    assert set(table.ROWS) == set(FAMILIES)
    stale = [str(p) for p, current in table.current_blocks().items() if current != block]
    assert not stale, f"{stale} hold an old family table; run python tests/models/make_family_table.py"
