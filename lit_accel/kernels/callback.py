"""``FusedKernels``: a Lightning callback that patches the model's hot path with ``lit_accel``'s Triton kernels.

It calls :func:`lit_accel.kernels.apply_kernels` right after ``configure_model`` (so before the optimizer exists
and after the model is built, under any strategy), logs how many modules use each kernel under ``kernels/...``,
and leaves the patches in place after the run (evaluation forwards are Hugging Face's own anyway). ``CausalLM``
already applies the kernels by default on CUDA (its ``kernels`` argument); this callback is for other
LightningModules holding a Hugging Face model of a family in ``KERNEL_ARCHS`` (LLaMA, Mistral, Qwen2/3, Gemma 1-3,
Phi-3, OLMo 2, Mixtral, Qwen3-MoE), or to choose kernels one by one.

Example:
    >>> import lightning as L
    >>> from lit_accel.callbacks import FusedKernels
    >>> trainer = L.Trainer(callbacks=[FusedKernels(rope=False)])  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lit_accel.kernels.apply import KERNEL_NAMES, KernelReport, apply_kernels
from lit_accel.models.surgery import run_after_configure_model
from lit_accel.settings import settings_from, takes_settings

__all__ = ["FusedKernels", "FusedKernelsSettings"]


@dataclass
class FusedKernelsSettings:
    """The arguments of :class:`FusedKernels`, one field each, validated.

    Example:
        >>> FusedKernelsSettings(rope=False).rope
        False
    """

    rms_norm: bool = True
    """Replace every RMSNorm forward by the fused kernel."""
    swiglu: bool = True
    """Replace the MLPs' ``silu(gate) * up`` by the fused kernel (SiLU models only)."""
    rope: bool = True
    """Apply the rotary embedding of q and k with the fused kernel."""
    linear_cross_entropy: bool = True
    """In training steps with labels, compute the LM head and loss chunk by chunk without materialising the
    logits (such forwards return ``logits=None``; evaluation keeps Hugging Face's head and loss)."""
    strict: bool = False
    """Raise at set-up when a requested kernel cannot be applied (unsupported architecture, non-SiLU MLP, an
    ``lm_head`` that is not a plain linear); otherwise warn once and leave that part on Hugging Face's code."""

    def __post_init__(self) -> None:
        for key in ("rms_norm", "swiglu", "rope", "linear_cross_entropy", "strict"):
            value = getattr(self, key)
            if not isinstance(value, bool):
                raise ValueError(f"FusedKernels: {key} must be true or false; got {value!r}")


@takes_settings(FusedKernelsSettings)
class FusedKernels(L.Callback):
    """Patch the Hugging Face model of a LightningModule with the Triton kernels (see the module docstring).

    Args: see :class:`FusedKernelsSettings`.

    Raises:
        ValueError: At construction, for an argument that is not a bool; at set-up with ``strict=True``, for a
            requested kernel that cannot be applied.

    Example:
        >>> FusedKernels(rope=False).settings.rope
        False
    """

    def __init__(
        self,
        rms_norm: bool = True,
        swiglu: bool = True,
        rope: bool = True,
        linear_cross_entropy: bool = True,
        strict: bool = False,
    ) -> None:
        super().__init__()
        self.settings = settings_from(FusedKernelsSettings, locals())
        self.report: KernelReport | None = None
        self._logged = False

    def _apply(self, model: Any) -> None:
        s = self.settings
        self.report = apply_kernels(
            model,
            rms_norm=s.rms_norm,
            swiglu=s.swiglu,
            rope=s.rope,
            linear_cross_entropy=s.linear_cross_entropy,
            strict=s.strict,
        )
        rank_zero_info(f"FusedKernels: patched {self.report.counts()}; skipped {self.report.skipped or 'none'}")

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        run_after_configure_model(pl_module, self._apply, "kernels")

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._logged or self.report is None:
            return
        self._logged = True
        counts = self.report.counts()
        pl_module.log_dict(
            {f"kernels/{name}": float(counts.get(name, 0)) for name in KERNEL_NAMES},
            on_step=True,
            on_epoch=False,
            rank_zero_only=True,
        )
