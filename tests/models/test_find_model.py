"""Techniques find the Hugging Face model whatever the LightningModule calls it; the Fabric example runs."""

from __future__ import annotations

import runpy
from typing import Any

import lightning as L
import pytest
import torch
from _helpers import REPO, quiet_trainer, tiny_llama
from torch import nn
from torch.utils.data import DataLoader

from lit_accel.callbacks import DropBP, LoRA
from lit_accel.lowrank import lora_layers
from lit_accel.models.surgery import find_hf_model


class Net(L.LightningModule):
    """A user's module: the model is `self.net`, built in __init__."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = tiny_llama(layers=2)

    def training_step(self, batch: dict[str, torch.Tensor], idx: int) -> torch.Tensor:
        return self.net(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)


def _loader() -> DataLoader[Any]:
    ids = torch.randint(0, 128, (16, 16), generator=torch.Generator().manual_seed(0))
    return DataLoader([{"input_ids": x} for x in ids], batch_size=4)  # type: ignore[arg-type]


def test_techniques_train_a_model_held_as_self_net() -> None:
    module = Net()
    assert find_hf_model(module) is module.net
    dropbp = DropBP(target=0.5, sensitivity="uniform")
    seen: list[int] = []

    class Probe(L.Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            assert dropbp.controller is not None
            seen.append(sum(dropbp.controller.mask))

    quiet_trainer(max_steps=3, callbacks=[LoRA(r=4), dropbp, Probe()]).fit(module, _loader())
    assert len(lora_layers(module.net)) == 14  # 7 linears a block, 2 blocks
    assert seen == [2, 2, 2]  # half of the 4 sublayers dropped at every step


def test_the_model_attribute_can_be_named_and_ambiguity_is_an_error() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.student, self.teacher = tiny_llama(), tiny_llama()

    with pytest.raises(ValueError, match=r"several Hugging Face models \(student .*teacher.*lit_accel_model_attr"):
        find_hf_model(Two())

    class Named(Two):
        lit_accel_model_attr = "student"

    named = Named()
    assert find_hf_model(named) is named.student

    class Wrong(Two):
        lit_accel_model_attr = "missing"

    with pytest.raises(ValueError, match="lit_accel_model_attr='missing'"):
        find_hf_model(Wrong())
    plain = nn.Linear(2, 2)
    assert find_hf_model(plain) is plain  # a module that is the model itself


def test_fabric_example_trains() -> None:
    example = runpy.run_path(str(REPO / "examples" / "fabric_lora_dropbp.py"))
    losses = example["main"](["--steps", "12"])
    assert len(losses) == 12 and all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-3:]) < sum(losses[:3])
