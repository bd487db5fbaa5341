"""Every lit_accel Lightning ``Callback`` in one flat namespace.

Example:
    >>> import lightning as L
    >>> from lit_accel.callbacks import Throughput
    >>> trainer = L.Trainer(callbacks=[Throughput()])  # doctest: +SKIP
"""

from lit_accel.observe.throughput import Throughput

__all__ = ["Throughput"]
