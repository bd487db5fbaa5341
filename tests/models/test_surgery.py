"""match_linears presets/patterns/errors (fused projections, mixtures of experts) and run_after_configure_model
ordering."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from _helpers import tiny_family, tiny_llama
from transformers import GPT2Config, GPT2LMHeadModel

from lit_accel.models import CausalLM
from lit_accel.models.surgery import match_linears, replace_module, run_after_configure_model


def test_presets_roles_suffixes_and_regexes() -> None:
    m = tiny_llama()
    assert len(match_linears(m, "all-linear")) == 14
    assert sorted(n.split(".")[-1] for n in match_linears(m, "attention"))[:4] == ["k_proj"] * 2 + ["o_proj"] * 2
    assert set(n.split(".")[-1] for n in match_linears(m, "mlp")) == {"gate_proj", "up_proj", "down_proj"}
    assert list(match_linears(m, ["o"])) == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    assert list(match_linears(m, "down_proj")) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert list(match_linears(m, r"layers\.1\..*q_proj")) == ["model.layers.1.self_attn.q_proj"]
    assert "lm_head" not in " ".join(match_linears(m, ".*"))
    g = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=100, bos_token_id=0, eos_token_id=0))
    assert list(match_linears(g, "qkv")) == ["transformer.h.0.attn.c_attn"]


def test_no_match_lists_the_linears() -> None:
    with pytest.raises(ValueError, match=r"targets='nope' matches no linear.*model\.layers\.0\.self_attn\.q_proj"):
        match_linears(tiny_llama(), "nope")
    with pytest.raises(ValueError, match="targets is empty"):
        match_linears(tiny_llama(), [])


def test_replace_module() -> None:
    m = tiny_llama()
    new = torch.nn.Identity()
    old = replace_module(m, "model.layers.0.mlp", new)
    assert m.model.layers[0].mlp is new and old is not new


def test_runs_after_configure_model_before_the_optimizer(tmp_path) -> None:
    seen: list[str] = []

    class _CB(L.Callback):
        def setup(self, trainer, pl_module, stage) -> None:
            run_after_configure_model(pl_module, lambda model: seen.append(type(model).__name__), tag="t")
            run_after_configure_model(pl_module, lambda model: seen.append("again"), tag="t")  # replaces

        def on_fit_start(self, trainer, pl_module) -> None:
            seen.append("optimizer" if trainer.optimizers else "no optimizer")

    module = CausalLM("llama-tiny", warmup_steps=1)
    data = [{"input_ids": torch.randint(0, 4096, (16,))} for _ in range(2)]
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[_CB()],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
    assert seen == ["again", "optimizer"]


# ------------------------------------------------------------------ families: fused projections, mixtures of experts


def _moe_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if "mixture of experts" in str(w.message)]


def test_fused_roles_resolve_and_split_roles_say_which_to_use() -> None:
    phi3 = tiny_family("phi3")
    assert list(match_linears(phi3, ["qkv", "gate_up"]))[:2] == [
        "model.layers.0.self_attn.qkv_proj",
        "model.layers.0.mlp.gate_up_proj",
    ]
    assert {n.rsplit(".", 1)[1] for n in match_linears(phi3, "mlp")} == {"gate_up_proj", "down_proj"}
    assert {n.rsplit(".", 1)[1] for n in match_linears(phi3, "o")} == {"o_proj"}  # a role, not the regex "o"
    with pytest.warns(UserWarning, match=r"Role\(s\) \['q', 'v'\] select nothing: Phi3ForCausalLM.*name 'qkv'"):
        chosen = match_linears(phi3, ["q", "v", "down"])
    assert {n.rsplit(".", 1)[1] for n in chosen} == {"down_proj"}
    # "up" is a role: it never matches gate_up_proj as a regex would.
    with pytest.raises(ValueError, match=r"targets='up' matches no linear.*name 'gate_up'"):
        match_linears(phi3, "up")


def test_mixture_of_experts_warns_once_or_refuses() -> None:
    mixtral = tiny_family("mixtral")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        chosen = match_linears(mixtral, "all-linear", technique="LoRA")
    (message,) = _moe_warnings(record)
    assert message.startswith("LoRA: targets='all-linear'") and "model_type 'mixtral'" in message
    assert "block(s) 0, 1" in message and "3-D tensors" in message and "stay dense" in message
    assert {n.rsplit(".", 1)[1] for n in chosen} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        match_linears(mixtral, "attention")
        match_linears(mixtral, r"self_attn\.q_proj")
    assert not _moe_warnings(record)
    for targets in ("mlp", ["gate", "up"], ["gate_proj", "down_proj"], r"layers\.1\.mlp"):
        with pytest.raises(ValueError, match=r"match no linear: they point at the MLP.*model_type 'mixtral'"):
            match_linears(mixtral, targets)
    with pytest.raises(ValueError, match=r"block\(s\) 1 is a mixture of experts"):
        match_linears(mixtral, r"layers\.1\.mlp")
    # Qwen3-MoE's dense mlp_only_layers MLPs are selected like any other; the MoE block is named in the warning.
    qwen = tiny_family("qwen3_moe")
    with pytest.warns(UserWarning, match=r"model_type 'qwen3_moe'\) the MLP of block\(s\) 0 is a mixture"):
        chosen = match_linears(qwen, "mlp")
    assert list(chosen) == [f"model.layers.1.mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")]


def test_router_is_never_selected() -> None:
    mixtral = tiny_family("mixtral")
    for block in mixtral.model.layers:  # a router that is an nn.Linear, as in other MoE implementations
        block.mlp.gate = torch.nn.Linear(128, 4, bias=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for targets in ("all-linear", ".*", ["q", "gate"]):
            assert not any(n.endswith(".mlp.gate") for n in match_linears(mixtral, targets))


def test_invalid_regex_names_the_pattern() -> None:
    with pytest.raises(ValueError, match=r"targets pattern 'q_proj\(' is not a valid regular expression"):
        match_linears(tiny_llama(), ["k", "q_proj("])
