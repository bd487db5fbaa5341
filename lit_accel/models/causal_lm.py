"""``CausalLM``: the LightningModule around a Hugging Face causal language model.

It builds the model in ``configure_model`` (so Lightning can wrap construction in DeepSpeed ZeRO-3's partitioning
context or on the meta device), trains it with AdamW and a warm-up + cosine schedule, logs loss, perplexity,
learning rate and gradient norm, and writes a plain Hugging Face directory with :meth:`CausalLM.save_hf`.

Example:
    >>> import lightning as L
    >>> from lit_accel.models import CausalLM
    >>> module = CausalLM(model="llama-tiny", learning_rate=1e-3, warmup_steps=10)
    >>> trainer = L.Trainer(max_steps=20, accelerator="cpu")  # doctest: +SKIP
    >>> trainer.fit(module, datamodule=...)  # doctest: +SKIP
    >>> module.save_hf("out/llama-tiny")  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

# The one deliberate upward import: CausalLM applies the fused kernels by default on CUDA (kernels sit above models
# because they patch per-family forwards found through lit_accel.models.structure). A module reference, its names
# read at call time: importing lit_accel.kernels first imports this module while kernels.apply is still initialising.
import lit_accel.kernels.apply as _kernels
from lit_accel.checkpoint_io import OPTIMIZER_BY_NAME, use_atomic_checkpoint_io
from lit_accel.models.hf_directory import read_hf_weights, save_hf_directory
from lit_accel.models.params import (
    full_shape,
    full_state_dict,
    is_partitioned,
    is_rank_zero,
    load_full_state_dict,
    zero3_initialize_weights,
)
from lit_accel.models.presets import ModelSource, resolve_model_source
from lit_accel.resume import complete_epoch_end_loop_state, fill_optimizer_states
from lit_accel.run_identity import (
    FolderLock,
    check_resume,
    guard_checkpoint_folders,
    new_run_id,
    run_stamp_of,
)

__all__ = ["CausalLM", "warmup_cosine"]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up from 0 to 1, then cosine decay to ``min_lr_ratio``.

    Example:
        >>> warmup_cosine(0, 10, 100, 0.1), warmup_cosine(10, 10, 100, 0.1), warmup_cosine(100, 10, 100, 0.1)
        (0.1, 1.0, 0.1)
    """
    if warmup_steps > 0 and step < warmup_steps:
        # Starting the warm-up at 1/warmup (not 0) keeps the first step from being a wasted no-op update.
        return (step + 1) / warmup_steps
    if total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _attention_for(config: Any, wanted: str) -> str:
    # Gemma 2 soft-caps attention logits, which PyTorch's SDPA cannot do: transformers refuses "sdpa" for it. The
    # default then falls back to the eager attention (what HF itself uses for Gemma 2), saying so once.
    if wanted != "sdpa":
        return wanted
    cls: Any = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if isinstance(cls, type) and not getattr(cls, "_supports_sdpa", True):
        warnings.warn(
            f"{cls.__name__} has no SDPA attention in transformers (config.model_type={config.model_type!r}); "
            "attn_implementation='sdpa' runs the eager attention instead",
            stacklevel=3,
        )
        return "eager"
    return wanted


class CausalLM(L.LightningModule):
    """A Hugging Face causal LM as a LightningModule, built from a preset, a config dict or a local directory.

    Args:
        model: A preset name (``llama-tiny``, ``llama-20m``, ``llama-125m``, ``llama-350m``, ``llama-1b``), a
            Hugging Face config dict with ``model_type``, or a local model directory (weights are loaded). A hub
            id is accepted only if it already has a local copy in the Hugging Face cache; nothing is downloaded.
        config_overrides: Config fields to change, e.g. ``{"vocab_size": 8192}``.
        learning_rate: Peak learning rate of AdamW.
        min_lr_ratio: Final learning rate as a fraction of the peak, reached at the last step.
        warmup_steps: Linear warm-up steps.
        weight_decay: AdamW weight decay on matrices; norms and biases are not decayed.
        betas: AdamW betas.
        eps: AdamW epsilon.
        fused_optimizer: Use the fused AdamW kernel; ``None`` means "when the parameters are on CUDA".
        gradient_checkpointing: Recompute each decoder block's activations in the backward pass.
        attn_implementation: Hugging Face attention backend (``sdpa``, ``eager``, ``flash_attention_2``).
        kernels: Patch the model with ``lit_accel``'s Triton kernels (RMSNorm, SwiGLU, RoPE, fused LM head +
            loss; see :func:`lit_accel.kernels.apply_kernels`). ``None`` means "when the trainer runs on CUDA";
            ``True`` patches on any device (CPU calls run the kernels' PyTorch references, Hugging Face's formulas).
        run_checks: What happens when a fit would resume a checkpoint that another configuration wrote (another
            model, optimizer setting, data or technique: see :mod:`lit_accel.run_identity`): ``"error"`` refuses
            and lists the differences, ``"warn"`` warns and resumes. A checkpoint folder in use by a live run is
            refused either way.
    """

    def __init__(
        self,
        model: str | dict[str, Any] = "llama-tiny",
        config_overrides: dict[str, Any] | None = None,
        learning_rate: float = 3e-4,
        min_lr_ratio: float = 0.1,
        warmup_steps: int = 100,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        fused_optimizer: bool | None = None,
        gradient_checkpointing: bool = False,
        attn_implementation: str = "sdpa",
        kernels: bool | None = None,
        run_checks: Literal["error", "warn"] = "error",
    ) -> None:
        super().__init__()
        if run_checks not in ("error", "warn"):
            raise ValueError(f"run_checks={run_checks!r}; allowed: error, warn.")
        if learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0; got {learning_rate}.")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1]; got {min_lr_ratio}.")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0; got {warmup_steps}.")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0; got {weight_decay}.")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1); got {betas}.")
        if attn_implementation not in ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"):
            raise ValueError(
                f"attn_implementation={attn_implementation!r}; allowed: sdpa, eager, flash_attention_2,"
                " flash_attention_3, flex_attention."
            )
        self.save_hyperparameters()
        self.source: ModelSource = resolve_model_source(model, config_overrides)
        self.model: PreTrainedModel | None = None
        self._val_loss_sum: torch.Tensor | None = None
        self._val_token_count: torch.Tensor | None = None
        self._run_id: str | None = None
        self._folder_locks: list[FolderLock] = []

    # ------------------------------------------------------------------ model construction
    @property
    def _hp(self) -> Any:
        return self.hparams

    @property
    def config(self) -> PretrainedConfig:
        """The Hugging Face config of the model (available before the model is built)."""
        return self.model.config if self.model is not None else self.source.config

    def configure_model(self) -> None:
        """Builds the Hugging Face model (idempotent).

        Called by Lightning inside the strategy's initialisation context, so under DeepSpeed ZeRO-3 the parameters
        are partitioned as they are created; weights are then initialised (or loaded) module by module with the
        partitions gathered, so the full model never has to fit on one device.
        """
        if self.model is not None:
            return
        config = self.source.config
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation=_attention_for(config, self._hp.attn_implementation), dtype=torch.float32
        )
        partitioned = any(is_partitioned(p) for p in model.parameters())
        if partitioned and self.source.pretrained_dir is None:
            zero3_initialize_weights(model)
        if self.source.pretrained_dir is not None:
            if _on_meta(model):
                warnings.warn(
                    f"model={self.source.pretrained_dir!r} was built on the meta device, so its weights were not"
                    " loaded; load them after materialising the model (e.g. load_full_state_dict).",
                    stacklevel=2,
                )
            else:
                load_full_state_dict(model, read_hf_weights(self.source.pretrained_dir))
        if self._hp.gradient_checkpointing:
            # transformers >= 5.x renamed gradient_checkpointing_enable (the old name warns); support both.
            enable = getattr(model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        if self._use_kernels():
            self._apply_kernels(model)
        self.model = model

    def _use_kernels(self) -> bool:
        wanted = getattr(self._hp, "kernels", None)
        if wanted is not None:
            return bool(wanted)
        if self._trainer is not None:
            return isinstance(self.trainer.accelerator, CUDAAccelerator)
        return torch.cuda.is_available()

    def _apply_kernels(self, model: nn.Module) -> None:
        if (
            getattr(model.config, "model_type", None) not in _kernels.KERNEL_ARCHS
            and getattr(self._hp, "kernels", None) is None
        ):
            return  # the default quietly keeps Hugging Face's code for architectures without kernels
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = _kernels.apply_kernels(model)
        if getattr(self._hp, "kernels", None):
            for w in caught:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        rank_zero_info(
            f"CausalLM kernels: {report.counts()}" + (f"; not applied: {report.skipped}" if report.skipped else "")
        )

    def setup(self, stage: str) -> None:
        """Installs crash-proof checkpoint writes (:func:`lit_accel.checkpoint_io.use_atomic_checkpoint_io`) and
        checks the data against the model (sequence length, vocabulary) before any step runs."""
        if self._trainer is not None and getattr(self._trainer, "strategy", None) is not None:
            use_atomic_checkpoint_io(self._trainer)  # atomic saves, verified ckpt_path loads; a custom IO is kept
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None:
            return
        seq_len = getattr(datamodule, "seq_len", None)
        max_pos = getattr(self.config, "max_position_embeddings", None) or getattr(self.config, "n_positions", None)
        if seq_len is not None and max_pos is not None and seq_len > max_pos:
            raise ValueError(
                f"data seq_len={seq_len} is longer than the model's max_position_embeddings={max_pos}; use"
                f" seq_len <= {max_pos} or set model config_overrides: {{max_position_embeddings: {seq_len}}}."
            )
        try:
            vocab = datamodule.vocab_size
        except (AttributeError, RuntimeError):
            vocab = None
        if vocab is not None and vocab > self.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {vocab} tokens but the model's vocab_size is {self.config.vocab_size}; token ids"
                f" >= {self.config.vocab_size} would index past the embedding. "
                + (
                    f"Use the model's own tokenizer: --data.tokenizer {self.source.pretrained_dir}."
                    if self.source.pretrained_dir is not None
                    else f"Use a tokenizer with at most {self.config.vocab_size} tokens (data bpe_vocab_size) or set"
                    f" model config_overrides: {{vocab_size: {vocab}}}."
                )
            )
        eos = getattr(datamodule, "eos_token_id", None)
        if eos is not None and self.source.pretrained_dir is None:
            self.source.config.eos_token_id = eos

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = (checkpoint.get("lit_accel") or {}).get("run")
        if isinstance(saved, dict):
            self._run_id = saved.get("run_id") or self._run_id
            for lock in self._folder_locks:  # DeepSpeed restores after on_fit_start has locked the folders
                lock.retag(self._run_id or lock.run_id)
            trainer = self._trainer
            if trainer is not None and trainer.state.fn == "fit":
                # Before any weight is loaded: a refused resume leaves the module as it was.
                now = run_stamp_of(trainer, self, self._run_id or "")
                check_resume(saved, now, self._hp.run_checks, trainer.ckpt_path or "the checkpoint")
        # Lightning restores its loops after this hook; a checkpoint written at an epoch end would otherwise make a
        # max_steps run re-enter the finished epoch (see lit_accel.resume). The data module does the same for other
        # LightningModules; applying it twice is a no-op.
        complete_epoch_end_loop_state(checkpoint)

    def on_fit_start(self) -> None:
        """Gives the run its id and locks its checkpoint folders (see :mod:`lit_accel.run_identity`)."""
        trainer = self.trainer
        if self._run_id is None:
            self._run_id = trainer.strategy.broadcast(new_run_id())
        self._folder_locks = guard_checkpoint_folders(trainer, self._run_id)
        # A DeepSpeed folder resumed without DeepSpeed brings Adam's state by parameter name: index it now that the
        # optimizer exists (Lightning restores the optimizers after this hook).
        loaded = getattr(trainer._checkpoint_connector, "_loaded_checkpoint", None)
        if isinstance(loaded, dict) and OPTIMIZER_BY_NAME in loaded and trainer.optimizers:
            fill_optimizer_states(loaded, trainer.optimizers[0], self.named_parameters(), OPTIMIZER_BY_NAME)

    def teardown(self, stage: str) -> None:
        for lock in self._folder_locks:
            lock.release()
        self._folder_locks = []

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The tokenizer lives in the data cache, not in the weights: remember where, so `lit-accel export` can
        # ship it with the model.
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        tok_dir = getattr(datamodule, "tokenizer_dir", None)
        checkpoint.setdefault("lit_accel", {}).update(
            {
                "tokenizer_dir": os.path.abspath(tok_dir) if tok_dir else None,
                # The config as trained (eos id from the tokenizer, overrides): export rebuilds from it, without
                # needing the original model directory.
                "config": self.config.to_dict(),
                # What this run computes, so a resume can tell its own checkpoints from another run's.
                "run": run_stamp_of(self.trainer, self, self._run_id or new_run_id()),
            }
        )

    # ------------------------------------------------------------------ steps
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **kwargs: Any) -> Any:
        assert self.model is not None, "call configure_model() first (the Trainer does it for you)"
        return self.model(input_ids=input_ids, labels=labels, use_cache=False, **kwargs)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        input_ids = batch["input_ids"]
        loss = self(input_ids, labels=batch.get("labels", input_ids)).loss
        # On a GPU the loss stays off the progress bar: Lightning turns every progress-bar value into a Python
        # number on every step, a device sync that stalls the next step's launches (measured: ~2% at 125M).
        self.log(
            "train/loss",
            loss.detach(),
            on_step=True,
            prog_bar=input_ids.device.type != "cuda",
            batch_size=input_ids.shape[0],
        )
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._should_log_now():
            return
        loss = outputs["loss"].detach() if isinstance(outputs, dict) else None
        if loss is not None:
            # Checked only at logging steps: reading the loss on the host syncs the device.
            if not bool(torch.isfinite(loss).all()):
                warnings.warn(
                    f"non-finite training loss at step {self.trainer.global_step}: lower learning_rate, raise"
                    " warmup_steps, or enable gradient clipping (trainer.gradient_clip_val).",
                    stacklevel=1,
                )
            self.log("train/ppl", torch.exp(loss.float().clamp(max=30.0)), on_step=True)
        optimizer = self.trainer.optimizers[0] if self.trainer.optimizers else None
        if optimizer is not None:
            self.log("train/lr", float(optimizer.param_groups[0]["lr"]), on_step=True)
        engine = getattr(self.trainer.strategy, "deepspeed_engine", None)
        if engine is not None:
            norm = engine.get_global_grad_norm()
            if norm is not None:
                self.log("train/grad_norm", float(norm), on_step=True)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # global_step is incremented after this hook: step k is written to the loggers when (k + 1) % n == 0.
        if not self._should_log_now(offset=1) or getattr(self.trainer.strategy, "deepspeed_engine", None):
            return
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            # Before clipping, so the logged value shows spikes that clipping then hides from the update.
            norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
            self.log("train/grad_norm", norm, on_step=True)

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Callable[[], Any] | None = None
    ) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if getattr(self.trainer.strategy, "deepspeed_engine", None) is None:
            # Lightning zeroes gradients inside the next step's closure, after the forward pass: the old
            # gradients (4 bytes per parameter) would sit through the activation peak. Freeing them here, as a
            # hand-written loop does, lowers peak memory by that much.
            optimizer.zero_grad(set_to_none=True)

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        # Lightning's mixed-precision plugin refuses to clip for any fused optimizer, because with fp16 a fused
        # step unscales internally. bf16 and fp32 have no loss scale, so the gradients are already true values
        # and clipping them here is exact.
        deepspeed = isinstance(self.trainer.strategy, DeepSpeedStrategy)  # DeepSpeed clips inside its engine
        if not gradient_clip_val or deepspeed or str(self.trainer.precision) == "16-mixed":
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    def _should_log_now(self, offset: int = 0) -> bool:
        trainer: Any = self.trainer
        n = trainer.log_every_n_steps
        return n > 0 and (trainer.global_step + offset) % n == 0

    def on_validation_epoch_start(self) -> None:
        self._val_loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        self._val_token_count = torch.zeros((), device=self.device, dtype=torch.float64)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        input_ids = batch["input_ids"]
        loss = self(input_ids, labels=batch.get("labels", input_ids)).loss
        labels = batch.get("labels", input_ids)
        tokens = int((labels[:, 1:] != -100).sum()) if "labels" in batch else input_ids[:, 1:].numel()
        assert self._val_loss_sum is not None and self._val_token_count is not None
        self._val_loss_sum += loss.detach().double() * tokens
        self._val_token_count += tokens
        return loss

    def on_validation_epoch_end(self) -> None:
        # Token-weighted mean over all ranks: a plain mean of per-batch means would weight a short last batch
        # as much as a full one.
        # Already reduced over ranks, so logged as plain floats (identical on every rank).
        loss = float(self._gathered_mean_loss())
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/ppl", math.exp(min(loss, 30.0)))
        if not self.trainer.sanity_checking:
            rank_zero_info(f"step {self.trainer.global_step}: val/loss {loss:.4f}")

    def _gathered_mean_loss(self) -> torch.Tensor:
        assert self._val_loss_sum is not None and self._val_token_count is not None
        gathered: Any = self.all_gather(torch.stack([self._val_loss_sum, self._val_token_count]))
        total = gathered.reshape(-1, 2).sum(0)
        return (total[0] / total[1].clamp(min=1)).float()

    test_step = validation_step
    on_test_epoch_start = on_validation_epoch_start

    def on_test_epoch_end(self) -> None:
        loss = float(self._gathered_mean_loss())
        self.log("test/loss", loss)
        self.log("test/ppl", math.exp(min(loss, 30.0)))

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        hp = self._hp
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for _, param in self.named_parameters():
            if not param.requires_grad:
                continue
            # Norm gains and biases are 1-D; decaying them toward zero only hurts (as in GPT-2/LLaMA recipes).
            ndim = len(full_shape(param))  # under ZeRO-3 the local data is an empty shard
            (decay if ndim >= 2 else no_decay).append(param)
        groups = [
            {"params": decay, "weight_decay": hp.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        fused = hp.fused_optimizer
        on_cuda = all(p.is_cuda for g in groups for p in g["params"])
        fp16_clipping = str(self.trainer.precision) == "16-mixed" and bool(self.trainer.gradient_clip_val)
        if fused is None:
            fused = on_cuda and not fp16_clipping
        if fused and fp16_clipping:
            # fp16's GradScaler: a fused optimizer unscales inside its step, after clipping would have run.
            raise ValueError(
                "fused_optimizer=True cannot be combined with precision='16-mixed' and gradient clipping; use"
                " fused_optimizer=False (None picks it for you), or bf16-mixed."
            )
        optimizer = torch.optim.AdamW(groups, lr=hp.learning_rate, betas=tuple(hp.betas), eps=hp.eps, fused=fused)
        total = int(self.trainer.estimated_stepping_batches)
        if total <= 0 or total >= 10**12:
            raise ValueError(
                "the learning-rate schedule needs a finite number of steps: set trainer.max_steps (or max_epochs)."
            )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, hp.warmup_steps, total, hp.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ export
    def save_hf(self, directory: str | os.PathLike[str], tokenizer: Any | None = None, overwrite: bool = False) -> Path:
        """Writes a Hugging Face model directory that ``AutoModelForCausalLM.from_pretrained`` loads.

        Under DeepSpeed ZeRO-3 the partitioned parameters are gathered first; call it on every rank (only rank 0
        writes). The directory is written next to its destination and renamed into place, so an interrupted save
        leaves no half-written model; a non-empty directory is refused unless ``overwrite``, which replaces only a
        previous export there (see :func:`~lit_accel.models.hf_directory.write_directory`).

        Args:
            directory: Destination directory.
            tokenizer: Optional tokenizer (anything with ``save_pretrained``) written alongside.
            overwrite: Replace a previous export in ``directory`` (the files its ``lit_accel_export.json`` lists);
                other files there are kept.

        Returns:
            The directory path.
        """
        assert self.model is not None, "the model is not built yet: call configure_model() first"
        state = full_state_dict(self.model)
        out = Path(directory)
        if not is_rank_zero():
            return out
        return save_hf_directory(self.model, state, out, tokenizer=tokenizer, overwrite=overwrite)


def _on_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())
