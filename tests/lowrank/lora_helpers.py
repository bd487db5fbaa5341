"""Tiny models and PEFT references shared by the LoRA tests."""

from __future__ import annotations

from typing import Any

import torch
from _helpers import tiny_gpt2 as _tiny_gpt2
from _helpers import tiny_llama as _tiny_llama
from torch import nn
from transformers import GPT2LMHeadModel, LlamaForCausalLM

from lit_accel.lowrank.lora import lora_layers

VOCAB = 128


def tiny_llama(layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return _tiny_llama(layers, intermediate_size=96, vocab_size=VOCAB).eval()


def tiny_gpt2(layers: int = 2, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return _tiny_gpt2(layers, vocab_size=VOCAB).eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def peft_model(base: nn.Module, **kwargs: Any) -> Any:
    from peft import LoraConfig, get_peft_model

    fan_in_fan_out = base.config.model_type == "gpt2"
    cfg = LoraConfig(task_type="CAUSAL_LM", fan_in_fan_out=fan_in_fan_out, **kwargs)
    return get_peft_model(base, cfg)


def randomize_adapters(model: nn.Module, seed: int = 1) -> None:
    """Non-zero B so the adapters change the output (gaussian init leaves B = 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=gen) * 0.1)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.1)


def copy_adapters_to_peft(ours: nn.Module, peft: Any) -> None:
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            target = peft.base_model.model.get_submodule(name)
            target.lora_A["default"].weight.copy_(layer.lora_A)
            target.lora_B["default"].weight.copy_(layer.lora_B)


def peft_adapter_grads(peft: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for name, module in peft.base_model.model.named_modules():
        if hasattr(module, "lora_A") and isinstance(module.lora_A, nn.ModuleDict) and "default" in module.lora_A:
            out[name] = (module.lora_A["default"].weight.grad, module.lora_B["default"].weight.grad)
    return out


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits
