"""Tiny LLaMA and Qwen2 models with grouped-query attention for the pruning tests."""

from __future__ import annotations

import torch
from _helpers import tiny_llama as _tiny_llama
from transformers import LlamaForCausalLM, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM


def tiny_llama(layers: int = 2, tied: bool = False) -> LlamaForCausalLM:
    """hidden 64, 4 query heads over 2 KV heads (head_dim 16), intermediate 128, vocab 96, in eval mode."""
    return _tiny_llama(layers, vocab_size=96, max_position_embeddings=2048, tie_word_embeddings=tied).eval()


def tiny_qwen2(layers: int = 2) -> PreTrainedModel:
    """A tiny Qwen2 (q/k/v biases, ``layer_types`` in its config), same sizes as :func:`tiny_llama`."""
    cfg = Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=96,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()  # fresh biases are zero, which would hide a bias sliced wrongly
    return model
