"""recipes/lora_finetune end to end on CPU: a tiny pretrained LLaMA + tokenizer, a text folder, fit, export merged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import lit_accel.callbacks
from lit_accel.cli import main as cli_main
from lit_accel.data.tokenizer import train_bpe_tokenizer
from lit_accel.lowrank.lora_callback import LoRA
from lit_accel.models import CausalLM

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "lora_finetune" / "lora_finetune.yaml"
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wizards", "box"]


def _texts(n: int) -> list[str]:
    g = torch.Generator().manual_seed(0)
    return [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (300,), generator=g)) + "\n" for _ in range(n)]


def test_recipe_fine_tunes_and_exports_merged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    peft = pytest.importorskip("peft")
    # The YAML names lit_accel.callbacks.LoRA; make sure it resolves even before the package re-exports it.
    monkeypatch.setattr(lit_accel.callbacks, "LoRA", LoRA, raising=False)
    monkeypatch.chdir(tmp_path)
    texts = _texts(24)
    corpus = tmp_path / "my_texts"
    corpus.mkdir()
    for i, text in enumerate(texts):
        (corpus / f"doc{i}.txt").write_text(text)
    # "A pretrained model": a llama-tiny with the tokenizer's vocabulary, written as `lit-accel export` would.
    tok = train_bpe_tokenizer(texts, 300)
    base = CausalLM(
        "llama-tiny",
        config_overrides={"vocab_size": 320, "hidden_size": 64, "intermediate_size": 96, "max_position_embeddings": 64},
    )
    base.configure_model()
    model_dir = base.save_hf(tmp_path / "pretrained", tokenizer=tok)

    cpu = ["--trainer.accelerator=cpu", "--trainer.precision=32-true", "--trainer.logger=false"]
    short = ["--trainer.max_steps=4", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1"]
    small = ["--data.seq_len=32", "--data.batch_size=4", "--data.max_val_sequences=8", "--data.val_fraction=0.1"]
    paths = ["--model.model", str(model_dir), "--data.tokenizer", str(model_dir), "--data.corpus", str(corpus)]
    cli_main(["fit", "--config", str(RECIPE), *paths, *cpu, *short, *small, "--model.learning_rate=2e-2"])

    export = tmp_path / "runs" / "lora_finetune" / "export"
    merged_dir, adapter_dir = export / "merged", export / "adapter"
    assert (merged_dir / "config.json").is_file() and (merged_dir / "tokenizer.json").is_file()
    cli_main(["export", "--ckpt", "runs/lora_finetune/checkpoints/last.ckpt", "--out", str(tmp_path / "from_ckpt")])

    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))

    def logits(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model.eval()(input_ids=ids).logits

    merged = logits(AutoModelForCausalLM.from_pretrained(str(merged_dir)))
    from_ckpt = logits(AutoModelForCausalLM.from_pretrained(str(tmp_path / "from_ckpt")))
    original = AutoModelForCausalLM.from_pretrained(str(model_dir))
    before = logits(original)
    # The recipe stores the frozen base of the adapted linears in bf16 (base_dtype: bfloat16): the trained model,
    # and so the merged export, use the bf16-rounded base; PEFT gets the same base to compare.
    with torch.no_grad():
        for name, m in original.named_modules():
            if isinstance(m, torch.nn.Linear) and name != "lm_head":
                m.weight.copy_(m.weight.to(torch.bfloat16).float())
    with_adapter = logits(peft.PeftModel.from_pretrained(original, str(adapter_dir)))
    torch.testing.assert_close(merged, with_adapter, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(from_ckpt, merged, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(merged, before, atol=1e-4)  # the fine-tuning changed the model
