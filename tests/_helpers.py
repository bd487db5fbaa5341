"""Shared by the tests (pytest puts tests/ on sys.path): test-only callbacks importable by class path from CLI
configs, tiny models, a quiet Trainer, a logger that keeps what it is given, and the launcher of multi-process
(torchrun) workers."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
from lightning.pytorch.loggers import Logger

if TYPE_CHECKING:
    from transformers import GPT2LMHeadModel, LlamaForCausalLM


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call as ``(step, metrics)`` and the hyperparameters; ``experiment`` records W&B's
    ``define_metric`` calls, so a callback that declares its x-axis can be checked without wandb."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int | None, dict[str, Any]]] = []
        self.hparams: dict[str, Any] = {}
        self.defined: list[tuple[str, str | None]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> str:
        return "0"

    @property
    def experiment(self) -> Any:
        return self

    def define_metric(self, name: str, step_metric: str | None = None) -> None:
        self.defined.append((name, step_metric))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        self.hparams.update(dict(params))

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.rows.append((step, dict(metrics)))

    @property
    def logged(self) -> list[dict[str, Any]]:
        """Every call's metrics, in order."""
        return [m for _, m in self.rows]

    @property
    def latest(self) -> dict[str, Any]:
        """Each key's last value."""
        return {k: v for m in self.logged for k, v in m.items()}

    def keys(self) -> set[str]:
        return {k for m in self.logged for k in m}

    def series(self, key: str) -> dict[int, Any]:
        """``{step: value}`` of ``key`` over the calls that named a step."""
        return {s: m[key] for s, m in self.rows if key in m and s is not None}


class CrashAtStep(L.Callback):
    """Raises at the start of optimizer step ``step``, as a crash would (after the checkpoints before it)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: object, idx: int) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash at step {self.step}")


def tiny_llama(
    layers: int = 2,
    *,
    intermediate_size: int = 128,
    vocab_size: int = 128,
    max_position_embeddings: int = 64,
    tie_word_embeddings: bool = False,
) -> LlamaForCausalLM:
    """A random LLaMA: hidden 64, 4 query heads over 2 KV heads (head_dim 16), by default intermediate 128, vocab
    128, 64 positions, untied; fresh, so in training mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
    )
    return LlamaForCausalLM(cfg)


def tiny_gpt2(layers: int = 2, vocab_size: int = 128) -> GPT2LMHeadModel:
    """A random GPT-2 (Conv1D linears, fused c_attn): width 64, 4 heads, 64 positions, dropout off (tests compare
    separate forward passes); fresh, so in training mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_embd=64,
        n_layer=layers,
        n_head=4,
        vocab_size=vocab_size,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg)


def quiet_trainer(**overrides: Any) -> L.Trainer:
    """A Trainer on one CPU device without logger, progress bar, checkpoints, model summary or validation, logging
    every step; ``overrides`` replace or add any argument (``accelerator="gpu"``, ``strategy=...``)."""
    return L.Trainer(**quiet_trainer_kwargs(**overrides))


def quiet_trainer_kwargs(**overrides: Any) -> dict[str, Any]:
    """The arguments :func:`quiet_trainer` passes to ``L.Trainer``, for tests that build the Trainer themselves."""
    kw: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    kw.update(overrides)
    return kw


def finish_distributed() -> None:
    """Ends a torchrun worker: every rank's collectives finish before the interpreter tears gloo down (a rank once
    aborted at exit, "terminate called without an active exception", on the 2-core CI machine after a complete fit)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


REPO = Path(__file__).resolve().parents[1]
DDP_PROCESSES = 2
"""Processes of a multi-process test: 2 CPU processes over gloo, the most the 2-core CI machine runs well."""


def torchrun_command(script: Path, *args: object, nproc: int = DDP_PROCESSES) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node NPROC SCRIPT ARGS...``."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return [*launcher, str(script), *map(str, args)]


def worker_env(**extra: str | None) -> dict[str, str]:
    """The environment of a worker: the repository and ``tests/`` (for ``_helpers``) importable, one thread per
    process, no W&B, no torch.compile, DeepSpeed's CPU accelerator (also on a machine with a GPU); ``extra`` adds or
    replaces variables, and removes those given as None."""
    path = os.pathsep.join(p for p in (str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    env["DS_ACCELERATOR"] = "cpu"
    # DeepSpeed calls torch.compile at import, which loads inductor (~6 s of CPU per process); no worker compiles.
    env["TORCHDYNAMO_DISABLE"] = "1"
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run_torchrun(
    script: Path, *args: object, out: Path, nproc: int = DDP_PROCESSES, timeout: float = 300, **env: str | None
) -> list[dict[str, Any]]:
    """Runs ``script ARGS...`` on ``nproc`` local processes, fails the test with the output's tail if any rank
    fails, and returns each rank's record (``out/rank<r>.json``, which every worker writes)."""
    proc = subprocess.run(
        torchrun_command(script, *args, nproc=nproc),
        env=worker_env(**env),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


FAMILIES: dict[str, str] = {
    "llama": "llama-tiny",
    "qwen3": "qwen3-tiny",
    "gemma2": "gemma2-tiny",
    "gemma3": "gemma3-tiny",
    "phi3": "phi3-tiny",
    "olmo2": "olmo2-tiny",
    "mixtral": "mixtral-tiny",
    "qwen3_moe": "qwen3-moe-tiny",
}
"""Family -> its tiny preset (``lit_accel.models.presets``): the model families every technique is tested on."""
MOE_FAMILIES = ("mixtral", "qwen3_moe")


def tiny_family(family: str, seed: int = 0, **overrides: Any) -> Any:
    """A random fp32 ``*ForCausalLM`` of ``family`` (a key of :data:`FAMILIES`) from its tiny preset, hidden 128,
    4 query heads over 2 KV heads, 2 blocks, vocab 256 unless overridden; fresh, so in training mode. The weights
    of every norm are perturbed away from their initial value (ones, or zeros for Gemma's ``1 + w``) so that a
    test sees a norm applied with the wrong formula."""
    import torch
    from transformers import AutoModelForCausalLM

    from lit_accel.models.presets import preset_config

    config = preset_config(FAMILIES[family], **{"vocab_size": 256, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 and "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


@contextlib.contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """One intra-op thread: at the tiny family shapes a second one only adds synchronisation, which costs 10x and
    more (MKL's SVD, the matmuls) on a 2-core machine that is busy with anything else."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def expected_family_linears(family: str, model: Any, kinds: tuple[str, ...] = ("attention", "mlp")) -> set[str]:
    """The decoder linears ``kinds`` hold in a :func:`tiny_family` model, written out per family (not read from the
    structure code): Phi-3's fused projections, no MLP linears in mixture-of-experts blocks."""
    attn = ("qkv_proj", "o_proj") if family == "phi3" else ("q_proj", "k_proj", "v_proj", "o_proj")
    mlp = ("gate_up_proj", "down_proj") if family == "phi3" else ("gate_proj", "up_proj", "down_proj")
    layers = model.config.num_hidden_layers
    dense = set(range(layers))
    if family == "mixtral":
        dense = set()
    elif family == "qwen3_moe":
        dense = set(model.config.mlp_only_layers)
    names = set()
    for i in range(layers):
        if "attention" in kinds:
            names |= {f"model.layers.{i}.self_attn.{s}" for s in attn}
        if "mlp" in kinds and i in dense:
            names |= {f"model.layers.{i}.mlp.{s}" for s in mlp}
    return names


@contextlib.contextmanager
def moe_warning(family: str, prefix: str = "", mlp: bool = True) -> Iterator[None]:
    """Exactly one warning about mixture-of-experts MLPs when ``mlp`` targets meet an MoE family, naming it (and
    starting with ``prefix``, the technique); none otherwise."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    moe = [str(w.message) for w in caught if "mixture of experts" in str(w.message)]
    if family in MOE_FAMILIES and mlp:
        assert len(moe) == 1, moe
        assert moe[0].startswith(prefix) and f"model_type '{family}'" in moe[0]
        assert "3-D tensors" in moe[0] and "stay dense" in moe[0]
    else:
        assert not moe, moe
