"""Tests for lit_accel.models.flops against PaLM's hand-computed formula."""

from __future__ import annotations

from typing import Any

import pytest
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, LlamaModel

from lit_accel.models.flops import backward_flops, flops_per_token, lm_head_flops, sublayer_flops
from lit_accel.models.structure import get_structure

CFG: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
)


def test_llama_matches_palm_formula() -> None:
    s = get_structure(LlamaForCausalLM(LlamaConfig(**CFG)))
    d, f, v, n_layers, heads, kv, q = 64, 176, 128, 3, 4, 2, 16
    seq = 40
    # N: non-embedding matmul weights + LM head (biases, norms and the embedding excluded).
    attn = d * heads * q + 2 * d * kv * q + heads * q * d
    mlp = 3 * d * f
    n = n_layers * (attn + mlp) + d * v
    palm = 6 * n + 12 * n_layers * heads * q * seq
    assert flops_per_token(s, seq) == palm
    assert flops_per_token(s, seq, training=False) == palm / 3
    assert flops_per_token(s, seq, include_lm_head=False) == palm - 6 * d * v
    assert lm_head_flops(s, batch_tokens=5) == 5 * 2 * d * v
    assert n == s.num_parameters(linears_only=True)


def test_sublayer_and_backward_flops() -> None:
    s = get_structure(LlamaForCausalLM(LlamaConfig(**CFG)))
    a, m = s.blocks[0].attention, s.blocks[0].mlp
    assert sublayer_flops(s, m, seq_len=10) == 2 * 3 * 64 * 176
    attn_fwd = 2 * (64 * 64 * 2 + 64 * 32 * 2) + 4 * 10 * 4 * 16
    assert sublayer_flops(s, a, seq_len=10) == attn_fwd
    assert sublayer_flops(s, a, seq_len=10, batch_tokens=8) == 8 * attn_fwd
    assert backward_flops(s, a, seq_len=10, batch_tokens=8) == 16 * attn_fwd
    total = sum(sublayer_flops(s, x, 10) + backward_flops(s, x, 10) for x in s.sublayers()) + 3 * lm_head_flops(s)
    assert total == flops_per_token(s, 10)
    with pytest.raises(ValueError, match="seq_len"):
        sublayer_flops(s, a, seq_len=0)


def test_base_model_and_gpt2() -> None:
    base = get_structure(LlamaModel(LlamaConfig(**CFG)))
    full = get_structure(LlamaForCausalLM(LlamaConfig(**CFG)))
    assert lm_head_flops(base) == 0
    assert flops_per_token(base, 16) == flops_per_token(full, 16, include_lm_head=False)
    g = get_structure(GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=32)))
    # GPT-2 Conv1D weights are [in, out]; per block 4d^2 (qkv + o) + 8d^2 (MLP), 2 blocks, tied head d*v.
    n = 2 * 12 * 64 * 64 + 64 * 128
    assert flops_per_token(g, 32) == 6 * n + 12 * 2 * 4 * 16 * 32
