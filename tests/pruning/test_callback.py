"""StructuredPruning in a real Trainer on CPU: own optimizer groups, penalty, logging, exact resume, export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader
from transformers import LlamaForCausalLM

from lit_accel.models import CausalLM
from lit_accel.pruning.callback import StructuredPruning

VOCAB = 96
LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}


def loader() -> DataLoader[Any]:
    # 2 batches an epoch, so the step-2 checkpoint is at an epoch boundary and resumes without replaying data.
    data = torch.randint(0, VOCAB, (8, 12), generator=torch.Generator().manual_seed(0))
    return DataLoader([{"input_ids": x} for x in data], batch_size=4)  # type: ignore[arg-type]


def make_trainer(steps: int, callbacks: list[L.Callback], **kw: Any) -> L.Trainer:
    kw.setdefault("enable_checkpointing", False)
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        **kw,
    )


def module() -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(dict(LLAMA), learning_rate=1e-3, warmup_steps=0)


def pruning(**kw: Any) -> StructuredPruning:
    return StructuredPruning(num_layers=2, num_kv_heads=1, intermediate_size=64, hidden_size=48, mask_lr=0.05, **kw)


def test_fit_resume_and_export(tmp_path: Path) -> None:
    cb = pruning(export_dir=str(tmp_path / "pruned"), lagrangian_warmup_steps=4)
    pl = module()
    ckpts = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    trainer = make_trainer(4, [cb, ckpts], enable_checkpointing=True)
    trainer.fit(pl, train_dataloaders=loader())
    groups = trainer.optimizers[0].param_groups
    # Own groups with their own peak rates, no weight decay, scaled by the model's schedule like group 0.
    scale = groups[0]["lr"] / 1e-3
    assert [g["lr"] for g in groups[-2:]] == pytest.approx([0.05 * scale, 0.1 * scale])
    assert groups[-1]["weight_decay"] == 0.0 and groups[-2]["weight_decay"] == 0.0
    pruning_ids = {id(p) for p in pl.pruning.parameters()}
    assert all(id(p) not in pruning_ids for g in groups[:-2] for p in g["params"])
    metrics = trainer.callback_metrics
    assert "pruning/expected_sparsity/hidden" in metrics and "pruning/lambda_1/hidden" in metrics
    assert float(metrics["pruning/target_sparsity/hidden"]) == pytest.approx(0.25 * 3 / 4)
    # Lambdas ascended (sparsity below target: lambda_1 < 0); masks moved.
    assert float(cb.lagrangian.lambda_1["hidden"].detach()) < 0
    assert not torch.allclose(cb.masks.hidden.log_alpha.detach(), torch.full((64,), 4.6052), atol=1e-3)

    # Resume from a 2-step checkpoint and reach the same state as the straight 4-step run.
    ckpt = tmp_path / "ckpt" / "step=2.ckpt"
    assert any(k.startswith("pruning.masks.") for k in torch.load(ckpt, weights_only=False)["state_dict"])
    cb3, pl3 = pruning(lagrangian_warmup_steps=4), module()
    make_trainer(4, [cb3]).fit(pl3, train_dataloaders=loader(), ckpt_path=str(ckpt))
    for (name, a), b in zip(pl.state_dict().items(), pl3.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)

    # The export is a plain, smaller LLaMA whose logits equal the masked model's at evaluation.
    small = LlamaForCausalLM.from_pretrained(tmp_path / "pruned", dtype=torch.float32).eval()
    assert (small.config.num_hidden_layers, small.config.hidden_size) == (2, 48)
    ids = torch.randint(0, VOCAB, (1, 10))
    pl.eval()
    with torch.no_grad():
        torch.testing.assert_close(small(ids).logits, pl(ids).logits, rtol=1e-4, atol=1e-4)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="mask_lr must be a number > 0, got -1"):
        StructuredPruning(param_ratio=0.5, mask_lr=-1)
    with pytest.raises(ValueError, match="param_ratio must be in"):
        StructuredPruning(param_ratio=2.0)
    cb = StructuredPruning(num_kv_heads=5)
    with pytest.raises(ValueError, match=r"num_kv_heads=5 must be an int in \[1, 2\]"):
        make_trainer(1, [cb]).fit(module(), train_dataloaders=loader())


@pytest.mark.parametrize("other", ["LoRA", "LowRankFactorization", "SemiStructuredSparsity"])
def test_refuses_callbacks_that_replace_the_masked_layers(other: str) -> None:
    import lightning as L

    import lit_accel.callbacks as cbs
    from lit_accel.callbacks import StructuredPruning
    from lit_accel.models import CausalLM

    kwargs = {"LowRankFactorization": {"rank": 4}}.get(other, {})
    pruning = StructuredPruning(hidden_size=64)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[pruning, getattr(cbs, other)(**kwargs)],
    )
    with pytest.raises(ValueError, match=f"StructuredPruning cannot be combined with {other}"):
        pruning.setup(trainer, CausalLM("llama-tiny"), "fit")


def test_mask_and_multiplier_groups_follow_the_schedule_from_step_0() -> None:
    import lightning as L

    from lit_accel.callbacks import StructuredPruning
    from lit_accel.models import CausalLM, warmup_cosine

    seen: list[list[float]] = []

    class _LR(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            seen.append([g["lr"] for g in optimizer.param_groups])

    pruning = StructuredPruning(hidden_size=64, mask_lr=0.5, lambda_lr=0.2)
    module = CausalLM("llama-tiny", learning_rate=1e-3, warmup_steps=10)
    data = [{"input_ids": torch.randint(0, 4096, (16,))} for _ in range(4)]
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[pruning, _LR()],
    )
    trainer.fit(module, DataLoader(data, batch_size=2))
    factor = warmup_cosine(0, 10, 2, 0.1)
    assert seen[0][-2:] == pytest.approx([0.5 * factor, 0.2 * factor])
    assert seen[0][0] == pytest.approx(1e-3 * factor)


def test_a_second_callback_instance_on_the_same_module(tmp_path: Path) -> None:
    import lightning as L

    from lit_accel.callbacks import StructuredPruning
    from lit_accel.models import CausalLM

    data = DataLoader([{"input_ids": torch.randint(0, 4096, (16,))} for _ in range(4)], batch_size=2)
    kw: dict[str, Any] = dict(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = CausalLM("llama-tiny", warmup_steps=1)
    L.Trainer(callbacks=[StructuredPruning(hidden_size=64)], **kw).fit(module, data)
    # Same target: the new instance adopts the masks and its own settings apply (its hooks exist).
    again = StructuredPruning(hidden_size=64, mask_lr=0.3)
    L.Trainer(callbacks=[again], **{**kw, "max_steps": 2}).fit(module, data)
    assert again.hooks is not None
    # Another target on the same module is refused, not silently ignored.
    with pytest.raises(ValueError, match="already holds masks for target"):
        L.Trainer(callbacks=[StructuredPruning(hidden_size=32)], **kw).fit(module, data)
    # export_dir that already holds files is refused at set-up.
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not empty"):
        L.Trainer(callbacks=[StructuredPruning(hidden_size=64, export_dir=str(tmp_path / "x"))], **kw).fit(
            CausalLM("llama-tiny"), data
        )
    assert (tmp_path / "x" / "f").read_text() == "mine"
