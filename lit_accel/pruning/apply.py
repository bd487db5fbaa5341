"""Run a Hugging Face model under :class:`~lit_accel.pruning.masks.L0Masks`, through hooks only.

No module is replaced, so the model's ``state_dict`` keeps its Hugging Face keys. Where each mask acts (as in
LLM-Shearing's ``composer_llama.py``, extended to the norms other families place differently):

- ``hidden`` multiplies the token embedding output, every sublayer output written to the residual stream, and
  the output of every RMSNorm over the hidden dims: pre-norms, post-norms (Gemma 2/3's sandwich norms, OLMo 2's
  post-norms) and the final norm. Each such norm also computes its statistic over the *kept* hidden dims only
  (``sum(x^2) / n_kept``, not ``/ hidden_size``), as the paper's norm does. That is what makes the exported model
  exact: after export the norm runs over ``n_kept`` dims, and the residual stream is zero on the removed ones.
- ``heads`` (one gate per KV group) multiplies each query head's attention output before ``o_proj``; all query
  heads of a group share their group's gate. Where q and k are normalised over the whole projection (OLMo 2), those
  two norms take their statistic over the rows of the kept heads only, so removing a head does not change what the
  other heads see (per-head q/k norms, as in Qwen3 and Gemma 3, need nothing: each head is normalised alone).
- ``intermediate`` multiplies the MLP's intermediate activation before ``down_proj``.
- ``head_layer`` and ``mlp`` multiply what the attention and MLP sublayers add to the residual stream: the
  sublayer's output, or, where a post-norm follows it, the post-norm's output (a gate on the post-norm's input
  would be normalised away).

Norms are computed with their family's formula (:func:`norm_style`): Gemma's weight means ``1 + w``, and Gemma and
OLMo 2 multiply by the weight in float32 before casting back.

A forward pre-hook on the model draws the masks once per forward (``masks()``: a sample in training mode, the
deterministic masks in evaluation mode); the other hooks read them.

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    >>> masks = L0Masks(model)
    >>> with apply_masks(model, masks):
    ...     logits = model(torch.randint(0, 128, (1, 8))).logits
    >>> logits.shape
    torch.Size([1, 8, 128])
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lit_accel.models.structure import get_structure
from lit_accel.pruning.masks import L0Masks, check_prunable

__all__ = ["MaskHooks", "NormStyle", "apply_masks", "masked_rms_norm", "norm_style"]


@dataclass(frozen=True)
class NormStyle:
    """How a family's RMSNorm applies its weight: ``out = normed * (weight + offset)``.

    Example:
        >>> norm_style("gemma2"), norm_style("llama").offset
        (NormStyle(offset=1.0, weight_in_float32=True), 0.0)
    """

    offset: float = 0.0
    """Added to the stored weight (Gemma: 1.0, its weights start at 0 and mean ``1 + w``)."""
    weight_in_float32: bool = False
    """Multiply by the weight in float32, then cast (Gemma, OLMo 2); else cast, then multiply (LLaMA)."""


_GEMMA_NORM = NormStyle(offset=1.0, weight_in_float32=True)
_NORM_STYLES: dict[str, NormStyle] = {
    "gemma": _GEMMA_NORM,
    "gemma2": _GEMMA_NORM,
    "gemma3_text": _GEMMA_NORM,
    "olmo2": NormStyle(weight_in_float32=True),
}


def norm_style(arch: str) -> NormStyle:
    """The RMSNorm formula of an architecture (``ModelStructure.arch``); LLaMA's for any not listed."""
    return _NORM_STYLES.get(arch, NormStyle())


def masked_rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    hidden_mask: torch.Tensor,
    style: NormStyle | None = None,
) -> torch.Tensor:
    """RMSNorm whose statistic runs over the dims where ``hidden_mask != 0``; the output is multiplied by the mask.

    Args:
        x: Input ``[..., width]``; its values on dims where ``hidden_mask`` is zero are ignored.
        weight: Norm weight ``[width]``.
        eps: The norm's epsilon.
        hidden_mask: Gate per dim ``[width]``.
        style: The family's formula (:func:`norm_style`); LLaMA's by default.

    Returns:
        ``(weight + offset) * x / sqrt(sum(x^2 over kept dims) / n_kept + eps) * hidden_mask``, the statistic in
        float32 and the weight applied before or after the cast back, as the family's Hugging Face norm does.

    Example:
        >>> x = torch.tensor([[3.0, 4.0, 0.0]])
        >>> masked_rms_norm(x, torch.ones(3), 0.0, torch.tensor([1.0, 1.0, 0.0]))
        tensor([[0.8485, 1.1314, 0.0000]])
    """
    dtype = x.dtype
    kept = (hidden_mask != 0).to(torch.float32)
    xf = x.to(torch.float32)
    # Count kept dims, at least one so an all-zero mask gives zeros rather than NaN.
    n_kept = kept.sum().clamp_min(1.0)
    variance = (xf.pow(2) * kept).sum(-1, keepdim=True) / n_kept
    normed = xf * torch.rsqrt(variance + eps)
    style = style or NormStyle()
    if style.weight_in_float32:
        out = (normed * (weight.to(torch.float32) + style.offset)).to(dtype)
    else:
        out = (weight + style.offset if style.offset else weight) * normed.to(dtype)
    return out * hidden_mask.to(dtype)


class MaskHooks:
    """The hooks that apply :class:`L0Masks` to a model; remove them with :meth:`remove` or use as a context.

    Attributes:
        zs: The masks drawn for the latest forward (group name -> tensor), or None before the first.
        active: While False (see :meth:`bypassed`) every hook passes its input through: the model computes as the
            unmasked model.
    """

    def __init__(self, model: nn.Module, masks: L0Masks) -> None:
        self.masks = masks
        self.zs: dict[str, torch.Tensor] | None = None
        self.generator: torch.Generator | None = None
        self.active = True
        self._handles: list[RemovableHandle] = []
        structure = get_structure(model)
        check_prunable(structure)
        shape = masks.shape
        if (structure.num_layers, structure.hidden_size) != (shape.num_layers, shape.hidden_size):
            raise ValueError(
                f"apply_masks: masks were built for {shape.num_layers} layers and hidden_size={shape.hidden_size}, "
                f"the model has {structure.num_layers} layers and hidden_size={structure.hidden_size}"
            )
        if structure.embedding_name is None:
            raise ValueError("apply_masks: the model has no token embedding to apply the hidden mask to")
        self._style = norm_style(structure.arch)
        add = self._handles.append
        add(model.register_forward_pre_hook(self._draw))
        add(model.get_submodule(structure.embedding_name).register_forward_hook(self._scale_hidden))
        if structure.final_norm_name is not None:
            add(model.get_submodule(structure.final_norm_name).register_forward_hook(self._norm))
        rows_per_group = {"q_norm": shape.kv_group_size * shape.head_dim, "k_norm": shape.head_dim}
        for block in structure.blocks:
            i = block.index
            for group, sub in (("head_layer", block.attention), ("mlp", block.mlp)):
                if sub.norm is not None:
                    add(sub.norm.register_forward_hook(self._norm))
                if sub.post_norm is not None:
                    add(sub.post_norm.register_forward_hook(self._post_norm(group, i)))
                else:
                    add(sub.module.register_forward_hook(self._sublayer_output(group, i)))
            if structure.qk_norm == "projection":
                for role, rows in rows_per_group.items():
                    norm = model.get_submodule(block.attention.inner_norms[role])
                    add(norm.register_forward_hook(self._projection_norm(i, rows)))
            add(block.attention.linear("o").register_forward_pre_hook(self._heads(i)))
            add(block.mlp.linear("down").register_forward_pre_hook(self._intermediate(i)))

    def _z(self) -> dict[str, torch.Tensor]:
        if self.zs is None:
            raise RuntimeError("MaskHooks: a submodule ran before the model's forward drew the masks")
        return self.zs

    @contextmanager
    def bypassed(self) -> Iterator[None]:
        """A context in which the hooks do nothing (the model computes unmasked), e.g. to measure the source model.

        Example:
            >>> with hooks.bypassed():  # doctest: +SKIP
            ...     source_logits = model(ids).logits
        """
        before = self.active
        self.active = False
        try:
            yield
        finally:
            self.active = before

    def _draw(self, module: nn.Module, args: Any) -> None:
        if self.active:
            self.zs = self.masks(self.generator)

    def _scale_hidden(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if not self.active:
            return None
        return output * self._z()["hidden"].to(output.dtype)

    def _masked_norm(self, module: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        weight = getattr(module, "weight", None)
        if not isinstance(eps, float) or not isinstance(weight, torch.Tensor):
            raise TypeError(f"apply_masks: {type(module).__name__} is not an RMSNorm with weight and epsilon")
        return masked_rms_norm(x, weight, eps, mask, self._style)

    def _norm(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if not self.active:
            return None
        return self._masked_norm(module, args[0], self._z()["hidden"])

    def _post_norm(self, group: str, index: int) -> Callable[..., Any]:
        # A post-norm would cancel a gate on its input (it rescales to unit RMS), so the sublayer gate multiplies its
        # output, which is what joins the residual stream.
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
            if not self.active:
                return None
            z = self._z()
            out = self._masked_norm(module, args[0], z["hidden"])
            return out * z[group][index].to(out.dtype)

        return hook

    def _projection_norm(self, index: int, rows_per_group: int) -> Callable[..., Any]:
        # OLMo 2's q_norm/k_norm: the statistic over the rows of kept heads only, as the exported (narrower) norm
        # computes it. The mask is binary: the head gate's value is applied before o_proj.
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
            if not self.active:
                return None
            kept = (self._z()["heads"][index] != 0).to(torch.float32).repeat_interleave(rows_per_group)
            return self._masked_norm(module, args[0], kept)

        return hook

    def _sublayer_output(self, group: str, index: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if not self.active:
                return None
            z = self._z()
            first = output[0] if isinstance(output, tuple) else output
            scaled = first * (z[group][index] * z["hidden"]).to(first.dtype)
            return (scaled, *output[1:]) if isinstance(output, tuple) else scaled

        return hook

    def _heads(self, index: int) -> Callable[..., Any]:
        shape = self.masks.shape

        def hook(module: nn.Module, args: Any) -> Any:
            if not self.active:
                return None
            x = args[0]
            gate = self._z()["heads"][index].to(x.dtype)
            # [..., num_heads * head_dim] -> [..., kv_heads, group_size * head_dim]: one gate per KV group.
            grouped = x.reshape(*x.shape[:-1], shape.num_kv_heads, shape.kv_group_size * shape.head_dim)
            return ((grouped * gate[:, None]).reshape(x.shape), *args[1:])

        return hook

    def _intermediate(self, index: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any) -> Any:
            if not self.active:
                return None
            x = args[0]
            return (x * self._z()["intermediate"][index].to(x.dtype), *args[1:])

        return hook

    def remove(self) -> None:
        """Remove every hook; the model computes as before."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> MaskHooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def apply_masks(model: nn.Module, masks: L0Masks) -> MaskHooks:
    """Make ``model`` compute under ``masks`` until the returned hooks are removed.

    Args:
        model: The Hugging Face model the masks were built for (a family in
            :data:`~lit_accel.pruning.masks.PRUNABLE_ARCHS`).
        masks: Its :class:`L0Masks`; their train/eval mode decides sampled or deterministic masks.

    Returns:
        :class:`MaskHooks`; also a context manager that removes them on exit.

    Raises:
        ValueError: The masks were built for a model of other sizes, or the model is not prunable
            (:func:`~lit_accel.pruning.masks.check_prunable`).
    """
    return MaskHooks(model, masks)
