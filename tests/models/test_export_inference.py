"""Exports are inference-ready: the KV cache is on in the written configs, adapters name a base PEFT can find from
any folder, and a vocabulary larger than the tokenizer is said."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM

from lit_accel.data.tokenizer import train_bpe_tokenizer
from lit_accel.lowrank import apply_lora, save_peft_adapter
from lit_accel.models import CausalLM


def _model() -> CausalLM:
    lm = CausalLM("llama-tiny", config_overrides={"vocab_size": 512})
    lm.configure_model()
    assert lm.model is not None and lm.model.config.use_cache is False  # training setting
    return lm


def test_exported_configs_turn_the_kv_cache_on(tmp_path: Path) -> None:
    lm = _model()
    out = lm.save_hf(tmp_path / "model")
    assert json.loads((out / "config.json").read_text())["use_cache"] is True
    generation = out / "generation_config.json"
    if generation.exists():
        assert json.loads(generation.read_text()).get("use_cache", True) is True
    assert lm.model is not None and lm.model.config.use_cache is False  # the live model keeps training's setting


def test_a_vocabulary_larger_than_the_tokenizer_is_said(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lm = _model()
    texts = [f"x = {i} * y + {i % 5}\n" for i in range(200)]
    small = train_bpe_tokenizer(texts, 300)
    with caplog.at_level(logging.INFO):
        lm.save_hf(tmp_path / "a", tokenizer=small)  # 512 > 300 rounded up to 384
    assert re.search(r"vocab_size \(512\) is larger than its tokenizer \(\d+ tokens\)", caplog.text)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        lm.save_hf(tmp_path / "b", tokenizer=train_bpe_tokenizer(texts * 3, 450))  # 512: padding of 450, fine
    assert "larger than its tokenizer" not in caplog.text


def test_adapter_config_names_the_base_by_absolute_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lm = _model()
    base = lm.save_hf(tmp_path / "base")
    assert lm.model is not None
    apply_lora(lm.model, r=4)
    monkeypatch.chdir(tmp_path)
    adapter = save_peft_adapter(lm.model, "adapter", base_model_name_or_path="base")
    recorded = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(base.resolve())
    monkeypatch.chdir(tmp_path.parent)  # elsewhere: PEFT still finds the base
    model = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / adapter))
    ids = torch.randint(0, 512, (1, 8))
    assert model(ids).logits.shape == (1, 8, 512)
