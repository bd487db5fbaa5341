"""cuSPARSELt matmul plans kept across calls, for the 2:4 layers' forward and input-gradient products.

``torch._cslt_sparse_mm`` builds its descriptors and a cuSPARSELt matmul plan inside every call and destroys them
after it: host time per call that is larger than what the sparse GEMM saves at the llama-1b MLP shapes, so a 2:4
training step ran slower than dense. A plan depends only on the shapes, dtype and
algorithm, none of which change between training steps; the operands are passed at the matmul call. This module
binds the handful of cuSPARSELt C functions with :mod:`ctypes` (cuSPARSELt ships with PyTorch's CUDA builds) and
keeps one plan per (sparse operand shape, token count, dtype, algorithm id), so each product is a single
``cusparseLtMatmul`` call on the current stream.

The descriptors are the ones ``torch._cslt_sparse_mm`` builds for ``transpose_result=True`` with a transposed
contiguous dense operand, so the packed buffers of ``torch._cslt_compress`` (and of the in-place refresh in
:mod:`lit_accel.ops.sparse24_gemm`) are used unchanged:

* ``A`` (the packed 2:4 operand, ``m x k``): structured, row-major, leading dimension ``k``, 50% sparsity;
* ``B`` (the dense ``rows`` ``[n, k]``, used transposed): dense ``n x k`` row-major, ``op(B) = transpose``;
* ``C = D`` (the result ``[n, m]`` row-major, i.e. ``m x n`` column-major with leading dimension ``m``).

cuSPARSELt's handle, descriptor and plan structs are opaque blocks whose size changed between releases (512 to
11024 bytes): each is given a 16 KiB buffer. The compute type is ``CUSPARSE_COMPUTE_32F`` (fp32 accumulation), the
value PyTorch passes for fp16/bf16 from cuSPARSELt 0.5.2 on; its enum value (2 in the 0.6-0.8 headers) is taken
from the version of the library actually loaded (``cusparseLtGetProperty``), never found by trying values.
Releases before 0.6 are not bound (:func:`plan_cache_unavailable_reason` says so). Every new plan's first product
is compared with ``torch._cslt_sparse_mm``'s bit for bit (:meth:`SparsePlanCache.matmul`); a disagreement or an
error turns the cache off for the process with a warning, and the products go back to ``torch._cslt_sparse_mm``.
At most 8 plans are kept per operand (one per token count). The cache is on by default: it is what makes a 2:4
step faster than dense (``benchmarks/RESULTS.md``, results ``sparse24/plans`` and ``sparse24/step``);
``LIT_ACCEL_CUSPARSELT_PLANS=0`` or ``set_plan_cache(False)`` turns it off.

Example:
    >>> plan_cache_unavailable_reason() is not None or torch.cuda.is_available()  # CPU: a reason
    True
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
import warnings
import weakref
from typing import Any

import torch

__all__ = ["SparsePlanCache", "max_alg_id", "plan_cache_enabled", "plan_cache_unavailable_reason", "set_plan_cache"]

_OPAQUE_BYTES = 16384
# Stable across CUDA releases (library_types.h / cusparse.h).
# bf16 only, as the layers' cuSPARSELt path (sparse24_gemm.SUPPORTED_DTYPES: fp16 faulted or hung on Hopper).
_CUDA_R = {torch.bfloat16: 14}
_OP_N, _OP_T = 0, 1
_SPARSITY_50 = 0
_ALG_DEFAULT = 0
_ALG_CONFIG_ID, _ALG_CONFIG_MAX_ID = 0, 1  # cusparseLtMatmulAlgAttribute_t
# cusparseOrder_t (cusparse.h): COL 1, ROW 2.
_ROW, _COL = 2, 1
# cusparseComputeType in cuSPARSELt >= 0.6 (cusparseLt.h): 32I 0, 16F 1, 32F 2. Earlier releases ordered the enum
# differently (TF32 and 16F for these dtypes), so they are not bound.
_COMPUTE_32F = 2
_MIN_VERSION = 600
_MAX_PLANS = 8  # per operand: one per distinct token count seen, the oldest dropped first
_SUCCESS = 0

_OFF_VALUES = ("0", "false", "off", "no")


def _enabled_by(value: str | None) -> bool:
    """``LIT_ACCEL_CUSPARSELT_PLANS``: unset or empty means on (the default); 0 / false / off / no, in any case,
    turn the cache off; anything else leaves it on."""
    return value is None or value.strip().lower() not in _OFF_VALUES


_CACHES: weakref.WeakSet[SparsePlanCache] = weakref.WeakSet()
_state: dict[str, Any] = {
    "enabled": _enabled_by(os.environ.get("LIT_ACCEL_CUSPARSELT_PLANS")),
    "lib": None,
    "lib_error": None,
    "handles": {},
    "disabled_reason": None,
}


def set_plan_cache(enabled: bool) -> None:
    """Turns the plan cache on or off for this process (a previous failure is forgotten when turning it on)."""
    if not isinstance(enabled, bool):
        raise ValueError(f"set_plan_cache(enabled={enabled!r}): enabled must be a bool")
    _state["enabled"] = enabled
    if enabled:
        _state["disabled_reason"] = None


def plan_cache_enabled() -> bool:
    """Whether products go through cached plans (enabled, not turned off by a failed check, library found)."""
    return bool(_state["enabled"]) and _state["disabled_reason"] is None and plan_cache_unavailable_reason() is None


def _loaded_paths() -> list[str]:
    """The libcusparseLt this process already mapped (torch's own copy), so that the binding uses the same one."""
    try:
        with open("/proc/self/maps") as maps:
            return sorted({line.split()[-1] for line in maps if "libcusparseLt" in line and "/" in line})
    except OSError:
        return []


def _candidate_paths() -> list[str]:
    if torch.cuda.is_available():
        torch.zeros(1, device="cuda")  # make torch load its CUDA libraries before looking for its cuSPARSELt
    paths = [*_loaded_paths(), "libcusparseLt.so.0", "libcusparseLt.so"]
    roots = [os.path.dirname(torch.__file__), *sys.path]
    for root in roots:
        for pattern in ("nvidia/cusparselt/lib/libcusparseLt.so*", "lib/libcusparseLt.so*", "cusparselt/lib/*.so*"):
            paths.extend(sorted(glob.glob(os.path.join(root, pattern))))
    return paths


def _load() -> Any:
    if _state["lib"] is not None or _state["lib_error"] is not None:
        return _state["lib"]
    errors = []
    for path in _candidate_paths():
        try:
            lib = ctypes.CDLL(path)
            break
        except OSError as err:
            errors.append(f"{path}: {err}")
    else:
        _state["lib_error"] = "libcusparseLt not found (" + "; ".join(errors[:3]) + ")"
        return None
    p, i64, u32, i32, sz = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint32, ctypes.c_int, ctypes.c_size_t
    signatures = {
        "cusparseLtInit": [p],
        "cusparseLtStructuredDescriptorInit": [p, p, i64, i64, i64, u32, i32, i32, i32],
        "cusparseLtDenseDescriptorInit": [p, p, i64, i64, i64, u32, i32, i32],
        "cusparseLtMatmulDescriptorInit": [p, p, i32, i32, p, p, p, p, i32],
        "cusparseLtMatmulAlgSelectionInit": [p, p, p, i32],
        "cusparseLtMatmulAlgSetAttribute": [p, p, i32, p, sz],
        "cusparseLtMatmulAlgGetAttribute": [p, p, i32, p, sz],
        "cusparseLtMatmulPlanInit": [p, p, p, p],
        "cusparseLtMatmulGetWorkspace": [p, p, p],
        "cusparseLtMatmul": [p, p, p, p, p, p, p, p, p, p, i32],
        "cusparseLtMatmulPlanDestroy": [p],
        "cusparseLtMatDescriptorDestroy": [p],
        "cusparseLtGetProperty": [i32, p],
    }
    try:
        for name, args in signatures.items():
            fn = getattr(lib, name)
            fn.argtypes = args
            fn.restype = ctypes.c_int
    except AttributeError as err:
        _state["lib_error"] = f"libcusparseLt lacks a function this binding needs: {err}"
        return None
    _state["lib"] = lib
    return lib


def plan_cache_unavailable_reason() -> str | None:
    """Why cached plans cannot run here (no CUDA, no cuSPARSELt in torch, library not loadable), or None.

    Found once per process (it is asked before every product while the cache is on)."""
    if "unavailable" not in _state:
        if not torch.cuda.is_available():
            reason: str | None = "CUDA is not available"
        elif not torch.backends.cusparselt.is_available():
            reason = "this PyTorch build has no cuSPARSELt"
        elif (version := torch.backends.cusparselt.version() or 0) < _MIN_VERSION:
            reason = f"cuSPARSELt {version} is older than 0.6 (an enum this binding needs differs there)"
        elif _load() is None:
            reason = str(_state["lib_error"])
        elif (loaded := _loaded_version()) < _MIN_VERSION:
            reason = f"the libcusparseLt loaded reports version {loaded}, older than 0.6 (an enum this binding needs)"
        else:
            reason = None
        _state["unavailable"] = reason
    return _state["unavailable"]  # type: ignore[no-any-return]


def _loaded_version() -> int:
    """The version of the libcusparseLt this binding loaded (it may not be the copy torch was built with), in the
    form of ``torch.backends.cusparselt.version()``: major * 1000 + minor * 100 + patch (0.8.0 -> 800)."""
    lib = _load()
    parts = []
    for prop in (0, 1, 2):  # libraryPropertyType: MAJOR_VERSION, MINOR_VERSION, PATCH_LEVEL
        value = ctypes.c_int(-1)
        if lib.cusparseLtGetProperty(prop, ctypes.byref(value)) != _SUCCESS:
            return -1
        parts.append(int(value.value))
    return parts[0] * 1000 + parts[1] * 100 + parts[2]


def _opaque() -> Any:
    return ctypes.create_string_buffer(_OPAQUE_BYTES)


def _check(status: int, what: str) -> None:
    if status != _SUCCESS:
        raise RuntimeError(f"cuSPARSELt {what} returned status {status}")


def _handle(device: torch.device) -> Any:
    index = device.index if device.index is not None else torch.cuda.current_device()
    handles = _state["handles"]
    if index not in handles:
        handle = _opaque()
        with torch.cuda.device(index):
            _check(_load().cusparseLtInit(handle), "Init")
        handles[index] = handle
    return handles[index]


class _Plan:
    """Descriptors, plan and workspace of one product ``rows @ A^T`` (``A`` packed ``m x k``, ``rows`` ``[n, k]``)."""

    def __init__(
        self, m: int, k: int, n: int, dtype: torch.dtype, alg_id: int | None, device: torch.device, compute: int
    ) -> None:
        lib = _load()
        row, col = _ROW, _COL
        self.lib, self.handle = lib, _handle(device)
        self.m, self.k, self.n, self.dtype, self.device = m, k, n, dtype, device
        self.mat_a, self.mat_b, self.mat_d = _opaque(), _opaque(), _opaque()
        self.matmul, self.alg, self.plan = _opaque(), _opaque(), _opaque()
        self._live: list[Any] = []
        t = _CUDA_R[dtype]
        h = self.handle
        _check(lib.cusparseLtStructuredDescriptorInit(h, self.mat_a, m, k, k, 16, t, row, _SPARSITY_50), "A descr")
        self._live.append(self.mat_a)
        _check(lib.cusparseLtDenseDescriptorInit(h, self.mat_b, n, k, k, 16, t, row), "B descriptor")
        self._live.append(self.mat_b)
        _check(lib.cusparseLtDenseDescriptorInit(h, self.mat_d, m, n, m, 16, t, col), "D descriptor")
        self._live.append(self.mat_d)
        args = (h, self.matmul, _OP_N, _OP_T, self.mat_a, self.mat_b, self.mat_d, self.mat_d, compute)
        _check(lib.cusparseLtMatmulDescriptorInit(*args), "matmul descriptor")
        _check(lib.cusparseLtMatmulAlgSelectionInit(h, self.alg, self.matmul, _ALG_DEFAULT), "alg selection")
        self._alg_live = True
        top = ctypes.c_int(-1)
        args_max = (h, self.alg, _ALG_CONFIG_MAX_ID, ctypes.byref(top), ctypes.sizeof(top))
        _check(lib.cusparseLtMatmulAlgGetAttribute(*args_max), "max alg id")
        self.max_alg_id = int(top.value)
        if alg_id is None:  # only the descriptors and the id range were asked for
            return
        if not 0 <= alg_id < self.max_alg_id:
            # CONFIG_MAX_ID is exclusive (an H100 refused id 21 of bf16's reported 21). An id past the valid ones is
            # not always refused at set-up, and the product can then fault the CUDA context: never pass one.
            raise ValueError(f"alg_id={alg_id} is outside cuSPARSELt's 0..{self.max_alg_id - 1} for {(m, k, n)}")
        alg = ctypes.c_int(int(alg_id))
        size = ctypes.sizeof(alg)
        _check(lib.cusparseLtMatmulAlgSetAttribute(h, self.alg, _ALG_CONFIG_ID, ctypes.byref(alg), size), "alg id")
        _check(lib.cusparseLtMatmulPlanInit(h, self.plan, self.matmul, self.alg), "plan")
        self._plan_live = True
        workspace = ctypes.c_size_t(0)
        _check(lib.cusparseLtMatmulGetWorkspace(h, self.plan, ctypes.byref(workspace)), "workspace size")
        self.workspace_bytes = max(int(workspace.value), 1)
        self.alpha, self.beta = ctypes.c_float(1.0), ctypes.c_float(0.0)

    def __call__(self, packed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        out = torch.empty((self.n, self.m), dtype=self.dtype, device=self.device)
        # Allocated per call on the current stream (the caching allocator makes this cheap): a workspace kept in the
        # plan would be shared across streams without the allocator knowing.
        workspace = torch.empty(self.workspace_bytes, dtype=torch.uint8, device=self.device)
        streams = (ctypes.c_void_p * 1)(torch.cuda.current_stream(self.device).cuda_stream)
        status = self.lib.cusparseLtMatmul(
            self.handle, self.plan, ctypes.byref(self.alpha), packed.data_ptr(), rows.data_ptr(),
            ctypes.byref(self.beta), out.data_ptr(), out.data_ptr(), workspace.data_ptr(), streams, 1,
        )  # fmt: skip
        _check(status, "Matmul")
        return out

    def __del__(self) -> None:
        lib = getattr(self, "lib", None)
        if lib is None:
            return
        try:
            if getattr(self, "_plan_live", False):
                lib.cusparseLtMatmulPlanDestroy(self.plan)
            if getattr(self, "_alg_live", False) and hasattr(lib, "cusparseLtMatmulAlgSelectionDestroy"):
                lib.cusparseLtMatmulAlgSelectionDestroy(self.alg)
            for descr in getattr(self, "_live", []):
                lib.cusparseLtMatDescriptorDestroy(descr)
        except Exception:  # interpreter shutdown: the library may already be gone
            pass


_MAX_IDS: dict[tuple[int, int, int, torch.dtype, int], int] = {}


def max_alg_id(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device) -> int | None:
    """cuSPARSELt's ``CUSPARSELT_MATMUL_ALG_CONFIG_MAX_ID`` for ``rows @ A^T`` (``A`` ``m x k`` 2:4, ``rows``
    ``[n, k]``): the valid algorithm ids are ``0 .. max - 1``.

    Asked of cuSPARSELt itself once per shape; an id past the valid ones is not always refused by
    ``torch._cslt_sparse_mm`` and can fault the CUDA context, so a sweep over ids must stop here. None when this
    binding cannot run (no CUDA, library not loadable), when the plan cache was turned off (the switch takes the
    whole binding out) or the query fails.
    """
    if not plan_cache_enabled() or dtype not in _CUDA_R:
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (m, k, n, dtype, index)
    if key not in _MAX_IDS:
        try:
            _MAX_IDS[key] = _Plan(m, k, n, dtype, None, device, _COMPUTE_32F).max_alg_id
        except RuntimeError:
            return None
    return _MAX_IDS[key]


class SparsePlanCache:
    """The cached plans of one sparse operand; :meth:`matmul` falls back to ``torch._cslt_sparse_mm``.

    Args:
        name: The layer (and operand) for messages.
    """

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.plans: dict[tuple[int, int, int, torch.dtype, int], _Plan] = {}
        _CACHES.add(self)

    def matmul(self, packed: torch.Tensor, rows: torch.Tensor, m: int, alg_id: int) -> torch.Tensor:
        """``rows @ A^T`` for ``A`` (``m x k``) packed in ``packed``, ``rows`` contiguous ``[n, k]``: ``[n, m]``.

        Equal bit for bit to ``torch._cslt_sparse_mm(packed, rows.t(), transpose_result=True, alg_id=alg_id)``
        (checked on each plan's first call; a mismatch or an error turns the cache off for the process).
        """
        reference = lambda: torch._cslt_sparse_mm(packed, rows.t(), transpose_result=True, alg_id=alg_id)  # noqa: E731
        if not plan_cache_enabled() or not rows.is_contiguous() or rows.dtype not in _CUDA_R:
            return reference()
        n, k = rows.shape
        key = (m, k, n, rows.dtype, alg_id)
        plan = self.plans.get(key)
        if plan is not None:
            try:
                return plan(packed, rows)
            except RuntimeError as err:
                self._disable(f"a cached plan failed ({err})")
                return reference()
        expected = reference()
        try:
            plan = _Plan(m, k, n, rows.dtype, alg_id, rows.device, _COMPUTE_32F)
            got = plan(packed, rows)
        except (RuntimeError, ValueError) as err:
            self._disable(f"no plan for {key[:3]} ({err})")
            return expected
        if not torch.equal(got, expected):
            self._disable(f"the plan for {key[:3]} gave a product that differs from torch._cslt_sparse_mm")
            return expected
        if len(self.plans) >= _MAX_PLANS:
            del self.plans[next(iter(self.plans))]
        self.plans[key] = plan
        return got

    def _disable(self, why: str) -> None:
        _state["disabled_reason"] = why
        for cache in list(_CACHES):
            cache.plans.clear()
        warnings.warn(
            f"lit_accel cuSPARSELt plan cache is off for this process ({self.name}): {why}; the 2:4 products use "
            "torch._cslt_sparse_mm (correct, with its per-call plan set-up).",
            stacklevel=3,
        )
