"""Every lit_accel Lightning ``Callback`` in one flat namespace.

Example:
    >>> import lightning as L
    >>> from lit_accel.callbacks import DropBP, Throughput
    >>> trainer = L.Trainer(callbacks=[DropBP(target=0.5), Throughput()])  # doctest: +SKIP
"""

from lit_accel.data.dynamic_batch import DynamicBatchLoading
from lit_accel.dropbp.callback import DropBP
from lit_accel.kernels.callback import FusedKernels
from lit_accel.lowrank.factorize_callback import LowRankFactorization
from lit_accel.lowrank.lora_callback import LoRA
from lit_accel.observe.throughput import Throughput
from lit_accel.pruning.callback import StructuredPruning
from lit_accel.sparsity.callback import SemiStructuredSparsity

__all__ = [
    "DropBP",
    "DynamicBatchLoading",
    "FusedKernels",
    "LoRA",
    "LowRankFactorization",
    "SemiStructuredSparsity",
    "StructuredPruning",
    "Throughput",
]
