"""DeepSpeed config keys that a callback cannot work with, found before any process group or model exists.

Each rule names a callback class (matched by name along each callback's class hierarchy, so the callbacks need
not be imported), a key of the DeepSpeed config (dotted path), when its value conflicts, why, and what to do.
:class:`~lit_accel.strategies.LitDeepSpeedStrategy` checks them in ``setup_environment``; other code (a callback
under Lightning's own ``DeepSpeedStrategy``) can call :func:`check_callback_conflicts` itself.

Example:
    >>> from lit_accel.callbacks import StructuredPruning
    >>> check_callback_conflicts({"zero_optimization": {"stage": 3}}, [StructuredPruning(param_ratio=0.5)])
    >>> check_callback_conflicts({"optimizer": {"type": "AdamW"}}, [StructuredPruning(param_ratio=0.5)])
    Traceback (most recent call last):
    ...
    ValueError: DeepSpeed config key optimizer={'type': 'AdamW'} conflicts with callback StructuredPruning: ...
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["CONFLICTS", "MISSING", "ConfigConflict", "check_callback_conflicts", "config_value", "offloads"]


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


MISSING: Any = _Missing()
"""The value of a config key that is not set."""


@dataclass(frozen=True)
class ConfigConflict:
    """One DeepSpeed config key that one callback cannot work with."""

    callback: str
    """Class name of the callback (a subclass matches too)."""
    key: str
    """Dotted path in the DeepSpeed config, e.g. ``zero_optimization.offload_param``."""
    applies: Callable[[Any], bool]
    """Whether the key's value (``MISSING`` when unset) conflicts."""
    reason: str
    """Why they conflict."""
    fix: str
    """What the user can do."""


def offloads(value: Any) -> bool:
    """Whether an ``offload_param`` / ``offload_optimizer`` section offloads (its device is not ``none``)."""
    if value is MISSING or value is None or value is False:
        return False
    if isinstance(value, Mapping):
        return str(value.get("device", "none")).lower() not in ("none", "")
    return bool(value)


def _is_set(value: Any) -> bool:
    return value is not MISSING and value is not None


CONFLICTS: tuple[ConfigConflict, ...] = (
    ConfigConflict(
        callback="SemiStructuredSparsity",
        key="zero_optimization.offload_param",
        applies=offloads,
        reason=(
            "its 2:4 layers need their full weights on the accelerator: every mask refresh gathers each target weight "
            "whole to compute its mask there, and each sparse layer keeps a full-size mask (and, on the cuSPARSELt "
            "path, a compressed copy of the weight) resident next to it, which defeats offloading the parameters"
        ),
        fix=(
            "remove zero_optimization.offload_param (offload_parameters=False; strategy lit_deepspeed_stage_3 or "
            "lit_deepspeed_stage_2_offload instead of lit_deepspeed_stage_3_offload), or train without "
            "SemiStructuredSparsity"
        ),
    ),
    ConfigConflict(
        callback="StructuredPruning",
        key="optimizer",
        applies=_is_set,
        reason=(
            "with an optimizer in the DeepSpeed config, DeepSpeed builds it and Lightning never calls the "
            "LightningModule's configure_optimizers, where StructuredPruning adds the parameter groups of its masks "
            "and Lagrange multipliers: the model would train without ever being pruned"
        ),
        fix="remove `optimizer` from the DeepSpeed config; the LightningModule's configure_optimizers builds it",
    ),
)
"""The known conflicts (extend it for new callbacks)."""


def config_value(config: Mapping[str, Any], key: str) -> Any:
    """The value at dotted ``key`` in ``config``, or :data:`MISSING`."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return MISSING
        node = node[part]
    return node


def _class_names(obj: object) -> set[str]:
    return {cls.__name__ for cls in type(obj).__mro__}


def check_callback_conflicts(
    config: Mapping[str, Any] | None,
    callbacks: Iterable[object],
    rules: Iterable[ConfigConflict] = CONFLICTS,
) -> None:
    """Raises if a key of the DeepSpeed ``config`` conflicts with one of ``callbacks``.

    Raises:
        ValueError: Naming each conflicting key with its value, the callback, the reason and the fix.
    """
    if not config:
        return
    callbacks = list(callbacks)
    problems = []
    for rule in rules:
        if not any(rule.callback in _class_names(cb) for cb in callbacks):
            continue
        value = config_value(config, rule.key)
        if rule.applies(value):
            problems.append(
                f"DeepSpeed config key {rule.key}={value!r} conflicts with callback {rule.callback}: {rule.reason}."
                f" Fix: {rule.fix}."
            )
    if problems:
        raise ValueError("\n".join(problems))
