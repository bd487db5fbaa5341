"""Model FLOPs of a decoder-only transformer, per token, from its :class:`~lit_accel.models.structure.ModelStructure`.

Counting follows the PaLM paper's model-FLOPs-utilisation formula (Chowdhery et al. 2022, appendix B): a
matmul with ``P`` weights costs ``2 * P`` FLOPs per token forward; self-attention adds ``QK^T`` and ``AV``,
``2 * 2 * seq_len * num_heads * head_dim`` per token forward, counted over the full ``seq_len`` with no causal
halving (and no sliding window) so that MFU numbers compare with published ones. Norms, activations, softmax,
embeddings and biases are not counted. Training costs three forward passes (forward, backward through the
activations, backward to the weights), so for a model with ``N`` matmul weights (LM head included, embeddings
excluded), ``L`` blocks, ``H`` heads of size ``Q`` and sequence length ``T``, training costs
``6 * N + 12 * L * H * Q * T`` per token.

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from lit_accel.models.structure import get_structure
    >>> s = get_structure(LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128,
    ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128)))
    >>> flops_per_token(s, seq_len=32)
    540672.0
"""

from __future__ import annotations

from torch import nn

from lit_accel.models.structure import ModelStructure, Sublayer, linear_in_out_features

__all__ = ["backward_flops", "flops_per_token", "lm_head_flops", "sublayer_flops"]


def _matmul_flops(linears: dict[str, nn.Module] | list[nn.Module]) -> float:
    modules = linears.values() if isinstance(linears, dict) else linears
    total = 0
    for module in modules:
        per_token = getattr(module, "flops_per_token", None)
        if callable(per_token):  # e.g. a factorised projection: 2 r (in + out), not 2 in out
            total += int(per_token())
            continue
        fin, fout = linear_in_out_features(module)
        total += 2 * fin * fout
    return float(total)


def sublayer_flops(structure: ModelStructure, sublayer: Sublayer, seq_len: int, batch_tokens: int = 1) -> float:
    """Forward FLOPs of one sublayer for ``batch_tokens`` tokens (per token by default).

    ``2 * matmul weights`` (for a mixture of experts: the router and the ``experts_per_token`` active experts only),
    plus for attention ``2 * 2 * seq_len * num_heads * head_dim`` for ``QK^T`` and ``AV``
    (PaLM's convention: no causal halving).

    Args:
        structure: The model's structure (for the head layout).
        sublayer: One of ``structure.sublayers()``.
        seq_len: Sequence length each token attends over.
        batch_tokens: Number of tokens to count for.

    Returns:
        Forward FLOPs.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be a positive int, got {seq_len}")
    flops = _matmul_flops(sublayer.linears)
    if sublayer.experts is not None:
        # Only the experts a token is routed to run: the router plus ``experts_per_token`` expert MLPs.
        flops += sublayer.experts.forward_flops_per_token()
    if sublayer.kind == "attention":
        a = structure.attention
        flops += 2.0 * 2.0 * seq_len * a.num_heads * a.head_dim
    return flops * batch_tokens


def backward_flops(structure: ModelStructure, sublayer: Sublayer, seq_len: int, batch_tokens: int = 1) -> float:
    """Backward FLOPs of one sublayer (gradients of activations and of weights): twice its forward FLOPs.

    This is what DropBP saves for each sublayer whose backward it skips.

    Args:
        structure: The model's structure.
        sublayer: One of ``structure.sublayers()``.
        seq_len: Sequence length.
        batch_tokens: Number of tokens to count for.

    Returns:
        Backward FLOPs.
    """
    return 2.0 * sublayer_flops(structure, sublayer, seq_len, batch_tokens)


def lm_head_flops(structure: ModelStructure, batch_tokens: int = 1) -> float:
    """Forward FLOPs of the LM head (``2 * hidden * vocab`` per token); 0 for a model without one."""
    if structure.lm_head_name is None:
        return 0.0
    return _matmul_flops([structure.model.get_submodule(structure.lm_head_name)]) * batch_tokens


def flops_per_token(
    structure: ModelStructure, seq_len: int, training: bool = True, include_lm_head: bool = True
) -> float:
    """Model FLOPs per token of the whole model.

    Args:
        structure: The model's structure.
        seq_len: Sequence length.
        training: Count forward and backward (3x forward); else forward only.
        include_lm_head: Count the LM head matmul.

    Returns:
        FLOPs per token; for training this is PaLM's ``6N + 12 * L * H * Q * T``.
    """
    forward = sum(sublayer_flops(structure, sub, seq_len) for sub in structure.sublayers())
    if include_lm_head:
        forward += lm_head_flops(structure)
    return 3.0 * forward if training else forward
