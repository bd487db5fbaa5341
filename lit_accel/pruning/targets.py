"""Target architectures and the Lagrangian constraint that pushes :class:`L0Masks` towards them.

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

import torch
from torch import nn

from lit_accel.pruning.masks import MASK_GROUPS, L0Masks, PrunableShape, count_params

__all__ = ["Lagrangian", "PruningTarget", "constraint_loss", "lagrangian_loss", "ramped_target"]


@dataclass
class PruningTarget:
    """The architecture to prune to: explicit dims, or a fraction of the parameters (not both).

    Example:
        >>> PruningTarget(num_layers=24, num_kv_heads=16, intermediate_size=5504, hidden_size=2048).groups()
        ('head_layer', 'mlp', 'heads', 'intermediate', 'hidden')
        >>> PruningTarget(param_ratio=0.5).groups()
        ('params',)
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

    def __post_init__(self) -> None:
        dims = (self.num_layers, self.num_kv_heads, self.intermediate_size, self.hidden_size)
        if self.param_ratio is not None:
            if any(d is not None for d in dims):
                raise ValueError(
                    f"PruningTarget: param_ratio={self.param_ratio} cannot be combined with explicit dims "
                    f"(num_layers, num_kv_heads, intermediate_size, hidden_size)={dims}; give one or the other"
                )
            if not 0.0 < self.param_ratio < 1.0:
                raise ValueError(f"PruningTarget: param_ratio must be in (0, 1), got {self.param_ratio}")
        elif all(d is None for d in dims):
            raise ValueError("PruningTarget: give explicit dims (num_layers, num_kv_heads, ...) or a param_ratio")

    def groups(self) -> tuple[str, ...]:
        """The constraint groups: every mask group for explicit dims, ``("params",)`` for a ratio."""
        return ("params",) if self.param_ratio is not None else MASK_GROUPS

    def keep(self, shape: PrunableShape) -> dict[str, int]:
        """Units each deterministic mask group keeps (for :class:`L0Masks`); empty for a ratio target.

        Raises:
            ValueError: A dim is not an int in ``[1, full size]`` of the model; the message names it.
        """
        if self.param_ratio is not None:
            return {}
        given = {
            "layers": ("num_layers", self.num_layers, shape.num_layers),
            "heads": ("num_kv_heads", self.num_kv_heads, shape.num_kv_heads),
            "intermediate": ("intermediate_size", self.intermediate_size, shape.intermediate_size),
            "hidden": ("hidden_size", self.hidden_size, shape.hidden_size),
        }
        out = {}
        for key, (arg, value, full) in given.items():
            if value is None:
                out[key] = full
            elif not isinstance(value, int) or not 1 <= value <= full:
                raise ValueError(f"PruningTarget: {arg}={value!r} must be an int in [1, {full}] for this model")
            else:
                out[key] = value
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
        self.lambda_1 = nn.ParameterDict({g: nn.Parameter(torch.zeros(())) for g in target.groups()})
        self.lambda_2 = nn.ParameterDict({g: nn.Parameter(torch.zeros(())) for g in target.groups()})
        for p in self.parameters():
            p.register_hook(torch.neg)


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
        l1, l2 = lagrangian.lambda_1[group], lagrangian.lambda_2[group]
        loss = loss + lagrangian_loss(s, t, l1, l2)
        metrics[f"expected_sparsity/{group}"] = float(s.detach().mean())
        metrics[f"target_sparsity/{group}"] = t
        metrics[f"lambda_1/{group}"] = float(l1.detach())
        metrics[f"lambda_2/{group}"] = float(l2.detach())
    return loss, metrics
