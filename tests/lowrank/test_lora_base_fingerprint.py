"""Adapter-only LoRA checkpoints know their base: the fingerprint of the folder the frozen base came from is recorded,
and the export and a resume refuse a folder that now holds another model, naming both and what differs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from _helpers import quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lora_helpers import VOCAB, logits, tiny_llama
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from lit_accel.export import main as export_main
from lit_accel.lowrank.lora_callback import LoRA
from lit_accel.models import CausalLM
from lit_accel.models.hf_directory import fingerprint_differences, model_fingerprint

IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))


def loader() -> DataLoader[Any]:
    data = torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(0))
    return DataLoader([{"input_ids": x} for x in data], batch_size=4)  # type: ignore[arg-type]


def module(base: Path) -> CausalLM:
    return CausalLM(str(base), learning_rate=1e-2, warmup_steps=0, weight_decay=0.0)


def fit(base: Path, ckpt_dir: Path, steps: int = 2, ckpt_path: str | None = None) -> CausalLM:
    lm = module(base)
    ckpt = ModelCheckpoint(dirpath=str(ckpt_dir), every_n_train_steps=1, save_top_k=-1, save_last=True)
    trainer = quiet_trainer(max_steps=steps, enable_checkpointing=True, callbacks=[LoRA(r=4, alpha=8), ckpt])
    trainer.fit(lm, loader(), ckpt_path=ckpt_path)
    return lm


def swap_base(base: Path, seed: int) -> Path:
    """Moves the base aside and puts another model of the same architecture (other weights) in its folder."""
    kept = base.with_name(base.name + ".original")
    base.rename(kept)
    tiny_llama(layers=2, seed=seed).save_pretrained(str(base))
    return kept


def restore_base(base: Path, kept: Path) -> None:
    shutil.rmtree(base)
    kept.rename(base)


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "base"
    tiny_llama(layers=2, seed=3).save_pretrained(str(path))
    return path


def test_fingerprint_follows_the_model_not_the_file_layout(tmp_path: Path, base: Path) -> None:
    model = tiny_llama(layers=2, seed=3)
    sharded, as_bin = tmp_path / "sharded", tmp_path / "bin"
    model.save_pretrained(str(sharded), max_shard_size="100KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1
    model.save_pretrained(str(as_bin))
    (as_bin / "model.safetensors").unlink()
    torch.save(model.state_dict(), as_bin / "pytorch_model.bin")
    fp = model_fingerprint(base)
    assert fp["directory"] == str(base.resolve()) and len(fp["tensors"]) == len(model.state_dict())
    for same in (sharded, as_bin):
        assert fingerprint_differences(fp, model_fingerprint(same)) == [], same
    json.dumps(fp)  # stored in checkpoints as plain data
    # another initialisation: every tensor's weights differ (the norms, all ones in both, do not)
    other = tmp_path / "other"
    tiny_llama(layers=2, seed=4).save_pretrained(str(other))
    (diff,) = fingerprint_differences(fp, model_fingerprint(other))
    assert diff.startswith("weights differ in 16 of 21 tensors")
    # another dtype, another config value
    tiny_llama(layers=2, seed=3).bfloat16().save_pretrained(str(tmp_path / "bf16"))
    assert "dtype or shape differs: lm_head.weight F32[128, 64] then, BF16[128, 64] now" in " ".join(
        fingerprint_differences(fp, model_fingerprint(tmp_path / "bf16"))
    )
    config = json.loads((sharded / "config.json").read_text())
    (sharded / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 0.5, "transformers_version": "0"}))
    assert fingerprint_differences(fp, model_fingerprint(sharded)) == [
        f"config rms_norm_eps: {config['rms_norm_eps']} then, 0.5 now"
    ]


def test_fingerprint_sees_the_ends_and_middle_of_a_large_tensor(tmp_path: Path) -> None:
    big = torch.zeros(1 << 20, dtype=torch.float32)  # 4 MiB: three 4 KiB windows are hashed, not all of it
    (tmp_path / "config.json").write_text("{}")
    save_file({"w": big}, str(tmp_path / "model.safetensors"))
    before = model_fingerprint(tmp_path)
    for index in (0, big.numel() // 2, big.numel() - 1):
        changed = big.clone()
        changed[index] = 1.0
        save_file({"w": changed}, str(tmp_path / "model.safetensors"))
        assert fingerprint_differences(before, model_fingerprint(tmp_path)) == ["weights differ in 1 of 1 tensors: w"]


def test_export_refuses_another_base_by_name_and_merges_into_the_right_one(tmp_path: Path, base: Path) -> None:
    trained = fit(base, tmp_path / "ckpt")
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    record = torch.load(ckpt, map_location="cpu", weights_only=False)["lit_accel"]["lora"]
    assert record["adapter_only"] is True
    assert record["base"]["directory"] == str(base.resolve())
    assert record["base"]["digest"] == model_fingerprint(base)["digest"]
    kept = swap_base(base, seed=4)
    for extra in ([], ["--peft-adapter"]):
        out = tmp_path / ("adapter" if extra else "merged")
        with pytest.raises(ValueError, match=r"--ckpt .*last\.ckpt.*trained on the base model in '.*/base'") as err:
            export_main(["--ckpt", str(ckpt), "--out", str(out), *extra])
        assert "weights differ in 16 of 21 tensors" in str(err.value)
        assert not out.exists()
    # the base it was trained on: the export merges into it
    restore_base(base, kept)
    export_main(["--ckpt", str(ckpt), "--out", str(tmp_path / "merged")])
    assert trained.model is not None
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    torch.testing.assert_close(logits(merged, IDS), logits(trained.model.eval(), IDS), rtol=1e-5, atol=1e-5)


def test_resume_refuses_another_base_and_continues_on_the_right_one(tmp_path: Path, base: Path) -> None:
    fit(base, tmp_path / "ckpt")
    ckpt = str(tmp_path / "ckpt" / "last.ckpt")
    kept = swap_base(base, seed=4)
    with pytest.raises(ValueError, match=r"LoRA: resuming this checkpoint: .*'.*/base'.*weights differ"):
        fit(base, tmp_path / "resumed", steps=3, ckpt_path=ckpt)
    restore_base(base, kept)
    fit(base, tmp_path / "resumed", steps=3, ckpt_path=ckpt)
    resumed = torch.load(tmp_path / "resumed" / "last.ckpt", map_location="cpu", weights_only=False)
    assert resumed["global_step"] == 3
    assert resumed["lit_accel"]["lora"]["base"]["digest"] == model_fingerprint(base)["digest"]


def test_a_checkpoint_without_a_base_record_exports_with_a_warning(tmp_path: Path, base: Path) -> None:
    fit(base, tmp_path / "ckpt", steps=1)
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    del checkpoint["lit_accel"]["lora"]["base"]  # as written before checkpoints recorded their base
    torch.save(checkpoint, tmp_path / "old.ckpt")
    with pytest.warns(UserWarning, match=r"old\.ckpt.* no record of the base model .* unchecked"):
        export_main(["--ckpt", str(tmp_path / "old.ckpt"), "--out", str(tmp_path / "merged")])
    assert (tmp_path / "merged" / "model.safetensors").is_file()
