"""The factorised linear and its accounting: :class:`LowRankLinear` (``y = up(down(x))``), the per-layer
:class:`FactorizationReport` and its table, and the model-wide rank and FLOPs counts.

These are what the SVD code (:mod:`lit_accel.lowrank.factorize`), the directory format
(:mod:`lit_accel.lowrank.factorize_io`) and the callback share; nothing here computes a factorisation.

Example:
    >>> layer = LowRankLinear(64, 48, rank=8)
    >>> layer.flops_per_token(), factorization_ranks(nn.Sequential(layer))
    (1792, {'0': 8})
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lit_accel.models.structure import StructurePatterns, get_structure, linear_in_out_features
from lit_accel.models.surgery import replace_module

__all__ = [
    "DenseType",
    "FactorizationReport",
    "LowRankLinear",
    "dense_placeholders",
    "factorization_ranks",
    "factorized_layers",
    "format_report",
    "model_matmul_flops_per_token",
]

DenseType = Literal["linear", "conv1d"]
"""What a :class:`LowRankLinear` merges back into: ``nn.Linear`` or GPT-2's ``Conv1D``."""


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
    """A text table of reports (from :func:`~lit_accel.lowrank.factorize.apply_factorization`), one row per layer.

    The last row holds the totals.

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
def dense_placeholders(model: nn.Module) -> Iterator[dict[str, LowRankLinear]]:
    """Temporarily swaps every :class:`LowRankLinear` for a meta-device ``nn.Linear`` of the same shape.

    :func:`~lit_accel.models.structure.get_structure` only knows dense linears (and ``base_layer`` wrappers), so a
    factorised model would fail its role checks; seen through placeholders it has its original structure again,
    which makes :func:`~lit_accel.lowrank.factorize.apply_factorization` idempotent and lets the FLOPs count see
    every layer. Meta tensors cost no memory. Yields name -> the factorised layer that the placeholder stands for.
    """
    found = factorized_layers(model)
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


def factorized_layers(model: nn.Module) -> dict[str, LowRankLinear]:
    """Qualified name -> every :class:`LowRankLinear` in ``model``, collected up front.

    Collecting first lets the caller replace modules in the loop (replacing them while iterating
    ``named_modules()`` would skip or revisit some).

    Example:
        >>> list(factorized_layers(nn.Sequential(nn.Linear(8, 8), LowRankLinear(8, 8, rank=2))))
        ['1']
    """
    return {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


def factorization_ranks(model: nn.Module) -> dict[str, int]:
    """Qualified name -> rank of every :class:`LowRankLinear` in ``model``.

    Example:
        >>> factorization_ranks(nn.Sequential(LowRankLinear(8, 8, rank=2)))
        {'0': 2}
    """
    return {name: m.rank for name, m in factorized_layers(model).items()}


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
    with dense_placeholders(model) as factorized:
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
