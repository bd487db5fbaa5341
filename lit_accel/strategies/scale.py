"""DeepSpeed settings that matter at scale, as ``LitDeepSpeedStrategy`` arguments: ZeRO++ (quantised weights and
gradients, hierarchical partitioning) and the data type of gradient reduction; with checks of the combinations
DeepSpeed does not support, made before any process starts.

=================================  =================================================  ===========  ==================
argument                           DeepSpeed key                                      ZeRO stage   DeepSpeed default
=================================  =================================================  ===========  ==================
``zero_quantized_weights``         ``zero_optimization.zero_quantized_weights``       3            ``false``
``zero_quantized_gradients``       ``zero_optimization.zero_quantized_gradients``     3            ``false``
``zero_hpz_partition_size``        ``zero_optimization.zero_hpz_partition_size``      3            ``1`` (off)
``communication_data_type``        ``communication_data_type`` (top level)            any          the model's dtype
=================================  =================================================  ===========  ==================

What each does (DeepSpeed 0.19.8, ``deepspeed/runtime/zero/config.py``, ``runtime/engine.py``, ``runtime/zero/``):

* ``zero_quantized_weights`` (qwZ): ZeRO-3 all-gathers each parameter quantised to int8 (blocks of at most 16k
  elements, one scale each) and dequantises it after the gather; the master weights are not quantised. It goes
  through DeepSpeed's CUDA ``quantizer`` op (``CUDAQuantizer``, compiled on first use), so not on the CPU.
* ``zero_quantized_gradients`` (qgZ): ZeRO-3 reduces gradients with an all-to-all in int4, within each node first,
  then across nodes (``all_to_all_quant_reduce``), in place of the reduce-scatter. DeepSpeed takes it only with more
  than one node, counting nodes as ``world_size // visible devices``, and needs ``reduce_scatter`` on.
* ``zero_hpz_partition_size`` (hpZ): ZeRO-3 keeps a second copy of each parameter partitioned over groups of this
  many consecutive ranks, so the all-gathers of the backward pass stay inside a group; with the size = GPUs per node
  those are intra-node (NVLink) gathers. It costs that secondary partition's memory on every GPU. It must divide the
  world size. ``"node"`` here means the devices per node (Lightning's ``devices``), resolved at set-up.
* ``communication_data_type``: the dtype gradients are cast to for reduction (``"fp32"``, ``"bf16"``, ``"fp16"``);
  unset, the model's (bf16 under ``bf16-mixed``). ``"fp32"`` doubles the bytes sent and sums in fp32.

Refused at construction: a ZeRO++ key (given as an argument or in ``config``) with a ZeRO stage other than 3, where
DeepSpeed ignores it or half applies it; ``zero_quantized_gradients`` with ``reduce_scatter`` off (a DeepSpeed
assertion); ``zero_quantized_weights`` with DeepSpeed's ``torch_autocast`` (another assertion). Refused at set-up:
quantised weights or gradients on the CPU, a hpZ size that does not divide the world size, and quantised gradients
on GPUs when the devices per node differ from the visible ones (DeepSpeed's node count would be wrong).

Example:
    >>> ScaleSettings(zero_quantized_weights=True, zero_hpz_partition_size=8).config()
    {'zero_optimization': {'zero_quantized_weights': True, 'zero_hpz_partition_size': 8}}
    >>> ScaleSettings(communication_data_type="FP32").config()
    {'communication_data_type': 'fp32'}
    >>> check_scale_config({"zero_optimization": {"stage": 2, "zero_quantized_gradients": True}})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: LitDeepSpeedStrategy zero_optimization.zero_quantized_gradients=True (ZeRO++) needs ZeRO stage 3, ...
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "COMMUNICATION_DATA_TYPES",
    "HPZ_PER_NODE",
    "ZEROPP_KEYS",
    "ScaleSettings",
    "check_flags",
    "check_scale_config",
    "check_sizes",
    "forget_previous_hpz_group",
    "resolve_for_world",
]

COMMUNICATION_DATA_TYPES = ("fp32", "bf16", "fp16")
"""The values DeepSpeed accepts for ``communication_data_type`` (``runtime/config.py``, case-insensitive)."""
HPZ_PER_NODE = "node"
"""``zero_hpz_partition_size: node``: one hpZ group per node, resolved to the devices per node at set-up."""
ZEROPP_KEYS = (
    "zero_quantized_weights",
    "zero_quantized_nontrainable_weights",
    "zero_quantized_gradients",
    "zero_hpz_partition_size",
)
"""The ``zero_optimization`` keys of ZeRO++, read by DeepSpeed's ZeRO-3 code only."""
_QUANTISED = ("zero_quantized_weights", "zero_quantized_nontrainable_weights", "zero_quantized_gradients")


@dataclass(frozen=True)
class ScaleSettings:
    """The scale settings given as ``LitDeepSpeedStrategy`` arguments, validated, and their DeepSpeed config.

    ``False``/``None`` means "not given": nothing is written, DeepSpeed's default (or a key of ``config``) applies.

    Raises:
        ValueError: Naming the argument, the value and what is allowed.

    Example:
        >>> ScaleSettings(zero_hpz_partition_size="node").config()
        {'zero_optimization': {'zero_hpz_partition_size': 'node'}}
    """

    zero_quantized_weights: bool = False
    zero_quantized_gradients: bool = False
    zero_hpz_partition_size: int | Literal["node"] | None = None
    communication_data_type: Literal["fp32", "bf16", "fp16"] | None = None

    def __post_init__(self) -> None:
        check_flags({"zero_quantized_weights": self.zero_quantized_weights})
        check_flags({"zero_quantized_gradients": self.zero_quantized_gradients})
        _check_hpz("zero_hpz_partition_size", self.zero_hpz_partition_size)
        _check_dtype(self.communication_data_type)

    def config(self) -> dict[str, Any]:
        """The DeepSpeed config these settings give (only what was given), to merge under the user's ``config``."""
        zero: dict[str, Any] = {}
        if self.zero_quantized_weights:
            zero["zero_quantized_weights"] = True
        if self.zero_quantized_gradients:
            zero["zero_quantized_gradients"] = True
        if self.zero_hpz_partition_size is not None:
            zero["zero_hpz_partition_size"] = self.zero_hpz_partition_size
        out: dict[str, Any] = {"zero_optimization": zero} if zero else {}
        if self.communication_data_type is not None:
            out["communication_data_type"] = self.communication_data_type.lower()
        return out


def check_flags(flags: Mapping[str, Any]) -> None:
    """Raises unless every value is a ``bool``.

    Example:
        >>> check_flags({"overlap_comm": "yes"})
        Traceback (most recent call last):
        ...
        ValueError: LitDeepSpeedStrategy overlap_comm='yes'; allowed: True or False.
    """
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(f"LitDeepSpeedStrategy {name}={value!r}; allowed: True or False.")


def check_sizes(sizes: Mapping[str, Any]) -> None:
    """Raises unless every size is ``None`` or a number of elements (``reduce_bucket_size`` above 0, as DeepSpeed
    requires; the others at least 0).

    Example:
        >>> check_sizes({"reduce_bucket_size": 0})
        Traceback (most recent call last):
        ...
        ValueError: LitDeepSpeedStrategy reduce_bucket_size=0; allowed: a number of elements > 0 or None.
    """
    for name, value in sizes.items():
        least = 1 if name == "reduce_bucket_size" else 0
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value < least):
            allowed = "> 0" if least else ">= 0"
            raise ValueError(f"LitDeepSpeedStrategy {name}={value!r}; allowed: a number of elements {allowed} or None.")


def check_scale_config(config: Mapping[str, Any]) -> None:
    """Checks the ZeRO++ keys of a merged DeepSpeed config (an init argument or a key of ``config``) against what
    DeepSpeed supports: ZeRO stage 3; quantised gradients with ``reduce_scatter``; quantised weights without
    DeepSpeed's ``torch_autocast``.

    Raises:
        ValueError: Naming the key, its value and what to change.
    """
    zero = config.get("zero_optimization")
    if not isinstance(zero, Mapping):
        zero = {}
    _check_hpz("zero_optimization.zero_hpz_partition_size", zero.get("zero_hpz_partition_size"))
    given = {k: zero[k] for k in _QUANTISED if zero.get(k)}
    if zero.get("zero_hpz_partition_size") not in (None, 1):
        given["zero_hpz_partition_size"] = zero["zero_hpz_partition_size"]
    stage = zero.get("stage", 0)
    for key, value in given.items():
        if str(stage) != "3":
            raise ValueError(
                f"LitDeepSpeedStrategy zero_optimization.{key}={value!r} (ZeRO++) needs ZeRO stage 3, got"
                f" stage={stage}: DeepSpeed applies the ZeRO++ keys in its stage-3 code only. Use stage=3 or leave"
                " the key out."
            )
    if given.get("zero_quantized_gradients") and zero.get("reduce_scatter", True) is False:
        raise ValueError(
            "LitDeepSpeedStrategy zero_quantized_gradients=True needs reduce_scatter=True (got False): DeepSpeed's"
            " ZeRO-3 asserts it for the quantised all-to-all reduction."
        )
    autocast = config.get("torch_autocast")
    if given.get("zero_quantized_weights") and isinstance(autocast, Mapping) and autocast.get("enabled"):
        raise ValueError(
            "LitDeepSpeedStrategy zero_quantized_weights=True cannot be combined with DeepSpeed's torch_autocast"
            " (enabled: true); DeepSpeed refuses both. Use the Trainer's precision instead of torch_autocast."
        )
    _check_dtype(config.get("communication_data_type"))


def resolve_for_world(
    config: dict[str, Any], devices_per_node: int, world_size: int, visible_devices: int | None
) -> dict[str, Any]:
    """Resolves ``zero_hpz_partition_size: node`` in place and checks the ZeRO++ keys against the processes.

    Args:
        config: The strategy's DeepSpeed config (changed in place).
        devices_per_node: Processes (devices) per node, Lightning's ``devices``.
        world_size: All processes.
        visible_devices: CUDA devices this process sees (what DeepSpeed counts a node's GPUs by); ``None`` when not
            on CUDA, where DeepSpeed has no quantiser op.

    Returns:
        What was resolved (dotted key -> value), for ``LitDeepSpeedStrategy.derived``.

    Raises:
        ValueError: Quantised weights or gradients off CUDA; a hpZ size that does not divide ``world_size``;
            quantised gradients on several nodes whose visible GPUs differ from the devices used.

    Example:
        >>> config = {"zero_optimization": {"stage": 3, "zero_hpz_partition_size": "node"}}
        >>> resolve_for_world(config, devices_per_node=8, world_size=32, visible_devices=8)
        {'zero_optimization.zero_hpz_partition_size': 8}
    """
    zero = config.get("zero_optimization")
    if not isinstance(zero, dict):
        return {}
    resolved: dict[str, Any] = {}
    if zero.get("zero_hpz_partition_size") == HPZ_PER_NODE:
        zero["zero_hpz_partition_size"] = resolved["zero_optimization.zero_hpz_partition_size"] = devices_per_node
    hpz = zero.get("zero_hpz_partition_size", 1)
    if isinstance(hpz, int) and hpz > 1 and world_size % min(hpz, world_size):
        raise ValueError(
            f"LitDeepSpeedStrategy zero_hpz_partition_size={hpz} does not divide the world size {world_size}"
            f" ({world_size // devices_per_node} node(s) x {devices_per_node} device(s)): DeepSpeed forms hpZ groups"
            " of that many consecutive ranks. Use a divisor, typically the devices per node ('node')."
        )
    quantised = [k for k in _QUANTISED if zero.get(k)]
    if quantised and visible_devices is None:
        raise ValueError(
            f"LitDeepSpeedStrategy {', '.join(quantised)}: ZeRO++ quantisation runs DeepSpeed's CUDA quantizer op,"
            " which its CPU accelerator does not have. Train on GPUs, or leave the quantisation off."
        )
    nodes = world_size // devices_per_node
    if zero.get("zero_quantized_gradients") and nodes > 1 and visible_devices != devices_per_node:
        raise ValueError(
            f"LitDeepSpeedStrategy zero_quantized_gradients=True on {nodes} nodes with {devices_per_node} device(s)"
            f" each, but each process sees {visible_devices} GPU(s): DeepSpeed counts a node's GPUs by the visible"
            " ones and would group the ranks wrongly. Use every visible GPU (devices: -1) or set CUDA_VISIBLE_DEVICES."
        )
    return resolved


def forget_previous_hpz_group(config: Mapping[str, Any]) -> None:
    """Lets a second hpZ run in one process start: DeepSpeed keeps the hpZ process group of the previous one in a
    module global and refuses to create another (``AssertionError: ZeRO parameter intra parallel group is already
    initialized``, from ``deepspeed.utils.groups._create_zero_param_parallel_group``). With hpZ on, the global is
    cleared, so this run's ``zero.Init`` creates its group (on every rank, collectively) for its own size."""
    zero = config.get("zero_optimization")
    hpz = zero.get("zero_hpz_partition_size", 1) if isinstance(zero, Mapping) else 1
    if isinstance(hpz, int) and hpz > 1:
        # deferred: importing deepspeed is slow (and it is absent off Linux); only DeepSpeed runs reach here
        from deepspeed.utils import groups

        groups._ZERO_PARAM_INTRA_PARALLEL_GROUP = None


def _check_hpz(name: str, value: Any) -> None:
    if value is None or value == HPZ_PER_NODE:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"LitDeepSpeedStrategy {name}={value!r}; allowed: an integer >= 1 (ranks per hpZ group; 1 is off),"
            f" {HPZ_PER_NODE!r} (the devices per node) or None."
        )


def _check_dtype(value: Any) -> None:
    if value is not None and (not isinstance(value, str) or value.lower() not in COMMUNICATION_DATA_TYPES):
        allowed = ", ".join(repr(v) for v in COMMUNICATION_DATA_TYPES)
        raise ValueError(
            f"LitDeepSpeedStrategy communication_data_type={value!r}; allowed: {allowed} or None (the model's dtype)."
        )
