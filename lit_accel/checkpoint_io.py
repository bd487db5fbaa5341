"""Crash-proof checkpoint writes and verified reads: a Lightning ``CheckpointIO`` and the folder operations the
DeepSpeed strategy uses.

A checkpoint found under its final name is always complete. A file is written to a temporary name in its own folder,
flushed to disk and renamed onto the final name (one atomic step on every POSIX filesystem); a folder (a DeepSpeed
checkpoint) is written under a temporary name and swapped into place the same way. A process killed at any instant
leaves the previous checkpoint intact, plus a temporary that the next save in that folder removes.

Lightning's own ``TorchCheckpointIO`` writes through fsspec's transaction, whose temporary file lives in ``$TMPDIR``:
when that is another filesystem (a tmpfs ``/tmp``, a container volume) the final "move" is a copy, so a kill during
it leaves a truncated ``last.ckpt`` under its final name, and every kill leaves a full-size file in ``$TMPDIR``.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> folder = Path(tempfile.mkdtemp())
    >>> io = AtomicCheckpointIO()
    >>> io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, folder / "last.ckpt")
    >>> io.load_checkpoint(folder / "last.ckpt")["state_dict"]["w"].tolist()
    [1.0, 1.0]
    >>> sorted(p.name for p in folder.iterdir())  # no temporary left beside it
    ['last.ckpt']
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO

from lit_accel.checkpoint import _deepspeed_records, load_checkpoint_file, load_lightning_checkpoint

try:  # POSIX only; without it temporaries are still written and renamed, but never judged stale
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "MANIFEST_NAME",
    "OPTIMIZER_BY_NAME",
    "UNIVERSAL_LATEST",
    "UNIVERSAL_MARKER",
    "UNIVERSAL_SUFFIX",
    "AtomicCheckpointIO",
    "atomic_torch_save",
    "deepspeed_folder_checkpoint",
    "discard_path",
    "held_temporary_folder",
    "new_token",
    "parse_rank_file",
    "publish_folder",
    "remove_stale_temporaries",
    "restore_displaced",
    "saved_world_size",
    "seal_deepspeed_folder",
    "temporary_path",
    "universal_copy",
    "universal_path",
    "use_atomic_checkpoint_io",
    "verify_deepspeed_folder",
]

MANIFEST_NAME = "lit_accel_manifest.json"
"""The file in a DeepSpeed checkpoint folder listing every file of the save with its size (written before
``latest``)."""

# `.<name>.tmp-<pid>-<16 hex>`: a temporary being written (or a folder being deleted); `.<name>.old-<pid>-<16 hex>`:
# the previous folder moved aside for an instant where the filesystem cannot swap two names atomically.
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]{16}$")
# Temporaries this process is writing now: a filesystem that emulates flock with per-process POSIX locks (NFS)
# would let this process's own cleaner lock them, so they are skipped by name too.
_IN_FLIGHT: set[str] = set()
_IN_FLIGHT_LOCK = threading.Lock()


def new_token() -> str:
    """A unique suffix for temporary names: ``<pid>-<16 random hex digits>``."""
    return f"{os.getpid()}-{secrets.token_hex(8)}"


def temporary_path(final: str | os.PathLike[str], token: str, kind: str = "tmp") -> Path:
    """``.<name>.<kind>-<token>`` beside ``final``: hidden, and not ending in the checkpoint's extension, so nothing
    that lists ``*.ckpt`` (``ModelCheckpoint``'s ``last`` lookup, run checks) ever picks it up."""
    path = Path(final)
    return path.parent / f".{path.name}.{kind}-{token}"


# ---------------------------------------------------------------------------------------------------- locks
def _try_lock(fd: int) -> bool | None:
    """An exclusive, non-blocking ``flock`` on ``fd``: True when taken, False when another holder has it, None when
    this filesystem has no locks (then nobody can tell a live temporary from a stale one)."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


def _open_for_lock(path: Path) -> int | None:
    # Files read-write (NFS emulates flock with POSIX write locks, which need it); folders can only be opened read-only.
    try:
        return os.open(path, os.O_RDONLY if path.is_dir() and not path.is_symlink() else os.O_RDWR)
    except OSError:
        return None


def _fsync_dir(folder: Path) -> None:
    # Makes a rename or a new name durable, not only visible; some filesystems cannot open or sync a folder.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Removes a file, a symlink (never what it points to) or a folder tree; a missing path is fine."""
    if path.is_symlink() or not path.is_dir():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def remove_stale_temporaries(folder: str | os.PathLike[str], suffix: str = "") -> list[Path]:
    """Removes what earlier killed saves left in ``folder``: their temporaries, and folders they moved aside.

    Only names of this module's own pattern (``.<name>.tmp-<pid>-<hex>`` / ``.<name>.old-<pid>-<hex>``) whose
    ``<name>`` ends with ``suffix`` are considered, and a temporary is removed only when no process holds its lock:
    every writer holds an exclusive ``flock`` on its temporary until it is renamed into place, and the kernel
    releases it when the writer dies, however it dies. So a save in progress (another thread, another process, a
    process on another machine of a shared filesystem that supports locks) is never disturbed, while a leftover of
    a killed process (whatever its pid, on whatever host) goes. On a filesystem without locks nothing is removed.
    A moved-aside ``.old-`` folder is removed only while its final name exists (else :func:`restore_displaced`
    puts it back).

    Args:
        folder: The checkpoint folder.
        suffix: Only temporaries of checkpoints whose name ends with this (e.g. ``".ckpt"``); ``""`` for all. Not
            only the name being saved: a step checkpoint (``epoch=0-step=100.ckpt``) is never saved again under the
            same name, so its leftover would otherwise stay forever.

    Returns:
        The paths removed.
    """
    removed: list[Path] = []
    try:
        entries = sorted(os.listdir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMPORARY.match(entry)
        if match is None or not match["name"].endswith(suffix):
            continue
        path = Path(folder, entry)
        with _IN_FLIGHT_LOCK:
            if os.path.abspath(path) in _IN_FLIGHT:
                continue
        if match["kind"] == "old":
            if os.path.lexists(Path(folder, match["name"])):
                _remove(path)
                removed.append(path)
            continue
        fd = _open_for_lock(path)
        if fd is None:
            continue
        try:
            if not _try_lock(fd):
                continue
            # Locked by us now; still the same file (not a new one that took a freed name)?
            if os.path.lexists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
                _remove(path)
                removed.append(path)
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def _in_flight(path: Path) -> Iterator[None]:
    key = os.path.abspath(path)
    with _IN_FLIGHT_LOCK:
        _IN_FLIGHT.add(key)
    try:
        yield
    finally:
        with _IN_FLIGHT_LOCK:
            _IN_FLIGHT.discard(key)


# ---------------------------------------------------------------------------------------------------- files
def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj, path)`` such that ``path`` holds either its previous content or all of ``obj``, never part.

    The object is written to ``.<name>.tmp-<pid>-<hex>`` in the destination folder (so the final rename never
    crosses a filesystem), flushed and ``fsync``-ed, renamed onto ``path`` with ``os.replace``, and the folder is
    ``fsync``-ed so the rename survives a power cut. Any exception (a full disk, an interrupt) removes the temporary
    and propagates. Temporaries that killed saves left in the folder are removed first
    (:func:`remove_stale_temporaries`).

    Example:
        >>> import tempfile, torch
        >>> f = Path(tempfile.mkdtemp()) / "w.pt"
        >>> atomic_torch_save({"w": torch.zeros(1)}, f)
        >>> torch.load(f)["w"].tolist()
        [0.0]
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final.parent, final.suffix)
    fd, tmp = _create_locked_temporary(final)
    with _in_flight(tmp):
        try:
            with open(fd, "wb", closefd=False) as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        finally:
            os.close(fd)  # releases the lock, after the rename: a cleaner never sees an unlocked live temporary
    _fsync_dir(final.parent)


def _create_locked_temporary(final: Path) -> tuple[int, Path]:
    for _ in range(100):
        tmp = temporary_path(final, new_token())
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        # A cleaner may lock and delete the new file between its creation and this lock: then it is not ours any
        # more (the name is gone, or is someone else's), and another name is tried.
        if _try_lock(fd) is not False and os.path.lexists(tmp) and os.stat(tmp).st_ino == os.fstat(fd).st_ino:
            return fd, tmp
        os.close(fd)
    raise OSError(errno.EEXIST, f"could not create a temporary file beside {str(final)!r}")


# ---------------------------------------------------------------------------------------------------- folders
@contextlib.contextmanager
def held_temporary_folder(final: str | os.PathLike[str], token: str) -> Iterator[Path]:
    """Creates the temporary folder ``.<name>.tmp-<token>`` beside ``final`` and holds its lock until the block
    ends, so :func:`remove_stale_temporaries` leaves it alone while a save fills it (from any number of processes).
    On an exception the folder is removed and the exception propagates.
    """
    staging = temporary_path(final, token)
    staging.parent.mkdir(parents=True, exist_ok=True)
    staging.mkdir()
    fd = os.open(staging, os.O_RDONLY)
    _try_lock(fd)
    try:
        with _in_flight(staging):
            yield staging
    except BaseException:
        _remove(staging)
        raise
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two names in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``: ext4, xfs, btrfs, tmpfs, overlayfs
    ...); False where the kernel, the C library or the filesystem cannot."""
    if sys.platform != "linux":
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def publish_folder(staging: str | os.PathLike[str], final: str | os.PathLike[str], token: str) -> None:
    """Moves the complete folder ``staging`` to ``final``, replacing what is there, so that at every instant the old
    or the new checkpoint is found under ``final``.

    Every file under ``staging`` is ``fsync``-ed first. Where the filesystem can swap two names atomically, the old
    and the new folder swap places in one step; elsewhere the old one is renamed to ``.<name>.old-<token>`` and the
    new one into place, a gap of one rename during which the old checkpoint is complete under that name and
    :func:`restore_displaced` puts it back. The old checkpoint (a folder, a file or a symlink, which is removed
    itself and never what it points to) is then deleted.
    """
    staging, final = Path(staging), Path(final)
    _fsync_tree(staging)
    old: Path | None = None
    if not os.path.lexists(final):
        os.rename(staging, final)
    elif _exchange(staging, final):
        old = staging  # now holds the previous checkpoint
    else:
        old = temporary_path(final, token, kind="old")
        os.rename(final, old)
        os.rename(staging, final)
    _fsync_dir(final.parent)
    if old is not None:
        _remove(old)


def restore_displaced(final: str | os.PathLike[str]) -> bool:
    """Puts back the checkpoint a save moved aside (``.<name>.old-...``) when it was killed between its two renames,
    if nothing is under ``final``. Returns whether it did."""
    final = Path(final)
    if os.path.lexists(final):
        return False
    try:
        prefix = f".{final.name}.old-"
        candidates = [final.parent / e for e in os.listdir(final.parent) if e.startswith(prefix)]
    except OSError:
        return False
    if not candidates:
        return False
    newest = max(candidates, key=lambda p: p.lstat().st_mtime)
    os.rename(newest, final)
    _fsync_dir(final.parent)
    return True


def discard_path(path: str | os.PathLike[str]) -> None:
    """Deletes a checkpoint folder so that it is never seen half deleted under its name: it is renamed to a
    temporary name first (one atomic step), then removed; a kill during the removal leaves a temporary that the next
    save removes. A file or a symlink is simply unlinked."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    if path.is_dir() and not path.is_symlink():
        doomed = temporary_path(path, new_token())
        os.rename(path, doomed)
        _fsync_dir(path.parent)
        path = doomed
    _remove(path)


def seal_deepspeed_folder(folder: str | os.PathLike[str], tag: str) -> dict[str, int]:
    """Completes a DeepSpeed checkpoint folder that every rank has finished writing: :data:`MANIFEST_NAME` (every
    file under it, relative path -> size in bytes), then DeepSpeed's ``latest`` tag file, each ``fsync``-ed, so a
    folder with a ``latest`` file was complete when it was written.

    Returns:
        The files listed.
    """
    folder = Path(folder)
    files = {
        p.relative_to(folder).as_posix(): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in (MANIFEST_NAME, "latest")
    }
    _write_small_file(folder / MANIFEST_NAME, json.dumps({"files": files}, indent=1))
    _write_small_file(folder / "latest", tag)
    return files


def _write_small_file(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def verify_deepspeed_folder(path: str | os.PathLike[str], name: str = "ckpt_path") -> None:
    """Checks a DeepSpeed checkpoint folder before DeepSpeed unpickles it (which it does without restriction).

    The folder must have its ``latest`` tag (written last by a save), the tag's folder must hold a model-states
    file, every file its :data:`MANIFEST_NAME` lists (folders that lit_accel wrote) must be there at full size, and
    every ``.pt`` file must pass :func:`lit_accel.checkpoint.load_checkpoint_file` (CRC-32 of every record; tensors,
    containers and DeepSpeed's own records only).

    Raises:
        ValueError: Naming the folder (or the file) and what is wrong.
    """
    folder = Path(path)
    latest = folder / "latest"
    if not latest.is_file():
        raise ValueError(
            f"{name} {str(folder)!r} is not a complete DeepSpeed checkpoint: it has no 'latest' file (a save writes"
            " it last, so the save was interrupted or the folder was copied in part); use an earlier checkpoint"
        )
    tag = latest.read_text().strip()
    if not tag or not any((folder / tag).glob("*model_states.pt")):
        raise ValueError(
            f"{name} {str(folder)!r} is not a complete DeepSpeed checkpoint: its 'latest' names {tag!r}, but"
            f" {str(folder / tag)!r} holds no *model_states.pt file"
        )
    manifest = folder / MANIFEST_NAME
    if manifest.is_file():
        try:
            listed: dict[str, int] = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{name} {str(folder)!r}: its {MANIFEST_NAME} is unreadable ({err})") from None
        wrong = []
        for rel, size in listed.items():
            found = (folder / rel).stat().st_size if (folder / rel).is_file() else None
            if found is None:
                wrong.append(f"{rel} is missing")
            elif found != size:
                wrong.append(f"{rel} has {found} bytes, {size} saved")
        if wrong:
            raise ValueError(
                f"{name} {str(folder)!r} is not the checkpoint that was saved: {', '.join(wrong[:5])}"
                + (f" and {len(wrong) - 5} more" if len(wrong) > 5 else "")
            )
    records = _deepspeed_records()
    for f in sorted((folder / tag).rglob("*.pt")):
        load_checkpoint_file(f, mmap=True, name=name, allow=records)


# ------------------------------------------------------------------------- DeepSpeed universal checkpoints
UNIVERSAL_SUFFIX = ".universal"
"""The universal copy of ``<folder>`` is ``<folder>.universal`` beside it (not a ``.ckpt`` name, so nothing that
looks for checkpoints picks it up)."""
UNIVERSAL_MARKER = "lit_accel_universal.json"
"""The file in a universal copy naming its source and the source's fingerprint (written last)."""
UNIVERSAL_LATEST = "latest_universal"  # the tag file DeepSpeed reads when load_universal is on
_OPTIM = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


def universal_path(checkpoint: str | os.PathLike[str]) -> Path:
    """Where the universal copy of a DeepSpeed checkpoint folder lives: ``<folder>.universal`` beside it."""
    path = Path(checkpoint)
    return path.with_name(path.name + UNIVERSAL_SUFFIX)


def parse_rank_file(name: str) -> int | None:
    """The data-parallel rank of a ZeRO optimizer-state file name, or None for any other file."""
    match = _OPTIM.match(name)
    return int(match.group(1)) if match else None


def _tag(folder: Path) -> str:
    return (folder / "latest").read_text().strip()


def saved_world_size(folder: str | os.PathLike[str]) -> int | None:
    """The data-parallel world size a DeepSpeed checkpoint folder was saved with, from its optimizer-state file
    names (one per rank; nothing is read), or None when it holds no ZeRO optimizer state (a module-only save).

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / "latest").write_text("checkpoint")
        10
        >>> (root / "checkpoint").mkdir()
        >>> for r in range(3):
        ...     _ = (root / "checkpoint" / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"")
        >>> saved_world_size(root)
        3
    """
    root = Path(folder)
    ranks = {parse_rank_file(p.name) for p in (root / _tag(root)).iterdir()}
    ranks.discard(None)
    return len(ranks) or None


def _fingerprint(folder: Path) -> str:
    """What identifies one save of ``folder``: its resolved path, its manifest (every file with its size, written last
    by every lit_accel save) with the manifest's modification time, and ``latest``; for a folder without a manifest,
    every file's relative path, size and modification time."""
    digest = hashlib.sha256(str(folder.resolve()).encode())
    manifest = folder / MANIFEST_NAME
    if manifest.is_file():
        # sizes alone repeat from one save to the next under the same name; the manifest's own time does not
        digest.update(manifest.read_bytes() + str(manifest.stat().st_mtime_ns).encode())
    else:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                stat = p.stat()
                digest.update(f"{p.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    digest.update((folder / "latest").read_bytes())
    return digest.hexdigest()


def _matching_copy(copy: Path, fingerprint: str) -> bool:
    marker = copy / UNIVERSAL_MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except ValueError:
        return False
    return bool(info.get("fingerprint") == fingerprint and (copy / UNIVERSAL_LATEST).is_file())


def _verify_copy(copy: Path) -> None:
    """Every ``.pt`` of the copy holds tensors, containers and DeepSpeed's records only (DeepSpeed unpickles them
    without restriction), with every record's CRC-32 intact."""
    records = _deepspeed_records()
    for f in sorted(copy.rglob("*.pt")):
        load_checkpoint_file(f, mmap=True, name="the universal copy", allow=records)


def _convert(source: Path, staging: Path, tag: str) -> None:
    # deferred: importing deepspeed is slow; only a resume on another world size converts
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(
        input_folder=str(source / tag),
        output_folder=str(staging / f"{tag}_universal"),
        num_extract_workers=1,  # in-process: a conversion inside a training process must not fork workers
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # Lightning's engine does not record universal_checkpoint_info; nothing is lost
    )
    chatter = io.StringIO()  # ds_to_universal prints every step; the caller logs one line instead
    with contextlib.redirect_stdout(chatter):
        ds_to_universal.main(args)
    (staging / UNIVERSAL_LATEST).write_text(f"{tag}_universal")


def universal_copy(checkpoint: str | os.PathLike[str]) -> tuple[Path, bool]:
    """The universal copy of a DeepSpeed checkpoint folder, converted now unless a matching one exists.

    Call on one process (rank 0); the others wait. The source folder is only read. DeepSpeed's converter unpickles
    the source's files, so check the source first (``verify_deepspeed_folder``); a reused copy is checked here.

    Args:
        checkpoint: A complete DeepSpeed checkpoint folder (``latest`` tag, ZeRO stage 1, 2 or 3).

    Returns:
        ``(copy, converted)``: the folder to load with DeepSpeed's ``load_universal`` on, and whether it was
        converted now (False: an existing copy of the same save was reused).

    Raises:
        ValueError: The source holds no ZeRO optimizer state, or DeepSpeed cannot convert it (its message kept).
    """
    source = Path(checkpoint)
    tag = _tag(source)
    if saved_world_size(source) is None:
        raise ValueError(
            f"{str(source)!r} holds no ZeRO optimizer state (a weights-only save), so it cannot be converted to"
            " DeepSpeed's universal format; load it on the world size that saved it"
        )
    copy = universal_path(source)
    with _exclusive(copy.with_name(f".{copy.name}.lock")):  # several processes may ask at once (DDP ranks)
        fingerprint = _fingerprint(source)
        if _matching_copy(copy, fingerprint):
            _verify_copy(copy)
            return copy, False
        _convert_into_place(source, copy, tag, fingerprint)
    return copy, True


@contextlib.contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    """Holds an exclusive ``flock`` on ``lock`` for the block (released when the process dies, too)."""
    fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _convert_into_place(source: Path, copy: Path, tag: str, fingerprint: str) -> None:
    staging = temporary_path(copy, new_token())
    staging.mkdir(parents=True)
    try:
        try:
            _convert(source, staging, tag)
        except (AssertionError, RuntimeError, KeyError, ValueError, NotImplementedError) as err:
            raise ValueError(
                f"DeepSpeed could not convert {str(source)!r} to its universal checkpoint format: {err}"
            ) from err
        info: dict[str, Any] = {
            "source": str(source.resolve()),
            "fingerprint": fingerprint,
            "world_size": saved_world_size(source),
            "tag": tag,
        }
        (staging / UNIVERSAL_MARKER).write_text(json.dumps(info, indent=1))
        if copy.exists():
            discard_path(copy)  # a copy of an earlier save under this name
        os.replace(staging, copy)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


OPTIMIZER_BY_NAME = "lit_accel_optimizer_by_name"
"""The key under which :func:`deepspeed_folder_checkpoint` leaves Adam's state by parameter name, for
:func:`lit_accel.resume.fill_optimizer_states` to turn into the torch optimizer's ``optimizer_states``."""


def deepspeed_folder_checkpoint(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """A DeepSpeed checkpoint folder as the Lightning checkpoint a run without DeepSpeed (DDP, one device) resumes.

    The weights are consolidated to fp32 (DeepSpeed's ``zero_to_fp32``, through
    :func:`lit_accel.checkpoint.load_lightning_checkpoint`), Lightning's loop, scheduler, callback and data states
    come as saved, and Adam's moments and step per parameter come from the folder's universal copy
    (:func:`universal_copy`) under :data:`OPTIMIZER_BY_NAME`, with each group's hyperparameters: the torch
    optimizer's ``optimizer_states`` are indexed by its own parameter order, which only the resumed run knows
    (``CausalLM`` fills them in ``on_fit_start``; ``optimizer_states`` is empty until then).

    Raises:
        ValueError: The folder is incomplete or damaged (:func:`verify_deepspeed_folder`), or cannot be converted.
    """
    path = Path(folder)
    verify_deepspeed_folder(path)
    checkpoint = load_lightning_checkpoint(path)
    checkpoint["optimizer_states"] = []
    if saved_world_size(path) is None:
        return checkpoint
    copy, _ = universal_copy(path)
    zero = copy / (copy / UNIVERSAL_LATEST).read_text().strip() / "zero"
    records = _deepspeed_records()
    moments: dict[str, dict[str, torch.Tensor]] = {}
    for param_dir in sorted(p for p in zero.iterdir() if p.is_dir()):
        entry = {}
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if (param_dir / f"{key}.pt").is_file():
                value = load_checkpoint_file(param_dir / f"{key}.pt", name="the universal copy", allow=records)
                entry[key] = value["param"] if isinstance(value, dict) else value
        if "exp_avg" in entry:
            moments[param_dir.name] = entry
    groups = load_checkpoint_file(zero / "optimizer_state.pt", name="the universal copy", allow=records)
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in groups["param_groups"]]
    # ZeRO-3's universal copy keeps Adam's step once, in the wrapped torch optimizer's state, not per parameter
    inner_states = (groups.get("optimizer_state_dict") or {}).get("state") or {}
    step = next((s["step"] for s in inner_states.values() if "step" in s), None)
    for entry in moments.values():
        if "step" not in entry and step is not None:
            entry["step"] = step
    checkpoint[OPTIMIZER_BY_NAME] = {"moments": moments, "param_groups": hyper}
    return checkpoint


# ---------------------------------------------------------------------------------------------------- Lightning
class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with crash-proof writes and verified reads; same file format.

    ``save_checkpoint`` writes with :func:`atomic_torch_save`: a kill at any instant leaves the previous checkpoint
    intact under its name, and no temporary outside the checkpoint's folder. ``load_checkpoint`` reads with
    :func:`lit_accel.checkpoint.load_checkpoint_file`: tensors and plain containers only (a request to unpickle
    arbitrary objects is not honoured: list the classes a checkpoint legitimately holds in ``allow``), every
    record's CRC-32 checked, so
    a truncated, empty or bit-flipped ``ckpt_path`` fails with a ``ValueError`` naming the file instead of loading
    or crashing somewhere inside ``torch.load``. Remote paths (``s3://`` ...) go through ``TorchCheckpointIO``
    unchanged except that their loads are ``weights_only``.

    Args:
        allow: Classes or functions a checkpoint may hold besides tensors and plain containers.

    Example:
        ``Trainer(plugins=[AtomicCheckpointIO()])``, or :func:`use_atomic_checkpoint_io` on a built trainer.
    """

    def __init__(self, allow: Sequence[Any] = ()) -> None:
        super().__init__()
        self.allow = list(allow)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(
                f"`Trainer.save_checkpoint(..., storage_options=...)` is not supported by {type(self).__name__};"
                " pass a CheckpointIO that uses storage_options."
            )
        if not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path)
            return
        atomic_torch_save(checkpoint, _local(path))

    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Callable[..., Any] | Any = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if not _is_local_file_protocol(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        local = _local(path)
        if not local.exists():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        if local.is_dir() and (local / "latest").is_file():  # a DeepSpeed folder, resumed without DeepSpeed
            return deepspeed_folder_checkpoint(local)
        try:
            return load_checkpoint_file(local, name="ckpt_path", allow=self.allow, map_location=map_location)
        except ValueError as err:
            if "holds objects other than" not in str(err):
                raise
            raise ValueError(
                f"{err}. If the file is yours and that class is safe to rebuild, allow it:"
                " AtomicCheckpointIO(allow=[TheClass])"
            ) from None


def _local(path: _PATH) -> Path:
    return Path(str(path).removeprefix("file://"))


def use_atomic_checkpoint_io(trainer: Any) -> bool:
    """Makes ``trainer`` save and load through :class:`AtomicCheckpointIO` where it uses Lightning's plain default.

    "Default" means the strategy's CheckpointIO is exactly ``TorchCheckpointIO`` (what Lightning creates when none
    is given; the same class given explicitly behaves identically and is replaced too), directly or inside a
    wrapper such as ``AsyncCheckpointIO``. Any other CheckpointIO, a subclass included (e.g. XLA's), is the user's
    choice and is kept. Strategies read ``strategy.checkpoint_io`` at every save and load, so calling this in
    ``LightningModule.setup`` (before Lightning restores ``ckpt_path`` and before any save, on every rank) is in
    time. DeepSpeed folders are written by :class:`lit_accel.strategies.LitDeepSpeedStrategy` itself.

    Returns:
        Whether this call installed it (False: already installed, or another CheckpointIO kept).
    """
    strategy = trainer.strategy
    current = strategy.checkpoint_io  # creates Lightning's default (or the wrapper's base) if none was given yet
    if isinstance(current, _WrappingCheckpointIO):
        if type(current.checkpoint_io) is not TorchCheckpointIO:
            return False
        # The wrapper's setter keeps a base that is already configured, so the attribute is set directly.
        current._checkpoint_io = AtomicCheckpointIO()
        return True
    if type(current) is not TorchCheckpointIO:
        return False
    strategy.checkpoint_io = AtomicCheckpointIO()
    return True
