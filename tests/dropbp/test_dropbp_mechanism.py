"""DropBP's hooks: same forward, no graph and no saved activations for a dropped sublayer, reference gradients."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from _helpers import tiny_llama
from dropbp_helpers import VOCAB, detached_outputs, enable_checkpointing, grads, tiny_gpt2
from torch import nn

from lit_accel.dropbp import apply_dropbp

MODELS: dict[str, Callable[[], nn.Module]] = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))


def _loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_dropped_sublayer_same_forward_no_grads_and_reference_grads(arch: str) -> None:
    model = MODELS[arch]()
    ids = _ids()
    controller = apply_dropbp(model)
    subs = controller.sublayers
    assert controller.num_sublayers == 4
    dense_logits = model(input_ids=ids).logits

    dropped = [0, 3]  # block 0's attention and block 1's MLP
    controller.set_mask([i in dropped for i in range(4)])
    out = model(input_ids=ids, labels=ids)
    assert torch.equal(out.logits, dense_logits), "the forward pass must not change at all"
    out.loss.backward()
    got = grads(model)

    # Parameters of dropped sublayers and of their pre-norms get no gradient at all.
    dropped_params = {
        f"{owner_name}.{n}"
        for i in dropped
        for owner_name, owner in ((subs[i].name, subs[i].module), (subs[i].norm_name, subs[i].norm))
        if owner is not None
        for n, _ in owner.named_parameters()
    }
    assert dropped_params
    for name in dropped_params:
        assert got[name] is None, name

    # Every other gradient equals the hand-written reference: the dropped output detached.
    controller.remove()
    model.zero_grad(set_to_none=True)
    with detached_outputs(subs, dropped):
        ref_out = model(input_ids=ids, labels=ids)
    assert torch.equal(ref_out.logits, dense_logits)
    ref_out.loss.backward()
    ref = grads(model)
    for name, g in ref.items():
        if name in dropped_params:
            assert g is None
            continue
        assert got[name] is not None, name
        torch.testing.assert_close(got[name], g, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_dropped_sublayer_saves_no_activations(arch: str) -> None:
    model = MODELS[arch]()
    ids = _ids()
    controller = apply_dropbp(model)

    def saved_bytes() -> tuple[int, int]:
        count, size = 0, 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal count, size
            count += 1
            size += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _loss(model, ids)
        return count, size

    dense = saved_bytes()
    controller.set_mask([False, True, False, False])
    one = saved_bytes()
    controller.set_mask([True, True, True, False])
    three = saved_bytes()
    assert dense[0] > one[0] > three[0]
    assert dense[1] > one[1] > three[1]
    # Uninstalled, the model saves exactly what it saved before.
    controller.remove()
    assert saved_bytes() == dense


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_activation_checkpointing_gives_the_same_gradients(arch: str) -> None:
    ids = _ids()
    mask = [False, True, True, False]
    plain = MODELS[arch]()
    ckpt = MODELS[arch]()
    ckpt.load_state_dict(plain.state_dict())
    enable_checkpointing(ckpt)
    results = []
    for model in (plain, ckpt):
        model.train()
        controller = apply_dropbp(model)
        controller.set_mask(mask)
        _loss(model, ids).backward()
        results.append(grads(model))
        controller.remove()
    for name, g in results[0].items():
        other = results[1][name]
        if g is None:
            assert other is None, name
        else:
            assert other is not None, name
            torch.testing.assert_close(other, g, rtol=1e-6, atol=1e-7, msg=name)
    assert any(g is None for g in results[1].values())


def test_controller_mask_api_and_removal() -> None:
    model = tiny_llama()
    controller = apply_dropbp(model)
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match="3 entries"):
        controller.set_mask([True, False, True])
    controller.set_mask(torch.tensor([True, False, False, True]))
    assert controller.mask == (True, False, False, True)
    with controller.masked([False] * 4):
        assert controller.mask == (False,) * 4
    assert controller.mask == (True, False, False, True)
    controller.remove()
    assert not controller.installed and controller.mask == (False,) * 4
    assert list(model.state_dict()) == keys  # no module was replaced
    # Grad mode is restored even when the dropped sublayer raises.
    controller = apply_dropbp(model)
    controller.set_mask([True, False, False, False])

    def broken(*args: object, **kwargs: object) -> None:
        assert not torch.is_grad_enabled()  # the dropped sublayer runs without autograd
        raise RuntimeError("boom")

    controller.sublayers[0].module.forward = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="boom"):
        model(input_ids=_ids())
    assert torch.is_grad_enabled()


def test_lora_adapters_of_dropped_sublayers_get_no_gradient() -> None:
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"]))
    ids = _ids()
    controller = apply_dropbp(model)
    subs = controller.sublayers
    assert subs[0].name.startswith("base_model.model.")
    dropped = [0]
    controller.set_mask([True, False, False, False])
    _loss(model, ids).backward()
    got = grads(model)
    assert set(got) == {n for n, p in model.named_parameters() if "lora_" in n}  # adapters only are trainable
    controller.remove()
    model.zero_grad(set_to_none=True)
    with detached_outputs(subs, dropped):
        _loss(model, ids).backward()
    ref = grads(model)
    for name, g in ref.items():
        if name.startswith(subs[0].name + "."):
            assert g is None and got[name] is None, name
        else:
            assert g is not None and got[name] is not None, name
            torch.testing.assert_close(got[name], g, rtol=1e-6, atol=1e-7, msg=name)


def test_attention_only_trainable_model_never_loses_its_graph() -> None:
    # As with PEFT's default LLaMA LoRA (q_proj, v_proj only): MLP sublayers hold no trainable parameter, so the
    # all-dropped fallback must keep an attention sublayer, or backward() would fail for lack of a graph.
    from peft import LoraConfig, get_peft_model

    from lit_accel.dropbp import apply_dropbp, draw_mask

    model = get_peft_model(tiny_llama(layers=2), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    controller = apply_dropbp(model)
    assert controller.trainable == (True, False, True, False)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (2, 16))
    for _ in range(40):
        controller.set_mask(draw_mask([0.9] * 4, g, "independent", controller.trainable))
        loss = model(input_ids=x, labels=x).loss
        loss.backward()  # raises "does not require grad" if every trainable sublayer dropped
    controller.remove()
