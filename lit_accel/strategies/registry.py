"""Strategy names: registering ours in Lightning's ``StrategyRegistry``, resolving a name, and a clear error for an
unknown one that lists ours and Lightning's.

Example:
    >>> import lit_accel.strategies
    >>> try:
    ...     resolve_strategy("lit_deepspeed_stage_4")
    ... except ValueError as err:
    ...     print(str(err).split("?")[0] + "?")
    Unknown strategy 'lit_deepspeed_stage_4'. Did you mean 'lit_deepspeed_stage_3'?
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.strategies import Strategy, StrategyRegistry

from lit_accel.strategies.ddp import LIT_DDP_STRATEGIES, register_ddp_strategies
from lit_accel.strategies.deepspeed import LIT_DEEPSPEED_STRATEGIES, LitDeepSpeedStrategy

__all__ = [
    "check_cli_strategy",
    "check_strategy_name",
    "lightning_strategy_names",
    "lit_strategy_names",
    "register_strategies",
    "resolve_strategy",
    "unknown_strategy_message",
]


def register_strategies() -> None:
    """Registers every lit_accel strategy name in Lightning's ``StrategyRegistry`` (idempotent)."""
    LitDeepSpeedStrategy.register_strategies(StrategyRegistry)
    register_ddp_strategies(StrategyRegistry)


def lit_strategy_names() -> list[str]:
    """lit_accel's registered strategy names."""
    return [*LIT_DEEPSPEED_STRATEGIES, *LIT_DDP_STRATEGIES]


def lightning_strategy_names() -> list[str]:
    """Every other name the Trainer accepts (``auto`` and Lightning's registry), sorted."""
    ours = set(lit_strategy_names())
    return ["auto", *sorted(n for n in StrategyRegistry.available_strategies() if n not in ours)]


def unknown_strategy_message(name: str) -> str:
    """The error text for an unknown strategy ``name``: a close match if any, then ours and Lightning's names."""
    ours, theirs = lit_strategy_names(), lightning_strategy_names()
    close = difflib.get_close_matches(name.lower(), ours + theirs, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return (
        f"Unknown strategy {name!r}.{hint} lit_accel strategies: {', '.join(ours)}. Lightning strategies:"
        f" {', '.join(theirs)}. Or give a class: strategy: {{class_path: lit_accel.strategies.LitDeepSpeedStrategy,"
        " init_args: {stage: 3, config: {...}}}."
    )


def check_strategy_name(strategy: Any) -> None:
    """Raises for a strategy *name* that neither lit_accel nor Lightning knows; anything else passes.

    Raises:
        ValueError: With :func:`unknown_strategy_message`.
    """
    if not isinstance(strategy, str):
        return
    name = strategy.lower()
    if name != "auto" and name not in StrategyRegistry:
        raise ValueError(unknown_strategy_message(strategy))


def resolve_strategy(name: str, **init_args: Any) -> Strategy:
    """Builds the strategy registered as ``name``, with ``init_args`` overriding its registered arguments.

    Example: ``resolve_strategy("lit_deepspeed_stage_3", config={"zero_optimization": {...}})``.

    Raises:
        ValueError: For an unknown name (the message lists ours and Lightning's).
    """
    check_strategy_name(name)
    if name.lower() == "auto":
        raise ValueError("resolve_strategy('auto'): 'auto' is chosen by the Trainer; pass it to the Trainer as is.")
    entry = StrategyRegistry[name.lower()]
    strategy = entry["strategy"](**{**entry["init_params"], **init_args})
    assert isinstance(strategy, Strategy)
    return strategy


def check_cli_strategy(config: Mapping[str, Any] | Any, subcommand: str | None = None) -> None:
    """Checks ``trainer.strategy`` of a LightningCLI config (call it from ``before_instantiate_classes``).

    Args:
        config: ``cli.config`` (a jsonargparse Namespace or a dict).
        subcommand: ``cli.subcommand`` (``fit``, ...), whose section holds the trainer's settings; ``None`` when the
            CLI runs without subcommands.
    """
    section = _get(config, subcommand) if subcommand else config
    check_strategy_name(_get(_get(section, "trainer"), "strategy"))


def _get(node: Any, key: str) -> Any:
    if node is None:
        return None
    if isinstance(node, Mapping):
        return node.get(key)
    return getattr(node, key, None)
