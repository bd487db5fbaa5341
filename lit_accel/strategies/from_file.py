"""Resuming a single-file Lightning checkpoint (DDP, one device) under DeepSpeed ZeRO-1/2/3.

A run started with DDP or on one device saves one ``.ckpt`` file: the full weights, the torch optimizer's state
(Adam's moments per parameter index, each group's hyperparameters) and Lightning's loop, scheduler and callback
states. Lightning's ``DeepSpeedStrategy`` only resumes DeepSpeed checkpoint folders. :func:`load_file_into_engine`
puts such a file into a built DeepSpeed engine instead: every weight into the (partitioned) parameters and their
fp32 master copy, Adam's moments and step into the ZeRO optimizer's partitions (through DeepSpeed's
``safe_set_full_*`` functions, which every stage supports), each group's hyperparameters, and returns Lightning's
states, so the run continues as it would have under DDP (see ``docs/checkpoints.md``).

Example:
    >>> optimizer_order([[1, 2], [3]])  # the engine's parameter groups, flattened in order
    [1, 2, 3]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.trainer.states import TrainerFn

from lit_accel.strategies.sizing import local_partition_span, param_numel

__all__ = ["load_file_into_engine", "optimizer_order", "step_device"]


def optimizer_order(groups: Sequence[Sequence[Any]]) -> list[Any]:
    """The parameters of a ZeRO optimizer in the order of the torch optimizer it wraps: ZeRO-1/2 keep each
    original group's trainable parameters in order (``bit16_groups``), ZeRO-3 splits each group into consecutive
    sub-groups (``fp16_groups``); either way, flattening them gives the original order."""
    return [p for group in groups for p in group]


def _engine_params(engine: Any) -> list[torch.nn.Parameter]:
    zero = engine.optimizer
    groups = getattr(zero, "fp16_groups", None) if engine.zero_optimization_partition_weights() else None
    if groups is None:
        groups = zero.bit16_groups
    return optimizer_order(groups)


def _set_full(param: torch.nn.Parameter, value: torch.Tensor, key: str | None = None) -> None:
    """Writes the whole fp32 ``value`` into DeepSpeed's copy of ``param`` (its master weights, or the optimizer
    state ``key``), each rank its own part. Under ZeRO-3 through DeepSpeed's *local* functions: its
    ``safe_set_full_*`` slice at ``rank * partition size``, past the end of a parameter whose size is not a multiple
    of the world size on the last rank (DeepSpeed 0.19.8)."""
    # deferred: importing deepspeed is slow; only DeepSpeed runs reach here
    from deepspeed import utils

    value = value.to(torch.float32).flatten()
    if not hasattr(param, "ds_id"):
        if key is None:
            utils.safe_set_full_fp32_param(param, value)
        else:
            utils.safe_set_full_optimizer_state(param, value, key)
        return
    local = utils.safe_get_local_fp32_param(param) if key is None else utils.safe_get_local_optimizer_state(param, key)
    if local is None:
        return
    start, valid = local_partition_span(param, local.numel())
    merged = torch.zeros_like(local).flatten()
    merged[:valid] = value[start : start + valid].to(merged.device)
    if key is None:
        utils.safe_set_local_fp32_param(param, merged.view_as(local))
    else:
        utils.safe_set_local_optimizer_state(param, merged.view_as(local), key)


def _set_weights(module: torch.nn.Module, state: dict[str, torch.Tensor], zero3: bool) -> list[str]:
    """Writes ``state`` into ``module``'s parameters (gathered and re-partitioned from rank 0 under ZeRO-3; every
    rank read the same file) and into DeepSpeed's fp32 master copy of the trainable ones, exactly (not through the
    low-precision parameter); buffers by ``load_state_dict``. Returns the parameters the file does not hold."""
    # deferred: importing deepspeed is slow; only DeepSpeed runs reach here
    import deepspeed

    missing = []
    for name, param in module.named_parameters():
        if name not in state:
            missing.append(name)
            continue
        value = state[name].to(torch.float32)
        if zero3:
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0), torch.no_grad():
                param.copy_(value.reshape(param.shape).to(param.dtype))
        else:
            with torch.no_grad():
                param.copy_(value.reshape(param.shape).to(param.dtype))
        if param.requires_grad:
            _set_full(param, value)
    buffers = {name: state[name] for name, _ in module.named_buffers() if name in state}
    module.load_state_dict(buffers, strict=False)
    return missing


def _step_tensor(step: float, flat: torch.Tensor, optimizer: Any) -> torch.Tensor:
    """Adam's step as torch keeps it: on the parameter's device for fused or capturable Adam, else on the CPU."""
    return torch.tensor(float(step), dtype=torch.float32).to(step_device(flat, optimizer))


def step_device(param: torch.Tensor, optimizer: Any) -> torch.device:
    """Where torch's Adam keeps ``param``'s step: its device for fused or capturable Adam (their kernels read it
    there), else the CPU."""
    on_device = any(g.get("fused") or g.get("capturable") for g in optimizer.param_groups)
    return param.device if on_device else torch.device("cpu")


def _ensure_adam_state(engine: Any) -> None:
    """Creates Adam's state (zeros) for every flat fp32 partition that has none yet and, under ZeRO-1/2, links each
    parameter's slice of it, as DeepSpeed does after its first step: before any step a ZeRO-1/2 optimizer holds no
    state, and ``safe_set_full_optimizer_state`` has nowhere to write."""
    zero, inner = engine.optimizer, engine.optimizer.optimizer
    zero3 = engine.zero_optimization_partition_weights()
    flats = list(zero.fp32_partitioned_groups_flat) if zero3 else [g["params"][0] for g in inner.param_groups]
    for i, flat in enumerate(flats):
        state = inner.state[flat]
        for key in ("exp_avg", "exp_avg_sq"):
            if key not in state:
                state[key] = torch.zeros_like(flat)
        state.setdefault("step", _step_tensor(0.0, flat, inner))
        if not zero3:
            for lp in zero.bit16_groups[i]:
                if lp._hp_mapping is not None:
                    lp._hp_mapping.set_optim_state_fragment(flat, state)


def _set_optimizer(engine: Any, module: torch.nn.Module, saved: dict[str, Any]) -> None:
    """Adam's moments, step and each group's hyperparameters from a torch optimizer ``state_dict`` into the ZeRO
    optimizer (parameter ``i`` of the saved state is the engine's ``i``-th trainable parameter)."""
    _ensure_adam_state(engine)
    params = _engine_params(engine)
    indices = [i for group in saved["param_groups"] for i in group["params"]]
    names = {id(p): n for n, p in module.named_parameters()}
    if len(indices) != len(params):
        raise ValueError(
            f"the checkpoint's optimizer holds {len(indices)} parameters, this run's {len(params)}: it was saved"
            " with another model, technique or configure_optimizers"
        )
    steps: set[float] = set()
    for param, index in zip(params, indices):
        state = saved["state"].get(index, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                if state[key].numel() != param_numel(param):
                    raise ValueError(f"the checkpoint's {key} of {names.get(id(param))!r} has another size")
                _set_full(param, state[key], key)
        if "step" in state:
            steps.add(float(state["step"]))
    if len(steps) > 1:
        raise ValueError(f"the checkpoint's optimizer state holds several step counts ({sorted(steps)})")
    inner = engine.optimizer.optimizer
    for flat, flat_state in inner.state.items():
        if steps and "step" in flat_state:
            flat_state["step"] = _step_tensor(next(iter(steps)), flat, inner)  # one per state: Adam adds in place
    if len(saved["param_groups"]) == len(inner.param_groups):
        for group, saved_group in zip(inner.param_groups, saved["param_groups"]):
            group.update({k: v for k, v in saved_group.items() if k != "params"})


def load_file_into_engine(strategy: Any, path: Path) -> dict[str, Any]:
    """Resumes a Lightning checkpoint file under ``strategy``'s DeepSpeed engine (any ZeRO stage, any number of
    processes); every rank reads the file (it must be on a filesystem they all see).

    Args:
        strategy: The ``LitDeepSpeedStrategy``, set up (its engine built).
        path: A Lightning ``.ckpt`` file.

    Returns:
        Lightning's checkpoint dict without ``state_dict`` and ``optimizer_states`` (DeepSpeed's engine holds them).

    Raises:
        ValueError: The file is not a Lightning checkpoint, lacks weights the run needs (unless the module loads
            non-strictly, as LoRA's adapter-only checkpoints do), or its optimizer state does not fit this run's.
    """
    checkpoint = strategy.checkpoint_io.load_checkpoint(path)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"ckpt_path {str(path)!r} holds no 'state_dict': it is not a Lightning checkpoint")
    module = strategy.lightning_module
    engine = strategy.deepspeed_engine
    missing = _set_weights(module, checkpoint["state_dict"], strategy.zero_stage_3)
    if missing and module.strict_loading:
        raise ValueError(
            f"ckpt_path {str(path)!r} lacks {len(missing)} of the model's parameters ({', '.join(missing[:3])}...)"
        )
    fitting = module.trainer.state.fn == TrainerFn.FITTING
    optimizer_states = checkpoint.get("optimizer_states") or []
    if fitting and optimizer_states:
        try:
            _set_optimizer(engine, module, optimizer_states[0])
        except ValueError as err:
            raise ValueError(f"ckpt_path {str(path)!r} cannot be resumed under DeepSpeed: {err}") from None
        engine.global_steps = int(checkpoint.get("global_step", 0))
        engine.global_samples = engine.global_steps * engine.train_batch_size()
    return {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
