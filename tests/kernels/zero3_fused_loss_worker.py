"""Worker for test_zero3_fused_loss.py: a few AdamW steps of a CausalLM patched by FusedKernels, under DeepSpeed
ZeRO-3 or on one device, recording what the fused LM head + loss did.

Run as ``python zero3_fused_loss_worker.py single OUT BASE BASE_TIED`` (one CPU device, no DeepSpeed) or
``python -m torch.distributed.run --standalone --nproc_per_node 2 zero3_fused_loss_worker.py zero3 OUT BASE BASE_TIED``
(``LitDeepSpeedStrategy`` ZeRO-3 in fp32, DeepSpeed's CPU accelerator over gloo). ``BASE`` and ``BASE_TIED`` are
pretrained directories of a tiny LLaMA with an untied and a tied LM head, so that every run starts from the same
weights (``zero.Init`` would draw others). Each mode trains these variants, one after the other in the process:

- ``untied`` and ``tied``: the model is built in ``configure_model`` (under ZeRO-3 inside ``zero.Init``, so
  ``lm_head.weight`` is already partitioned when FusedKernels patches it);
- ``late`` (ZeRO-3 only): the model is built before the fit, outside ``zero.Init``, so FusedKernels patches a whole
  model and ``deepspeed.initialize`` partitions it afterwards.

Each rank's sequences are its share of one fixed global batch (rank ``r`` takes sequences ``r, r + W, ...``), the
same at every step. ``$LIT_ACCEL_TEST_ACCELERATOR`` (default ``cpu``) picks the accelerator. On the CPU only the
fused head + loss is patched, and with ``TRITON_INTERPRET=1`` in the environment (the test sets it) it runs its
Triton kernel through Triton's interpreter; on GPUs every kernel is patched. Writes ``OUT/rank<r>.json`` per rank:
per variant the report, the loss at each step, how often the fused op's kernel and its PyTorch reference were
called, how often ``lm_head``'s own forward ran in each training step, whether every training forward returned no
logits, and how the head's weight is held; rank 0 writes the final whole weights to ``OUT/<variant>.pt``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from _helpers import finish_distributed, quiet_trainer
from torch.utils.data import DataLoader

import lit_accel.kernels.apply as kernels_apply
from lit_accel.callbacks import FusedKernels
from lit_accel.models import CausalLM
from lit_accel.models.params import full_parameters, is_partitioned

ACCELERATOR = os.environ.get("LIT_ACCEL_TEST_ACCELERATOR", "cpu")
"""The Trainer's accelerator (``cpu`` or ``gpu``), so that the GPU test runs this worker too."""
STEPS = 4
GLOBAL_BATCH, SEQ_LEN, VOCAB = 4, 16, 128
LEARNING_RATE = 1e-2
CALLS = {"kernel": 0, "reference": 0}
"""Calls of the fused loss's Triton kernel and of its PyTorch reference by the patched forward."""


def _counted(name: str, fn: Any) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        CALLS[name] += 1
        return fn(*args, **kwargs)

    return call


kernels_apply.fused_linear_cross_entropy_kernel = _counted("kernel", kernels_apply.fused_linear_cross_entropy_kernel)
kernels_apply.linear_cross_entropy_reference = _counted("reference", kernels_apply.linear_cross_entropy_reference)


class Probe(L.Callback):
    """Counts ``lm_head`` forwards per training step, and checks that each training forward returned no logits."""

    def __init__(self) -> None:
        self.head_calls: list[int] = []
        self.logits_none: list[bool] = []
        self.losses: list[float] = []
        self.whole_between_steps: list[bool] = []
        self.head: dict[str, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = pl_module.model  # type: ignore[attr-defined]
        head = model.lm_head
        weight = head.weight
        self.head = {
            "tied": weight is model.model.embed_tokens.weight,
            "partitioned": is_partitioned(weight),
            # ZeRO-3: this rank's slice of the weight, and the whole weight's size.
            "numel": [weight.ds_tensor.numel(), weight.ds_numel] if is_partitioned(weight) else None,
            "registered": id(weight) in getattr(model, "_external_params", {}),
        }

        def on_head(module: Any, args: Any, out: Any) -> None:
            if module.training:
                self.head_calls[-1] += 1

        def on_model(module: Any, args: Any, kwargs: Any, out: Any) -> None:
            if module.training:
                self.logits_none.append(out.logits is None)

        head.register_forward_hook(on_head)
        model.register_forward_hook(on_model, with_kwargs=True)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self.head_calls.append(0)
        # Under ZeRO-3 the weight is released between forwards (not kept whole as a small "persistent" parameter),
        # so each forward really gathers it.
        weight = pl_module.model.lm_head.weight  # type: ignore[attr-defined]
        self.whole_between_steps.append(weight.numel() == getattr(weight, "ds_numel", weight.numel()))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = pl_module.model  # type: ignore[attr-defined]
        self.head["registered_at_end"] = id(model.lm_head.weight) in getattr(model, "_external_params", {})

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        self.losses.append(float(outputs["loss"]))


def loader(world_size: int, rank: int) -> DataLoader[Any]:
    """This rank's share of the fixed global batch, repeated for every step."""
    seqs = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    share = seqs[rank::world_size]
    return DataLoader([{"input_ids": x} for _ in range(STEPS) for x in share], batch_size=len(share))  # type: ignore[arg-type]


def fit(mode: str, variant: str, base: Path, out: Path) -> dict[str, Any]:
    """Trains one variant for ``STEPS`` AdamW steps; rank 0 saves the final weights."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    module = CausalLM(str(base), learning_rate=LEARNING_RATE, warmup_steps=0, min_lr_ratio=1.0, kernels=False)
    if variant == "late":
        module.configure_model()  # built whole now: configure_model under zero.Init then keeps it
    # On the CPU, under TRITON_INTERPRET=1 (the test sets it), the fused loss runs its Triton kernel through Triton's
    # interpreter, as it runs on GPUs: chunk by chunk, with the gradients computed in the forward. The other kernels
    # stay off there (they read only their own module's parameters; the distributed matrix runs them under ZeRO-3).
    on_cpu = ACCELERATOR == "cpu"
    kernels = FusedKernels(rms_norm=not on_cpu, swiglu=not on_cpu, rope=not on_cpu, strict=True)
    probe = Probe()
    if mode == "zero3":
        from lit_accel.strategies import LitDeepSpeedStrategy

        strategy: Any = LitDeepSpeedStrategy(stage=3, bf16=False)
    else:
        strategy = "auto"
    trainer = quiet_trainer(
        accelerator=ACCELERATOR,
        strategy=strategy,
        devices=world,
        max_steps=STEPS,
        callbacks=[kernels, probe],
        use_distributed_sampler=False,
    )
    calls_before = dict(CALLS)
    trainer.fit(module, loader(world, rank))
    calls = {k: v - calls_before[k] for k, v in CALLS.items()}
    with full_parameters(module):
        state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    if rank == 0:
        torch.save(state, out / f"{variant}.pt")
    assert kernels.report is not None
    return {
        "patched": kernels.report.counts(),
        "skipped": dict(kernels.report.skipped),
        "losses": probe.losses,
        "head_calls": probe.head_calls,
        "fused_calls": calls,
        "logits_none": probe.logits_none,
        "whole_between_steps": probe.whole_between_steps,
        "head": probe.head,
        "global_step": trainer.global_step,
    }


def main(mode: str, out: Path, base: Path, base_tied: Path) -> None:
    variants = {"untied": base, "tied": base_tied}
    if mode == "zero3":
        variants["late"] = base
    record = {variant: fit(mode, variant, directory, out) for variant, directory in variants.items()}
    record["world_size"] = int(os.environ.get("WORLD_SIZE", "1"))
    (out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    torch.set_num_threads(1)
    os.environ.setdefault("WANDB_MODE", "disabled")
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
    finish_distributed()
