"""2:4 sparse matmuls for :class:`~lit_accel.sparsity.functional.SparseLinear` on the GPU, through cuSPARSELt.

Forward ``y = x (W*M)^T + b`` and input gradient ``dX = dY (W*M)`` run on the sparse tensor cores; the weight
gradient ``dW = dY^T x`` stays a dense matmul (the pruned weights keep learning, as in the masked dense
reference :class:`~lit_accel.sparsity.functional.MaskedLinearFunction`, whose numerics this path reproduces).

Three layers, as every op in :mod:`lit_accel.ops`:

* the reference: the masked dense path of :func:`~lit_accel.sparsity.functional.masked_linear` (CPU, fp32, and
  every case this path refuses);
* :class:`CusparseltWeight` + :class:`Sparse24LinearFunction`: the cuSPARSELt path, with the Triton gather
  kernel below refreshing the packed operands in place;
* :func:`sparse24_linear`: the entry point, which falls back to the reference (with a warning naming the layer)
  wherever cuSPARSELt cannot run.

**The packed operands.** cuSPARSELt multiplies a *compressed* sparse matrix ``A`` (``m x k``, 2 kept of every 4
along each row) by a dense one. ``torch._cslt_compress(A)`` returns one buffer: the ``m*k/2`` kept values, then
metadata (which 2 of each 4 are kept). The metadata depends only on the mask; the mask changes every ~40 steps,
the weights every step. So for each mask this module learns, once, where each kept value lands in the buffer: it
compresses a few probe matrices whose kept entries hold base-256 digits (1..256, exact in bf16 and fp16) of
their own flat position, on the same mask, and reads the digits back (:func:`learn_packed_index`). Each weight
update then costs one gather per operand (:func:`gather_values_`, a Triton kernel reading the fp32 master weight
and writing bf16/fp16 values into the buffer in place): for ``W`` (forward) and for ``W^T`` (input gradient;
with a transposable mask ``W^T`` is 2:4 too). The first refresh under each mask is checked against a fresh
``torch._cslt_compress`` (kept values and metadata bit for bit, and the product); if it differs the layer falls
back to compressing ``W`` and ``W^T`` afresh at every refresh, with a warning.

A refresh happens when the weights may have changed since the last one: after any optimizer step (a global
``torch.optim`` step hook bumps an epoch counter: fused AdamW updates parameters without bumping their
``_version``), when the weight's ``_version`` or storage changed (``load_state_dict``, in-place edits under
``no_grad``), or after :func:`mark_weights_updated` (for anything else, e.g. writes through ``.data``). So
gradient-accumulation micro-batches and activation-checkpointing recomputes reuse the packed operands; a weight
refreshed between a forward and its backward raises (as autograd would for a saved tensor modified in place).

**Matmul layout.** ``torch._cslt_sparse_mm`` always takes the sparse operand first. Forward: ``A = W``
(``out x in``), dense operand ``x^T`` passed as the transposed view of the contiguous ``x`` (no copy), and
``transpose_result=True`` so the result comes back as a contiguous ``[tokens, out]``. Input gradient: ``A = W^T``,
dense operand ``dY^T`` likewise. The algorithm id (cuSPARSELt 0.8 on an H100 offers 21 for this layout, and the
fastest differs by 2x from the slowest) is chosen per (shape, tokens, dtype) by timing each one once
(:func:`select_alg`); ``split_k`` was refused for these shapes there.

Why plans are cached. The sparse products beat dense in GPU time at llama shapes, but each ``_cslt_sparse_mm`` call
sets up a cuSPARSELt plan on the host, which costs more than the GEMM saves, and in training that host time is not
hidden. So :attr:`LayerTiming.speedup`, which ``kernel="auto"`` of the callback uses, weighs the wall time too, and
the products go through cuSPARSELt plans cached across calls (:mod:`lit_accel.ops.cusparselt`, which binds the
library directly; PyTorch's ops rebuild the plan per call). The figures (per product, per layer, per MLP block and
per llama-1b step, with and without the plan cache) are results ``sparse24/linears``, ``sparse24/mlp_block``,
``sparse24/step`` and ``sparse24/plans`` in ``benchmarks/RESULTS.md``.

**Constraints** (measured on the same H100): the sparse operand's two dims must be multiples of 16 (8, 24 and 40
were refused), so both dims of ``W`` must be (``W`` and ``W^T`` are both the sparse operand); the token count
must be a multiple of 8 (padded here when it is not); bf16 only (fp32 would run as TF32 and differ from the
reference; fp16 faulted or hung, see :data:`SUPPORTED_DTYPES`: such layers stay on the masked dense path, with a
warning).

Example:
    >>> import torch
    >>> check_gemm_shape(2048, 5632) is None, check_gemm_shape(2048, 5640)
    (True, 'weight shape (2048, 5640): cuSPARSELt needs both dims to be multiples of 16')
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

from lit_accel.ops._triton import HAS_TRITON as _HAS_TRITON
from lit_accel.ops._triton import interpret as _interpret
from lit_accel.ops._triton import tl, triton
from lit_accel.ops.cusparselt import SparsePlanCache, max_alg_id
from lit_accel.ops.masked_linear import masked_linear
from lit_accel.ops.sparse24 import transposable_24_mask

__all__ = [
    "DIM_MULTIPLE",
    "SUPPORTED_DTYPES",
    "TOKEN_MULTIPLE",
    "CusparseltWeight",
    "LayerTiming",
    "Sparse24LinearFunction",
    "VerifyResult",
    "check_gemm_shape",
    "compare_layer",
    "cusparselt_unsupported_reason",
    "gather_values_",
    "gather_values_reference",
    "gpu_time",
    "learn_packed_index",
    "mark_weights_updated",
    "select_alg",
    "sparse24_linear",
]

DIM_MULTIPLE = 16
"""Both dims of the sparse operand must be multiples of this (cuSPARSELt 0.8, bf16/fp16, measured on an H100)."""
TOKEN_MULTIPLE = 8
"""The dense operand's token count must be a multiple of this; :class:`Sparse24LinearFunction` pads to it."""
SUPPORTED_DTYPES = (torch.bfloat16,)
"""Compute dtypes of the cuSPARSELt path. bf16 only: with cuSPARSELt 0.8 on Hopper, fp16 products faulted the CUDA
context (algorithm ids 36-47, all tried past 35, below the library's reported maximum of 52; on an H200) or hung
(a 2048 x 2048 operand at 16 tokens, and the probe's 256 x 512 case, on an H100), while every bf16 case ran
correctly; fp16 layers stay on the masked dense path with a warning."""
_LAST_SAFE_ALG_ID = 20
"""The last algorithm id :func:`select_alg` tries: the end of the bf16 range cuSPARSELt 0.8 offers (0..20; its
``CONFIG_MAX_ID`` of 21 is exclusive) on H100 and H200, all of which ran correctly there; fp16 ids 36-47 faulted the
CUDA context (see :data:`SUPPORTED_DTYPES`)."""


# --------------------------------------------------------------------------------------------------------------
# What can run where
# --------------------------------------------------------------------------------------------------------------


def cusparselt_unsupported_reason(device: torch.device | str, dtype: torch.dtype | None = None) -> str | None:
    """Why the cuSPARSELt path cannot run for tensors on ``device`` computing in ``dtype``, or None if it can.

    Example:
        >>> cusparselt_unsupported_reason("cpu")
        'the layer is on cpu; cuSPARSELt runs on CUDA GPUs'
    """
    device = torch.device(device)
    if device.type != "cuda":
        return f"the layer is on {device.type}; cuSPARSELt runs on CUDA GPUs"
    if not torch.backends.cusparselt.is_available():
        return "this PyTorch build has no cuSPARSELt"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "2:4 sparse tensor cores need compute capability 8.0 or newer"
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        return (
            f"the compute dtype is {dtype}; the cuSPARSELt path takes bfloat16 only (fp16 products faulted or hung "
            "in cuSPARSELt 0.8 on Hopper; train with precision='bf16-mixed')"
        )
    return None


def check_gemm_shape(out_features: int, in_features: int) -> str | None:
    """Why a ``[out_features, in_features]`` weight cannot be a cuSPARSELt operand, or None if it can."""
    if out_features % DIM_MULTIPLE or in_features % DIM_MULTIPLE:
        return (
            f"weight shape ({out_features}, {in_features}): cuSPARSELt needs both dims to be multiples of "
            f"{DIM_MULTIPLE}"
        )
    return None


# --------------------------------------------------------------------------------------------------------------
# The packed-value index and the gather
# --------------------------------------------------------------------------------------------------------------


def _cslt_compress(a: torch.Tensor) -> torch.Tensor:
    return torch._cslt_compress(a)


def learn_packed_index(
    mask: torch.Tensor, dtype: torch.dtype, compress: Callable[[torch.Tensor], torch.Tensor] = _cslt_compress
) -> torch.Tensor:
    """For each of the first ``m*k/2`` elements of ``compress(A)`` (the kept values), the flat index into ``A``.

    ``A`` is ``[m, k]`` with kept positions ``mask`` (2 of every 4 along each row). The probes hold, at the kept
    positions, base-256 digits of each position's flat index plus one (values 1..256, exact in bf16 and fp16, and
    never zero, so the compressor sees exactly the mask's pattern); ``ceil(log256(m*k))`` compressions suffice
    (3 for the llama-1b MLP).

    Args:
        mask: bool ``[m, k]``, exactly 2 kept in every 4 consecutive entries of a row.
        dtype: The compressed operand's dtype (bf16; the index is the same for fp16).
        compress: The compressor (``torch._cslt_compress``; the tests pass a stand-in).

    Returns:
        int32 (int64 past 2**31 entries) ``[m*k/2]``.

    Raises:
        RuntimeError: If the digits read back do not map the slots one to one onto the kept positions (the buffer
            does not hold the kept values as assumed).
    """
    m, k = mask.shape
    n = m * k
    nv = n // 2
    flat = torch.arange(n, device=mask.device, dtype=torch.int64)
    index = torch.zeros(nv, dtype=torch.int64, device=mask.device)
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    digits, span = 1, 256
    while span < n:
        digits, span = digits + 1, span * 256
    for d in range(digits):
        code = ((flat // 256**d) % 256 + 1).to(dtype).reshape(m, k)
        packed = compress(torch.where(mask, code, zero))
        got = packed.reshape(-1)[:nv].float().round().long() - 1
        if bool(((got < 0) | (got > 255)).any()):
            raise RuntimeError("the compressed buffer does not start with the kept values: a probe digit is off")
        index += got * 256**d
    hit = torch.zeros(n, dtype=torch.bool, device=mask.device)
    hit[index.clamp(0, n - 1)] = True
    if int(index.min()) < 0 or int(index.max()) >= n or not torch.equal(hit, mask.reshape(-1).bool()):
        raise RuntimeError("the learned packed index does not map the slots one to one onto the kept positions")
    return index.to(torch.int32) if n < 2**31 else index


if _HAS_TRITON:

    @triton.jit
    def _gather_kernel(w_ptr, idx_ptr, out_ptr, n, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        src = tl.load(idx_ptr + offs, mask=inside, other=0)
        v = tl.load(w_ptr + src, mask=inside, other=0.0)
        tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=inside)


def gather_values_reference(out: torch.Tensor, weight: torch.Tensor, index: torch.Tensor) -> None:
    """``out[s] = weight.flatten()[index[s]]`` cast to ``out``'s dtype, in place (plain PyTorch)."""
    out.copy_(weight.detach().reshape(-1).index_select(0, index.long()))


def gather_values_(
    out: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, use_kernel: bool | None = None
) -> None:
    """``out[s] = weight.flatten()[index[s]]`` cast to ``out``'s dtype, in place: one Triton kernel (a read of the
    kept half of ``weight`` in its own dtype, e.g. the fp32 master weight, and a write of ``out``).

    Args:
        out: Contiguous 1-D destination (a view into the packed buffer).
        weight: The dense weight, contiguous.
        index: int32/int64 ``[out.numel()]`` flat indices into ``weight``.
        use_kernel: None: Triton on CUDA, PyTorch elsewhere; True: Triton (on CPU only under TRITON_INTERPRET=1).

    Example:
        >>> out = torch.zeros(2, dtype=torch.bfloat16)
        >>> gather_values_(out, torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([3, 0])); out.tolist()
        [4.0, 1.0]
    """
    if out.numel() != index.numel() or not out.is_contiguous() or out.dim() != 1:
        raise ValueError(f"out must be contiguous 1-D with {index.numel()} elements, got {tuple(out.shape)}")
    w = weight.detach()
    if not w.is_contiguous():
        raise ValueError("gather_values_ needs a contiguous weight")
    if use_kernel is None:
        use_kernel = _HAS_TRITON and w.is_cuda
    if not use_kernel:
        gather_values_reference(out, w, index)
        return
    if not _HAS_TRITON or (not w.is_cuda and not _interpret()):
        raise ValueError("gather_values_ with use_kernel=True needs triton and CUDA (or TRITON_INTERPRET=1)")
    n = out.numel()
    block = 1024
    _gather_kernel[(triton.cdiv(n, block),)](w, index, out, n, BLOCK=block)


# --------------------------------------------------------------------------------------------------------------
# Timing and algorithm choice
# --------------------------------------------------------------------------------------------------------------


def gpu_time(fn: Callable[[], Any], iters: int = 10, repeats: int = 3, warmup: int = 2) -> tuple[float, float]:
    """GPU milliseconds per call of ``fn`` with the launch queue kept full, and host milliseconds per call.

    Before each timed window the GPU spins (``torch.cuda._sleep``) long enough for the host to queue the whole
    window, so per-call host overhead (large for cuSPARSELt) does not show in the GPU time; the host time is
    reported separately. Medians over ``repeats`` windows.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    host_guess = max(time.perf_counter() - t0, 1e-4)
    spin = int(min(2e9, max(1e6, 1.2 * host_guess * iters * 2e9)))  # ~2 GHz clock; cycles to outlast the host
    gpu, host = [], []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(spin)
        start.record()
        h0 = time.perf_counter()
        for _ in range(iters):
            fn()
        h1 = time.perf_counter()
        end.record()
        torch.cuda.synchronize()
        gpu.append(start.elapsed_time(end) / iters)
        host.append((h1 - h0) * 1e3 / iters)
    return sorted(gpu)[len(gpu) // 2], sorted(host)[len(host) // 2]


_ALG_CACHE: dict[tuple[Any, ...], int] = {}


def select_alg(packed: torch.Tensor, rows: torch.Tensor, *, with_bias: bool = False, iters: int = 5) -> int:
    """The fastest cuSPARSELt algorithm id for ``packed @ rows^T`` (``transpose_result=True``), by timing each.

    Cached per (sparse shape, tokens, dtype, bias, device): the sweep (about 21 ids, a few ms each) runs once per
    distinct shape. It covers the ids cuSPARSELt itself reports for the shape
    (:func:`lit_accel.ops.cusparselt.max_alg_id`): an id past the last one is not always refused and can fault
    the CUDA context. Ids past :data:`_LAST_SAFE_ALG_ID` are never tried either: for fp16 cuSPARSELt 0.8 reports a
    maximum of 52, and on an H200 ids 36-47 (all tried) faulted the CUDA context (illegal instruction) at a shape
    where 0..35 ran correctly. Where the query cannot run (no binding, or the plan cache turned off) and for dtypes
    other than bf16, only the default id 0 is used.
    """
    k = rows.shape[1]
    m = packed.numel() * 16 // 9 // k
    key = (m, k, rows.shape[0], rows.dtype, with_bias, rows.device)
    if key in _ALG_CACHE:
        return _ALG_CACHE[key]
    bias = torch.zeros(m, dtype=rows.dtype, device=rows.device) if with_bias else None
    top = max_alg_id(m, k, rows.shape[0], rows.dtype, rows.device)
    last = min(top - 1, _LAST_SAFE_ALG_ID) if top is not None else 0  # None outside bf16 and with the cache off
    best, best_ms = 0, float("inf")
    for alg in range(last + 1):

        def run(alg_id: int = alg) -> torch.Tensor:
            return torch._cslt_sparse_mm(packed, rows.t(), bias=bias, transpose_result=True, alg_id=alg_id)

        try:
            ms, _ = gpu_time(run, iters=iters, repeats=3, warmup=1)
        except RuntimeError:
            break
        if ms < best_ms:
            best, best_ms = alg, ms
    _ALG_CACHE[key] = best
    return best


# --------------------------------------------------------------------------------------------------------------
# The packed operands of one layer
# --------------------------------------------------------------------------------------------------------------

_EPOCH = [0]
_STEP_HOOK: list[Any] = []


def mark_weights_updated() -> None:
    """Tells every :class:`CusparseltWeight` that weights may have changed: each refreshes at its next forward.

    Called after every ``torch.optim`` optimizer step (a global step hook); call it yourself after changing
    weights in ways that bump neither an optimizer step nor the tensor's version (writes through ``.data``).
    """
    _EPOCH[0] += 1


def _ensure_step_hook() -> None:
    if not _STEP_HOOK:
        _STEP_HOOK.append(register_optimizer_step_post_hook(lambda *_: mark_weights_updated()))


@dataclasses.dataclass
class VerifyResult:
    """Gathered buffers against a fresh ``torch._cslt_compress`` of the same masked weight."""

    values_equal: bool
    """Kept values bit-equal (both operands)."""
    metadata_equal: bool
    """Metadata bit-equal (both operands)."""
    product_equal: bool
    """``_cslt_sparse_mm`` of gathered and fresh buffers bit-equal on a random dense operand (both operands)."""

    @property
    def ok(self) -> bool:
        # The product decides. Seen on an H100 (cuSPARSELt 0.8): the first refresh under a mask bit-equal to a fresh
        # compression in values and metadata, and after a weight update the two buffers differing in bits while
        # their products stayed bit-equal (an equivalent encoding), so bit-equality of the buffers is reported but
        # not required.
        return self.product_equal


class CusparseltWeight:
    """The packed cuSPARSELt operands ``W*M`` (forward) and ``(W*M)^T`` (input gradient) of one weight under one
    mask, refreshed in place from the weight (see the module docstring).

    Args:
        mask: bool ``[out, in]`` on the GPU, transposable 2:4 (2 kept per 4 along rows and along columns).
        dtype: Compute dtype (bf16, :data:`SUPPORTED_DTYPES`).
        name: Layer name for messages.
        verify: Check the first refresh against a fresh compression; fall back to re-compressing if it differs.

    Raises:
        ValueError: If the mask is not 2:4 along both dims, or the shape / device / dtype cannot take cuSPARSELt.
    """

    def __init__(self, mask: torch.Tensor, dtype: torch.dtype, name: str = "", verify: bool = True) -> None:
        reason = check_gemm_shape(*mask.shape) or cusparselt_unsupported_reason(mask.device, dtype)
        if reason is not None:
            raise ValueError(f"layer {name!r}: {reason}")
        m, k = mask.shape
        mask = mask.bool()
        rows_ok = bool((mask.reshape(m, k // 4, 4).sum(-1) == 2).all())
        cols_ok = bool((mask.t().reshape(k, m // 4, 4).sum(-1) == 2).all())
        if not (rows_ok and cols_ok):
            raise ValueError(f"layer {name!r}: the mask is not 2:4 along both dims (a transposable mask is needed)")
        self.name = name
        self.dtype = dtype
        self.mask = mask
        self.shape = (m, k)
        mask_t = mask.t().contiguous()
        self.mode = "gather"
        """``"gather"`` (in-place refresh through the learned index) or ``"compress"`` (fresh compression)."""
        self.fallback_reason = ""
        self.index: torch.Tensor | None = None
        self.index_t: torch.Tensor | None = None
        try:
            self.index = learn_packed_index(mask, dtype)
            # W^T's slots, learned as flat indices into W^T ([k, m]), re-expressed as flat indices into W ([m, k]):
            # each refresh then gathers both operands from W itself, with no transposed copy of the weight.
            p = learn_packed_index(mask_t, dtype).long()
            self.index_t = ((p % m) * k + p // m).to(self.index.dtype)
        except RuntimeError as err:
            self._fall_back(str(err))
        # Metadata comes from compressing the mask itself (kept entries 1): it depends on the pattern only.
        self.packed = _cslt_compress(mask.to(dtype))
        self.packed_t = _cslt_compress(mask_t.to(dtype))
        self._verify_pending = verify
        self.verify_result: VerifyResult | None = None
        self.key: tuple[int, int, torch.dtype, int] | None = None
        _ensure_step_hook()
        self.generation = 0
        """Number of refreshes so far (a backward checks that its forward's operands are still in place)."""
        self.alg_fwd: dict[int, int] = {}
        self.alg_bwd: dict[int, int] = {}
        # cuSPARSELt plans kept across calls (lit_accel.ops.cusparselt), when that cache is enabled.
        self.plans_fwd = SparsePlanCache(f"{name} forward")
        self.plans_bwd = SparsePlanCache(f"{name} input gradient")

    def _fall_back(self, why: str) -> None:
        self.mode, self.fallback_reason = "compress", why
        self.index = self.index_t = None
        warnings.warn(
            f"SparseLinear {self.name!r}: the in-place refresh of the cuSPARSELt operands is off ({why}); "
            "W and W^T are compressed afresh at every weight update instead (correct, slower).",
            stacklevel=3,
        )

    @torch.no_grad()
    def refresh(self, weight: torch.Tensor, force: bool = False) -> bool:
        """Writes ``weight``'s kept values into both packed operands unless they already hold this version.

        Returns:
            Whether a refresh happened.
        """
        key = (weight.data_ptr(), weight._version, weight.dtype, _EPOCH[0])
        if key == self.key and not force:
            return False
        w = weight.detach()
        if not w.is_contiguous():
            w = w.contiguous()
        if self.mode == "gather":
            assert self.index is not None and self.index_t is not None
            nv = self.index.numel()
            gather_values_(self.packed.view(-1)[:nv], w, self.index)
            gather_values_(self.packed_t.view(-1)[:nv], w, self.index_t)
            if self._verify_pending:
                self._verify_pending = False
                self.verify_result = self.verify(w)
                if not self.verify_result.ok:
                    self._fall_back(f"the gathered buffers differ from a fresh compression: {self.verify_result}")
        if self.mode == "compress":
            wm = (w * self.mask).to(self.dtype)
            self.packed = _cslt_compress(wm)
            self.packed_t = _cslt_compress(wm.t().contiguous())
        self.key = key
        self.generation += 1
        return True

    @torch.no_grad()
    def verify(self, weight: torch.Tensor) -> VerifyResult:
        """Compares the current packed operands with a fresh compression of ``weight * mask`` (values and metadata
        bit for bit, and the products on a random dense operand)."""
        wm = (weight.detach() * self.mask).to(self.dtype)
        nv = self.shape[0] * self.shape[1] // 2
        values = meta = prod = True
        g = torch.Generator(device=weight.device).manual_seed(0)
        for mine, dense in ((self.packed, wm), (self.packed_t, wm.t().contiguous())):
            fresh = _cslt_compress(dense)
            a, b = mine.reshape(-1).view(torch.int16), fresh.reshape(-1).view(torch.int16)
            values &= torch.equal(a[:nv], b[:nv])
            meta &= torch.equal(a[nv:], b[nv:])
            rows = torch.randn(16, dense.shape[1], generator=g, device=weight.device).to(self.dtype)
            p1 = torch._cslt_sparse_mm(mine, rows.t(), transpose_result=True)
            p2 = torch._cslt_sparse_mm(fresh, rows.t(), transpose_result=True)
            prod &= torch.equal(p1, p2)
        return VerifyResult(values, meta, prod)

    def _mm(
        self,
        packed: torch.Tensor,
        rows: torch.Tensor,
        bias: torch.Tensor | None,
        algs: dict[int, int],
        plans: SparsePlanCache,
        m: int,
    ) -> torch.Tensor:
        n = rows.shape[0]
        if n not in algs:
            algs[n] = select_alg(packed, rows, with_bias=bias is not None)
        if bias is None:  # the plan cache falls back to the same torch._cslt_sparse_mm call when it is off
            return plans.matmul(packed, rows, m, algs[n])
        return torch._cslt_sparse_mm(packed, rows.t(), bias=bias, transpose_result=True, alg_id=algs[n])

    def forward_mm(self, x2: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x2 (W*M)^T + bias`` for contiguous ``x2`` ``[n, in]``, ``n`` a multiple of 8: ``[n, out]``."""
        return self._mm(self.packed, x2, bias, self.alg_fwd, self.plans_fwd, self.shape[0])

    def input_grad_mm(self, g2: torch.Tensor) -> torch.Tensor:
        """``g2 (W*M)`` for contiguous ``g2`` ``[n, out]``, ``n`` a multiple of 8: ``[n, in]``."""
        return self._mm(self.packed_t, g2, None, self.alg_bwd, self.plans_bwd, self.shape[1])


# --------------------------------------------------------------------------------------------------------------
# The autograd function and the entry point
# --------------------------------------------------------------------------------------------------------------


def _pad_rows(t: torch.Tensor) -> torch.Tensor:
    pad = (-t.shape[0]) % TOKEN_MULTIPLE
    return F.pad(t, (0, 0, 0, pad)) if pad else t


class Sparse24LinearFunction(torch.autograd.Function):
    """``y = x (W*M)^T + b`` and ``dX = dY (W*M)`` through cuSPARSELt, ``dW = dY^T x`` dense (all in ``x``'s dtype;
    the weight gradient is returned in the weight's dtype)."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, op: CusparseltWeight
    ) -> torch.Tensor:
        op.refresh(weight)
        lead, n_out = x.shape[:-1], op.shape[0]
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        n = x2.shape[0]
        y = op.forward_mm(_pad_rows(x2), bias)
        if y.shape[0] != n:
            y = y[:n]
        ctx.save_for_backward(x2)
        ctx.op, ctx.generation = op, op.generation
        ctx.weight_dtype, ctx.has_bias = weight.dtype, bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y.reshape(*lead, n_out)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (x2,) = ctx.saved_tensors
        op: CusparseltWeight = ctx.op
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        if g2.dtype != x2.dtype:
            g2 = g2.to(x2.dtype)
        g2 = g2.contiguous()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            if op.generation != ctx.generation:
                raise RuntimeError(
                    f"SparseLinear {op.name!r}: the weight was modified in place between this forward and its "
                    "backward (the packed sparse operands were refreshed); run backward before the optimizer step."
                )
            n = g2.shape[0]
            gx = op.input_grad_mm(_pad_rows(g2))
            if gx.shape[0] != n:
                gx = gx[:n]
            gx = gx.reshape(*grad_out.shape[:-1], gx.shape[-1])
        if ctx.needs_input_grad[1]:
            gw = (g2.t() @ x2).to(ctx.weight_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0).to(ctx.bias_dtype)
        return gx, gw, gb, None


_WARNED_REASONS: set[str] = set()


def _warn_once(holder: dict[str, Any], name: str, reason: str) -> None:
    # Once per reason and process, not once per layer: on a CPU every sparse layer has the same reason, and a
    # line per layer buries the rest of the log. The layer's own record still says why (its "reason").
    holder.setdefault("warned", set()).add(reason)
    if reason not in _WARNED_REASONS:
        _WARNED_REASONS.add(reason)
        warnings.warn(
            f"SparseLinear {name!r} (and every other sparse layer where this holds): {reason}; these layers use the"
            " masked dense path.",
            stacklevel=4,
        )


def sparse24_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor,
    holder: dict[str, Any],
    name: str = "",
) -> torch.Tensor:
    """``x (W*M)^T + b`` through cuSPARSELt where it can run, else the masked dense reference (warned once).

    Args:
        x: Input ``[..., in]``; under autocast it is cast to the autocast dtype, as ``F.linear`` would.
        weight: The dense weight ``[out, in]`` (e.g. the fp32 master weight); read, never modified.
        bias: Optional bias ``[out]``.
        mask: bool ``[out, in]``, transposable 2:4.
        holder: Per-layer cache: the :class:`CusparseltWeight` for this mask and dtype, and the path decided per
            device and compute dtype (the capability checks run once per layer and signature, not every forward).
        name: Layer name for messages.
    """
    dev = x.device.type
    autocast = torch.is_autocast_enabled(dev) and x.is_floating_point()
    dtype = torch.get_autocast_dtype(dev) if autocast else x.dtype
    reasons: dict[tuple[Any, ...], str | None] = holder.setdefault("reasons", {})
    key = (x.device, dtype, tuple(weight.shape))
    if key not in reasons:
        reasons[key] = cusparselt_unsupported_reason(x.device, dtype) or check_gemm_shape(*weight.shape)
    reason = reasons[key]
    if reason is None and holder.get("failed") is not None:
        reason = holder["failed"]
    if reason is not None:
        _warn_once(holder, name, reason)
        return masked_linear(x, weight, bias, mask)
    op: CusparseltWeight | None = holder.get("op")
    if op is None or op.mask is not mask or op.dtype != dtype:
        try:
            op = CusparseltWeight(mask, dtype, name=name)
        except ValueError as err:
            holder["failed"] = str(err)
            _warn_once(holder, name, str(err))
            return masked_linear(x, weight, bias, mask)
        holder["op"] = op
    with torch.autocast(dev, enabled=False):
        xb = x.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        out: torch.Tensor = Sparse24LinearFunction.apply(xb, weight, b, op)
    return out


# --------------------------------------------------------------------------------------------------------------
# Dense against sparse, per shape
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LayerTiming:
    """Dense against cuSPARSELt for one linear shape at one token count (ms per training step, forward + input
    gradient; the weight gradient is dense in both and left out)."""

    out_features: int
    in_features: int
    tokens: int
    dense_fwd_ms: float
    dense_dx_ms: float
    sparse_fwd_ms: float
    sparse_dx_ms: float
    refresh_ms: float
    """Both gathers (W and W^T): once per optimizer step."""
    sparse_host_ms: float
    """Host time of one sparse matmul call (cuSPARSELt plan set-up), for comparison with the GPU times."""
    alg_fwd: int
    alg_dx: int
    dense_wall_ms: float = float("nan")
    """Wall time (CUDA events, nothing queued ahead, host overhead included) of the weight cast, forward and input
    gradient, back to back."""
    sparse_wall_ms: float = float("nan")
    """Wall time of refresh, forward and input gradient through cuSPARSELt, back to back."""

    @property
    def dense_ms(self) -> float:
        return self.dense_fwd_ms + self.dense_dx_ms

    @property
    def sparse_ms(self) -> float:
        return self.sparse_fwd_ms + self.sparse_dx_ms + self.refresh_ms

    @property
    def gpu_speedup(self) -> float:
        """Dense over sparse GPU time (queue kept full: host overhead hidden); > 1: the sparse kernels are faster."""
        return self.dense_ms / self.sparse_ms

    @property
    def wall_speedup(self) -> float:
        """Dense over sparse wall time, host overhead included."""
        return self.dense_wall_ms / self.sparse_wall_ms

    @property
    def speedup(self) -> float:
        """What the per-layer choice uses: the smaller of :attr:`gpu_speedup` and :attr:`wall_speedup` (NaN wall
        times count as no limit). A training step sees the wall figure unless other queued GPU work hides the
        cuSPARSELt host overhead, which a llama-1b step on an H100 did not (0.78x with every MLP linear sparse)."""
        wall = self.wall_speedup
        return min(self.gpu_speedup, wall) if wall == wall else self.gpu_speedup


def _wall_ms(fn: Callable[[], Any], iters: int = 10, repeats: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return sorted(times)[len(times) // 2]


def compare_layer(
    out_features: int, in_features: int, tokens: int, dtype: torch.dtype = torch.bfloat16, device: Any = "cuda"
) -> LayerTiming:
    """Times forward and input gradient, dense (cuBLAS) against cuSPARSELt with a random transposable mask, plus
    the per-step refresh of the packed operands, at ``tokens`` rows: GPU times with the launch queue kept full, and
    wall times of the three back to back with host overhead included (see :attr:`LayerTiming.speedup`)."""
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(0)
    w = torch.randn(out_features, in_features, device=dev, generator=g)
    mask = transposable_24_mask(w)
    wm = (w * mask).to(dtype)
    n = tokens + (-tokens) % TOKEN_MULTIPLE
    x = torch.randn(n, in_features, device=dev, generator=g).to(dtype)
    gy = torch.randn(n, out_features, device=dev, generator=g).to(dtype)
    op = CusparseltWeight(mask, dtype, name=f"{out_features}x{in_features}")
    op.refresh(w)
    dense_fwd, _ = gpu_time(lambda: F.linear(x, wm))
    dense_dx, _ = gpu_time(lambda: gy @ wm)
    sparse_fwd, host = gpu_time(lambda: op.forward_mm(x))
    sparse_dx, _ = gpu_time(lambda: op.input_grad_mm(gy))
    refresh, _ = gpu_time(lambda: op.refresh(w, force=True))

    def dense_step() -> None:
        wc = w.to(dtype)  # as autocast casts the fp32 master weight every step
        F.linear(x, wc)
        torch.mm(gy, wc)

    def sparse_step() -> None:
        op.refresh(w, force=True)
        op.forward_mm(x)
        op.input_grad_mm(gy)

    dense_wall = _wall_ms(dense_step)
    sparse_wall = _wall_ms(sparse_step)
    return LayerTiming(
        out_features, in_features, tokens, dense_fwd, dense_dx, sparse_fwd, sparse_dx, refresh, host,
        op.alg_fwd[n], op.alg_bwd[n], dense_wall, sparse_wall,
    )  # fmt: skip
