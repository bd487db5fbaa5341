"""CausalLM: presets, model sources, export round-trip, training steps, set-up checks."""

from __future__ import annotations

import math
import pathlib
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from lit_accel.models import PRESETS, CausalLM, load_full_state_dict, preset_config, resolve_model_source, warmup_cosine
from lit_accel.models.hf_directory import read_hf_weights


def _random_batches(n: int, batch: int, seq: int, vocab: int, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    # Eight distinct sequences repeated: memorisable, so the loss must fall when training works.
    data = torch.randint(0, vocab, (8, seq), generator=g).repeat(n * batch // 8 + 1, 1)[: n * batch]
    return DataLoader([{"input_ids": x} for x in data], batch_size=batch)


def test_preset_shapes_match_the_issue() -> None:
    with torch.device("meta"):
        counts = {
            n: sum(p.numel() for p in AutoModelForCausalLM.from_config(preset_config(n)).parameters()) for n in PRESETS
        }
    assert counts["llama-tiny"] < 5e6
    assert 15e6 < counts["llama-20m"] < 25e6
    assert 120e6 < counts["llama-125m"] < 140e6
    assert 330e6 < counts["llama-350m"] < 400e6
    c = preset_config("llama-1b")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (2048, 22, 32, 4)
    assert (c.intermediate_size, c.vocab_size) == (5632, 32000)
    assert 1.09e9 < counts["llama-1b"] < 1.11e9


def test_model_sources_and_their_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"model='llama-7b' is neither a preset.*llama-tiny"):
        resolve_model_source("llama-7b")
    with pytest.raises(ValueError, match=r"hub id.*no local copy.*hf download meta-llama/Nope"):
        resolve_model_source("meta-llama/Nope")
    with pytest.raises(ValueError, match="holds no config.json"):
        resolve_model_source(str(tmp_path))
    with pytest.raises(ValueError, match="must contain 'model_type'"):
        resolve_model_source({"hidden_size": 8})
    src = resolve_model_source(
        {
            "model_type": "llama",
            "hidden_size": 64,
            "num_attention_heads": 4,
            "num_hidden_layers": 1,
            "intermediate_size": 128,
            "vocab_size": 300,
        }
    )
    assert src.config.hidden_size == 64 and src.pretrained_dir is None
    assert resolve_model_source("llama-tiny", {"vocab_size": 999}).config.vocab_size == 999
    with pytest.raises(ValueError, match="learning_rate must be > 0"):
        CausalLM(learning_rate=0)
    with pytest.raises(ValueError, match="attn_implementation='magic'"):
        CausalLM(attn_implementation="magic")


def test_warmup_cosine_schedule() -> None:
    assert warmup_cosine(0, 10, 110, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 110, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert warmup_cosine(110, 10, 110, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 10, 110, 0.1) == pytest.approx(0.1)


def test_save_hf_round_trip_gives_identical_logits(tmp_path) -> None:
    module = CausalLM("llama-tiny")
    module.configure_model()
    x = torch.randint(0, module.config.vocab_size, (2, 33))
    out = module.save_hf(tmp_path / "hf")
    loaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, module(x).logits, rtol=0, atol=0)
    # ... and a CausalLM built from that directory loads the same weights.
    again = CausalLM(str(out))
    again.configure_model()
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, module(x).logits, rtol=0, atol=0)
    # Nothing the user had is overwritten.
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        module.save_hf(out)
    assert (out / "config.json").is_file()


def test_configure_model_is_idempotent_and_works_on_meta() -> None:
    module = CausalLM("llama-1b")
    with torch.device("meta"):
        module.configure_model()
    assert all(p.is_meta for p in module.parameters())
    model = module.model
    module.configure_model()
    assert module.model is model


def test_load_full_state_dict_names_mismatches() -> None:
    module = CausalLM("llama-tiny")
    module.configure_model()
    state = dict(module.model.state_dict())
    state.pop("model.norm.weight")
    state["lm_head.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"missing keys \['model.norm.weight'\].*lm_head.weight"):
        load_full_state_dict(module.model, state)


class _Recorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.metrics: dict[str, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        self.metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})


def test_training_reduces_loss_and_logs(tmp_path) -> None:
    module = CausalLM(
        {
            "model_type": "llama",
            "hidden_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "num_hidden_layers": 2,
            "intermediate_size": 128,
            "vocab_size": 64,
            "max_position_embeddings": 64,
        },
        learning_rate=3e-3,
        warmup_steps=5,
    )
    rec = _Recorder()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=40,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=5,
        callbacks=[rec],
        default_root_dir=tmp_path,
        limit_val_batches=2,
        val_check_interval=20,
    )
    trainer.fit(
        module, train_dataloaders=_random_batches(40, 4, 32, 64), val_dataloaders=_random_batches(2, 4, 32, 64, seed=1)
    )
    first, last = sum(rec.losses[:5]) / 5, sum(rec.losses[-5:]) / 5
    assert last < first - 0.5, (first, last)
    for key in ("train/loss", "train/lr", "train/grad_norm", "train/ppl", "val/loss", "val/ppl"):
        assert key in rec.metrics, key
    assert math.isclose(rec.metrics["val/ppl"], math.exp(rec.metrics["val/loss"]), rel_tol=1e-4)


def test_setup_rejects_data_that_does_not_fit_the_model() -> None:
    module = CausalLM("llama-tiny")
    trainer = SimpleNamespace(datamodule=SimpleNamespace(seq_len=4096, vocab_size=100, eos_token_id=0))
    module._trainer = trainer  # type: ignore[assignment]
    with pytest.raises(ValueError, match=r"seq_len=4096 is longer than the model's max_position_embeddings=1024"):
        module.setup("fit")
    trainer.datamodule = SimpleNamespace(seq_len=128, vocab_size=5000, eos_token_id=0)
    with pytest.raises(ValueError, match=r"tokenizer has 5000 tokens but the model's vocab_size is 4096"):
        module.setup("fit")
    trainer.datamodule = SimpleNamespace(seq_len=128, vocab_size=4000, eos_token_id=7)
    module.setup("fit")
    assert module.config.eos_token_id == 7


def test_gradient_clipping_works_with_the_fused_optimizer_in_bf16_mixed(tmp_path) -> None:
    # Lightning's mixed-precision plugin refuses to clip for fused optimizers; bf16 needs no unscaling, so
    # CausalLM clips itself. The fused AdamW kernel runs on CPU too, so this is checked here.
    module = CausalLM("llama-tiny", warmup_steps=1, learning_rate=1e-3, fused_optimizer=True)
    norms: list[float] = []

    class _Spy(L.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            def pre_step(opt, args, kwargs) -> None:
                grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
                norms.append(float(torch.nn.utils.get_total_norm(grads)))

            trainer.optimizers[0].register_step_pre_hook(pre_step)

    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        precision="bf16-mixed",
        gradient_clip_val=0.05,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[_Spy()],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, train_dataloaders=_random_batches(3, 2, 16, 4096))
    assert trainer.optimizers[0].defaults["fused"] is True
    assert len(norms) == 3 and all(n <= 0.05 * (1 + 1e-3) for n in norms), norms


def test_logged_grad_norm_is_the_norm_of_that_step(tmp_path) -> None:
    import csv

    from lightning.pytorch.loggers import CSVLogger

    true_norms: dict[int, float] = {}

    class _Norms(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            true_norms[trainer.global_step] = float(torch.nn.utils.get_total_norm(grads))

    module = CausalLM("llama-tiny", warmup_steps=1)
    logger = CSVLogger(tmp_path)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=9,
        logger=logger,
        log_every_n_steps=3,
        callbacks=[_Norms()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=_random_batches(9, 2, 16, 4096))
    logger.save()
    text = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    rows = [r for r in csv.DictReader(text) if r.get("train/grad_norm")]
    assert len(rows) == 3
    for row in rows:
        step = int(row["step"])
        assert float(row["train/grad_norm"]) == pytest.approx(true_norms[step], rel=1e-5), (step, true_norms)


def test_a_broken_safetensors_file_is_named(tmp_path: pathlib.Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match=r"model\.safetensors' is not readable"):
        read_hf_weights(str(tmp_path))
