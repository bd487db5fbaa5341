"""LoRA in files: PEFT adapter directories (write, read, load) and the merged state dict an export writes.

:func:`save_peft_adapter` / :func:`load_peft_adapter` write and read ``adapter_config.json`` +
``adapter_model.safetensors`` exactly as ``peft`` does, so ``PeftModel.from_pretrained(base, directory)`` gives the
same logits (``peft`` itself is not needed at run time); :func:`merged_state_dict` is the plain model's state dict
with every adapter folded in, for a Hugging Face directory. Under DeepSpeed ZeRO-3 every one of them gathers the
adapters (never writing them empty): call it on every rank.

Families: every supported one round-trips through PEFT (Phi-3's fused ``qkv_proj`` / ``gate_up_proj`` are single
linears to PEFT too, named in ``target_modules``). Mixture-of-experts models carry adapters on the attention only:
the experts are 3-D tensors, not linears. One case is refused (:func:`peft_layout_problem`): adapters on the dense
MLP linears of a mixture-of-experts model (Qwen3-MoE's ``mlp_only_layers``), because PEFT with transformers >= 5
re-targets every ``gate_proj`` / ``up_proj`` / ``down_proj`` of such a model to the experts' fused weights and would
not load them. A PEFT adapter on the experts themselves (``target_parameters``) is refused by
:func:`load_peft_adapter`.

Example:
    >>> import tempfile
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from lit_accel.lowrank import apply_lora
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
    ...                                      num_attention_heads=4, vocab_size=128))
    >>> _ = apply_lora(model, targets="attention", r=4, alpha=8)
    >>> out = save_peft_adapter(model, tempfile.mkdtemp() + "/adapter")
    >>> config, modules = read_peft_adapter(out)
    >>> config["r"], config["target_modules"], len(modules)
    (4, ['k_proj', 'o_proj', 'q_proj', 'v_proj'], 4)
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from lit_accel.lowrank.lora import LoRALinear, apply_lora, gathered_lora_layers, lora_layers
from lit_accel.models.hf_directory import (
    check_output_directory,
    fingerprint_differences,
    model_fingerprint,
    write_directory,
)
from lit_accel.models.params import full_state_dict, gathered, is_partitioned, is_rank_zero
from lit_accel.models.structure import ModelStructure, StructurePatterns, get_structure, linear_in_out_features

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "check_lora_base",
    "load_peft_adapter",
    "merged_state_dict",
    "peft_layout_problem",
    "read_peft_adapter",
    "save_peft_adapter",
]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the plain model with every adapter folded in, on CPU; the model is not changed.

    Keys are those of the original model (``<name>.weight``, not ``<name>.base_layer.weight``). Merged weights are
    ``promote(base dtype, fp32)``. Under ZeRO-3 call it on all ranks (ranks other than 0 get an empty dict).
    """
    state = full_state_dict(model)
    deltas: dict[str, torch.Tensor] = {}
    for name, layer in gathered_lora_layers(model):
        if not layer.merged:
            deltas[name] = layer.delta_weight().to("cpu")
    if not state:
        return state
    for name in lora_layers(model):
        state.pop(f"{name}.lora_A", None)
        state.pop(f"{name}.lora_B", None)
        for key in [k for k in state if k.startswith(f"{name}.base_layer.")]:
            value = state.pop(key)
            plain = f"{name}.{key[len(name) + len('.base_layer.') :]}"
            if key == f"{name}.base_layer.weight" and name in deltas:
                value = (value.float() + deltas[name]).to(torch.promote_types(value.dtype, torch.float32))
            state[plain] = value
    return state


def check_lora_base(recorded: Mapping[str, Any], now: Mapping[str, Any] | str, what: str) -> None:
    """Refuses a base model that is not the one an adapter-only LoRA checkpoint was trained on.

    An adapter-only checkpoint records the :func:`~lit_accel.models.hf_directory.model_fingerprint` of the folder its
    base was loaded from (``checkpoint["lit_accel"]["lora"]["base"]``); the export and a resume rebuild the base from
    a folder again, and adapters merged into (or trained on) another model give a model nobody trained.

    Args:
        recorded: The fingerprint the checkpoint recorded.
        now: The fingerprint of the base folder to be used, or that folder.
        what: Who is asking, for the message (e.g. ``--ckpt 'last.ckpt'``).

    Raises:
        ValueError: Naming both folders and what differs (config keys, tensors, weights).

    Example:
        >>> fp = {"directory": "/m/base", "config": {}, "tensors": {}, "digest": "1"}
        >>> check_lora_base(fp, fp, "--ckpt 'last.ckpt'")  # the same base: nothing to say
    """
    current = model_fingerprint(now) if isinstance(now, str) else now
    differences = fingerprint_differences(recorded, current)
    if differences:
        raise ValueError(
            f"{what}: its LoRA adapters were trained on the base model in {recorded.get('directory')!r}, but the base"
            f" folder used now, {current.get('directory')!r}, holds a different model ({'; '.join(differences)})."
            " Adapters applied to another base do not give the model that was trained; use the base they were"
            f" trained on (put it back at {current.get('directory')!r} if that folder was replaced)."
        )


# ---------------------------------------------------------------------------------------------------------------
# PEFT format
# ---------------------------------------------------------------------------------------------------------------

# Module names that PEFT, on transformers >= 5, maps to a mixture of experts' fused parameters (or its router) in
# every model of an MoE architecture, whatever block they are in (peft.utils.transformers_weight_conversion).
_PEFT_MOE_REMAPPED = frozenset({"gate", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"})


def _structure_or_none(model: nn.Module, patterns: StructurePatterns | None = None) -> ModelStructure | None:
    try:
        return get_structure(model, patterns)
    except ValueError:
        return None


def peft_layout_problem(
    model: nn.Module, names: Sequence[str], patterns: StructurePatterns | None = None
) -> str | None:
    """Why ``PeftModel.from_pretrained`` could not load adapters on the linears ``names`` of ``model``, or None.

    The one known case: a mixture-of-experts model (Mixtral, Qwen3-MoE) with adapters on dense MLP linears named
    ``gate_proj`` / ``up_proj`` / ``down_proj`` (Qwen3-MoE's ``mlp_only_layers``). PEFT, on transformers >= 5,
    re-targets those names to the experts' fused 3-D weights in every block, so the dense layers' adapters would not
    load. Attention adapters are never affected.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        ...                                      num_attention_heads=4, vocab_size=128))
        >>> peft_layout_problem(model, ["model.layers.0.mlp.down_proj"]) is None
        True
    """
    if int(transformers.__version__.split(".")[0]) < 5:
        return None
    structure = _structure_or_none(model, patterns)
    if structure is None or not structure.is_moe:
        return None
    remapped = [n for n in names if n.rsplit(".", 1)[-1] in _PEFT_MOE_REMAPPED]
    if not remapped:
        return None
    shown = ", ".join(remapped[:4]) + (f", ... ({len(remapped)} in all)" if len(remapped) > 4 else "")
    return (
        f"{type(model).__name__} (model_type {structure.arch!r}) is a mixture of experts, and PEFT (with transformers"
        " >= 5) re-targets every module named gate_proj, up_proj or down_proj in such a model to the experts' fused"
        f" 3-D weights, so it would not load the adapters of the dense MLP linears {shown}. For a PEFT adapter, adapt"
        " the attention only (targets='attention'); or export the merged model, which keeps them."
    )


@dataclass
class _AdapterSettings:
    r: int
    alpha: float
    dropout: float
    use_rslora: bool
    init: str
    fan_in_fan_out: bool


def _common_settings(layers: Mapping[str, LoRALinear]) -> _AdapterSettings:
    first = next(iter(layers.values()))
    for name, layer in layers.items():
        mine = (layer.r, layer.alpha, layer.dropout, layer.use_rslora, layer.init)
        theirs = (first.r, first.alpha, first.dropout, first.use_rslora, first.init)
        if mine != theirs:
            raise ValueError(
                f"LoRA layer {name} has (r, alpha, dropout, use_rslora, init)={mine} but others have {theirs}; a PEFT"
                " adapter file holds one setting for all layers"
            )
    return _AdapterSettings(
        r=first.r,
        alpha=first.alpha,
        dropout=first.dropout,
        use_rslora=first.use_rslora,
        init=first.init,
        fan_in_fan_out=any(layer.weight_layout == "in_out" for layer in layers.values()),
    )


def _target_modules(model: nn.Module, names: Sequence[str]) -> list[str] | str:
    """PEFT ``target_modules``: module-name suffixes when they select exactly ``names``, else a full-match regex."""
    chosen = set(names)
    inner = tuple(f"{n}." for n in chosen)
    candidates = [n for n, _ in model.named_modules() if n and not n.startswith(inner)]
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in chosen})
    selected = {n for n in candidates if any(n == s or n.endswith("." + s) for s in suffixes)}
    if selected == chosen:
        return suffixes
    return "(?:" + "|".join(re.escape(n) for n in names) + ")"


def _num(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def _write_files(files: Mapping[str, Any]) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        for fname, content in files.items():
            if fname.endswith(".safetensors"):
                save_file(content, str(tmp / fname), metadata={"format": "pt"})
            else:
                (tmp / fname).write_text(content)

    return write


def _resolvable(base: str | None) -> str | None:
    # AutoPeftModelForCausalLM loads the base from this string: a relative folder would resolve against the
    # reader's working directory, so a local folder is recorded by its absolute path (a hub id is kept as given).
    if base is not None and os.path.isdir(base):
        return os.path.abspath(base)
    return base


def save_peft_adapter(
    model: nn.Module,
    directory: str | Path,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes the adapters as a PEFT LoRA adapter: ``adapter_config.json`` + ``adapter_model.safetensors``.

    ``PeftModel.from_pretrained(base, directory)`` on the original base model then gives the same logits. Keys are
    ``base_model.model.<name>.lora_A.weight`` / ``.lora_B.weight``. A PiSSA adapter is written as PEFT's converted
    LoRA (``path_initial_model_for_weight_conversion``): rank ``2r`` with ``A' = [A; A0]``, ``B' = [B, -B0]`` and
    doubled alpha, so it applies to the original (not the residual) base weights.

    Under DeepSpeed ZeRO-3 call it on every rank: the adapters are gathered (never written empty) and rank 0 writes.
    The directory is written next to its destination and renamed into place
    (:func:`~lit_accel.models.hf_directory.write_directory`).

    Args:
        model: The model holding :class:`LoRALinear` layers (the Hugging Face model, not the LightningModule, so
            that names match the base model PEFT will load).
        directory: Output directory; must not exist or be empty unless ``overwrite``.
        base_model_name_or_path: Recorded in the config (e.g. the base model's directory); a local folder is
            recorded by its absolute path, so ``AutoPeftModelForCausalLM`` finds it from any working directory.
        overwrite: Replace a previous export in ``directory`` (the files its ``lit_accel_export.json`` lists);
            other files there are kept.

    Raises:
        ValueError: The model has no LoRA layer, or adapters PEFT could not load (:func:`peft_layout_problem`).
        FileExistsError: ``directory`` is not empty and ``overwrite`` is False, holds model files no export
            recorded, or is being written by another export.
    """
    out = Path(directory)
    layers = lora_layers(model)
    if not layers:
        raise ValueError("save_peft_adapter: the model has no LoRA layer (call apply_lora first); nothing to save")
    problem = peft_layout_problem(model, list(layers))
    if problem:
        raise ValueError(f"save_peft_adapter: {problem}")
    partitioned = any(is_partitioned(p) for layer in layers.values() for p in (layer.lora_A, layer.lora_B))
    if partitioned or is_rank_zero():
        # Under ZeRO-3 on every rank, before the collective gathering (so that no rank is left waiting in it). Else
        # on rank 0 only, the rank that writes: another rank reaching this line after rank 0 wrote would see the
        # directory it just filled and refuse.
        check_output_directory(out, overwrite)
    settings = _common_settings(layers)
    pissa = any(layer.lora_A0 is not None for layer in layers.values())
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in gathered_lora_layers(model):
        a, b = layer.lora_A.detach().float().cpu(), layer.lora_B.detach().float().cpu()
        if a.numel() == 0 or b.numel() == 0:
            raise RuntimeError(f"LoRA layer {name} has an empty adapter after gathering; refusing to save it")
        if pissa:
            assert layer.lora_A0 is not None and layer.lora_B0 is not None
            a = torch.cat([a, layer.lora_A0.float().cpu()], dim=0)
            b = torch.cat([b, -layer.lora_B0.float().cpu()], dim=1)
        tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = a.contiguous()
        tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = b.contiguous()
    if not is_rank_zero():
        return out
    r, alpha = settings.r, settings.alpha
    if pissa:
        r, alpha = 2 * r, alpha * (math.sqrt(2) if settings.use_rslora else 2)
    config: dict[str, Any] = {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": _resolvable(base_model_name_or_path),
        "bias": "none",
        "exclude_modules": None,
        "fan_in_fan_out": settings.fan_in_fan_out,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": _num(alpha),
        "lora_bias": False,
        "lora_dropout": settings.dropout,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": r,
        "rank_pattern": {},
        "revision": None,
        "target_modules": _target_modules(model, list(layers)),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": settings.use_rslora,
    }
    files = {ADAPTER_WEIGHTS_NAME: tensors, ADAPTER_CONFIG_NAME: json.dumps(config, indent=2, sort_keys=True) + "\n"}
    write_directory(out, overwrite, _write_files(files))
    return out


def read_peft_adapter(directory: str | Path) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """Reads a PEFT LoRA adapter directory: its config and ``{module name: {"A": ..., "B": ...}}``.

    Raises:
        ValueError: Missing files, a non-LoRA adapter, or settings this module cannot reproduce (DoRA, biases,
            per-layer ranks, embedding adapters); the message names them.
    """
    path = Path(directory)
    cfg_path = path / ADAPTER_CONFIG_NAME
    if not cfg_path.is_file():
        raise ValueError(f"{str(path)!r} holds no {ADAPTER_CONFIG_NAME}: it is not a PEFT adapter directory")
    config = json.loads(cfg_path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"adapter at {str(path)!r} has peft_type={config.get('peft_type')!r}; only LORA is supported")
    for key, ok in (("use_dora", False), ("lora_bias", False)):
        if config.get(key, ok) != ok:
            raise ValueError(f"adapter at {str(path)!r} has {key}={config.get(key)!r}; only {key}={ok} is supported")
    if config.get("bias", "none") != "none":
        raise ValueError(f"adapter at {str(path)!r} has bias={config.get('bias')!r}; only 'none' is supported")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise ValueError(f"adapter at {str(path)!r} has a {key}; per-layer ranks/alphas are not supported")
    weights = path / ADAPTER_WEIGHTS_NAME
    if weights.is_file():
        flat = load_file(str(weights))
    elif (path / "adapter_model.bin").is_file():
        flat = torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"{str(path)!r} holds no {ADAPTER_WEIGHTS_NAME} (or adapter_model.bin)")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if m is None:
            raise ValueError(f"adapter at {str(path)!r} holds {key!r}, which is not a LoRA A/B weight of a linear")
        modules.setdefault(m.group(1), {})[m.group(2)] = tensor
    incomplete = [n for n, t in modules.items() if set(t) != {"A", "B"}]
    if incomplete:
        raise ValueError(f"adapter at {str(path)!r} lacks lora_A or lora_B for {incomplete[:5]}")
    if not modules:
        raise ValueError(f"adapter at {str(path)!r} holds no LoRA weights")
    return config, modules


@torch.no_grad()
def load_peft_adapter(model: nn.Module, directory: str | Path, patterns: StructurePatterns | None = None) -> None:
    """Loads a PEFT LoRA adapter (``PeftModel.save_pretrained`` output) into ``model``.

    If the model has no LoRA layers yet they are applied with the adapter's settings (rank from the weights;
    ``lora_alpha``, ``lora_dropout``, ``use_rslora`` and ``init_lora_weights`` from the config, so a PiSSA adapter
    saved without conversion gets its residual base as PEFT would). Under ZeRO-3 call it on every rank.

    Raises:
        ValueError: A module named in the adapter is missing or not a linear (e.g. a mixture of experts' fused
            experts, which PEFT adapts through ``target_parameters``), or its shape does not fit the adapter (the
            message names the module, the adapter's shapes and the base's shape); or the adapter has settings that
            are not supported (see :func:`read_peft_adapter`).
    """
    config, modules = read_peft_adapter(directory)
    present = dict(model.named_modules())
    structure = _structure_or_none(model, patterns)
    blocks = structure.blocks if structure is not None else []
    experts = [b.mlp.experts.experts_name for b in blocks if b.mlp.experts and b.mlp.experts.experts_name]
    on_experts = [n for n in modules if any(n == e or n.startswith(e + ".") for e in experts)]
    if on_experts and structure is not None:
        raise ValueError(
            f"the adapter adapts {on_experts[0]!r}, the experts of a mixture of experts in"
            f" {type(model).__name__} (model_type {structure.arch!r}): their weights are 3-D tensors (PEFT's"
            " target_parameters), not linears, and lit_accel's LoRA adapts linears only. Use an adapter on the"
            " attention (and dense MLP) linears, or merge it with PEFT (merge_and_unload) and load the merged model."
        )
    for name, t in modules.items():
        module = present.get(name)
        if module is None:
            raise ValueError(f"the adapter adapts {name!r}, which this model does not have")
        if not isinstance(module, (nn.Linear, Conv1D, LoRALinear)):
            raise ValueError(f"the adapter adapts {name!r}, which is a {type(module).__name__}, not a linear")
        fin, fout = linear_in_out_features(module)
        a_shape, b_shape = tuple(t["A"].shape), tuple(t["B"].shape)
        if (
            len(a_shape) != 2
            or len(b_shape) != 2
            or a_shape[1] != fin
            or b_shape[0] != fout
            or a_shape[0] != b_shape[1]
        ):
            raise ValueError(
                f"adapter shapes do not fit module {name!r}: lora_A {a_shape} and lora_B {b_shape} need a base of"
                f" in={a_shape[1] if len(a_shape) == 2 else '?'}, out={b_shape[0] if b_shape else '?'}, but the"
                f" model's {name} has in={fin}, out={fout}; is this the base model the adapter was trained on?"
            )
    ranks = {int(t["A"].shape[0]) for t in modules.values()}
    if len(ranks) != 1:
        raise ValueError(f"the adapter has layers of different ranks {sorted(ranks)}; one rank is supported")
    r = ranks.pop()
    existing = lora_layers(model)
    if existing:
        missing = sorted(set(modules) - set(existing))
        if missing:
            raise ValueError(f"the model has LoRA layers but not on {missing[:5]}, which the adapter adapts")
        layers = {n: existing[n] for n in modules}
        for name, layer in layers.items():
            if layer.r != r:
                raise ValueError(f"LoRA layer {name} has r={layer.r} but the adapter has r={r}")
    else:
        init_cfg = str(config.get("init_lora_weights", True)).lower()
        layers = apply_lora(
            model,
            targets=["^" + re.escape(n) + "$" for n in modules],
            r=r,
            alpha=float(config.get("lora_alpha", 8)),
            dropout=float(config.get("lora_dropout", 0.0)),
            init="pissa" if init_cfg.startswith("pissa") else "gaussian",
            use_rslora=bool(config.get("use_rslora", False)),
            patterns=patterns,
        )
    for name, layer in layers.items():
        with gathered([layer.lora_A, layer.lora_B], modifier_rank=0):
            layer.lora_A.copy_(modules[name]["A"].to(layer.lora_A.dtype))
            layer.lora_B.copy_(modules[name]["B"].to(layer.lora_B.dtype))
