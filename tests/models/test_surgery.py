"""match_linears presets/patterns/errors and run_after_configure_model ordering."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from _helpers import tiny_llama
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
