"""Worker of the distributed test matrix: trains the rows of each run of one launch (``matrix_common.LAUNCHES``).

Run it as ``matrix_common.worker_commands`` says (``worker_env``: the repository and ``tests/`` importable)::

    python matrix_worker.py single OUT BASE
    python -m torch.distributed.run --standalone --nproc_per_node 2 matrix_worker.py ddp OUT BASE
    python -m torch.distributed.run --standalone --nproc_per_node 2 matrix_worker.py deepspeed OUT BASE
    python -m torch.distributed.run --standalone --nproc_per_node 4 matrix_worker.py ranks4 OUT BASE
    python -m torch.distributed.run --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d \
        --rdzv-endpoint 127.0.0.1:PORT --rdzv-id ID matrix_worker.py nodes2x2 OUT BASE    # twice, at once

``deepspeed`` runs every row under ``LitDeepSpeedStrategy`` ZeRO-1, then ZeRO-2, then ZeRO-3 (fp32, DeepSpeed's CPU
accelerator over gloo; ``worker_env`` sets ``DS_ACCELERATOR=cpu``), writing ``zero1.json`` .. ``zero3.json``;
``ranks4`` runs ``ddp-4``, ``zero1-4`` .. ``zero3-4`` and ``nodes2x2`` ``zero1-2x2`` .. ``zero3-2x2`` the same way,
each on its own rows. Under DeepSpeed the checkpoint is a DeepSpeed folder (``load_checkpoint`` reads its
model-states file for the facts), and weights are gathered (``full_parameters``) before they are digested, saved or
compared, so ZeRO-3's partitions count whole.

Under ``torch.distributed.run`` Lightning finds the torchrun environment and launches nothing itself; every Trainer
after the first reuses the process group. For each row, on every rank, three fits of a fresh module with fresh
callbacks on the fixed batch:

1. ``full``: ``MAX_STEPS`` optimizer steps, uninterrupted; rank 0 saves the final weights to
   ``OUT/<run>/<row>/final.pt``, and a row with ``Row.export`` has LoRA write its PEFT adapter and merged model to
   ``OUT/<run>/<row>/export/``;
2. ``crash``: the same with Lightning's ``ModelCheckpoint`` writing ``step=RESUME_AT.ckpt``, crashing
   (``tests/_helpers.py::CrashAtStep``) at the start of step ``RESUME_AT``, after that checkpoint;
3. ``resume``: ``fit(ckpt_path=step=RESUME_AT.ckpt)`` to ``MAX_STEPS``, so each technique restores through its own
   checkpoint path (LoRA's adapter-only state dict over the rebuilt base, the factorisation's saved ranks, the 2:4
   masks and phase, the pruning masks in the module state, DropBP's generator and allocation).

Every fit re-seeds the global generator right after ``configure_model`` (:class:`SeedAfterModel`), so the
techniques' random initialisations (LoRA's A) start from the same state under every strategy: ZeRO-3 builds the
model under ``zero.Init``, which draws other random numbers than a model built whole.

A row that must be refused records the error of the first fit instead (and runs no other). A result is::

    {"status": "ok" | "error", "seconds": float,
     "error": {"type", "message", "global_step", "traceback"} | None,
     "full": RUN, "crashed": RUN + {"error"}, "resumed": RUN,
     "facts": {name: value},            # what the techniques did in the full run; what the checkpoint holds
     "layout": {name: int},             # where the process sits (global, local and node rank ...)
     "resume": {"state_max_abs_diff": float, "differing": [state keys]}}

    RUN: {"steps", "batches", "losses", "lm_losses", "probes", "grads_none", "grad_digests", "grads_as_dropped",
          "global_step", "initial", "state"}

``losses`` are what ``training_step`` returned (StructuredPruning adds its Lagrangian penalty), ``lm_losses`` the
language-model loss CausalLM logs; both are this rank's (under DDP each rank holds its share of the global batch).
``batches`` are digests of the token ids of each step; ``probes`` the per-step technique decisions (DropBP's drop
mask; the 2:4 phase and a digest of the masks); ``grads_none`` how many optimized parameters had no gradient at each
optimizer step. Without DeepSpeed (whose optimizer reduces the gradients into its own buffers), ``grad_digests`` is
a digest per step of every trainable parameter's gradient as the optimizer is about to use it (after DDP's
all-reduce), and ``grads_as_dropped`` per step (with DropBP) whether the parameters without gradient are exactly the
trainable ones of the sublayers DropBP dropped; both are None under DeepSpeed. ``initial`` and ``state`` map every
entry of the module's ``state_dict`` at the start of training (``initial``) and at the end, and of the technique
callbacks' ``state_dict`` (``state`` only), to a digest of its value. Rank 0 gathers every rank's results
(``all_gather_object``) and writes ``OUT/<run>.json`` (``matrix_common`` describes it). A result that trained also
holds ``layout``: the global, local and node rank, ``num_nodes``, ``devices`` and world size its Trainer saw.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from _helpers import CrashAtStep
from lightning.pytorch.callbacks import ModelCheckpoint
from matrix_common import (
    EPOCH_BATCHES,
    GLOBAL_BATCH,
    LAUNCHES,
    LEARNING_RATE,
    MAX_STEPS,
    RESUME_AT,
    RUNS,
    SEQ_LEN,
    VOCAB,
    Row,
    Run,
    final_weights_path,
    rows_of,
)
from torch.utils.data import DataLoader

from lit_accel.callbacks import (
    DropBP,
    FusedKernels,
    LoRA,
    LowRankFactorization,
    SemiStructuredSparsity,
    StructuredPruning,
    Throughput,
)
from lit_accel.lowrank.lora import lora_layers
from lit_accel.models import CausalLM
from lit_accel.models.params import full_parameters, is_partitioned
from lit_accel.models.surgery import run_after_configure_model
from lit_accel.strategies import LitDeepSpeedStrategy, resolve_strategy

VOLATILE = {"sensitivity_seconds", "export_dir", "export"}
"""Callback state left out of the state digests: what measures wall time, and where the uninterrupted run exports
(only that run has LoRA export)."""
SEED_AFTER_MODEL = 1
"""The global seed every fit sets right after ``configure_model`` (:class:`SeedAfterModel`)."""


# ------------------------------------------------------------------------------------------------------------------
# Digests
# ------------------------------------------------------------------------------------------------------------------


def digest(value: Any) -> str:
    """A short digest of a (nested) value, independent of dict key order: tensors by dtype, shape and bytes."""
    h = hashlib.sha256()

    def feed(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(v, dict):
            h.update(b"{")
            for k in sorted(v, key=str):
                if str(k) in VOLATILE:
                    continue
                h.update(repr(k).encode())
                feed(v[k])
            h.update(b"}")
        elif isinstance(v, (list, tuple)):
            h.update(b"[")
            for x in v:
                feed(x)
            h.update(b"]")
        else:
            h.update(repr(v).encode())

    feed(value)
    return h.hexdigest()[:16]


def full_state(module: L.LightningModule) -> dict[str, torch.Tensor]:
    """A copy of the module's ``state_dict`` with every parameter whole (ZeRO-3's partitions gathered: collective)."""
    with full_parameters(module):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}


def state_digests(module: L.LightningModule, techniques: list[L.Callback]) -> dict[str, str]:
    """Digest of every module ``state_dict`` entry (whole parameters) and every technique callback ``state_dict``
    entry."""
    out = {f"module/{k}": digest(v) for k, v in full_state(module).items()}
    for cb in techniques:
        for k, v in cb.state_dict().items():
            if k not in VOLATILE:
                out[f"callback/{type(cb).__name__}/{k}"] = digest(v)
    return out


def probe(techniques: list[L.Callback]) -> dict[str, Any]:
    """The per-step decisions of the techniques that make them."""
    out: dict[str, Any] = {}
    for cb in techniques:
        if isinstance(cb, DropBP):
            out["dropbp_mask"] = list(cb.mask) if cb.mask is not None else None
        elif isinstance(cb, SemiStructuredSparsity):
            out["sparse24"] = [cb.phase, digest(cb.masks)]
    return out


# ------------------------------------------------------------------------------------------------------------------
# One fit
# ------------------------------------------------------------------------------------------------------------------


class Recorder(L.Callback):
    """Records per step the losses, the techniques' decisions and how many optimized parameters had no gradient."""

    def __init__(self, techniques: list[L.Callback]) -> None:
        self.techniques = techniques
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.lm_losses: list[float] = []
        self.batches: list[str] = []
        self.probes: list[dict[str, Any]] = []
        self.grads_none: list[int] = []
        self.grad_digests: list[str] | None = []
        self.grads_as_dropped: list[bool] = []
        self.initial: dict[str, torch.Tensor] = {}
        self.head_forwards = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.initial = full_state(pl_module)
        if any(isinstance(cb, FusedKernels) for cb in self.techniques):
            # The fused head + loss computes the loss from the hidden states: lm_head's own forward must not run.
            def count(module: torch.nn.Module, args: Any, output: Any) -> None:
                self.head_forwards += int(module.training)

            pl_module.model.get_output_embeddings().register_forward_hook(count)  # type: ignore[union-attr]

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        # Runs after the technique callbacks (given to the Trainer first): their decisions for this step are made.
        self.steps.append(trainer.global_step)
        self.batches.append(digest(batch["input_ids"]))
        self.probes.append(probe(self.techniques))

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self.grads_none.append(sum(p.grad is None for g in optimizer.param_groups for p in g["params"]))
        if isinstance(trainer.strategy, LitDeepSpeedStrategy):
            self.grad_digests = None  # the gradients live in DeepSpeed's buffers
            return
        assert self.grad_digests is not None
        trainable = {n: p for n, p in pl_module.named_parameters() if p.requires_grad}
        self.grad_digests.append(digest({n: p.grad for n, p in trainable.items()}))
        dropbp = next((cb for cb in self.techniques if isinstance(cb, DropBP)), None)
        if dropbp is not None and dropbp.controller is not None and dropbp.mask is not None:
            dropped = {
                id(p)
                for sub, drop in zip(dropbp.controller.sublayers, dropbp.mask)
                if drop
                for m in sub.path_modules
                for p in m.parameters()
            }
            without = {id(p) for p in trainable.values() if p.grad is None}
            self.grads_as_dropped.append(without == {id(p) for p in trainable.values()} & dropped)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        self.losses.append(float(outputs["loss"]))
        self.lm_losses.append(float(trainer.callback_metrics["train/loss"]))


class SeedAfterModel(L.Callback):
    """Sets the global seed right after ``configure_model``, before the technique callbacks change the model (it
    comes first among the callbacks, so its step runs first): their random initialisations then start from the same
    state under every strategy, whatever building the model drew (``zero.Init`` under ZeRO-3 draws otherwise)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        run_after_configure_model(pl_module, lambda _model: torch.manual_seed(SEED_AFTER_MODEL), "matrix-seed")


def fixed_batch_loader(world_size: int, rank: int) -> DataLoader[Any]:
    """This rank's share of the fixed batch, the same in every step.

    The ``GLOBAL_BATCH`` sequences are split over the ranks (rank ``r`` takes sequences ``r, r + W, ...``), so the
    ranks' shares together are the single-device batch, and repeated ``EPOCH_BATCHES`` times so that an epoch is
    longer than the run. Lightning's own ``DistributedSampler`` is turned off (``use_distributed_sampler=False``):
    for training it always shuffles, so each step would draw another batch, and it cannot resume in the middle of
    an epoch (a resumed run would start the epoch's order again), which would break every comparison made here.
    """
    seqs = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    share = seqs[rank::world_size]
    items = [{"input_ids": x} for _ in range(EPOCH_BATCHES) for x in share]
    return DataLoader(items, batch_size=len(share))  # type: ignore[arg-type]


def make_strategy(strategy: str) -> Any:
    """The Trainer's strategy for ``single``, ``ddp`` or ``zero1``/``zero2``/``zero3`` (DeepSpeed in fp32: bf16 would
    round the weights, and the rows compare runs bit for bit)."""
    if strategy == "ddp":
        # lit_accel's DDP (gradients as views of the all-reduce buckets): every technique must work with it.
        return resolve_strategy("lit_ddp", timeout=timedelta(seconds=120))
    if strategy.startswith("zero"):
        return LitDeepSpeedStrategy(stage=int(strategy[4:]), bf16=False)
    return "auto"


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A Lightning checkpoint file, or a DeepSpeed checkpoint folder as a dict of the same shape: the client state
    Lightning saved (``lit_accel``, callbacks, loops) and, as ``state_dict``, the module state DeepSpeed wrote
    (``module.``-prefixed keys as in Lightning's; ZeRO-3 parameters as empty placeholders)."""
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=False)
    # mp_rank_00_model_states.pt (ZeRO-1/2), zero_pp_rank_<r>_mp_rank_00_model_states.pt (ZeRO-3): rank 0's.
    first = sorted((path / "checkpoint").glob("*mp_rank_00_model_states.pt"))[0]
    ckpt = torch.load(first, map_location="cpu", weights_only=False)
    return {**ckpt, "state_dict": dict(ckpt.get("module") or {})}


class Fit:
    """One fit of a row (``kind``: ``full``, ``crash`` or ``resume``): its trainer, module, callbacks and records.

    ``full`` trains ``MAX_STEPS`` steps; ``crash`` trains with Lightning's ``ModelCheckpoint`` writing
    ``ckpt/step=RESUME_AT.ckpt`` and crashes (``CrashAtStep``) at the start of step ``RESUME_AT``, after that
    checkpoint; ``resume`` is a fresh module and fresh callbacks fitting from it to ``MAX_STEPS``. ``checkpoint``
    has the ``full`` fit write that checkpoint itself (for a row that ``run`` does not resume: the facts read it).
    """

    def __init__(self, row: Row, run: Run, base_dir: Path, row_dir: Path, kind: str, checkpoint: bool = False) -> None:
        L.seed_everything(0, verbose=False)
        self.techniques: list[L.Callback] = row.make()
        if row.export and kind == "full":
            self.techniques = [with_export(cb, row_dir / "export") for cb in self.techniques]
        self.recorder = Recorder(self.techniques)
        self.module = CausalLM(
            str(base_dir), learning_rate=LEARNING_RATE, warmup_steps=0, weight_decay=0.0, min_lr_ratio=1.0
        )
        self.ckpt_path = row_dir / "ckpt" / f"step={RESUME_AT}.ckpt"
        crash: list[L.Callback] = []
        checkpoints: list[L.Callback] = []
        checkpoint = checkpoint or kind == "crash"
        if checkpoint:
            checkpoints = [
                ModelCheckpoint(self.ckpt_path.parent, every_n_train_steps=RESUME_AT, save_top_k=-1, filename="{step}")
            ]
        if kind == "crash":
            crash = [CrashAtStep(RESUME_AT)]  # first, so that no callback acts on the step that never runs
        self.trainer = L.Trainer(
            accelerator="cpu",
            devices=run.devices,
            num_nodes=run.nodes,
            strategy=make_strategy(run.strategy),
            max_steps=MAX_STEPS,
            callbacks=[*crash, SeedAfterModel(), *self.techniques, self.recorder, *checkpoints],
            logger=False,
            enable_checkpointing=checkpoint,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            log_every_n_steps=1,
            default_root_dir=row_dir,
            use_distributed_sampler=False,  # see fixed_batch_loader
        )
        self.error: dict[str, Any] | None = None
        try:
            self.trainer.fit(
                self.module,
                fixed_batch_loader(run.world_size, int(os.environ.get("RANK", "0"))),
                ckpt_path=str(self.ckpt_path) if kind == "resume" else None,
            )
        except Exception as err:
            self.error = {
                "type": type(err).__name__,
                "message": str(err),
                "global_step": self.trainer.global_step,
                "traceback": traceback.format_exc()[-4000:],
            }

    def record(self) -> dict[str, Any]:
        r = self.recorder
        return {
            "steps": r.steps,
            "batches": r.batches,
            "losses": r.losses,
            "lm_losses": r.lm_losses,
            "probes": r.probes,
            "grads_none": r.grads_none,
            "grad_digests": r.grad_digests,
            "grads_as_dropped": r.grads_as_dropped if r.grad_digests is not None else None,
            "global_step": self.trainer.global_step,
            "initial": {f"module/{k}": digest(v) for k, v in r.initial.items()},
            "state": state_digests(self.module, self.techniques),
        }


# ------------------------------------------------------------------------------------------------------------------
# Facts: proof that each technique acted
# ------------------------------------------------------------------------------------------------------------------


def facts(fit: Fit, ckpt: dict[str, Any]) -> dict[str, Any]:
    """What the techniques did in the uninterrupted run, and what their checkpoint at ``RESUME_AT`` holds."""
    module, rec = fit.module, fit.recorder
    assert module.model is not None
    model = module.model
    state = full_state(module)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    out: dict[str, Any] = {
        "trained": any(not torch.equal(state[n], rec.initial[n]) for n in trainable if n in rec.initial),
    }
    lit = ckpt.get("lit_accel", {})
    for cb in fit.techniques:
        if isinstance(cb, DropBP):
            out["dropbp.measured"] = cb.measured
            out["dropbp.dropped_some_sublayers"] = any(any(p.get("dropbp_mask") or []) for p in rec.probes)
            out["dropbp.grads_skipped"] = max(rec.grads_none, default=0) > 0
        elif isinstance(cb, SemiStructuredSparsity):
            out["sparse24.layers"] = len(cb.layers)
            out["sparse24.phase"] = cb.phase
            out["sparse24.refreshes"] = cb.refreshes
        elif isinstance(cb, StructuredPruning):
            masks = [k for k in state if k.startswith("pruning.masks.")]
            out["pruning.masks_in_state_dict"] = bool(masks)
            out["pruning.masks_moved"] = any(not torch.equal(state[k], rec.initial[k]) for k in masks)
            out["pruning.checkpoint_record"] = "pruning" in lit and any(
                k.startswith("pruning.masks.") for k in ckpt["state_dict"]
            )
        elif isinstance(cb, LoRA):
            factors = {
                id(p) for m in model.modules() if getattr(m, "is_factorized_linear", False) for p in m.parameters()
            }
            out["lora.layers"] = len(lora_layers(model))
            out["lora.other_trainable"] = sum(
                1
                for n, p in module.named_parameters()
                if p.requires_grad and not n.endswith((".lora_A", ".lora_B")) and id(p) not in factors
            )
            # Adapter-only checkpoints: the frozen base is left out (rebuilt from the pretrained directory).
            out["lora.checkpoint_adapter_only"] = bool(lit.get("lora", {}).get("adapter_only")) and set(
                ckpt["state_dict"]
            ) == set(trainable)
        elif isinstance(cb, LowRankFactorization):
            out["factorize.layers"] = len(cb.ranks)
            # The factors are new weights: they train, also when LoRA (which freezes the base) is in the run.
            out["factorize.factors_trainable"] = all(
                p.requires_grad
                for m in model.modules()
                if getattr(m, "is_factorized_linear", False)
                for p in m.parameters()
            )
            out["factorize.checkpoint_ranks"] = lit.get("factorization", {}).get("ranks") == cb.ranks
        elif isinstance(cb, Throughput):
            out["throughput.tokens_per_sec_logged"] = cb.last_metrics.get("throughput/tokens_per_sec", 0.0) > 0
        elif isinstance(cb, FusedKernels):
            out["kernels.patched"] = cb.report.counts() if cb.report is not None else {}
            out["kernels.skipped"] = dict(cb.report.skipped) if cb.report is not None else {}
            head = model.get_output_embeddings().weight
            # ZeRO-3 keeps a slice of ds_numel elements on each rank (padded to a multiple of the world size).
            out["kernels.lm_head_numel"] = [head.ds_tensor.numel(), head.ds_numel] if is_partitioned(head) else None
            out["kernels.lm_head_forwards"] = rec.head_forwards
    return out


def with_export(cb: L.Callback, directory: Path) -> L.Callback:
    """``cb``, or for LoRA the same callback writing its PEFT adapter and merged model to ``directory`` at the end."""
    if not isinstance(cb, LoRA):
        return cb
    s = cb.settings
    kwargs = {f.name: getattr(s, f.name) for f in dataclasses.fields(s)}
    return LoRA(**{**kwargs, "export_dir": str(directory), "export": "both"})


# ------------------------------------------------------------------------------------------------------------------
# Rows
# ------------------------------------------------------------------------------------------------------------------


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    worst = 0.0
    for k, va in a.items():
        vb = b.get(k)
        if vb is None or va.shape != vb.shape:
            return float("inf")
        if va.is_floating_point():
            worst = max(worst, float((va.double() - vb.double()).abs().max()) if va.numel() else 0.0)
        elif not torch.equal(va, vb):
            return float("inf")
    return worst if a.keys() == b.keys() else float("inf")


def run_row(row: Row, run: Run, out_dir: Path, base_dir: Path) -> dict[str, Any]:
    """The uninterrupted run, then the crashed one, then the resumed one (see the module docstring); for a row that
    ``run`` does not resume, the uninterrupted run only, writing the checkpoint the facts read."""
    start = time.perf_counter()
    row_dir = out_dir / run.name / row.id
    result: dict[str, Any] = {"status": "ok", "error": None, "facts": {}, "resume": None}
    result.update(full=None, crashed=None, resumed=None)
    resumes = run.resumes(row.id)
    full = Fit(row, run, base_dir, row_dir, "full", checkpoint=not resumes)
    if full.error is not None:
        result.update(status="error", error=full.error)
        result["seconds"] = time.perf_counter() - start
        return result
    result["full"] = full.record()
    result["layout"] = layout(full.trainer)
    full_weights = full_state(full.module)
    if full.trainer.is_global_zero:
        path = final_weights_path(out_dir, run.name, row.id)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(full_weights, path)
    if not resumes:
        if full.ckpt_path.exists():
            result["facts"] = facts(full, load_checkpoint(full.ckpt_path))
        else:
            result.update(status="error", error={"type": "", "message": f"no {full.ckpt_path}", "global_step": -1})
        result["seconds"] = time.perf_counter() - start
        return result
    crashed = Fit(row, run, base_dir, row_dir, "crash")
    result["crashed"] = {**crashed.record(), "error": crashed.error}
    if crashed.ckpt_path.exists():  # a file, or a DeepSpeed checkpoint folder
        ckpt = load_checkpoint(crashed.ckpt_path)
        result["facts"] = facts(full, ckpt)
        del full, crashed
        resumed = Fit(row, run, base_dir, row_dir, "resume")
        if resumed.error is not None:
            result.update(status="error", error=resumed.error)
        else:
            result["resumed"] = resumed.record()
            a, b = result["full"]["state"], result["resumed"]["state"]
            result["resume"] = {
                "state_max_abs_diff": max_abs_diff(full_weights, full_state(resumed.module)),
                "differing": sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k)),
            }
    else:
        missing = {"type": "", "message": f"the crashed run wrote no {crashed.ckpt_path}", "global_step": -1}
        result.update(status="error", error=crashed.error or missing)
    result["seconds"] = time.perf_counter() - start
    return result


def main(launch: str, out_dir: Path, base_dir: Path) -> None:
    """Trains the runs of ``launch`` (``matrix_common.LAUNCHES``) one after the other."""
    wanted = os.environ.get("MATRIX_RUNS")  # for debugging: a comma-separated subset of the launch's runs
    for run in LAUNCHES[launch]:
        if wanted is None or run in wanted.split(","):
            run_strategy(RUNS[run], out_dir, base_dir)


def layout(trainer: L.Trainer) -> dict[str, int]:
    """Where this process sits, as the Trainer sees it."""
    return {
        "global_rank": trainer.global_rank,
        "local_rank": trainer.local_rank,
        "node_rank": trainer.node_rank,
        "num_nodes": trainer.num_nodes,
        "devices": trainer.num_devices,
        "world_size": trainer.world_size,
    }


def run_strategy(run: Run, out_dir: Path, base_dir: Path) -> None:
    start = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    wanted = os.environ.get("MATRIX_ROWS")  # for debugging: a comma-separated subset of the row ids
    for row in [r for r in rows_of(run.name) if wanted is None or r.id in wanted.split(",")]:
        results[row.id] = run_row(row, run, out_dir, base_dir)
        if int(os.environ.get("RANK", "0")) == 0:
            r = results[row.id]
            print(f"matrix {run.name} {row.id}: {r['status']} in {r['seconds']:.1f} s", flush=True)
    gathered: list[Any] = [results]
    if dist.is_available() and dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, results)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    import lightning
    import transformers

    payload = {
        "strategy": run.name,
        "world_size": len(gathered),
        "seconds": time.perf_counter() - start,
        "versions": {
            "torch": torch.__version__,
            "lightning": lightning.__version__,
            "transformers": transformers.__version__,
        },
        "rows": {row_id: [g[row_id] for g in gathered] for row_id in results},
    }
    tmp = out_dir / f".{run.name}.json.tmp"
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.rename(out_dir / f"{run.name}.json")


if __name__ == "__main__":
    torch.set_num_threads(1)
    os.environ.setdefault("WANDB_MODE", "disabled")
    if len(sys.argv) != 4 or sys.argv[1] not in LAUNCHES:
        sys.exit(f"usage: matrix_worker.py {'|'.join(LAUNCHES)} OUT_DIR BASE_DIR")
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
