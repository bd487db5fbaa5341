"""Hard-concrete masks, the expected parameter count, and masks applied to a tiny LLaMA through hooks."""

from __future__ import annotations

import pytest
import torch
from pruning_helpers import tiny_llama

from lit_accel.pruning.apply import apply_masks, masked_rms_norm
from lit_accel.pruning.masks import LOG_ALPHA_MAX, HardConcrete, L0Masks, count_params


def test_hard_concrete_sample_expected_and_deterministic() -> None:
    gate = HardConcrete((2, 1000))
    gate.constrain_()
    assert float(gate.log_alpha.detach().max()) <= LOG_ALPHA_MAX + 1e-6
    with torch.no_grad():
        gate.log_alpha[0].fill_(0.0)
    gen = torch.Generator().manual_seed(0)
    z = gate.train()(generator=gen)
    assert z.min() >= 0 and z.max() <= 1
    # The empirical non-zero rate of samples matches expected_l0 (P(z != 0)).
    rate = torch.stack([gate.sample(gen).ne(0).float() for _ in range(20)]).mean((0, 2))
    expected = gate.expected_l0().mean(-1).detach()
    assert torch.allclose(rate, expected, atol=0.02)
    # Reparameterised: gradients reach log_alpha from samples and from expected_l0.
    (gate.sample(gen).sum() + gate.expected_l0().sum()).backward()
    assert gate.log_alpha.grad is not None and gate.log_alpha.grad.abs().sum() > 0
    det = gate.eval()(keep=7)
    assert det.ne(0).sum(-1).tolist() == [7, 7]
    assert torch.equal(det, gate(keep=7))


def test_expected_params_exact_at_full_and_binary_scores() -> None:
    for tied in (False, True):
        model = tiny_llama(tied=tied)
        masks = L0Masks(model)
        n = sum(p.numel() for p in model.parameters())
        ones = {k: torch.ones_like(v) for k, v in masks.expected_scores().items()}
        assert int(count_params(masks.shape, ones)) == n
        assert 0.98 < float(masks.expected_num_params().detach()) / n < 1.0


def test_deterministic_masks_keep_whole_blocks_and_uniform_counts() -> None:
    masks = L0Masks(tiny_llama(layers=3), keep={"layers": 2, "heads": 1, "intermediate": 40, "hidden": 33}).eval()
    with torch.no_grad():
        masks.head_layer.log_alpha[1] = -3.0
    z = masks()
    assert z["head_layer"].ne(0).tolist() == [True, False, True]
    assert torch.equal(z["head_layer"].ne(0), z["mlp"].ne(0))
    assert z["heads"].ne(0).sum(-1).tolist() == [1, 1, 1]
    assert z["intermediate"].ne(0).sum(-1).tolist() == [40, 40, 40]
    assert int(z["hidden"].ne(0).sum()) == 33


def test_masked_rms_norm_matches_norm_over_kept_dims() -> None:
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 1.0, 1.0, 0.25])
    x = x * mask
    w = torch.randn(8)
    kept = mask.ne(0)
    ref = torch.zeros_like(x)
    xs = x[..., kept]
    ref[..., kept] = w[kept] * xs * torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + 1e-6) * mask[kept]
    assert torch.allclose(masked_rms_norm(x, w, 1e-6, mask), ref, atol=1e-6)


def _open_masks(masks: L0Masks) -> dict[str, torch.Tensor]:
    return {k: torch.ones_like(v) for k, v in masks.expected_scores().items()}


def test_all_ones_masks_give_plain_logits() -> None:
    model = tiny_llama()
    masks = L0Masks(model)
    ids = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        plain = model(ids).logits
        hooks = apply_masks(model, masks)
        hooks.masks.forward = lambda generator=None: _open_masks(masks)  # type: ignore[method-assign]
        masked = model(ids).logits
        hooks.remove()
        after = model(ids).logits
    assert torch.allclose(masked, plain, atol=1e-5)
    assert torch.equal(after, plain)


def test_masked_kv_group_equals_zeroed_weights() -> None:
    model = tiny_llama()
    masks = L0Masks(model)
    ids = torch.randint(0, 96, (2, 10))
    zs = _open_masks(masks)
    zs["heads"][1, 0] = 0.0  # layer 1, KV group 0 = KV head 0 and query heads 0, 1
    masks.forward = lambda generator=None: zs  # type: ignore[method-assign]
    with torch.no_grad(), apply_masks(model, masks):
        masked = model(ids).logits
    ref = tiny_llama()
    ref.load_state_dict(model.state_dict())
    attn = ref.model.layers[1].self_attn
    d = 16
    with torch.no_grad():
        attn.q_proj.weight[: 2 * d] = 0
        attn.k_proj.weight[:d] = 0
        attn.v_proj.weight[:d] = 0
        attn.o_proj.weight[:, : 2 * d] = 0
        expected = ref(ids).logits
    assert torch.allclose(masked, expected, atol=1e-5)


def test_gradients_reach_every_log_alpha() -> None:
    model = tiny_llama()
    masks = L0Masks(model).train()
    with torch.no_grad():
        for gate in masks.groups().values():
            gate.log_alpha.fill_(0.5)  # gates open but not saturated, so samples carry gradient
    ids = torch.randint(0, 96, (2, 10))
    with apply_masks(model, masks) as hooks:
        hooks.generator = torch.Generator().manual_seed(1)
        loss = model(ids, labels=ids).loss
    loss.backward()
    for name, gate in masks.groups().items():
        assert gate.log_alpha.grad is not None and gate.log_alpha.grad.abs().sum() > 0, name


def test_bf16_model_under_sampled_masks() -> None:
    model = tiny_llama().to(torch.bfloat16).train()
    masks = L0Masks(model).train()
    ids = torch.randint(0, 96, (2, 10))
    with apply_masks(model, masks) as hooks:
        hooks.generator = torch.Generator().manual_seed(0)
        out = model(ids, labels=ids)
        first = hooks.zs
        model(ids)
        assert hooks.zs is not first  # a fresh sample per forward
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    assert masks.hidden.log_alpha.grad is not None and masks.hidden.log_alpha.grad.dtype == torch.float32


def test_blocks_are_ranked_by_clamped_gates_not_by_a_raw_sum() -> None:
    """After an optimizer step a gate can sit above the clamp bound: block 0's raw sum (8.0 + 0.0) beats block 1's
    (4.5 + 0.5), but with each gate clamped, as in training, block 1 (5.0) beats block 0 (4.6)."""
    masks = L0Masks(tiny_llama(layers=2), keep={"layers": 1}).eval()
    with torch.no_grad():
        masks.head_layer.log_alpha.copy_(torch.tensor([8.0, 4.5]))
        masks.mlp.log_alpha.copy_(torch.tensor([0.0, 0.5]))
    det = masks.deterministic()
    assert det["head_layer"][0] == 0 and det["head_layer"][1] > 0
    assert det["mlp"][0] == 0 and det["mlp"][1] > 0
    assert masks.head_layer.log_alpha[0] == 8.0  # evaluating leaves the parameters as they were


def test_a_partitioned_mask_read_without_a_gather_raises_in_words() -> None:
    gate = HardConcrete((2, 3))
    with torch.no_grad():
        gate.log_alpha.data = torch.empty(0)  # what DeepSpeed ZeRO-3 leaves in a parameter outside a gather
    for read in (gate.sample, gate.expected_l0):
        with pytest.raises(RuntimeError, match=r"shape \(0,\), not \(2, 3\) \(a DeepSpeed ZeRO-3 partition\)"):
            read()
