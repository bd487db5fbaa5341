"""Run identity: a checkpoint knows which run wrote it, and a checkpoint folder serves one run at a time.

Three guards, used by :class:`lit_accel.models.CausalLM` (any LightningModule may call them):

- :func:`run_stamp` describes what a run computes: the module's hyper-parameters, the data module's, and each
  technique callback's settings. It is saved in every checkpoint, and :func:`stamp_differences` lists what a
  resuming run changed, so a resume from another run's checkpoint (another learning rate, another technique, another
  corpus) is refused instead of silently continuing someone else's weights and optimizer. Settings that change
  only speed or reporting (:data:`FREE_KEYS`) may differ.
- :class:`FolderLock` marks a checkpoint folder as in use while a run trains, so a second run pointed at the same
  folder stops at set-up instead of sharing ``last.ckpt`` with the first.

Example:
    >>> a = {"model": {"learning_rate": 1e-3, "kernels": None}, "techniques": {"DropBP": {"target": 0.5}}}
    >>> b = {"model": {"learning_rate": 3e-4, "kernels": True}, "techniques": {}}
    >>> stamp_differences(a, b)
    ['model.learning_rate: 0.001 in the checkpoint, 0.0003 now', 'techniques: DropBP in the checkpoint, none now']
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

from lit_accel.checkpoint import load_checkpoint_file

__all__ = [
    "FREE_CALLBACKS",
    "FREE_KEYS",
    "HEARTBEAT_S",
    "LEASE_S",
    "LOCK_NAME",
    "FolderLock",
    "architecture",
    "check_resume",
    "guard_checkpoint_folders",
    "new_run_id",
    "run_stamp",
    "run_stamp_of",
    "stamp_differences",
    "technique_settings",
]

FREE_KEYS = frozenset(
    {
        # how fast or with how much memory the same computation runs
        "attn_implementation",
        "benchmark_tokens",
        "fused_optimizer",
        "gradient_checkpointing",
        "kernel",
        "kernels",
        "min_speedup",
        "num_workers",
        "recompute_inputs",
        # per-device batch sizes change with the number of devices; validation sizes only change what is measured
        "batch_size",
        "max_val_sequences",
        "val_batch_size",
        # where things are written or read from, and how often they are reported; a model's directory or preset
        # name is compared through the network it builds (run_stamp_of's "architecture")
        "model",
        "cache_dir",
        "chart_every_n_steps",
        "export",
        "export_dir",
        "log_every_n_steps",
        "overwrite",
        "run_checks",
    }
)
"""Settings a resumed run may change: they change speed, memory, paths or reporting, not what is computed."""

LOCK_NAME = ".lit_accel.lock"
"""The file :class:`FolderLock` creates in a checkpoint folder while a run uses it."""


def new_run_id() -> str:
    """A fresh run id (12 hex digits), kept in the checkpoints of the run and of its resumptions."""
    return uuid.uuid4().hex[:12]


def _plain(value: Any) -> Any:
    # JSON-shaped copy, so a stamp compares equal after a checkpoint round trip (tuples become lists, paths strings).
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def run_stamp(
    module_hparams: Mapping[str, Any],
    data_hparams: Mapping[str, Any] | None,
    techniques: Mapping[str, Mapping[str, Any]],
    run_id: str,
) -> dict[str, Any]:
    """What a run computes, in JSON-compatible form, to be stored in its checkpoints.

    Args:
        module_hparams: The LightningModule's hyper-parameters (``module.hparams``).
        data_hparams: The data module's hyper-parameters, or ``None`` without a data module.
        techniques: Each technique callback's settings by class name (``{"DropBP": {...}}``).
        run_id: The run's id (:func:`new_run_id`); not compared.

    Returns:
        ``{"run_id", "model", "data", "techniques"}``.
    """
    return {
        "run_id": run_id,
        "model": _plain(dict(module_hparams)),
        "data": _plain(dict(data_hparams)) if data_hparams is not None else None,
        "techniques": _plain({name: dict(settings) for name, settings in techniques.items()}),
    }


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _dict_differences(prefix: str, saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    out = []
    for key in sorted(set(saved) | set(now)):
        if key in FREE_KEYS:
            continue
        if key not in saved or key not in now:
            # A setting the other version of the code did not have: only a difference when it is not the default,
            # which cannot be told here; a missing key is reported only when the other side is not null. A network
            # key that one transformers version writes and another does not is never one: the keys that shape the
            # network exist in both.
            other = now.get(key) if key not in saved else saved.get(key)
            if other is None or prefix.endswith(".architecture"):
                continue
        if isinstance(saved.get(key), dict) and isinstance(now.get(key), dict):
            out += _dict_differences(f"{prefix}.{key}", saved[key], now[key])
        elif saved.get(key) != now.get(key):
            out.append(f"{prefix}.{key}: {_short(saved.get(key))} in the checkpoint, {_short(now.get(key))} now")
    return out


def stamp_differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """What a resuming run computes differently from the run that wrote the checkpoint.

    Args:
        saved: The checkpoint's :func:`run_stamp`.
        now: The resuming run's.

    Returns:
        One line per difference (empty when the run may resume); keys in :data:`FREE_KEYS` are ignored.
    """
    out = _dict_differences("model", saved.get("model") or {}, now.get("model") or {})
    if saved.get("data") is not None and now.get("data") is not None:
        out += _dict_differences("data", saved["data"], now["data"])
    had, has = saved.get("techniques") or {}, now.get("techniques") or {}
    if sorted(had) != sorted(has):
        out.append(
            f"techniques: {', '.join(sorted(had)) or 'none'} in the checkpoint, {', '.join(sorted(has)) or 'none'} now"
        )
    for name in sorted(set(had) & set(has)):
        out += _dict_differences(name, had[name], has[name])
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


_PROCESS_TOKEN = uuid.uuid4().hex
# Tells this process's own earlier locks from those of another process that has the same pid on a host of the same
# name (containers sharing a hostname each number their processes from 1).

HEARTBEAT_S = 30.0
"""How often a held :class:`FolderLock` refreshes its file's modification time."""

LEASE_S = 600.0
"""A lock from another host whose file has not been refreshed for this long is taken to be left by a dead run."""


class FolderLock:
    """Marks a folder as used by one run: a lock file holding the run's id, host, process and start time.

    :meth:`acquire` creates the file exclusively and starts a daemon thread that refreshes the file's modification
    time every :data:`HEARTBEAT_S` seconds (a lease), through long saves and validation alike. A lock left behind is
    taken over, with a warning: on this host when its process is gone (or is an earlier fit of this very process);
    from another host (a job requeued on another node) when its lease has not been refreshed for :data:`LEASE_S`
    seconds. A live one is refused with a message that names the folder and the run holding it. :meth:`release`
    stops the heartbeat and removes the file if it is still this lock's.

    Args:
        folder: The folder to lock (created if missing).
        run_id: The id of the run taking it.
        lease_s: How long another host's lock may go unrefreshed before it is taken over.
        heartbeat_s: How often the held lock is refreshed; less than ``lease_s``.
        alive: Asked at each heartbeat; once it returns ``False`` (the run stopped without releasing, e.g. on an
            exception in a notebook) the lock is released.

    Example:
        >>> import tempfile
        >>> lock = FolderLock(tempfile.mkdtemp(), run_id="abc")
        >>> lock.acquire()
        >>> lock.release()
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        run_id: str,
        lease_s: float = LEASE_S,
        heartbeat_s: float = HEARTBEAT_S,
        alive: Callable[[], bool] | None = None,
    ) -> None:
        if not 0 < heartbeat_s < lease_s:
            raise ValueError(
                f"heartbeat_s={heartbeat_s!r}, lease_s={lease_s!r}; allowed: 0 < heartbeat_s < lease_s (seconds)"
            )
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.run_id = run_id
        self.lease_s = float(lease_s)
        self._record: dict[str, Any] = {
            "run_id": run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "process": _PROCESS_TOKEN,
            "started": time.time(),
            "heartbeat_s": float(heartbeat_s),
        }
        self._alive = alive
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _holder(self) -> dict[str, Any] | None:
        try:
            record = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable: a lock all the same, but with nothing to say about its holder
        return record if isinstance(record, dict) else {}

    def _ours(self, holder: Mapping[str, Any] | None) -> bool:
        return holder is not None and holder.get("process") == _PROCESS_TOKEN and holder.get("pid") == os.getpid()

    def _stale(self, holder: Mapping[str, Any]) -> str | None:
        # Why the holder is gone, or None when it may be alive.
        pid = holder.get("pid")
        if holder.get("host") == socket.gethostname() and isinstance(pid, int):
            if pid == os.getpid() and holder.get("process") == _PROCESS_TOKEN:
                return "an earlier fit of this process left it"
            if not _pid_alive(pid):
                return f"its process {pid} is gone"
            return None
        if "heartbeat_s" not in holder:
            return None  # no lease to judge another machine's process by
        try:
            idle = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        if idle > self.lease_s:
            return f"it was last refreshed {idle:.0f} s ago (lease {self.lease_s:.0f} s)"
        return None

    def acquire(self) -> None:
        """Takes the lock, or raises ``RuntimeError`` naming the run that holds it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a lost race with another taker is retried, then reported as held
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    continue  # released in the meantime
                why = self._stale(holder)
                if why is not None:
                    rank_zero_warn(
                        f"taking over the lock of checkpoint folder {str(self.folder)!r} from run"
                        f" {holder.get('run_id', '?')} on {holder.get('host', '?')}: {why}."
                    )
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()
                    continue
                since = holder.get("started")
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, float) else "?"
                raise RuntimeError(
                    f"checkpoint folder {str(self.folder)!r} is in use by another run (run {holder.get('run_id', '?')},"
                    f" process {holder.get('pid', '?')} on {holder.get('host', '?')}, started {when}); two runs sharing"
                    " it would overwrite each other's last.ckpt. Give this run its own checkpoint folder"
                    f" (ModelCheckpoint dirpath), or, if that run is no longer running, delete {str(self.path)!r}"
                    f" (a lock from another host is taken over once unrefreshed for {self.lease_s:.0f} s)."
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(self._record, f)
            self._start_heartbeat()
            return
        raise RuntimeError(f"could not lock checkpoint folder {str(self.folder)!r}: {str(self.path)!r} keeps changing")

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        interval = float(self._record["heartbeat_s"])

        def beat() -> None:
            while not self._stop.wait(interval):
                holder = self._holder()
                if not self._ours(holder):
                    return  # taken over or removed: not ours to refresh
                if self._alive is not None and not self._alive():
                    if holder is not None and holder.get("run_id") == self.run_id:
                        with contextlib.suppress(FileNotFoundError):
                            self.path.unlink()
                    return
                with contextlib.suppress(OSError):
                    os.utime(self.path)

        self._thread = threading.Thread(target=beat, name=f"lit_accel lock {self.folder.name}", daemon=True)
        self._thread.start()

    def retag(self, run_id: str) -> None:
        """Records another run id in a held lock (a resume that learns its run's id after taking the lock)."""
        if run_id == self.run_id:
            return
        if self._ours(self._holder()):
            self._record["run_id"] = run_id
            tmp = self.path.with_name(f"{LOCK_NAME}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self._record))
            os.replace(tmp, self.path)
        self.run_id = run_id

    def release(self) -> None:
        """Stops the heartbeat and removes the lock file if it is still this lock's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        holder = self._holder()
        if self._ours(holder) and holder is not None and holder.get("run_id") == self.run_id:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


FREE_CALLBACKS = frozenset({"FusedKernels", "Throughput"})
"""Callbacks whose settings only change speed or reporting: left out of the stamp."""


def technique_settings(callbacks: Iterable[Any]) -> dict[str, dict[str, Any]]:
    """Each callback that carries lit_accel settings (a dataclass ``settings``), by class name.

    Callbacks in :data:`FREE_CALLBACKS` are left out; a second callback of one class is named ``Class#2``.
    """
    out: dict[str, dict[str, Any]] = {}
    for callback in callbacks:
        settings = getattr(callback, "settings", None)
        cls = type(callback).__name__
        if cls in FREE_CALLBACKS or not dataclasses.is_dataclass(settings) or isinstance(settings, type):
            continue
        name, k = cls, 1
        while name in out:
            k += 1
            name = f"{cls}#{k}"
        out[name] = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
    return out


_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "architectures",
        "attn_implementation",
        "dtype",
        "torch_dtype",
        "transformers_version",
        "use_cache",
        # special-token ids follow the tokenizer (stamped with the data settings); a preset's own are replaced by
        # the tokenizer's at set-up, after the CLI's early resume check has read them
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    }
)


def architecture(config: Any) -> dict[str, Any] | None:
    """A Hugging Face config as a plain dict without the keys that do not change the network (paths, versions,
    dtype, attention backend, cache), or ``None`` when ``config`` has no ``to_dict``."""
    to_dict = getattr(config, "to_dict", None)
    if not callable(to_dict):
        return None
    return {k: v for k, v in to_dict().items() if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS}


def run_stamp_of(trainer: Any, module: Any, run_id: str, datamodule: Any = None) -> dict[str, Any]:
    """:func:`run_stamp` of a Lightning run: ``module.hparams``, the data module's hparams, the technique callbacks.

    ``datamodule`` stands in for ``trainer.datamodule`` before ``fit`` attaches it. The module's ``model`` argument
    (a preset name or a directory, which may move between machines) is compared
    through the network it builds: the module's Hugging Face ``config`` (:func:`architecture`) joins its hparams.
    """
    datamodule = datamodule if datamodule is not None else getattr(trainer, "datamodule", None)
    data = dict(getattr(datamodule, "hparams", {}) or {}) if datamodule is not None else None
    hparams = dict(getattr(module, "hparams", {}) or {})
    arch = architecture(getattr(module, "config", None))
    if arch is not None:
        hparams["architecture"] = arch
    return run_stamp(hparams, data, technique_settings(trainer.callbacks), run_id)


def _matching_neighbours(ckpt_path: Any, now: Mapping[str, Any]) -> list[Path]:
    # Only on the error path: the other .ckpt files of the folder whose stamp matches this run, newest first
    # (ModelCheckpoint versions a second run's names, last-v1.ckpt, so `--ckpt_path last` may pick another run's).
    try:
        path = Path(ckpt_path)
        candidates = sorted(
            (p for p in path.parent.glob("*.ckpt") if p.is_file() and p != path),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
    except (OSError, TypeError):
        return []
    found = []
    for candidate in candidates[:20]:
        try:
            record = load_checkpoint_file(candidate, mmap=True, verify=False).get("lit_accel", {}).get("run")
        except (ValueError, OSError, RuntimeError):
            continue
        if isinstance(record, dict) and not stamp_differences(record, now):
            found.append(candidate)
    return found


def check_resume(saved: Mapping[str, Any], now: Mapping[str, Any], run_checks: str, ckpt_path: Any) -> None:
    """Refuses (``run_checks="error"``) or warns about resuming a checkpoint written by a run that computed otherwise.

    Raises:
        ValueError: Naming the checkpoint and every difference, when ``run_checks`` is ``"error"``.
    """
    differences = stamp_differences(saved, now)
    if not differences:
        return
    matching = [p.name for p in _matching_neighbours(ckpt_path, now)]
    hint = f" This configuration's own checkpoints beside it: {', '.join(matching)}." if matching else ""
    message = (
        f"the checkpoint {str(ckpt_path)!r} was written by another run (run {saved.get('run_id', '?')}) than this"
        " one's configuration: " + "; ".join(differences) + ". Resuming it would continue that run's weights and"
        " optimizer under this run's settings." + hint + " Resume with the configuration it was trained with, or"
        " start this run fresh in its own checkpoint folder (or set the module's run_checks='warn' to resume"
        " anyway)."
    )
    if run_checks == "error":
        raise ValueError(message)
    rank_zero_warn(message)


def _while_running(trainer: Any) -> Callable[[], bool]:
    # A weak reference: the heartbeat thread must not keep a finished trainer (and its model) alive.
    ref = weakref.ref(trainer)

    def alive() -> bool:
        t = ref()
        status = getattr(getattr(t, "state", None), "status", None)
        return t is not None and getattr(status, "value", status) in ("running", "initializing", None)

    return alive


def guard_checkpoint_folders(trainer: Any, run_id: str) -> list[FolderLock]:
    """Locks each ``ModelCheckpoint`` folder for this run, refusing folders a live run is using.

    Rank zero takes the locks (the folders are shared); every rank raises the same error, so none waits for the
    others. (A fresh run never overwrites an earlier run's files in its folder: ``ModelCheckpoint`` versions the
    names, ``last-v1.ckpt``, and a resume from another configuration's checkpoint is refused by :func:`check_resume`.)

    Args:
        trainer: The Lightning trainer, at ``on_fit_start``.
        run_id: This run's id (written into the lock).

    Returns:
        The locks taken (on rank zero); release them when the fit ends.

    Raises:
        RuntimeError: When a folder is in use by another run.
    """
    locks: list[FolderLock] = []
    problem = None
    if getattr(trainer, "is_global_zero", True):
        for callback in getattr(trainer, "checkpoint_callbacks", []):
            dirpath = getattr(callback, "dirpath", None)
            if not dirpath:
                continue
            lock = FolderLock(dirpath, run_id, alive=_while_running(trainer))
            try:
                lock.acquire()
            except RuntimeError as err:
                problem = str(err)
                break
            locks.append(lock)
    problem = trainer.strategy.broadcast(problem)
    if problem is not None:
        for lock in locks:
            lock.release()
        raise RuntimeError(problem)
    return locks
