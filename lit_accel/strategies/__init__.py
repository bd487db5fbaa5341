"""Strategy plugins: ``LitDeepSpeedStrategy``, ``lit_ddp`` and their registered names.

Importing this package registers, in Lightning's ``StrategyRegistry``:

=================================  ============================================================
name                               what it is
=================================  ============================================================
``lit_deepspeed_stage_1``          ZeRO-1 (optimizer states partitioned)
``lit_deepspeed_stage_2``          ZeRO-2 (+ gradients)
``lit_deepspeed_stage_3``          ZeRO-3 (+ parameters)
``lit_deepspeed_stage_2_offload``  ZeRO-2, optimizer states and step on the CPU
``lit_deepspeed_stage_3_offload``  ZeRO-3, optimizer and parameters on the CPU
``lit_ddp``                        Lightning's ``DDPStrategy`` with gradients as bucket views and 100 MB buckets
=================================  ============================================================

the DeepSpeed names all :class:`LitDeepSpeedStrategy` with LLM defaults (bf16, overlap_comm, contiguous gradients,
bucket sizes and stage-3 thresholds from the model's size), every DeepSpeed setting overridable; ``lit_ddp`` in
:mod:`lit_accel.strategies.ddp`. DeepSpeed itself is imported only when a strategy is set up, so importing this
package is cheap.

Example:
    >>> from lightning.pytorch.strategies import StrategyRegistry
    >>> import lit_accel.strategies
    >>> StrategyRegistry["lit_deepspeed_stage_3_offload"]["init_params"]
    {'stage': 3, 'offload_optimizer': True, 'offload_parameters': True}
    >>> # L.Trainer(strategy="lit_deepspeed_stage_2", ...) builds a LitDeepSpeedStrategy(stage=2)
"""

from lit_accel.strategies.conflicts import CONFLICTS, ConfigConflict, check_callback_conflicts
from lit_accel.strategies.ddp import LIT_DDP_STRATEGIES
from lit_accel.strategies.deepspeed import LIT_DEEPSPEED_STRATEGIES, LitDeepSpeedStrategy
from lit_accel.strategies.registry import (
    check_cli_strategy,
    check_strategy_name,
    lightning_strategy_names,
    lit_strategy_names,
    register_strategies,
    resolve_strategy,
    unknown_strategy_message,
)
from lit_accel.strategies.sizing import ModelSize, derived_zero_settings, model_size

register_strategies()

__all__ = [
    "CONFLICTS",
    "LIT_DDP_STRATEGIES",
    "LIT_DEEPSPEED_STRATEGIES",
    "ConfigConflict",
    "LitDeepSpeedStrategy",
    "ModelSize",
    "check_callback_conflicts",
    "check_cli_strategy",
    "check_strategy_name",
    "derived_zero_settings",
    "lightning_strategy_names",
    "lit_strategy_names",
    "model_size",
    "register_strategies",
    "resolve_strategy",
    "unknown_strategy_message",
]
