"""Weights & Biases: Lightning's ``WandbLogger``, offline unless an API key is configured, and the tables and charts
the callbacks log.

Runs with no W&B credentials (CI, air-gapped GPU machines) write an offline run under ``save_dir``; ``wandb
sync <dir>`` uploads it later. With ``WANDB_API_KEY`` set (or a ``wandb login`` entry in ``~/.netrc``) runs go
online. ``WANDB_MODE`` in the environment always wins.

Callbacks log their per-layer pictures through :class:`WandbCharts`: a table plus bar or line charts of its
columns, sent from rank zero to every W&B logger of the trainer; a failure is a warning, never an exception in
training. Loggers that are not W&B (:func:`other_loggers`) get the callbacks' scalars instead.

Example:
    >>> from lit_accel.observe import WandbLogger
    >>> logger = WandbLogger(project="lit-accel", save_dir="runs")  # doctest: +SKIP
    >>> charts = WandbCharts("DropBP")
    >>> rows = [["0.attn", 0.5], ["0.mlp", 0.3]]
    >>> charts.log(trainer, "dropbp/allocation", ["sublayer", "rate"], rows,
    ...            {"dropbp/rates": BarChart("sublayer", "rate", "drop rate per sublayer")})  # doctest: +SKIP
    True
"""

from __future__ import annotations

import netrc
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import wandb
from lightning.pytorch.loggers import Logger
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_warn

__all__ = [
    "BarChart",
    "LineChart",
    "WandbCharts",
    "WandbLogger",
    "other_loggers",
    "wandb_credentials_present",
    "wandb_loggers",
]


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


def wandb_loggers(trainer: L.Trainer) -> list[_LightningWandbLogger]:
    """The trainer's W&B loggers (Lightning's ``WandbLogger`` or a subclass such as :class:`WandbLogger`)."""
    return [logger for logger in trainer.loggers if isinstance(logger, _LightningWandbLogger)]


def other_loggers(trainer: L.Trainer) -> list[Logger]:
    """The trainer's loggers that are not W&B: they take scalars, not tables or charts."""
    return [logger for logger in trainer.loggers if not isinstance(logger, _LightningWandbLogger)]


@dataclass(frozen=True)
class BarChart:
    """A bar chart of the table's column ``y`` against its column ``x`` (one bar per row)."""

    x: str
    y: str
    title: str


@dataclass(frozen=True)
class LineChart:
    """One line per column in ``ys`` against the table's column ``x``."""

    x: str
    ys: tuple[str, ...]
    title: str


class WandbCharts:
    """Logs one callback's tables and charts to every W&B logger of a trainer, from rank zero, and never raises.

    A table or chart that cannot be built or logged (an old ``wandb``, a finished run, a value W&B rejects) gives one
    warning naming ``owner``; later failures are silent, and training goes on either way.

    Args:
        owner: Name of the callback, shown in the warning.

    Example:
        >>> from types import SimpleNamespace
        >>> charts = WandbCharts("DropBP")
        >>> trainer = SimpleNamespace(is_global_zero=True, loggers=[], global_step=0)
        >>> charts.log(trainer, "dropbp/allocation", ["sublayer", "rate"], [["0.attn", 0.5]])  # no W&B logger
        False
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.warned = False
        """Whether a failure was reported already."""

    def log(
        self,
        trainer: L.Trainer,
        table_key: str,
        columns: Sequence[str],
        rows: Sequence[Sequence[Any]],
        charts: Mapping[str, BarChart | LineChart] | None = None,
    ) -> bool:
        """Logs ``rows`` as the table ``table_key`` and each chart under its key, at ``trainer.global_step``.

        Args:
            trainer: Its ``loggers``, ``is_global_zero`` and ``global_step`` are read.
            table_key: W&B key of the table.
            columns: Column names of the table.
            rows: One list of values per row, in the order of ``columns``.
            charts: W&B key -> chart of the table's columns.

        Returns:
            True when at least one W&B logger got them; False on other ranks, without a W&B logger, or on failure.
        """
        loggers = wandb_loggers(trainer)
        if not loggers or not trainer.is_global_zero:
            return False
        logged = False
        try:
            table = wandb.Table(columns=list(columns), data=[list(row) for row in rows])
            payload: dict[str, Any] = {table_key: table}
            for key, chart in (charts or {}).items():
                if isinstance(chart, BarChart):
                    payload[key] = wandb.plot.bar(table, chart.x, chart.y, title=chart.title)
                else:
                    xs = [row[columns.index(chart.x)] for row in rows]
                    ys = [[row[columns.index(y)] for row in rows] for y in chart.ys]
                    payload[key] = wandb.plot.line_series(
                        xs=xs, ys=ys, keys=list(chart.ys), title=chart.title, xname=chart.x
                    )
            # Lightning's WandbLogger defines trainer/global_step as the x axis of everything it logs.
            payload["trainer/global_step"] = trainer.global_step
            for logger in loggers:
                logger.experiment.log(payload)
                logged = True
        except Exception as err:  # a chart must never stop training
            if not self.warned:
                self.warned = True
                rank_zero_warn(
                    f"{self.owner}: could not log the W&B table {table_key!r} ({err!r}); training goes on, and further "
                    "failures of its W&B charts are not reported."
                )
        return logged
