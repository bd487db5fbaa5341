"""Every lit_accel Lightning ``Callback`` in one flat namespace.

Example:
    >>> import lightning as L
    >>> from lit_accel.callbacks import DropBP, Throughput
    >>> trainer = L.Trainer(callbacks=[DropBP(target=0.5), Throughput()])  # doctest: +SKIP
"""

from lit_accel.dropbp.callback import DropBP
from lit_accel.observe.throughput import Throughput

__all__ = ["DropBP", "Throughput"]
