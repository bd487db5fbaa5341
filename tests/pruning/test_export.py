"""export_pruned: a plain, smaller LlamaForCausalLM whose logits equal the masked model's at evaluation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pruning_helpers import tiny_llama, tiny_qwen2
from transformers import LlamaForCausalLM, PreTrainedModel

from lit_accel.pruning.apply import apply_masks
from lit_accel.pruning.export import export_pruned
from lit_accel.pruning.masks import L0Masks, count_params


def _trained_like_masks(model: PreTrainedModel, keep: dict[str, int]) -> L0Masks:
    masks = L0Masks(model, keep=keep)
    with torch.no_grad():
        for gate in masks.groups().values():
            # Spread log_alpha so deterministic gates are fractional and the top-k choice is non-trivial.
            gate.log_alpha.uniform_(-4.0, 4.0)
    return masks.eval()


def _randomise_norms(model: PreTrainedModel) -> None:
    # Fresh RMSNorm weights are all ones, which would hide a norm weight sliced or scaled wrongly.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)


@pytest.mark.parametrize("tied", [False, True])
def test_export_logits_equal_masked_model_and_round_trip(tmp_path: Path, tied: bool) -> None:
    model = tiny_llama(layers=3, tied=tied).double()
    _randomise_norms(model)
    keep = {"layers": 2, "heads": 1, "intermediate": 48, "hidden": 40}
    masks = _trained_like_masks(model, keep).double()
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad(), apply_masks(model, masks):
        masked = model(ids).logits
    small = export_pruned(model, masks)
    c = small.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (2, 2, 1)
    assert (c.intermediate_size, c.hidden_size, c.head_dim) == (48, 40, 16)
    assert c.tie_word_embeddings == tied
    with torch.no_grad():
        exported = small(ids).logits
    # HF RMSNorm computes in float32 even for a float64 model, so agreement is to ~1e-7, not 1e-15.
    torch.testing.assert_close(exported, masked, rtol=0.0, atol=1e-6)
    # Exact parameter count: count_params of the binary kept masks is the exported model's size.
    binary = {k: v.ne(0).double() for k, v in masks.deterministic().items()}
    assert int(count_params(masks.shape, binary)) == sum(p.numel() for p in small.parameters())

    small.float().save_pretrained(tmp_path)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        reloaded = loaded(ids).logits
    torch.testing.assert_close(reloaded, masked.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_export_fp32_tight_and_model_unchanged(family: str) -> None:
    model = tiny_llama(layers=2) if family == "llama" else tiny_qwen2(layers=2)
    _randomise_norms(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks = _trained_like_masks(model, {"layers": 2, "heads": 2, "intermediate": 100, "hidden": 50})
    ids = torch.randint(0, 96, (1, 16))
    with torch.no_grad(), apply_masks(model, masks):
        masked = model(ids).logits
    small = export_pruned(model, masks)
    with torch.no_grad():
        exported = small(ids).logits
    torch.testing.assert_close(exported, masked, rtol=1e-5, atol=1e-5)
    binary = {k: v.ne(0).float() for k, v in masks.deterministic().items()}
    assert int(count_params(masks.shape, binary)) == sum(p.numel() for p in small.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(small) is type(model)


def test_export_errors() -> None:
    model = tiny_llama()
    with pytest.raises(ValueError, match="masks=None"):
        export_pruned(model, None)
    zs = {k: torch.ones_like(v) for k, v in L0Masks(model).expected_scores().items()}
    zs["heads"][0, 0] = 0.0
    with pytest.raises(ValueError, match=r"keep \[1, 2\] KV heads"):
        export_pruned(model, zs)
    with pytest.raises(ValueError, match="lack groups"):
        export_pruned(model, {"hidden": zs["hidden"]})
