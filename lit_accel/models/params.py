"""Reading and writing full parameters whatever the strategy (plain, DDP, DeepSpeed ZeRO-3 partitions).

Under ZeRO-3 every parameter is a flat shard spread over the ranks (``param.ds_id`` exists and ``param.data`` is
empty); reading it needs a gather, and writing it needs a gather with ``modifier_rank`` so the change is
re-partitioned from that rank. These helpers do that module by module, so the full model never has to fit on
one device.

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
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "full_state_dict",
    "gathered",
    "is_partitioned",
    "is_rank_zero",
    "load_full_state_dict",
    "zero3_initialize_weights",
]


def is_partitioned(param: torch.Tensor) -> bool:
    """True for a DeepSpeed ZeRO-3 partitioned parameter."""
    return hasattr(param, "ds_id")


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
    import deepspeed

    with deepspeed.zero.GatheredParameters(part, modifier_rank=modifier_rank):
        yield


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def is_rank_zero() -> bool:
    """True on global rank 0, and in a process with no initialised process group."""
    return _rank() == 0


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Returns the full (unpartitioned) state dict on CPU; under ZeRO-3 call it on every rank.

    Ranks other than 0 get an empty dict when the model is partitioned (only rank 0 needs to write files).
    """
    params = list(model.parameters())
    if not any(is_partitioned(p) for p in params):
        return {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    rank = _rank()
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
    rank = _rank()
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
                shape = tuple(getattr(tensor, "ds_shape", tensor.shape))
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
    rank = _rank()
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
