"""Structured pruning on every model family: masks -> export -> the exported model's logits equal the masked
model's, or a clear refusal at set-up."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from _helpers import FAMILIES, quiet_trainer, tiny_family
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, GemmaConfig, GemmaForCausalLM, PreTrainedModel

import lit_accel.pruning.apply as apply_module
from lit_accel.models import CausalLM
from lit_accel.models.structure import get_structure
from lit_accel.pruning import L0Masks, StructuredPruning, apply_masks, count_params, export_pruned

PRUNING_SUPPORT: dict[str, str] = {
    "llama": "yes",
    "qwen3": "yes",
    "gemma2": "yes",
    "gemma3": "yes",
    "phi3": "yes",
    "olmo2": "yes",
    "mixtral": "refused: MoE experts",
    "qwen3_moe": "refused: MoE experts",
}
"""Family (a key of ``FAMILIES``) -> ``"yes"`` (every mask group, export exact) or why it is refused."""
assert set(PRUNING_SUPPORT) == set(FAMILIES)

SUPPORTED = [f for f, v in PRUNING_SUPPORT.items() if v == "yes"]
REFUSED = [f for f, v in PRUNING_SUPPORT.items() if v != "yes"]
REFUSAL_MESSAGE = {
    "mixtral": r"structured pruning of mixture-of-experts MLPs \(mixtral\) is not supported: the experts' weights",
    "qwen3_moe": r"structured pruning of mixture-of-experts MLPs \(qwen3_moe\) is not supported: the experts' weights",
}
VOCAB = 256
# From each 3-block tiny model (hidden 128, 4 query heads over 2 KV heads, MLP 384): 2 blocks, 1 KV group, MLP 100,
# hidden 96 (a multiple of the 2 kept query heads, as LLaMA and Gemma configs require).
KEEP = {"layers": 2, "heads": 1, "intermediate": 100, "hidden": 96}
# A window shorter than the test sequences, so that a block exported with the wrong attention type would show.
_OVERRIDES: dict[str, dict[str, Any]] = {
    "gemma2": {"sliding_window": 4},
    "gemma3": {"sliding_window": 4, "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
}


def family_model(family: str, **overrides: Any) -> PreTrainedModel:
    return tiny_family(family, num_hidden_layers=3, **{**_OVERRIDES.get(family, {}), **overrides}).eval()


def trained_like_masks(model: PreTrainedModel, keep: dict[str, int]) -> L0Masks:
    """Fractional gates and a non-trivial choice; block 0 is the one dropped (a renumbering, and a layer_types
    slice that differs from the first two entries)."""
    masks = L0Masks(model, keep=keep)
    with torch.no_grad():
        for gate in masks.groups().values():
            gate.log_alpha.uniform_(-4.0, 4.0)
        masks.head_layer.log_alpha[0] = masks.mlp.log_alpha[0] = -4.5
        masks.head_layer.log_alpha[1:] = masks.mlp.log_alpha[1:] = 2.0
    return masks.eval()


def masked_and_exported(model: PreTrainedModel, masks: L0Masks, ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
    with torch.no_grad(), apply_masks(model, masks):
        masked = model(ids).logits
    small = export_pruned(model, masks)
    return masked, small


@pytest.mark.parametrize("family", SUPPORTED)
def test_export_equals_masked_model_and_reloads(family: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = family_model(family)
    masks = trained_like_masks(model, KEEP)
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        plain = model(ids).logits
    masked, small = masked_and_exported(model, masks, ids)
    assert (masked - plain).abs().max() > 1e-2  # the masks do change the model
    assert type(small) is type(model)
    c, src = small.config, model.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (2, 2, 1)
    assert (c.intermediate_size, c.hidden_size) == (100, 96)
    assert c.head_dim == masks.shape.head_dim == 32  # kept explicitly: hidden / heads is 48 now
    assert c.tie_word_embeddings == src.tie_word_embeddings
    for key in ("query_pre_attn_scalar", "sliding_window", "final_logit_softcapping", "attn_logit_softcapping"):
        assert getattr(c, key, None) == getattr(src, key, None), key
    if getattr(src, "layer_types", None) is not None:
        assert c.layer_types == src.layer_types[1:]
    with torch.no_grad():
        exported = small(ids).logits
    torch.testing.assert_close(exported, masked, rtol=0.0, atol=1e-4)
    # count_params of the binary kept masks is the exported model's exact size.
    binary = {k: v.ne(0).float() for k, v in masks.deterministic().items()}
    assert int(count_params(masks.shape, binary)) == sum(p.numel() for p in small.parameters())

    small.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(loaded) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, masked, rtol=0.0, atol=1e-4)


@pytest.mark.parametrize("family", SUPPORTED)
def test_gradients_reach_every_gate(family: str) -> None:
    """Sampled masks train every group; with a post-norm (Gemma 2/3, OLMo 2) the sublayer gate must act after it,
    where the norm cannot cancel it."""
    model = family_model(family).train()
    masks = L0Masks(model).train()
    with torch.no_grad():
        for gate in masks.groups().values():
            gate.log_alpha.fill_(0.5)  # open but not saturated, so samples carry gradient
    ids = torch.randint(0, VOCAB, (2, 10))
    with apply_masks(model, masks) as hooks:
        hooks.generator = torch.Generator().manual_seed(1)
        # A few samples: a gate sampled exactly at 0 or 1 (clipped) has no gradient in that sample.
        for _ in range(4):
            model(ids, labels=ids).loss.backward()
    for name, gate in masks.groups().items():
        grad = gate.log_alpha.grad
        assert grad is not None and grad.abs().sum() > 0, name
    for gate in (masks.head_layer, masks.mlp):  # every block's sublayer gates
        assert gate.log_alpha.grad is not None and bool((gate.log_alpha.grad != 0).all())


@pytest.mark.parametrize("family", SUPPORTED)
def test_sublayer_gate_scales_what_joins_the_residual(family: str) -> None:
    """A ``head_layer`` / ``mlp`` gate multiplies what the sublayer adds to the residual stream: after its post-norm
    where it has one (a gate on the post-norm's input would be normalised away), else its output."""
    model = family_model(family)
    masks = L0Masks(model)
    zs = {k: torch.ones_like(v) for k, v in masks.expected_scores().items()}
    zs["head_layer"][1], zs["mlp"][1] = 0.5, 0.25
    masks.forward = lambda generator=None: zs  # type: ignore[method-assign]
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad(), apply_masks(model, masks):
        masked = model(ids).logits

    def scale(factor: float) -> Any:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
            if isinstance(output, tuple):
                return (output[0] * factor, *output[1:])
            return output * factor

        return hook

    block = get_structure(model).blocks[1]
    handles = [
        block.attention.path_modules[-1].register_forward_hook(scale(0.5)),
        block.mlp.path_modules[-1].register_forward_hook(scale(0.25)),
    ]
    with torch.no_grad():
        expected = model(ids).logits
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(masked, expected, rtol=0.0, atol=1e-5)


@pytest.mark.parametrize("family", REFUSED)
def test_refused_families_name_the_reason(family: str) -> None:
    model = family_model(family)
    with pytest.raises(ValueError, match=REFUSAL_MESSAGE[family]):
        L0Masks(model)
    llama_masks = L0Masks(family_model("llama"))
    zs = {k: torch.ones_like(v) for k, v in llama_masks.expected_scores().items()}
    with pytest.raises(ValueError, match=REFUSAL_MESSAGE[family]):
        export_pruned(model, zs)
    with pytest.raises(ValueError, match=REFUSAL_MESSAGE[family]):
        apply_masks(model, llama_masks)


def test_olmo2_projection_qk_norms_use_the_kept_heads_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """OLMo 2 normalises q and k over the whole projection: with the statistic over all heads (removed ones
    included) the masked model and the exported one, whose norm spans the kept heads, would differ."""
    model = family_model("olmo2")
    masks = trained_like_masks(model, {"layers": 3, "heads": 1, "intermediate": 384, "hidden": 128})
    ids = torch.randint(0, VOCAB, (2, 12))
    masked, small = masked_and_exported(model, masks, ids)
    assert small.model.layers[0].self_attn.q_norm.weight.shape == (2 * 32,)  # 2 query heads of the kept group
    assert small.model.layers[0].self_attn.k_norm.weight.shape == (32,)
    with torch.no_grad():
        exported = small(ids).logits
        torch.testing.assert_close(exported, masked, rtol=0.0, atol=1e-4)
        monkeypatch.setattr(apply_module.MaskHooks, "_projection_norm", lambda self, i, rows: lambda *a: None)
        with apply_masks(model, masks):
            full_statistic = model(ids).logits
    assert (full_statistic - exported).abs().max() > 1e-3


def _tiny_gemma(tied: bool) -> GemmaForCausalLM:
    cfg = GemmaConfig(
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=VOCAB,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    model = GemmaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.1)  # Gemma norm weights start at 0 (they mean 1 + w)
    return model


@pytest.mark.parametrize(
    "make",
    [lambda: _tiny_gemma(True), lambda: _tiny_gemma(False), lambda: family_model("gemma2", tie_word_embeddings=False)],
    ids=["gemma-tied", "gemma-untied", "gemma2-untied"],
)
def test_gemma_embedding_scale_is_made_up_for(make: Any) -> None:
    """Gemma scales the embedding by sqrt(config.hidden_size): the exported model, with a smaller hidden size, gets
    the ratio folded into its embedding (and, tied, undone in the final norm); hidden-only pruning shows it alone."""
    model = make()
    masks = trained_like_masks(model, {"layers": model.config.num_hidden_layers, "hidden": 64})
    ids = torch.randint(0, VOCAB, (2, 12))
    masked, small = masked_and_exported(model, masks, ids)
    assert small.config.hidden_size == 64
    assert float(small.model.embed_tokens.embed_scale) == pytest.approx(64**0.5)
    with torch.no_grad():
        torch.testing.assert_close(small(ids).logits, masked, rtol=0.0, atol=1e-4)


def test_structured_pruning_fits_and_exports_gemma2(tmp_path: Path) -> None:
    """The callback in a real Trainer on a sandwich-norm, scaled-embedding, tied family."""
    torch.manual_seed(0)
    pl = CausalLM(
        "gemma2-tiny",
        config_overrides={"vocab_size": VOCAB, "num_hidden_layers": 3},
        learning_rate=1e-3,
        warmup_steps=0,
    )
    cb = StructuredPruning(
        num_layers=2, num_kv_heads=1, intermediate_size=96, hidden_size=64, mask_lr=0.05, export_dir=str(tmp_path)
    )
    data = torch.randint(0, VOCAB, (8, 12), generator=torch.Generator().manual_seed(0))
    loader: DataLoader[Any] = DataLoader([{"input_ids": x} for x in data], batch_size=4)  # type: ignore[arg-type]
    trainer = quiet_trainer(max_steps=3, callbacks=[cb])
    trainer.fit(pl, train_dataloaders=loader)
    assert "pruning/expected_sparsity/hidden" in trainer.callback_metrics
    assert float(cb.lagrangian.lambda_1["hidden"].detach()) != 0.0
    # The sublayer gates learn through the post-norms.
    assert not torch.allclose(cb.masks.head_layer.log_alpha.detach(), torch.full((3,), 4.6052), atol=1e-3)
    small = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(small).__name__ == "Gemma2ForCausalLM"
    assert (small.config.num_hidden_layers, small.config.hidden_size, small.config.intermediate_size) == (2, 64, 96)
    ids = torch.randint(0, VOCAB, (1, 10))
    pl.eval()
    with torch.no_grad():
        torch.testing.assert_close(small(ids).logits, pl(ids).logits, rtol=0.0, atol=1e-4)


def test_structured_pruning_refuses_a_moe_model_at_set_up() -> None:
    pl = CausalLM("mixtral-tiny", config_overrides={"vocab_size": VOCAB}, warmup_steps=0)
    trainer: L.Trainer = quiet_trainer(max_steps=1, callbacks=[StructuredPruning(hidden_size=64)])
    data = DataLoader([{"input_ids": torch.randint(0, VOCAB, (8,))} for _ in range(2)], batch_size=2)
    with pytest.raises(ValueError, match=REFUSAL_MESSAGE["mixtral"]):
        trainer.fit(pl, train_dataloaders=data)
