"""Weights & Biases: Lightning's ``WandbLogger``, offline unless an API key is configured, and the tables and charts
the callbacks log.

Runs with no W&B credentials (CI, air-gapped GPU machines) write an offline run under ``save_dir``; ``wandb
sync <dir>`` uploads it later. With ``WANDB_API_KEY`` set (or a ``wandb login`` entry in ``~/.netrc``) runs go
online. ``WANDB_MODE`` in the environment always wins.

Credentials without a network (a laptop on a train, a GPU node without egress) would make ``wandb.init`` retry for
about 100 s and then fail. Before starting an online run, rank zero therefore asks the W&B server (``WANDB_BASE_URL``,
by default https://api.wandb.ai, through the configured proxy) for any HTTP answer within 3 s, once per process and
server. When none comes, or ``wandb.init`` fails to reach the server, the run is written offline instead, with one
warning naming its folder and the command that uploads it later: ``wandb sync <save_dir>/wandb/offline-run-...``.
This also holds for an explicit ``offline=False``: the logged data is kept, and a job that waited in a queue for its
GPUs is not lost to a network outage. To fail instead of falling back, set ``WANDB_MODE=online``; to skip the check,
``WANDB_MODE=offline``. A ``mode`` passed to the logger (``mode="online"``) is likewise used as given.

Callbacks log their per-layer pictures through :class:`WandbCharts`: a table plus bar or line charts of its
columns, sent from rank zero to every W&B logger of the trainer; a failure is a warning, never an exception in
training. Loggers that are not W&B (:func:`other_loggers`) get the callbacks' scalars instead.

Example:
    >>> from lit_accel.observe import WandbLogger
    >>> logger = WandbLogger(project="lit-accel", save_dir="runs")  # doctest: +SKIP
    >>> run = logger.experiment  # online, or offline with a warning when the server cannot be reached  # doctest: +SKIP
    >>> charts = WandbCharts("DropBP")
    >>> rows = [["0.attn", 0.5], ["0.mlp", 0.3]]
    >>> charts.log(trainer, "dropbp/allocation", ["sublayer", "rate"], rows,
    ...            {"dropbp/rates": BarChart("sublayer", "rate", "drop rate per sublayer")})  # doctest: +SKIP
    True
"""

from __future__ import annotations

import http.client
import netrc
import os
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import wandb
from lightning.pytorch.loggers import Logger
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_warn

__all__ = [
    "PROBE_TIMEOUT_S",
    "BarChart",
    "LineChart",
    "WandbCharts",
    "WandbLogger",
    "other_loggers",
    "wandb_credentials_present",
    "wandb_loggers",
    "wandb_server_unreachable",
]


def wandb_credentials_present() -> bool:
    """True when an API key is in the environment or in ``~/.netrc`` for api.wandb.ai."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


PROBE_TIMEOUT_S = 3.0
"""How long rank zero waits for any answer of the W&B server before an online run falls back to offline."""

_probed: dict[tuple[str, str | None], str | None] = {}
"""(server URL, proxy) -> why it could not be reached (None: it answered); one probe per process and server."""


class _KeepRedirects(urllib.request.HTTPRedirectHandler):
    # A redirect is an answer: following it would only add requests (and hosts that may be blocked) to the probe.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _ask(url: str, proxy: str | None, timeout: float, answer: list[str | None]) -> None:
    """Appends to ``answer`` None when anything answers a HEAD of ``url``, else why nothing did."""
    handlers: list[urllib.request.BaseHandler] = [_KeepRedirects()]
    if proxy:
        handlers.append(urllib.request.ProxyHandler({"http": proxy, "https": proxy}))
    try:
        with urllib.request.build_opener(*handlers).open(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            answer.append(None)
    except urllib.error.HTTPError:  # any status code (401, 404, 405, 3xx) means the server is there
        answer.append(None)
    except urllib.error.URLError as err:
        # A TLS failure (a company proxy's own certificate) is still an answer: wandb has its own certificate
        # settings and decides about it; the probe only looks for a network that is not there.
        answer.append(None if isinstance(err.reason, ssl.SSLError) else str(err.reason))
    except (ssl.SSLError, http.client.HTTPException):  # something answered, if not in proper HTTP
        answer.append(None)
    except OSError as err:  # timeouts, resets: nothing usable answers
        answer.append(str(err) or type(err).__name__)


def wandb_server_unreachable(url: str, proxy: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the W&B server at ``url`` cannot be reached, or None when it answers; each (url, proxy) is asked once
    per process.

    Any HTTP answer within ``timeout`` seconds, name lookup included, counts as reachable; only no answer at all
    (no name resolution, refused, no route, silence) counts as unreachable. The request runs in a daemon thread
    because a name lookup ignores socket timeouts.

    Args:
        url: Base URL of the server, as ``WANDB_BASE_URL``.
        proxy: Proxy to go through; None uses the ``https_proxy``/``http_proxy``/``no_proxy`` environment.
        timeout: Seconds to wait for an answer.

    Returns:
        None when the server answered, else the reason in words (e.g. ``"[Errno 111] Connection refused"``).

    Example:
        >>> wandb_server_unreachable("http://127.0.0.1:9")  # nothing listens on the discard port  # doctest: +SKIP
        '[Errno 111] Connection refused'
    """
    key = (url, proxy)
    if key not in _probed:
        answer: list[str | None] = []
        thread = threading.Thread(target=_ask, args=(url, proxy, timeout, answer), name="wandb-probe", daemon=True)
        thread.start()
        thread.join(timeout)
        _probed[key] = answer[0] if answer else f"no answer within {timeout:g} s"
    return _probed[key]


def _server_and_proxy() -> tuple[str, str | None]:
    """The base URL and proxy ``wandb.init`` will use: wandb's settings (its settings files, then ``WANDB_*``
    variables as they were when wandb was first set up in this process), else the environment."""
    try:
        settings = wandb.setup().settings
        url = str(settings.base_url)
        proxy = settings.https_proxy if url.startswith("https:") else settings.http_proxy
        return url, proxy
    except Exception:  # an older or newer wandb without these settings: read what wandb would have read
        return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"), None


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger`` with ``offline=None`` meaning "offline unless credentials are present", and an
    online run that falls back to offline, with one warning, when the W&B server cannot be reached.

    Args:
        project: W&B project name.
        name: Run name shown in the W&B UI.
        save_dir: Where the run (offline or online cache) is written.
        offline: ``True``/``False`` forces the mode; ``None`` decides from the credentials (and ``WANDB_MODE``).
            Either way an online run whose server does not answer is written offline (see the module docstring);
            ``WANDB_MODE=online`` fails instead.
        log_model: Upload checkpoints as W&B artifacts (``False`` keeps them local).
        id: Resume this W&B run id.
        tags: Tags of the run.
        group: Group of the run (e.g. one per sweep).
        **kwargs: Passed to ``wandb.init``.

    Example:
        >>> logger = WandbLogger(project="lit-accel", save_dir="runs")  # doctest: +SKIP
        >>> logger.experiment.settings.mode  # with an API key but no network, after one warning  # doctest: +SKIP
        'offline'
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
        # A mode chosen in the environment or passed to wandb.init is the user's decision: no probe, no fallback.
        self.may_fall_back = not offline and not mode and kwargs.get("mode") is None
        """Whether an online run is written offline when the server cannot be reached."""
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
        # Lightning passes anonymous=None, which wandb >= 0.19 answers with a deprecation line on every run.
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)
        self.offline = offline

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        """The wandb run, created on first use on rank zero (other ranks get a no-op object): online when the
        server answers, else offline with one warning saying where it is and how to upload it."""
        if (
            self._experiment is not None
            or not self.may_fall_back
            or wandb.run is not None  # Lightning adopts a run already open in the process
            or getattr(self, "_attach_id", None) is not None  # a spawned worker attaching to the parent's run
        ):
            return super().experiment
        self.may_fall_back = False  # decided once; a later failure of this logger is not retried offline
        url, proxy = _server_and_proxy()
        reason = wandb_server_unreachable(url, proxy)
        problem = f"cannot be reached ({reason})"
        if reason is None:
            try:
                return super().experiment
            except wandb.errors.CommError as err:  # something answered the probe, but not as W&B (a proxy's 404)
                problem = f"did not start the run ({str(err).splitlines()[0]})"
        # Not Lightning's offline path: it sets WANDB_MODE for the whole process (the next logger would take it for
        # the user's choice), and wandb ignores it once set up in this process, as the probe just did. wandb.init's
        # mode argument always counts.
        self._wandb_init["mode"] = "offline"
        self.offline = True
        run = super().experiment
        run_dir = Path(run.dir).parent  # run.dir is <save_dir>/wandb/offline-run-<time>-<id>/files
        rank_zero_warn(
            f"W&B server {url} {problem}: this run is written offline under {run_dir}. Upload it later with "
            f"`wandb sync {run_dir}`. (WANDB_MODE=online fails instead of falling back; "
            "WANDB_MODE=offline skips the check.)"
        )
        return run


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
