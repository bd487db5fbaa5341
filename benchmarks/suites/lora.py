"""LoRA: the training step against PEFT and the frozen-base floor, the fused LoRA linear against unfused torch LoRA
and the base matmul, and linears that share an input run per layer against as one group.

    python -m benchmarks run lora

Four results, every one by default:

- ``train_step``: ``llama-1b``, 8 x 2048 tokens, adapters of rank 16 (alpha 32) on every linear but the LM head;
  bf16 base weights, fp32 adapters, bf16 autocast, fused AdamW on the adapters. Arms: the floor (the same frozen
  model with no adapters, the backward still through every activation: what any adapter method must at least
  pay), PEFT (``get_peft_model`` with ``LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")``, its
  default fp32 adapters), lit_accel's default path (fused cuBLAS LoRA, shared-input groups for q/k/v and gate/up,
  ``recompute_inputs=True``), the same with ``recompute_inputs=False``, without the groups (one autograd node per
  linear), and lit_accel's PyTorch path (``use_kernel=False``: PEFT's computation). Every arm is built with
  ``CausalLM(kernels=True)``: lit_accel's RMSNorm, SwiGLU, RoPE and fused LM head + loss run in all of them, the
  floor and PEFT included, so the arms differ in their adapters only. All arms live in one process, on the same
  batches, timed window by window in a rotating order.
- ``linear_kernel``: one projection at each llama-1b shape (q/o, gate/up, down, k/v) over 16384 tokens, rank 16, bf16
  activations, base and adapters: the frozen base ``F.linear`` (forward GEMM + dX GEMM, the floor), the unfused
  torch LoRA (``lora_linear_reference``, PEFT's computation) and the fused path (``LoRALinearFunction``); forward
  and forward + backward.
- ``shared_input_groups``: the projections of each sublayer input (q/k/v and gate/up fed by the fused RMSNorm, o
  by a plain tensor, down by the fused SwiGLU), forward + backward: the frozen projections alone, one fused
  ``lora_linear`` per projection, and ``lora_linear_group`` (one rank projection, one dX for the group); fp32
  adapters, ``recompute_input=True``.
- ``gemm_beta``: the base GEMM writing a fresh output (beta = 0) against adding into one (beta = 1), what the fused
  path's "low-rank term first, base GEMM accumulating into it" costs the base GEMM.

Checks before any timing: in the step, with the same base and adapter weights in every arm, the loss and every
adapter gradient of each lit_accel arm equal PEFT's; the fused linear's output and gradients (x, A, B) equal the
unfused reference's; per-layer and group outputs and gradients (the producer's inputs, A, B) equal the reference
per projection; beta = 1 adds exactly the product. Errors are norm-wise relative; bounds: 3e-2 for one bf16 op, 5e-2
over all adapters of the bf16 step (0.2 per layer), 1e-4 in fp32 (1e-3 per layer).

Smoke (``--smoke``, a CPU, fp32): ``llama-tiny`` shrunk to one block of width 64 (interpreted Triton kernels take
over ten seconds a step at the preset's size), 1 x 16 tokens, rank 4; the kernel and group shapes follow that
config, 16 tokens. lit_accel's model kernels are off for every step arm (a CPU's ``CausalLM`` default); the
lit_accel arms run the fused LoRA path anyway (``use_kernel=True``, groups allowed on the CPU), the GPU's default,
with the Triton reductions interpreted; the group table's RMSNorm and SwiGLU run interpreted, so the recompute path
runs too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import lit_accel.lowrank.lora_groups as groups_module
from benchmarks.harness import Context, Measurement, free_memory, measure_interleaved
from lit_accel.lowrank import apply_lora, lora_layers
from lit_accel.models import CausalLM
from lit_accel.ops import lora_linear_reference, rms_norm, swiglu
from lit_accel.ops.lora import _fused, lora_linear, lora_linear_group
from lit_accel.ops.recompute import request_recompute

__all__ = ["run"]

# A tiny llama for a CPU run: one block, so the interpreted Triton reductions of the fused path stay in seconds.
SMOKE_OVERRIDES: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
    vocab_size=256,
)  # fmt: skip

FLOOR = "floor: frozen base, no adapters"
PEFT = "PEFT LoRA"
OURS = "lit_accel LoRA (default CUDA path: shared-input groups, recompute_inputs=True)"
OURS_KEEP = "lit_accel LoRA, recompute_inputs=False"
OURS_NO_GROUPS = "lit_accel LoRA, no shared-input groups (one node per linear)"
OURS_TORCH = "lit_accel LoRA, PyTorch path (use_kernel=False: PEFT's computation)"


@dataclass(frozen=True)
class Sizes:
    """What one run measures: the step's model and batch, the op tables' token count, warm-up and window sizes."""

    preset: str
    overrides: dict[str, Any] | None
    batch: int
    seq: int
    r: int
    tokens: int
    step_warmup: int
    step_iters: int
    op_warmup: int
    op_iters: int
    group_warmup: int
    group_iters: int


REAL = Sizes("llama-1b", None, 8, 2048, 16, 8 * 2048, 3, 10, 3, 20, 5, 20)
SMOKE = Sizes("llama-tiny", SMOKE_OVERRIDES, 1, 16, 4, 16, 1, 1, 1, 1, 1, 1)


_free = free_memory


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _tol(device: torch.device) -> float:
    # bf16 on a GPU: the fused path rounds the low-rank term once before the base product is added to it (PEFT adds
    # after), and reduces the adapter gradients in fp32 where PEFT rounds them to bf16 first; fp32 on a CPU.
    return 3e-2 if device.type == "cuda" else 1e-4


def _check(what: str, got: torch.Tensor | None, want: torch.Tensor | None, tol: float) -> None:
    if got is None or want is None:
        raise RuntimeError(f"LoRA check: {what}: missing ({'got' if got is None else 'reference'} is None)")
    if got.shape != want.shape:
        raise RuntimeError(f"LoRA check: {what}: shape {tuple(got.shape)} != reference {tuple(want.shape)}")
    err = _rel_err(got, want)
    if not err <= tol:
        raise RuntimeError(f"LoRA check: {what}: relative error {err:.3g} > {tol:g} against the reference")


@contextmanager
def _groups_on(device: torch.device) -> Iterator[None]:
    """Lets shared-input groups run on ``device`` (CUDA is their only default device)."""
    saved = groups_module._GROUP_DEVICES
    if device.type not in saved:
        groups_module._GROUP_DEVICES = (*saved, device.type)
    try:
        yield
    finally:
        groups_module._GROUP_DEVICES = saved


# ---------------------------------------------------------------------------------------------------- step


def base_model(
    sizes: Sizes, device: torch.device, kernels: bool, state: dict[str, torch.Tensor] | None = None
) -> nn.Module:
    """The frozen base: ``CausalLM``'s model on ``device`` (bf16 on a GPU), ``state``'s weights when given."""
    module = CausalLM(sizes.preset, kernels=kernels, config_overrides=sizes.overrides)
    with torch.device(device):
        module.configure_model()
    assert module.model is not None
    model = module.model
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    if state is not None:
        model.load_state_dict(state)
    model.requires_grad_(False)
    return model


def floor_model(
    sizes: Sizes, device: torch.device, kernels: bool, state: dict[str, torch.Tensor] | None = None
) -> nn.Module:
    """The frozen base with the backward through every layer's activations and no weight gradients."""
    model = base_model(sizes, device, kernels, state)
    model.enable_input_require_grads()
    return model


def peft_model(
    sizes: Sizes, device: torch.device, kernels: bool, state: dict[str, torch.Tensor] | None = None
) -> nn.Module:
    """PEFT's documented way: ``get_peft_model`` on the frozen base, its default (fp32) adapters on every linear."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=sizes.r, lora_alpha=2 * sizes.r, target_modules="all-linear")
    return get_peft_model(base_model(sizes, device, kernels, state), config)


def lora_model(
    sizes: Sizes,
    device: torch.device,
    kernels: bool,
    state: dict[str, torch.Tensor] | None = None,
    recompute_inputs: bool = True,
    use_kernel: bool | None = None,
    groups: bool = True,
) -> nn.Module:
    """The frozen base with lit_accel's adapters on every linear (alpha = 2 r); ``recompute_inputs`` as
    ``apply_lora``'s, ``use_kernel`` as ``LoRALinear.use_kernel``; ``groups=False``: one node per linear."""
    model = base_model(sizes, device, kernels, state)
    apply_lora(model, targets="all-linear", r=sizes.r, alpha=2 * sizes.r, recompute_inputs=recompute_inputs)
    for layer in lora_layers(model).values():
        layer.use_kernel = use_kernel
        if not groups:
            layer.shared_input_group = None
    return model


def adapters(model: nn.Module) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
    """Base linear's name (in the Hugging Face model) -> its adapter's ``(A [r, in], B [out, r])``, for lit_accel's
    layers and PEFT's alike."""
    found = {name: (layer.lora_A, layer.lora_B) for name, layer in lora_layers(model).items()}
    if found:
        return found
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            key = name[len(prefix) :] if name.startswith(prefix) else name
            found[key] = (module.lora_A["default"].weight, module.lora_B["default"].weight)
    return found


def batches(vocab: int, batch: int, seq: int, device: torch.device, n: int = 4) -> list[torch.Tensor]:
    """``n`` fixed random token batches, shared by every arm."""
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (batch, seq), generator=g).to(device) for _ in range(n)]


def make_step(
    model: nn.Module, xs: list[torch.Tensor], device: torch.device
) -> tuple[Callable[[], None], torch.optim.Optimizer | None]:
    """One training step over the next of ``xs`` (bf16 autocast on a GPU), AdamW on the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    gpu = device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=1e-4, fused=gpu) if params else None
    state = {"i": 0}

    def step() -> None:
        x = xs[state["i"] % len(xs)]
        state["i"] += 1
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
            loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step, opt


def _loss_and_adapter_grads(
    model: nn.Module, x: torch.Tensor, device: torch.device
) -> tuple[float, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    model.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = model(input_ids=x, labels=x, use_cache=False).loss
    loss.backward()
    grads = {}
    for name, (a, b) in adapters(model).items():
        if a.grad is None or b.grad is None:
            raise RuntimeError(f"LoRA check: {name}'s adapter got no gradient")
        grads[name] = (a.grad.detach().float().clone(), b.grad.detach().float().clone())
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


def check_against(reference: str, models: dict[str, nn.Module], x: torch.Tensor, device: torch.device) -> None:
    """Gives every LoRA arm the same adapter weights (B nonzero, so every gradient is), then raises unless each
    arm's loss and adapter gradients equal ``reference``'s (PEFT's)."""
    ref_adapters = adapters(models[reference])
    g = torch.Generator().manual_seed(1)
    values = {
        name: (torch.randn(a.shape, generator=g) / a.shape[1] ** 0.5, torch.randn(b.shape, generator=g) * 0.01)
        for name, (a, b) in sorted(ref_adapters.items())
    }
    for arm, model in models.items():
        mine = adapters(model)
        if set(mine) != set(values):
            raise RuntimeError(f"LoRA check: {arm} adapts {sorted(set(mine) ^ set(values))} unlike {reference}")
        with torch.no_grad():
            for name, (a, b) in mine.items():
                a.copy_(values[name][0])
                b.copy_(values[name][1])
    # A whole bf16 model: the rounding differences of every layer's forward reach the adapters' gradients through
    # the backward of every later one, so a looser bound than one op's; a wrong kernel is off by far more.
    tol = 5e-2 if device.type == "cuda" else _tol(device)
    ref_loss, ref_grads = _loss_and_adapter_grads(models[reference], x, device)
    for arm, model in models.items():
        if arm == reference:
            continue
        loss, grads = _loss_and_adapter_grads(model, x, device)
        if not abs(loss - ref_loss) <= tol * abs(ref_loss):
            raise RuntimeError(f"LoRA check: {arm}: loss {loss} != {reference}'s {ref_loss}")
        names = sorted(grads)
        # Over all layers at once: a wrong kernel is off everywhere, while bf16 noise on one layer's small gradient
        # must not fail the run.
        for i, kind in enumerate(("A", "B")):
            got = torch.cat([grads[n][i].flatten() for n in names])
            want = torch.cat([ref_grads[n][i].flatten() for n in names])
            _check(f"{arm}: the gradients of every {kind}", got, want, tol)
        # One layer at a time, where one layer's small gradient may carry more of that noise.
        for n in names:
            for i, kind in enumerate(("A", "B")):
                _check(f"{arm}: {n}'s {kind} gradient", grads[n][i], ref_grads[n][i], max(4 * tol, 1e-3))


def _resident_gib(model: nn.Module, opt: torch.optim.Optimizer | None) -> float:
    """What an arm holds between steps: its parameters, buffers and optimizer state (each storage once)."""
    storages: dict[int, int] = {}
    tensors: list[torch.Tensor] = [*model.parameters(), *model.buffers()]
    if opt is not None:
        tensors += [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values()) / 2**30


def train_step(ctx: Context, sizes: Sizes) -> None:
    device = ctx.device
    gpu = device.type == "cuda"
    kernels = gpu
    fused = None if gpu else True  # the CUDA default is the fused path; ask for it explicitly elsewhere
    r, alpha = sizes.r, 2 * sizes.r
    table = ctx.table(
        "train_step",
        f"LoRA training step: ours vs PEFT vs the frozen-base floor (r {r}, alpha {alpha}, all linears)",
        notes=(
            (
                "bf16 base weights, fp32 adapters (PEFT's default; ours too), bf16 autocast, fused AdamW (lr 1e-4) on"
                " the adapters. lit_accel's kernels (RMSNorm, SwiGLU, RoPE, fused LM head + loss) are ON in every"
                " arm, the floor and PEFT included (CausalLM(kernels=True)): the arms differ in their adapters only."
                " While an arm with recompute_inputs lives, the fused RMSNorm and SwiGLU kernels record a recompute"
                " recipe for each output in every arm (a host-side dict entry)."
                if gpu
                else "fp32, AdamW on the adapters; lit_accel's model kernels OFF in every arm (a CPU's CausalLM"
                " default); the lit_accel arms but the PyTorch one take the fused LoRA path (use_kernel=True)."
            )
            + " Floor: the same frozen model without adapters, the backward through every activation"
            " (enable_input_require_grads). PEFT: get_peft_model(model, LoraConfig(r, lora_alpha, target_modules="
            "'all-linear')). PyTorch path: LoRALinear.use_kernel=False (PEFT's computation, no groups). Checked before"
            " timing: with the same base and adapter weights, each lit_accel arm's loss and adapter gradients equal"
            " PEFT's (the PyTorch path's where peft is not installed). All arms in one process on the same batches,"
            " timed window by window in a rotating order:"
            f" {ctx.windows} windows of {sizes.step_iters} steps after {sizes.step_warmup} warm-up steps per arm."
            " time vs floor = median / the floor's median. peak GiB is each arm's own: its windows' peak allocated"
            " memory less what the other arms hold between steps (weights, optimizer state), i.e. its peak alone;"
            " memory vs floor = peak / the floor's peak."
        ),
    )
    try:
        import peft  # noqa: F401

        reference = PEFT
    except ImportError:
        reference = OURS_TORCH  # PEFT's computation, operation for operation
    floor = floor_model(sizes, device, kernels)
    state = floor.state_dict()
    models: dict[str, nn.Module] = {FLOOR: floor}
    if reference == PEFT:
        models[PEFT] = peft_model(sizes, device, kernels, state)
    models[OURS] = lora_model(sizes, device, kernels, state, use_kernel=fused)
    models[OURS_KEEP] = lora_model(sizes, device, kernels, state, recompute_inputs=False, use_kernel=fused)
    models[OURS_NO_GROUPS] = lora_model(sizes, device, kernels, state, use_kernel=fused, groups=False)
    models[OURS_TORCH] = lora_model(sizes, device, kernels, state, use_kernel=False)
    del state
    xs = batches(floor.config.vocab_size, sizes.batch, sizes.seq, device)
    check_against(reference, {k: v for k, v in models.items() if k != FLOOR}, xs[0], device)
    steps: dict[str, Callable[[], None]] = {}
    opts: dict[str, torch.optim.Optimizer | None] = {}
    for name, model in models.items():
        steps[name], opts[name] = make_step(model, xs, device)
    _free()
    results = measure_interleaved(steps, sizes.step_warmup, sizes.step_iters, ctx.windows, device)
    resident = {name: _resident_gib(model, opts[name]) for name, model in models.items()}
    total = sum(resident.values())
    peak = {name: m.peak_gib - (total - resident[name]) for name, m in results.items()}
    base = results[FLOOR]
    head = {"model": sizes.preset, "batch": f"{sizes.batch}x{sizes.seq}"}
    for name, m in results.items():
        if name == OURS and reference != PEFT:
            table.add({**head, "variant": PEFT, "note": "peft not installed"})
        table.add(
            {
                **head,
                "variant": name,
                "median ms": m.median_ms,
                "spread ms": m.spread_ms,
                "windows": len(m.times_ms),
                "time vs floor": m.median_ms / base.median_ms,
                "peak GiB": peak[name],
                "memory vs floor": peak[name] / peak[FLOOR],
                "trainable M": sum(p.numel() for p in models[name].parameters() if p.requires_grad) / 1e6,
            }
        )
    del models, steps, opts, floor
    _free()


# ---------------------------------------------------------------------------------------------------- one linear


def model_dims(sizes: Sizes) -> tuple[int, int, int]:
    """``(hidden, MLP, k/v width)`` of the step's model."""
    config = CausalLM(sizes.preset, config_overrides=sizes.overrides).config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.hidden_size, config.intermediate_size, config.num_key_value_heads * head_dim


def _linear_case(
    m: int, in_f: int, out_f: int, r: int, device: torch.device
) -> tuple[dict[str, tuple[Callable[[], torch.Tensor], list[torch.Tensor]]], torch.Tensor]:
    """Per variant: its forward and the tensors whose gradients its backward gives; and the output gradient."""
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, in_f, device=device, dtype=dt, generator=g).requires_grad_()
    w = torch.randn(out_f, in_f, device=device, dtype=dt, generator=g) / in_f**0.5
    a = (torch.randn(r, in_f, device=device, generator=g) / in_f**0.5).to(dt).requires_grad_()
    b = (torch.randn(out_f, r, device=device, generator=g) * 0.01).to(dt).requires_grad_()
    dy = torch.randn(m, out_f, device=device, dtype=dt, generator=g)
    s, p = 2.0, 0.0
    variants = {
        "base (frozen, dX only)": (lambda: F.linear(x, w), [x]),
        "torch LoRA (unfused)": (lambda: lora_linear_reference(x, w, None, a, b, s, p, True), [x, a, b]),
        "ours, fused (default)": (lambda: _fused(x, w, None, a, b, s, p, True, "out_in"), [x, a, b]),
    }
    return variants, dy


def linear_kernel(ctx: Context, sizes: Sizes) -> None:
    device = ctx.device
    hidden, mlp, kv = model_dims(sizes)
    m, r = sizes.tokens, sizes.r
    dtype = "bf16" if device.type == "cuda" else "fp32"
    table = ctx.table(
        "linear_kernel",
        f"LoRA linear: fused vs unfused torch vs the frozen base (M={m}, r={r}, dropout 0, {dtype} activations,"
        f" base and adapters)",
        notes="base = frozen F.linear with x requiring grad (forward GEMM + dX GEMM), the floor a LoRA layer adds to;"
        " torch LoRA = lora_linear_reference (PEFT's computation, unfused); ours = LoRALinearFunction, the fused"
        " path lora_linear takes on CUDA (cuBLAS GEMMs: the low-rank term written first, the base GEMM adding into"
        " it; u and dB from one read of dY where the output is wide). Checked before timing: ours' output and"
        " gradients (x, A, B) equal torch LoRA's. Per shape, every variant's forward and forward + backward timed"
        f" window by window in a rotating order: {ctx.windows} windows of {sizes.op_iters} calls after"
        f" {sizes.op_warmup} warm-up calls. fwd+bwd vs base = median / the base's fwd+bwd median; peak GiB of the"
        " fwd+bwd windows (the shared inputs included).",
    )
    shapes = [(f"q/o {hidden}->{hidden}", hidden, hidden), (f"gate/up {hidden}->{mlp}", hidden, mlp),
              (f"down {mlp}->{hidden}", mlp, hidden), (f"k/v {hidden}->{kv}", hidden, kv)]  # fmt: skip
    tol = _tol(device)
    for label, in_f, out_f in shapes:
        variants, dy = _linear_case(m, in_f, out_f, r, device)
        ref_fn, ref_params = variants["torch LoRA (unfused)"]
        fused_fn, fused_params = variants["ours, fused (default)"]
        want_y = ref_fn()
        want = torch.autograd.grad(want_y, ref_params, dy)
        got_y = fused_fn()
        got = torch.autograd.grad(got_y, fused_params, dy)
        _check(f"{label} output", got_y, want_y, tol)
        for what, gv, wv in zip(("dX", "dA", "dB"), got, want, strict=True):
            _check(f"{label} {what}", gv, wv, tol)
        del want_y, want, got_y, got
        steps: dict[str, Callable[[], object]] = {}
        for name, (fn, params) in variants.items():
            steps[f"{name}|fwd"] = fn
            steps[f"{name}|fwd+bwd"] = lambda fn=fn, params=params, dy=dy: torch.autograd.grad(fn(), params, dy)
        results = measure_interleaved(steps, sizes.op_warmup, sizes.op_iters, ctx.windows, device)
        base = results["base (frozen, dX only)|fwd+bwd"]
        for name in variants:
            fwd, both = results[f"{name}|fwd"], results[f"{name}|fwd+bwd"]
            table.add(
                {
                    "shape": label,
                    "variant": name,
                    "fwd median ms": fwd.median_ms,
                    "fwd spread ms": fwd.spread_ms,
                    "fwd windows": len(fwd.times_ms),
                    "fwd+bwd median ms": both.median_ms,
                    "fwd+bwd spread ms": both.spread_ms,
                    "fwd+bwd windows": len(both.times_ms),
                    "fwd+bwd vs base": both.median_ms / base.median_ms,
                    "peak GiB": both.peak_gib,
                }
            )
        del variants, steps, results, dy
        _free()


# ---------------------------------------------------------------------------------------------------- groups


class _Consumer:
    """Keeps the fused kernels recording recompute recipes while the groups are timed (as a LoRA layer would)."""


@dataclass
class GroupCase:
    """The projections of one sublayer input: how the input is made, and each variant's outputs from it."""

    make_x: Callable[[], torch.Tensor]
    leaves: list[torch.Tensor]
    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    outputs: dict[str, Callable[[torch.Tensor], list[torch.Tensor]]]

    def clear(self) -> None:
        for t in (*self.leaves, *self.params):
            t.grad = None

    def call(self, variant: str) -> list[torch.Tensor]:
        """Input, the variant's projections, their backward; returns the outputs (gradients left on the tensors)."""
        x = self.make_x()
        ys = self.outputs[variant](x)
        torch.autograd.backward(ys, self.grads)
        return ys

    def step(self, variant: str) -> Callable[[], None]:
        def run() -> None:
            self.call(variant)
            self.clear()

        return run


def group_case(m: int, producer: str, in_f: int, outs: list[int], r: int, device: torch.device) -> GroupCase:
    """``producer`` ("norm": the fused RMSNorm, "swiglu": the fused SwiGLU, "plain": a plain op) makes the
    ``[m, in_f]`` input of frozen projections to ``outs``, each with an fp32 adapter of rank ``r`` (scale 2)."""
    gpu = device.type == "cuda"
    dt = torch.bfloat16 if gpu else torch.float32
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int, dtype: torch.dtype = dt) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype, generator=g)

    if producer == "norm":
        h = randn(m, in_f).requires_grad_()
        wn = randn(in_f)
        leaves = [h]
        make_x: Callable[[], torch.Tensor] = lambda: rms_norm(h, wn, 1e-5)  # noqa: E731
    elif producer == "swiglu":
        gate, up = randn(m, in_f).requires_grad_(), randn(m, in_f).requires_grad_()
        leaves = [gate, up]
        make_x = lambda: swiglu(gate, up)  # noqa: E731
    else:
        x0 = randn(m, in_f).requires_grad_()
        leaves = [x0]
        make_x = lambda: x0 * 1  # noqa: E731
    ws = [randn(o, in_f) / in_f**0.5 for o in outs]
    a_s = [(randn(r, in_f, dtype=torch.float32) / in_f**0.5).requires_grad_() for _ in outs]
    b_s = [randn(o, r, dtype=torch.float32).requires_grad_() for o in outs]
    grads = [randn(m, o) for o in outs]

    def autocast() -> torch.autocast:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu)

    def floor(x: torch.Tensor) -> list[torch.Tensor]:
        return [F.linear(x, w) for w in ws]

    def per_layer(x: torch.Tensor) -> list[torch.Tensor]:
        with autocast():
            return [
                lora_linear(x, w, None, a, b, 2.0, use_kernel=True, recompute_input=True)
                for w, a, b in zip(ws, a_s, b_s, strict=True)
            ]

    def group(x: torch.Tensor) -> list[torch.Tensor]:
        with autocast():
            return lora_linear_group(x, ws, [None] * len(ws), a_s, b_s, [2.0] * len(ws), recompute_input=True)

    def reference(x: torch.Tensor) -> list[torch.Tensor]:
        with autocast():
            return [lora_linear_reference(x, w, None, a, b, 2.0) for w, a, b in zip(ws, a_s, b_s, strict=True)]

    outputs = {"floor": floor, "per layer": per_layer, "group": group, "reference": reference}
    return GroupCase(make_x, leaves, [*a_s, *b_s], grads, outputs)


def _gradients(case: GroupCase, variant: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    case.clear()
    ys = [y.detach().clone() for y in case.call(variant)]
    grads = []
    for t in (*case.leaves, *case.params):
        if t.grad is None:
            raise RuntimeError(f"LoRA check: {variant}: a tensor got no gradient")
        grads.append(t.grad.detach().clone())
    case.clear()
    return ys, grads


def shared_input_groups(ctx: Context, sizes: Sizes) -> None:
    device = ctx.device
    hidden, mlp, kv = model_dims(sizes)
    m, r = sizes.tokens, sizes.r
    dtype = "bf16" if device.type == "cuda" else "fp32"
    table = ctx.table(
        "shared_input_groups",
        f"LoRA on shared inputs: per layer vs group (M={m}, r={r}, {dtype}, fp32 adapters)",
        notes="Per sublayer input, forward + backward of its projections: floor = the frozen projections alone"
        " (F.linear, the input requiring grad, autograd summing the dX); per layer = one fused lora_linear per"
        " projection; group = lora_linear_group (one rank projection of the input, the low-rank term written first"
        " and the base GEMMs adding into it, one dX). The input comes from the fused RMSNorm (q/k/v, gate/up) or"
        " SwiGLU (down) kernel as in a model, so recompute_input=True rebuilds it (o reads a plain tensor)."
        " Checked before timing: per-layer and group outputs and gradients (the producer's inputs, A, B) equal"
        " lora_linear_reference's (PEFT's computation) per projection. The three variants of an input timed window"
        f" by window in a rotating order: {ctx.windows} windows of {sizes.group_iters} calls after"
        f" {sizes.group_warmup} warm-up calls, gradients set to None after each call. time vs floor = median / the"
        " floor's median, ms over floor = their difference. The small ops of one sublayer are bound by host-side"
        " launch time (q/k/v especially); the training step is what counts.",
    )
    groups = [("q/k/v", "norm", hidden, [hidden, kv, kv]), ("gate/up", "norm", hidden, [mlp, mlp]),
              ("o", "plain", hidden, [hidden]), ("down", "swiglu", mlp, [hidden])]  # fmt: skip
    consumer = _Consumer()
    request_recompute(consumer)
    tol = _tol(device)
    for label, producer, in_f, outs in groups:
        case = group_case(m, producer, in_f, outs, r, device)
        want_y, want_g = _gradients(case, "reference")
        for variant in ("per layer", "group"):
            got_y, got_g = _gradients(case, variant)
            for i, (gy, wy) in enumerate(zip(got_y, want_y, strict=True)):
                _check(f"{label} {variant}: output {i}", gy, wy, tol)
            for i, (gg, wg) in enumerate(zip(got_g, want_g, strict=True)):
                _check(f"{label} {variant}: gradient {i}", gg, wg, tol)
        names = ("floor", "per layer", "group")
        results = measure_interleaved(
            {name: case.step(name) for name in names}, sizes.group_warmup, sizes.group_iters, ctx.windows, device
        )
        base = results["floor"]
        for name in names:
            res = results[name]
            table.add(
                {
                    "input": label,
                    "variant": name,
                    "fwd+bwd median ms": res.median_ms,
                    "spread ms": res.spread_ms,
                    "windows": len(res.times_ms),
                    "time vs floor": res.median_ms / base.median_ms,
                    "ms over floor": res.median_ms - base.median_ms,
                }
            )
        del case, results
        _free()
    del consumer


def gemm_beta(ctx: Context, sizes: Sizes) -> None:
    device = ctx.device
    hidden, mlp, kv = model_dims(sizes)
    m = sizes.tokens
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    table = ctx.table(
        "gemm_beta",
        f"Base GEMM: writing a fresh output (beta=0) vs adding into one (beta=1) (M={m}, {str(dt)[6:]})",
        notes="beta=0: torch.mm(x, W^T); beta=1: y.addmm_(x, W^T), the base GEMM of the fused LoRA path adding into"
        " the low-rank term already written. Checked before timing: addmm_ adds exactly the product. Both timed"
        f" window by window in a rotating order: {ctx.windows} windows of {sizes.group_iters} calls after"
        f" {sizes.group_warmup} warm-up calls. beta=1 vs beta=0 = the ratio of medians.",
    )
    g = torch.Generator(device=device).manual_seed(0)
    for in_f, out_f in ((hidden, hidden), (hidden, mlp), (mlp, hidden), (hidden, kv)):
        x = torch.randn(m, in_f, device=device, dtype=dt, generator=g)
        w = torch.randn(out_f, in_f, device=device, dtype=dt, generator=g)
        y = torch.randn(m, out_f, device=device, dtype=dt, generator=g)
        want = y.float() + (x @ w.t()).float()
        _check(f"GEMM {in_f}->{out_f} beta=1", y.clone().addmm_(x, w.t()), want, _tol(device))
        results: dict[str, Measurement] = measure_interleaved(
            {"beta=0": lambda x=x, w=w: torch.mm(x, w.t()), "beta=1": lambda x=x, w=w, y=y: y.addmm_(x, w.t())},
            sizes.group_warmup,
            sizes.group_iters,
            ctx.windows,
            device,
        )
        b0, b1 = results["beta=0"], results["beta=1"]
        table.add(
            {
                "GEMM": f"{in_f}->{out_f}",
                "beta=0 median ms": b0.median_ms,
                "beta=0 spread ms": b0.spread_ms,
                "beta=0 windows": len(b0.times_ms),
                "beta=1 median ms": b1.median_ms,
                "beta=1 spread ms": b1.spread_ms,
                "beta=1 windows": len(b1.times_ms),
                "beta=1 vs beta=0": b1.median_ms / b0.median_ms,
                "ms over beta=0": b1.median_ms - b0.median_ms,
            }
        )
        del x, w, y, want, results
    _free()


def run(ctx: Context) -> None:
    sizes = SMOKE if ctx.smoke else REAL
    with _groups_on(ctx.device):
        if ctx.wants("train_step"):
            train_step(ctx, sizes)
        if ctx.wants("linear_kernel"):
            linear_kernel(ctx, sizes)
        if ctx.wants("shared_input_groups"):
            shared_input_groups(ctx, sizes)
        if ctx.wants("gemm_beta"):
            gemm_beta(ctx, sizes)
