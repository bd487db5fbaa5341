"""The ``lit-accel`` command: LightningCLI for ``CausalLM`` + a data module, plus ``export``.

The data module is ``TextDataModule`` unless the config names another subclass of it: ``data:`` with
``TextDataModule``'s arguments (``corpus``, ``seq_len``, ...) works as it always did, and
``data: {class_path: lit_accel.data.MultiDomainDataModule, init_args: {domains: ...}}`` picks the multi-domain
module (dynamic batch loading). ``lit-accel export`` of a StructuredPruning checkpoint writes the physically pruned
model (:func:`lit_accel.pruning.export.export_pruned_checkpoint`).

Examples:
    $ lit-accel fit --config configs/quickstart.yaml
    $ lit-accel fit --config configs/llama-125m.yaml --config callbacks/dropbp.yaml
    $ lit-accel fit --config configs/quickstart.yaml --print_config
    $ lit-accel fit --config configs/quickstart.yaml --ckpt_path last      # resume
    $ lit-accel export --ckpt runs/quickstart/checkpoints/last.ckpt --out exported/quickstart
    $ lit-accel fit --config recipes/prune_continue/prune.yaml    # data: a MultiDomainDataModule
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
import re
import sys
import traceback
import warnings
from typing import Any, NoReturn

import lightning as L
import torch
import yaml
from jsonargparse import Namespace
from lightning.fabric.accelerators.cuda import num_cuda_devices
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info

# Imported for the short names: jsonargparse resolves `--trainer.callbacks+=DropBP` among imported subclasses.
import lit_accel.callbacks  # noqa: F401
from lit_accel.checkpoint import deepspeed_client_state_file, load_checkpoint_file
from lit_accel.data import TextDataModule
from lit_accel.export import main as export_main
from lit_accel.models import CausalLM
from lit_accel.observe.wandb import WandbLogger
from lit_accel.run_identity import check_resume, run_stamp_of
from lit_accel.strategies import check_cli_strategy  # importing it registers the lit_deepspeed_* names

__all__ = [
    "LitAccelArgumentParser",
    "LitAccelCLI",
    "LoggerSaveConfigCallback",
    "brief_parser_error",
    "main",
    "name_run_by_techniques",
    "require_gpu_when_asked",
    "resume_wandb_run",
]


class LoggerSaveConfigCallback(SaveConfigCallback):
    """Saves the resolved config next to the logs and into the W&B run (config and a YAML file), rank zero only.

    With a ``WandbLogger`` the file is named after the run id, so runs sharing a ``save_dir`` never overwrite each
    other's config.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if isinstance(trainer.logger, WandbLogger) and trainer.is_global_zero:
            self.config_filename = f"config-{trainer.logger.version}.yaml"
        # trainer.ckpt_path is set only after the setup hooks; the resolved config already names the checkpoint.
        if self.config.get("ckpt_path") is not None and not self.already_saved:
            # A resumed run whose log folder is the first run's (no logger, or one without versions) keeps the
            # first run's config and saves its own beside it, instead of refusing to start or overwriting it.
            self.config_filename = trainer.strategy.broadcast(self._free_name(trainer))
        super().setup(trainer, pl_module, stage)

    def _free_name(self, trainer: L.Trainer) -> str:
        log_dir = trainer.log_dir
        if not trainer.is_global_zero or log_dir is None or self.overwrite:
            return self.config_filename
        stem, suffix = os.path.splitext(self.config_filename)
        name, k = self.config_filename, 0
        while os.path.exists(os.path.join(log_dir, name)):
            k += 1
            name = f"{stem}.resumed-{k}{suffix}"
        return name

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # The W&B copy waits for on_train_start: a command refused during set-up (a bad resume, a busy checkpoint
        # folder) then leaves no empty W&B run behind.
        self._pending_wandb_config = self.parser.dump(self.config, skip_none=False)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._upload_config(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn != "fit":  # `lit-accel validate`: no training start to wait for
            self._upload_config(trainer)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._upload_config(trainer)

    def _upload_config(self, trainer: L.Trainer) -> None:
        text, self._pending_wandb_config = getattr(self, "_pending_wandb_config", None), None
        if text is None or not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                run = logger.experiment
                if getattr(run, "disabled", False):  # WANDB_MODE=disabled: a no-op run, whose dir does not exist
                    continue
                run.config.update(yaml.safe_load(text), allow_val_change=True)
                with open(os.path.join(run.dir, "lit_accel_config.yaml"), "w") as f:
                    f.write(text)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # The W&B run this training run logs to, so `--ckpt_path` resumes it instead of opening another.
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and trainer.is_global_zero and logger.version:
                checkpoint.setdefault("lit_accel", {})["wandb_run_id"] = str(logger.version)


def _checkpoint_dirs(config: Any) -> list[str]:
    dirs = []
    for callback in (config.get("trainer") or {}).get("callbacks") or []:
        class_path = str(callback.get("class_path", "")) if hasattr(callback, "get") else ""
        init_args = callback.get("init_args") if hasattr(callback, "get") else None
        if class_path.endswith("ModelCheckpoint") and init_args is not None and init_args.get("dirpath"):
            dirs.append(str(init_args["dirpath"]))
    return dirs


def _resolve_ckpt_path(config: Any) -> str | None:
    ckpt_path = config.get("ckpt_path")
    if ckpt_path not in ("last", "hpc", "best", "registry") or ckpt_path is None:
        return str(ckpt_path) if ckpt_path else None
    if ckpt_path != "last":
        return None
    # As Lightning resolves "last": the newest last*.ckpt of the checkpoint folders.
    found = [p for d in _checkpoint_dirs(config) if os.path.isdir(d) for p in glob.glob(os.path.join(d, "last*.ckpt"))]
    return max(found, key=os.path.getmtime) if found else None


def resume_wandb_run(config: Any) -> str | None:
    """Points a resumed run's W&B logger at the W&B run its checkpoint was logging to (one W&B run per run).

    Only when the logger is lit_accel's or Lightning's ``WandbLogger`` with no ``id`` given and the checkpoint
    (a file, or a DeepSpeed folder's model states) records one.

    Returns:
        The W&B run id now resumed, or ``None``.
    """
    logger: Any = (config.get("trainer") or {}).get("logger")
    if not hasattr(logger, "get"):
        return None
    init_args, class_path = logger.get("init_args"), str(logger.get("class_path", ""))
    if init_args is None or not class_path.endswith("WandbLogger") or init_args.get("id") or init_args.get("version"):
        return None
    path = _resolve_ckpt_path(config)
    if path is None:
        return None
    if os.path.isdir(path):
        states = deepspeed_client_state_file(path)
        if states is None:
            return None  # the fit itself reports what is wrong with the folder
        path = str(states)
    try:
        saved = load_checkpoint_file(path, mmap=True, verify=False, name="--ckpt_path")
    except (OSError, ValueError, RuntimeError):
        return None  # the fit itself reports what is wrong with the checkpoint
    run_id = ((saved.get("client_state", saved) if isinstance(saved, dict) else {}).get("lit_accel") or {}).get(
        "wandb_run_id"
    )
    if isinstance(run_id, str) and run_id:
        init_args["id"] = run_id
        rank_zero_info(f"lit_accel: resuming W&B run {run_id} (the checkpoint's)")
        return run_id
    return None


def use_step_progress_bar(config: Any) -> bool:
    """Adds :class:`~lit_accel.observe.StepProgressBar` (and :class:`~lit_accel.observe.ParamsSummary`) to the
    trainer's callbacks when the bar (the summary) is on and no other is configured, and ``rich`` is installed."""
    trainer = config.get("trainer")
    if trainer is None or trainer.get("enable_progress_bar") is False or importlib.util.find_spec("rich") is None:
        return False
    callbacks = trainer.get("callbacks") or []
    if any("ProgressBar" in str(c.get("class_path", "")) for c in callbacks if hasattr(c, "get")):
        return False
    trainer["callbacks"] = [
        *callbacks,
        Namespace(class_path="lit_accel.observe.StepProgressBar", init_args=Namespace()),
    ]
    if trainer.get("enable_model_summary") is not False and not any(
        "ModelSummary" in str(c.get("class_path", "")) for c in callbacks if hasattr(c, "get")
    ):
        trainer["callbacks"].append(Namespace(class_path="lit_accel.observe.ParamsSummary", init_args=Namespace()))
    return True


def require_gpu_when_asked(config: Any) -> None:
    """Refuses, in one sentence, a config that asks for a GPU on a machine where torch sees none.

    Raises:
        ValueError: Naming the config file, what it asks for, and the CPU config to use instead.
    """
    trainer = config.get("trainer") or {}
    accelerator = str(trainer.get("accelerator") or "").lower()
    if accelerator not in ("gpu", "cuda") or num_cuda_devices() > 0:
        return
    files = [os.path.basename(str(f)) for f in (config.get("config") or [])]
    where = f" ({files[0]})" if files else ""
    raise ValueError(
        f"trainer.accelerator={accelerator!r}{where} needs a CUDA GPU, and torch sees none on this machine. On a CPU"
        " machine use configs/quickstart.yaml (techniques too: --config configs/quickstart.yaml --config"
        " callbacks/<technique>.yaml), or pass --trainer.accelerator cpu."
    )


# Short names of the technique callbacks in run names: the names of their fragments in callbacks/.
_RUN_NAME_PARTS = {
    "DropBP": "dropbp",
    "LoRA": "lora",
    "LowRankFactorization": "factorize",
    "SemiStructuredSparsity": "sparsity24",
    "StructuredPruning": "pruning",
}


def _techniques(callbacks: Any) -> list[str]:
    names = []
    for callback in callbacks or []:
        class_path = callback.get("class_path") if isinstance(callback, dict) else getattr(callback, "class_path", None)
        name = str(class_path or "").rpartition(".")[2]
        if str(class_path or "").startswith("lit_accel.") and name in _RUN_NAME_PARTS:
            names.append(name)
    return names


def name_run_by_techniques(config: Any) -> str | None:
    """Gives a run whose ``--config`` fragments add techniques to its first config its own folder and W&B name.

    ``--config configs/quickstart.yaml --config callbacks/dropbp.yaml`` runs as ``quickstart+dropbp``: every
    path of the trainer's config that lies under the first config's ``trainer.default_root_dir`` (``runs/quickstart``:
    the checkpoint folder, the logger's folder) moves to ``runs/quickstart+dropbp``, and the logger's ``name``
    gains the same suffix. So the base run and each variant keep their own ``last.ckpt`` and W&B runs, and
    ``--ckpt_path last`` resumes the variant it is given. Values the command line changed are left as they are.

    Args:
        config: The subcommand's parsed config (``LightningCLI.config[subcommand]``), changed in place.

    Returns:
        The run-name suffix (``"dropbp"``), or ``None`` when nothing was added.
    """
    files = [str(f) for f in (config.get("config") or [])]
    trainer = config.get("trainer")
    if not files or trainer is None:
        return None
    try:
        with open(files[0]) as f:
            first = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError):
        return None
    first_trainer = first.get("trainer") or {}
    base = set(_techniques(first_trainer.get("callbacks")))
    added = [n for n in dict.fromkeys(_techniques(trainer.get("callbacks"))) if n not in base]
    root = first_trainer.get("default_root_dir")
    if not added or not isinstance(root, str) or trainer.get("default_root_dir") != root:
        return None
    suffix = "+".join(_RUN_NAME_PARTS[n] for n in added)
    new_root = f"{root.rstrip('/')}+{suffix}"

    def moved(value: Any) -> Any:
        if isinstance(value, str) and (value == root or value.startswith(root.rstrip("/") + "/")):
            return new_root + value[len(root.rstrip("/")) :]
        return value

    trainer["default_root_dir"] = new_root
    for callback in trainer.get("callbacks") or []:
        init_args = callback.get("init_args") if hasattr(callback, "get") else None
        if init_args is not None and "dirpath" in init_args:
            init_args["dirpath"] = moved(init_args["dirpath"])
    loggers = trainer.get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        init_args = logger.get("init_args") if hasattr(logger, "get") else None
        if init_args is None:
            continue
        for key in ("save_dir", "dir"):
            if key in init_args:
                init_args[key] = moved(init_args[key])
        if isinstance(init_args.get("name"), str):
            init_args["name"] = f"{init_args['name']}+{suffix}"
    rank_zero_info(f"lit_accel: {os.path.basename(files[0])} + {', '.join(added)}: this run writes under {new_root}")
    return suffix


class LitAccelCLI(LightningCLI):
    """LightningCLI with lit_accel's model and data defaults; callbacks come from ``--config`` fragments.

    The data module is in subclass mode with ``TextDataModule`` as the default class, so a config may give
    ``data:`` as ``TextDataModule``'s arguments directly or as ``class_path`` + ``init_args`` of any subclass
    (``lit_accel.data.MultiDomainDataModule``). The resolved config (``--print_config``, the saved copy) always has
    the ``class_path`` form.
    """

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_callback", LoggerSaveConfigCallback)
        kwargs.setdefault("parser_class", LitAccelArgumentParser)
        kwargs.setdefault(
            "parser_kwargs",
            {
                "description": (
                    "lit_accel: faster, cheaper LLM training on PyTorch Lightning. Subcommands: fit, validate,"
                    " test (LightningCLI; test evaluates the data's held-out test documents), and `lit-accel export"
                    " --ckpt CKPT --out DIR` (Hugging Face model directory from a Lightning or DeepSpeed checkpoint)."
                ),
                "default_env": False,
            },
        )
        kwargs.setdefault("seed_everything_default", 1234)
        super().__init__(
            CausalLM,
            TextDataModule,
            args=args,
            run=run,
            auto_configure_optimizers=False,
            subclass_mode_data=True,
            **kwargs,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate and test: ``predict`` is left out (a causal LM's predictions are generations, which
        ``CausalLM.model.generate`` or the exported Hugging Face model give directly)."""
        commands = LightningCLI.subcommands()
        commands.pop("predict", None)
        return commands

    def before_instantiate_classes(self) -> None:
        # An unknown trainer.strategy name: an error that lists lit_accel's and Lightning's names.
        check_cli_strategy(self.config, self.subcommand)
        config = self.config[self.subcommand] if self.subcommand else self.config
        require_gpu_when_asked(config)
        use_step_progress_bar(config)
        name_run_by_techniques(config)
        if self.subcommand in (None, "fit"):
            # validate/test of a checkpoint log to a W&B run of their own: the training run's history is at a
            # later step than the checkpoint's, and W&B drops values logged at an earlier one
            resume_wandb_run(config)

    def before_fit(self) -> None:
        # The resume check CausalLM makes when the checkpoint loads, made before the trainer starts: by then
        # Lightning has opened the W&B run, and a refused command would leave an empty one behind.
        path = _resolve_ckpt_path(self.config[self.subcommand] if self.subcommand else self.config)
        module = self.model
        if path is None or not os.path.isfile(path) or not hasattr(module, "config"):
            return
        try:
            saved = load_checkpoint_file(path, mmap=True, verify=False, name="--ckpt_path").get("lit_accel") or {}
        except (OSError, ValueError, RuntimeError):
            return  # the fit reports what is wrong with the file
        stamp = saved.get("run")
        if isinstance(stamp, dict):
            now = run_stamp_of(self.trainer, module, "", datamodule=self.datamodule)
            check_resume(stamp, now, getattr(module.hparams, "run_checks", "error"), path)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # With the class as default, `data:` given as plain init arguments (every config written before subclass
        # mode) is read as TextDataModule's; a `class_path` picks another subclass.
        parser.set_defaults({"data": {"class_path": "lit_accel.data.TextDataModule"}})


_NOISE = (
    "Subtypes:",
    "Given value type:",
    "Given value:",
    "Subclass types expect one of",
    "- a class path",
    "- a dict",
    "Errors:",
    "Does not validate against any of the Union subtypes",
    "Expected a <class 'NoneType'>",
    "Not a valid subclass of",
)


def brief_parser_error(message: str) -> str:
    """One line from jsonargparse's error message: the argument, what was expected (the allowed values) and the
    value given, without the union-type and subclass listings around it.

    Example:
        >>> brief_parser_error('''Parser key "trainer.callbacks":
        ...   Does not validate against any of the Union subtypes
        ...   Errors:
        ...     - Problem with given class_path 'lit_accel.callbacks.DropBP':
        ...         Parser key "sampling":
        ...           Expected a typing.Literal['a', 'b']. Got value: c
        ...     - Not a valid subclass of Callback''')
        "trainer.callbacks: lit_accel.callbacks.DropBP sampling: Expected a typing.Literal['a', 'b']. Got value: c"
    """
    lines = [line.rstrip() for line in message.splitlines() if line.strip()]
    if not lines:
        return message
    top = re.match(r'Parser key "([^"]+)":\s*(.*)', lines[0])
    prefix = f"{top.group(1)}: " if top else ""

    def indent(line: str) -> int:
        return len(line) - len(line.lstrip())

    for i, line in enumerate(lines):
        problem = re.search(r"Problem with given class_path '([^']+)':\s*(.*)", line)
        if problem:
            detail = [problem.group(2)] if problem.group(2) else []
            for nxt in lines[i + 1 :]:
                if indent(nxt) <= indent(line):
                    break
                detail.append(nxt.strip().lstrip("- "))
            text = re.sub(r'Parser key "([^"]+)":', r"\1:", " ".join(d for d in detail if d))
            return f"{prefix}{problem.group(1)} {text}".strip()
    kept = [line.strip().lstrip("- ") for line in lines[1:] if not line.strip().lstrip("- ").startswith(_NOISE)]
    head = top.group(2) if top else lines[0]
    return (prefix + " ".join(part for part in [head, *kept[:2]] if part)).strip()


class LitAccelArgumentParser(LightningArgumentParser):
    """Prints a parse error as one ``lit-accel: error:`` line (``LIT_ACCEL_DEBUG=1``: jsonargparse's full text)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get("LIT_ACCEL_DEBUG") or os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)
        sys.stderr.write(
            f"lit-accel: error: {brief_parser_error(message)}\n"
            f"  ({self.prog.replace(' [options]', '')} --help lists the arguments; LIT_ACCEL_DEBUG=1 shows the"
            " parser's full message)\n"
        )
        sys.exit(2)


def _user_error(err: BaseException) -> BaseException | None:
    # The outermost exception of the chain raised by a `raise` in lit_accel's own code: an argument or a file the
    # user gave was refused with a message written for them (outermost, so a wrapper's context, such as the
    # domain a message is about, is kept). Anything else (a bug, an error from torch) keeps its traceback. The
    # chain is followed as Python prints it: an exception raised `from None` hides its context.
    chain = []
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        if current.__cause__ is not None:
            current = current.__cause__
        else:
            current = None if current.__suppress_context__ else current.__context__
    package = os.path.dirname(os.path.abspath(__file__))
    for exc in chain:
        if not isinstance(exc, (ValueError, FileExistsError, FileNotFoundError, NotADirectoryError, RuntimeError)):
            continue
        frames = traceback.extract_tb(exc.__traceback__)
        if (
            frames
            and os.path.abspath(frames[-1].filename).startswith(package)
            and (frames[-1].line or "").startswith("raise")
        ):
            return exc
    return None


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def _quiet_console() -> None:
    # Noise on nearly every command, none of it actionable: Lightning's advertisement for another logger, a
    # deprecation inside Lightning's own pytree helper, and DeepSpeed's "unable to detect an accelerator" warning
    # on machines without one (it then picks the CPU, which is what naming it here does, silently).
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropTips) for f in logger.filters):
        logger.addFilter(_DropTips())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    if "DS_ACCELERATOR" not in os.environ and "deepspeed" not in sys.modules and _only_a_cpu():
        os.environ["DS_ACCELERATOR"] = "cpu"


def _only_a_cpu() -> bool:
    # Counted through NVML (Lightning's num_cuda_devices), not torch.cuda.is_available(): initialising CUDA in the
    # launching process would break the fork-started processes of ddp_fork/ddp_notebook. The other accelerators
    # DeepSpeed detects by itself (XPU, MPS, Ascend NPU, Gaudi) keep its own choice.
    if num_cuda_devices() > 0:
        return False
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return False
    if torch.backends.mps.is_available():
        return False
    return all(importlib.util.find_spec(name) is None for name in ("torch_npu", "habana_frameworks"))


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``lit-accel``.

    A refusal with a message written for the user (a bad argument, an existing export folder, another run's
    checkpoint) prints as one ``lit-accel: error:`` line and exits with status 2; ``LIT_ACCEL_DEBUG=1`` shows the
    traceback. Other errors keep their traceback.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    _quiet_console()
    try:
        if args and args[0] == "export":
            export_main(args[1:])
            return
        # LightningCLI reads sys.argv itself when args is None (and warns when given both).
        LitAccelCLI(args=None if argv is None else args)
    except Exception as err:
        refusal = _user_error(err)
        if refusal is None or os.environ.get("LIT_ACCEL_DEBUG"):
            raise
        sys.stderr.write(f"lit-accel: error: {refusal}\n")
        sys.exit(2)


if __name__ == "__main__":
    main()
