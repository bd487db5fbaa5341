"""LoRA under DDP: 2 CPU processes over gloo train identical adapters and save a non-empty adapter PEFT loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _helpers import run_torchrun
from lora_helpers import tiny_llama
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("lora_ddp_worker.py")


def test_ddp_two_ranks_train_identical_adapters(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    base = tmp_path / "base"
    tiny_llama(layers=2, seed=3).save_pretrained(str(base))
    r0, r1 = run_torchrun(WORKER, base, tmp_path, out=tmp_path, timeout=180)
    assert (r0["rank"], r1["rank"], r0["world_size"], r0["global_step"]) == (0, 1, 2, 3)
    assert all(n.endswith((".lora_A", ".lora_B")) for n in r0["trainable"]) and len(r0["trainable"]) == 28
    assert r0["hashes"] == r1["hashes"] and r0["b_norm"] > 0
    # the adapter written at the end of training is non-empty and gives PEFT the trained model's logits
    adapter = tmp_path / "export" / "adapter"
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    assert len(tensors) == 28 and all(t.numel() > 0 for t in tensors.values())
    model = peft.PeftModel.from_pretrained(tiny_llama(layers=2, seed=3), str(adapter)).eval()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    torch.testing.assert_close(logits, torch.tensor(r0["logits"]), rtol=1e-5, atol=1e-5)
