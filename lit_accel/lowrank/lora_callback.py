"""``LoRA``: a Lightning callback that fine-tunes low-rank adapters instead of the whole model.

The callback only decides *when*; the algorithm is in :mod:`lit_accel.lowrank.lora`. Timeline of a fit:

1. ``setup``: registers :func:`~lit_accel.lowrank.lora.apply_lora` to run right after ``configure_model`` builds
   the model (before Lightning builds the optimizer, before DDP/DeepSpeed wrap or shard it), so the optimizer only
   sees the adapters (``CausalLM.configure_optimizers`` takes ``requires_grad`` parameters). A model that already
   exists (built in ``__init__``) is adapted at once. With ``adapter_only_checkpoints`` it sets
   ``pl_module.strict_loading = False`` so a checkpoint holding only the adapters loads over the rebuilt base.
2. ``on_fit_start``: logs ``lora/trainable_params``, ``lora/total_params``, ``lora/trainable_fraction``.
3. ``on_save_checkpoint``: drops the frozen base weights from the checkpoint (adapters only) and records the LoRA
   settings under ``checkpoint["lit_accel"]["lora"]`` (and in the callback's state), which ``lit-accel export`` reads,
   with the fingerprint of the base model folder (``"base"``, taken at set-up, when the base is loaded from it).
   ``on_load_checkpoint`` refuses to resume such a checkpoint on a base folder whose model differs.
4. ``on_train_end``: writes ``export_dir/adapter`` (PEFT adapter) and/or ``export_dir/merged`` (plain HF model).

Example:
    >>> import lightning as L
    >>> from lit_accel.lowrank.lora_callback import LoRA
    >>> trainer = L.Trainer(callbacks=[LoRA(targets="all-linear", r=16, alpha=32)])  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from transformers import AutoTokenizer
from typing_extensions import override

from lit_accel.lowrank.lora import LORA_INITS, apply_lora, lora_layers, parse_dtype
from lit_accel.lowrank.lora_io import check_lora_base, merged_state_dict, peft_layout_problem, save_peft_adapter
from lit_accel.models.hf_directory import check_output_directory, model_fingerprint, save_hf_directory
from lit_accel.models.structure import StructurePatterns, as_patterns
from lit_accel.models.surgery import TARGET_PRESETS, find_hf_model, run_after_configure_model
from lit_accel.resume import BatchSeededRNG
from lit_accel.settings import settings_from, takes_settings
from lit_accel.strategies.sizing import param_numel

__all__ = ["EXPORTS", "LoRA", "LoRASettings"]

EXPORTS = ("adapter", "merged", "both")
"""What ``LoRA(export_dir=...)`` writes at the end of training."""


@dataclass
class LoRASettings:
    """The arguments of :class:`LoRA`, one field each, validated (its docstring says how to choose them).

    Example:
        >>> LoRASettings(r=16, alpha=32).r
        16
    """

    targets: str | list[str] = "all-linear"
    """Which linears get adapters: ``attention``, ``mlp``, ``all-linear``, role names (``q``, ``k``, ``v``, ``o``,
    ``gate``, ``up``, ``down``; GPT-2 and Phi-3 ``qkv``, Phi-3 ``gate_up``), module-name suffixes (``q_proj``) or
    regular expressions. In Mixtral and Qwen3-MoE the experts are 3-D tensors, not linears, and get no adapters (a
    warning says so; ``targets`` that select nothing else are refused at set-up)."""
    r: int = 8
    """Rank of every adapter, ``>= 1`` and ``<= min(in, out)`` of each adapted linear."""
    alpha: float = 16
    """Adapter scale numerator: ``scaling = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``); ``> 0``."""
    dropout: float = 0.0
    """Dropout on the adapters' input, in ``[0, 1)``."""
    init: Literal["gaussian", "pissa"] = "gaussian"
    """``gaussian`` (PEFT's default: A kaiming-uniform, B zero) or ``pissa`` (principal singular vectors)."""
    use_rslora: bool = False
    """Rank-stabilised scaling ``alpha / sqrt(r)``."""
    base_dtype: str | None = None
    """Store the frozen base weights of adapted linears in this dtype (``bfloat16`` saves memory with
    ``bf16-mixed``); None leaves them as built."""
    adapter_only_checkpoints: bool = True
    """Checkpoints hold only the adapters and the settings (the base is rebuilt from the model source on resume and
    export)."""
    export_dir: str | None = None
    """If set, write ``<export_dir>/adapter`` and/or ``<export_dir>/merged`` when training ends."""
    export: Literal["adapter", "merged", "both"] = "adapter"
    """``adapter`` (PEFT adapter), ``merged`` (plain Hugging Face model with the adapters folded in) or ``both``."""
    overwrite: bool = False
    """Replace a previous export in the export directories (the files its ``lit_accel_export.json`` lists; other
    files there are kept); without it a non-empty export directory stops the fit at its start."""
    patterns: StructurePatterns | None = None
    """Module-name patterns (a :class:`~lit_accel.models.structure.StructurePatterns` or a dict of its fields) for a
    model that is not a supported Hugging Face architecture."""
    recompute_inputs: bool = True
    """Rebuild each adapter's input in the backward from the fused RMSNorm / SwiGLU kernel that produced it,
    instead of keeping it from the forward: less activation memory (CUDA kernel path only; elsewhere no effect),
    one extra memory-bound kernel per adapted input. Changes no result. On by default: it is what keeps a LoRA
    step's peak memory at the frozen model's (``benchmarks/RESULTS.md``, "LoRA training step"). Under DeepSpeed
    ZeRO-3 the norms' inputs include partitioned weights that are released after their forward, so the norm outputs
    are kept as usual there."""

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"LoRA {name}={getattr(self, name)!r} is not allowed; {name} must be {allowed}")

        if isinstance(self.targets, (list, tuple)):
            if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
                raise bad("targets", f"a preset {TARGET_PRESETS}, a pattern, or a non-empty list of them")
            self.targets = list(self.targets)
        elif not isinstance(self.targets, str) or not self.targets:
            raise bad("targets", f"a preset {TARGET_PRESETS}, a pattern, or a non-empty list of them")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise bad("r", "an int >= 1")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise bad("alpha", "a number > 0")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise bad("dropout", "a number in [0, 1)")
        if not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", "in [0, 1)")
        if self.init not in LORA_INITS:
            raise bad("init", f"one of {LORA_INITS}")
        if not isinstance(self.use_rslora, bool):
            raise bad("use_rslora", "a bool")
        try:
            parse_dtype(self.base_dtype)
        except ValueError:
            raise bad("base_dtype", "bfloat16, float16, float32 or None") from None
        if isinstance(self.base_dtype, torch.dtype):
            self.base_dtype = str(self.base_dtype).removeprefix("torch.")
        if self.export not in EXPORTS:
            raise bad("export", f"one of {EXPORTS}")
        if self.export_dir is not None and not isinstance(self.export_dir, (str, os.PathLike)):
            raise bad("export_dir", "a directory path or None")
        if self.export_dir is not None:
            self.export_dir = os.fspath(self.export_dir)
        self.patterns = as_patterns(self.patterns, "LoRA")
        if not isinstance(self.recompute_inputs, bool):
            raise bad("recompute_inputs", "a bool")

    def apply_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~lit_accel.lowrank.lora.apply_lora`."""
        return dict(
            targets=self.targets,
            r=self.r,
            alpha=self.alpha,
            dropout=self.dropout,
            init=self.init,
            use_rslora=self.use_rslora,
            base_dtype=self.base_dtype,
            patterns=self.patterns,
            recompute_inputs=self.recompute_inputs,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python settings, as recorded in checkpoints."""
        out = dataclasses.asdict(self)
        out["patterns"] = dataclasses.asdict(self.patterns) if self.patterns is not None else None
        return out


def _export_paths(export_dir: str, export: str) -> list[tuple[str, Path]]:
    kinds = ["adapter", "merged"] if export == "both" else [export]
    return [(kind, Path(export_dir) / kind) for kind in kinds]


@takes_settings(LoRASettings)
class LoRA(L.Callback):
    """Trains low-rank adapters on a frozen model (LoRA, optionally PiSSA-initialised or rank-stabilised).

    The adapters are added to the selected linears right after ``configure_model`` builds the model, so the
    optimizer (built later) holds only them; every base parameter is frozen. Outputs and gradients equal PEFT's
    for the same weights. On CUDA in bf16/fp16 the adapted linears run fused (:mod:`lit_accel.ops.lora`), elsewhere
    as PEFT computes them.

    Choosing settings: ``r`` 8-64 on ``all-linear`` is the usual fine-tuning range; ``alpha = 2 r`` keeps the
    update's scale; ``use_rslora`` for large ranks; ``init="pissa"`` converges faster by training the principal
    subspace. ``base_dtype="bfloat16"`` with ``precision="bf16-mixed"`` stores the frozen base in bf16 (the adapters
    stay fp32 so the optimizer updates fp32 values) and saves 2 bytes per base parameter. Do not use
    ``precision="bf16-true"``: it would cast the adapters to bf16 too.

    Checkpoints: with ``adapter_only_checkpoints`` (default) a checkpoint holds only the adapters (and any other
    trainable parameter) plus the settings and the base folder's fingerprint
    (:func:`~lit_accel.models.hf_directory.model_fingerprint`); resuming rebuilds the base from the model source (a
    ``CausalLM`` loading a pretrained directory), refuses it if it is not the model trained on, and loads the
    adapters over it. A ``CausalLM`` built from scratch (a preset, no pretrained weights) cannot rebuild its base,
    so its checkpoints keep the base (with a warning). Under DeepSpeed the engine writes the checkpoint itself: the
    callback sets the strategy's ``exclude_frozen_parameters`` so that its module states (and ``lit-accel export``'s
    consolidated state) hold only the adapters too, and the engine loads them non-strictly over the rebuilt base.

    Distributed: DDP averages the adapters' gradients like any others (every rank starts from rank 0's values,
    which DDP broadcasts). Under DeepSpeed ZeRO-3 the export gathers the partitioned parameters on every rank
    and rank 0 writes, so the adapter is never saved empty.

    Logged once at the start of fit: ``lora/trainable_params``, ``lora/total_params``, ``lora/trainable_fraction``.

    Args: see :class:`LoRASettings`.

    Raises:
        ValueError: At construction for a bad argument (the message names it, the value and what is allowed); at
            set-up for targets matching nothing (listing the model's linears, or saying that they select only
            mixture-of-experts MLPs) or ``r`` larger than a matched linear allows (naming it and its shape); at the
            start of fit for a PEFT ``export`` of adapters PEFT could not load (dense MLP linears of a
            mixture-of-experts model, see :func:`~lit_accel.lowrank.lora_io.peft_layout_problem`).
        FileExistsError: At set-up, when an export directory is not empty and ``overwrite`` is False, or holds model
            files that no export recorded writing.
        ValueError: On resuming an adapter-only checkpoint over a base model folder that holds another model than
            the one it was trained on (naming both folders and what differs).

    Example:
        >>> LoRA(r=16, alpha=32, targets="attention").settings.targets
        'attention'
    """

    def __init__(
        self,
        targets: str | list[str] = "all-linear",
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        init: Literal["gaussian", "pissa"] = "gaussian",
        use_rslora: bool = False,
        base_dtype: str | None = None,
        adapter_only_checkpoints: bool = True,
        export_dir: str | None = None,
        export: Literal["adapter", "merged", "both"] = "adapter",
        overwrite: bool = False,
        patterns: StructurePatterns | None = None,
        recompute_inputs: bool = True,
    ) -> None:
        super().__init__()
        self.settings = settings_from(LoRASettings, locals())
        self.layer_names: list[str] = []
        self._warned_full_checkpoint = False
        # The fingerprint of the pretrained folder the frozen base is loaded from (adapter-only checkpoints only).
        self._base: dict[str, Any] | None = None
        # Adapter dropout draws from the global generators: seeded per batch, a resumed run draws the same masks.
        self._rng = BatchSeededRNG()

    # ------------------------------------------------------------------ set-up
    def _apply(self, model: nn.Module) -> None:
        layers = apply_lora(model, **self.settings.apply_kwargs())
        self.layer_names = list(layers)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        s = self.settings
        # Checked on every rank (a shared file system): a rank that raised alone would leave the others waiting.
        if s.export_dir is not None and stage == "fit":
            for _, path in _export_paths(s.export_dir, s.export):
                check_output_directory(path, s.overwrite, name="LoRA export_dir:")
        if s.adapter_only_checkpoints:
            pl_module.strict_loading = False
            base_dir = getattr(getattr(pl_module, "source", None), "pretrained_dir", None)
            if base_dir is not None:
                # Taken now, as configure_model loads the base from this folder: a checkpoint records the base the
                # adapters were trained on, even if the folder is replaced later in the run.
                self._base = model_fingerprint(base_dir)
            if isinstance(trainer.strategy, DeepSpeedStrategy) and self._base_is_rebuildable(pl_module):
                # DeepSpeed writes its own checkpoint (Lightning drops checkpoint["state_dict"]), so on_save_checkpoint
                # cannot thin it; the engine leaves frozen parameters out when asked to.
                trainer.strategy.exclude_frozen_parameters = True
        run_after_configure_model(pl_module, self._apply, tag="lora")
        if any(True for _ in pl_module.parameters()):
            # The model already exists (built in __init__): adapt it now, still before the optimizer is built.
            self._apply(find_hf_model(pl_module))

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = find_hf_model(pl_module)
        layers = lora_layers(model)
        if not layers:
            raise RuntimeError(
                "LoRA: the model has no LoRA layers at the start of fit; the callback applies them after"
                " configure_model (or in setup if the model already exists). Does the LightningModule build its"
                " model elsewhere?"
            )
        self.layer_names = list(layers)
        s = self.settings
        if s.export_dir is not None and s.export in ("adapter", "both"):
            # Refused before training rather than after it: the PEFT export at the end could not be loaded.
            problem = peft_layout_problem(model, self.layer_names, s.patterns)
            if problem:
                raise ValueError(f"LoRA export={s.export!r}: {problem}")
        trainable = sum(param_numel(p) for p in pl_module.parameters() if p.requires_grad)
        total = sum(param_numel(p) for p in pl_module.parameters())
        metrics = {
            "lora/trainable_params": float(trainable),
            "lora/total_params": float(total),
            "lora/trainable_fraction": trainable / max(total, 1),
        }
        rank_zero_info(
            f"LoRA: {len(layers)} layers adapted (r={self.settings.r}, alpha={self.settings.alpha:g}); trainable"
            f" {trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.3f}%)"
        )
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    # ------------------------------------------------------------------ checkpoints
    def _base_is_rebuildable(self, pl_module: L.LightningModule) -> bool:
        source = getattr(pl_module, "source", None)
        return source is None or getattr(source, "pretrained_dir", None) is not None

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"settings": self.settings.to_dict(), "layers": list(self.layer_names)}
        if self.settings.dropout > 0:
            state["batch_rng"] = self._rng.state_dict()
        return state

    @override
    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        record = (checkpoint.get("lit_accel") or {}).get("lora") or {}
        if record.get("adapter_only") and isinstance(record.get("base"), dict) and self._base is not None:
            # The base is rebuilt from the model folder, not read from the checkpoint: it must be the one trained on.
            check_lora_base(record["base"], self._base, "LoRA: resuming this checkpoint")
        # strict_loading is off so adapter-only checkpoints load over the rebuilt base; that must not let a resume
        # with other targets or ranks start from freshly initialised adapters without a word.
        saved = checkpoint.get("state_dict", {})
        missing = [k for k in pl_module.state_dict() if (".lora_A" in k or ".lora_B" in k) and k not in saved]
        if missing and any(".lora_" in k for k in saved):
            shown = ", ".join(missing[:6]) + (f", ... ({len(missing)} in all)" if len(missing) > 6 else "")
            raise ValueError(
                f"LoRA: the checkpoint has no adapter weights for {shown}; resume with the LoRA targets and r the run"
                " was trained with (see the checkpoint's lit_accel.lora record)."
            )

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("settings") or {}
        mine = self.settings.to_dict()
        changed = {
            k: (saved[k], mine[k]) for k in ("r", "targets", "init", "use_rslora") if k in saved and saved[k] != mine[k]
        }
        if changed:
            rank_zero_warn(
                f"LoRA: resuming with settings that differ from the checkpoint's (checkpoint, now): {changed}"
            )
        self._rng.load_state_dict(state_dict.get("batch_rng") or {})

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if self.settings.dropout > 0:
            self._rng.begin(trainer.current_epoch, idx, trainer.global_rank, pl_module.device)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        self._rng.end()

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        adapter_only = self.settings.adapter_only_checkpoints
        if adapter_only and not self._base_is_rebuildable(pl_module):
            adapter_only = False
            if not self._warned_full_checkpoint:
                self._warned_full_checkpoint = True
                rank_zero_warn(
                    "LoRA adapter_only_checkpoints: the model was built from scratch (no pretrained directory), so its"
                    " base weights cannot be rebuilt on resume; checkpoints keep the full model."
                )
        record = {**self.state_dict(), "adapter_only": adapter_only}
        if adapter_only and self._base is not None:
            record["base"] = self._base
        checkpoint.setdefault("lit_accel", {})["lora"] = record
        state = checkpoint.get("state_dict")
        if not adapter_only or not isinstance(state, dict) or not state:
            return
        keep = {name for name, p in pl_module.named_parameters() if p.requires_grad}
        for key in list(state):
            if key not in keep:
                del state[key]

    # ------------------------------------------------------------------ export
    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        s = self.settings
        where = "adapters only" if s.adapter_only_checkpoints else "the whole model"
        rank_zero_info(
            f"LoRA: trained the adapters of {len(self.layer_names)} layers (r={s.r}) for {trainer.global_step} steps;"
            f" checkpoints hold {where}"
            + (
                f"; exporting to {s.export_dir}"
                if s.export_dir
                else "; `lit-accel export --ckpt <last.ckpt>` merges them"
            )
        )
        if s.export_dir is None:
            return
        model = find_hf_model(pl_module)
        for kind, path in _export_paths(s.export_dir, s.export):
            if kind == "adapter":
                source = getattr(pl_module, "source", None)
                base = getattr(source, "pretrained_dir", None)
                save_peft_adapter(model, path, base_model_name_or_path=base, overwrite=s.overwrite)
            else:
                _save_merged(trainer, model, path, overwrite=s.overwrite)
            rank_zero_info(f"LoRA: wrote the {kind} model to {path}")


def _save_merged(trainer: L.Trainer, model: nn.Module, path: Path, overwrite: bool) -> None:
    state = merged_state_dict(model)  # gathers on every rank under ZeRO-3
    if not trainer.is_global_zero:
        return
    tok = None
    tok_dir = getattr(getattr(trainer, "datamodule", None), "tokenizer_dir", None)
    if tok_dir and Path(tok_dir).is_dir():
        tok = AutoTokenizer.from_pretrained(str(tok_dir))
    save_hf_directory(model, state, path, tokenizer=tok, overwrite=overwrite)  # type: ignore[arg-type]
