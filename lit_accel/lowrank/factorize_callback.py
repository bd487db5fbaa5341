"""``LowRankFactorization``: a Lightning callback that trains a model whose large linears are SVD-factorised.

The algorithm is in :mod:`lit_accel.lowrank.factorize`; this callback only decides *when*. Timeline of a fit:

1. ``setup``: arranges for the factorisation to run right after ``configure_model`` builds (or loads) the model,
   which is before the optimizer exists and before the strategy wraps or shards the model, so the optimizer only
   ever sees the factors and ZeRO-3 partitions them like any other parameter. It also arranges for a resumed run
   to take the *saved* ranks (see below).
2. ``configure_model`` (Lightning's): the matched linears are replaced by their truncated SVD factors; the
   per-layer report is printed and, at ``on_fit_start``, logged.
3. Checkpoints store the per-layer ranks (``checkpoint["lit_accel"]["factorization"]`` and the callback state).
4. ``on_train_end``: with ``export_dir``, writes the model, merged (a plain Hugging Face model) or factorised.

Resuming. Lightning builds the model (``configure_model``) *before* it restores the checkpoint, and restores the
callbacks' state only *after* the module's weights. With ``energy``, the ranks chosen at set-up depend on the
weights the model starts from, which on resume may differ from those the first run factorised (another seed,
another initialisation), and then the checkpoint's ``down``/``up`` tensors would not fit. So the callback wraps
the LightningModule's ``on_load_checkpoint`` hook, which Lightning calls just before loading the state dict (and,
except under DeepSpeed, before building the optimizer): there the saved ranks are read from the checkpoint and
the structure is rebuilt to match (:func:`~lit_accel.lowrank.factorize.rebuild_factorization`), then the
checkpoint's weights load as usual. DeepSpeed restores after building its engine; there, resume with the same
ranks by passing ``rank={...}`` (the dict the first run printed, also in the checkpoint and the export).

Example:
    >>> import lightning as L
    >>> from lit_accel.lowrank.factorize_callback import LowRankFactorization
    >>> trainer = L.Trainer(max_steps=1000, callbacks=[LowRankFactorization("attention", energy=0.9)])  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lit_accel.lowrank.factorize import apply_factorization, rebuild_factorization
from lit_accel.lowrank.factorize_io import save_factorized, save_merged
from lit_accel.lowrank.factorize_layer import (
    FactorizationReport,
    factorization_ranks,
    format_report,
    model_matmul_flops_per_token,
)
from lit_accel.models.structure import StructurePatterns, as_patterns
from lit_accel.models.surgery import TARGET_PRESETS, find_hf_model, run_after_configure_model
from lit_accel.observe.wandb import BarChart, WandbCharts, other_loggers
from lit_accel.settings import settings_from, takes_settings
from lit_accel.strategies.sizing import param_numel

__all__ = ["FactorizationSettings", "LowRankFactorization"]


@dataclass
class FactorizationSettings:
    """The arguments of :class:`LowRankFactorization`, one field each, validated.

    Example:
        >>> FactorizationSettings(targets="mlp", energy=0.9).energy
        0.9
    """

    targets: str | list[str] = "attention"
    """Which linears: ``"attention"``, ``"mlp"``, ``"all-linear"``, role names (``q``, ``k``, ``v``, ``o``,
    ``gate``, ``up``, ``down``; GPT-2 and Phi-3 ``qkv``, Phi-3 ``gate_up``), module-name suffixes or regular
    expressions. The LM head never. In Mixtral and Qwen3-MoE the experts are 3-D tensors, not linears, and stay
    dense (a warning says so; ``targets`` that select nothing else are refused at set-up)."""
    rank: int | dict[str, int] | None = None
    """One rank ``r`` for every target (``1 <= r < min(in, out)``), or a dict qualified layer name -> rank (e.g. to
    resume under DeepSpeed with the ranks a first run chose). Exactly one of ``rank`` and ``energy``."""
    energy: float | None = None
    """Per layer, the smallest rank keeping this fraction, in ``(0, 1]``, of the sum of squared singular values."""
    patterns: StructurePatterns | None = None
    """Module names of a model that :func:`~lit_accel.models.structure.get_structure` does not know (a
    :class:`~lit_accel.models.structure.StructurePatterns` or a dict of its fields)."""
    skip_if_not_smaller: bool = True
    """Leave a layer dense (reported, with the reason) when ``r * (in + out) >= in * out``: no saving."""
    export_dir: str | None = None
    """Where ``on_train_end`` writes the trained model (a Hugging Face directory); None writes nothing."""
    export: Literal["merged", "factorized"] = "merged"
    """``"merged"``: dense weights ``up @ down``, a plain HF model (``from_pretrained``), no size saving.
    ``"factorized"``: the factors plus ``lit_accel_factorization.json``; load with
    :func:`~lit_accel.lowrank.factorize_io.load_factorized` (keeps the saving)."""

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(
                f"LowRankFactorization {name}={getattr(self, name)!r} is not allowed; {name} must be {allowed}"
            )

        if isinstance(self.targets, str):
            if not self.targets:
                raise bad("targets", f"a preset {TARGET_PRESETS}, a role, a name pattern, or a list of them")
        elif isinstance(self.targets, (list, tuple)) and self.targets and all(isinstance(t, str) for t in self.targets):
            self.targets = list(self.targets)
        else:
            raise bad("targets", f"a preset {TARGET_PRESETS}, a role, a name pattern, or a non-empty list of them")
        if (self.rank is None) == (self.energy is None):
            raise ValueError(
                f"LowRankFactorization needs exactly one of rank and energy (got rank={self.rank!r}, "
                f"energy={self.energy!r}): rank fixes r for every layer; energy in (0, 1] picks per layer the "
                "smallest r keeping that fraction of the squared singular values"
            )
        if self.rank is not None:
            if isinstance(self.rank, Mapping):
                if not self.rank or not all(
                    isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 1
                    for k, v in self.rank.items()
                ):
                    raise bad("rank", "an int >= 1 or a non-empty dict layer name -> int >= 1")
                self.rank = dict(self.rank)
            elif isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
                raise bad("rank", "an int >= 1 (and < min(in, out) of every target) or a dict layer name -> rank")
        if self.energy is not None:
            if isinstance(self.energy, bool) or not isinstance(self.energy, (int, float)):
                raise bad("energy", "a number in (0, 1]")
            if not 0.0 < float(self.energy) <= 1.0:
                raise bad("energy", "in (0, 1] (a fraction of the sum of squared singular values)")
            self.energy = float(self.energy)
        if not isinstance(self.skip_if_not_smaller, bool):
            raise bad("skip_if_not_smaller", "True or False")
        if self.export not in ("merged", "factorized"):
            raise bad("export", "'merged' or 'factorized'")
        if self.export_dir is not None and not isinstance(self.export_dir, (str, os.PathLike)):
            raise bad("export_dir", "a directory path or None")
        if self.export_dir is not None:
            self.export_dir = os.fspath(self.export_dir)
        self.patterns = as_patterns(self.patterns, "LowRankFactorization")


@takes_settings(FactorizationSettings)
class LowRankFactorization(L.Callback):
    """Replaces the targeted linears by their truncated SVD (two thin linears) before training, and trains on.

    Each matched ``W [out, in]`` becomes ``up @ down`` of rank ``r``, cutting that layer's parameters and FLOPs
    per token from ``in * out`` to ``r * (in + out)``. The reconstruction error is reported per layer; training
    recovers part of it. Works on any LightningModule holding a Hugging Face causal LM at ``.model`` (or being
    one), under DDP and DeepSpeed ZeRO 1/2/3. Cannot be combined with LoRA on the same layers (LoRA wraps dense
    linears): that is an error at set-up.

    Logged once (at ``on_fit_start``; rank 0): ``factorize/params_before`` and ``factorize/params_after`` (whole
    model), ``factorize/params_saved_fraction``, ``factorize/flops_saved_fraction`` (of the model's weight-matmul
    FLOPs per token, LM head included), ``factorize/mean_rel_error`` (over factorised layers),
    ``factorize/layers_factorized`` and ``factorize/layers_skipped``; per layer a W&B table and bar chart of the
    relative errors with a ``WandbLogger``, else ``factorize/rank/<layer>`` and ``factorize/rel_error/<layer>``.

    Args: see :class:`FactorizationSettings`.

    Raises:
        ValueError: Invalid arguments (at construction); targets matching nothing, a rank out of range for a
            layer, or LoRA-wrapped targets (at set-up).

    Example:
        >>> import lightning as L
        >>> from lit_accel.models import CausalLM
        >>> cb = LowRankFactorization(targets="attention", energy=0.9, export_dir="out/factorized")
        >>> L.Trainer(max_steps=100, callbacks=[cb]).fit(CausalLM("llama-tiny"), datamodule=...)  # doctest: +SKIP
    """

    def __init__(
        self,
        targets: str | list[str] = "attention",
        rank: int | dict[str, int] | None = None,
        energy: float | None = None,
        patterns: StructurePatterns | None = None,
        skip_if_not_smaller: bool = True,
        export_dir: str | None = None,
        export: Literal["merged", "factorized"] = "merged",
    ) -> None:
        super().__init__()
        self.settings = settings_from(FactorizationSettings, locals())
        self.reports: list[FactorizationReport] = []
        """Per-layer reports of the last factorisation (empty until ``configure_model`` ran)."""
        self.ranks: dict[str, int] = {}
        """Layer name (relative to the Hugging Face model) -> rank of every factorised layer."""
        self.metrics: dict[str, float] = {}
        """The ``factorize/*`` totals of the last factorisation."""
        self._pending_log = False
        self._charts = WandbCharts("LowRankFactorization")

    # ------------------------------------------------------------------ set-up
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        export_dir = self.settings.export_dir
        if stage == "fit" and export_dir is not None and Path(export_dir).is_dir() and any(Path(export_dir).iterdir()):
            # Found now rather than after the whole run, when the export would refuse to overwrite it.
            raise ValueError(
                f"LowRankFactorization export_dir={export_dir!r} exists and is not empty; choose a new directory or "
                "remove it."
            )
        run_after_configure_model(pl_module, self._apply, tag="factorize")
        _restore_saved_ranks_before_loading(pl_module, self)

    def _apply(self, model: nn.Module) -> None:
        s = self.settings
        already = factorization_ranks(model)
        params_before = _num_params(model)
        flops_before = model_matmul_flops_per_token(model, s.patterns)
        reports = apply_factorization(
            model,
            s.targets,
            rank=s.rank,
            energy=s.energy,
            patterns=s.patterns,
            skip_if_not_smaller=s.skip_if_not_smaller,
        )
        self.ranks = factorization_ranks(model)
        if already and not any(r.factorized for r in reports):
            # Already factorised (e.g. validate after fit with the same module): keep the first run's report.
            return
        params_after = _num_params(model)
        flops_after = model_matmul_flops_per_token(model, s.patterns)
        done = [r for r in reports if r.factorized]
        self.reports = reports
        self.metrics = {
            "factorize/params_before": float(params_before),
            "factorize/params_after": float(params_after),
            "factorize/params_saved_fraction": 1.0 - params_after / params_before if params_before else 0.0,
            "factorize/flops_saved_fraction": 1.0 - flops_after / flops_before if flops_before else 0.0,
            "factorize/mean_rel_error": sum(r.rel_error or 0.0 for r in done) / len(done) if done else 0.0,
            "factorize/layers_factorized": float(len(done)),
            "factorize/layers_skipped": float(len(reports) - len(done)),
        }
        self._pending_log = True
        rank_zero_info(f"LowRankFactorization:\n{format_report(reports)}\nranks: {self.ranks}")
        if not done:
            rank_zero_warn(
                "LowRankFactorization: no layer was factorised (each would have grown); use a smaller rank or energy."
            )

    # ------------------------------------------------------------------ logging
    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer)

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer)

    @override
    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer)

    def _log(self, trainer: L.Trainer) -> None:
        if not self._pending_log:
            return
        self._pending_log = False
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        for logger in trainer.loggers:
            logger.log_metrics(dict(self.metrics), step=step)
        columns = ["layer", "out", "in", "rank", "factorized", "params_before", "params_after", "flops_before"]
        columns += ["flops_after", "rel_error", "energy_kept", "note"]
        rows = [
            [
                *(r.name, r.out_features, r.in_features, r.rank, r.factorized, r.params_before, r.params_after),
                *(r.flops_before, r.flops_after, r.rel_error, r.energy_kept, r.reason or ""),
            ]
            for r in self.reports
        ]
        charts = {
            "factorize/rel_error_per_layer": BarChart(
                "layer", "rel_error", "SVD factorisation: relative error per layer"
            ),
            "factorize/rank_per_layer": BarChart("layer", "rank", "SVD factorisation: rank per layer"),
        }
        self._charts.log(trainer, "factorize/layers", columns, rows, charts)
        per_layer: dict[str, float] = {}
        for r in self.reports:
            per_layer[f"factorize/rank/{r.name}"] = float(r.rank if r.factorized else 0)
            if r.rel_error is not None:
                per_layer[f"factorize/rel_error/{r.name}"] = r.rel_error
        for logger in other_loggers(trainer):
            logger.log_metrics(per_layer, step=step)

    # ------------------------------------------------------------------ checkpoints
    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint.setdefault("lit_accel", {})["factorization"] = {"ranks": dict(self.ranks)}

    @override
    def state_dict(self) -> dict[str, Any]:
        # Kept here too: the callback state survives even if a module's own on_save_checkpoint (which Lightning
        # calls after the callbacks') replaces checkpoint["lit_accel"].
        return {"ranks": dict(self.ranks)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ranks = state_dict.get("ranks")
        if isinstance(ranks, Mapping):
            self.ranks = {str(k): int(v) for k, v in ranks.items()}

    # ------------------------------------------------------------------ export
    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        s = self.settings
        model = find_hf_model(pl_module)
        rank_zero_info(
            f"LowRankFactorization: trained {len(self.ranks)} factorised layers for {trainer.global_step} steps;"
            f" the model has {_num_params(model) / 1e6:.2f}M parameters"
            + (f"; exporting the {s.export} model to {s.export_dir}" if s.export_dir else "")
        )
        if s.export_dir is None:
            return
        tokenizer = _datamodule_tokenizer(trainer)
        # Called on every rank: under ZeRO-3 the weights are gathered collectively; only rank 0 writes.
        if s.export == "merged":
            path = save_merged(model, s.export_dir, tokenizer=tokenizer)
        else:
            path = save_factorized(model, s.export_dir, tokenizer=tokenizer)
        rank_zero_info(f"LowRankFactorization: exported the {s.export} model to {path}")


def _num_params(model: nn.Module) -> int:
    return sum(param_numel(p) for p in model.parameters())


def _datamodule_tokenizer(trainer: L.Trainer) -> Any | None:
    datamodule = getattr(trainer, "datamodule", None)
    try:
        tokenizer = getattr(datamodule, "tokenizer", None)
    except Exception:  # a data module may build its tokenizer lazily and fail when it has none
        return None
    return tokenizer if hasattr(tokenizer, "save_pretrained") else None


def _saved_ranks(checkpoint: Mapping[str, Any], state_key: str) -> dict[str, int] | None:
    saved = checkpoint.get("lit_accel", {}).get("factorization", {}).get("ranks")
    if saved is None:
        saved = checkpoint.get("callbacks", {}).get(state_key, {}).get("ranks")
    if not isinstance(saved, Mapping):
        return None
    return {str(k): int(v) for k, v in saved.items()}


def _restore_saved_ranks_before_loading(pl_module: L.LightningModule, callback: LowRankFactorization) -> None:
    """Wraps ``pl_module.on_load_checkpoint`` so the saved structure is rebuilt before the state dict loads."""
    pl_module.__dict__["_lit_accel_factorize_callback"] = callback
    if pl_module.__dict__.get("_lit_accel_factorize_restore_wrapped"):
        return
    original: Callable[[dict[str, Any]], None] = pl_module.on_load_checkpoint

    def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
        cb: LowRankFactorization = pl_module.__dict__["_lit_accel_factorize_callback"]
        model = find_hf_model(pl_module)
        current = factorization_ranks(model)
        saved = _saved_ranks(checkpoint, cb.state_key)
        if saved is None:
            if current:
                raise ValueError(
                    "LowRankFactorization: this checkpoint was written without factorisation, so its dense weights "
                    "do not fit the factorised model. To factorise a trained dense model, start a new run from its "
                    "weights (export it, then CausalLM(model=<exported dir>)) instead of resuming."
                )
        elif saved != current:
            trainer = pl_module._trainer
            if trainer is not None and trainer.strategy.restore_checkpoint_after_setup:
                raise ValueError(
                    "LowRankFactorization: the checkpoint's ranks differ from those chosen at set-up, and this "
                    "strategy restores after building the optimizer, so the structure cannot be rebuilt. Resume "
                    f"with rank={saved} (the saved ranks) instead of energy."
                )
            rebuild_factorization(model, saved)
            rank_zero_info(f"LowRankFactorization: rebuilt the saved structure before loading, ranks {saved}")
            # The reports describe the SVD of the set-up weights, not the saved structure.
            cb.reports, cb.metrics = [], {}
        if saved is not None:
            cb.ranks = dict(saved)
            # The first run logged the factorisation at its start; the set-up weights' SVD says nothing new.
            cb._pending_log = False
        original(checkpoint)

    pl_module.on_load_checkpoint = on_load_checkpoint  # type: ignore[method-assign]
    pl_module.__dict__["_lit_accel_factorize_restore_wrapped"] = True
