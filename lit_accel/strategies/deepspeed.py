"""``LitDeepSpeedStrategy``: Lightning's DeepSpeedStrategy with LLM defaults, size-derived ZeRO settings, callback
conflict checks, and the CPU (gloo) path that lets CI run DeepSpeed rows.

What it changes compared with ``lightning.pytorch.strategies.DeepSpeedStrategy``:

* **Defaults for LLM training.** bf16 (``bf16-mixed``: DeepSpeed's ``bf16`` section, float inputs cast) when the
  Trainer's precision is left at ``32-true`` and the device supports it (``bf16=False`` keeps fp32);
  ``overlap_comm`` and ``contiguous_gradients`` on; ``zero_allow_untested_optimizer`` on (our AdamW, fused on CUDA,
  is a torch optimizer DeepSpeed calls untested); DeepSpeed's ``sub_group_size`` (``1e9``) instead of Lightning's
  ``1e12``; with optimizer offload, DeepSpeed's ``DeepSpeedCPUAdam`` in place of a torch Adam/AdamW.
* **Settings derived from the model's size** at set-up: the ZeRO bucket sizes and the stage-3 prefetch and
  persistence thresholds (the rule and its sources: :mod:`lit_accel.strategies.sizing`). A value the user gives
  (an init argument, or a key of ``config``, under either of DeepSpeed's names) always wins; ``"auto"`` (as in
  configs written for Hugging Face's Trainer) asks for the derived value.
* **``config`` is merged, not substituted.** Lightning ignores every other argument once a ``config`` is given;
  here ``config`` (a dict, a JSON path, or ``$PL_DEEPSPEED_CONFIG_PATH``) is deep-merged over the config the other
  arguments build, its keys winning, so ``stage: 3`` plus ``config: {zero_optimization: {stage3_max_live_parameters:
  ...}}`` works. ``"auto"`` values of the keys Lightning fills itself (micro-batch size, gradient accumulation and
  clipping, ``bf16``/``fp16`` ``enabled``, ``train_batch_size``) are dropped so Lightning fills them.
* **Callback conflicts** (:mod:`lit_accel.strategies.conflicts`) raise in ``setup_environment``, before any
  process group or model exists, naming the key and the callback.
* **Checkpoint folders written atomically and checked before loading**: a kill during a save leaves the previous
  complete folder under the checkpoint's name, never a mix of old and new files; a resume from an incomplete or
  damaged folder fails naming what is wrong (see ``docs/checkpoints.md``).
* **CPU.** With ``accelerator="cpu"`` it runs DeepSpeed's CPU accelerator over gloo (1 or more processes), for
  tests and debugging; Lightning's class refuses anything but CUDA. See ``docs/strategies.md``.

Example (YAML: ``strategy: {class_path: lit_accel.strategies.LitDeepSpeedStrategy, init_args: {...}}``; skipped
as a doctest because DeepSpeed logs its accelerator choice on stdout):
    >>> config = {"zero_optimization": {"reduce_bucket_size": 5e7}}
    >>> strategy = LitDeepSpeedStrategy(stage=3, config=config)  # doctest: +SKIP
    >>> zero = strategy.config["zero_optimization"]  # doctest: +SKIP
    >>> zero["stage"], zero["reduce_bucket_size"], zero["overlap_comm"]  # doctest: +SKIP
    (3, 50000000.0, True)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
from collections.abc import Generator, Mapping
from contextlib import ExitStack, contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.plugins import ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies import _StrategyRegistry
from lightning.fabric.utilities.seed import reset_seed
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import Trainer
from lightning.pytorch.accelerators import Accelerator, CPUAccelerator
from lightning.pytorch.plugins.precision import DeepSpeedPrecision, Precision
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from lightning.pytorch.strategies.deepspeed import remove_module_hooks
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.nn import Module
from torch.optim import Optimizer
from transformers import AutoModelForCausalLM

from lit_accel.checkpoint_io import (
    discard_path,
    held_temporary_folder,
    new_token,
    publish_folder,
    remove_stale_temporaries,
    restore_displaced,
    saved_world_size,
    seal_deepspeed_folder,
    temporary_path,
    universal_path,
    verify_deepspeed_folder,
)
from lit_accel.strategies import scale
from lit_accel.strategies.conflicts import check_callback_conflicts, offloads
from lit_accel.strategies.from_file import load_file_into_engine
from lit_accel.strategies.sizing import ModelSize, derived_zero_settings, model_size
from lit_accel.strategies.universal import load_on_new_world_size

__all__ = ["LIT_DEEPSPEED_STRATEGIES", "LitDeepSpeedStrategy"]

LIT_DEEPSPEED_STRATEGIES: dict[str, tuple[str, dict[str, Any]]] = {
    "lit_deepspeed_stage_1": ("DeepSpeed ZeRO-1 with lit_accel's LLM defaults", {"stage": 1}),
    "lit_deepspeed_stage_2": ("DeepSpeed ZeRO-2 with lit_accel's LLM defaults", {"stage": 2}),
    "lit_deepspeed_stage_3": ("DeepSpeed ZeRO-3 with lit_accel's LLM defaults", {"stage": 3}),
    "lit_deepspeed_stage_2_offload": (
        "DeepSpeed ZeRO-2, optimizer offloaded to CPU, with lit_accel's LLM defaults",
        {"stage": 2, "offload_optimizer": True},
    ),
    "lit_deepspeed_stage_3_offload": (
        "DeepSpeed ZeRO-3, optimizer and parameters offloaded to CPU, with lit_accel's LLM defaults",
        {"stage": 3, "offload_optimizer": True, "offload_parameters": True},
    ),
}
"""Registered name -> (description, init arguments)."""

# DeepSpeed accepts each stage-3 key under two names (pydantic aliases); either one given by the user counts.
_ALIASES: dict[str, tuple[str, ...]] = {
    "reduce_bucket_size": ("reduce_bucket_size",),
    "allgather_bucket_size": ("allgather_bucket_size",),
    "stage3_prefetch_bucket_size": ("stage3_prefetch_bucket_size", "prefetch_bucket_size"),
    "stage3_param_persistence_threshold": ("stage3_param_persistence_threshold", "param_persistence_threshold"),
}
# Read by zero.Init as the model's parameters are created, so it is derived before configure_model runs.
_NEEDED_BY_ZERO_INIT = ("stage3_param_persistence_threshold",)
# The tag (subfolder) Lightning's DeepSpeedStrategy gives every checkpoint; kept, so folders read the same.
_CHECKPOINT_TAG = "checkpoint"
# Top-level keys that Lightning fills from the Trainer when absent; "auto" (Hugging Face style) means "fill it".
_LIGHTNING_FILLS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")


class LitDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeedStrategy with LLM defaults, settings derived from the model's size, checks of the
    DeepSpeed config against the callbacks, and a CPU (gloo) path.

    Args:
        stage: ZeRO stage: 0 (off), 1 (optimizer states partitioned), 2 (+ gradients), 3 (+ parameters).
        offload_optimizer: Offload optimizer states and step to ``offload_optimizer_device`` (ZeRO-Offload).
        offload_parameters: Offload parameters to ``offload_params_device`` (ZeRO-3 only).
        config: A DeepSpeed config (dict or JSON path, https://www.deepspeed.ai/docs/config-json/), deep-merged over
            the config built from the other arguments; its keys win. ``None`` reads ``$PL_DEEPSPEED_CONFIG_PATH``
            if set.
        bf16: ``None``: with the Trainer's precision at ``32-true`` (its default, indistinguishable from unset),
            train in bf16 (Lightning's ``bf16-mixed``: DeepSpeed's ``bf16`` section, inputs cast) where the device
            supports it; another Trainer precision, or a ``bf16``/``fp16`` section in ``config``, is used as given.
            ``True``: as ``None``, and an error with a ``16`` precision. ``False``: never switch (fp32 at
            ``32-true``).
        reduce_bucket_size: Elements per gradient reduction bucket; ``None`` derives it from the model's size.
        allgather_bucket_size: Elements per parameter all-gather bucket (ZeRO-1/2); ``None`` derives it.
        prefetch_bucket_size: ZeRO-3 ``stage3_prefetch_bucket_size``; ``None`` derives it.
        param_persistence_threshold: ZeRO-3 ``stage3_param_persistence_threshold``; ``None`` derives it.
        sub_group_size: Parameters per optimizer sub-group (offloaded steps); DeepSpeed's default.
        cpu_adam: With the optimizer offloaded, step with DeepSpeed's ``DeepSpeedCPUAdam``: a ``torch.optim.AdamW``
            or ``Adam`` from ``configure_optimizers`` is replaced by it (same parameter groups and hyperparameters;
            the LR scheduler follows), as DeepSpeed requires for ZeRO-Offload (its op is compiled on first use).
            ``False`` keeps the torch optimizer, stepping on the CPU with PyTorch's slower kernels (sets
            ``zero_force_ds_cpu_optimizer: false`` unless the config gives it).
        zero_quantized_weights, zero_quantized_gradients, zero_hpz_partition_size, communication_data_type: ZeRO++
            (ZeRO-3 only; ``zero_hpz_partition_size="node"``: the devices per node) and the dtype of gradient
            reduction (``"fp32"``, ``"bf16"``, ``"fp16"``); see :mod:`lit_accel.strategies.scale`.

    The remaining arguments are Lightning's ``DeepSpeedStrategy`` ones, with the same meaning and defaults.

    Raises:
        ValueError: At construction, for a ``stage`` outside 0..3, a negative size, or a combination DeepSpeed does
            not support (:mod:`lit_accel.strategies.scale`); in ``setup_environment``,
            when a DeepSpeed config key conflicts with a callback of the Trainer.
        RuntimeError: On the CPU, when DeepSpeed's accelerator is not its CPU one (set ``DS_ACCELERATOR=cpu``).
    """

    strategy_name = "lit_deepspeed"

    def __init__(
        self,
        stage: int = 2,
        offload_optimizer: bool = False,
        offload_parameters: bool = False,
        config: str | Path | dict[str, Any] | None = None,
        bf16: bool | None = None,
        reduce_bucket_size: int | None = None,
        allgather_bucket_size: int | None = None,
        prefetch_bucket_size: int | None = None,
        param_persistence_threshold: int | None = None,
        overlap_comm: bool = True,
        contiguous_gradients: bool = True,
        zero_allow_untested_optimizer: bool = True,
        sub_group_size: int = 1_000_000_000,
        cpu_adam: bool = True,
        zero_quantized_weights: bool = False,
        zero_quantized_gradients: bool = False,
        zero_hpz_partition_size: int | Literal["node"] | None = None,
        communication_data_type: Literal["fp32", "bf16", "fp16"] | None = None,
        accelerator: Accelerator | None = None,
        zero_optimization: bool = True,
        remote_device: str | None = None,
        offload_params_device: str = "cpu",
        nvme_path: str = "/local_nvme",
        params_buffer_count: int = 5,
        params_buffer_size: int = 100_000_000,
        max_in_cpu: int = 1_000_000_000,
        offload_optimizer_device: str = "cpu",
        optimizer_buffer_count: int = 4,
        block_size: int = 1048576,
        queue_depth: int = 8,
        single_submit: bool = False,
        overlap_events: bool = True,
        thread_count: int = 1,
        pin_memory: bool = False,
        allgather_partitions: bool = True,
        reduce_scatter: bool = True,
        logging_batch_size_per_gpu: str | int = "auto",
        logging_level: int = logging.WARN,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        loss_scale: float = 0,
        initial_scale_power: int = 16,
        loss_scale_window: int = 1000,
        hysteresis: int = 2,
        min_loss_scale: int = 1,
        partition_activations: bool = False,
        cpu_checkpointing: bool = False,
        contiguous_memory_optimization: bool = False,
        synchronize_checkpoint_boundary: bool = False,
        load_full_weights: bool = False,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        exclude_frozen_parameters: bool = False,
    ) -> None:
        if stage not in (0, 1, 2, 3):
            raise ValueError(f"LitDeepSpeedStrategy stage={stage!r}; allowed: 0, 1, 2, 3 (the ZeRO stages).")
        sizes = {
            "reduce_bucket_size": reduce_bucket_size,
            "allgather_bucket_size": allgather_bucket_size,
            "prefetch_bucket_size": prefetch_bucket_size,
            "param_persistence_threshold": param_persistence_threshold,
            "sub_group_size": sub_group_size,
        }
        scale.check_sizes(sizes)
        scale.check_flags({"overlap_comm": overlap_comm, "contiguous_gradients": contiguous_gradients})
        at_scale = scale.ScaleSettings(
            zero_quantized_weights, zero_quantized_gradients, zero_hpz_partition_size, communication_data_type
        )
        base = DeepSpeedStrategy._create_default_config(
            self,
            zero_optimization,
            zero_allow_untested_optimizer,
            logging_batch_size_per_gpu,
            offload_optimizer=offload_optimizer,
            offload_parameters=offload_parameters,
            nvme_path=nvme_path,
            offload_params_device=offload_params_device,
            params_buffer_count=params_buffer_count,
            params_buffer_size=params_buffer_size,
            max_in_cpu=max_in_cpu,
            pin_memory=pin_memory,
            offload_optimizer_device=offload_optimizer_device,
            optimizer_buffer_count=optimizer_buffer_count,
            block_size=block_size,
            queue_depth=queue_depth,
            single_submit=single_submit,
            overlap_events=overlap_events,
            thread_count=thread_count,
            partition_activations=partition_activations,
            cpu_checkpointing=cpu_checkpointing,
            contiguous_memory_optimization=contiguous_memory_optimization,
            synchronize_checkpoint_boundary=synchronize_checkpoint_boundary,
            stage=stage,
            contiguous_gradients=contiguous_gradients,
            overlap_comm=overlap_comm,
            allgather_partitions=allgather_partitions,
            reduce_scatter=reduce_scatter,
            allgather_bucket_size=allgather_bucket_size,
            reduce_bucket_size=reduce_bucket_size,
            sub_group_size=sub_group_size,
        )
        zero = base.get("zero_optimization")
        if isinstance(zero, dict):
            if prefetch_bucket_size is not None:
                zero["stage3_prefetch_bucket_size"] = prefetch_bucket_size
            if param_persistence_threshold is not None:
                zero["stage3_param_persistence_threshold"] = param_persistence_threshold
            base["zero_optimization"] = {k: v for k, v in zero.items() if v is not None}
        if not cpu_adam:
            base["zero_force_ds_cpu_optimizer"] = False
        base = _deep_merge(base, at_scale.config())
        user = DeepSpeedStrategy._load_config(self, config)
        merged = _deep_merge(base, copy.deepcopy(user)) if user else base
        _drop_lightning_autos(merged)
        zero = merged.get("zero_optimization")
        if isinstance(zero, Mapping) and offloads(zero.get("offload_param")) and str(zero.get("stage", 0)) != "3":
            raise ValueError(
                f"LitDeepSpeedStrategy: zero_optimization.offload_param (offload_parameters=True) needs ZeRO stage 3,"
                f" got stage={zero.get('stage', 0)}: only ZeRO-3 partitions, and so can offload, the parameters."
            )
        scale.check_scale_config(merged)
        self._bf16 = bf16
        self._cpu_adam = cpu_adam
        self.user_config: dict[str, Any] = copy.deepcopy(user) if user else {}
        """The user's ``config`` as given (after loading a path), before merging."""
        self.derived: dict[str, Any] = {}
        """Every setting this strategy chose itself (dotted key -> value), filled in as set-up proceeds."""
        self.model_size: ModelSize | None = None
        """The size the settings were derived from (after set-up)."""
        super().__init__(
            accelerator=accelerator,
            config=merged,
            remote_device=remote_device,
            logging_level=logging_level,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            loss_scale=loss_scale,
            initial_scale_power=initial_scale_power,
            loss_scale_window=loss_scale_window,
            hysteresis=hysteresis,
            min_loss_scale=min_loss_scale,
            load_full_weights=load_full_weights,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            exclude_frozen_parameters=exclude_frozen_parameters,
        )

    @classmethod
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        """Registers ``lit_deepspeed_stage_{1,2,3}`` and ``..._{2,3}_offload`` (Lightning's own names stay theirs)."""
        for name, (description, init_params) in LIT_DEEPSPEED_STRATEGIES.items():
            strategy_registry.register(name, cls, description=description, override=True, **init_params)

    # ------------------------------------------------------------------ derived settings
    @property
    def zero_stage(self) -> int:
        """The ZeRO stage of the (merged) config; 0 when ZeRO is off."""
        zero = (self.config or {}).get("zero_optimization")
        return int(zero.get("stage", 0)) if isinstance(zero, Mapping) else 0

    def derive_defaults(self, size: ModelSize, before_partitioning: bool = False) -> dict[str, Any]:
        """Fills the size-derived ZeRO settings the user left unset (or ``"auto"``) into ``self.config``.

        Args:
            size: The model's size (:func:`lit_accel.strategies.sizing.model_size`).
            before_partitioning: Only the settings ZeRO-3's ``zero.Init`` reads while the model is created (the
                persistence threshold); the bucket sizes wait for the built model, whose parameter count caps them.

        Returns:
            The settings filled in by this call (key -> value).
        """
        assert isinstance(self.config, dict)
        zero = self.config.get("zero_optimization")
        if not isinstance(zero, dict):
            return {}
        filled: dict[str, Any] = {}
        for key, value in derived_zero_settings(size, self.zero_stage).items():
            if before_partitioning and key not in _NEEDED_BY_ZERO_INIT:
                continue
            names = _ALIASES.get(key, (key,))
            if any(n in zero and zero[n] != "auto" for n in names):
                continue  # the user's value wins
            for n in names:
                zero.pop(n, None)
            zero[key] = value
            filled[key] = value
            self.derived[f"zero_optimization.{key}"] = value
        if not before_partitioning:
            # "auto" with nothing to derive it from (hidden size unknown): DeepSpeed's default.
            for names in _ALIASES.values():
                for n in names:
                    if zero.get(n) == "auto":
                        del zero[n]
        return filled

    def _format_config(self) -> None:
        # Lightning's (batch size, accumulation, precision), then the settings that need the process layout.
        super()._format_config()
        assert isinstance(self.config, dict)
        visible = torch.cuda.device_count() if self.root_device.type == "cuda" else None
        self.derived.update(scale.resolve_for_world(self.config, max(self.num_processes, 1), self.world_size, visible))
        scale.forget_previous_hpz_group(self.config)

    @contextmanager
    def model_sharded_context(self) -> Generator[None, None, None]:
        if self.zero_stage == 3 and self.lightning_module is not None:
            self.derive_defaults(model_size(self.lightning_module), before_partitioning=True)
            _import_model_class(self.lightning_module)
        with super().model_sharded_context():
            yield

    def choose_precision(self) -> None:
        """Makes Lightning's precision plugin agree with DeepSpeed's (called first thing in ``setup_environment``).

        With the Trainer's precision at ``32-true`` (its default): a ``bf16``/``fp16`` section of the config that is
        enabled switches the plugin to ``bf16-mixed``/``16-mixed``, so float inputs are cast like DeepSpeed's
        weights; without one, bf16 is the default (``bf16-mixed``) unless ``bf16=False`` or the GPU lacks bf16.
        Any other Trainer precision is used as given.

        Raises:
            ValueError: For ``bf16=True`` with a Trainer precision of ``16-mixed``/``16-true``.
        """
        assert isinstance(self.config, dict)
        current = str(self.precision_plugin.precision)
        if self._bf16 and current.startswith("16"):
            raise ValueError(
                f"LitDeepSpeedStrategy bf16=True conflicts with the Trainer's precision={current!r}; use"
                " precision='bf16-mixed' (or leave it unset), or bf16=None."
            )
        if current != "32-true":
            return
        section = next((k for k in ("bf16", "fp16") if isinstance(self.config.get(k), Mapping)), None)
        if section is not None:
            if not self.config[section].get("enabled", False):
                return
            wanted = "bf16-mixed" if section == "bf16" else "16-mixed"
        elif self._bf16 is False:
            return
        elif not (self.root_device.type != "cuda" or torch.cuda.is_bf16_supported()):
            rank_zero_warn(
                f"LitDeepSpeedStrategy: {torch.cuda.get_device_name(self.root_device)} has no bf16; training in fp32."
                " Pass the Trainer precision='16-mixed' for DeepSpeed's fp16 with loss scaling."
            )
            return
        else:
            wanted = "bf16-mixed"
            self.derived["precision"] = wanted
            # Lightning turns an unset precision into "32-true" before any strategy sees it, so an explicit
            # precision="32-true" looks the same: say what happens and how to keep fp32.
            rank_zero_warn(
                "LitDeepSpeedStrategy trains in bf16 (precision 'bf16-mixed'): the Trainer's precision is '32-true',"
                " Lightning's default. To train in fp32, pass bf16=False to the strategy."
            )
        self.precision_plugin = DeepSpeedPrecision(wanted)  # type: ignore[arg-type]

    def backward(self, closure_loss: torch.Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any) -> Any:
        """As Lightning's, with the loss divided by the gradient accumulation once, not twice.

        Under automatic optimization Lightning already divides each micro-batch's loss by ``accumulate_grad_batches``
        (``ClosureResult``), and DeepSpeed's ``engine.backward`` divides it by ``gradient_accumulation_steps`` again,
        so with accumulation the gradients DeepSpeed reduces, clips and hands to Adam are ``1/accumulate`` of the
        mean gradient: Adam's ``eps`` and ``gradient_clipping`` then act ``accumulate`` times stronger than
        configured, and the run differs from DDP's and from the same global batch without accumulation. Manual
        optimization (``manual_backward``) keeps DeepSpeed's division, Lightning's being absent there.
        """
        module = self.lightning_module
        if module is not None and module.automatic_optimization:
            kwargs.setdefault("scale_wrt_gas", False)
        return super().backward(closure_loss, optimizer, *args, **kwargs)

    def setup(self, trainer: Trainer) -> None:
        assert self.lightning_module is not None
        self._init_config_if_needed()
        self.model_size = model_size(self.lightning_module)
        self.derive_defaults(self.model_size)
        rank_zero_info(self.describe())
        super().setup(trainer)

    def describe(self) -> str:
        """One line: stage, offload, precision, model size, and which settings were derived or given."""
        assert isinstance(self.config, dict)
        zero = self.config.get("zero_optimization") or {}
        offload = [k for k in ("offload_optimizer", "offload_param") if isinstance(zero, Mapping) and k in zero]
        bf16 = (self.config.get("bf16") or {}).get("enabled")
        fp16 = (self.config.get("fp16") or {}).get("enabled")
        precision = "bf16" if bf16 else "fp16" if fp16 else "fp32"
        derived = ", ".join(f"{k.removeprefix('zero_optimization.')}={v}" for k, v in self.derived.items()) or "nothing"
        size = self.model_size.describe() if self.model_size else "model size unknown"
        return (
            f"LitDeepSpeedStrategy: ZeRO stage {self.zero_stage}{' + ' + ', '.join(offload) if offload else ''},"
            f" {precision}; {size}; derived: {derived}"
        )

    # ------------------------------------------------------------------ callbacks
    def setup_environment(self) -> None:
        self.choose_precision()
        module = self.lightning_module
        trainer = module._trainer if module is not None else None
        if trainer is not None:
            check_callback_conflicts(self.config, getattr(trainer, "callbacks", []))
        if isinstance(self.accelerator, CPUAccelerator):
            _require_deepspeed_cpu_accelerator()
            # Lightning's DeepSpeedStrategy.setup_environment only refuses non-CUDA accelerators, then does this.
            DDPStrategy.setup_environment(self)
        else:
            super().setup_environment()

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        """Writes the checkpoint folder so that ``filepath`` holds the previous complete folder or the new complete
        one at every instant, never a mix or a part.

        Lightning's DeepSpeedStrategy has every rank write straight into ``filepath``: a kill during a save leaves
        a folder of old and new (or truncated) files under the final name, with the old ``latest`` tag. Here every
        rank writes into ``.<name>.tmp-<token>`` beside it (rank 0 names it and holds its lock); after the barrier
        that ends DeepSpeed's save, rank 0 writes the manifest and then the ``latest`` tag, and swaps the folder
        into place (:func:`lit_accel.checkpoint_io.publish_folder`) while the others wait. The folder must be on a
        filesystem that every rank sees, as DeepSpeed's ``latest`` (written by rank 0 only) already requires.
        """
        filepath = self.broadcast(filepath)  # every rank writes where rank 0 does
        if storage_options is not None:
            raise TypeError(
                "`Trainer.save_checkpoint(..., storage_options=...)` is not supported by LitDeepSpeedStrategy:"
                " DeepSpeed writes its checkpoint folders itself."
            )
        if self.zero_stage_3 and self._multi_device and self.is_global_zero:
            rank_zero_warn(
                "A DeepSpeed ZeRO-3 checkpoint is a folder with a shard per rank; `lit-accel export` (or"
                " lit_accel.checkpoint.load_lightning_checkpoint) consolidates it into one state dict."
            )
        final = Path(filepath)
        token = self.broadcast(new_token())
        staging = temporary_path(final, token)
        client_state = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
        with ExitStack() as held:
            problem = None
            if self.is_global_zero:
                try:
                    restore_displaced(final)
                    remove_stale_temporaries(final.parent, final.suffix)
                    held.enter_context(held_temporary_folder(final, token))  # removed again if the save fails
                except OSError as err:
                    problem = f"LitDeepSpeedStrategy cannot write a checkpoint folder beside {str(final)!r}: {err}"
            problem = self.broadcast(problem)  # every rank stops, rather than the others waiting in a barrier
            if problem is not None:
                raise OSError(problem)
            self.deepspeed_engine.save_checkpoint(
                str(staging),
                client_state=client_state,
                tag=_CHECKPOINT_TAG,
                save_latest=False,  # written by seal_deepspeed_folder, after every file is on disk
                exclude_frozen_parameters=self.exclude_frozen_parameters,
            )  # ends with a barrier: every rank's files are written
            if self.is_global_zero:
                seal_deepspeed_folder(staging, _CHECKPOINT_TAG)
                publish_folder(staging, final, token)
                if universal_path(final).exists():  # the universal copy of the save just replaced
                    discard_path(universal_path(final))
        self.barrier("LitDeepSpeedStrategy.save_checkpoint")

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        """Checks a checkpoint folder (:func:`lit_accel.checkpoint_io.verify_deepspeed_folder`: the ``latest`` tag,
        the manifest's files at full size, every file's CRC-32 and contents) before DeepSpeed unpickles it, so an
        incomplete or damaged folder fails naming what is wrong instead of loading garbage or arbitrary objects. A
        checkpoint that a killed save left moved aside is put back first (:func:`restore_displaced`).

        Also resumes what Lightning's DeepSpeedStrategy cannot: a folder saved by another number of processes
        (through DeepSpeed's universal format, :mod:`lit_accel.strategies.universal`) and a single-file checkpoint
        of a DDP or single-device run (:mod:`lit_accel.strategies.from_file`).

        Raises:
            ValueError: On every rank, with rank 0's finding.
        """
        if self.load_full_weights and self.zero_stage_3:
            return super().load_checkpoint(checkpoint_path, weights_only)  # one file, read by the CheckpointIO
        path = Path(self.broadcast(str(checkpoint_path)))
        problem = None
        if self.is_global_zero:
            try:
                restore_displaced(path)
                if path.is_dir():
                    verify_deepspeed_folder(path)
            except (ValueError, OSError) as err:
                problem = str(err)
        problem = self.broadcast(problem)
        if problem is not None:
            raise ValueError(problem)
        # Only for training: validate/test run DeepSpeed's inference engine, which holds no ZeRO optimizer to fill
        # (Lightning's own load takes the module weights on any world size there).
        fitting = self.lightning_module is not None and self.lightning_module.trainer.state.fn == TrainerFn.FITTING
        if path.is_file() and fitting:  # a DDP or single-device checkpoint
            return load_file_into_engine(self, path)
        saved = self.broadcast(saved_world_size(path) if self.is_global_zero and path.is_dir() else None)
        if saved is not None and saved != self.world_size and fitting:
            return load_on_new_world_size(self, path, saved)
        return super().load_checkpoint(checkpoint_path, weights_only)

    def remove_checkpoint(self, filepath: _PATH) -> None:
        """Removes a checkpoint (rank 0) without it ever being seen half deleted under its name
        (:func:`lit_accel.checkpoint_io.discard_path`): ``ModelCheckpoint`` removes the previous best or last one."""
        if self.is_global_zero:
            discard_path(filepath)
            if universal_path(filepath).exists():  # its universal copy goes with it
                discard_path(universal_path(filepath))

    # ------------------------------------------------------------------ CPU (gloo) support
    @property
    def _on_cpu(self) -> bool:
        return self.root_device.type == "cpu"

    def setup_distributed(self) -> None:
        if not self._on_cpu:
            super().setup_distributed()
            return
        # Lightning checks that CUDA device indices equal local ranks; CPU devices have no index.
        reset_seed()
        self.set_world_ranks()
        _skip_shm_comm_build()
        self._init_deepspeed_distributed()

    def _device_rank(self) -> int:
        # DeepSpeed's engine compares args.device_rank with 0; a CPU device has index None.
        index = self.root_device.index
        return self.local_rank if index is None else index

    def _setup_model_and_optimizer(
        self, model: Module, optimizer: Optimizer | None, lr_scheduler: Any = None
    ) -> tuple[Any, Optimizer]:
        # deferred: importing deepspeed is slow (and it is absent off Linux); only DeepSpeed runs reach here
        import deepspeed

        if optimizer is not None and self._cpu_adam and _offloads_optimizer(self.config):
            optimizer = _to_cpu_adam(optimizer, lr_scheduler)
        # As Lightning 2.6's DeepSpeedStrategy._setup_model_and_optimizer, with a device rank that is never None.
        model_parameters = filter(lambda p: p.requires_grad, model.parameters())
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self._device_rank()),
            config=self.config,
            model=model,
            model_parameters=model_parameters,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, ds_optimizer

    def _initialize_deepspeed_inference(self, model: Module) -> None:
        if not self._on_cpu:
            super()._initialize_deepspeed_inference(model)
            return
        # deferred: importing deepspeed is slow (and it is absent off Linux); only DeepSpeed runs reach here
        import deepspeed

        # As Lightning 2.6's DeepSpeedStrategy._initialize_deepspeed_inference, with a device rank that is not None.
        assert isinstance(self.config, dict)
        inference_config: dict[str, Any] = {"train_micro_batch_size_per_gpu": 1}
        for key in ("fp16", "bf16"):
            if key in self.config:
                inference_config[key] = self.config[key]
        if self.zero_stage_3:
            inference_config["zero_allow_untested_optimizer"] = self.config["zero_allow_untested_optimizer"]
            inference_config["zero_optimization"] = self.config["zero_optimization"]
        remove_module_hooks(model)
        engine, _, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self._device_rank()),
            config=inference_config,
            model=model,
            optimizer=None,
            lr_scheduler=None,
            model_parameters=[],
            dist_init_required=False,
        )
        self.model = engine


def _import_model_class(module: Module) -> None:
    """Imports the Hugging Face model class of ``module.config`` (``CausalLM`` has it before building the model)
    before ZeRO-3's ``zero.Init`` starts patching classes.

    A module class *created* while ``zero.Init`` is active records its ``__init__`` at creation as the one to put
    back on exit; a class whose ``__init__`` a decorator wraps after creation (transformers' kernel-hub
    integration, ``use_kernelized_func`` on the attention classes when the ``kernels`` package is installed) gets
    the undecorated one back, and every later instance in the process fails in its forward (``'LlamaAttention'
    object has no attribute '_kernel_funcs'``): a second fit, a resume, an export in the same process."""
    config = getattr(module, "config", None)
    if config is None or not hasattr(config, "model_type"):
        return
    with contextlib.suppress(KeyError, ValueError, ImportError):
        AutoModelForCausalLM._model_mapping[type(config)]  # resolving the mapping imports the modeling module


def _offloads_optimizer(config: Mapping[str, Any] | None) -> bool:
    zero = (config or {}).get("zero_optimization")
    return isinstance(zero, Mapping) and offloads(zero.get("offload_optimizer"))


def _to_cpu_adam(optimizer: Optimizer, lr_scheduler: Any) -> Optimizer:
    """``DeepSpeedCPUAdam`` in place of a torch ``Adam``/``AdamW`` (same groups and hyperparameters); ``optimizer``
    itself when it is another class (DeepSpeed then says what it needs)."""
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        return optimizer
    defaults = optimizer.defaults
    if defaults.get("amsgrad") or defaults.get("maximize"):
        raise ValueError(
            "LitDeepSpeedStrategy cpu_adam=True: DeepSpeedCPUAdam has no amsgrad/maximize; pass cpu_adam=False to keep"
            f" the torch optimizer with optimizer offload (got amsgrad={defaults.get('amsgrad')},"
            f" maximize={defaults.get('maximize')})."
        )
    # deferred: importing deepspeed is slow (and it is absent off Linux); only DeepSpeed runs reach here
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    groups = [dict(group) for group in optimizer.param_groups]  # lr, betas, eps, weight_decay, initial_lr ...
    cpu_adam = DeepSpeedCPUAdam(
        groups,
        lr=defaults["lr"],
        betas=defaults["betas"],
        eps=defaults["eps"],
        weight_decay=defaults["weight_decay"],
        adamw_mode=isinstance(optimizer, torch.optim.AdamW),
    )
    if lr_scheduler is not None and getattr(lr_scheduler, "optimizer", None) is optimizer:
        lr_scheduler.optimizer = cpu_adam
        step = cpu_adam.step

        def tracked_step(*args: Any, **kwargs: Any) -> Any:
            return step(*args, **kwargs)

        # What torch's LRScheduler marks on the optimizer it was built with; without it, it warns that the
        # optimizer's step "has been overridden".
        tracked_step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
        cpu_adam.step = tracked_step  # type: ignore[method-assign]
    rank_zero_info(
        f"LitDeepSpeedStrategy: optimizer offload steps with deepspeed.ops.adam.DeepSpeedCPUAdam in place of"
        f" torch.optim.{type(optimizer).__name__} (same parameter groups and hyperparameters)."
    )
    return cpu_adam


def _deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated recursively with ``override`` (its values win; nested dicts merge)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _drop_lightning_autos(config: dict[str, Any]) -> None:
    """Removes Hugging Face style ``"auto"`` values of keys that Lightning (or DeepSpeed) fills itself."""
    for key in (*_LIGHTNING_FILLS, "train_batch_size"):
        if config.get(key) == "auto":
            del config[key]
    for key in ("bf16", "fp16"):
        section = config.get(key)
        if isinstance(section, dict) and section.get("enabled") == "auto":
            del config[key]  # the Trainer's precision (and the bf16 default) decide


def _require_deepspeed_cpu_accelerator() -> None:
    # deferred: importing deepspeed is slow (and it is absent off Linux); only DeepSpeed runs reach here
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    if name != "cpu":
        raise RuntimeError(
            f"LitDeepSpeedStrategy with accelerator='cpu' needs DeepSpeed's CPU accelerator, but DeepSpeed picked"
            f" {name!r} (it detects CUDA). Set DS_ACCELERATOR=cpu in the environment before starting Python."
        )


def _skip_shm_comm_build() -> None:
    """Stops DeepSpeed's CPU backend from JIT-compiling its shared-memory all-reduce op at ``init_distributed``.

    The op serves only ``inference_all_reduce`` (tensor-parallel inference), never training's collectives, which go
    through gloo; building it needs a C++ toolchain and takes about 90 s on a 2-core machine the first time.
    """
    # deferred: importing deepspeed is slow (and it is absent off Linux); only DeepSpeed runs reach here
    import deepspeed.ops

    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False
