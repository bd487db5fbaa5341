"""GPU-only checks (``-m gpu``): bf16 training on CUDA, DeepSpeed ZeRO-2/3 construction, save and export."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from lit_accel.export import export_checkpoint
from lit_accel.models import CausalLM, full_state_dict

pytestmark = pytest.mark.gpu


def _loader(n: int = 8, batch: int = 2, seq: int = 64, vocab: int = 4096) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, vocab, (n * batch, seq), generator=g)
    return DataLoader([{"input_ids": x} for x in data], batch_size=batch)


def _trainer(tmp_path, strategy: str = "auto", steps: int = 3, clip: float | None = None) -> L.Trainer:
    return L.Trainer(
        gradient_clip_val=clip,
        accelerator="gpu",
        devices=1,
        strategy=strategy,
        precision="bf16-mixed",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        limit_val_batches=0,
    )


def test_bf16_training_on_cuda_uses_fused_adamw(tmp_path) -> None:
    module = CausalLM("llama-tiny", warmup_steps=1)
    trainer = _trainer(tmp_path, steps=5, clip=1.0)  # Lightning alone refuses to clip with a fused optimizer
    trainer.fit(module, train_dataloaders=_loader())
    opt = trainer.optimizers[0]
    assert opt.defaults["fused"] is True
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_init_save_and_export(tmp_path, stage: int) -> None:
    module = CausalLM("llama-tiny", warmup_steps=1)
    trainer = _trainer(tmp_path, strategy=f"deepspeed_stage_{stage}", steps=3)
    trainer.fit(module, train_dataloaders=_loader())
    params = list(module.model.parameters())
    assert any(hasattr(p, "ds_id") for p in params) == (stage == 3)
    # The HF initialisation ran on the full tensors (ZeRO-3 would otherwise leave N(0, 1) embeddings).
    state = full_state_dict(module.model)
    std = state["model.embed_tokens.weight"].float().std().item()
    assert 0.015 < std < 0.03, std
    # Lightning moves an unpartitioned model back to the CPU when fit ends; ZeRO-3 partitions stay on the GPU.
    device = next(module.model.parameters()).device if stage != 3 else torch.device("cuda")
    x = torch.randint(0, 4096, (2, 32), device=device)
    module.model.eval()
    with torch.no_grad():
        ref = module.model(input_ids=x).logits.float()
    # save_hf gathers ZeRO-3 partitions: the directory loads in plain transformers with the same weights.
    out = module.save_hf(tmp_path / "hf")
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).to(device).eval()
    with torch.no_grad():
        got = loaded(input_ids=x).logits.float()
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)
    # Export from the DeepSpeed checkpoint folder (fp32 master weights) matches too, at bf16 tolerance.
    ckpt = tmp_path / "ds.ckpt"
    trainer.save_checkpoint(ckpt)
    exported = export_checkpoint(ckpt, tmp_path / "exported")
    fp32 = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).to(device).eval()
    with torch.no_grad():
        got32 = fp32(input_ids=x).logits.float()
    rel = (got32 - ref).norm() / ref.norm()
    assert rel < 2e-2, rel


def test_pretrained_directory_loads_under_zero3(tmp_path) -> None:
    base = CausalLM("llama-tiny")
    base.configure_model()
    src = base.save_hf(tmp_path / "src")
    module = CausalLM(str(src), warmup_steps=1, learning_rate=1e-9)
    trainer = _trainer(tmp_path, strategy="deepspeed_stage_3", steps=1)
    trainer.fit(module, train_dataloaders=_loader(n=1))
    state = full_state_dict(module.model)
    ref = base.model.state_dict()
    for key in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight", "lm_head.weight"):
        torch.testing.assert_close(state[key].float(), ref[key].float(), rtol=1e-2, atol=1e-3)
