"""2:4 semi-structured sparse training (Hu et al., 2024): masks, the masked linear, and the callback.

Example:
    >>> import torch
    >>> from lit_accel.sparsity import transposable_24_mask_reference
    >>> int(transposable_24_mask_reference(torch.randn(4, 8)).sum())
    16
"""

from lit_accel.sparsity.callback import (
    MASKS_FILE,
    PHASES,
    SemiStructuredSparsity,
    SemiStructuredSparsitySettings,
)
from lit_accel.sparsity.functional import (
    NUM_TRANSPOSABLE_PATTERNS,
    MaskedLinearFunction,
    SparseLinear,
    check_24_shape,
    flip_rate,
    masked_decay_,
    masked_linear,
    rowwise_24_mask,
    set_24_masks,
    sparsify_linears,
    transposable_24_mask_reference,
    transposable_patterns,
)

__all__ = [
    "MASKS_FILE",
    "NUM_TRANSPOSABLE_PATTERNS",
    "PHASES",
    "MaskedLinearFunction",
    "SemiStructuredSparsity",
    "SemiStructuredSparsitySettings",
    "SparseLinear",
    "check_24_shape",
    "flip_rate",
    "masked_decay_",
    "masked_linear",
    "rowwise_24_mask",
    "set_24_masks",
    "sparsify_linears",
    "transposable_24_mask_reference",
    "transposable_patterns",
]
