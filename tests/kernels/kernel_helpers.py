"""Shared by the kernel tests: a batch with ignored labels, loss + gradients, and the check that a patched model
computes what the unpatched Hugging Face model computes."""

from __future__ import annotations

import torch
from torch import nn


def batch(vocab: int = 80, b: int = 2, t: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (b, t))
    labels = ids.clone()
    labels[0, :3] = -100  # ignored tokens (e.g. a prompt) must stay ignored after the shift
    return ids, labels


def loss_and_grads(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads


def assert_same(model: nn.Module, patched: nn.Module, rtol: float = 1e-5, atol: float = 1e-6, seq: int = 12) -> None:
    """Loss and every gradient in training mode, logits and loss in eval mode, equal within ``rtol``/``atol``."""
    ids, labels = batch(model.config.vocab_size, t=seq)
    model.train()
    patched.train()
    loss_ref, grads_ref = loss_and_grads(model, ids, labels)
    loss, grads = loss_and_grads(patched, ids, labels)
    torch.testing.assert_close(loss, loss_ref, rtol=rtol, atol=atol)
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=rtol * 10, atol=atol * 10, msg=name)
    # Evaluation keeps Hugging Face's head: logits are returned and equal.
    model.eval()
    patched.eval()
    with torch.no_grad():
        ref = model(input_ids=ids, labels=labels)
        got = patched(input_ids=ids, labels=labels)
    torch.testing.assert_close(got.logits, ref.logits, rtol=rtol, atol=atol)
    torch.testing.assert_close(got.loss, ref.loss, rtol=rtol, atol=atol)
