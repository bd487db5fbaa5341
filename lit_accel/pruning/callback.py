"""``StructuredPruning``: the Lightning callback that learns Sheared-LLaMA masks during a fit.

The algorithm lives in :mod:`lit_accel.pruning.masks`, :mod:`~lit_accel.pruning.apply`,
:mod:`~lit_accel.pruning.targets` and :mod:`~lit_accel.pruning.export`; the callback only decides *when*:

1. ``setup``: registers, via :func:`~lit_accel.models.surgery.run_after_configure_model`, the creation of the
   :class:`L0Masks` and the :class:`Lagrangian` right after ``configure_model`` builds the model. They are added to
   the LightningModule as the submodule ``pruning`` (so they are in its ``state_dict``, hence in every checkpoint,
   and DDP averages their gradients), and the mask hooks are put on the model. ``configure_optimizers`` is wrapped
   so that they get their own parameter groups (``mask_lr`` and ``lambda_lr``, no weight decay) instead of the
   model's; they follow the model's LambdaLR multiplier (warm-up, decay), one schedule for every group;
   ``training_step`` is wrapped so that the Lagrangian penalty is added to the loss.
2. Every training step: the masks are sampled once per forward from a generator seeded with ``(seed,
   global_step)``, the same on every rank and again after a resume; the penalty uses the target ramped over
   ``lagrangian_warmup_steps``; ``pruning/...`` metrics are logged.
3. Validation runs under the deterministic masks (the target architecture). At the end of every validation (and
   every ``chart_every_n_steps`` steps if set), rank zero logs the expected, kept and target size of every layer
   (:func:`~lit_accel.pruning.report.architecture_report`) to each ``WandbLogger`` as the table
   ``pruning/architecture`` and the line charts ``pruning/chart/{blocks,kv_heads,intermediate,hidden}``; other
   loggers get only the scalar ``pruning/kept_params``.
4. ``on_train_end``: with ``export_dir``, writes the physically pruned model (:func:`export_pruned_gathered`) there.
5. Checkpoints record the target and the units kept per group (``checkpoint["lit_accel"]["pruning"]``), so that
   ``lit-accel export`` (:func:`~lit_accel.pruning.export.export_pruned_checkpoint`) can export the pruned model
   from any checkpoint of the run.

**Strategies.** One device, DDP and DeepSpeed ZeRO-1/2/3 learn the same masks. ``log_alpha`` is clamped into
``[LOG_ALPHA_MIN, LOG_ALPHA_MAX]`` after every optimizer step (and before the first) through
:func:`~lit_accel.models.params.full_parameters`, so DeepSpeed's fp32 master copy is clamped too (its next step would
otherwise restore the unclamped value). Under ZeRO-3 the masks and multipliers are partitioned like every other
parameter (they are created inside ``zero.Init``, with the model): the callback gathers them, read-only, from the
start of each training step to the end of its backward (autograd accumulates their full-shape gradients into them),
and for every read outside a step (evaluation masks, reports, export); the export gathers the model's weights to
rank 0 only then, one module at a time.

:meth:`StructuredPruning.bypass` switches the masks off for a while (the model computes as the source model);
:class:`~lit_accel.data.DynamicBatchLoading` uses it to measure reference losses on the source model.

Example:
    >>> import lightning as L
    >>> from lit_accel.pruning.callback import StructuredPruning
    >>> cb = StructuredPruning(num_layers=12, num_kv_heads=4, intermediate_size=2048, hidden_size=1024)
    >>> cb = StructuredPruning(preset="llama-1b-half")  # or a preset's shape
    >>> trainer = L.Trainer(max_steps=1000, callbacks=[cb])  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lit_accel.models.hf_directory import save_hf_directory
from lit_accel.models.params import full_parameters, gathered_for_reading
from lit_accel.models.structure import get_structure
from lit_accel.models.surgery import find_hf_model, run_after_configure_model
from lit_accel.observe.wandb import WandbCharts, wandb_loggers
from lit_accel.pruning.apply import MaskHooks, apply_masks
from lit_accel.pruning.export import export_pruned_gathered
from lit_accel.pruning.masks import LOG_ALPHA_MAX, LOG_ALPHA_MIN, L0Masks, check_prunable, count_params
from lit_accel.pruning.report import architecture_charts, architecture_report
from lit_accel.pruning.targets import Lagrangian, PruningTarget, constraint_loss
from lit_accel.settings import settings_from, takes_settings

__all__ = ["StructuredPruning", "StructuredPruningSettings"]

_TAG = "structured_pruning"


_MODULE_SWAPPERS = ("LoRA", "LowRankFactorization", "SemiStructuredSparsity")


@dataclass
class StructuredPruningSettings:
    """The arguments of :class:`StructuredPruning`, one field each, validated. The target is given one way: explicit
    dims (any of the first four), ``param_ratio``, or ``preset`` (see
    :class:`~lit_accel.pruning.targets.PruningTarget`).

    Example:
        >>> StructuredPruningSettings(param_ratio=0.5).target().param_ratio
        0.5
    """

    num_layers: int | None = None
    """Decoder blocks to keep (explicit-dims target); None keeps all."""
    num_kv_heads: int | None = None
    """KV heads to keep per layer, with their query heads; None keeps all."""
    intermediate_size: int | None = None
    """MLP channels to keep per layer; None keeps all."""
    hidden_size: int | None = None
    """Hidden dims to keep; None keeps all."""
    param_ratio: float | None = None
    """Instead of dims, the fraction of parameters to keep, in (0, 1)."""
    preset: str | None = None
    """Instead of dims, a preset name whose shape is the target (:data:`~lit_accel.pruning.targets.TARGET_PRESETS`
    or a model preset, e.g. ``llama-1b-half``, ``llama-125m``)."""
    lagrangian_warmup_steps: int = 0
    """Optimizer steps over which the target sparsity ramps linearly from 0."""
    mask_lr: float = 0.1
    """Peak learning rate of the masks' ``log_alpha`` (scaled by the model's schedule)."""
    lambda_lr: float = 0.1
    """Peak learning rate of the Lagrange multipliers (scaled likewise; they ascend, see
    :class:`~lit_accel.pruning.targets.Lagrangian`)."""
    seed: int = 0
    """Seed of the mask samples (combined with the global step and micro-batch: the same on every rank)."""
    export_dir: str | None = None
    """If set, the pruned model is written there (a Hugging Face directory) when training ends."""
    chart_every_n_steps: int | None = None
    """Also log the per-layer architecture charts every this many optimizer steps (they are always logged at the
    end of each validation); None: only at validation."""

    def __post_init__(self) -> None:
        self.target()  # a bad or ambiguous target fails here, at construction
        warmup = self.lagrangian_warmup_steps
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"StructuredPruning: lagrangian_warmup_steps must be an int >= 0, got {warmup!r}")
        for name in ("mask_lr", "lambda_lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"StructuredPruning: {name} must be a number > 0, got {value!r}")
            setattr(self, name, float(value))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"StructuredPruning: seed must be an int, got {self.seed!r}")
        if self.export_dir is not None and not isinstance(self.export_dir, (str, Path)):
            raise ValueError(f"StructuredPruning: export_dir must be a directory path or None, got {self.export_dir!r}")
        n = self.chart_every_n_steps
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"StructuredPruning: chart_every_n_steps must be an int >= 1 or None, got {n!r}")

    def target(self) -> PruningTarget:
        """The target architecture these settings describe."""
        return PruningTarget(
            num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads,
            intermediate_size=self.intermediate_size,
            hidden_size=self.hidden_size,
            param_ratio=self.param_ratio,
            preset=self.preset,
        )


@takes_settings(StructuredPruningSettings)
class StructuredPruning(L.Callback):
    """Learns hard-concrete masks towards a target architecture while the model trains (Sheared-LLaMA).

    The LightningModule must hold a Hugging Face model of a family in :data:`~lit_accel.pruning.masks.PRUNABLE_ARCHS`
    (LLaMA, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3, Phi-3, OLMo 2; found by
    :func:`lit_accel.models.surgery.find_hf_model`, e.g. ``CausalLM.model``) and return the loss from ``training_step``.
    Mixture-of-experts models (Mixtral, Qwen3-MoE) and GPT-2 are refused at set-up, with the reason.

    Args: see :class:`StructuredPruningSettings`.

    Raises:
        ValueError: At construction, for a bad target or a non-positive rate (the message names the argument);
            at set-up, for a model of a family pruning does not support (see above) or a target larger than the
            model.

    Example:
        >>> StructuredPruning(param_ratio=0.5).target  # doctest: +NORMALIZE_WHITESPACE
        PruningTarget(num_layers=None, num_kv_heads=None, intermediate_size=None, hidden_size=None, param_ratio=0.5,
                      preset=None)
    """

    def __init__(
        self,
        num_layers: int | None = None,
        num_kv_heads: int | None = None,
        intermediate_size: int | None = None,
        hidden_size: int | None = None,
        param_ratio: float | None = None,
        preset: str | None = None,
        lagrangian_warmup_steps: int = 0,
        mask_lr: float = 0.1,
        lambda_lr: float = 0.1,
        seed: int = 0,
        export_dir: str | None = None,
        chart_every_n_steps: int | None = None,
    ) -> None:
        super().__init__()
        self.settings = settings_from(StructuredPruningSettings, locals())
        self.target = self.settings.target()
        """The target architecture (from the settings)."""
        self._charted_step = -1
        self._charts = WandbCharts("StructuredPruning")
        self.hooks: MaskHooks | None = None
        self._pl_module: L.LightningModule | None = None
        self._held: contextlib.ExitStack | None = None
        self._projected_step = -1

    @property
    def masks(self) -> L0Masks:
        """The masks (after set-up)."""
        module = self._pruning_module()
        masks = module["masks"]
        assert isinstance(masks, L0Masks)
        return masks

    @property
    def lagrangian(self) -> Lagrangian:
        """The Lagrange multipliers (after set-up)."""
        lagrangian = self._pruning_module()["lagrangian"]
        assert isinstance(lagrangian, Lagrangian)
        return lagrangian

    @contextlib.contextmanager
    def bypass(self, pl_module: L.LightningModule | None = None) -> Iterator[None]:
        """A context in which the masks are off: the model computes as the unpruned source model.

        Used by :class:`~lit_accel.data.DynamicBatchLoading` to measure reference losses on the source model at the
        start of pruning. A no-op before the masks exist.
        """
        hooks = self.hooks
        if hooks is None:
            yield
            return
        with hooks.bypassed():
            yield

    def _pruning_module(self) -> nn.ModuleDict:
        module = getattr(self._pl_module, "pruning", None)
        if not isinstance(module, nn.ModuleDict):
            raise RuntimeError("StructuredPruning: the masks do not exist yet; they are built when the fit sets up")
        return module

    # ------------------------------------------------------------------ ZeRO-3 partitions
    def _readable(self) -> contextlib.AbstractContextManager[None]:
        """The masks' and multipliers' parameters whole for a block, read-only (gathered under ZeRO-3, collective)."""
        return gathered_for_reading(self._pruning_module().parameters())

    def _hold(self) -> None:
        """Gather the masks and multipliers until :meth:`_release`: a training step's forward *and* backward need them
        whole under ZeRO-3 (autograd accumulates their full-shape gradients into them); a no-op otherwise."""
        if self._held is None:
            held = contextlib.ExitStack()
            held.enter_context(self._readable())
            self._held = held

    def _release(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            held.close()

    def _project(self, trainer: L.Trainer) -> None:
        """Clamp every ``log_alpha`` into ``[LOG_ALPHA_MIN, LOG_ALPHA_MAX]`` after each optimizer step (and before the
        first), in the parameters and in the optimizer's fp32 master copy (DeepSpeed), so that every strategy keeps
        what the in-place clamp of the masks' forward keeps on one device. Without this, a DeepSpeed optimizer step
        overwrites the clamp with its unclamped master value (the masks start above the bound)."""
        if self._projected_step == trainer.global_step:
            return
        self._projected_step = trainer.global_step
        with full_parameters(self.masks, modifier_rank=0) as params, torch.no_grad():
            for param in params.values():
                param.clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)

    # ------------------------------------------------------------------ set-up
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # The head and channel masks hook o_proj / down_proj; a callback that replaces those modules would
        # silently drop the masks (and the Lagrangian would prune units the model never learned to lose).
        callbacks: list[Any] = getattr(trainer, "callbacks", [])
        swappers = [type(cb).__name__ for cb in callbacks if type(cb).__name__ in _MODULE_SWAPPERS]
        if swappers:
            raise ValueError(
                f"StructuredPruning cannot be combined with {', '.join(swappers)} in one run: those replace the linear "
                "layers its masks are attached to. Prune first (export_dir), then fine-tune the exported model with "
                "them in a second run."
            )
        export_dir = self.settings.export_dir
        if export_dir is not None and Path(export_dir).is_dir() and any(Path(export_dir).iterdir()):
            raise ValueError(
                f"StructuredPruning export_dir={export_dir!r} exists and is not empty; choose a new directory."
            )
        if not pl_module.automatic_optimization:
            raise ValueError(
                "StructuredPruning adds its Lagrangian penalty to the loss training_step returns, which manual "
                "optimization never backpropagates; use automatic optimization."
            )
        model = find_hf_model(pl_module)
        if model is not pl_module:
            # Already built: refuse a family pruning cannot handle now. A model that configure_model builds later
            # is refused when the masks are made for it (L0Masks), still before the first step.
            check_prunable(get_structure(model))
        self._pl_module = pl_module
        run_after_configure_model(pl_module, self._attach, _TAG)
        self._wrap(pl_module)

    def _attach(self, model: nn.Module) -> None:
        pl_module = self._pl_module
        assert pl_module is not None
        # Idempotent: configure_model may run again (fit then validate) on a model that already has its masks; a
        # new StructuredPruning instance adopts them if it asks for the same target.
        if isinstance(getattr(pl_module, "pruning", None), nn.ModuleDict):
            built_for = pl_module.__dict__.get("_lit_accel_pruning_target")
            if built_for is not None and built_for != repr(self.target):
                raise ValueError(
                    f"StructuredPruning: this module already holds masks for target {built_for}; a new callback asks "
                    f"for {self.target!r}. Start from a fresh module (or the exported model) to change the target."
                )
            self.hooks = pl_module.__dict__.get("_lit_accel_pruning_hooks")
            return
        masks = L0Masks(model)
        masks.set_keep(self.target.keep(masks.shape))
        device = next(model.parameters()).device
        pruning = nn.ModuleDict({"masks": masks, "lagrangian": Lagrangian(self.target)}).to(device)
        pl_module.add_module("pruning", pruning)
        self.hooks = apply_masks(model, masks)
        pl_module.__dict__["_lit_accel_pruning_hooks"] = self.hooks
        pl_module.__dict__["_lit_accel_pruning_target"] = repr(self.target)

    def _wrap(self, pl_module: L.LightningModule) -> None:
        # The wrappers look the callback up at call time: a later StructuredPruning instance (a second Trainer on
        # the same module) is the one whose settings apply.
        pl_module.__dict__["_lit_accel_pruning_callback"] = self
        if pl_module.__dict__.get("_lit_accel_pruning_wrapped"):
            return
        pl_module.__dict__["_lit_accel_pruning_wrapped"] = True
        configure_optimizers: Callable[[], Any] = pl_module.configure_optimizers
        training_step: Callable[..., Any] = pl_module.training_step

        def wrapped_configure_optimizers() -> Any:
            cb: StructuredPruning = pl_module.__dict__["_lit_accel_pruning_callback"]
            pruning_params = list(cb._pruning_module().parameters())
            # Hidden from the module's own grouping (weight decay, schedule), then given groups of their own.
            for p in pruning_params:
                p.requires_grad_(False)
            try:
                result = configure_optimizers()
            finally:
                for p in pruning_params:
                    p.requires_grad_(True)
            optimizer = _first_optimizer(result)
            s = cb.settings
            for params, lr in ((cb.masks.parameters(), s.mask_lr), (cb.lagrangian.parameters(), s.lambda_lr)):
                optimizer.add_param_group({"params": list(params), "lr": lr, "initial_lr": lr, "weight_decay": 0.0})
            for scheduler in _schedulers(result):
                _extend_scheduler(scheduler, [s.mask_lr, s.lambda_lr])
            return result

        def wrapped_training_step(*args: Any, **kwargs: Any) -> Any:
            cb: StructuredPruning = pl_module.__dict__["_lit_accel_pruning_callback"]
            assert cb.hooks is not None
            # First, before anything reads a mask: ZeRO-3 would otherwise gather a parameter read inside its forward
            # itself, for the running module only, and partition it again when that module's forward ends.
            cb._hold()  # released after the backward (on_after_backward), or at the batch's end if there is none
            trainer = pl_module.trainer
            device = cb.masks.hidden.log_alpha.device
            # Seeded by step and micro-batch: every rank draws the same masks, gradient-accumulation micro-batches
            # draw fresh ones, and a resumed run draws what it would have drawn.
            batch_idx = args[1] if len(args) > 1 else kwargs.get("batch_idx", 0)
            cb.hooks.generator = torch.Generator(device=device).manual_seed(
                cb.settings.seed * 1_000_003 + trainer.global_step * 10_007 + int(batch_idx)
            )
            out = training_step(*args, **kwargs)
            penalty, metrics = constraint_loss(
                cb.masks, cb.target, cb.lagrangian, trainer.global_step, cb.settings.lagrangian_warmup_steps
            )
            pl_module.log_dict({f"pruning/{k}": v for k, v in metrics.items()}, on_step=True, on_epoch=False)
            if out is None:  # the step skipped this batch
                return None
            if isinstance(out, dict):
                return {**out, "loss": out["loss"] + penalty}
            return out + penalty

        pl_module.configure_optimizers = wrapped_configure_optimizers  # type: ignore[method-assign]
        pl_module.training_step = wrapped_training_step  # type: ignore[method-assign]

    # ------------------------------------------------------------------ training
    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if isinstance(getattr(pl_module, "pruning", None), nn.ModuleDict):
            self._project(trainer)

    @override
    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._release()

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._release()

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._release()

    # ------------------------------------------------------------------ charts
    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._release()  # a step that returned None had no backward
        if isinstance(getattr(pl_module, "pruning", None), nn.ModuleDict):
            self._project(trainer)
        n = self.settings.chart_every_n_steps
        step = trainer.global_step
        if n is not None and step > 0 and step % n == 0 and step != self._charted_step:
            self._charted_step = step  # with gradient accumulation several batches end at one global step
            self._log_architecture(trainer, pl_module, on_step=True)

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log_architecture(trainer, pl_module, on_step=False)

    def _log_architecture(self, trainer: L.Trainer, pl_module: L.LightningModule, on_step: bool) -> None:
        """Log the kept parameter count (every logger) and, on rank zero, the architecture charts (W&B only)."""
        if not isinstance(getattr(self._pl_module, "pruning", None), nn.ModuleDict):
            return
        masks = self.masks
        report = None
        with self._readable(), torch.no_grad():  # every rank: a collective under ZeRO-3
            kept = {k: (v != 0).float() for k, v in masks.deterministic().items()}
            kept_params = float(count_params(masks.shape, kept))
            if wandb_loggers(trainer) and trainer.is_global_zero:
                report = architecture_report(masks, self.target)
        pl_module.log("pruning/kept_params", kept_params, on_step=on_step, on_epoch=not on_step)
        if report is not None:
            rows = [list(row) for row in zip(*report.values())]
            self._charts.log(trainer, "pruning/architecture", list(report), rows, architecture_charts(report))

    # ------------------------------------------------------------------ checkpoint
    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # What `lit-accel export` needs to rebuild the deterministic masks from the checkpoint's state_dict.
        if isinstance(getattr(pl_module, "pruning", None), nn.ModuleDict):
            checkpoint.setdefault("lit_accel", {})["pruning"] = {
                "target": asdict(self.target),
                "keep": dict(self.masks.keep),
            }

    # ------------------------------------------------------------------ summaries
    def _dims(self, kept: dict[str, torch.Tensor] | None) -> tuple[str, float]:
        shape = self.masks.shape
        if kept is None:
            ones = {k: torch.ones_like(v) for k, v in self.masks.deterministic().items()}  # collective under ZeRO-3
            return (
                f"{shape.num_layers} blocks, {shape.num_kv_heads} KV heads, MLP {shape.intermediate_size}, hidden"
                f" {shape.hidden_size}",
                float(count_params(shape, ones)),
            )
        blocks = int(((kept["head_layer"] != 0) | (kept["mlp"] != 0)).sum())
        heads = (kept["heads"] != 0).sum(-1).float()
        inter = (kept["intermediate"] != 0).sum(-1).float()
        text = (
            f"{blocks} of {shape.num_layers} blocks, {float(heads.mean()):.3g} KV heads and MLP"
            f" {float(inter.mean()):.4g} per layer on average, hidden {int((kept['hidden'] != 0).sum())}"
        )
        return text, float(count_params(shape, {k: (v != 0).float() for k, v in kept.items()}))

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not isinstance(getattr(pl_module, "pruning", None), nn.ModuleDict):
            return
        full, params = self._dims(None)
        target = self.target
        aim = (
            f"{target.param_ratio:.0%} of the parameters"
            if target.param_ratio is not None
            else ", ".join(f"{k} {v}" for k, v in target.keep(self.masks.shape).items())
        )
        rank_zero_info(
            f"StructuredPruning: learning masks on {full} ({params / 1e6:.2f}M parameters) towards {aim}; Lagrangian"
            f" warm-up {self.settings.lagrangian_warmup_steps} steps, mask lr {self.settings.mask_lr:g}"
        )

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if isinstance(getattr(pl_module, "pruning", None), nn.ModuleDict):
            with torch.no_grad():
                kept, params = self._dims(dict(self.masks.deterministic()))  # collective under ZeRO-3
            rank_zero_info(
                f"StructuredPruning: the masks now keep {kept}: {params / 1e6:.2f}M parameters"
                + (
                    f"; writing the pruned model to {self.settings.export_dir}"
                    if self.settings.export_dir is not None
                    else "; `lit-accel export --ckpt <last.ckpt> --out <dir>` writes the pruned model"
                )
            )
        if self.settings.export_dir is not None:
            self._export(pl_module)

    def _export(self, pl_module: L.LightningModule) -> None:
        model = find_hf_model(pl_module)
        export_dir = self.settings.export_dir
        assert export_dir is not None
        # Every rank: under ZeRO-3 the masks and the weights are gathered (to rank 0, module by module) only here.
        small = export_pruned_gathered(model, self.masks)  # type: ignore[arg-type]
        if small is not None:  # rank 0
            # Atomic, and never over an existing non-empty directory (set-up already refused one).
            save_hf_directory(small, small.state_dict(), Path(export_dir), tokenizer=None, overwrite=False)


def _schedulers(result: Any) -> list[Any]:
    """Every LR scheduler in a ``configure_optimizers`` result."""
    found: list[Any] = []
    if isinstance(result, dict):
        sched = result.get("lr_scheduler")
        if isinstance(sched, dict):
            sched = sched.get("scheduler")
        if sched is not None:
            found.append(sched)
    elif isinstance(result, (list, tuple)) and len(result) == 2 and isinstance(result[1], (list, tuple)):
        for sched in result[1]:
            found.append(sched.get("scheduler") if isinstance(sched, dict) else sched)
    return found


def _extend_scheduler(scheduler: Any, lrs: list[float]) -> None:
    """Make a LambdaLR-style scheduler cover the new groups, with group 0's multiplier (as Sheared-LLaMA does).

    Raises:
        ValueError: The scheduler is not LambdaLR-like (it has no ``lr_lambdas``); torch schedulers require one
            value per parameter group and others cannot be extended safely.
    """
    lambdas = getattr(scheduler, "lr_lambdas", None)
    base_lrs = getattr(scheduler, "base_lrs", None)
    if not isinstance(lambdas, list) or not isinstance(base_lrs, list) or not lambdas:
        raise ValueError(
            f"StructuredPruning: the LR scheduler {type(scheduler).__name__} cannot be extended to the mask and "
            "multiplier parameter groups; use torch.optim.lr_scheduler.LambdaLR (as CausalLM does) or no scheduler"
        )
    lambdas.extend([lambdas[0]] * len(lrs))
    base_lrs.extend(lrs)
    # The scheduler already applied its step-0 multiplier to the existing groups; the new ones start at the same
    # point of the schedule (e.g. 0 at the start of a warm-up), not at their peak rate.
    factor = float(lambdas[0](int(getattr(scheduler, "last_epoch", 0))))
    groups = scheduler.optimizer.param_groups[-len(lrs) :]
    for group, lr in zip(groups, lrs):
        group["lr"] = lr * factor
    last = getattr(scheduler, "_last_lr", None)
    if isinstance(last, list):
        last.extend(lr * factor for lr in lrs)


def _first_optimizer(result: Any) -> torch.optim.Optimizer:
    """The optimizer in whatever ``configure_optimizers`` returned (optimizer, dict, list or tuple)."""
    if isinstance(result, torch.optim.Optimizer):
        return result
    if isinstance(result, dict) and isinstance(result.get("optimizer"), torch.optim.Optimizer):
        return result["optimizer"]
    if isinstance(result, (list, tuple)) and result:
        return _first_optimizer(result[0])
    raise ValueError(
        f"StructuredPruning: configure_optimizers returned {type(result).__name__}; it must return an optimizer, a "
        "dict with 'optimizer', or a list/tuple whose first item is one"
    )
