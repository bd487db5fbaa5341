"""Weights & Biases through Lightning's ``WandbLogger``: offline unless an API key is configured.

Runs with no W&B credentials (CI, air-gapped GPU machines) write an offline run under ``save_dir``; ``wandb
sync <dir>`` uploads it later. With ``WANDB_API_KEY`` set (or a ``wandb login`` entry in ``~/.netrc``) runs go
online. ``WANDB_MODE`` in the environment always wins.

Example:
    >>> from lit_accel.observe import WandbLogger
    >>> logger = WandbLogger(project="lit-accel", save_dir="runs")  # doctest: +SKIP
"""

from __future__ import annotations

import netrc
import os
from typing import Any, Literal

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger

__all__ = ["WandbLogger", "wandb_credentials_present"]


def wandb_credentials_present() -> bool:
    """True when an API key is in the environment or in ``~/.netrc`` for api.wandb.ai."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger`` with ``offline=None`` meaning "offline unless credentials are present".

    Args:
        project: W&B project name.
        name: Run name shown in the W&B UI.
        save_dir: Where the run (offline or online cache) is written.
        offline: ``True``/``False`` forces the mode; ``None`` decides from the credentials (and ``WANDB_MODE``).
        log_model: Upload checkpoints as W&B artifacts (``False`` keeps them local).
        id: Resume this W&B run id.
        tags: Tags of the run.
        group: Group of the run (e.g. one per sweep).
        **kwargs: Passed to ``wandb.init``.
    """

    def __init__(
        self,
        project: str = "lit-accel",
        name: str | None = None,
        save_dir: str = "runs",
        offline: bool | None = None,
        log_model: bool | Literal["all"] = False,
        id: str | None = None,
        tags: list[str] | None = None,
        group: str | None = None,
        **kwargs: Any,
    ) -> None:
        mode = os.environ.get("WANDB_MODE", "").lower()
        if mode == "disabled":
            # Lightning would turn offline=True into WANDB_MODE=dryrun and write run files: honour "disabled".
            kwargs["mode"] = "disabled"
            offline = False
        elif offline is None:
            if mode in ("offline", "dryrun"):
                offline = True
            elif mode == "online":
                offline = False
            else:
                offline = not wandb_credentials_present()
        if offline and log_model:
            raise ValueError("log_model=True needs an online run; set offline=False (and a W&B API key).")
        os.makedirs(save_dir, exist_ok=True)
        # LightningCLI passes every wandb.init keyword it knows, as None; wandb warns about some that are
        # deprecated even when unset.
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        super().__init__(
            name=name,
            save_dir=save_dir,
            offline=offline,
            id=id,
            project=project,
            log_model=log_model,
            tags=tags,
            group=group,
            **kwargs,
        )
        self.offline = offline
