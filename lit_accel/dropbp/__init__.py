"""DropBP: drop the backward pass of residual sublayers at rates set from their measured sensitivity.

``functional`` holds the algorithm (hooks, drawing, sensitivity, allocation) for use without Lightning;
``callback`` the :class:`DropBP` Lightning callback that runs it during training.

Example:
    >>> import lightning as L
    >>> from lit_accel.dropbp import DropBP
    >>> trainer = L.Trainer(max_steps=1000, callbacks=[DropBP(target=0.5)])  # doctest: +SKIP
"""

from lit_accel.dropbp.callback import MAX_TARGET, DropBP, DropBPSettings
from lit_accel.dropbp.functional import (
    DropBPController,
    all_reduce_mean,
    allocate_drop_rates,
    apply_dropbp,
    draw_mask,
    dropped_fraction,
    grad_norms,
    measure_sensitivity,
    sublayer_backward_flops,
    uniform_drop_rates,
)

__all__ = [
    "MAX_TARGET",
    "DropBP",
    "DropBPController",
    "DropBPSettings",
    "all_reduce_mean",
    "allocate_drop_rates",
    "apply_dropbp",
    "draw_mask",
    "dropped_fraction",
    "grad_norms",
    "measure_sensitivity",
    "sublayer_backward_flops",
    "uniform_drop_rates",
]
