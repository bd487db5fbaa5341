"""SemiStructuredSparsity in a real CPU Trainer on llama-tiny: phases, masks, masked decay, logging, resume,
export, bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from _helpers import MemoryLogger, quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from lit_accel.models import CausalLM
from lit_accel.sparsity import MASKS_FILE, SemiStructuredSparsity, SparseLinear

VOCAB = 4096  # llama-tiny's


def loader(n: int = 8, seq_len: int = 16, batch_size: int = 4) -> DataLoader[Any]:
    data = torch.randint(0, VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(0))
    return DataLoader([{"input_ids": x} for x in data], batch_size=batch_size)  # type: ignore[arg-type]


trainer = quiet_trainer


def module(**kw: Any) -> CausalLM:
    torch.manual_seed(0)
    return CausalLM("llama-tiny", learning_rate=1e-2, warmup_steps=0, **kw)


class Probe(L.Callback):
    """Records, before each optimizer step, whether each sparse layer is masked and its masked-decay effect."""

    def __init__(self) -> None:
        self.masked: dict[int, bool] = {}
        self.valid: dict[int, bool] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        layers = [m for m in pl_module.modules() if isinstance(m, SparseLinear)]
        step = trainer.global_step - 1
        self.masked[step] = all(m.mask is not None for m in layers)
        ok = True
        for m in layers:
            if m.mask is not None:
                r, c = m.mask.shape
                b = m.mask.reshape(r // 4, 4, c // 4, 4).int()
                ok &= bool((b.sum(1) == 2).all() and (b.sum(3) == 2).all())
        self.valid[step] = ok


def test_phases_masks_logging_and_decay() -> None:
    cb = SemiStructuredSparsity(dense_warmup_steps=2, mask_refresh_every=2, dense_finetune_fraction=0.25)
    probe, hist = Probe(), MemoryLogger()
    lm = module()
    t = trainer(max_steps=8, callbacks=[cb, probe], logger=hist)
    t.fit(lm, loader())
    assert len(cb.layers) == 6 and not cb.skipped  # 2 blocks x gate/up/down
    assert all(n.endswith(("gate_proj", "up_proj", "down_proj")) for n in cb.layers)
    assert probe.masked == {0: False, 1: False, 2: True, 3: True, 4: True, 5: True, 6: False, 7: False}
    assert all(probe.valid.values())
    assert cb.refreshes == 2 and cb.last_refresh_step == 4  # steps 2 and 4
    assert hist.series("sparsity24/phase") == {i: float(i >= 2) + float(i >= 6) for i in range(8)}
    dens = hist.series("sparsity24/density")
    assert dens[1] == 1.0 and dens[3] == 0.5 and dens[7] == 1.0
    flips = hist.series("sparsity24/flip_rate")
    assert list(flips) == [4] and 0.0 <= flips[4] <= 1.0  # the first mask has nothing to flip from
    assert any(k.startswith("sparsity24/flip_rate/model.layers.0.mlp") for _, m in hist.rows for k in m)
    # state_dict keys are those of the plain model
    assert all(not k.endswith("mask") for k in lm.state_dict())


def test_masked_decay_added_to_pruned_grads_only() -> None:
    cb = SemiStructuredSparsity(mask_refresh_every=100, masked_decay=0.5)
    seen: dict[str, torch.Tensor] = {}

    class Grab(L.Callback):
        # Registered after cb: sees the gradient after masked decay; and before: the raw one.
        def __init__(self, key: str) -> None:
            self.key = key

        def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, opt: Any) -> None:
            layer = cb.layers["model.layers.0.mlp.up_proj"]
            assert layer.weight.grad is not None
            seen[self.key] = layer.weight.grad.clone()
            seen["w"] = layer.weight.detach().clone()

    t = trainer(max_steps=1, callbacks=[Grab("before"), cb, Grab("after")])
    t.fit(module(), loader(n=4))
    mask = cb.masks["model.layers.0.mlp.up_proj"]
    torch.testing.assert_close(seen["after"] - seen["before"], 0.5 * seen["w"] * (~mask))
    assert (seen["before"][~mask] != 0).any()  # the dense weight gradient reaches pruned weights


class StopAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def _fit(ckpt_dir: Path, stop_at: int = 0, ckpt_path: str | None = None) -> tuple[CausalLM, SemiStructuredSparsity]:
    lm = module()
    cb = SemiStructuredSparsity(dense_warmup_steps=1, mask_refresh_every=2, dense_finetune_fraction=0.2)
    ckpt = ModelCheckpoint(dirpath=str(ckpt_dir), every_n_train_steps=1, save_top_k=-1)
    callbacks: list[L.Callback] = [cb, ckpt] + ([StopAt(stop_at)] if stop_at else [])
    trainer(max_steps=10, enable_checkpointing=True, callbacks=callbacks).fit(lm, loader(), ckpt_path=ckpt_path)
    return lm, cb


def test_resume_continues_exactly(tmp_path: Path) -> None:
    straight, cb_a = _fit(tmp_path / "a", stop_at=6)
    _, _ = _fit(tmp_path / "b", stop_at=4)
    ckpt = tmp_path / "b" / "epoch=1-step=4.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    saved = next(v for k, v in state["callbacks"].items() if "SemiStructuredSparsity" in k)
    assert saved["phase"] == "sparse" and len(saved["masks"]) == 6 and saved["last_refresh_step"] == 3
    resumed, cb_b = _fit(tmp_path / "b", stop_at=6, ckpt_path=str(ckpt))
    for (ka, va), (kb, vb) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert ka == kb
        torch.testing.assert_close(va, vb, rtol=0, atol=0)
    assert cb_a.masks.keys() == cb_b.masks.keys()
    for k in cb_a.masks:
        assert torch.equal(cb_a.masks[k], cb_b.masks[k])
    assert (cb_a.refreshes, cb_a.last_refresh_step) == (cb_b.refreshes, cb_b.last_refresh_step)


def test_export_plain_hf_model_with_zeros(tmp_path: Path) -> None:
    out = tmp_path / "export"
    cb = SemiStructuredSparsity(mask_refresh_every=2, transposable=False, export_dir=str(out))
    lm = module()
    trainer(max_steps=3, callbacks=[cb]).fit(lm, loader())
    assert lm.model is not None
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    lm.model.eval()
    with torch.no_grad():
        expected = lm.model(input_ids=ids).logits
    plain = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert not any(isinstance(m, SparseLinear) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    masks = torch.load(out / MASKS_FILE)
    assert set(masks) == set(cb.layers)
    w = plain.get_submodule("model.layers.1.mlp.down_proj").weight
    m = masks["model.layers.1.mlp.down_proj"]
    assert (w[~m] == 0).all() and (m.reshape(m.shape[0], -1, 4).sum(-1) == 2).all()


def test_layers_with_bad_dims_fall_back_dense_with_warning() -> None:
    cb = SemiStructuredSparsity(targets="mlp", mask_refresh_every=1)
    lm = module(config_overrides={"intermediate_size": 98})
    with pytest.warns(UserWarning, match=r"model\.layers\.0\.mlp\.gate_proj.*\(98, 128\).*multiples of 4"):
        trainer(max_steps=2, callbacks=[cb]).fit(lm, loader(n=4))
    assert not cb.layers and len(cb.skipped) == 6
    assert not any(isinstance(m, SparseLinear) for m in lm.modules())


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"mask_refresh_every": 0}, "mask_refresh_every"),
        ({"mask_refresh_every": 2.5}, "mask_refresh_every"),
        ({"dense_finetune_fraction": 1.0}, "dense_finetune_fraction"),
        ({"dense_finetune_fraction": -0.1}, "dense_finetune_fraction"),
        ({"dense_warmup_steps": -1}, "dense_warmup_steps"),
        ({"masked_decay": -1e-4}, "masked_decay"),
        ({"masked_decay": float("nan")}, "masked_decay"),
        ({"targets": ""}, "targets"),
        ({"targets": []}, "targets"),
        ({"transposable": "yes"}, "transposable"),
        ({"log_every_n_steps": 0}, "log_every_n_steps"),
    ],
)
def test_bad_arguments_name_argument_and_value(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=rf"{name}=.*must be"):
        SemiStructuredSparsity(**kwargs)


def test_targets_matching_nothing_raises() -> None:
    cb = SemiStructuredSparsity(targets="no_such_layer")
    with pytest.raises(ValueError, match="matches no linear"):
        trainer(max_steps=1, callbacks=[cb]).fit(module(), loader(n=4))


def test_validate_from_a_checkpoint_uses_the_saved_masks(tmp_path: Path) -> None:
    # Callback state is not restored by trainer.validate; the masks must come from the checkpoint all the same.
    cb = SemiStructuredSparsity(targets="mlp", dense_warmup_steps=1, mask_refresh_every=2, dense_finetune_fraction=0.0)
    m = module()
    t = trainer(max_steps=4, callbacks=[cb])
    t.fit(m, loader())
    ckpt = tmp_path / "sparse.ckpt"
    t.save_checkpoint(ckpt)
    val = loader(n=4)
    sparse_loss = trainer(limit_val_batches=None).validate(m, val, verbose=False)[0]["val/loss"]

    fresh = module()
    got = trainer(limit_val_batches=None, callbacks=[SemiStructuredSparsity(targets="mlp", dense_warmup_steps=1)])
    loss = got.validate(fresh, val, ckpt_path=str(ckpt), verbose=False)[0]["val/loss"]
    assert loss == pytest.approx(sparse_loss, rel=1e-6)
    layers = [x for x in fresh.modules() if isinstance(x, SparseLinear)]
    assert layers and all(layer.mask is not None for layer in layers)
    # ... and it is not the dense model's loss (the dense weight keeps its pruned entries during sparse training).
    for layer in layers:
        layer.set_mask(None)
    dense_loss = trainer(limit_val_batches=None).validate(fresh, val, verbose=False)[0]["val/loss"]
    assert abs(dense_loss - sparse_loss) > 1e-4


def test_lit_accel_export_writes_the_masked_weights(tmp_path: Path) -> None:
    from lit_accel.cli import main

    cb = SemiStructuredSparsity(targets="mlp", dense_warmup_steps=1, mask_refresh_every=2, dense_finetune_fraction=0.0)
    m = module()
    t = trainer(max_steps=4, callbacks=[cb])
    t.fit(m, loader())
    t.save_checkpoint(tmp_path / "sparse.ckpt")
    main(["export", "--ckpt", str(tmp_path / "sparse.ckpt"), "--out", str(tmp_path / "hf")])
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    x = torch.randint(0, VOCAB, (2, 12))
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, m(x).logits, rtol=1e-5, atol=1e-5)
    w = hf.model.layers[0].mlp.up_proj.weight
    assert (w.reshape(w.shape[0], -1, 4) != 0).sum(-1).max() <= 2  # 2:4 in the written weights


@pytest.mark.parametrize("accumulate", [1, 2])
def test_masked_decay_as_gradient_hook_matches_the_step_time_decay(
    monkeypatch: pytest.MonkeyPatch, accumulate: int
) -> None:
    # Under DeepSpeed the decay is a hook on each sparse weight, 1/accumulate of it per micro-batch; forced here on
    # one device, the gradient the optimizer sees must equal the step-time path's (which adds it once).
    name = "model.layers.0.mlp.up_proj"
    seen: dict[Any, torch.Tensor] = {}
    hooks: dict[Any, int] = {}
    for hooked in (False, True, "no decay"):
        torch.manual_seed(0)
        cb = SemiStructuredSparsity(mask_refresh_every=100, masked_decay=0.0 if hooked == "no decay" else 0.5)
        if hooked is True:
            monkeypatch.setattr(SemiStructuredSparsity, "_decay_in_hooks", staticmethod(lambda trainer: True))

        class Grab(L.Callback):
            def __init__(self, cb: SemiStructuredSparsity, hooked: Any) -> None:
                self.cb, self.hooked = cb, hooked

            def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, opt: Any) -> None:
                grad = self.cb.layers[name].weight.grad
                assert grad is not None
                seen[self.hooked] = grad.clone()
                seen["w"], seen["mask"] = self.cb.layers[name].weight.detach().clone(), self.cb.masks[name]
                hooks[self.hooked] = len(self.cb._decay_hooks)

        t = trainer(max_steps=1, accumulate_grad_batches=accumulate, callbacks=[cb, Grab(cb, hooked)])
        t.fit(module(), loader(n=4 * accumulate))
        assert (hooks[hooked] == len(cb.layers) > 0) is (hooked is True)
        assert not cb._decay_hooks and cb._hook_decay == 0.0  # removed at the end of fit
        monkeypatch.undo()
    torch.testing.assert_close(seen[True], seen[False], rtol=1e-6, atol=1e-7)
    # and both did add the decay (the same weights and batches without it give the raw gradient)
    torch.testing.assert_close(seen[True] - seen["no decay"], 0.5 * seen["w"] * (~seen["mask"]), rtol=1e-5, atol=1e-6)


def test_decay_hooks_removed_when_a_fit_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SemiStructuredSparsity, "_decay_in_hooks", staticmethod(lambda trainer: True))
    cb = SemiStructuredSparsity(mask_refresh_every=100, masked_decay=0.5)
    lm = module()

    class Boom(L.Callback):
        def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, opt: Any) -> None:
            assert cb._decay_hooks  # registered while fitting
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        trainer(max_steps=2, callbacks=[cb, Boom()]).fit(lm, loader(n=8))
    assert not cb._decay_hooks and cb._hook_decay == 0.0
    # the weights carry no hook: a zero loss gives zero gradients
    weight = cb.layers["model.layers.0.mlp.up_proj"].weight
    weight.grad = None
    (weight * 0.0).sum().backward()
    assert weight.grad is not None and not weight.grad.any()


def test_masked_decay_term_checks_the_weight_is_whole() -> None:
    from lit_accel.sparsity.functional import masked_decay_, masked_decay_term

    w, g = torch.randn(8, 16), torch.randn(8, 16)
    m = torch.rand(8, 16) > 0.5
    ref = g.clone()
    masked_decay_(ref, w, m, 0.25)
    torch.testing.assert_close(masked_decay_term(g, w, m, 0.25), ref)
    with pytest.raises(RuntimeError, match="needs the whole weight"):
        masked_decay_term(g, torch.empty(0), m, 0.25)  # a ZeRO-3 partition


def test_deepspeed_loss_scale_read_from_the_engine() -> None:
    pytest.importorskip("deepspeed")
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DeepSpeedStrategy

    from lit_accel.sparsity.callback import _deepspeed_loss_scale

    class Fp16(DeepSpeedStrategy):
        deepspeed_engine = SimpleNamespace(optimizer=SimpleNamespace(loss_scale=1024.0))  # type: ignore[assignment]

    class Bf16(DeepSpeedStrategy):
        deepspeed_engine = SimpleNamespace(optimizer=SimpleNamespace())  # type: ignore[assignment]

    assert _deepspeed_loss_scale(SimpleNamespace(strategy=Fp16())) == 1024.0  # type: ignore[arg-type]
    assert _deepspeed_loss_scale(SimpleNamespace(strategy=Bf16())) == 1.0  # type: ignore[arg-type]
    assert _deepspeed_loss_scale(SimpleNamespace(strategy=None)) == 1.0  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fraction", "message"),
    [(0.0, r"dense_warmup_steps=4 covers the whole run \(2 steps\)"), (0.5, r"dense_warmup_steps=4 reaches")],
)
def test_a_run_that_never_goes_sparse_says_so_at_fit_start(fraction: float, message: str) -> None:
    cb = SemiStructuredSparsity(targets="mlp", dense_warmup_steps=4, dense_finetune_fraction=fraction)
    with pytest.warns(UserWarning, match=message + r".*no sparse phase"):
        trainer(max_steps=2, callbacks=[cb]).fit(module(), loader(n=8))
    assert all(layer.mask is None for layer in cb.layers.values())
