"""Preset targets, the LLaMA head-divisibility rule, the per-layer report and its W&B charts, bypass, and
`lit-accel export` of a pruning checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from pruning_helpers import tiny_llama
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from lit_accel.cli import main as cli_main
from lit_accel.models import CausalLM
from lit_accel.models.presets import preset_config
from lit_accel.observe import WandbLogger
from lit_accel.pruning import (
    L0Masks,
    PruningTarget,
    StructuredPruning,
    apply_masks,
    architecture_report,
    count_params,
    export_pruned,
    is_pruning_checkpoint,
)
from lit_accel.pruning.targets import preset_dims


def _meta_model(preset: str, **overrides: Any) -> LlamaForCausalLM:
    with torch.device("meta"):
        return LlamaForCausalLM(preset_config(preset, **overrides))


def test_llama_1b_half_preset_is_about_half_of_llama_1b() -> None:
    masks = L0Masks(_meta_model("llama-1b"))
    keep = PruningTarget(preset="llama-1b-half").keep(masks.shape)
    assert keep == {"layers": 18, "heads": 3, "intermediate": 4096, "hidden": 1536}
    kept = {
        "head_layer": torch.tensor([1.0] * 18 + [0.0] * 4),
        "mlp": torch.tensor([1.0] * 18 + [0.0] * 4),
        "heads": torch.tensor([[1.0, 1.0, 1.0, 0.0]] * 22),
        "intermediate": torch.cat([torch.ones(22, 4096), torch.zeros(22, 5632 - 4096)], 1),
        "hidden": torch.cat([torch.ones(1536), torch.zeros(512)]),
    }
    d = preset_dims("llama-1b-half")
    half = _meta_model(
        "llama-1b",
        num_hidden_layers=d["num_layers"],
        hidden_size=d["hidden_size"],
        num_attention_heads=d["num_heads"],
        num_key_value_heads=d["num_kv_heads"],
        intermediate_size=d["intermediate_size"],
        head_dim=d["head_dim"],
    )
    n_half = sum(p.numel() for p in half.parameters())
    assert int(count_params(masks.shape, kept)) == n_half  # the masks' count is the exported model's
    n_full = sum(p.numel() for p in _meta_model("llama-1b").parameters())
    assert 0.45 < n_half / n_full < 0.55


def test_a_model_preset_as_target_and_the_errors() -> None:
    # llama-350m -> llama-125m: same head size and group size (1), smaller everywhere.
    shape_350m = L0Masks(_meta_model("llama-350m")).shape
    assert PruningTarget(preset="llama-125m").keep(shape_350m) == {
        "layers": 12,
        "heads": 12,
        "intermediate": 2048,
        "hidden": 768,
    }
    # The quickstart's llama-20m (head size 64, 3 query heads per KV head) -> llama-20m-half.
    assert PruningTarget(preset="llama-20m-half").keep(L0Masks(_meta_model("llama-20m")).shape) == {
        "layers": 6,
        "heads": 1,
        "intermediate": 704,
        "hidden": 288,
    }
    shape_125m = L0Masks(_meta_model("llama-125m")).shape
    with pytest.raises(ValueError, match=r"preset='llama-350m': num_layers=24 must be an int in \[1, 12\]"):
        PruningTarget(preset="llama-350m").keep(shape_125m)
    with pytest.raises(ValueError, match=r"1 query heads per KV head .* num_attention_heads = 1 x num_key_value"):
        PruningTarget(preset="llama-1b-half").keep(shape_125m)  # 8 query heads per KV head
    with pytest.raises(ValueError, match=r"preset='nope' is not a known preset; allowed presets: \["):
        PruningTarget(preset="nope")
    with pytest.raises(ValueError, match="cannot be combined"):
        PruningTarget(preset="llama-1b-half", hidden_size=1024)
    with pytest.raises(ValueError, match="cannot be combined"):
        StructuredPruning(preset="llama-1b-half", param_ratio=0.5)
    # LLaMA configs need hidden_size % num_attention_heads == 0 (transformers refuses to load them otherwise).
    tiny = L0Masks(tiny_llama()).shape  # 2 query heads per KV head
    with pytest.raises(ValueError, match=r"hidden_size=37 with num_kv_heads=1 \(2 query heads\).*multiple of 2"):
        PruningTarget(num_kv_heads=1, hidden_size=37).keep(tiny)


def test_ratio_target_rounds_llama_hidden_to_a_loadable_width(tmp_path: Path) -> None:
    model = tiny_llama(layers=2)
    masks = L0Masks(model, keep={"heads": 1})  # 2 query heads kept: the hidden count must be even
    with torch.no_grad():
        masks.hidden.log_alpha.copy_(torch.linspace(-3.0, 3.0, 64))  # expected L0 of about 33 dims
    assert masks.hidden.default_keep() % 2 == 1
    kept = int(masks.eval()()["hidden"].ne(0).sum())
    assert kept % 2 == 0 and abs(kept - masks.hidden.default_keep()) == 1
    export_pruned(model, masks).save_pretrained(tmp_path / "small")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "small").config.hidden_size == kept


def test_report_and_bypass() -> None:
    model = tiny_llama(layers=3)
    target = PruningTarget(num_layers=2, num_kv_heads=1, intermediate_size=64, hidden_size=32)
    masks = L0Masks(model)
    masks.set_keep(target.keep(masks.shape))
    with torch.no_grad():
        masks.mlp.log_alpha[1] = -4.0  # layer 1's MLP nearly off: the block that goes
    before = {k: v.detach().clone() for k, v in masks.state_dict().items()}
    report = architecture_report(masks, target)
    assert report["layer"] == [0, 1, 2] and report["block_kept"] == [1.0, 0.0, 1.0]
    assert report["block_target"] == pytest.approx([2 / 3] * 3)
    assert report["kv_heads_kept"] == [1.0, 1.0, 1.0] and report["kv_heads_target"] == [1.0] * 3
    layer0 = float(masks.intermediate.expected_l0()[0].detach().sum())
    assert report["intermediate_expected"][0] == pytest.approx(layer0)
    assert report["hidden_kept"] == [32.0] * 3 and report["mlp_expected"][1] < 0.1
    assert all(torch.equal(v, before[k]) for k, v in masks.state_dict().items())  # read-only
    ratio = architecture_report(masks, PruningTarget(param_ratio=0.5))
    assert not any(k.endswith("_target") for k in ratio)

    ids = torch.randint(0, 96, (1, 8))
    with torch.no_grad():
        plain = model(ids).logits
        with apply_masks(model, masks.eval()) as hooks:
            masked = model(ids).logits
            with hooks.bypassed():
                bypassed = model(ids).logits
            assert torch.equal(model(ids).logits, masked)  # on again after the context
    assert torch.equal(bypassed, plain) and not torch.allclose(masked, plain)


LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 96,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}


def _loader() -> DataLoader[Any]:
    data = torch.randint(0, 96, (8, 12), generator=torch.Generator().manual_seed(0))
    return DataLoader([{"input_ids": x} for x in data], batch_size=4)  # type: ignore[arg-type]


def _trainer(tmp_path: Path, callbacks: list[L.Callback], logger: Any, **kw: Any) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_steps=4,
        val_check_interval=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        logger=logger,
        **kw,
    )


def test_wandb_offline_run_gets_the_architecture_charts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cb = StructuredPruning(num_layers=2, num_kv_heads=1, intermediate_size=64, hidden_size=48, chart_every_n_steps=3)
    logger = WandbLogger(project="t", save_dir=str(tmp_path / "wb"))
    _trainer(tmp_path, [cb], logger, enable_checkpointing=False).fit(
        CausalLM(dict(LLAMA), warmup_steps=0), _loader(), _loader()
    )
    logger.experiment.finish()
    media = list((tmp_path / "wb" / "wandb").glob("offline-run-*/files/media/table/pruning"))
    assert len(media) == 1
    names = sorted(p.name.split("_table_")[0] for p in (media[0] / "chart").glob("*.table.json"))
    # At the validations of steps 2 and 4 and at step 3: three of each chart.
    assert names == sorted(["blocks", "hidden", "intermediate", "kv_heads"] * 3)
    table = json.loads(next((media[0] / "chart").glob("kv_heads_table_*.table.json")).read_text())
    key = table["columns"].index("lineKey")
    assert {r[key] for r in table["data"]} == {"kv_heads_expected", "kv_heads_kept", "kv_heads_target"}
    assert len(list(media[0].glob("architecture_*.table.json"))) == 3


def test_other_loggers_get_the_kept_count_and_lit_accel_export_writes_the_pruned_model(tmp_path: Path) -> None:
    cb = StructuredPruning(num_layers=2, num_kv_heads=1, intermediate_size=64, hidden_size=48, mask_lr=0.05)
    ckpts = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_last=True)
    module = CausalLM(dict(LLAMA), warmup_steps=0)
    trainer = _trainer(tmp_path, [cb, ckpts], CSVLogger(tmp_path / "csv"))
    trainer.fit(module, _loader(), _loader())
    expected = 2 * 96 * 48 + 2 * (48 * (2 * 16 * 2 + 2 * 16) + 3 * 48 * 64 + 2 * 48) + 48
    assert float(trainer.callback_metrics["pruning/kept_params"]) == expected

    last = tmp_path / "ckpt" / "last.ckpt"
    assert is_pruning_checkpoint(last)
    assert torch.load(last, weights_only=False)["lit_accel"]["pruning"]["keep"]["hidden"] == 48
    cli_main(["export", "--ckpt", str(last), "--out", str(tmp_path / "pruned")])
    small = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert sum(p.numel() for p in small.parameters()) == expected
    ids = torch.randint(0, 96, (2, 10))
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(small(ids).logits, module(ids).logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(SystemExit):  # a refusal: one `lit-accel: error:` line, no traceback
        cli_main(["export", "--ckpt", str(last), "--out", str(tmp_path / "pruned")])
    # A checkpoint of a run without pruning takes the ordinary exporter.
    plain = tmp_path / "plain.ckpt"
    state = torch.load(last, weights_only=False)
    state["state_dict"] = {k: v for k, v in state["state_dict"].items() if not k.startswith("pruning.")}
    del state["lit_accel"]["pruning"]
    torch.save(state, plain)
    assert not is_pruning_checkpoint(plain) and not is_pruning_checkpoint(tmp_path / "nothing.ckpt")
    cli_main(["export", "--ckpt", str(plain), "--out", str(tmp_path / "full")])
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "full").config.hidden_size == 64


def test_structured_pruning_says_what_it_aims_at_and_what_it_kept(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    import lightning as L
    from torch.utils.data import DataLoader

    from lit_accel.callbacks import StructuredPruning
    from lit_accel.models import CausalLM

    ids = torch.randint(0, 100, (8, 16), generator=torch.Generator().manual_seed(0))
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[StructuredPruning(num_layers=1, intermediate_size=64)],
    )  # fmt: skip
    with caplog.at_level(logging.INFO):
        trainer.fit(CausalLM("llama-tiny", warmup_steps=0), DataLoader([{"input_ids": x} for x in ids], batch_size=4))
    text = caplog.text
    assert "StructuredPruning: learning masks on 2 blocks, 2 KV heads, MLP 384, hidden 128" in text
    assert "towards layers 1" in text and "intermediate 64" in text
    assert "StructuredPruning: the masks now keep" in text and "M parameters" in text
