"""The LoRA callback in a real Trainer on CPU: optimizer, logging, adapter-only checkpoints, resume, export, DropBP."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from _helpers import MemoryLogger, quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lora_helpers import VOCAB, logits, tiny_llama
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from lit_accel.dropbp import DropBP
from lit_accel.export import export_checkpoint
from lit_accel.export import main as export_main
from lit_accel.lowrank.lora import LoRALinear, lora_layers, lora_state_dict
from lit_accel.lowrank.lora_callback import LoRA
from lit_accel.models import CausalLM

IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))


def loader(n: int = 24, seq_len: int = 16, batch_size: int = 4) -> DataLoader[Any]:
    data = torch.randint(0, VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(0))
    return DataLoader([{"input_ids": x} for x in data], batch_size=batch_size)  # type: ignore[arg-type]


trainer = quiet_trainer


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny pretrained LLaMA directory (what `lit-accel export` writes), the base to fine-tune."""
    path = tmp_path_factory.mktemp("base") / "llama"
    tiny_llama(layers=2, seed=3).save_pretrained(str(path))
    return path


def module(base_dir: Path) -> CausalLM:
    return CausalLM(str(base_dir), learning_rate=1e-2, warmup_steps=0, weight_decay=0.0)


def test_fit_trains_only_adapters_logs_and_exports(base_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    lm = module(base_dir)
    log = MemoryLogger()
    cb = LoRA(targets="attention", r=4, alpha=8, export_dir=str(tmp_path / "export"), export="both")
    t = trainer(max_steps=3, logger=log, callbacks=[cb])
    t.fit(lm, loader())
    assert lm.model is not None
    layers = lora_layers(lm.model)
    assert len(layers) == 8 and cb.layer_names == list(layers)
    # the optimizer holds exactly the adapters
    opt_params = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    assert opt_params == {id(p) for m in layers.values() for p in (m.lora_A, m.lora_B)}
    # the base did not move; the adapters did
    original = AutoModelForCausalLM.from_pretrained(str(base_dir))
    q = layers["model.layers.0.self_attn.q_proj"]
    assert torch.equal(q.base_layer.weight, original.model.layers[0].self_attn.q_proj.weight)
    assert float(q.lora_B.detach().abs().sum()) > 0
    trainable = sum(p.numel() for m in layers.values() for p in (m.lora_A, m.lora_B))
    assert log.latest["lora/trainable_params"] == trainable
    assert log.latest["lora/total_params"] == sum(p.numel() for p in lm.parameters())
    assert log.latest["lora/trainable_fraction"] == pytest.approx(trainable / log.latest["lora/total_params"])
    # end-of-training export: a merged plain model and a PEFT adapter, both with the trained logits
    lm.model.eval()
    expected = logits(lm.model, IDS)
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export" / "merged")).eval()
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    torch.testing.assert_close(logits(merged, IDS), expected, rtol=1e-5, atol=1e-5)
    peft = PeftModel.from_pretrained(original.eval(), str(tmp_path / "export" / "adapter")).eval()
    torch.testing.assert_close(logits(peft, IDS), expected, rtol=1e-5, atol=1e-5)
    config = json.loads((tmp_path / "export" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir)
    # a second fit into the same export_dir refuses before training
    with pytest.raises(FileExistsError, match="export_dir"):
        again = LoRA(export_dir=str(tmp_path / "export"), export="merged")
        trainer(max_steps=1, callbacks=[again]).fit(module(base_dir), loader())


class StopAt(L.Callback):
    """Stops the fit after optimizer step ``step`` (the schedule still spans the full ``max_steps``)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def _fit_with_ckpt(base_dir: Path, ckpt_dir: Path, stop_at: int = 0, ckpt_path: str | None = None) -> CausalLM:
    torch.manual_seed(0)
    lm = module(base_dir)
    ckpt = ModelCheckpoint(dirpath=str(ckpt_dir), every_n_train_steps=1, save_top_k=-1, save_last=True)
    callbacks = [LoRA(r=4, alpha=8, dropout=0.1), ckpt] + ([StopAt(stop_at)] if stop_at else [])
    t = trainer(max_steps=6, enable_checkpointing=True, callbacks=callbacks)
    t.fit(lm, loader(n=8), ckpt_path=ckpt_path)  # 2 batches an epoch: resumes at an epoch boundary
    return lm


def test_adapter_only_checkpoint_resumes_identically_and_exports(base_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    straight = _fit_with_ckpt(base_dir, tmp_path / "a")
    _fit_with_ckpt(base_dir, tmp_path / "b", stop_at=2)
    ckpt_file = tmp_path / "b" / "epoch=0-step=2.ckpt"
    checkpoint = torch.load(ckpt_file, map_location="cpu", weights_only=False)
    keys = set(checkpoint["state_dict"])
    assert keys and all(k.endswith((".lora_A", ".lora_B")) for k in keys)
    assert len(keys) == 2 * 14
    record = checkpoint["lit_accel"]["lora"]
    assert record["adapter_only"] is True and record["settings"]["r"] == 4 and len(record["layers"]) == 14
    assert "tokenizer_dir" in checkpoint["lit_accel"]  # CausalLM's entry is kept next to ours
    resumed = _fit_with_ckpt(base_dir, tmp_path / "b", ckpt_path=str(ckpt_file))
    assert straight.model is not None and resumed.model is not None
    a, b = lora_state_dict(straight.model), lora_state_dict(resumed.model)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    # `lit-accel export` of the adapter-only checkpoint: merged by default, a PEFT adapter on request
    straight.model.eval()
    expected = logits(straight.model, IDS)
    last = tmp_path / "a" / "last.ckpt"
    export_main(["--ckpt", str(last), "--out", str(tmp_path / "merged")])
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    torch.testing.assert_close(logits(merged, IDS), expected, rtol=1e-5, atol=1e-5)
    export_main(["--ckpt", str(last), "--out", str(tmp_path / "adapter"), "--peft-adapter"])
    base = AutoModelForCausalLM.from_pretrained(str(base_dir)).eval()
    peft = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(logits(peft, IDS), expected, rtol=1e-5, atol=1e-5)


def test_from_scratch_model_keeps_full_checkpoints_and_pissa(tmp_path: Path) -> None:
    lm = CausalLM(
        "llama-tiny",
        config_overrides={"vocab_size": VOCAB, "num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 96},
        warmup_steps=0,
    )
    ckpt = ModelCheckpoint(dirpath=str(tmp_path), save_last=True)
    t = trainer(
        max_steps=2, enable_checkpointing=True, callbacks=[LoRA(r=2, alpha=4, init="pissa", targets="mlp"), ckpt]
    )
    with pytest.warns(UserWarning, match="cannot be rebuilt"):
        t.fit(lm, loader(n=8))
    checkpoint = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["lit_accel"]["lora"]["adapter_only"] is False
    assert "model.model.embed_tokens.weight" in checkpoint["state_dict"]
    assert lm.model is not None
    lm.model.eval()
    expected = logits(lm.model, IDS)
    out = export_checkpoint(tmp_path / "last.ckpt", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    torch.testing.assert_close(logits(merged, IDS), expected, rtol=1e-5, atol=1e-5)


class OwnModule(L.LightningModule):
    """A user's module that builds its HF model in __init__ and optimises every parameter it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_llama(layers=1)
        self.model.train()

    def training_step(self, batch: dict[str, torch.Tensor], idx: int) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


def test_model_built_in_init_is_adapted_in_setup() -> None:
    lm = OwnModule()
    t = trainer(max_steps=2, callbacks=[LoRA(targets=["q", "v"], r=2, alpha=2)])
    t.fit(lm, loader(n=8))
    assert sorted(lora_layers(lm.model)) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    assert len(t.optimizers[0].param_groups[0]["params"]) == 4


def test_bad_arguments_name_the_argument(base_dir: Path) -> None:
    for kwargs, match in [
        ({"r": 0}, "r=0 is not allowed"),
        ({"r": 2.5}, "r=2.5"),
        ({"alpha": -1}, "alpha=-1 is not allowed"),
        ({"dropout": 1.0}, r"dropout=1.0 .*\[0, 1\)"),
        ({"dropout": -0.1}, "dropout=-0.1"),
        ({"init": "loftq"}, "init='loftq'.*gaussian.*pissa"),
        ({"export": "zip"}, "export='zip'.*adapter"),
        ({"base_dtype": "int4"}, "base_dtype='int4'"),
        ({"targets": []}, "targets=\\[\\]"),
        ({"patterns": {"nope": 1}}, "patterns="),
    ]:
        with pytest.raises(ValueError, match=match):
            LoRA(**kwargs)  # type: ignore[arg-type]
    # r larger than a matched layer allows: at set-up, naming the layer and its shape
    with pytest.raises(ValueError, match=r"r=80 .*model.layers.0.self_attn.q_proj.*in=64, out=64"):
        trainer(max_steps=1, callbacks=[LoRA(r=80)]).fit(module(base_dir), loader(n=4))
    with pytest.raises(ValueError, match="matches no linear.*q_proj"):
        trainer(max_steps=1, callbacks=[LoRA(targets="nothing")]).fit(module(base_dir), loader(n=4))


def test_composes_with_dropbp(base_dir: Path) -> None:
    class NoGrad(L.Callback):
        def __init__(self) -> None:
            self.none: list[int] = []
            self.masks: list[tuple[bool, ...]] = []

        def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, opt: Any) -> None:
            model = pl_module.model  # type: ignore[attr-defined]
            dropped = [i for i, d in enumerate(dropbp.mask or ()) if d]
            self.masks.append(tuple(dropbp.mask or ()))
            subs = [f"model.layers.{i // 2}.{'self_attn' if i % 2 == 0 else 'mlp'}." for i in dropped]
            for name, layer in lora_layers(model).items():
                no_grad = layer.lora_A.grad is None and layer.lora_B.grad is None
                assert no_grad == any(name.startswith(s) for s in subs), name
            self.none.append(sum(p.grad is None for p in pl_module.parameters() if p.requires_grad))

    dropbp = DropBP(target=0.5, sensitivity="uniform", seed=1)
    rec = NoGrad()
    lm = module(base_dir)
    trainer(max_steps=4, callbacks=[LoRA(r=2, alpha=4), dropbp, rec]).fit(lm, loader(n=16))
    assert any(any(m) for m in rec.masks) and max(rec.none) > 0


def test_resume_with_other_targets_is_an_error_not_fresh_adapters(base_dir: Path, tmp_path: Path) -> None:
    t = trainer(max_steps=2, callbacks=[LoRA(targets="attention", r=4)])
    t.fit(module(base_dir), loader())
    t.save_checkpoint(tmp_path / "attn.ckpt")
    resumed = trainer(max_steps=3, callbacks=[LoRA(targets="all-linear", r=4)])
    with pytest.raises(ValueError, match="LoRA.targets: 'attention' in the checkpoint, 'all-linear' now"):
        resumed.fit(module(base_dir), loader(), ckpt_path=str(tmp_path / "attn.ckpt"))
    # with the run check relaxed to a warning, the adapters themselves are still checked
    resumed = trainer(max_steps=3, callbacks=[LoRA(targets="all-linear", r=4)])
    relaxed = CausalLM(str(base_dir), learning_rate=1e-2, warmup_steps=0, weight_decay=0.0, run_checks="warn")
    with (
        pytest.warns(UserWarning, match="LoRA.targets"),
        pytest.raises(ValueError, match="the checkpoint has no adapter weights for .*mlp"),
    ):
        resumed.fit(relaxed, loader(), ckpt_path=str(tmp_path / "attn.ckpt"))
