"""Target architectures and the Lagrangian constraint that pushes :class:`L0Masks` towards them.

A target is explicit dims, a preset name (a shape of :data:`TARGET_PRESETS` or of
:data:`lit_accel.models.presets.PRESETS`), or a fraction of the parameters. A preset must be reachable from the
model: pruning keeps the head size and the number of query heads per KV head, and never grows a dimension.

Sheared-LLaMA adds ``lambda1 * (s - t) + lambda2 * (s - t)^2`` to the language-model loss for each mask group,
where ``s`` is the group's expected sparsity (``1 - expected kept / full``), ``t`` the target sparsity, ramped
linearly from 0 over ``warmup_steps``. The masks minimise the total loss; the multipliers *maximise* it (a
min-max game), so a multiplier grows while its constraint is violated and pushes the masks harder.

**How the ascent is done.** :class:`Lagrangian` registers a gradient hook on each multiplier that negates its
gradient. Any optimizer (AdamW included, which rejects a negative learning rate) then performs ascent on the
multipliers while it performs descent on everything else. Give the multipliers their own parameter group with no
weight decay (decay would pull them back to 0).

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    >>> target = PruningTarget(num_layers=1, num_kv_heads=1, intermediate_size=64, hidden_size=32)
    >>> masks = L0Masks(model)
    >>> masks.set_keep(target.keep(masks.shape))
    >>> lagrangian = Lagrangian(target)
    >>> loss, metrics = constraint_loss(masks, target, lagrangian, step=0, warmup_steps=100)
    >>> float(loss), metrics["target_sparsity/hidden"]
    (0.0, 0.0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lit_accel.models.presets import PRESETS
from lit_accel.pruning.masks import MASK_GROUPS, L0Masks, PrunableShape, count_params

__all__ = [
    "TARGET_PRESETS",
    "Lagrangian",
    "PruningTarget",
    "constraint_loss",
    "lagrangian_loss",
    "preset_dims",
    "ramped_target",
]

TARGET_PRESETS: dict[str, dict[str, int]] = {
    # 48.5% of llama-1b's 1.100B parameters (533.7M): 18 of 22 blocks, hidden 1536 (24 query heads of 64 over 3 KV
    # heads, the group size 8 of llama-1b), MLP 4096. The Sheared-LLaMA proportions (keep most layers, cut widths).
    "llama-1b-half": dict(
        num_hidden_layers=18,
        hidden_size=1536,
        num_attention_heads=24,
        num_key_value_heads=3,
        intermediate_size=4096,
    ),
    # 49.0% of llama-20m's 18.9M parameters (the quickstart model): 6 of 8 blocks, hidden 288, 3 query heads of 64
    # over 1 KV head (llama-20m's group size 3), MLP 704.
    "llama-20m-half": dict(
        num_hidden_layers=6,
        hidden_size=288,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=64,
        intermediate_size=704,
    ),
}
"""Target shapes for pruning, beside the model presets of :mod:`lit_accel.models.presets`: ``name ->
num_hidden_layers, hidden_size, num_attention_heads, num_key_value_heads, intermediate_size`` (the head size is
``hidden_size / num_attention_heads`` unless a ``head_dim`` is given)."""


def preset_dims(name: str) -> dict[str, int]:
    """The target dims of a preset: ``num_layers, num_heads, num_kv_heads, head_dim, intermediate_size, hidden_size``.

    ``name`` is looked up in :data:`TARGET_PRESETS`, then in :data:`lit_accel.models.presets.PRESETS`.

    Raises:
        ValueError: An unknown name; the message lists the allowed ones.

    Example:
        >>> preset_dims("llama-1b-half")["num_kv_heads"], preset_dims("llama-tiny")["hidden_size"]
        (3, 128)
    """
    cfg: dict[str, Any] | None = TARGET_PRESETS.get(name) or PRESETS.get(name)
    if cfg is None:
        allowed = sorted({*TARGET_PRESETS, *PRESETS})
        raise ValueError(f"PruningTarget: preset={name!r} is not a known preset; allowed presets: {allowed}")
    heads = int(cfg["num_attention_heads"])
    return {
        "num_layers": int(cfg["num_hidden_layers"]),
        "num_heads": heads,
        "num_kv_heads": int(cfg.get("num_key_value_heads") or heads),
        "head_dim": int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
        "intermediate_size": int(cfg["intermediate_size"]),
        "hidden_size": int(cfg["hidden_size"]),
    }


@dataclass
class PruningTarget:
    """The architecture to prune to: explicit dims, a preset name, or a fraction of the parameters (one of them).

    A preset's shape must be reachable from the model (checked by :meth:`keep`): its head size and its query heads
    per KV head equal the model's (pruning removes whole KV groups, see :mod:`~lit_accel.pruning.masks`), and no
    dimension is larger than the model's. Its vocabulary size is ignored (the vocabulary is never pruned).

    Example:
        >>> PruningTarget(num_layers=24, num_kv_heads=16, intermediate_size=5504, hidden_size=2048).groups()
        ('head_layer', 'mlp', 'heads', 'intermediate', 'hidden')
        >>> PruningTarget(param_ratio=0.5).groups()
        ('params',)
        >>> PruningTarget(preset="llama-1b-half").dims()["hidden_size"]
        1536
    """

    num_layers: int | None = None
    """Decoder blocks to keep; None keeps all."""
    num_kv_heads: int | None = None
    """KV heads (KV groups) to keep in every layer; the query heads follow (``num_kv_heads * group size``)."""
    intermediate_size: int | None = None
    """MLP channels to keep in every layer; None keeps all."""
    hidden_size: int | None = None
    """Residual-stream dims to keep; None keeps all."""
    param_ratio: float | None = None
    """Fraction of the model's parameters to keep, in (0, 1); excludes the explicit dims."""
    preset: str | None = None
    """A preset name (:data:`TARGET_PRESETS` or :data:`lit_accel.models.presets.PRESETS`) whose shape is the target;
    excludes the explicit dims and ``param_ratio``."""

    def __post_init__(self) -> None:
        dims = (self.num_layers, self.num_kv_heads, self.intermediate_size, self.hidden_size)
        if self.preset is not None:
            if self.param_ratio is not None or any(d is not None for d in dims):
                raise ValueError(
                    f"PruningTarget: preset={self.preset!r} cannot be combined with param_ratio={self.param_ratio} or "
                    f"explicit dims (num_layers, num_kv_heads, intermediate_size, hidden_size)={dims}; give one"
                )
            preset_dims(self.preset)  # an unknown name fails here, at construction
        elif self.param_ratio is not None:
            if any(d is not None for d in dims):
                raise ValueError(
                    f"PruningTarget: param_ratio={self.param_ratio} cannot be combined with explicit dims "
                    f"(num_layers, num_kv_heads, intermediate_size, hidden_size)={dims}; give one or the other"
                )
            if not 0.0 < self.param_ratio < 1.0:
                raise ValueError(f"PruningTarget: param_ratio must be in (0, 1), got {self.param_ratio}")
        elif all(d is None for d in dims):
            raise ValueError(
                "PruningTarget: give explicit dims (num_layers, num_kv_heads, ...), a preset or a param_ratio"
            )

    def dims(self) -> dict[str, int | None]:
        """The explicit dims of the target (from the preset when there is one); all None for a ratio target."""
        if self.preset is not None:
            d = preset_dims(self.preset)
            return {k: d[k] for k in ("num_layers", "num_kv_heads", "intermediate_size", "hidden_size")}
        return {
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "intermediate_size": self.intermediate_size,
            "hidden_size": self.hidden_size,
        }

    def groups(self) -> tuple[str, ...]:
        """The constraint groups: every mask group for explicit dims, ``("params",)`` for a ratio."""
        return ("params",) if self.param_ratio is not None else MASK_GROUPS

    def keep(self, shape: PrunableShape) -> dict[str, int]:
        """Units each deterministic mask group keeps (for :class:`L0Masks`); empty for a ratio target.

        Raises:
            ValueError: A dim is not an int in ``[1, full size]`` of the model (a target larger than the model); a
                preset whose heads cannot be reached from the model's; for a family whose config needs it (LLaMA,
                Gemma 2/3), a hidden size that is not a multiple of the kept query heads (transformers refuses to
                load such a config). The message names the argument and what is allowed.
        """
        if self.param_ratio is not None:
            return {}
        dims = self.dims()
        where = f"preset={self.preset!r}: " if self.preset is not None else ""
        if self.preset is not None:
            p = preset_dims(self.preset)
            if p["head_dim"] != shape.head_dim or p["num_heads"] != p["num_kv_heads"] * shape.kv_group_size:
                raise ValueError(
                    f"PruningTarget: preset={self.preset!r} has {p['num_heads']} query heads of size {p['head_dim']} "
                    f"over {p['num_kv_heads']} KV heads; pruning this model keeps its head size {shape.head_dim} and "
                    f"its {shape.kv_group_size} query heads per KV head (it removes whole KV groups), so a preset "
                    f"must have head size {shape.head_dim} and num_attention_heads = {shape.kv_group_size} x "
                    "num_key_value_heads; use explicit dims or another preset"
                )
        given = {
            "layers": ("num_layers", dims["num_layers"], shape.num_layers),
            "heads": ("num_kv_heads", dims["num_kv_heads"], shape.num_kv_heads),
            "intermediate": ("intermediate_size", dims["intermediate_size"], shape.intermediate_size),
            "hidden": ("hidden_size", dims["hidden_size"], shape.hidden_size),
        }
        out = {}
        for key, (arg, value, full) in given.items():
            if value is None:
                out[key] = full
            elif isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= full:
                raise ValueError(
                    f"PruningTarget: {where}{arg}={value!r} must be an int in [1, {full}] for this model "
                    "(a target cannot be larger than the model)"
                )
            else:
                out[key] = value
        heads = out["heads"] * shape.kv_group_size
        if shape.hidden_multiple_of_heads and out["hidden"] % heads:
            raise ValueError(
                f"PruningTarget: {where}hidden_size={out['hidden']} with num_kv_heads={out['heads']} "
                f"({heads} query heads); a {shape.arch} config needs hidden_size to be a multiple of "
                f"num_attention_heads (transformers refuses to load it otherwise): use a multiple of {heads}"
            )
        return out

    def sparsities(self, shape: PrunableShape) -> dict[str, float]:
        """Final target sparsity (``1 - kept / full``) of each group in :meth:`groups`."""
        if self.param_ratio is not None:
            return {"params": 1.0 - self.param_ratio}
        keep = self.keep(shape)
        return {
            "head_layer": 1 - keep["layers"] / shape.num_layers,
            "mlp": 1 - keep["layers"] / shape.num_layers,
            "heads": 1 - keep["heads"] / shape.num_kv_heads,
            "intermediate": 1 - keep["intermediate"] / shape.intermediate_size,
            "hidden": 1 - keep["hidden"] / shape.hidden_size,
        }


def ramped_target(final: float, step: int, warmup_steps: int, start: float = 0.0) -> float:
    """Target sparsity at ``step``: linear from ``start`` to ``final`` over ``warmup_steps``, then ``final``.

    Example:
        >>> ramped_target(0.5, 0, 10), ramped_target(0.5, 5, 10), ramped_target(0.5, 50, 10)
        (0.0, 0.25, 0.5)
    """
    if warmup_steps < 0:
        raise ValueError(f"ramped_target: warmup_steps must be >= 0, got {warmup_steps}")
    if warmup_steps == 0:
        return final
    return start + (final - start) * min(1.0, step / warmup_steps)


def lagrangian_loss(
    expected: torch.Tensor, target: float, lambda1: torch.Tensor, lambda2: torch.Tensor
) -> torch.Tensor:
    """``mean(lambda1 * (s - t) + lambda2 * (s - t)^2)`` over the entries of ``s = expected``.

    Example:
        >>> float(lagrangian_loss(torch.tensor([0.1, 0.3]), 0.5, torch.tensor(-1.0), torch.tensor(2.0)))
        0.5
    """
    gap = expected - target
    return (lambda1 * gap + lambda2 * gap.pow(2)).mean()


class Lagrangian(nn.Module):
    """The multipliers ``lambda_1/<group>`` and ``lambda_2/<group>`` (start 0), trained by gradient ascent.

    A hook on every multiplier negates its gradient, so an ordinary optimizer step is an ascent step for them
    (see the module docstring). The hooks are re-registered by the constructor, so a copy made by rebuilding the
    module and loading a ``state_dict`` ascends too.

    Args:
        target: The target; one pair of multipliers per group of :meth:`PruningTarget.groups`.
    """

    def __init__(self, target: PruningTarget) -> None:
        super().__init__()
        # Shape (1,), not (): DeepSpeed's engine broadcasts parameters through a byte view, which a 0-dim tensor
        # cannot take ("self.dim() cannot be 0 to view Float as Byte").
        self.lambda_1 = nn.ParameterDict({g: nn.Parameter(torch.zeros(1)) for g in target.groups()})
        self.lambda_2 = nn.ParameterDict({g: nn.Parameter(torch.zeros(1)) for g in target.groups()})
        for p in self.parameters():
            p.register_hook(torch.neg)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # Checkpoints written before the multipliers became (1,) hold 0-dim tensors.
        for key in [k for k in state_dict if k.startswith(prefix) and state_dict[k].dim() == 0]:
            state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def constraint_loss(
    masks: L0Masks, target: PruningTarget, lagrangian: Lagrangian, step: int, warmup_steps: int
) -> tuple[torch.Tensor, dict[str, float]]:
    """The Lagrangian penalty of ``masks`` against ``target`` at ``step``, and metrics to log.

    Per group, ``s`` is the expected sparsity: for ``head_layer``, ``mlp`` and ``hidden`` one value; for ``heads``
    and ``intermediate`` one per layer (the penalty is their mean, as in LLM-Shearing); for ``params`` (a ratio
    target) ``1 - expected parameters / full parameters``. The target sparsity is :func:`ramped_target`.

    Args:
        masks: The masks being learned.
        target: The target architecture.
        lagrangian: Multipliers built for ``target``.
        step: Optimizer steps taken so far (ramps the target).
        warmup_steps: Steps over which the target ramps from 0 to its final sparsity.

    Returns:
        ``(loss, metrics)``; metrics hold ``expected_sparsity/<group>``, ``target_sparsity/<group>``,
        ``lambda_1/<group>``, ``lambda_2/<group>`` and ``expected_params``.
    """
    scores = masks.expected_scores()
    shape = masks.shape
    full = {
        "head_layer": shape.num_layers,
        "mlp": shape.num_layers,
        "heads": shape.num_kv_heads,
        "intermediate": shape.intermediate_size,
        "hidden": shape.hidden_size,
    }
    expected_params = count_params(shape, scores)
    metrics: dict[str, float] = {"expected_params": float(expected_params.detach())}
    loss = torch.zeros((), device=expected_params.device)
    for group, final in target.sparsities(shape).items():
        if group == "params":
            ones = {k: torch.ones_like(v) for k, v in scores.items()}
            s = 1 - expected_params / count_params(shape, ones)
        else:
            s = 1 - scores[group].sum(-1) / full[group]
        t = ramped_target(final, step, warmup_steps)
        l1, l2 = lagrangian.lambda_1[group].squeeze(0), lagrangian.lambda_2[group].squeeze(0)
        loss = loss + lagrangian_loss(s, t, l1, l2)
        metrics[f"expected_sparsity/{group}"] = float(s.detach().mean())
        metrics[f"target_sparsity/{group}"] = t
        metrics[f"lambda_1/{group}"] = float(l1.detach())
        metrics[f"lambda_2/{group}"] = float(l2.detach())
    return loss, metrics
