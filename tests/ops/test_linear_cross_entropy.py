"""Fused linear + cross-entropy: the reference against Hugging Face, the Triton path against the reference.

The Triton kernel runs on CPU only under ``TRITON_INTERPRET=1``, set before triton is first imported, so when this
process was not started with it one test runs this file's ``interp`` cases in a child pytest with it set.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from lit_accel.ops.linear_cross_entropy import (
    FusedLinearCrossEntropyFunction,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_fallback_reason,
    fused_linear_cross_entropy_kernel_available,
    linear_cross_entropy_reference,
)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
IGNORE = -100


def _make(
    n: int,
    h: int,
    v: int,
    *,
    lead: tuple[int, ...] = (),
    bias: bool = False,
    ignore_frac: float = 0.25,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    logit_scale: float = 3.0,
) -> dict[str, Any]:
    """Random inputs whose logits have a std of about ``logit_scale`` (a trained model's range, not ~0)."""
    hidden = torch.randn(*lead, n, h, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, device=device) * (logit_scale / h**0.5)).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (*lead, n), device=device)
    labels[torch.rand(labels.shape, device=device) < ignore_frac] = IGNORE
    b = (torch.randn(v, device=device) * 0.5).to(dtype).requires_grad_() if bias else None
    return {"hidden": hidden, "weight": weight, "labels": labels, "bias": b}


def _params(t: dict[str, Any]) -> list[torch.Tensor]:
    return [x for k, x in t.items() if k != "labels" and x is not None and x.requires_grad]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _loss_and_grads(
    fn: Callable[..., torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
    t: dict[str, Any],
    **kw: Any,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    loss = fn(t["hidden"], t["weight"], t["labels"], t["bias"], **kw)
    assert isinstance(loss, torch.Tensor)
    return loss, list(torch.autograd.grad(loss, _params(t)))


# ---------------------------------------------------------------------------------------------------------------
# Reference vs Hugging Face and vs the formula
# ---------------------------------------------------------------------------------------------------------------


def _hf_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, num_items: Any) -> torch.Tensor:
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits = F.linear(hidden, weight)  # what LlamaForCausalLM.lm_head computes
    return ForCausalLMLoss(logits, labels, weight.shape[0], num_items_in_batch=num_items, ignore_index=IGNORE)


def _shift(labels: torch.Tensor) -> torch.Tensor:
    """ForCausalLMLoss's shift: position t predicts label t+1; the last position predicts nothing."""
    return F.pad(labels, (0, 1), value=IGNORE)[..., 1:]


@pytest.mark.parametrize(
    ("b", "t", "h", "v", "dtype"),
    [(2, 9, 16, 50, torch.float32), (1, 2, 40, 129, torch.float32), (3, 33, 24, 300, torch.bfloat16)],
)
@pytest.mark.parametrize("num_items", [None, 17, "tensor"])
def test_reference_matches_hf_causal_lm_loss(
    b: int, t: int, h: int, v: int, dtype: torch.dtype, num_items: Any
) -> None:
    data = _make(t, h, v, lead=(b,), dtype=dtype, ignore_frac=0.2)
    hidden, weight, labels = data["hidden"], data["weight"], data["labels"]
    assert hidden is not None and weight is not None and labels is not None
    labels[..., 1] = 1  # at least one valid token per sequence after the shift (HF's mean is NaN otherwise)
    if num_items == "tensor":
        num_items = (_shift(labels) != IGNORE).sum() + 3
    hf = _hf_loss(hidden, weight, labels, num_items)
    hf_grads = torch.autograd.grad(hf, [hidden, weight])
    ours = linear_cross_entropy_reference(hidden, weight, _shift(labels), num_items_in_batch=num_items)
    assert isinstance(ours, torch.Tensor)
    our_grads = torch.autograd.grad(ours, [hidden, weight])
    # Same bf16 logits, same fp32 softmax: only the order of the final sum may differ.
    torch.testing.assert_close(ours, hf, rtol=1e-5, atol=1e-6)
    for a, e in zip(our_grads, hf_grads):
        assert a.dtype == e.dtype == dtype
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_reference_smoothing_z_loss_bias_and_sum_follow_the_formula() -> None:
    data = _make(23, 16, 37, bias=True)
    hidden, weight, labels, bias = data["hidden"], data["weight"], data["labels"], data["bias"]
    assert hidden is not None and weight is not None and labels is not None and bias is not None
    logits = F.linear(hidden, weight, bias)
    valid = labels != IGNORE
    lse = torch.logsumexp(logits, -1)
    for reduction in ("mean", "sum"):
        ce = F.cross_entropy(logits, labels, ignore_index=IGNORE, label_smoothing=0.1, reduction=reduction)
        zsum = (lse.square() * valid).sum()
        expect_z = 0.01 * (zsum / valid.sum() if reduction == "mean" else zsum)
        loss, z = linear_cross_entropy_reference(
            hidden, weight, labels, bias, label_smoothing=0.1, z_loss_weight=0.01, reduction=reduction,
            return_z_loss=True,
        )  # fmt: skip
        torch.testing.assert_close(loss, ce + expect_z, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(z, expect_z, rtol=1e-5, atol=1e-6)
        assert not z.requires_grad


def test_reference_all_ignored_is_zero_not_nan() -> None:
    data = _make(6, 16, 20, bias=True, ignore_frac=1.0)
    hidden, weight, labels = data["hidden"], data["weight"], data["labels"]
    assert hidden is not None and weight is not None and labels is not None
    # Hugging Face (F.cross_entropy's mean) gives NaN here; we give 0 and zero gradients.
    assert torch.isnan(F.cross_entropy(F.linear(hidden, weight), labels, ignore_index=IGNORE))
    loss, grads = _loss_and_grads(linear_cross_entropy_reference, data, z_loss_weight=1e-3, label_smoothing=0.1)
    assert loss.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in grads)


# ---------------------------------------------------------------------------------------------------------------
# Soft-capping, class weights and per-token losses against plain PyTorch
# ---------------------------------------------------------------------------------------------------------------


def _torch_loss(
    t: dict[str, Any],
    *,
    softcap: float | None = None,
    class_weight: torch.Tensor | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss_weight: float = 0.0,
) -> torch.Tensor:
    """Plain PyTorch: F.linear, Gemma 2's cap, F.cross_entropy on fp32 logits (+ the z-loss over valid tokens)."""
    logits = F.linear(t["hidden"], t["weight"], t["bias"])
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits.float().reshape(-1, t["weight"].shape[0])
    y = t["labels"].reshape(-1)
    loss = F.cross_entropy(
        logits, y, weight=class_weight, ignore_index=IGNORE, label_smoothing=label_smoothing, reduction=reduction
    )
    if z_loss_weight:
        valid = y != IGNORE
        z = torch.where(valid, torch.logsumexp(logits, -1).square(), 0.0) * z_loss_weight
        loss = loss + {"mean": z.sum() / valid.sum(), "sum": z.sum(), "none": z}[reduction]
    return loss.reshape(t["labels"].shape) if reduction == "none" else loss


def _compare_to_torch(
    fn: Callable[..., Any], t: dict[str, Any], loss_tol: tuple[float, float], grad_tol: tuple[float, float], **kw: Any
) -> None:
    """``fn`` against :func:`_torch_loss`: the loss and the gradients of hidden, weight and bias (for "none" under a
    random incoming gradient per token)."""
    torch_kw = {k: x for k, x in kw.items() if k != "chunk_size"}
    got = fn(t["hidden"], t["weight"], t["labels"], t["bias"], **kw)
    exp = _torch_loss(t, **torch_kw)
    assert isinstance(got, torch.Tensor)
    assert got.dtype == torch.float32 and got.shape == exp.shape
    torch.testing.assert_close(got, exp, rtol=loss_tol[0], atol=loss_tol[1])
    upstream = torch.randn(exp.shape) if exp.dim() else torch.tensor(0.7)
    got_g = torch.autograd.grad(got, _params(t), upstream)
    exp_g = torch.autograd.grad(exp, _params(t), upstream)
    for name, a, e in zip(("hidden", "weight", "bias"), got_g, exp_g):
        assert a.shape == e.shape and a.dtype == e.dtype
        torch.testing.assert_close(a, e, rtol=grad_tol[0], atol=grad_tol[1], msg=lambda m: f"d{name}: {m}")  # noqa: B023


# (softcap, class weights, label smoothing, z-loss): each new setting alone and with the others it may join.
_SETTINGS = [
    (5.0, False, 0.0, 0.0),
    (5.0, False, 0.1, 1e-2),
    (None, True, 0.0, 0.0),
    (None, True, 0.1, 0.0),
    (5.0, True, 0.1, 0.0),
]


@pytest.mark.parametrize(("softcap", "weighted", "smoothing", "z"), _SETTINGS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reference_softcap_class_weight_reduction_match_torch(
    softcap: float | None, weighted: bool, smoothing: float, z: float, reduction: str
) -> None:
    data = _make(13, 16, 37, lead=(2,), bias=True, logit_scale=8.0)  # logits of std 8: the cap of 5 bites
    cw = torch.rand(37) + 0.5 if weighted else None
    _compare_to_torch(
        linear_cross_entropy_reference, data, (1e-5, 1e-6), (1e-5, 1e-6),
        softcap=softcap, class_weight=cw, label_smoothing=smoothing, z_loss_weight=z, reduction=reduction,
    )  # fmt: skip


def test_reference_reduction_none_is_per_token_and_sums_to_sum() -> None:
    data = _make(11, 16, 30, lead=(3,), bias=True)
    labels = data["labels"]
    cw = torch.rand(30) + 0.5
    none, z = linear_cross_entropy_reference(
        data["hidden"], data["weight"], labels, data["bias"], reduction="none", z_loss_weight=1e-3,
        return_z_loss=True,
    )  # fmt: skip
    assert none.shape == z.shape == labels.shape and none.dtype == torch.float32
    assert torch.all(none[labels == IGNORE] == 0) and torch.all(z[labels == IGNORE] == 0)
    total = linear_cross_entropy_reference(
        data["hidden"], data["weight"], labels, data["bias"], reduction="sum", z_loss_weight=1e-3
    )
    torch.testing.assert_close(none.sum(), total, rtol=1e-5, atol=1e-6)
    # Class-weighted mean: the weighted sum over the sum of the valid targets' weights (torch's semantics).
    w_none = linear_cross_entropy_reference(data["hidden"], data["weight"], labels, reduction="none", class_weight=cw)
    w_mean = linear_cross_entropy_reference(data["hidden"], data["weight"], labels, class_weight=cw)
    valid = labels != IGNORE
    torch.testing.assert_close(w_mean, w_none.sum() / cw[labels[valid]].sum(), rtol=1e-5, atol=1e-6)
    # num_items_in_batch with class weights: the weighted sum over it.
    w_items = linear_cross_entropy_reference(data["hidden"], data["weight"], labels, class_weight=cw,
                                             num_items_in_batch=7)  # fmt: skip
    torch.testing.assert_close(w_items, w_none.sum() / 7, rtol=1e-5, atol=1e-6)


def test_reference_softcap_bf16_follows_hf_step_order_exactly() -> None:
    # Gemma2ForCausalLM: logits / cap, tanh, * cap, each in the logits' dtype (bf16), then .float().
    data = _make(40, 32, 300, dtype=torch.bfloat16, logit_scale=40.0)
    h, w, y = data["hidden"], data["weight"], data["labels"]
    logits = F.linear(h, w)
    logits = logits / 30.0
    logits = torch.tanh(logits)
    logits = logits * 30.0
    hf = F.cross_entropy(logits.float(), y, ignore_index=IGNORE)
    ours = linear_cross_entropy_reference(h, w, y, softcap=30.0)
    assert isinstance(ours, torch.Tensor)
    assert torch.equal(ours, hf)
    assert torch.equal(torch.autograd.grad(ours, w)[0], torch.autograd.grad(hf, w)[0])


def _tiny_gemma2(seed: int = 0) -> Any:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Gemma2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=128, final_logit_softcapping=30.0, tie_word_embeddings=False,
    )  # fmt: skip
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Gemma2ForCausalLM(cfg).eval()
    with torch.no_grad():
        # A fresh head gives logits of std ~0.2, where tanh is the identity to 1e-6: scale it so the cap bites.
        model.lm_head.weight.mul_(60.0)
    return model


def _check_gemma2(fn: Callable[..., Any], **kw: Any) -> None:
    """``fn`` with the model's softcap on its final hidden states and lm_head gives HF's loss and gradients."""
    model = _tiny_gemma2()
    cap = model.config.final_logit_softcapping
    ids = torch.randint(0, 128, (2, 9))
    labels = ids.clone()
    labels[0, :3] = IGNORE
    params = [model.lm_head.weight, model.model.embed_tokens.weight]
    hf = model(ids, labels=labels).loss
    hf_grads = torch.autograd.grad(hf, params)
    hidden = model.model(ids).last_hidden_state
    ours = fn(hidden, model.lm_head.weight, _shift(labels), softcap=cap, **kw)
    our_grads = torch.autograd.grad(ours, params)
    torch.testing.assert_close(ours, hf, rtol=2e-5, atol=2e-6)
    for name, a, e in zip(("lm_head.weight", "embed_tokens.weight"), our_grads, hf_grads):
        # The embedding's gradient comes through d hidden and two decoder layers: atol relative to its largest entry.
        atol = 1e-5 * e.abs().max().item()
        torch.testing.assert_close(a, e, rtol=1e-4, atol=atol, msg=lambda m: f"{name}: {m}")  # noqa: B023
    # The cap matters at these logits: without it the loss is another number.
    uncapped = fn(hidden.detach(), model.lm_head.weight.detach(), _shift(labels), **kw)
    assert abs(uncapped.item() - hf.item()) > 1e-2


def test_reference_matches_tiny_gemma2_with_softcap() -> None:
    _check_gemma2(linear_cross_entropy_reference)


def test_cpu_dispatch_uses_reference() -> None:
    data = _make(7, 16, 30)
    args = (data["hidden"], data["weight"], data["labels"])
    reason = fused_linear_cross_entropy_fallback_reason(*args)
    # Under TRITON_INTERPRET=1 CPU fp32 takes the kernel path (the comparison below still holds).
    assert fused_linear_cross_entropy_kernel_available(*args) == (reason is None) == INTERPRET
    if not INTERPRET:
        assert reason is not None and "CUDA" in reason
    loss = fused_linear_cross_entropy(*args, chunk_size=3)
    torch.testing.assert_close(loss, linear_cross_entropy_reference(*args))


def test_fallback_reasons() -> None:
    h, w, y = torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)
    reason = fused_linear_cross_entropy_fallback_reason(h.double(), w.double(), y)
    assert reason is not None and ("float64" in reason or "cpu" in reason)
    empty = fused_linear_cross_entropy_fallback_reason(torch.randn(0, 8), w, torch.zeros(0, dtype=torch.long))
    assert empty is not None
    # Empty input: the reference answers 0 (no tokens, mean over none).
    loss = fused_linear_cross_entropy(torch.randn(0, 8), w, torch.zeros(0, dtype=torch.long))
    assert isinstance(loss, torch.Tensor) and loss.item() == 0.0


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "exc", "match"),
    [
        ({"hidden": torch.zeros(3, 15)}, ValueError, "weight.shape"),
        ({"weight": torch.zeros(32)}, ValueError, "weight must be 2-D"),
        ({"labels": torch.zeros(4, dtype=torch.long)}, ValueError, "labels must have shape"),
        ({"labels": torch.zeros(3, dtype=torch.int32)}, TypeError, "int64"),
        ({"bias": torch.zeros(31)}, ValueError, "bias"),
        ({"weight": torch.zeros(32, 16, dtype=torch.float64)}, TypeError, "weight dtype"),
        ({"hidden": torch.zeros(3, 16, dtype=torch.long)}, TypeError, "hidden must be a floating-point"),
        ({"reduction": "avg"}, ValueError, "reduction"),
        ({"softcap": 0.0}, ValueError, "softcap must be a positive finite float"),
        ({"softcap": -30.0}, ValueError, "softcap must be a positive finite float"),
        ({"softcap": float("inf")}, ValueError, "softcap must be a positive finite float"),
        ({"softcap": float("nan")}, ValueError, "softcap must be a positive finite float"),
        ({"softcap": True}, ValueError, "softcap must be a positive finite float"),
        ({"softcap": "30"}, ValueError, "softcap must be a positive finite float"),
        ({"class_weight": torch.ones(31)}, ValueError, "class_weight must be 1-D of shape"),
        ({"class_weight": torch.ones(32, 1)}, ValueError, "class_weight must be 1-D of shape"),
        ({"class_weight": torch.ones(32, dtype=torch.long)}, TypeError, "class_weight must be a floating-point"),
        ({"class_weight": [1.0] * 32}, TypeError, "class_weight must be a torch.Tensor"),
        ({"class_weight": torch.ones(32, device="meta")}, ValueError, "class_weight is on meta"),
        ({"class_weight": torch.ones(32), "z_loss_weight": 1e-4}, ValueError, "z_loss_weight=.*class_weight"),
        ({"reduction": "none", "num_items_in_batch": 3}, ValueError, "num_items_in_batch .*reduction='none'"),
        ({"label_smoothing": 1.0}, ValueError, "label_smoothing"),
        ({"label_smoothing": -0.1}, ValueError, "label_smoothing"),
        ({"z_loss_weight": -1e-4}, ValueError, "z_loss_weight"),
        ({"z_loss_weight": float("inf")}, ValueError, "z_loss_weight"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"chunk_size": 2.5}, ValueError, "chunk_size"),
        ({"num_items_in_batch": 0}, ValueError, "num_items_in_batch"),
        ({"num_items_in_batch": 2.0}, TypeError, "num_items_in_batch"),
        ({"num_items_in_batch": torch.ones(2)}, ValueError, "num_items_in_batch"),
        ({"ignore_index": None}, TypeError, "ignore_index"),
    ],
)
def test_bad_input_raises(change: dict[str, Any], exc: type[Exception], match: str) -> None:
    args: dict[str, Any] = {
        "hidden": torch.zeros(3, 16),
        "weight": torch.zeros(32, 16),
        "labels": torch.zeros(3, dtype=torch.long),
    }
    args.update(change)
    with pytest.raises(exc, match=match):
        fused_linear_cross_entropy(**args)


def test_reference_validates_too() -> None:
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy_reference(torch.zeros(3, 16), torch.zeros(8, 16), torch.zeros(3).long(), reduction="x")


@pytest.mark.parametrize("fn", [fused_linear_cross_entropy, linear_cross_entropy_reference])
@pytest.mark.parametrize(
    ("bad", "ignore_index", "match"),
    [
        ([32], IGNORE, r"\[0, 32\) .*ignore_index=-100; got 1 label\(s\) outside that range, 32$"),
        ([-1, 40, 33], IGNORE, r"got 3 label\(s\) outside that range, from -1 to 40"),
        ([-100], -1, r"ignore_index=-1; got 1 label\(s\) outside that range, -100"),
    ],
)
def test_labels_outside_vocabulary_raise(fn: Callable[..., Any], bad: list[int], ignore_index: int, match: str) -> None:
    y = torch.tensor([0, 31, ignore_index, *bad])
    h, w = torch.randn(len(y), 16), torch.randn(32, 16)
    with pytest.raises(ValueError, match="labels must be class indices in .*" + match):
        fn(h, w, y, ignore_index=ignore_index)
    # The same labels with the bad ones ignored are fine.
    y[(y < 0) | (y >= 32)] = ignore_index
    fn(h, w, y, ignore_index=ignore_index)


def test_label_check_result_read_later_without_waiting() -> None:
    # The fused CUDA path queues the device's answer and reads it once ready; on CPU tensors the copy is synchronous,
    # so the next read finds it done.
    lce = sys.modules["lit_accel.ops._linear_cross_entropy_device"]
    assert lce._PENDING_LABEL_CHECKS == []
    for labels in ([3, IGNORE, 0], [3, 12, -5, 11], []):
        lce._queue_label_stats(lce._bad_label_stats(torch.tensor(labels, dtype=torch.long), 10, IGNORE), 10, IGNORE)
    with pytest.raises(ValueError, match=r"an earlier .*NaN loss.*\[0, 10\).* 3 label\(s\) .*from -5 to 12"):
        lce._raise_finished_label_checks()
    lce._raise_finished_label_checks()  # the rest were fine
    assert lce._PENDING_LABEL_CHECKS == []


# ---------------------------------------------------------------------------------------------------------------
# Triton kernel under the CPU interpreter
# ---------------------------------------------------------------------------------------------------------------


def _check_kernel(
    n: int,
    h: int,
    v: int,
    *,
    bias: bool = False,
    lead: tuple[int, ...] = (),
    ignore_frac: float = 0.25,
    **kw: Any,
) -> None:
    """Fused path vs reference (fp32): loss, z term and the gradient of every input that requires grad."""
    data = _make(n, h, v, lead=lead, bias=bias, ignore_frac=ignore_frac)
    assert fused_linear_cross_entropy_kernel_available(data["hidden"], data["weight"], data["labels"], data["bias"])
    ref_kw = {k: x for k, x in kw.items() if k != "chunk_size"}
    loss, z = fused_linear_cross_entropy(
        data["hidden"],
        data["weight"],
        data["labels"],
        data["bias"],
        return_z_loss=True,
        **kw,
    )
    ref, ref_z = linear_cross_entropy_reference(
        data["hidden"],
        data["weight"],
        data["labels"],
        data["bias"],
        return_z_loss=True,
        **ref_kw,
    )
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, ref, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(z, ref_z, rtol=2e-5, atol=2e-6)
    got = torch.autograd.grad(loss, _params(data))
    exp = torch.autograd.grad(ref, _params(data))
    for name, a, e in zip(("hidden", "weight", "bias"), got, exp):
        assert a.shape == e.shape and a.dtype == e.dtype
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6, msg=lambda m: f"d{name}: {m}")  # noqa: B023


if not INTERPRET:

    @pytest.mark.skipif(sys.platform != "linux", reason="triton is Linux-only")
    def test_triton_interpreter_cases_in_subprocess(run_in_triton_interpreter: Callable[[str, float], None]) -> None:
        run_in_triton_interpreter(str(Path(__file__)), 600)

else:

    @pytest.mark.parametrize("n", [1, 37, 64])
    @pytest.mark.parametrize("h", [16, 40])
    @pytest.mark.parametrize("v", [50, 129])  # 50: one block per row; 129: three blocks, the last partial
    def test_interp_kernel_matches_reference(n: int, h: int, v: int) -> None:
        _check_kernel(n, h, v, chunk_size=16)  # 37 rows -> chunks of 16, 16, 5

    @pytest.mark.parametrize("v", [50, 129])
    @pytest.mark.parametrize("reduction", ["mean", "sum"])
    def test_interp_kernel_smoothing_z_loss_bias(v: int, reduction: str) -> None:
        _check_kernel(37, 40, v, bias=True, label_smoothing=0.1, z_loss_weight=1e-2, reduction=reduction, chunk_size=13)

    @pytest.mark.parametrize("num_items", [7, "tensor"])
    def test_interp_kernel_num_items_in_batch_and_batch_dims(num_items: Any) -> None:
        items = torch.tensor(11) if num_items == "tensor" else num_items
        _check_kernel(9, 16, 50, lead=(3,), num_items_in_batch=items, chunk_size=10, z_loss_weight=1e-3)

    def test_interp_kernel_default_chunk_and_all_rows_valid() -> None:
        _check_kernel(64, 16, 129, ignore_frac=0.0, bias=True)

    def test_interp_kernel_all_ignored_is_zero() -> None:
        data = _make(20, 16, 50, bias=True, ignore_frac=1.0)
        loss, grads = _loss_and_grads(fused_linear_cross_entropy, data, chunk_size=8, z_loss_weight=1e-2)
        assert loss.item() == 0.0
        assert all(torch.count_nonzero(g) == 0 for g in grads)

    def test_interp_kernel_grad_only_where_required() -> None:
        # Frozen LM head (LoRA): no weight gradient is computed; hidden still gets one.
        data = _make(21, 16, 50, bias=True)
        w, b = data["weight"], data["bias"]
        assert w is not None and b is not None
        data["weight"], data["bias"] = w.detach(), b.detach()
        loss, (gx,) = _loss_and_grads(fused_linear_cross_entropy, data, chunk_size=8)
        ref, (rx,) = _loss_and_grads(linear_cross_entropy_reference, data)
        torch.testing.assert_close(loss, ref, rtol=2e-5, atol=2e-6)
        torch.testing.assert_close(gx, rx, rtol=1e-4, atol=1e-6)
        # Only the head trains (hidden detached).
        data = _make(21, 16, 50)
        hid = data["hidden"]
        assert hid is not None
        data["hidden"] = hid.detach()
        _, (gw,) = _loss_and_grads(fused_linear_cross_entropy, data, chunk_size=8)
        _, (rw,) = _loss_and_grads(linear_cross_entropy_reference, data)
        torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-6)
        # No grad mode: just the loss, nothing requires grad.
        args = (data["hidden"], data["weight"], data["labels"])
        with torch.no_grad():
            loss_ng = fused_linear_cross_entropy(*args)
            ref_ng = linear_cross_entropy_reference(*args)
        assert isinstance(loss_ng, torch.Tensor) and not loss_ng.requires_grad
        torch.testing.assert_close(loss_ng, ref_ng, rtol=2e-5, atol=2e-6)

    def test_interp_kernel_scales_by_grad_output_and_refuses_second_backward() -> None:
        data = _make(19, 16, 50, bias=True)
        loss = fused_linear_cross_entropy(data["hidden"], data["weight"], data["labels"], data["bias"], chunk_size=7)
        ref = linear_cross_entropy_reference(data["hidden"], data["weight"], data["labels"], data["bias"])
        assert isinstance(loss, torch.Tensor) and isinstance(ref, torch.Tensor)
        got = torch.autograd.grad(loss * 0.37, _params(data), retain_graph=True)
        exp = torch.autograd.grad(ref * 0.37, _params(data))
        for a, e in zip(got, exp):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-7)
        with pytest.raises(RuntimeError, match="second backward"):
            torch.autograd.grad(loss, _params(data))

    def test_interp_tied_embedding_gradients_accumulate() -> None:
        # A tiny tied LM: the embedding table is also the head; both uses feed one gradient.
        torch.manual_seed(1)
        v, h, t = 40, 16, 12
        emb = torch.nn.Embedding(v, h)
        mix = torch.nn.Linear(h, h)
        ids = torch.randint(0, v, (2, t))
        labels = _shift(ids)
        grads = []
        for fn in (fused_linear_cross_entropy, linear_cross_entropy_reference):
            emb.zero_grad(set_to_none=True)
            mix.zero_grad(set_to_none=True)
            hidden = torch.tanh(mix(emb(ids)))
            loss = fn(hidden, emb.weight, labels)
            assert isinstance(loss, torch.Tensor)
            loss.backward()
            assert emb.weight.grad is not None and mix.weight.grad is not None
            grads.append((emb.weight.grad.clone(), mix.weight.grad.clone()))
        for a, e in zip(*grads):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-7)

    def test_interp_function_apply_direct() -> None:
        data = _make(6, 16, 40, ignore_frac=0.0)
        h, w, y = data["hidden"], data["weight"], data["labels"]
        assert h is not None and w is not None and y is not None
        s = torch.full((1,), 1 / 6)
        loss, z = FusedLinearCrossEntropyFunction.apply(h, w, y, None, s, torch.float32, 4, IGNORE, 0.0, 0.0,
                                                         (True, True, False))  # fmt: skip
        torch.testing.assert_close(loss, F.cross_entropy(h @ w.T, y), rtol=2e-5, atol=2e-6)
        assert z.item() == 0.0

    @pytest.mark.parametrize(("softcap", "weighted", "smoothing", "z"), _SETTINGS)
    # v = 50: one block per row; 129: three blocks, the last partial. "mean" and "sum" differ only by the scale.
    @pytest.mark.parametrize(("reduction", "v"), [("mean", 129), ("sum", 50), ("none", 50), ("none", 129)])
    def test_interp_kernel_softcap_class_weight_reduction_match_torch(
        softcap: float | None, weighted: bool, smoothing: float, z: float, reduction: str, v: int
    ) -> None:
        data = _make(13, 16, v, bias=True, logit_scale=8.0)
        cw = torch.rand(v) + 0.5 if weighted else None
        assert fused_linear_cross_entropy_kernel_available(
            data["hidden"], data["weight"], data["labels"], data["bias"], softcap=softcap, class_weight=cw,
            reduction=reduction,
        )  # fmt: skip
        _compare_to_torch(
            fused_linear_cross_entropy, data, (2e-5, 2e-6), (1e-4, 1e-6),
            softcap=softcap, class_weight=cw, label_smoothing=smoothing, z_loss_weight=z, reduction=reduction,
            chunk_size=8,
        )  # fmt: skip

    def test_interp_kernel_reduction_none_batch_dims_and_repeated_backward() -> None:
        data = _make(7, 16, 50, lead=(3,), bias=True)
        args = (data["hidden"], data["weight"], data["labels"], data["bias"])
        loss, z = fused_linear_cross_entropy(*args, reduction="none", z_loss_weight=1e-2, return_z_loss=True,
                                             chunk_size=5)  # fmt: skip
        ref, ref_z = linear_cross_entropy_reference(*args, reduction="none", z_loss_weight=1e-2, return_z_loss=True)
        assert loss.shape == z.shape == data["labels"].shape and loss.dtype == torch.float32
        assert torch.all(loss[data["labels"] == IGNORE] == 0)
        torch.testing.assert_close(loss, ref, rtol=2e-5, atol=2e-6)
        torch.testing.assert_close(z, ref_z, rtol=2e-5, atol=2e-6)
        assert not z.requires_grad
        up = torch.randn(loss.shape)
        exp = torch.autograd.grad(ref, _params(data), up)
        # The backward recomputes from the saved inputs: a retained graph can be differentiated again.
        for _ in range(2):
            got = torch.autograd.grad(loss, _params(data), up, retain_graph=True)
            for a, e in zip(got, exp):
                torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)
        # Only the gradients asked for are computed (frozen head).
        (gx,) = torch.autograd.grad(
            fused_linear_cross_entropy(args[0], args[1].detach(), args[2], reduction="none", chunk_size=5),
            [args[0]],
            up,
        )
        (rx,) = torch.autograd.grad(
            linear_cross_entropy_reference(args[0], args[1].detach(), args[2], reduction="none"), [args[0]], up
        )
        torch.testing.assert_close(gx, rx, rtol=1e-4, atol=1e-6)

    def test_interp_kernel_class_weight_mean_all_ignored_and_zero_weights() -> None:
        data = _make(20, 16, 50, bias=True, ignore_frac=1.0)
        cw = torch.rand(50) + 0.5
        loss, grads = _loss_and_grads(fused_linear_cross_entropy, data, chunk_size=8, class_weight=cw)
        assert loss.item() == 0.0
        assert all(torch.count_nonzero(g) == 0 for g in grads)
        # Weight 0 on some classes: their tokens add nothing, as in torch.
        data = _make(20, 16, 50, bias=True)
        cw[::3] = 0.0
        _compare_to_torch(fused_linear_cross_entropy, data, (2e-5, 2e-6), (1e-4, 1e-6), class_weight=cw)

    def test_interp_kernel_labels_outside_vocabulary_raise_at_once_on_cpu() -> None:
        from lit_accel.ops.linear_cross_entropy import fused_linear_cross_entropy_kernel

        h, w = torch.randn(4, 16), torch.randn(50, 16)
        y = torch.tensor([1, 50, IGNORE, -3])
        assert fused_linear_cross_entropy_kernel_available(h, w, y)
        for fn in (fused_linear_cross_entropy, fused_linear_cross_entropy_kernel):
            with pytest.raises(ValueError, match=r"\[0, 50\) .*got 2 label\(s\) outside that range, from -3 to 50"):
                fn(h, w, y)
        # The kernel itself never reads outside the row: such a token gets a NaN loss and no gradient, and the kernel
        # folds the count and range of such labels into label_stats (what CUDA calls read later, without a sync).
        h.requires_grad_()
        w.requires_grad_()
        s = torch.ones(1)
        stats = torch.tensor([0, 2**63 - 1, -(2**63)])
        rows, _ = FusedLinearCrossEntropyFunction.apply(h, w, y, None, s, torch.float32, 3, IGNORE, 0.0, 0.0,
                                                         (True, True, False), None, None, "none", stats)  # fmt: skip
        assert stats.tolist() == [2, -3, 50]
        assert torch.isnan(rows[[1, 3]]).all() and rows[2] == 0.0
        ref = linear_cross_entropy_reference(h, w, torch.tensor([1, IGNORE, IGNORE, IGNORE]), reduction="none")
        torch.testing.assert_close(rows[0], ref[0], rtol=2e-5, atol=2e-6)
        gx, gw = torch.autograd.grad(rows[0] + rows[2], [h, w])
        rx, rw = torch.autograd.grad(ref.sum(), [h, w])
        assert torch.count_nonzero(gx[1:]) == 0
        torch.testing.assert_close(gx, rx, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-6)
        # The mean path too: NaN loss, gradients only from the valid rows.
        loss, _ = FusedLinearCrossEntropyFunction.apply(h, w, y, None, s, torch.float32, 4, IGNORE, 0.0, 0.0,
                                                         (True, True, False))  # fmt: skip
        assert torch.isnan(loss)
        gx, gw = torch.autograd.grad(loss, [h, w])
        torch.testing.assert_close(gx, rx, rtol=1e-4, atol=1e-6)

    def test_interp_kernel_class_weight_elsewhere_falls_back() -> None:
        h, w, y = torch.randn(4, 16), torch.randn(50, 16), torch.zeros(4, dtype=torch.long)
        reason = fused_linear_cross_entropy_fallback_reason(h, w, y, class_weight=torch.ones(50, device="meta"))
        assert reason is not None and "class_weight" in reason

    def test_interp_kernel_matches_tiny_gemma2_with_softcap() -> None:
        _check_gemma2(fused_linear_cross_entropy, chunk_size=7)

# ---------------------------------------------------------------------------------------------------------------
# GPU: real shapes
# ---------------------------------------------------------------------------------------------------------------

# llama-1b: 8 x 2048 tokens, hidden 2048; llama-125m: 16 x 2048 tokens, hidden 768; LLaMA-2 vocabulary.
GPU_SHAPES = [(16384, 2048, 32000), (32768, 768, 32000)]


def _gpu_compare(data: dict[str, Any], loss_tol: float, grad_tol: float, **kw: Any) -> tuple[float, list[float]]:
    ref_kw = {k: x for k, x in kw.items() if k != "chunk_size"}
    loss, grads = _loss_and_grads(fused_linear_cross_entropy, data, **kw)
    ref, ref_grads = _loss_and_grads(linear_cross_entropy_reference, data, **ref_kw)
    loss_err = abs(loss.item() - ref.item()) / abs(ref.item())
    errs = [_rel(a, e) for a, e in zip(grads, ref_grads)]
    for a, e in zip(grads, ref_grads):
        assert a.dtype == e.dtype and a.shape == e.shape
    assert torch.isfinite(loss)
    assert loss_err < loss_tol, (loss.item(), ref.item())
    assert max(errs) < grad_tol, errs
    return loss_err, errs


@pytest.mark.gpu
@pytest.mark.parametrize(("n", "h", "v"), GPU_SHAPES)
def test_gpu_bf16_real_shapes(n: int, h: int, v: int) -> None:
    data = _make(n, h, v, dtype=torch.bfloat16, device="cuda", ignore_frac=0.1)
    assert fused_linear_cross_entropy_kernel_available(data["hidden"], data["weight"], data["labels"])
    # The reference runs the same bf16 GEMMs and the same fp32 softmax; what differs is the GEMM split (chunked vs
    # whole: a logit may round to a neighbouring bf16 value, ~4e-3 relative) and the fp32 (ours) vs bf16-output
    # (reference's cuBLAS) weight gradient. Measured on an H100: loss ~1e-6, grads ~1e-3 relative.
    _gpu_compare(data, loss_tol=1e-4, grad_tol=1e-2)


@pytest.mark.gpu
def test_gpu_bf16_smoothing_z_loss_bias_num_items() -> None:
    n, h, v = 4096, 2048, 32000
    data = _make(n, h, v, bias=True, dtype=torch.bfloat16, device="cuda")
    items = torch.tensor(3000, device="cuda")
    _gpu_compare(data, 1e-4, 1e-2, label_smoothing=0.1, z_loss_weight=1e-4, num_items_in_batch=items,
                 chunk_size=1000)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize(("n", "h", "v"), [(4096, 768, 32000), (2048, 2048, 32000)])
def test_gpu_fp32(n: int, h: int, v: int) -> None:
    data = _make(n, h, v, device="cuda")
    # torch keeps TF32 off for fp32 matmuls by default: both sides are true fp32 GEMMs.
    _gpu_compare(data, 1e-5, 1e-4)


@pytest.mark.gpu
def test_gpu_wide_vocabulary_loops_over_blocks() -> None:
    data = _make(2048, 768, 128256, dtype=torch.bfloat16, device="cuda")  # LLaMA-3's vocabulary: 8 blocks a row
    _gpu_compare(data, 1e-4, 1e-2, label_smoothing=0.05)


@pytest.mark.gpu
def test_gpu_autocast_fp32_master_weight() -> None:
    n, h, v = 8192, 2048, 32000
    data = _make(n, h, v, device="cuda")  # fp32 hidden and head, as under bf16-mixed precision
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert fused_linear_cross_entropy_kernel_available(data["hidden"], data["weight"], data["labels"])
        loss, grads = _loss_and_grads(fused_linear_cross_entropy, data)
        ref, ref_grads = _loss_and_grads(linear_cross_entropy_reference, data)
    assert loss.dtype == ref.dtype == torch.float32
    assert abs(loss.item() - ref.item()) / ref.item() < 1e-4
    for a, e in zip(grads, ref_grads):
        assert a.dtype == e.dtype == torch.float32  # each gradient in its input's own dtype
        assert _rel(a, e) < 1e-2


@pytest.mark.gpu
def test_gpu_frozen_head_and_memory() -> None:
    n, h, v = 16384, 2048, 32000
    data = _make(n, h, v, dtype=torch.bfloat16, device="cuda")
    w = data["weight"]
    assert w is not None
    data["weight"] = w.detach()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss, (gx,) = _loss_and_grads(fused_linear_cross_entropy, data)
    peak = torch.cuda.max_memory_allocated() - base
    ref, (rx,) = _loss_and_grads(linear_cross_entropy_reference, data)
    assert abs(loss.item() - ref.item()) / ref.item() < 1e-4
    assert _rel(gx, rx) < 1e-2
    # No weight gradient: d hidden (64 MiB) + one chunk of logits (2048 x 32000 bf16, 125 MiB) + small vectors,
    # against >= 2 GiB of fp32 logits on the reference path.
    assert peak < 256 * 2**20, peak / 2**20


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gpu_bf16_softcap_class_weight(reduction: str) -> None:
    n, h, v = 4096, 2048, 32000
    data = _make(n, h, v, bias=True, dtype=torch.bfloat16, device="cuda", logit_scale=30.0)
    cw = torch.rand(v, device="cuda") + 0.5
    kw: dict[str, Any] = {"softcap": 30.0, "class_weight": cw, "label_smoothing": 0.1, "reduction": reduction}
    assert fused_linear_cross_entropy_kernel_available(data["hidden"], data["weight"], data["labels"], **{
        k: kw[k] for k in ("softcap", "class_weight", "reduction")})  # fmt: skip
    loss = fused_linear_cross_entropy(data["hidden"], data["weight"], data["labels"], data["bias"], chunk_size=1000,
                                      **kw)  # fmt: skip
    ref = linear_cross_entropy_reference(data["hidden"], data["weight"], data["labels"], data["bias"], **kw)
    assert isinstance(loss, torch.Tensor) and isinstance(ref, torch.Tensor)
    # The kernel rounds x / c, tanh and * c to bf16 as HF does: the capped logits agree, the loss to ~1e-6.
    assert _rel(loss, ref) < 1e-4, (loss.sum().item(), ref.sum().item())
    up = torch.randn(loss.shape, device="cuda") if reduction == "none" else None
    got = torch.autograd.grad(loss, _params(data), up)
    exp = torch.autograd.grad(ref, _params(data), up)
    for a, e in zip(got, exp):
        assert a.dtype == e.dtype and a.shape == e.shape
        assert _rel(a, e) < 2e-2


@pytest.mark.gpu
def test_gpu_labels_outside_vocabulary_raise_without_a_sync() -> None:
    data = _make(512, 64, 1000, device="cuda")
    args = (data["hidden"], data["weight"])
    bad = data["labels"].clone()
    bad[5] = 1000
    loss = fused_linear_cross_entropy(*args, bad)  # no sync: the loss is NaN, the error comes later
    assert isinstance(loss, torch.Tensor)
    torch.cuda.synchronize()
    assert torch.isnan(loss).item()
    with pytest.raises(ValueError, match=r"an earlier .*\[0, 1000\).*got 1 label\(s\) outside that range, 1000"):
        fused_linear_cross_entropy(*args, data["labels"])
    torch.cuda.synchronize()
    fused_linear_cross_entropy(*args, data["labels"])  # good labels: nothing left to report
    torch.cuda.synchronize()
    fused_linear_cross_entropy(*args, data["labels"])
    # The reference path checks at once (F.cross_entropy would trip a device-side assert).
    with pytest.raises(ValueError, match=r"got 1 label\(s\) outside that range, 1000"):
        linear_cross_entropy_reference(*args, bad)
