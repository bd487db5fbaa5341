"""SVD factorisation: replace large linears by two thin ones from their truncated SVD.

A linear ``y = x W^T + b`` with ``W`` of shape ``[out, in]`` becomes ``y = up(down(x))`` where ``down`` is
``[r, in]`` and ``up`` is ``[r -> out]`` (with the bias), from the truncated SVD ``W ~= U_r S_r V_r^T``. That saves
parameters and FLOPs whenever ``r * (in + out) < in * out``; by Eckart-Young the truncation is the best rank-``r``
approximation in the Frobenius norm, with relative error ``sqrt(sum of dropped S_i^2) / ||W||_F``.

Functions (pure, usable without Lightning; :mod:`lit_accel.lowrank.factorize_callback` decides *when*):

- :func:`factorize_linear`: one ``nn.Linear`` / GPT-2 ``Conv1D`` ->
  :class:`~lit_accel.lowrank.factorize_layer.LowRankLinear` + a
  :class:`~lit_accel.lowrank.factorize_layer.FactorizationReport`.
- :func:`apply_factorization`: the matched linears of a model, in place
  (:func:`~lit_accel.lowrank.factorize_layer.format_report` prints the result).
- :func:`merge_factorization`: back to dense layers, i.e. a plain Hugging Face model (exact logits, no size saving).
- :func:`rebuild_factorization`: give a model the factorised *structure* of saved ranks, before loading weights.

Saving and loading (merged, or keeping the factors) is :mod:`lit_accel.lowrank.factorize_io`.

Distributed: under DeepSpeed ZeRO-3 every weight is gathered before it is read (``modifier_rank=None``), and
the new factors are written with ``modifier_rank=0``, so whatever each rank computed, rank 0's values are the ones
partitioned to all ranks. The *rank* chosen from ``energy`` decides parameter shapes, so it is broadcast from
rank 0 when a process group is initialised: the SVD of the same gathered matrix on the same device type is
deterministic in practice, but a shape that differs between ranks would be fatal, so it is not left to chance.
Under DDP and ZeRO-1/2 the strategy broadcasts rank 0's parameter values when it wraps the model.

Families: every one :func:`~lit_accel.models.structure.get_structure` knows; Phi-3's fused ``qkv_proj`` and
``gate_up_proj`` are factorised as one matrix each; mixture-of-experts MLPs (Mixtral, Qwen3-MoE) hold 3-D expert
tensors, not linears, so their experts stay dense (see :func:`~lit_accel.models.surgery.match_linears`).

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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lit_accel.lowrank.factorize_layer import (
    DenseType,
    FactorizationReport,
    LowRankLinear,
    dense_placeholders,
    factorized_layers,
)
from lit_accel.models.params import gathered, world_size
from lit_accel.models.structure import StructurePatterns, linear_in_out_features
from lit_accel.models.surgery import match_linears, replace_module

__all__ = [
    "apply_factorization",
    "factorize_linear",
    "merge_factorization",
    "rebuild_factorization",
]

_FLOAT64_MAX_NUMEL = 1 << 22
# Matrices up to 4M entries (2048 x 2048) are decomposed in float64: it costs well under a second there and makes
# the reported errors exact to print precision; larger ones use float32, whose SVD is accurate to ~1e-6 relative.


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


def _broadcast_int(value: int) -> int:
    """Rank 0's ``value`` on every rank (a no-op without a process group)."""
    if world_size() == 1:
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
    energy_kept = _energy_kept(svd, rank)
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
        model: A Hugging Face causal LM of a supported family (LLaMA, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3, OLMo 2,
            Mixtral, Qwen3-MoE, GPT-2), or any model with ``patterns``.
        targets: ``"attention"``, ``"mlp"``, ``"all-linear"``, role names (``q``, ``k``, ``v``, ``o``, ``gate``,
            ``up``, ``down``; GPT-2 and Phi-3 ``qkv``, Phi-3 ``gate_up``), module-name suffixes or regular
            expressions (see :func:`~lit_accel.models.surgery.match_linears`). Ignored when ``rank`` is a dict.
            Phi-3's fused ``qkv_proj`` / ``gate_up_proj`` are factorised whole. In Mixtral and Qwen3-MoE the
            experts' weights are 3-D tensors, not linears: they stay dense (a warning names the blocks), the router
            is never factorised, and ``targets`` that select nothing else are a ``ValueError``.
        rank: One rank for every target (``1 <= rank < min(in, out)`` for each), or a dict qualified layer name ->
            rank that factorises exactly those layers (e.g. the ranks saved by
            :func:`~lit_accel.lowrank.factorize_io.save_factorized`; a saved rank may be ``min(in, out)`` and is
            never skipped).
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
    with dense_placeholders(model) as already:
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
            chosen = match_linears(model, targets, patterns=patterns, technique="SVD factorisation")
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
    after (a checkpoint's state dict, a :func:`~lit_accel.lowrank.factorize_io.save_factorized` directory). This is
    how a resumed run gets the structure of the run that wrote the checkpoint, whatever ranks ``energy`` would
    choose on its new weights.

    Args:
        model: The model to change in place.
        ranks: Qualified layer name -> rank, as :func:`~lit_accel.lowrank.factorize_layer.factorization_ranks` returns.

    Raises:
        ValueError: A name that is not a linear or factorised layer of the model, or a rank out of range.
    """
    for name, layer in factorized_layers(model).items():
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
# Merging back
# --------------------------------------------------------------------------------------------------------------


def merge_factorization(model: nn.Module) -> list[str]:
    """Replaces every :class:`LowRankLinear` by a dense layer with ``W = up.weight @ down.weight``, in place.

    The dense layer is an ``nn.Linear``, or a GPT-2 ``Conv1D`` where the original was one, so the model is a plain
    Hugging Face model again: ``save_pretrained`` writes a directory that ``AutoModelForCausalLM.from_pretrained``
    loads, with the factorised model's logits (up to float rounding). The size saving is gone.
    :func:`~lit_accel.lowrank.factorize_io.save_merged` writes the same directory without changing the model. Under
    ZeRO-3 call it on every rank inside the partitioning context.

    Args:
        model: A model holding factorised layers.

    Returns:
        The names of the merged layers.

    Example:
        >>> model = nn.Sequential(LowRankLinear(8, 4, rank=2))
        >>> merge_factorization(model), type(model[0]).__name__
        (['0'], 'Linear')
    """
    layers = factorized_layers(model)
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
