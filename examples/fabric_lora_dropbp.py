"""LoRA + DropBP without a Trainer: lit_accel's functional API in a Lightning Fabric loop.

Callbacks need a ``Trainer``; with Fabric (or a plain PyTorch loop) call the techniques' pure functions yourself:
``apply_lora`` adapts and freezes the model, ``apply_dropbp`` installs the sublayer hooks, and each step draws a
drop mask (the same on every rank: one generator, one seed) before the forward pass.

    python examples/fabric_lora_dropbp.py --steps 20                 # CPU, a tiny random LLaMA
    python examples/fabric_lora_dropbp.py --accelerator cuda --devices 2 --steps 200
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lit_accel.dropbp.functional import apply_dropbp, draw_mask, uniform_drop_rates
from lit_accel.lowrank import apply_lora, lora_parameters


def main(argv: list[str] | None = None) -> list[float]:
    """Trains for ``--steps`` and returns the losses."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--drop", type=float, default=0.5, help="DropBP target: fraction of sublayer backward dropped")
    args = parser.parse_args(argv)

    fabric = L.Fabric(accelerator=args.accelerator, devices=args.devices)
    fabric.launch()
    fabric.seed_everything(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, vocab_size=512
    )
    model = LlamaForCausalLM(config)  # in practice: AutoModelForCausalLM.from_pretrained(<local directory>)
    apply_lora(model, targets="all-linear", r=8, alpha=16)  # freezes the base, adds trainable adapters
    controller = apply_dropbp(model)
    rates = uniform_drop_rates(controller.num_sublayers, args.drop)
    masks = torch.Generator().manual_seed(1234)  # the same seed on every rank: the same sublayers drop everywhere

    optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    model, optimizer = fabric.setup(model, optimizer)
    # Stand-in data: a few fixed sequences per rank, so the loss visibly falls; use your DataLoader here.
    data = torch.randint(0, config.vocab_size, (2, 4, 64), generator=torch.Generator().manual_seed(fabric.global_rank))
    losses = []
    for step in range(args.steps):
        ids = data[step % 2].to(fabric.device)
        controller.set_mask(draw_mask(rates, masks, trainable=controller.trainable))
        loss = model(input_ids=ids, labels=ids).loss
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    controller.keep_all()
    fabric.print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {args.steps} steps")
    return losses


if __name__ == "__main__":
    main()
