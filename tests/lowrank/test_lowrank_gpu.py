"""LoRA and SVD factorisation on the GPU (``-m gpu``): single device and DeepSpeed ZeRO 1/2/3, bf16-mixed.

Every test fine-tunes a small LLaMA saved as a pretrained directory (the base to rebuild on resume and export) on
one fixed batch, so the loss must fall within a few steps at a high learning rate and a resumed run sees exactly the
data of an uninterrupted one. ``deepspeed_stage_3`` runs with ``stage3_param_persistence_threshold=0``: DeepSpeed would
otherwise keep small parameters (all of this model's adapters) whole on every rank, and a read that forgot to gather
would pass unnoticed. Under ZeRO-3 every parameter is read through ``full_state_dict`` / ``lora_state_dict`` /
``gathered`` (never ``.data``), which is itself under test.

Tolerances: logits of a bf16 model against an fp32 one are compared by relative norm (``BF16_REL``); the
single-device baseline trains fp32 weights under autocast and is compared in fp32 (``FP32_REL``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DeepSpeedStrategy
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lit_accel.dropbp import DropBP
from lit_accel.export import export_checkpoint
from lit_accel.lowrank import (
    LoRA,
    LowRankFactorization,
    LowRankLinear,
    factorization_ranks,
    load_factorized,
    lora_layers,
    lora_state_dict,
    merge_factorization,
    merge_lora,
    save_factorized,
    save_peft_adapter,
    unmerge_lora,
)
from lit_accel.lowrank.lora_io import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from lit_accel.models import CausalLM, full_state_dict
from lit_accel.models.params import gathered, is_partitioned

pytestmark = pytest.mark.gpu

STRATEGIES = ["auto", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3"]
VOCAB = 512
SEQ = 64
BATCH = 2
N_LINEARS = 14  # 2 decoder layers x (q, k, v, o, gate, up, down)
BF16_REL = 2e-2
FP32_REL = 1e-4
IDS = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(7))


# ------------------------------------------------------------------------------------------------------------------
# Set-up shared by the tests
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small pretrained LLaMA directory: the frozen base the LoRA runs fine-tune (and rebuild on resume)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=SEQ,
        tie_word_embeddings=False,
    )
    path = tmp_path_factory.mktemp("base") / "llama"
    LlamaForCausalLM(config).save_pretrained(str(path))
    return path


def _base_weights(base_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(base_dir / "model.safetensors"))


def _strategy(name: str) -> Any:
    if name == "deepspeed_stage_3":
        strategy = DeepSpeedStrategy(stage=3)
        assert strategy.config is not None
        # Partition every parameter, small ones included (see the module docstring).
        strategy.config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        return strategy
    return name


def _loader(batches: int) -> DataLoader[Any]:
    """``batches`` batches per epoch, every one the same ``[BATCH, SEQ]`` block of token ids."""
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": ids[i % BATCH]} for i in range(batches * BATCH)]
    return DataLoader(data, batch_size=BATCH)  # type: ignore[arg-type]


class _Losses(L.Callback):
    """The training loss of every step, as Python floats."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        self.values.append(float(outputs["loss"]))


class _StopAt(L.Callback):
    """Ends the fit after optimizer step ``step`` (the schedule still spans ``max_steps``), as a crash would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def _trainer(
    root: Path, strategy: str, steps: int, callbacks: list[L.Callback], checkpoints: bool = False
) -> L.Trainer:
    return L.Trainer(
        accelerator="gpu",
        devices=1,
        strategy=_strategy(strategy),
        precision="bf16-mixed",
        max_steps=steps,
        logger=False,
        enable_checkpointing=checkpoints,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        callbacks=callbacks,
    )


def _module(base_dir: Path, lr: float = 1e-2) -> CausalLM:
    # A constant learning rate: a run stopped early and one run through follow the same schedule.
    return CausalLM(str(base_dir), learning_rate=lr, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0)


def _on_gpu(model: torch.nn.Module) -> torch.nn.Module:
    """Lightning moves an unpartitioned model back to the CPU when fit ends; ZeRO-3 partitions stay on the GPU."""
    if not any(is_partitioned(p) for p in model.parameters()):
        model.cuda()
    return model.eval()


def _logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids.cuda()).logits.float()


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).norm() / ref.float().norm())


def _tol(strategy: str) -> float:
    # DeepSpeed's bf16 mode keeps the module itself in bf16 (fp32 masters in the optimizer); "auto" keeps fp32.
    return FP32_REL if strategy == "auto" else BF16_REL


def _hf(directory: Path) -> Any:
    model: Any = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    return model.cuda().eval()


def _peft(base_dir: Path, adapter_dir: Path) -> Any:
    from peft import PeftModel

    return PeftModel.from_pretrained(_hf(base_dir), str(adapter_dir)).eval()


def _assert_learning(losses: list[float], steps: int) -> None:
    assert len(losses) == steps, losses
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0] - 0.2, losses  # one fixed batch at a high learning rate


def _peft_key(name: str) -> tuple[str, str]:
    """``<module>.lora_A`` -> (``base_model.model.<module>.lora_A.weight``, ``lora_A``)."""
    module, which = name.rsplit(".", 1)
    return f"base_model.model.{module}.{which}.weight", which


def _checkpoint_keys(ckpt: Path) -> list[str]:
    """Parameter keys a checkpoint holds: a Lightning file's state_dict, or a DeepSpeed folder's module states."""
    if ckpt.is_file():
        return list(torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"])
    files = sorted(ckpt.glob("*/*model_states.pt"))
    assert files, f"no DeepSpeed model states under {ckpt}"
    return list(torch.load(files[0], map_location="cpu", weights_only=False)["module"])


# ------------------------------------------------------------------------------------------------------------------
# LoRA
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_lora_trains_saves_merges_and_exports(base_dir: Path, tmp_path: Path, strategy: str) -> None:
    from safetensors.torch import load_file

    steps, tol = 10, _tol(strategy)
    losses = _Losses()
    lora = LoRA(targets="all-linear", r=8, alpha=16, export_dir=str(tmp_path / "export"), export="both")
    lm = _module(base_dir)
    trainer = _trainer(tmp_path, strategy, steps, [lora, losses])
    trainer.fit(lm, train_dataloaders=_loader(steps))
    ckpt = tmp_path / "final.ckpt"
    trainer.save_checkpoint(ckpt)
    _assert_learning(losses.values, steps)

    assert lm.model is not None
    model = _on_gpu(lm.model)
    assert any(is_partitioned(p) for p in model.parameters()) == (strategy == "deepspeed_stage_3")
    layers = lora_layers(model)
    assert len(layers) == N_LINEARS
    if strategy == "deepspeed_stage_3":
        # Partitioned (empty locally) between forwards: every read below has to gather.
        assert all(p.numel() == 0 for layer in layers.values() for p in layer.parameters()), "not partitioned"
    # Only the adapters train; the base is exactly the pretrained weights (in the module's dtype).
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert trainable == {f"model.{n}.{w}" for n in layers for w in ("lora_A", "lora_B")}
    state = full_state_dict(model)  # gathers ZeRO-3 partitions
    base = _base_weights(base_dir)
    adapters = lora_state_dict(model)
    assert set(adapters) == {k for k in state if k.endswith((".lora_A", ".lora_B"))}
    for key, value in state.items():
        if key in adapters:
            continue
        ref = base[key.replace(".base_layer.", ".")]
        assert torch.equal(value, ref.to(value.dtype)), f"frozen weight {key} changed"
    for key, value in adapters.items():
        assert value.numel() > 0 and torch.isfinite(value.float()).all(), key
        if key.endswith(".lora_B"):  # zero at the start (gaussian init): training moved every one
            assert float(value.float().abs().sum()) > 0, key

    # The PEFT adapter written at the end of fit is not empty and holds the trained (gathered) values.
    adapter_dir = tmp_path / "export" / "adapter"
    assert (adapter_dir / ADAPTER_CONFIG_NAME).is_file()
    saved = load_file(str(adapter_dir / ADAPTER_WEIGHTS_NAME))
    assert len(saved) == 2 * N_LINEARS
    for key, value in adapters.items():
        peft_key, _ = _peft_key(key)
        assert saved[peft_key].numel() > 0, peft_key
        assert torch.equal(saved[peft_key], value.float()), peft_key

    # PEFT on the original base gives our logits; so do the merged directory and `lit-accel export`.
    ours = _logits(model)
    peft_logits = _logits(_peft(base_dir, adapter_dir))
    assert _rel(peft_logits, ours) < tol
    merged_dir = tmp_path / "export" / "merged"
    merged_keys = load_file(str(merged_dir / "model.safetensors")).keys()
    assert not any("lora_" in k or "base_layer" in k for k in merged_keys)
    merged_logits = _logits(_hf(merged_dir))
    assert _rel(merged_logits, peft_logits) < tol
    assert _rel(merged_logits, ours) < tol

    exported = export_checkpoint(ckpt, tmp_path / "exported")  # a DeepSpeed folder, or a Lightning file for "auto"
    assert _rel(_logits(_hf(exported)), ours) < tol
    exported_adapter = export_checkpoint(ckpt, tmp_path / "exported_adapter", peft_adapter=True)
    assert _rel(_logits(_peft(base_dir, exported_adapter)), ours) < tol
    # The checkpoint holds the optimizer's fp32 adapters: rounded to the module's dtype they are its adapters.
    from_ckpt = load_file(str(exported_adapter / ADAPTER_WEIGHTS_NAME))
    for key, value in adapters.items():
        assert torch.equal(from_ckpt[_peft_key(key)[0]].to(value.dtype), value), key

    # Merging in place (ZeRO-3: gathered with modifier rank 0, re-partitioned) keeps the logits; unmerge undoes it.
    merge_lora(model)
    assert all(layer.merged for layer in layers.values())
    assert _rel(_logits(model), ours) < tol
    unmerge_lora(model)
    assert _rel(_logits(model), ours) < tol


def _fit_lora(
    base_dir: Path, root: Path, strategy: str, steps: int, stop_at: int = 0, ckpt_path: Path | None = None
) -> tuple[CausalLM, list[float]]:
    torch.manual_seed(0)
    lm, losses = _module(base_dir), _Losses()
    callbacks: list[L.Callback] = [LoRA(targets="all-linear", r=8, alpha=16), losses]
    if stop_at:
        every = ModelCheckpoint(
            dirpath=str(root / "ckpt"), filename="{step}", every_n_train_steps=stop_at, save_top_k=-1
        )
        callbacks += [_StopAt(stop_at), every]
    trainer = _trainer(root, strategy, steps, callbacks, checkpoints=bool(stop_at))
    # Three batches an epoch: the run stopped at step 3 resumes at an epoch boundary.
    trainer.fit(lm, train_dataloaders=_loader(3), ckpt_path=str(ckpt_path) if ckpt_path else None)
    return lm, losses.values


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_lora_adapter_only_checkpoint_resumes_exactly(base_dir: Path, tmp_path: Path, strategy: str) -> None:
    steps, stop = 6, 3
    straight, straight_losses = _fit_lora(base_dir, tmp_path / "straight", strategy, steps)
    _, first_losses = _fit_lora(base_dir, tmp_path / "stopped", strategy, steps, stop_at=stop)
    ckpt = tmp_path / "stopped" / "ckpt" / f"step={stop}.ckpt"
    assert ckpt.exists(), sorted(p.name for p in ckpt.parent.iterdir())
    keys = _checkpoint_keys(ckpt)
    # Adapters only: the frozen base is rebuilt from the pretrained directory (DeepSpeed: exclude_frozen_parameters).
    assert len(keys) == 2 * N_LINEARS and all(k.endswith((".lora_A", ".lora_B")) for k in keys), keys[:4]
    resumed, resumed_losses = _fit_lora(base_dir, tmp_path / "resumed", strategy, steps, ckpt_path=ckpt)

    assert first_losses == straight_losses[:stop]
    assert resumed_losses == straight_losses[stop:], (resumed_losses, straight_losses)
    assert straight.model is not None and resumed.model is not None
    a, b = lora_state_dict(straight.model), lora_state_dict(resumed.model)
    assert a.keys() == b.keys() and len(a) == 2 * N_LINEARS
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("strategy", ["deepspeed_stage_2", "deepspeed_stage_3"])
def test_lora_pissa_with_dropbp(base_dir: Path, tmp_path: Path, strategy: str) -> None:
    steps = 8
    losses = _Losses()
    dropbp = DropBP(target=0.5, sensitivity="auto", sensitivity_at=2)
    lora = LoRA(targets="all-linear", r=8, alpha=16, init="pissa", base_dtype="bfloat16")
    lm = _module(base_dir, lr=3e-3)
    _trainer(tmp_path, strategy, steps, [lora, dropbp, losses]).fit(lm, train_dataloaders=_loader(steps))
    assert len(losses.values) == steps and all(torch.isfinite(torch.tensor(losses.values)))
    assert dropbp.measured and dropbp.sensitivities is not None and all(s >= 0 for s in dropbp.sensitivities)
    assert lm.model is not None
    model = _on_gpu(lm.model)
    # PiSSA's adapters were taken from the gathered weights: saved as PEFT's converted (rank 2r) adapter they
    # apply to the original base and give our logits.
    save_peft_adapter(model, tmp_path / "adapter")
    assert _rel(_logits(_peft(base_dir, tmp_path / "adapter")), _logits(model)) < BF16_REL


# ------------------------------------------------------------------------------------------------------------------
# SVD factorisation
# ------------------------------------------------------------------------------------------------------------------

RANK = 16


def _truncation(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, float]:
    """The rank-``rank`` truncated SVD of ``weight`` and its relative error (Eckart-Young), in float64."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    approx = (u[:, :rank] * s[:rank]) @ vh[:rank]
    return approx, float(s[rank:].square().sum().sqrt() / s.square().sum().sqrt())


class _FactorsAtStart(L.Callback):
    """At the first step (strategy and optimizer built): every factorised layer, gathered, is the truncated SVD of
    the pretrained weight, and its factors are what the optimizer trains."""

    def __init__(self, base: dict[str, torch.Tensor]) -> None:
        self.base = base
        self.checked: list[str] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        model = pl_module.model
        for name, layer in model.named_modules():
            if not isinstance(layer, LowRankLinear):
                continue
            params = list(layer.parameters())
            assert all(p.requires_grad for p in params), name
            if isinstance(trainer.strategy, DeepSpeedStrategy) and trainer.strategy.zero_stage_3:
                assert all(is_partitioned(p) and p.numel() == 0 for p in params), name
                assert tuple(getattr(layer.down.weight, "ds_shape", None) or ()) == (RANK, layer.in_features)
                assert tuple(getattr(layer.up.weight, "ds_shape", None) or ()) == (layer.out_features, RANK)
            with gathered(params):
                assert tuple(layer.down.weight.shape) == (RANK, layer.in_features)
                dense = (layer.up.weight.double() @ layer.down.weight.double()).cpu()
            approx, _ = _truncation(self.base[f"{name}.weight"], RANK)
            assert _rel(dense, approx) < BF16_REL, name
            self.checked.append(name)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_factorization_trains_and_exports(base_dir: Path, tmp_path: Path, strategy: str) -> None:
    steps, tol = 10, _tol(strategy)
    base = _base_weights(base_dir)
    fac = LowRankFactorization("attention", rank=RANK, export_dir=str(tmp_path / "merged"))
    at_start, losses = _FactorsAtStart(base), _Losses()
    lm = _module(base_dir, lr=3e-3)
    _trainer(tmp_path, strategy, steps, [fac, at_start, losses]).fit(lm, train_dataloaders=_loader(steps))
    _assert_learning(losses.values, steps)
    attention = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"]
    assert sorted(fac.ranks) == sorted(attention) and set(fac.ranks.values()) == {RANK}
    assert sorted(at_start.checked) == sorted(attention)
    # The SVD ran on the whole (gathered) weights: the reported errors are Eckart-Young's for the pretrained ones
    # (bf16-rounded under ZeRO-3, where the weights are created in bf16).
    for report in fac.reports:
        _, expected = _truncation(base[f"{report.name}.weight"], RANK)
        assert report.factorized and report.rel_error is not None
        assert abs(report.rel_error - expected) < 5e-3, (report.name, report.rel_error, expected)

    assert lm.model is not None
    model = _on_gpu(lm.model)
    assert factorization_ranks(model) == fac.ranks
    ours = _logits(model)
    # Merged export (written at the end of fit): a plain Hugging Face model, no config change.
    plain = _hf(tmp_path / "merged")
    assert not any(isinstance(m, LowRankLinear) for m in plain.modules())
    assert _rel(_logits(plain), ours) < tol
    # Factorised export: the same config plus lit_accel_factorization.json, loaded with load_factorized.
    save_factorized(model, tmp_path / "factorized")
    loaded = load_factorized(tmp_path / "factorized").cuda().eval()
    assert factorization_ranks(loaded) == fac.ranks
    assert _rel(_logits(loaded), ours) < tol
    # Merging in place gives dense layers with the same logits.
    assert sorted(merge_factorization(model)) == sorted(attention)
    assert not factorization_ranks(model)
    assert _rel(_logits(model), ours) < tol
