"""The DropBP callback in a real Lightning Trainer on CPU: rates, masks, logging, resume, bad input."""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from _helpers import MemoryLogger, tiny_llama
from dropbp_helpers import VOCAB, Recorder, random_loader, trainer_kwargs
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import DDPStrategy

from lit_accel.cli import LitAccelCLI
from lit_accel.dropbp import (
    DropBP,
    apply_dropbp,
    draw_mask,
    dropped_fraction,
    sublayer_backward_flops,
    uniform_drop_rates,
)
from lit_accel.models import CausalLM
from lit_accel.models.structure import StructurePatterns, get_structure


def causal_lm(layers: int = 2, **kw: Any) -> CausalLM:
    L.seed_everything(0)
    overrides = {"vocab_size": VOCAB, "num_hidden_layers": layers, "hidden_size": 64, "intermediate_size": 128}
    return CausalLM("llama-tiny", config_overrides=overrides, warmup_steps=2, learning_rate=1e-3, **kw)


def fit(module: CausalLM, cb: DropBP, steps: int, n_data: int = 64, **kw: Any) -> Recorder:
    rec = Recorder(cb)
    extra = kw.pop("callbacks", [])
    trainer = L.Trainer(max_steps=steps, callbacks=[cb, rec, *extra], **trainer_kwargs(**kw))
    trainer.fit(module, random_loader(n_data))
    return rec


# ----------------------------------------------------------------------------------------------------------- training


def test_auto_mode_measures_allocates_and_drops_the_target_fraction() -> None:
    module = causal_lm(layers=4)
    logger = MemoryLogger()
    cb = DropBP(target=0.5, sensitivity_at=3, log_every_n_steps=1)
    rec = fit(module, cb, steps=120, logger=logger)
    assert all(math.isfinite(x) for x in rec.losses)
    assert rec.losses[-1] < rec.losses[0]
    assert cb.measured and cb.sensitivity_step == 3 and cb.sensitivity_seconds > 0
    assert cb.sensitivities is not None and len(cb.sensitivities) == 8 and min(cb.sensitivities) > 0
    rates, flops = cb.rates, cb.allocation_flops
    assert flops is not None and rates != uniform_drop_rates(8, 0.5)
    expected = sum(r * f for r, f in zip(rates, flops)) / sum(flops)
    assert 0.5 <= expected < 0.6
    # Before the measurement every sublayer drops at the target (the reference code's default), after it the
    # realised fraction of backward FLOPs averages the allocation's expectation.
    realised = [dropped_fraction(m, flops) for m, s in zip(rec.masks, rec.steps) if s > 3]
    assert statistics.mean(realised) == pytest.approx(expected, abs=0.07)
    assert len(set(rec.masks)) > 5  # systematic sampling fixes the count, so fewer distinct masks
    keys = logger.keys()
    for key in ("dropbp/dropped_backward_flops_fraction", "dropbp/num_dropped"):
        assert key in keys
    assert "dropbp/target" not in keys and logger.hparams["dropbp/target"] == 0.5  # a constant: the run's config
    assert {f"dropbp/rate/{i}" for i in range(8)} <= keys and "dropbp/sensitivity/7" in keys
    assert cb.controller is None  # hooks removed at teardown
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in module.parameters())


def test_uniform_mode_never_measures_and_drops_target_on_average() -> None:
    module = causal_lm(layers=4)
    cb = DropBP(target=0.25, sensitivity="uniform")
    rec = fit(module, cb, steps=100)
    assert not cb.measured and cb.sensitivities is None and cb.sensitivity_seconds == 0.0
    assert cb.rates == [0.25] * 8
    assert module.model is not None
    flops = sublayer_backward_flops(get_structure(module.model), seq_len=16)
    assert statistics.mean(dropped_fraction(m, flops) for m in rec.masks) == pytest.approx(0.25, abs=0.06)
    # The masks are the generator's draws, in order.
    g = torch.Generator().manual_seed(0)
    assert rec.masks == [draw_mask([0.25] * 8, g) for _ in rec.masks]


def test_dense_before_measurement_and_activation_checkpointing() -> None:
    # Same seeds, same masks: with activation checkpointing the losses are those without it.
    losses = []
    for ckpt in (False, True):
        module = causal_lm(gradient_checkpointing=ckpt)
        cb = DropBP(target=0.5, sensitivity_at=3, before_measurement="dense")
        rec = fit(module, cb, steps=8)
        assert all(not any(m) for m, s in zip(rec.masks, rec.steps) if s < 3)
        assert any(any(m) for m, s in zip(rec.masks, rec.steps) if s > 3)
        losses.append(rec.losses)
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("decide_every", ["step", "micro_batch"])
def test_decide_every_with_gradient_accumulation(decide_every: str) -> None:
    module = causal_lm()
    cb = DropBP(target=0.5, sensitivity="uniform", decide_every=decide_every, seed=4)  # type: ignore[arg-type]
    rec = fit(module, cb, steps=6, accumulate_grad_batches=2)
    assert rec.steps == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    g = torch.Generator().manual_seed(4)
    if decide_every == "step":
        draws = [draw_mask([0.5] * 4, g) for _ in range(6)]
        assert rec.masks == [m for m in draws for _ in range(2)]
    else:
        assert rec.masks == [draw_mask([0.5] * 4, g) for _ in range(12)]


class MeasuredLog(L.Callback):
    def __init__(self, dropbp: DropBP) -> None:
        self.dropbp = dropbp
        self.measured: list[bool] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.measured.append(self.dropbp.measured)


def test_sensitivity_over_several_batches_and_target_zero() -> None:
    cb = DropBP(target=0.5, sensitivity_at=1, sensitivity_batches=3)
    log = MeasuredLog(cb)
    rec = fit(causal_lm(), cb, steps=5, callbacks=[log], accumulate_grad_batches=2)
    # Step 1 is micro-batches 2 and 3, step 2 starts with micro-batch 4: measured after the third batch.
    assert log.measured == [False, False, False, False, True, True, True, True, True, True]
    assert cb.sensitivities is not None and rec.steps[4] == 2
    # target 0: nothing to allocate, so no measurement and nothing dropped.
    cb0 = DropBP(target=0.0, sensitivity_at=0)
    rec0 = fit(causal_lm(), cb0, steps=3)
    assert not cb0.measured and cb0.sensitivity_seconds == 0.0 and not any(any(m) for m in rec0.masks)


@pytest.mark.parametrize("sensitivity_at", [2, 6])
def test_resume_draws_the_same_masks_and_losses(tmp_path: Path, sensitivity_at: int) -> None:
    kw: dict[str, Any] = dict(n_data=16, enable_checkpointing=True)

    def new_cb() -> DropBP:
        return DropBP(target=0.5, sensitivity_at=sensitivity_at, seed=1)

    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1, filename="{step}")
    full = fit(causal_lm(), new_cb(), steps=8, callbacks=[ckpt_cb], **kw)
    ckpt = tmp_path / "step=4.ckpt"
    assert ckpt.is_file()

    resumed_cb = new_cb()
    rec = Recorder(resumed_cb)
    trainer = L.Trainer(max_steps=8, callbacks=[resumed_cb, rec], **trainer_kwargs(enable_checkpointing=False))
    trainer.fit(causal_lm(), random_loader(16), ckpt_path=str(ckpt))
    assert rec.steps == [4, 5, 6, 7]
    assert rec.masks == full.masks[4:]
    torch.testing.assert_close(torch.tensor(rec.losses), torch.tensor(full.losses[4:]), rtol=0, atol=1e-6)
    assert resumed_cb.measured


# ------------------------------------------------------------------------------------------------------------ logging


class FakeWandbLogger(WandbLogger):
    """A WandbLogger whose run is a recorder: no wandb process, no files."""

    def __init__(self) -> None:
        super().__init__(offline=True)
        self.logged: list[dict[str, Any]] = []

    @property
    def experiment(self) -> Any:
        return SimpleNamespace(log=self.logged.append)


def test_allocation_chart_goes_to_wandb_and_scalars_elsewhere() -> None:
    cb = DropBP(target=0.5)
    cb.controller = apply_dropbp(tiny_llama())
    cb._num_sublayers = 4
    cb.sensitivities = [1.0, 2.0, 3.0, 4.0]
    cb.allocated_rates = [0.9, 0.5, 0.3, 0.2]
    cb.measured = True
    wandb_logger, other = FakeWandbLogger(), MemoryLogger()
    trainer = SimpleNamespace(is_global_zero=True, loggers=[wandb_logger, other], global_step=7)
    cb._log_allocation(trainer)  # type: ignore[arg-type]
    (payload,) = wandb_logger.logged
    assert {"dropbp/allocation", "dropbp/rates", "dropbp/sensitivities"} <= set(payload)
    assert payload["trainer/global_step"] == 7
    table = payload["dropbp/allocation"]
    assert [row[3] for row in table.data] == [0.9, 0.5, 0.3, 0.2]
    assert [row[0] for row in table.data] == ["0.attn", "0.mlp", "1.attn", "1.mlp"]
    (step, scalars) = other.rows[0]
    assert step == 7 and scalars["dropbp/rate/0"] == 0.9 and scalars["dropbp/sensitivity/3"] == 4.0


# ------------------------------------------------------------------------------------------------- distributed set-up


def test_setup_turns_on_find_unused_parameters_under_ddp() -> None:
    strategy = DDPStrategy()
    trainer = SimpleNamespace(strategy=strategy)
    module = SimpleNamespace(automatic_optimization=True)
    DropBP().setup(trainer, module, "fit")  # type: ignore[arg-type]
    assert strategy._ddp_kwargs["find_unused_parameters"] is True
    with pytest.raises(ValueError, match="static_graph"):
        DropBP().setup(SimpleNamespace(strategy=DDPStrategy(static_graph=True)), module, "fit")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"target": -0.1}, "target"),
        ({"target": 0.95}, "target"),
        ({"target": "0.5"}, "target"),
        ({"target": True}, "target"),
        ({"sensitivity": "magic"}, "sensitivity"),
        ({"sensitivity_at": -1}, "sensitivity_at"),
        ({"sensitivity_at": 1.0}, "sensitivity_at"),
        ({"sensitivity_at": "10%"}, "sensitivity_at"),
        ({"sensitivity_batches": 0}, "sensitivity_batches"),
        ({"sensitivity_batches": 1.5}, "sensitivity_batches"),
        ({"decide_every": "epoch"}, "decide_every"),
        ({"seed": 0.5}, "seed"),
        ({"log_every_n_steps": 0}, "log_every_n_steps"),
        ({"before_measurement": "half"}, "before_measurement"),
        ({"patterns": {"blocks": "x", "no_such_field": 1}}, "patterns"),
        ({"patterns": 3}, "patterns"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=rf"DropBP {name}=") as err:
        DropBP(**kwargs)
    assert str(next(iter(kwargs.values()))) in str(err.value)


def test_a_removed_argument_is_an_unknown_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``skip_dropped_allreduce`` (a DDP hook that measured no gain) is gone: Python and YAML both refuse it."""
    with pytest.raises(TypeError, match="skip_dropped_allreduce"):
        DropBP(skip_dropped_allreduce=True)  # type: ignore[call-arg]
    fragment = tmp_path / "old.yaml"
    fragment.write_text(
        "trainer:\n  callbacks+:\n    - class_path: lit_accel.callbacks.DropBP\n      init_args:\n"
        "        skip_dropped_allreduce: true\n"
    )
    monkeypatch.chdir(tmp_path)
    base = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"
    with pytest.raises(SystemExit):
        LitAccelCLI(args=["--config", str(base), "--config", str(fragment), "--trainer.accelerator=cpu"], run=False)
    assert "Option 'skip_dropped_allreduce' is not accepted" in capsys.readouterr().err


def test_patterns_dict_is_accepted() -> None:
    cb = DropBP(patterns={"blocks": r"model\.layers\.\d+", "attention": "self_attn", "mlp": "mlp"})
    assert isinstance(cb.settings.patterns, StructurePatterns)


def test_bad_set_up_raises_before_any_step() -> None:
    with pytest.raises(ValueError, match=r"sensitivity_at=5 is step 5, at or after the end of the run \(5 "):
        fit(causal_lm(), DropBP(sensitivity_at=5), steps=5)
    with pytest.raises(ValueError, match=re.escape(r"StructurePatterns.blocks='nothing\\.\\d+' matches no module")):
        fit(causal_lm(), DropBP(patterns={"blocks": r"nothing\.\d+", "attention": "a", "mlp": "m"}), steps=5)


class ManualModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


def test_auto_needs_automatic_optimization() -> None:
    with pytest.raises(ValueError, match="sensitivity='auto'.*automatic optimization"):
        DropBP().setup(SimpleNamespace(strategy=None), ManualModule(), "fit")  # type: ignore[arg-type]
    DropBP(sensitivity="uniform").setup(SimpleNamespace(strategy=None), ManualModule(), "fit")  # type: ignore[arg-type]
