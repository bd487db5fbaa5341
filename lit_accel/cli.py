"""The ``lit-accel`` command: LightningCLI for ``CausalLM`` + ``TextDataModule``, plus ``export``.

Examples:
    $ lit-accel fit --config configs/quickstart.yaml
    $ lit-accel fit --config configs/llama-125m.yaml --config callbacks/dropbp.yaml
    $ lit-accel fit --config configs/quickstart.yaml --print_config
    $ lit-accel fit --config configs/quickstart.yaml --ckpt_path last      # resume
    $ lit-accel export --ckpt runs/quickstart/checkpoints/last.ckpt --out exported/quickstart
"""

from __future__ import annotations

import os
import sys
from typing import Any

import lightning as L
import yaml
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from lit_accel.data import TextDataModule
from lit_accel.models import CausalLM
from lit_accel.observe.wandb import WandbLogger

__all__ = ["LitAccelCLI", "LoggerSaveConfigCallback", "main"]


class LoggerSaveConfigCallback(SaveConfigCallback):
    """Saves the resolved config next to the logs and into the W&B run (config and a YAML file), rank zero only.

    With a ``WandbLogger`` the file is named after the run id, so runs sharing a ``save_dir`` never overwrite each
    other's config.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if isinstance(trainer.logger, WandbLogger) and trainer.is_global_zero:
            self.config_filename = f"config-{trainer.logger.version}.yaml"
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        text = self.parser.dump(self.config, skip_none=False)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                run = logger.experiment
                run.config.update(yaml.safe_load(text), allow_val_change=True)
                with open(os.path.join(run.dir, "lit_accel_config.yaml"), "w") as f:
                    f.write(text)


class LitAccelCLI(LightningCLI):
    """LightningCLI with lit_accel's model and data defaults; callbacks come from ``--config`` fragments."""

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_callback", LoggerSaveConfigCallback)
        kwargs.setdefault(
            "parser_kwargs",
            {
                "description": (
                    "lit_accel: faster, cheaper LLM training on PyTorch Lightning. Subcommands: fit, validate,"
                    " test, predict (LightningCLI), and `lit-accel export --ckpt CKPT --out DIR` (Hugging Face"
                    " model directory from a Lightning or DeepSpeed checkpoint)."
                ),
                "default_env": False,
            },
        )
        kwargs.setdefault("seed_everything_default", 1234)
        super().__init__(CausalLM, TextDataModule, args=args, run=run, auto_configure_optimizers=False, **kwargs)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``lit-accel``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "export":
        from lit_accel.export import main as export_main

        export_main(args[1:])
        return
    # LightningCLI reads sys.argv itself when args is None (and warns when given both).
    LitAccelCLI(args=None if argv is None else args)


if __name__ == "__main__":
    main()
