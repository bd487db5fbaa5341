"""Run a Hugging Face LLaMA-family model under :class:`~lit_accel.pruning.masks.L0Masks`, through hooks only.

No module is replaced, so the model's ``state_dict`` keeps its Hugging Face keys. Where each mask acts (as in
LLM-Shearing's ``composer_llama.py``):

- ``hidden`` multiplies the token embedding output, every sublayer output written to the residual stream, and
  every RMSNorm output. Each RMSNorm also computes its statistic over the *kept* hidden dims only
  (``sum(x^2) / n_kept``, not ``/ hidden_size``), as the paper's norm does. That is what makes the exported model
  exact: after export the norm runs over ``n_kept`` dims, and the residual stream is zero on the removed ones.
- ``heads`` (one gate per KV group) multiplies each query head's attention output before ``o_proj``; all query
  heads of a group share their group's gate.
- ``intermediate`` multiplies the MLP's intermediate activation before ``down_proj``.
- ``head_layer`` and ``mlp`` multiply the attention and MLP sublayer outputs.

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
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lit_accel.models.structure import get_structure
from lit_accel.pruning.masks import L0Masks

__all__ = ["MaskHooks", "apply_masks", "masked_rms_norm"]


def masked_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, hidden_mask: torch.Tensor) -> torch.Tensor:
    """RMSNorm whose statistic runs over the dims where ``hidden_mask != 0``; the output is multiplied by the mask.

    Args:
        x: Input ``[..., hidden]``, zero wherever ``hidden_mask`` is zero.
        weight: Norm weight ``[hidden]``.
        eps: The norm's epsilon.
        hidden_mask: Gate per hidden dim ``[hidden]``.

    Returns:
        ``weight * x / sqrt(sum(x^2 over kept dims) / n_kept + eps) * hidden_mask``, computed in float32 and cast
        back as Hugging Face's ``LlamaRMSNorm`` does.

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
    return weight * normed.to(dtype) * hidden_mask.to(dtype)


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
        shape = masks.shape
        if (structure.num_layers, structure.hidden_size) != (shape.num_layers, shape.hidden_size):
            raise ValueError(
                f"apply_masks: masks were built for {shape.num_layers} layers and hidden_size={shape.hidden_size}, "
                f"the model has {structure.num_layers} layers and hidden_size={structure.hidden_size}"
            )
        if structure.embedding_name is None:
            raise ValueError("apply_masks: the model has no token embedding to apply the hidden mask to")
        add = self._handles.append
        add(model.register_forward_pre_hook(self._draw))
        add(model.get_submodule(structure.embedding_name).register_forward_hook(self._scale_hidden))
        if structure.final_norm_name is not None:
            add(model.get_submodule(structure.final_norm_name).register_forward_hook(self._norm))
        for block in structure.blocks:
            i = block.index
            for sub in (block.attention, block.mlp):
                if sub.norm is not None:
                    add(sub.norm.register_forward_hook(self._norm))
            add(block.attention.module.register_forward_hook(self._sublayer_output("head_layer", i)))
            add(block.mlp.module.register_forward_hook(self._sublayer_output("mlp", i)))
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

    def _norm(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if not self.active:
            return None
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        weight = getattr(module, "weight", None)
        if not isinstance(eps, float) or not isinstance(weight, torch.Tensor):
            raise TypeError(f"apply_masks: {type(module).__name__} is not an RMSNorm with weight and epsilon")
        return masked_rms_norm(args[0], weight, eps, self._z()["hidden"])

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
        model: The Hugging Face LLaMA-family model the masks were built for.
        masks: Its :class:`L0Masks`; their train/eval mode decides sampled or deterministic masks.

    Returns:
        :class:`MaskHooks`; also a context manager that removes them on exit.

    Raises:
        ValueError: The masks were built for a model of other sizes.
    """
    return MaskHooks(model, masks)
