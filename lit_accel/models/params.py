"""Reading and writing full parameters whatever the strategy (plain, DDP, DeepSpeed ZeRO-1/2/3).

Under ZeRO-3 every parameter is a flat shard spread over the ranks (``param.ds_id`` exists and ``param.data`` is
empty); reading it needs a gather, and writing it needs a gather with ``modifier_rank`` so the change is
re-partitioned from that rank. These helpers do that module by module, so the full model never has to fit on
one device.

Once a DeepSpeed engine with an optimizer exists (ZeRO 1, 2 or 3, any precision), the optimizer also holds an fp32
*master* copy of every trainable parameter, partitioned over the ranks, and each step overwrites the parameters
with it: a write to ``param.data`` alone is undone at the next step. :func:`full_parameters` is the helper for
callbacks that rewrite weights while training: it gathers, lets one rank modify, broadcasts the result, and writes
it into the fp32 master copy too (see its docstring); :func:`gathered` only gathers ZeRO-3 partitions, and
:func:`gathered_for_reading` gathers, read-only, those not already whole (so it nests).

Example:
    >>> import torch
    >>> from lit_accel.models.params import full_state_dict, load_full_state_dict
    >>> layer = torch.nn.Linear(2, 2)
    >>> load_full_state_dict(layer, {k: torch.zeros_like(v) for k, v in full_state_dict(layer).items()})
    >>> float(layer.weight.abs().sum())
    0.0
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from lit_accel.strategies.sizing import local_partition_span

__all__ = [
    "full_parameters",
    "full_shape",
    "full_state_dict",
    "gathered",
    "gathered_for_reading",
    "global_rank",
    "is_partitioned",
    "is_rank_zero",
    "load_full_state_dict",
    "world_size",
    "zero3_initialize_weights",
]


def is_partitioned(param: torch.Tensor) -> bool:
    """True for a DeepSpeed ZeRO-3 partitioned parameter."""
    return hasattr(param, "ds_id")


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The parameter's whole shape: ZeRO-3 leaves an empty local shard in ``param`` and the full shape in
    ``ds_shape``; any other tensor's own shape.

    Example:
        >>> full_shape(torch.zeros(3, 4))
        (3, 4)
    """
    return tuple(int(d) for d in getattr(param, "ds_shape", param.shape))


@contextlib.contextmanager
def gathered(params: list[nn.Parameter], modifier_rank: int | None = None) -> Iterator[None]:
    """Gathers ZeRO-3 partitioned ``params`` for the duration of the block (a no-op for ordinary ones).

    Args:
        params: Parameters to make whole.
        modifier_rank: The rank whose in-place changes are kept and re-partitioned; ``None`` for read-only use.
    """
    part = [p for p in params if is_partitioned(p)]
    if not part:
        yield
        return
    # deferred: importing deepspeed is slow (and it is absent off Linux); only DeepSpeed runs reach here
    import deepspeed

    with deepspeed.zero.GatheredParameters(part, modifier_rank=modifier_rank):
        yield


@contextlib.contextmanager
def gathered_for_reading(params: Iterable[nn.Parameter]) -> Iterator[None]:
    """Makes ZeRO-3 partitioned ``params`` whole for the block, read-only; a no-op for any other parameter.

    Unlike :func:`gathered`, parameters that are already whole (gathered by an enclosing block, or by ZeRO-3 itself
    for the module running now) are left as they are, and stay whole after the block, so it nests. Collective under
    ZeRO-3: call it on every rank. Changes made inside the block are discarded.

    Example:
        >>> layer = torch.nn.Linear(2, 2)
        >>> with gathered_for_reading(layer.parameters()):
        ...     tuple(layer.weight.shape)
        (2, 2)
    """
    missing = [p for p in params if is_partitioned(p) and _not_available(p)]
    if not missing:
        yield
        return
    # deferred: importing deepspeed is slow (and it is absent off Linux); only DeepSpeed runs reach here
    import deepspeed

    with deepspeed.zero.GatheredParameters(missing, modifier_rank=None):
        yield


def _not_available(param: torch.Tensor) -> bool:
    """True for a ZeRO-3 parameter whose full value is not held now (its status ``NOT_AVAILABLE``)."""
    return getattr(getattr(param, "ds_status", None), "name", None) == "NOT_AVAILABLE"


def global_rank() -> int:
    """This process's rank in the default process group; 0 when none is initialised (one process).

    For code that has no ``Trainer`` at hand (functional cores, exports); a callback asks ``trainer.is_global_zero``.

    Example:
        >>> global_rank(), world_size(), is_rank_zero()
        (0, 1, True)
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def world_size() -> int:
    """Number of processes in the default process group; 1 when none is initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _has_master_copy(param: torch.Tensor) -> bool:
    """True when a DeepSpeed ZeRO optimizer keeps an fp32 master copy of ``param`` (ZeRO-1/2: ``_hp_mapping``;
    ZeRO-3: ``_z3_optimizer``, set for the parameters it optimises)."""
    # ZeRO-1/2 set ``_hp_mapping`` on every rank, None where the rank holds none of the parameter's fragment (that
    # rank then writes nothing).
    if not param.requires_grad:
        return False
    if is_partitioned(param):
        return hasattr(param, "_z3_optimizer")
    return hasattr(param, "_hp_mapping")


@contextlib.contextmanager
def full_parameters(module: nn.Module, modifier_rank: int | None = None) -> Iterator[dict[str, nn.Parameter]]:
    """Makes every parameter of ``module`` whole for the block and yields them by name; optionally keeps edits.

    Works the same way whatever the strategy:

    * single device: a no-op (the parameters are yielded as they are);
    * DDP: parameters are already whole; with ``modifier_rank`` set, the values that rank holds at the end of the
      block are broadcast to every rank, so an edit made on one rank (or a random one drawn per rank) stays
      identical everywhere;
    * DeepSpeed ZeRO-1/2: as DDP, and the edited values are also written into the optimizer's partitioned fp32
      master copy, which the next optimizer step would otherwise copy back over the parameters;
    * DeepSpeed ZeRO-3: the partitions are gathered for the block (``deepspeed.zero.GatheredParameters``); with
      ``modifier_rank`` the edited values are re-partitioned from that rank and written into the fp32 master copy
      (ZeRO-Offload's CPU copy too).

    Only elements whose value changed are written into the master copy: the others keep their full fp32 precision
    (with bf16 parameters, copying the whole bf16 tensor back would round every weight of the module). Optimizer
    moments (Adam's ``exp_avg``...) are left as they are.

    Call it on every rank whenever the model may be distributed (ZeRO-3 gathers, and ``modifier_rank`` broadcasts,
    are collective); edit under ``torch.no_grad()``, in place, on rank ``modifier_rank`` (or identically on every
    rank). The whole module is gathered at once: for a large model, loop over its submodules.

    Args:
        module: The module whose parameters (recursively) are made whole.
        modifier_rank: ``None`` for read-only use (edits are not kept on a partitioned model and not synchronised
            otherwise); else the global rank whose values every rank keeps at the end of the block.

    Example:
        >>> layer = torch.nn.Linear(4, 4)
        >>> with full_parameters(layer, modifier_rank=0) as params, torch.no_grad():
        ...     _ = params["weight"].zero_()
        >>> float(layer.weight.detach().abs().sum())
        0.0
    """
    named = dict(module.named_parameters())
    params = list(named.values())
    world = world_size()
    if modifier_rank is not None and not 0 <= modifier_rank < world:
        raise ValueError(f"full_parameters: modifier_rank={modifier_rank} is not a rank of this world (size {world}).")
    with gathered(params, modifier_rank=modifier_rank):
        masters = [p for p in params if modifier_rank is not None and _has_master_copy(p)]
        before = {id(p): p.detach().clone() for p in masters}
        yield named
        if modifier_rank is None:
            return
        with torch.no_grad():
            if world > 1:
                for p in params:
                    torch.distributed.broadcast(p.data, src=modifier_rank)
            for p in masters:
                _write_master(p, before[id(p)])


def _write_master(param: nn.Parameter, before: torch.Tensor) -> None:
    """Writes the changed elements of ``param`` (whole, identical on every rank) into DeepSpeed's fp32 master copy.

    Each rank writes only the part of the master copy it holds, so nothing is communicated. ZeRO-3 goes through
    DeepSpeed's *local* API: its ``safe_set_full_fp32_param`` slices the value at ``rank * partition size``, past
    the end of a parameter whose size is not a multiple of the world size on the last rank (DeepSpeed 0.19.8).
    """
    new = param.data.flatten()
    old = before.flatten()
    if is_partitioned(param):
        # deferred: importing deepspeed is slow (and it is absent off Linux); only DeepSpeed runs reach here
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

        local = safe_get_local_fp32_param(param)  # this rank's partition, padded to the partition size
        if local is None:
            return
        start, valid = local_partition_span(param, local.numel())
        merged = local.detach().clone().flatten()
        part_new = new[start : start + valid].to(merged.device)
        part_old = old[start : start + valid].to(merged.device)
        merged[:valid] = torch.where(part_new != part_old, part_new.to(merged.dtype), merged[:valid])
        safe_set_local_fp32_param(param, merged)
        return
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:
        return  # ZeRO-1/2: this rank holds no fragment of this parameter
    fragment = mapping.get_hp_fragment()  # a view of this rank's fp32 flat partition
    address = mapping.lp_fragment_address
    part_new = new.narrow(0, address.start, address.numel).to(fragment.device)
    part_old = old.narrow(0, address.start, address.numel).to(fragment.device)
    flat = fragment.data.view(-1)
    flat.copy_(torch.where(part_new != part_old, part_new.to(flat.dtype), flat))


def is_rank_zero() -> bool:
    """True on global rank 0, and in a process with no initialised process group."""
    return global_rank() == 0


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Returns the full (unpartitioned) state dict on CPU; under ZeRO-3 call it on every rank.

    Ranks other than 0 get an empty dict when the model is partitioned (only rank 0 needs to write files).
    """
    params = list(model.parameters())
    if not any(is_partitioned(p) for p in params):
        return {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    rank = global_rank()
    for prefix, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        with gathered([p for _, p in own]):
            if rank == 0:
                for name, p in own:
                    state[f"{prefix}.{name}" if prefix else name] = p.detach().to("cpu").clone()
        if rank == 0:
            for name, buf in module.named_buffers(recurse=False):
                if name not in module._non_persistent_buffers_set:
                    state[f"{prefix}.{name}" if prefix else name] = buf.detach().to("cpu").clone()
    return state


def load_full_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copies a full state dict into ``model``, also when it is ZeRO-3 partitioned (rank 0's copy is kept).

    Raises:
        ValueError: If a parameter of the model is missing from ``state`` (tied weights may be absent) or a shape
            differs; the message names the keys.
    """
    tied = _tied_names(model)
    missing, mismatched = [], []
    rank = global_rank()
    for prefix, module in model.named_modules():
        own = list(module.named_parameters(recurse=False)) + [
            (n, b) for n, b in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set
        ]
        if not own:
            continue
        with gathered([p for _, p in own if isinstance(p, nn.Parameter)], modifier_rank=0), torch.no_grad():
            for name, tensor in own:
                key = f"{prefix}.{name}" if prefix else name
                if key not in state:
                    if key not in tied:
                        missing.append(key)
                    continue
                src = state[key]
                # Every rank checks against the full shape (ds_shape under ZeRO-3), so a mismatch raises on all
                # ranks alike instead of failing on rank 0 and leaving the others waiting in the next gather.
                shape = full_shape(tensor)
                if tuple(src.shape) != shape:
                    mismatched.append(f"{key}: checkpoint {tuple(src.shape)} vs model {shape}")
                    continue
                if rank == 0 or not is_partitioned(tensor):
                    tensor.copy_(src.to(device=tensor.device, dtype=tensor.dtype))
    if missing or mismatched:
        raise ValueError(
            "the weights do not fit the model: "
            + (f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}; " if missing else "")
            + (f"shape mismatches {mismatched[:8]}" if mismatched else "")
        )
    tie: Any = getattr(model, "tie_weights", None)
    if tie is not None:
        tie()


def _tied_names(model: nn.Module) -> set[str]:
    """Names of parameters that share storage with an earlier parameter (e.g. a tied LM head)."""
    seen: dict[int, str] = {}
    tied: set[str] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        else:
            seen[id(p)] = name
    return tied


def zero3_initialize_weights(model: nn.Module) -> None:
    """Runs a Hugging Face model's own weight initialisation on ZeRO-3 partitioned parameters.

    Parameters created inside ``deepspeed.zero.Init`` are emptied as each submodule finishes construction, so the
    model's ``_init_weights`` ran on empty tensors; without this, embeddings would keep PyTorch's N(0, 1) default
    instead of the model's ``initializer_range``. Rank 0 initialises each gathered module and its values are
    re-partitioned to all ranks, so every rank holds the same model.
    """
    init_fn = getattr(model, "_init_weights", None)
    if init_fn is None:
        return
    rank = global_rank()
    for module in model.modules():
        module.__dict__.pop("_is_hf_initialized", None)
        params = list(module.parameters(recurse=False))
        for p in params:
            p.__dict__.pop("_is_hf_initialized", None)
        # _init_weights of some models touches direct children's weights too (e.g. q_proj of an attention).
        for child in module.children():
            params.extend(child.parameters(recurse=False))
        if not params:
            continue
        with gathered(params, modifier_rank=0), torch.no_grad():
            if rank == 0:
                init_fn(module)
    tie: Any = getattr(model, "tie_weights", None)
    if tie is not None:
        tie()
