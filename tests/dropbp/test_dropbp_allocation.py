"""Drawing masks, measuring sensitivity and allocating rates (the functional core, without Lightning)."""

from __future__ import annotations

import heapq
import itertools

import pytest
import torch
from _helpers import tiny_llama
from dropbp_helpers import VOCAB, detached_outputs, tiny_gpt2
from torch import nn

from lit_accel.dropbp import (
    allocate_drop_rates,
    apply_dropbp,
    draw_mask,
    dropped_fraction,
    measure_sensitivity,
    sublayer_backward_flops,
    uniform_drop_rates,
)
from lit_accel.models.flops import backward_flops
from lit_accel.models.structure import get_structure

# ------------------------------------------------------------------------------------------------------------ drawing


@pytest.mark.parametrize("sampling", ["systematic", "independent"])
def test_draw_mask_is_a_function_of_the_generator_state(sampling: str) -> None:
    rates = [0.2, 0.5, 0.7, 0.1]
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    seq_a = [draw_mask(rates, a, sampling) for _ in range(50)]
    seq_b = [draw_mask(rates, b, sampling) for _ in range(50)]
    assert seq_a == seq_b
    assert len(set(seq_a)) > 3
    # The generator advances the same way whatever the rates: the state after k draws does not depend on them.
    c = torch.Generator().manual_seed(3)
    for _ in range(50):
        draw_mask([0.0] * 4, c, sampling)
    assert torch.equal(c.get_state(), a.get_state())


def test_independent_draw_is_u_below_rate() -> None:
    rates = [0.2, 0.5, 0.7, 0.1]
    d = torch.Generator().manual_seed(5)
    u = torch.rand(4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert draw_mask(rates, d, "independent") == tuple(bool(x < r) for x, r in zip(u, rates))


def test_systematic_draw_fixes_the_count_and_keeps_the_marginals() -> None:
    g = torch.Generator().manual_seed(0)
    rates = [0.1, 0.5, 0.9, 0.3, 0.45, 0.0, 0.9, 0.25]  # sum 3.4: 3 or 4 drop every step
    masks = torch.tensor([draw_mask(rates, g, "systematic") for _ in range(6000)], dtype=torch.float64)
    counts = masks.sum(1)
    assert set(counts.tolist()) == {3.0, 4.0}
    assert counts.mean().item() == pytest.approx(3.4, abs=0.03)
    torch.testing.assert_close(masks.mean(0), torch.tensor(rates, dtype=torch.float64), atol=0.025, rtol=0)
    # Independent draws spread the count much wider for the same marginals.
    ind = torch.tensor([draw_mask(rates, g, "independent") for _ in range(2000)], dtype=torch.float64).sum(1)
    assert ind.std() > 2 * counts.std()
    with pytest.raises(ValueError, match="sampling='poisson' is not allowed"):
        draw_mask(rates, g, "poisson")  # type: ignore[arg-type]


@pytest.mark.parametrize("sampling", ["systematic", "independent"])
def test_draw_mask_frequencies_and_all_dropped_fallback(sampling: str) -> None:
    rates = [0.1, 0.5, 0.9, 0.3]
    g = torch.Generator().manual_seed(0)
    masks = torch.tensor([draw_mask(rates, g, sampling) for _ in range(4000)], dtype=torch.float64)
    torch.testing.assert_close(masks.mean(0), torch.tensor(rates, dtype=torch.float64), atol=0.03, rtol=0)
    assert not bool(masks.all(1).any()), "a step never drops every sublayer"
    # Everything would drop: the lowest rate is kept, the lowest index among equals.
    assert draw_mask([1.0, 1.0, 1.0], g, sampling) == (False, True, True)
    always = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert draw_mask([1.0, 1.0, 1.0, 1.0, 1.0], always, sampling) == (False, True, True, True, True)
    assert draw_mask([0.0, 0.0], g) == (False, False)
    assert draw_mask([], g) == ()


def test_dropped_fraction_and_sublayer_flops() -> None:
    structure = get_structure(tiny_llama())
    flops = sublayer_backward_flops(structure, seq_len=32)
    subs = structure.sublayers()
    assert flops == [backward_flops(structure, s, 32) for s in subs]
    # Attention's sequence-length term: a longer sequence costs more attention, the same MLP.
    longer = sublayer_backward_flops(structure, seq_len=64)
    assert longer[0] > flops[0] and longer[1] == flops[1]
    assert dropped_fraction([True, False, False, True], flops) == pytest.approx((flops[0] + flops[3]) / sum(flops))
    assert dropped_fraction([False] * 4, flops) == 0.0


# --------------------------------------------------------------------------------------------------------- allocation


def reference_allocate(sens: list[float], flops: list[float], target: float) -> list[float]:
    """The reference code's allocate_p, transcribed with a heap: pop the smallest S_i * (rate_i + 0.1)."""
    heap = [(s * 0.1, i) for i, s in enumerate(sens)]
    heapq.heapify(heap)
    counts = [0] * len(sens)
    kept = sum(flops)
    goal = (1 - target) * sum(flops)
    while kept > goal + 1e-9 * sum(flops):
        _, i = heapq.heappop(heap)
        counts[i] += 1
        kept -= 0.1 * flops[i]
        if counts[i] < 9:
            heapq.heappush(heap, (sens[i] * 0.1 * (counts[i] + 1), i))
    return [round(c * 0.1, 12) for c in counts]


def test_allocation_hand_example() -> None:
    # Worked by hand: costs of the next raise are S_i * (r_i + 0.1); stop once 0.5 of the FLOPs drop.
    assert allocate_drop_rates([1.0, 2.0, 4.0], [1.0, 1.0, 2.0], target=0.5) == [0.9, 0.6, 0.3]
    # Zero sensitivity goes first, up to the cap, then the next.
    assert allocate_drop_rates([0.0, 5.0], [1.0, 1.0], target=0.5) == [0.9, 0.1]
    assert allocate_drop_rates([1.0, 1.0], [1.0, 1.0], target=0.0) == [0.0, 0.0]
    assert allocate_drop_rates([3.0, 3.0], [1.0, 1.0], target=0.9) == [0.9, 0.9]


@pytest.mark.parametrize("seed", range(5))
def test_allocation_matches_reference_hits_target_and_orders_by_sensitivity(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n = 8
    sens = (torch.rand(n, generator=g) * 10).tolist()
    flops = (1 + torch.rand(n, generator=g) * 3).tolist()
    for target in (0.1, 0.25, 0.5, 0.75, 0.9):
        rates = allocate_drop_rates(sens, flops, target)
        assert rates == reference_allocate(sens, flops, target)
        dropped = sum(r * f for r, f in zip(rates, flops)) / sum(flops)
        assert dropped >= target - 1e-9
        # Not more than one step past the target: the last raise was needed.
        assert dropped - 0.1 * max(flops) / sum(flops) < target
        assert all(0.0 <= r <= 0.9 + 1e-12 for r in rates)
        # The less sensitive a sublayer, the higher (or equal) its rate.
        order = sorted(range(n), key=lambda i: sens[i])
        assert all(rates[a] >= rates[b] for a, b in itertools.pairwise(order))


def test_allocation_is_optimal_for_equal_flops_by_brute_force() -> None:
    # With equal FLOPs the greedy minimises sum_i S_i * k_i (k_i + 1) / 2 (k_i raises of 0.1) under sum k >= K.
    sens = [0.7, 2.0, 0.3]
    flops = [1.0, 1.0, 1.0]
    for target in (0.2, 0.4, 0.6):
        rates = allocate_drop_rates(sens, flops, target)
        k = [round(r * 10) for r in rates]
        need = sum(k)

        def cost(ks: tuple[int, ...]) -> float:
            return sum(s * c * (c + 1) / 2 for s, c in zip(sens, ks))

        best = min(cost(ks) for ks in itertools.product(range(10), repeat=3) if sum(ks) >= need)
        assert cost(tuple(k)) == pytest.approx(best)
        assert need == round(target * 30)  # equal FLOPs: exactly target / 0.1 raises per sublayer count


def test_allocation_errors_and_uniform() -> None:
    with pytest.raises(ValueError, match=r"target=0.6 cannot be reached"):
        allocate_drop_rates([1.0, 1.0], [1.0, 1.0], target=0.6, cap=0.5)
    with pytest.raises(ValueError, match="2 sensitivities but 3"):
        allocate_drop_rates([1.0, 1.0], [1.0, 1.0, 1.0], target=0.5)
    with pytest.raises(ValueError, match="sensitivities must be finite"):
        allocate_drop_rates([1.0, float("nan")], [1.0, 1.0], target=0.5)
    with pytest.raises(ValueError, match="flops must be finite and > 0"):
        allocate_drop_rates([1.0, 1.0], [1.0, 0.0], target=0.5)
    with pytest.raises(ValueError, match="target=1.5"):
        allocate_drop_rates([1.0], [1.0], target=1.5)
    assert uniform_drop_rates(4, 0.5) == [0.5] * 4
    assert uniform_drop_rates(2, 0.95) == [0.9, 0.9]  # capped


# -------------------------------------------------------------------------------------------------------- sensitivity


def _direct_sensitivity(model: nn.Module, ids: torch.Tensor) -> list[float]:
    """S_i = sum_p (||g(p)|| - ||g_i(p)||)^2 with .backward() and the detach reference, no DropBP involved."""
    structure = get_structure(model)
    subs = structure.sublayers()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def norms(dropped: list[int]) -> list[float]:
        model.zero_grad(set_to_none=True)
        with detached_outputs(subs, dropped):
            model(input_ids=ids, labels=ids).loss.backward()
        return [0.0 if p.grad is None else float(p.grad.double().norm()) for _, p in params]

    full = norms([])
    out = [sum((a - b) ** 2 for a, b in zip(full, norms([i]))) for i in range(len(subs))]
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("variant", ["llama", "gpt2", "llama-lora"])
def test_sensitivity_equals_direct_computation(variant: str) -> None:
    model: nn.Module = tiny_gpt2() if variant == "gpt2" else tiny_llama()
    if variant == "llama-lora":
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    expected = _direct_sensitivity(model, ids)

    controller = apply_dropbp(model)
    controller.set_mask([False, True, False, True])
    params = [p for p in model.parameters() if p.requires_grad]
    rng = torch.get_rng_state()
    got = measure_sensitivity(controller, lambda: model(input_ids=ids, labels=ids).loss, params)
    assert got.dtype == torch.float64 and got.shape == (4,)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-12)
    assert all(v > 0 for v in expected)
    # Nothing written to .grad, the mask and the global RNG are as before.
    assert all(p.grad is None for p in model.parameters())
    assert controller.mask == (False, True, False, True)
    assert torch.equal(torch.get_rng_state(), rng)


def test_sensitivity_is_reproducible_with_dropout() -> None:
    model = tiny_gpt2()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.2
    model.train()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    controller = apply_dropbp(model)
    params = list(model.parameters())
    a = measure_sensitivity(controller, lambda: model(input_ids=ids, labels=ids).loss, params, seed=7)
    b = measure_sensitivity(controller, lambda: model(input_ids=ids, labels=ids).loss, params, seed=7)
    assert torch.equal(a, b)
    assert bool((a > 0).all())


@pytest.mark.parametrize("sampling", ["systematic", "independent"])
def test_fallback_keeps_a_trainable_sublayer(sampling: str) -> None:
    # Only sublayers 0 and 2 hold trainable parameters (e.g. LoRA on attention only): a step must never drop both.
    rates = [0.9, 0.0, 0.9, 0.0]
    trainable = [True, False, True, False]
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        mask = draw_mask(rates, g, sampling, trainable)
        assert not (mask[0] and mask[2])
