"""LoRA under DDP: 2 CPU processes over gloo train identical adapters and save a non-empty adapter PEFT loads."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from lora_helpers import tiny_llama
from matrix.matrix_common import torchrun_command, worker_env

WORKER = Path(__file__).with_name("lora_ddp_worker.py")
REPO = Path(__file__).resolve().parents[2]


def test_ddp_two_ranks_train_identical_adapters(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    base = tmp_path / "base"
    tiny_llama(layers=2, seed=3).save_pretrained(str(base))
    proc = subprocess.run(
        torchrun_command(WORKER, base, tmp_path),
        env=worker_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["rank"], r1["rank"], r0["world_size"], r0["global_step"]) == (0, 1, 2, 3)
    assert all(n.endswith((".lora_A", ".lora_B")) for n in r0["trainable"]) and len(r0["trainable"]) == 28
    assert r0["hashes"] == r1["hashes"] and r0["b_norm"] > 0
    # the adapter written at the end of training is non-empty and gives PEFT the trained model's logits
    adapter = tmp_path / "export" / "adapter"
    from safetensors.torch import load_file

    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    assert len(tensors) == 28 and all(t.numel() > 0 for t in tensors.values())
    model = peft.PeftModel.from_pretrained(tiny_llama(layers=2, seed=3), str(adapter)).eval()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    torch.testing.assert_close(logits, torch.tensor(r0["logits"]), rtol=1e-5, atol=1e-5)
