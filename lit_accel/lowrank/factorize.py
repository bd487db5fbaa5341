"""SVD factorisation: replace large linears by two thin ones from their truncated SVD.

A linear ``y = x W^T + b`` with ``W`` of shape ``[out, in]`` becomes ``y = up(down(x))`` where ``down`` is
``[r, in]`` and ``up`` is ``[r -> out]`` (with the bias), from the truncated SVD ``W ~= U_r S_r V_r^T``. That saves
parameters and FLOPs whenever ``r * (in + out) < in * out``; by Eckart-Young the truncation is the best rank-``r``
approximation in the Frobenius norm, with relative error ``sqrt(sum of dropped S_i^2) / ||W||_F``.

Functions (pure, usable without Lightning; :mod:`lit_accel.lowrank.factorize_callback` decides *when*):

- :func:`factorize_linear`: one ``nn.Linear`` / GPT-2 ``Conv1D`` -> :class:`LowRankLinear` + a
  :class:`FactorizationReport`.
- :func:`apply_factorization`: the matched linears of a model, in place; :func:`format_report` prints the result.
- :func:`merge_factorization` / :func:`merged_state_dict` / :func:`save_merged`: back to dense layers, i.e. a plain
  Hugging Face model (exact logits, no size saving).
- :func:`save_factorized` / :func:`load_factorized`: keep the factors on disk (keeps the saving).
- :func:`rebuild_factorization`: give a model the factorised *structure* of saved ranks, before loading weights.

The config change needed to load a factorised model: a Hugging Face config cannot say "this projection is two
matrices of rank r", so a directory written by :func:`save_factorized` loads with :func:`load_factorized` (which
builds the model from its config, applies the ranks stored in ``lit_accel_factorization.json``, then loads the
weights). Plain ``AutoModelForCausalLM.from_pretrained`` would not fail on it but would warn about unexpected
``down``/``up`` keys and leave the projections randomly initialised; for plain-HF users export merged
(:func:`save_merged`) instead.

Distributed: under DeepSpeed ZeRO-3 every weight is gathered before it is read (``modifier_rank=None``), and
the new factors are written with ``modifier_rank=0``, so whatever each rank computed, rank 0's values are the ones
partitioned to all ranks. The *rank* chosen from ``energy`` decides parameter shapes, so it is broadcast from
rank 0 when a process group is initialised: the SVD of the same gathered matrix on the same device type is
deterministic in practice, but a shape that differs between ranks would be fatal, so it is not left to chance.
Under DDP and ZeRO-1/2 the strategy broadcasts rank 0's parameter values when it wraps the model.

Composition: LoRA (which wraps *dense* linears) and factorisation cannot be stacked on one layer;
:func:`apply_factorization` refuses a target that already carries ``lora_A`` adapters.

Example:
    >>> import torch
    >>> from torch import nn
    >>> layer, report = factorize_linear(nn.Linear(64, 48), rank=8)
    >>> report.params_before, report.params_after, layer(torch.randn(2, 64)).shape
    (3120, 944, torch.Size([2, 48]))
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from lit_accel.models.hf_directory import read_hf_weights, save_hf_directory
from lit_accel.models.params import full_state_dict, gathered, is_rank_zero, load_full_state_dict
from lit_accel.models.structure import StructurePatterns, get_structure, linear_in_out_features
from lit_accel.models.surgery import match_linears, replace_module

__all__ = [
    "FACTORIZATION_FILE",
    "FactorizationReport",
    "LowRankLinear",
    "apply_factorization",
    "factorization_ranks",
    "factorize_linear",
    "format_report",
    "load_factorized",
    "merge_factorization",
    "merged_state_dict",
    "model_matmul_flops_per_token",
    "rebuild_factorization",
    "save_factorized",
    "save_merged",
]

FACTORIZATION_FILE = "lit_accel_factorization.json"
"""Name of the file :func:`save_factorized` writes next to the weights: ``{"version": 1, "ranks": {name: r}}``."""

_FLOAT64_MAX_NUMEL = 1 << 22
# Matrices up to 4M entries (2048 x 2048) are decomposed in float64: it costs well under a second there and makes
# the reported errors exact to print precision; larger ones use float32, whose SVD is accurate to ~1e-6 relative.

DenseType = Literal["linear", "conv1d"]


# --------------------------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------------------------


class LowRankLinear(nn.Module):
    """``y = up(down(x))``: a rank-``r`` linear map stored as two factors.

    ``down`` is ``nn.Linear(in_features, rank, bias=False)`` and ``up`` is ``nn.Linear(rank, out_features)`` with
    the original layer's bias, so a layer named ``q_proj`` has state-dict keys ``q_proj.down.weight``,
    ``q_proj.up.weight`` and ``q_proj.up.bias``. It deliberately has no ``base_layer`` (there is no dense weight
    any more), so adapter code that expects one does not mistake it for a wrapped linear.

    Args:
        in_features: Input features.
        out_features: Output features.
        rank: Inner dimension ``r``.
        bias: Whether ``up`` has a bias.
        dense_type: What the layer merges back into: ``"linear"`` (``nn.Linear``) or ``"conv1d"`` (GPT-2's
            ``Conv1D``, whose weight is stored ``[in, out]``).
        device: Device of the new parameters.
        dtype: Dtype of the new parameters.

    Example:
        >>> layer = LowRankLinear(64, 32, rank=4)
        >>> layer.down.weight.shape, layer.up.weight.shape, layer.flops_per_token()
        (torch.Size([4, 64]), torch.Size([32, 4]), 768)
    """

    is_factorized_linear = True
    """Marker for duck-typed checks (e.g. a LoRA implementation refusing to wrap a factorised layer)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        dense_type: DenseType = "linear",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if dense_type not in ("linear", "conv1d"):
            raise ValueError(f"LowRankLinear dense_type={dense_type!r}; allowed: 'linear', 'conv1d'")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.rank = int(rank)
        self.dense_type: DenseType = dense_type
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def flops_per_token(self) -> int:
        """Forward matmul FLOPs per token, ``2 * r * (in + out)`` (bias not counted, as for dense layers)."""
        return 2 * self.rank * (self.in_features + self.out_features)

    def dense_weight(self) -> torch.Tensor:
        """``up.weight @ down.weight`` as an ``[out, in]`` tensor (computed in float32, cast back).

        Under ZeRO-3 call it inside ``gathered(list(layer.parameters()))``.
        """
        up, down = self.up.weight, self.down.weight
        return (up.float() @ down.float()).to(up.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.up.bias is not None}, dense_type={self.dense_type!r}"
        )


# --------------------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------------------


@dataclass
class FactorizationReport:
    """What factorising one layer did (or why it was skipped).

    Example:
        >>> r = FactorizationReport("q", 64, 64, rank=8, factorized=True, bias=False, rel_error=0.1, energy_kept=0.9)
        >>> r.params_before, r.params_after, r.flops_before, r.flops_after
        (4096, 1024, 8192, 2048)
    """

    name: str
    """Qualified module name, relative to the model given."""
    in_features: int
    """Input features of the layer."""
    out_features: int
    """Output features of the layer."""
    rank: int
    """Chosen rank (also given for a skipped layer: the rank that was asked for or that ``energy`` chose)."""
    factorized: bool
    """False when the layer was left dense; :attr:`reason` says why."""
    bias: bool = False
    """Whether the layer has a bias (counted in both parameter numbers, not in FLOPs)."""
    rel_error: float | None = None
    """``||W - up @ down||_F / ||W||_F`` of the factors actually built (None when skipped)."""
    energy_kept: float | None = None
    """Fraction of ``sum S_i^2`` that the kept singular values hold (None when no SVD was computed)."""
    reason: str | None = None
    """Why the layer was skipped; None when factorised."""

    @property
    def shape(self) -> tuple[int, int]:
        """``(out_features, in_features)``, the ``nn.Linear`` weight shape."""
        return self.out_features, self.in_features

    @property
    def params_before(self) -> int:
        """Parameters of the dense layer: ``in * out`` (+ ``out`` for a bias)."""
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)

    @property
    def params_after(self) -> int:
        """Parameters after: ``r * (in + out)`` (+ bias) if factorised, else :attr:`params_before`."""
        if not self.factorized:
            return self.params_before
        return self.rank * (self.in_features + self.out_features) + (self.out_features if self.bias else 0)

    @property
    def flops_before(self) -> int:
        """Forward matmul FLOPs per token of the dense layer, ``2 * in * out``."""
        return 2 * self.in_features * self.out_features

    @property
    def flops_after(self) -> int:
        """Forward matmul FLOPs per token after: ``2 * r * (in + out)`` if factorised, else :attr:`flops_before`."""
        return 2 * self.rank * (self.in_features + self.out_features) if self.factorized else self.flops_before


def format_report(reports: Sequence[FactorizationReport]) -> str:
    """A text table of :func:`apply_factorization`'s reports, one row per layer, with totals.

    Example:
        >>> table = format_report([FactorizationReport("q", 64, 64, 8, True, rel_error=0.5)])
        >>> print(table.splitlines()[1])
        q                          64 x 64           8     4,096 -> 1,024          8,192 -> 2,048               0.5000
    """
    header = ("layer", "shape (out x in)", "rank", "params before -> after", "FLOPs/token before -> after")
    rows = [
        (
            r.name,
            f"{r.out_features} x {r.in_features}",
            str(r.rank),
            f"{r.params_before:,} -> {r.params_after:,}",
            f"{r.flops_before:,} -> {r.flops_after:,}",
            f"{r.rel_error:.4f}" if r.rel_error is not None else "-",
            r.reason or "",
        )
        for r in reports
    ]
    done = [r for r in reports if r.factorized]
    p0, p1 = sum(r.params_before for r in reports), sum(r.params_after for r in reports)
    f0, f1 = sum(r.flops_before for r in reports), sum(r.flops_after for r in reports)
    mean_err = sum(r.rel_error or 0.0 for r in done) / len(done) if done else 0.0
    rows.append(
        (
            f"total ({len(done)} of {len(reports)} factorised)",
            "",
            "",
            f"{p0:,} -> {p1:,}",
            f"{f0:,} -> {f1:,}",
            f"{mean_err:.4f} mean" if done else "-",
            f"saves {1 - p1 / p0:.1%} params, {1 - f1 / f0:.1%} FLOPs" if p0 and f0 else "",
        )
    )
    table = [(*header, "rel. error", "note"), *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table)


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------


def _dense_type(module: nn.Module) -> DenseType:
    if isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, nn.Linear):
        return "linear"
    if hasattr(module, "lora_A"):
        raise ValueError(_lora_message([type(module).__name__]))
    raise TypeError(f"{type(module).__name__} is not an nn.Linear or a transformers Conv1D; it cannot be factorised")


def _lora_message(names: list[str]) -> str:
    return (
        f"cannot factorise {names}: they already carry LoRA adapters (lora_A). LoRA wraps dense linears and SVD "
        "factorisation replaces them, so the two cannot be stacked on one layer: factorise first and train the "
        "factors, or merge the adapters into the base weights (LoRA merge) before factorising, or target "
        "different layers with each technique."
    )


def _dist_world() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _broadcast_int(value: int) -> int:
    """Rank 0's ``value`` on every rank (a no-op without a process group)."""
    if _dist_world() == 1:
        return value
    dist = torch.distributed
    # NCCL only moves CUDA tensors; gloo (and the CPU-side of mixed backends) takes CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return int(t.item())


def _weight_as_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out, in]`` (a view; GPT-2's Conv1D stores ``[in, out]``)."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight.t() if isinstance(module, Conv1D) else weight


def _rank_from_energy(s: torch.Tensor, energy: float) -> int:
    """Smallest r such that ``sum_{i<r} S_i^2 >= energy * sum S_i^2``."""
    sq = s.double() ** 2
    total = float(sq.sum())
    if total == 0.0:
        return 1
    cum = torch.cumsum(sq, 0) / total
    # A relative slack of 1e-12 keeps r from growing by one when the sum lands on the threshold up to rounding.
    r = int((cum < energy - 1e-12).sum()) + 1
    return min(r, s.numel())


def _params_of(module: nn.Module) -> list[nn.Parameter]:
    return list(module.parameters())


@contextlib.contextmanager
def _zero_init_paused() -> Iterator[None]:
    """Suspends an active ``deepspeed.zero.Init`` (its module and tensor-constructor patches) for the block.

    The callback factorises inside ``configure_model``, which Lightning runs inside ``zero.Init`` under ZeRO-3.
    DeepSpeed (0.19) takes a module built with ``device="meta"`` there for ``torch.nn.utils.skip_init`` and patches
    ``_apply`` of every module class until that module's ``to_empty`` is called, which a placeholder's never is:
    from then on every ``.to()`` / ``.cuda()`` in the process would partition the module it moves (a plain
    Hugging Face model loaded after training, say). Nothing is imported: without DeepSpeed loaded, no ``Init`` is
    active.
    """
    pp: Any = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    context = getattr(pp, "top_level_context", None)
    if context is None or not getattr(context, "patched", False):
        yield
        return
    pp.shutdown_init_context()
    try:
        yield
    finally:
        pp.restore_init_context()


@contextlib.contextmanager
def _dense_placeholders(model: nn.Module) -> Iterator[dict[str, LowRankLinear]]:
    """Temporarily swaps every :class:`LowRankLinear` for a meta-device ``nn.Linear`` of the same shape.

    :func:`~lit_accel.models.structure.get_structure` only knows dense linears (and ``base_layer`` wrappers), so a
    factorised model would fail its role checks; seen through placeholders it has its original structure again,
    which makes :func:`apply_factorization` idempotent and lets the FLOPs count see every layer. Meta tensors cost
    no memory. Yields name -> the factorised layer that the placeholder stands for.
    """
    found = {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
    with _zero_init_paused():
        placeholders = {
            name: nn.Linear(layer.in_features, layer.out_features, bias=layer.up.bias is not None, device="meta")
            for name, layer in found.items()
        }
    for name, placeholder in placeholders.items():
        replace_module(model, name, placeholder)
    try:
        yield found
    finally:
        for name, layer in found.items():
            replace_module(model, name, layer)


def factorization_ranks(model: nn.Module) -> dict[str, int]:
    """Qualified name -> rank of every :class:`LowRankLinear` in ``model``.

    Example:
        >>> factorization_ranks(nn.Sequential(LowRankLinear(8, 8, rank=2)))
        {'0': 2}
    """
    return {name: m.rank for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


def model_matmul_flops_per_token(model: nn.Module, patterns: StructurePatterns | None = None) -> int:
    """Forward weight-matmul FLOPs per token of a whole model (decoder linears + LM head), factorised or not.

    Dense layers count ``2 * in * out``, factorised ones ``2 * r * (in + out)``; attention scores, norms and
    embeddings are not counted (they do not change with factorisation).

    Args:
        model: A supported Hugging Face causal LM, or any model described by ``patterns``.
        patterns: Module-name patterns for a model that is not a supported architecture.

    Returns:
        FLOPs per token.
    """
    with _dense_placeholders(model) as factorized:
        structure = get_structure(model, patterns)
        total = 0
        for name, module in structure.linears().items():
            if name in factorized:
                total += factorized[name].flops_per_token()
            else:
                fin, fout = linear_in_out_features(module)
                total += 2 * fin * fout
        head = model.get_submodule(structure.lm_head_name) if structure.lm_head_name else None
        if head is not None:
            fin, fout = linear_in_out_features(head)
            total += 2 * fin * fout
    return total


# --------------------------------------------------------------------------------------------------------------
# Factorising
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _SVD:
    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    weight: torch.Tensor  # [out, in] in the compute dtype
    bias: torch.Tensor | None


def _svd(module: nn.Module) -> _SVD:
    params = [p for p in (module.weight, getattr(module, "bias", None)) if isinstance(p, nn.Parameter)]
    with gathered(params, modifier_rank=None), torch.no_grad():
        weight = _weight_as_out_in(module)
        if weight.is_meta:
            raise ValueError(
                "cannot factorise a layer whose weights are on the meta device (not materialised yet); factorise "
                "after the weights are initialised or loaded (the LowRankFactorization callback runs right after "
                "configure_model)"
            )
        dtype = torch.float64 if weight.numel() <= _FLOAT64_MAX_NUMEL else torch.float32
        w = weight.detach().to(dtype=dtype, copy=True)
        b = getattr(module, "bias", None)
        bias = b.detach().clone() if isinstance(b, torch.Tensor) else None
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return _SVD(u=u, s=s, vh=vh, weight=w, bias=bias)


def _build(
    module: nn.Module, svd: _SVD | None, rank: int, dense_type: DenseType
) -> tuple[LowRankLinear, float | None, float | None]:
    """The factorised layer (from ``svd``, or left at its default init when ``svd`` is None), error, energy."""
    fin, fout = linear_in_out_features(module)
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    has_bias = getattr(module, "bias", None) is not None
    # Under ZeRO-3 the local weight is an empty shard on the right device; its dtype is the model's.
    new = LowRankLinear(fin, fout, rank, bias=has_bias, dense_type=dense_type, device=weight.device, dtype=weight.dtype)
    if svd is None:
        return new, None, None
    # Balanced split: both factors get sqrt(S). Their norms are then equal, so the gradients of the two factors
    # are on the same scale and one learning rate suits both (putting all of S in one factor makes the other's
    # updates relatively huge or tiny).
    root = svd.s[:rank].sqrt()
    up_w = svd.u[:, :rank] * root
    down_w = root[:, None] * svd.vh[:rank]
    norm = float(torch.linalg.matrix_norm(svd.weight))
    err = float(torch.linalg.matrix_norm(svd.weight - up_w @ down_w)) / norm if norm > 0 else 0.0
    sq = svd.s.double() ** 2
    energy_kept = float(sq[:rank].sum() / sq.sum()) if float(sq.sum()) > 0 else 1.0
    with gathered(_params_of(new), modifier_rank=0), torch.no_grad():
        new.up.weight.copy_(up_w.to(new.up.weight.dtype))
        new.down.weight.copy_(down_w.to(new.down.weight.dtype))
        if svd.bias is not None:
            assert new.up.bias is not None
            new.up.bias.copy_(svd.bias.to(new.up.bias.dtype))
    return new, err, energy_kept


def _check_rank(name: str, rank: int, fin: int, fout: int, allow_full: bool) -> None:
    top = min(fin, fout)
    ok = 1 <= rank <= top if allow_full else 1 <= rank < top
    if not ok:
        allowed = f"1 <= rank <= {top}" if allow_full else f"1 <= rank < min(in, out) = {top}"
        raise ValueError(f"rank={rank} is out of range for {name or 'the layer'} ({fout} x {fin}); allowed: {allowed}")


def _check_rank_energy(rank: object, energy: object) -> None:
    if (rank is None) == (energy is None):
        raise ValueError(
            f"give exactly one of rank and energy (got rank={rank!r}, energy={energy!r}): rank fixes r for every "
            "layer, energy in (0, 1] picks per layer the smallest r keeping that fraction of sum S_i^2"
        )
    if energy is not None and (
        isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0.0 < float(energy) <= 1.0
    ):
        raise ValueError(f"energy={energy!r} is not allowed; energy must be a number in (0, 1]")
    if (
        rank is not None
        and not isinstance(rank, Mapping)
        and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1)
    ):
        raise ValueError(f"rank={rank!r} is not allowed; rank must be an int >= 1 (or a dict layer name -> rank)")


def factorize_linear(
    linear: nn.Module, rank: int | None = None, energy: float | None = None, name: str = ""
) -> tuple[LowRankLinear, FactorizationReport]:
    """Factorises one linear by its truncated SVD.

    ``W = U S V^T`` is computed in float64 (matrices up to 4M entries) or float32 (larger) on the weight's device;
    ``up = U_r sqrt(S_r)`` and ``down = sqrt(S_r) V_r^T`` (a balanced split); the bias moves to ``up``. Under
    ZeRO-3 the weight is gathered first and the factors are written from rank 0 (see the module docstring).

    Args:
        linear: An ``nn.Linear`` or a GPT-2 ``Conv1D`` (``[in, out]`` weight).
        rank: Rank ``r``, with ``1 <= r < min(in, out)``.
        energy: Instead of ``rank``: the smallest ``r`` whose singular values hold at least this fraction, in
            ``(0, 1]``, of ``sum S_i^2`` (the squared Frobenius norm).
        name: Name used in the report and in error messages.

    Returns:
        The :class:`LowRankLinear` (same device and dtype as ``linear``) and its :class:`FactorizationReport`.

    Raises:
        ValueError: Neither or both of ``rank``/``energy``, or a value out of range; a layer with LoRA adapters.
        TypeError: ``linear`` is not an ``nn.Linear`` or ``Conv1D``.

    Example:
        >>> layer, report = factorize_linear(nn.Linear(32, 32, bias=False), energy=0.5)
        >>> report.energy_kept >= 0.5, layer.rank == report.rank
        (True, True)
    """
    _check_rank_energy(rank, energy)
    if isinstance(rank, Mapping):
        raise ValueError("factorize_linear takes an int rank; a dict of ranks is for apply_factorization")
    dense_type = _dense_type(linear)
    fin, fout = linear_in_out_features(linear)
    if rank is not None:
        _check_rank(name, rank, fin, fout, allow_full=False)
    svd = _svd(linear)
    r = rank if rank is not None else _broadcast_int(_rank_from_energy(svd.s, float(energy)))  # type: ignore[arg-type]
    new, err, kept = _build(linear, svd, r, dense_type)
    report = FactorizationReport(
        name=name,
        in_features=fin,
        out_features=fout,
        rank=r,
        factorized=True,
        bias=new.up.bias is not None,
        rel_error=err,
        energy_kept=kept,
    )
    return new, report


def apply_factorization(
    model: nn.Module,
    targets: str | Sequence[str] | None = "attention",
    rank: int | Mapping[str, int] | None = None,
    energy: float | None = None,
    patterns: StructurePatterns | None = None,
    skip_if_not_smaller: bool = True,
) -> list[FactorizationReport]:
    """Replaces the matched linears of ``model`` by :class:`LowRankLinear` factors of their truncated SVD, in place.

    Call it before the optimizer is built (the callback does, right after ``configure_model``); under ZeRO-3 call
    it inside the model's partitioning context (``configure_model`` is) so the new factors are partitioned too.
    Layers that are already factorised are left alone and not reported, so a second call with the same arguments
    changes nothing (it only reports the skipped layers again). LoRA and factorisation cannot be stacked: a target
    carrying ``lora_A`` adapters is an error.

    Args:
        model: A Hugging Face causal LM (LLaMA, Mistral, Qwen2, GPT-2), or any model with ``patterns``.
        targets: ``"attention"``, ``"mlp"``, ``"all-linear"``, role names (``q``, ``k``, ``v``, ``o``, ``gate``,
            ``up``, ``down``, GPT-2 ``qkv``), module-name suffixes or regular expressions (see
            :func:`~lit_accel.models.surgery.match_linears`). Ignored when ``rank`` is a dict.
        rank: One rank for every target (``1 <= rank < min(in, out)`` for each), or a dict qualified layer name ->
            rank that factorises exactly those layers (e.g. the ranks saved by :func:`save_factorized`; a saved
            rank may be ``min(in, out)`` and is never skipped).
        energy: Instead of ``rank``: per layer, the smallest rank keeping this fraction, in ``(0, 1]``, of the sum
            of squared singular values.
        patterns: Module-name patterns for a model that is not a supported architecture.
        skip_if_not_smaller: Leave a layer dense, reported with the reason, when ``r * (in + out) >= in * out``
            (factorising it would not save anything); False factorises it anyway.

    Returns:
        One :class:`FactorizationReport` per matched layer, in forward order, skipped layers included.

    Raises:
        ValueError: Neither or both of ``rank``/``energy``; a rank out of range (naming the layer and the allowed
            range); ``targets`` matching nothing (the message lists the model's linears); a dict naming a module
            that does not exist or is not a linear; a target with LoRA adapters.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        ...                                      num_attention_heads=4, vocab_size=128))
        >>> reports = apply_factorization(model, "attention", rank=8)
        >>> [r.name.split(".")[-1] for r in reports if r.factorized]
        ['q_proj', 'k_proj', 'v_proj', 'o_proj']
    """
    _check_rank_energy(rank, energy)
    with _dense_placeholders(model) as already:
        if isinstance(rank, Mapping):
            chosen: dict[str, nn.Module] = {}
            for name in rank:
                try:
                    chosen[name] = model.get_submodule(name)
                except AttributeError:
                    raise ValueError(f"rank names layer {name!r}, which does not exist in the model") from None
        else:
            if targets is None:
                raise ValueError("targets=None is only allowed with a dict of ranks; give a preset or patterns")
            chosen = match_linears(model, targets, patterns=patterns)
    todo = {name: m for name, m in chosen.items() if name not in already}

    # Check every target before changing any, so a bad argument never leaves a half-factorised model.
    lora = [name for name, m in todo.items() if hasattr(m, "lora_A")]
    if lora:
        raise ValueError(_lora_message(lora))
    for name, module in todo.items():
        if not isinstance(module, (nn.Linear, Conv1D)):
            raise ValueError(f"{name!r} is a {type(module).__name__}, not an nn.Linear or Conv1D; cannot factorise it")
        fin, fout = linear_in_out_features(module)
        if isinstance(rank, Mapping):
            _check_rank(name, int(rank[name]), fin, fout, allow_full=True)
        elif rank is not None:
            _check_rank(name, rank, fin, fout, allow_full=False)

    reports: list[FactorizationReport] = []
    for name, module in todo.items():
        fin, fout = linear_in_out_features(module)
        has_bias = getattr(module, "bias", None) is not None
        svd: _SVD | None = None
        if isinstance(rank, Mapping):
            r = int(rank[name])
        elif rank is not None:
            r = rank
        else:
            svd = _svd(module)
            r = _broadcast_int(_rank_from_energy(svd.s, float(energy)))  # type: ignore[arg-type]
        force = isinstance(rank, Mapping) or not skip_if_not_smaller
        if not force and r * (fin + fout) >= fin * fout:
            reports.append(
                FactorizationReport(
                    name=name,
                    in_features=fin,
                    out_features=fout,
                    rank=r,
                    factorized=False,
                    bias=has_bias,
                    energy_kept=_energy_kept(svd, r),
                    reason=f"skipped: r*(in+out) = {r * (fin + fout):,} >= in*out = {fin * fout:,}, no saving",
                )
            )
            continue
        if svd is None:
            svd = _svd(module)
        new, err, kept = _build(module, svd, r, _dense_type(module))
        replace_module(model, name, new)
        reports.append(
            FactorizationReport(
                name=name,
                in_features=fin,
                out_features=fout,
                rank=r,
                factorized=True,
                bias=has_bias,
                rel_error=err,
                energy_kept=kept,
            )
        )
    return reports


def _energy_kept(svd: _SVD | None, rank: int) -> float | None:
    if svd is None:
        return None
    sq = svd.s.double() ** 2
    return float(sq[:rank].sum() / sq.sum()) if float(sq.sum()) > 0 else 1.0


def rebuild_factorization(model: nn.Module, ranks: Mapping[str, int]) -> None:
    """Gives ``model`` the factorised *structure* of ``ranks``, without computing anything from its weights.

    Layers named in ``ranks`` become :class:`LowRankLinear` of that rank; factorised layers not named become
    dense again. The values of every layer changed are fresh initialisations: load the matching weights right
    after (a checkpoint's state dict, a :func:`save_factorized` directory). This is how a resumed run gets the
    structure of the run that wrote the checkpoint, whatever ranks ``energy`` would choose on its new weights.

    Args:
        model: The model to change in place.
        ranks: Qualified layer name -> rank, as :func:`factorization_ranks` returns.

    Raises:
        ValueError: A name that is not a linear or factorised layer of the model, or a rank out of range.
    """
    for name, layer in _factorized_modules(model).items():
        if name not in ranks:
            replace_module(model, name, _empty_dense(layer))
    for name, r in ranks.items():
        try:
            current = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"ranks name layer {name!r}, which does not exist in the model") from None
        if isinstance(current, LowRankLinear):
            if current.rank == r:
                continue
            dense_type: DenseType = current.dense_type
            has_bias = current.up.bias is not None
            weight = current.up.weight
        elif isinstance(current, (nn.Linear, Conv1D)):
            dense_type = _dense_type(current)
            has_bias = current.bias is not None
            weight = current.weight
        else:
            raise ValueError(f"ranks name {name!r}, a {type(current).__name__}, not a linear or factorised layer")
        fin, fout = linear_in_out_features(current)
        _check_rank(name, int(r), fin, fout, allow_full=True)
        new = LowRankLinear(fin, fout, int(r), has_bias, dense_type, device=weight.device, dtype=weight.dtype)
        replace_module(model, name, new)


def _factorized_modules(model: nn.Module) -> dict[str, LowRankLinear]:
    # Collected up front: replacing modules while iterating named_modules() would skip or revisit some.
    return {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


def _empty_dense(layer: LowRankLinear) -> nn.Module:
    weight = layer.up.weight
    has_bias = layer.up.bias is not None
    if layer.dense_type == "conv1d":
        conv = Conv1D(nf=layer.out_features, nx=layer.in_features)
        if not has_bias:
            conv.bias = None  # type: ignore[assignment]
        return conv.to(device=weight.device, dtype=weight.dtype)
    return nn.Linear(layer.in_features, layer.out_features, bias=has_bias, device=weight.device, dtype=weight.dtype)


# --------------------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------------------


def merge_factorization(model: nn.Module) -> list[str]:
    """Replaces every :class:`LowRankLinear` by a dense layer with ``W = up.weight @ down.weight``, in place.

    The dense layer is an ``nn.Linear``, or a GPT-2 ``Conv1D`` where the original was one, so the model is a plain
    Hugging Face model again: ``save_pretrained`` writes a directory that ``AutoModelForCausalLM.from_pretrained``
    loads, with the factorised model's logits (up to float rounding). The size saving is gone.
    :func:`save_merged` writes the same directory without changing the model. Under ZeRO-3 call it on every rank
    inside the partitioning context.

    Args:
        model: A model holding factorised layers.

    Returns:
        The names of the merged layers.

    Example:
        >>> model = nn.Sequential(LowRankLinear(8, 4, rank=2))
        >>> merge_factorization(model), type(model[0]).__name__
        (['0'], 'Linear')
    """
    layers = _factorized_modules(model)
    for name, layer in layers.items():
        dense = _empty_dense(layer)
        with gathered(_params_of(layer), modifier_rank=None), torch.no_grad():
            w = layer.dense_weight()
            bias = layer.up.bias.detach().clone() if layer.up.bias is not None else None
        with gathered(_params_of(dense), modifier_rank=0), torch.no_grad():
            target = dense.weight
            assert isinstance(target, torch.Tensor)
            target.copy_((w.t() if layer.dense_type == "conv1d" else w).to(target.dtype))
            target_bias = dense.bias
            if bias is not None and isinstance(target_bias, torch.Tensor):
                target_bias.copy_(bias.to(target_bias.dtype))
        replace_module(model, name, dense)
    return list(layers)


def merged_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The state dict of the merged (dense) model, computed from the factors without changing ``model``.

    Each ``<name>.down.weight`` / ``<name>.up.weight`` / ``<name>.up.bias`` becomes ``<name>.weight`` /
    ``<name>.bias`` (transposed to ``[in, out]`` for a GPT-2 ``Conv1D``).

    Args:
        model: A model holding factorised layers.
        state: Its full state dict if already at hand (under ZeRO-3 from
            :func:`~lit_accel.models.params.full_state_dict`, on rank 0); read from ``model`` otherwise.

    Returns:
        A state dict with the model's original (dense) keys, on CPU.
    """
    full = dict(state) if state is not None else full_state_dict(model)
    for name, layer in _factorized_modules(model).items():
        down = full.pop(f"{name}.down.weight")
        up = full.pop(f"{name}.up.weight")
        w = (up.float() @ down.float()).to(up.dtype)
        full[f"{name}.weight"] = (w.t() if layer.dense_type == "conv1d" else w).contiguous()
        bias = full.pop(f"{name}.up.bias", None)
        if bias is not None:
            full[f"{name}.bias"] = bias
    return full


class _ExtraFiles:
    """Writes ``lit_accel_factorization.json`` (and a tokenizer) through ``save_hf_directory``'s tokenizer slot,
    so the file lands inside the same atomic write as the weights (no directory with weights but no ranks)."""

    def __init__(self, ranks: Mapping[str, int], tokenizer: Any | None) -> None:
        self.ranks = dict(ranks)
        self.tokenizer = tokenizer

    def save_pretrained(self, directory: str) -> None:
        payload = {"format": "lit_accel.factorization", "version": 1, "ranks": self.ranks}
        Path(directory, FACTORIZATION_FILE).write_text(json.dumps(payload, indent=2) + "\n")
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)


def _save_dir(
    model: nn.Module, state: dict[str, torch.Tensor], directory: str | os.PathLike[str], extra: Any, overwrite: bool
) -> Path:
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"{type(model).__name__} is not a Hugging Face PreTrainedModel (no save_pretrained)")
    return save_hf_directory(model, state, Path(directory), tokenizer=extra, overwrite=overwrite)  # type: ignore[arg-type]


def save_merged(
    model: nn.Module, directory: str | os.PathLike[str], tokenizer: Any | None = None, overwrite: bool = False
) -> Path:
    """Writes a plain Hugging Face directory of the merged (dense) model; ``model`` itself is not changed.

    ``AutoModelForCausalLM.from_pretrained(directory)`` then gives the factorised model's logits, with no config
    change and no ``lit_accel`` needed; the file is as large as the original dense model. Under ZeRO-3 call it
    on every rank (only rank 0 writes).

    Args:
        model: A Hugging Face model holding factorised layers.
        directory: Destination (written atomically).
        tokenizer: Optional tokenizer written alongside.
        overwrite: Replace an existing non-empty directory.

    Returns:
        The directory.
    """
    state = full_state_dict(model)
    if not is_rank_zero():
        return Path(directory)
    return _save_dir(model, merged_state_dict(model, state), directory, tokenizer, overwrite)


def save_factorized(
    model: nn.Module, directory: str | os.PathLike[str], tokenizer: Any | None = None, overwrite: bool = False
) -> Path:
    """Writes the factorised model: config, factor weights, and ``lit_accel_factorization.json`` (name -> rank).

    Load it with :func:`load_factorized`. The config is the unchanged Hugging Face config, which cannot express a
    factorised projection; plain ``from_pretrained`` on this directory would warn about unexpected ``down``/``up``
    keys and leave those projections randomly initialised, so use :func:`save_merged` for plain-HF consumers.
    Under ZeRO-3 call it on every rank (only rank 0 writes).

    Args:
        model: A Hugging Face model holding factorised layers.
        directory: Destination (written atomically, ranks file included).
        tokenizer: Optional tokenizer written alongside.
        overwrite: Replace an existing non-empty directory.

    Returns:
        The directory.
    """
    state = full_state_dict(model)
    if not is_rank_zero():
        return Path(directory)
    return _save_dir(model, state, directory, _ExtraFiles(factorization_ranks(model), tokenizer), overwrite)


def load_factorized(directory: str | os.PathLike[str], dtype: torch.dtype = torch.float32, **kwargs: Any) -> nn.Module:
    """Loads a directory written by :func:`save_factorized`, keeping the factors (and the saving).

    Builds the model from its config (``AutoModelForCausalLM.from_config``), gives it the factorised structure
    from ``lit_accel_factorization.json`` (:func:`rebuild_factorization`), then loads the weights, checking that
    every parameter is present with the right shape.

    Args:
        directory: A :func:`save_factorized` directory.
        dtype: Parameter dtype of the model built.
        **kwargs: Passed to ``AutoModelForCausalLM.from_config`` (e.g. ``attn_implementation``).

    Returns:
        The factorised Hugging Face model, in eval mode as ``from_pretrained`` returns it.

    Raises:
        FileNotFoundError: No ``lit_accel_factorization.json`` in ``directory`` (for a merged or plain directory,
            use ``AutoModelForCausalLM.from_pretrained``).

    Example:
        >>> model = load_factorized("out/llama-factorized")  # doctest: +SKIP
    """
    path = Path(directory)
    spec = path / FACTORIZATION_FILE
    if not spec.is_file():
        raise FileNotFoundError(
            f"{str(spec)!r} does not exist: {str(path)!r} was not written by save_factorized. A merged or plain "
            "Hugging Face directory loads with AutoModelForCausalLM.from_pretrained."
        )
    ranks = {str(k): int(v) for k, v in json.loads(spec.read_text())["ranks"].items()}
    config = AutoConfig.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    rebuild_factorization(model, ranks)
    load_full_state_dict(model, read_hf_weights(str(path)))
    model.eval()
    return model
