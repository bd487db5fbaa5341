"""``SemiStructuredSparsity``: 2:4 sparse training of decoder linears (Hu et al., 2024, "Accelerating Transformer
Pre-training with 2:4 Sparsity"; code huyz2023/2by4-pretrain).

The callback only decides *when*; the algorithm is in :mod:`lit_accel.sparsity.functional`. Timeline of a fit:

1. ``setup``: arranges for the target linears to become :class:`~lit_accel.sparsity.functional.SparseLinear`
   right after ``configure_model`` (before the optimizer exists; the parameters are the same objects). A layer
   whose shape cannot take the mask stays a plain dense linear, with a warning naming it, its shape and why.
2. ``on_fit_start``: resolves the phase boundaries from the run's length, puts restored masks back.
3. Every training batch: dense warm-up (no mask) -> sparse (mask refreshed every ``mask_refresh_every``
   optimizer steps from the current weights) -> dense fine-tune (no mask, the full weights as the paper).
4. Before every optimizer step of the sparse phase: masked decay on the pruned weights' gradients.
5. ``on_train_end``: optional export of a plain Hugging Face model (pruned weights written as zeros while the
   run ends sparse) and the masks.

Example:
    >>> import lightning as L
    >>> cb = SemiStructuredSparsity(targets="mlp", dense_warmup_steps=100, dense_finetune_fraction=0.1)
    >>> trainer = L.Trainer(max_steps=1000, callbacks=[cb])  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lit_accel.models.hf_directory import save_hf_directory
from lit_accel.models.params import full_shape, full_state_dict, gathered
from lit_accel.models.surgery import find_hf_model, run_after_configure_model
from lit_accel.observe.wandb import BarChart, WandbCharts, other_loggers
from lit_accel.ops.sparse24 import transposable_24_mask
from lit_accel.ops.sparse24_gemm import (
    check_gemm_shape,
    compare_layer,
    cusparselt_unsupported_reason,
    mark_weights_updated,
)
from lit_accel.settings import settings_from, takes_settings
from lit_accel.sparsity.functional import (
    SparseLinear,
    flip_rate,
    masked_decay_,
    masked_decay_term,
    rowwise_24_mask,
    sparsify_linears,
)

__all__ = ["KERNEL_CHOICES", "MASKS_FILE", "PHASES", "SemiStructuredSparsity", "SemiStructuredSparsitySettings"]

KERNEL_CHOICES: tuple[str, ...] = ("auto", "cusparselt", "masked")
"""Values of the ``kernel`` setting."""

PHASES: tuple[str, ...] = ("dense_warmup", "sparse", "dense_finetune")
"""The phases in order; ``sparsity24/phase`` logs the index."""

MASKS_FILE = "sparsity24_masks.pt"
"""Name of the masks file written next to the exported model: ``{layer name: bool mask}``."""

Phase = Literal["dense_warmup", "sparse", "dense_finetune"]


@dataclass
class SemiStructuredSparsitySettings:
    """The arguments of :class:`SemiStructuredSparsity`, one field each, validated.

    Example:
        >>> SemiStructuredSparsitySettings(mask_refresh_every=10).mask_refresh_every
        10
    """

    targets: str | list[str] = "mlp"
    """Which decoder linears become 2:4 sparse: a preset (``"mlp"``, ``"attention"``, ``"all-linear"``), a regex,
    or a list of roles / names / patterns (see :func:`~lit_accel.models.surgery.match_linears`). In Mixtral and
    Qwen3-MoE the experts are 3-D tensors, not linears, and stay dense: use ``"attention"`` or ``"all-linear"``
    there (``"mlp"`` selects only Qwen3-MoE's dense ``mlp_only_layers``, and nothing at all in Mixtral)."""
    dense_warmup_steps: int = 0
    """Optimizer steps trained dense before the first mask."""
    mask_refresh_every: int = 40
    """Optimizer steps between mask refreshes in the sparse phase (the paper's 40)."""
    masked_decay: float = 2e-4
    """Coefficient of ``grad += masked_decay * W * (1 - M)`` before each sparse-phase optimizer step (the
    reference code's ``alpha=2e-4``); 0 turns it off."""
    dense_finetune_fraction: float = 0.0
    """Fraction of the run's optimizer steps, at its end, trained dense again, in ``[0, 1)``."""
    transposable: bool = True
    """Transposable masks (2:4 in ``W`` and ``W^T``, both dims multiples of 4) or row-wise ones (input dim only)."""
    export_dir: str | None = None
    """Directory for the plain Hugging Face model and :data:`MASKS_FILE` at the end of fit; None: no export."""
    overwrite: bool = False
    """Whether the export may replace a non-empty ``export_dir``."""
    log_every_n_steps: int | None = None
    """Interval of ``sparsity24/phase`` and ``sparsity24/density``; None uses the trainer's. Flip rates are
    logged at every refresh."""
    kernel: str = "auto"
    """How the sparse layers compute: ``"auto"`` (the default: on a CUDA GPU with bf16 compute, time dense
    against the 2:4 sparse tensor cores (cuSPARSELt) once per distinct layer shape at the start of the sparse phase,
    GPU time and wall time with cuSPARSELt's host overhead (see
    :attr:`~lit_accel.ops.sparse24_gemm.LayerTiming.speedup`), and use cuSPARSELt where it is at least
    ``min_speedup`` times faster, the masked dense path elsewhere and on CPU; on an H200 at llama-1b shapes it put
    all 66 MLP linears on cuSPARSELt and the step ran 1.09x dense, see benchmarks/RESULTS.md), ``"masked"`` (the
    masked dense path everywhere: dense speed, no timing) or ``"cusparselt"`` (every layer that can take it,
    without timing).
    Layers that cannot take cuSPARSELt (fp32 compute, a dim not a multiple of 16, row-wise masks) stay on the masked
    dense path with a warning naming the layer and the reason."""
    min_speedup: float = 1.0
    """With ``kernel="auto"``: the measured speedup (dense over sparse time of forward + input gradient +
    per-step refresh) a layer shape needs to run on cuSPARSELt."""
    benchmark_tokens: int | None = None
    """With ``kernel="auto"``: the token count (rows of the layers' input) to time at; None reads it from the
    first sparse batch (``input_ids``: batch x sequence), else 8192."""

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(
                f"SemiStructuredSparsity {name}={getattr(self, name)!r} is not allowed; {name} must be {allowed}"
            )

        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        t = self.targets
        if not (isinstance(t, str) and t) and not (
            isinstance(t, Sequence) and not isinstance(t, str) and t and all(isinstance(x, str) for x in t)
        ):
            raise bad("targets", "a non-empty string (preset or regex) or a non-empty list of strings")
        if not isinstance(t, str):
            self.targets = list(t)
        if not is_int(self.dense_warmup_steps) or self.dense_warmup_steps < 0:
            raise bad("dense_warmup_steps", "an int >= 0")
        if not is_int(self.mask_refresh_every) or self.mask_refresh_every < 1:
            raise bad("mask_refresh_every", "an int >= 1")
        d = self.masked_decay
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or d < 0:
            raise bad("masked_decay", "a finite float >= 0")
        self.masked_decay = float(d)
        f = self.dense_finetune_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f < 1.0:
            raise bad("dense_finetune_fraction", "a float in [0, 1)")
        self.dense_finetune_fraction = float(f)
        if not isinstance(self.transposable, bool):
            raise bad("transposable", "True or False")
        if self.export_dir is not None and not isinstance(self.export_dir, (str, Path)):
            raise bad("export_dir", "a path or None")
        if not isinstance(self.overwrite, bool):
            raise bad("overwrite", "True or False")
        n = self.log_every_n_steps
        if n is not None and (not is_int(n) or n < 1):
            raise bad("log_every_n_steps", "an int >= 1 or None")
        if self.kernel not in KERNEL_CHOICES:
            raise bad("kernel", f"one of {KERNEL_CHOICES}")
        ms = self.min_speedup
        if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not math.isfinite(ms) or ms <= 0:
            raise bad("min_speedup", "a finite float > 0")
        self.min_speedup = float(ms)
        bt = self.benchmark_tokens
        if bt is not None and (not is_int(bt) or bt < 1):
            raise bad("benchmark_tokens", "an int >= 1 or None")


@takes_settings(SemiStructuredSparsitySettings)
class SemiStructuredSparsity(L.Callback):
    """Trains the target linears with 2:4 semi-structured sparse weights, between a dense warm-up and a dense
    fine-tune.

    In the sparse phase each target linear computes ``y = x (W*M)^T + b`` and ``dX = dY (W*M)``; its weight
    gradient stays dense (``dW = dY^T x``) so pruned weights keep learning, and masked decay
    (``grad += masked_decay * W * (1 - M)``) pulls them towards zero. Every ``mask_refresh_every`` steps the
    mask is recomputed from the current weights: per 4x4 block the best of the 90 transposable patterns
    (``transposable=True``; the Triton kernel on CUDA), or the 2 largest of every 4 along the input dim.

    Masks are computed from the weights, which are identical on every rank under DDP, so every rank gets the
    same masks without communication. They live in non-persistent buffers (model ``state_dict`` keys do not
    change, so model checkpoints load into a plain model) and in this callback's state, so a resumed run
    continues with the same masks, phase and refresh schedule. Under DeepSpeed (ZeRO-1/2/3) the gradients never
    reach ``param.grad`` before the step, so masked decay is a gradient hook on each sparse weight instead, adding
    ``masked_decay / micro-batches per step`` (times DeepSpeed's fp16 loss scale) to every micro-batch's gradient:
    the same total per step. Under ZeRO-3 the weights are gathered to compute the masks, and the hook runs inside
    the module's backward, where the weight is whole. A layer whose weight receives no gradient in a step
    (DropBP dropped its sublayer) gets no decay in that step, on every strategy.

    A target layer that cannot take the mask (a dim not a multiple of 4, or not an ``nn.Linear``) stays dense,
    with a warning naming the layer, its shape and the reason. Every supported family works: Phi-3's fused
    ``qkv_proj`` / ``gate_up_proj`` are masked whole; in a mixture of experts (Mixtral, Qwen3-MoE) the experts'
    weights are 3-D tensors, not linears, so they stay dense with a warning naming the blocks (the router is never
    targeted), and ``targets`` that select nothing else (the default ``"mlp"`` on Mixtral) are refused at setup.

    Logged (to every logger, from rank 0): ``sparsity24/phase`` (index into :data:`PHASES`),
    ``sparsity24/density`` (kept fraction of the target layers' weights in the forward), at each refresh
    ``sparsity24/flip_rate`` (mean over layers); per layer, a W&B table and bar chart with a
    :class:`~lightning.pytorch.loggers.WandbLogger`, ``sparsity24/flip_rate/<layer>`` scalars with other loggers.

    Args: see :class:`SemiStructuredSparsitySettings`.

    Raises:
        ValueError: At construction, for an argument outside what is allowed (the message names it, its value
            and what is allowed); at setup, when ``targets`` matches no linear (also when it selects only
            mixture-of-experts MLPs, whose experts are not linears); at the start
            of fit, for a ``dense_finetune_fraction`` > 0 in a run of unknown length.

    Example:
        >>> cb = SemiStructuredSparsity(dense_warmup_steps=10, mask_refresh_every=20)
        >>> cb.settings.masked_decay
        0.0002
    """

    def __init__(
        self,
        targets: str | list[str] = "mlp",
        dense_warmup_steps: int = 0,
        mask_refresh_every: int = 40,
        masked_decay: float = 2e-4,
        dense_finetune_fraction: float = 0.0,
        transposable: bool = True,
        export_dir: str | None = None,
        overwrite: bool = False,
        log_every_n_steps: int | None = None,
        kernel: str = "auto",
        min_speedup: float = 1.0,
        benchmark_tokens: int | None = None,
    ) -> None:
        super().__init__()
        self.settings = settings_from(SemiStructuredSparsitySettings, locals())
        self.layers: dict[str, SparseLinear] = {}
        """Qualified name -> sparse layer, in forward order."""
        self.skipped: dict[str, str] = {}
        """Target layers left dense: qualified name -> reason."""
        self.masks: dict[str, torch.Tensor] = {}
        """The current masks (bool, the weight's shape), by layer name; empty before the first refresh."""
        self.phase: Phase = "dense_warmup"
        """The phase of the current optimizer step."""
        self.sparse_end_step: int | None = None
        """First optimizer step of the dense fine-tune (resolved at the start of fit)."""
        self.last_refresh_step = -1
        """Optimizer step of the last mask refresh (-1: none yet)."""
        self.refreshes = 0
        """Number of mask refreshes so far."""
        self.last_flip_rates: dict[str, float] = {}
        """Per-layer flip rate of the last refresh (absent for a layer's first mask)."""
        self.kernels: dict[str, str] = {}
        """Per sparse layer, the backend chosen at the start of the sparse phase (``"cusparselt"`` or ``"masked"``);
        empty before."""
        self.kernel_reasons: dict[str, str] = {}
        """Per layer on the masked path although cuSPARSELt was asked for (``kernel`` auto or cusparselt): why."""
        self._last_batch_step = -1
        self._decay_hooks: list[Any] = []
        self._hook_decay = 0.0  # masked_decay per micro-batch under DeepSpeed (0: hooks idle)
        self.kernel_timings: dict[tuple[int, int], Any] = {}
        """With ``kernel="auto"``: the :class:`~lit_accel.ops.sparse24_gemm.LayerTiming` per weight shape."""
        self._charts = WandbCharts("SemiStructuredSparsity")

    # ------------------------------------------------------------------ surgery
    def _apply(self, model: nn.Module) -> None:
        layers, skipped = sparsify_linears(model, self.settings.targets, transposable=self.settings.transposable)
        self.layers.update(layers)
        for name, reason in skipped.items():
            if name not in self.skipped:
                shape = tuple(getattr(model.get_submodule(name), "weight", torch.empty(0)).shape)
                rank_zero_warn(f"SemiStructuredSparsity: layer {name!r} (weight shape {shape}) stays dense: {reason}.")
            self.skipped[name] = reason

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        run_after_configure_model(pl_module, self._apply, tag="sparsity24")
        _restore_masks_on_load(pl_module, self)
        if any(True for _ in pl_module.parameters()):
            # The model already exists (built in __init__): convert it now, still before the optimizer is built.
            self._apply(find_hf_model(pl_module))

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        s = self.settings
        if not self.layers:
            reasons = "; ".join(f"{n}: {r}" for n, r in self.skipped.items())
            rank_zero_warn(f"SemiStructuredSparsity: no layer can be made sparse; training dense ({reasons}).")
        total = float(trainer.estimated_stepping_batches)
        if s.dense_finetune_fraction == 0.0:
            self.sparse_end_step = None  # sparse until the end, however long the run
            if not math.isinf(total) and s.dense_warmup_steps >= total:
                rank_zero_warn(
                    f"SemiStructuredSparsity: dense_warmup_steps={s.dense_warmup_steps} covers the whole run "
                    f"({int(total)} steps): there is no sparse phase; lower dense_warmup_steps or train longer."
                )
        elif math.isinf(total):
            raise ValueError(
                f"SemiStructuredSparsity dense_finetune_fraction={s.dense_finetune_fraction} is a fraction of the "
                "run, but the run has no finite length; set trainer max_steps."
            )
        else:
            self.sparse_end_step = round(total * (1.0 - s.dense_finetune_fraction))
            if self.sparse_end_step <= s.dense_warmup_steps:
                rank_zero_warn(
                    f"SemiStructuredSparsity: dense_warmup_steps={s.dense_warmup_steps} reaches the dense fine-tune "
                    f"(step {self.sparse_end_step} of {int(total)}): there is no sparse phase; lower "
                    "dense_warmup_steps or dense_finetune_fraction, or train longer."
                )
        # Restored masks (from a checkpoint) go back into their layers, on the weights' device, before the first step
        # and before the sanity-check validation of a resumed run.
        self.masks = {n: m.to(self.layers[n].weight.device) for n, m in self.masks.items() if n in self.layers}
        self._remove_decay_hooks()
        if self._decay_in_hooks(trainer) and s.masked_decay > 0.0:
            for name, layer in self.layers.items():
                self._decay_hooks.append(layer.weight.register_hook(partial(self._decay_hook, name)))
        self._set_layer_masks()
        rank_zero_info(
            f"SemiStructuredSparsity: {len(self.layers)} layers 2:4 "
            f"({'transposable' if s.transposable else 'row-wise'}), {len(self.skipped)} left dense; dense warm-up "
            f"{s.dense_warmup_steps} steps, dense fine-tune from step {self.sparse_end_step}"
        )

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._remove_decay_hooks()

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # A fit that raises never reaches on_fit_end: hooks left on the weights would add decay to any later use.
        self._remove_decay_hooks()

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._remove_decay_hooks()

    @staticmethod
    def _decay_in_hooks(trainer: L.Trainer) -> bool:
        """Whether masked decay must be a gradient hook: DeepSpeed steps from its own gradient buffers."""
        return isinstance(trainer.strategy, DeepSpeedStrategy)

    def _remove_decay_hooks(self) -> None:
        for handle in self._decay_hooks:
            handle.remove()
        self._decay_hooks = []
        self._hook_decay = 0.0

    def _decay_hook(self, name: str, grad: torch.Tensor) -> torch.Tensor | None:
        """DeepSpeed's masked decay: this micro-batch's share, added to the weight gradient as autograd makes it."""
        mask = self.masks.get(name)
        if self._hook_decay == 0.0 or mask is None:
            return None
        return masked_decay_term(grad, self.layers[name].weight, mask, self._hook_decay)

    # ------------------------------------------------------------------ schedule
    def phase_at(self, step: int) -> Phase:
        """The phase of optimizer step ``step``."""
        if step < self.settings.dense_warmup_steps:
            return "dense_warmup"
        if self.sparse_end_step is not None and step >= self.sparse_end_step:
            return "dense_finetune"
        return "sparse"

    def compute_mask(self, weight: torch.Tensor) -> torch.Tensor:
        """The mask of ``weight`` under the settings (transposable or row-wise)."""
        if self.settings.transposable:
            return transposable_24_mask(weight)
        return rowwise_24_mask(weight)

    @torch.no_grad()
    def refresh_masks(self) -> dict[str, float]:
        """Recomputes every layer's mask from its current weight; returns the per-layer flip rates."""
        flips: dict[str, float] = {}
        for name, layer in self.layers.items():
            with gathered([layer.weight]):  # type: ignore[list-item]  # a Parameter, typed Tensor by nn.Linear
                new = self.compute_mask(layer.weight)
            old = self.masks.get(name)
            if old is not None:
                flips[name] = flip_rate(old, new)
            self.masks[name] = new
        return flips

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        step = trainer.global_step
        previous = self.phase
        self.phase = self.phase_at(step)
        s = self.settings
        flips: dict[str, float] | None = None
        if self.phase == "sparse" and self.last_refresh_step != step:
            # Refresh at the phase start and then every k steps; the step guard keeps gradient-accumulation
            # micro-batches of one optimizer step on one mask.
            due = (step - s.dense_warmup_steps) % s.mask_refresh_every == 0
            if due or not self.masks:
                flips = self.refresh_masks()
                self.last_refresh_step = step
                self.refreshes += 1
                self.last_flip_rates = flips
        for name, layer in self.layers.items():
            layer.set_mask(self.masks[name] if self.phase == "sparse" else None)
        if step != self._last_batch_step and any(k == "cusparselt" for k in self.kernels.values()):
            # The optimizer step hook already marks the packed operands stale; this covers optimizers that bypass it.
            mark_weights_updated()
        self._last_batch_step = step
        if self._decay_hooks:
            self._hook_decay = (
                s.masked_decay * _deepspeed_loss_scale(trainer) / max(1, trainer.accumulate_grad_batches)
                if self.phase == "sparse"
                else 0.0
            )
        if self.phase == "sparse" and not self.kernels and self.layers:
            self.choose_kernels(trainer, batch)
        if self.phase != previous:
            rank_zero_info(f"SemiStructuredSparsity: step {step}, phase {self.phase}")
        self._log(trainer, step, flips)

    # ------------------------------------------------------------------ kernels
    def choose_kernels(self, trainer: L.Trainer, batch: Any = None) -> dict[str, str]:
        """Decides, once per fit at the start of the sparse phase, which layers run on cuSPARSELt (see the
        ``kernel`` setting), sets them, logs the reasons for the others, and returns ``{layer: kernel}``.

        Under ``kernel="auto"`` rank 0 times each distinct weight shape and broadcasts the result, so all ranks
        choose alike.
        """

        s = self.settings
        dtype = _compute_dtype(trainer)
        reasons: dict[str, str] = {}
        candidates: list[str] = []
        for name, layer in self.layers.items():
            layer.sparse_name = name
            if s.kernel == "masked":
                continue
            shape = _shape2(layer)
            reason = (
                cusparselt_unsupported_reason(layer.weight.device, dtype)
                or (None if s.transposable else "row-wise masks (transposable=False) leave W^T dense-patterned")
                or check_gemm_shape(shape[0], shape[1])
            )
            if reason is None:
                candidates.append(name)
            else:
                reasons[name] = f"weight shape {shape}: {reason}"
        if s.kernel == "auto" and candidates:
            tokens = s.benchmark_tokens or _tokens_in(batch) or 8192
            shapes = sorted({_shape2(self.layers[n]) for n in candidates})
            speedups: dict[tuple[int, int], float] = {}
            if trainer.is_global_zero:
                for shape in shapes:
                    try:
                        timing = compare_layer(
                            shape[0], shape[1], tokens, dtype, self.layers[candidates[0]].weight.device
                        )
                        self.kernel_timings[shape] = timing
                        speedups[shape] = timing.speedup
                    except Exception as err:  # a failed timing must leave the layer correct, on the masked path
                        speedups[shape] = float("nan")
                        rank_zero_warn(f"SemiStructuredSparsity: timing cuSPARSELt at {shape} failed ({err!r}).")
            speedups = trainer.strategy.broadcast(speedups, src=0)
            kept: list[str] = []
            for name in candidates:
                shape = _shape2(self.layers[name])
                ratio = speedups.get(shape, float("nan"))
                if math.isfinite(ratio) and ratio >= s.min_speedup:
                    kept.append(name)
                else:
                    reasons[name] = (
                        f"weight shape {shape}: cuSPARSELt measured {ratio:.2f}x dense (forward + input gradient + "
                        f"refresh, {tokens} tokens), below min_speedup={s.min_speedup}"
                    )
            candidates = kept
            metrics = {f"sparsity24/kernel_speedup/{a}x{b}": v for (a, b), v in speedups.items()}
            if trainer.is_global_zero and metrics:
                for logger in trainer.loggers:
                    logger.log_metrics(metrics, step=trainer.global_step)
        self.kernels = {}
        for name, layer in self.layers.items():
            kernel = "cusparselt" if name in candidates else "masked"
            layer.set_kernel(kernel)
            self.kernels[name] = kernel
        self.kernel_reasons = reasons
        if reasons:
            lines = "\n".join(f"  {n}: {r}" for n, r in reasons.items())
            message = f"SemiStructuredSparsity: {len(reasons)} layer(s) stay on the masked dense path:\n{lines}"
            if s.kernel == "cusparselt":  # asked for explicitly; under "auto" (the default) the reasons are info
                rank_zero_warn(message)
            else:
                rank_zero_info(message)
        rank_zero_info(
            f"SemiStructuredSparsity: kernel={s.kernel}: {len(candidates)} of {len(self.layers)} sparse layers on "
            "cuSPARSELt"
        )
        return dict(self.kernels)

    @override
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.phase != "sparse" or self.settings.masked_decay == 0.0 or self._decay_hooks:
            return  # (under DeepSpeed the hooks added it during the backward)
        for name, layer in self.layers.items():
            grad = layer.weight.grad
            if grad is not None:
                masked_decay_(grad, layer.weight, self.masks[name], self.settings.masked_decay)

    # ------------------------------------------------------------------ logging
    def density(self) -> float:
        """Kept fraction of the converted layers' weights in the current forward (1.0 when dense; layers left dense
        are not counted)."""
        kept = total = 0
        for layer in self.layers.values():
            n = math.prod(_shape2(layer))
            total += n
            kept += int(layer.mask.sum()) if layer.mask is not None else n
        return kept / total if total else 1.0

    def _log(self, trainer: L.Trainer, step: int, flips: dict[str, float] | None) -> None:
        if not trainer.is_global_zero or not trainer.loggers:
            return
        every = int(self.settings.log_every_n_steps or getattr(trainer, "log_every_n_steps", None) or 50)
        metrics: dict[str, float] = {}
        if step % every == 0 or flips is not None:
            metrics["sparsity24/phase"] = float(PHASES.index(self.phase))
            metrics["sparsity24/density"] = self.density()
        if flips:
            metrics["sparsity24/flip_rate"] = sum(flips.values()) / len(flips)
        if not metrics:
            return
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        if flips:
            # Per layer: a table and one chart in W&B (below); a scalar each only for loggers without tables.
            for logger in other_loggers(trainer):
                logger.log_metrics({f"sparsity24/flip_rate/{n}": v for n, v in flips.items()}, step=step)
        if flips:
            rows = [[n, v] for n, v in flips.items()]
            chart = BarChart("layer", "flip_rate", "2:4 mask flip rate per layer")
            self._charts.log(
                trainer, "sparsity24/flip_rates", ["layer", "flip_rate"], rows, {"sparsity24/flip_rate_chart": chart}
            )

    # ------------------------------------------------------------------ export, state
    def export(self, trainer: L.Trainer, model: nn.Module, out: Path) -> None:
        """Writes ``model`` as a plain HF model (pruned weights as zeros while a mask is in use) and the masks."""
        state = full_state_dict(model)  # gathers on every rank under ZeRO-3
        if not trainer.is_global_zero:
            return
        masks: dict[str, torch.Tensor] = {}
        for name, layer in self.layers.items():
            if layer.mask is not None:
                mask = layer.mask.to("cpu")
                key = f"{name}.weight"
                state[key] = state[key] * mask.to(state[key].dtype)
                masks[name] = mask
        save_hf_directory(model, state, out, tokenizer=None, overwrite=self.settings.overwrite)  # type: ignore[arg-type]
        torch.save(masks, out / MASKS_FILE)
        rank_zero_info(f"SemiStructuredSparsity: wrote the model and {len(masks)} masks to {out}")

    def _set_layer_masks(self) -> None:
        """Puts the current masks into the layers when the phase is sparse (else runs them dense)."""
        for name, layer in self.layers.items():
            mask = self.masks.get(name) if self.phase == "sparse" else None
            layer.set_mask(None if mask is None else mask.to(layer.weight.device))

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # trainer.validate / test from a checkpoint never run a training batch: the masks come from the checkpoint.
        self._set_layer_masks()

    @override
    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._set_layer_masks()

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Callback state is restored only when fitting; validate/test read the masks from here (the module's
        # on_load_checkpoint, wrapped in setup).
        checkpoint.setdefault("lit_accel", {})["sparsity24"] = {
            "phase": self.phase,
            "masks": {n: m.detach().to("cpu") for n, m in self.masks.items()},
        }

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.layers:
            kernels = sorted(set(self.kernels.values())) if self.kernels else []
            rank_zero_info(
                f"SemiStructuredSparsity: ended in the {self.phase} phase with {len(self.layers)} 2:4 layers, density"
                f" {self.density():.3f}, {self.refreshes} mask refreshes"
                + (f", kernels: {', '.join(kernels)}" if kernels else "")
            )
        if self.settings.export_dir is not None:
            self.export(trainer, find_hf_model(pl_module), Path(self.settings.export_dir))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "settings": asdict(self.settings),
            "masks": {n: m.detach().to("cpu") for n, m in self.masks.items()},
            "phase": self.phase,
            "last_refresh_step": self.last_refresh_step,
            "refreshes": self.refreshes,
            "last_flip_rates": dict(self.last_flip_rates),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.masks = {n: m.bool() for n, m in state_dict.get("masks", {}).items()}
        phase = state_dict.get("phase", "dense_warmup")
        self.phase = phase if phase in PHASES else "dense_warmup"
        self.last_refresh_step = int(state_dict.get("last_refresh_step", -1))
        self.refreshes = int(state_dict.get("refreshes", 0))
        self.last_flip_rates = dict(state_dict.get("last_flip_rates", {}))


def _shape2(layer: nn.Module) -> tuple[int, int]:
    weight = layer.weight
    assert isinstance(weight, torch.Tensor)
    shape = full_shape(weight)
    return shape[0], shape[1]


def _deepspeed_loss_scale(trainer: L.Trainer) -> float:
    """The loss scale of DeepSpeed's fp16 optimizer for the coming backward (1.0 for bf16 / fp32 or elsewhere): the
    gradients a hook sees are scaled by it, so the masked decay added there must be too."""
    engine = (
        getattr(trainer.strategy, "deepspeed_engine", None) if isinstance(trainer.strategy, DeepSpeedStrategy) else None
    )
    optimizer = getattr(engine, "optimizer", None)
    for attribute in ("loss_scale", "cur_scale"):
        value = getattr(optimizer, attribute, None)
        if isinstance(value, (int, float, torch.Tensor)) and not isinstance(value, bool):
            return float(value)
    return 1.0


def _compute_dtype(trainer: L.Trainer) -> torch.dtype:
    """The dtype the layers compute in under the trainer's precision plugin."""
    precision = str(getattr(trainer, "precision", "32-true"))
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float32


def _tokens_in(batch: Any) -> int | None:
    """Rows the decoder linears see for ``batch``: ``input_ids`` (or the first integer tensor) batch x sequence."""
    if isinstance(batch, dict):
        tensor = batch.get("input_ids")
        if tensor is None:
            tensor = next((v for v in batch.values() if isinstance(v, torch.Tensor)), None)
    elif isinstance(batch, (list, tuple)) and batch:
        tensor = batch[0]
    else:
        tensor = batch
    if isinstance(tensor, torch.Tensor) and tensor.dim() >= 2 and not tensor.is_floating_point():
        return int(tensor.shape[0] * tensor.shape[1])
    return None


def _restore_masks_on_load(pl_module: L.LightningModule, callback: SemiStructuredSparsity) -> None:
    """Wraps ``pl_module.on_load_checkpoint`` (called for fit, validate, test and predict alike) to take the masks and
    phase saved in the checkpoint; the callback in use is looked up at call time, so a later callback instance wins."""
    pl_module.__dict__["_lit_accel_sparsity24_callback"] = callback
    if pl_module.__dict__.get("_lit_accel_sparsity24_load_wrapped"):
        return
    original = pl_module.on_load_checkpoint

    def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
        original(checkpoint)
        saved = (checkpoint.get("lit_accel") or {}).get("sparsity24")
        cb: SemiStructuredSparsity = pl_module.__dict__["_lit_accel_sparsity24_callback"]
        if saved:
            cb.masks = {n: m.bool() for n, m in saved.get("masks", {}).items()}
            phase = saved.get("phase", "dense_warmup")
            cb.phase = phase if phase in PHASES else "dense_warmup"

    pl_module.on_load_checkpoint = on_load_checkpoint  # type: ignore[method-assign]
    pl_module.__dict__["_lit_accel_sparsity24_load_wrapped"] = True
