"""The optional triton import every kernel file shares, and the interpreter switch.

triton is a Linux-only dependency: without it every op runs its plain-PyTorch reference.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["HAS_TRITON", "interpret", "tl", "triton"]

triton: Any = None
tl: Any = None
HAS_TRITON = False
try:
    import triton as _triton
    import triton.language as _tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    pass
else:
    triton, tl, HAS_TRITON = _triton, _tl, True


def interpret() -> bool:
    """Whether triton runs in its CPU interpreter (``TRITON_INTERPRET=1``).

    The variable must have been set before triton was first imported: ``tl.zeros``, ``tl.cdiv``, ... are themselves
    jitted functions whose mode (compiled or interpreted) is fixed at that import.
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
