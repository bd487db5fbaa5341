"""Hugging Face model directories on disk: write one atomically, read every weight file of one, fingerprint one.

Every technique that hands back a plain Hugging Face model (exports of pruned, factorised, merged-LoRA and 2:4
models, PEFT adapters) writes it through :func:`write_directory` (:func:`save_hf_directory` for a model), so all of
them share its rules:

* **Atomic.** The files are written into a temporary folder beside the destination, which is then renamed into
  place: a reader (or a crash, or a kill) sees no folder or a complete one, never a half-written one. The folder of
  an export killed mid-write is removed by the next export to the same destination.
* **One writer.** An export holds a lock (``.<name>.lit_accel-lock`` beside the destination) from its check to its
  rename; a second export to the same destination meanwhile fails at once, naming the process that holds it. The
  final rename never replaces a folder that is not empty, so two writers without a working lock still cannot both
  succeed.
* **Records what it wrote.** Each export lists its files in :data:`EXPORT_MANIFEST`. ``overwrite`` replaces exactly
  those files; the user's other files in the folder are carried into the new folder as they are (hard links, same
  contents and times). Files that look like a model, adapter or tokenizer but that no export recorded (a folder
  written by ``save_pretrained``, or before manifests existed) are refused rather than deleted or mixed with the
  new model.

:func:`model_fingerprint` identifies the model in a directory cheaply enough for multi-GB models (its config, and each
tensor's name, dtype, shape and a digest of a few pages of its bytes), so an adapter-only LoRA checkpoint can tell
whether the folder it rebuilds its base from still holds the model it was trained on.

Example:
    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp()) / "export"
    >>> _ = write_directory(out, overwrite=False, write=lambda tmp: (tmp / "config.json").write_text("{}"))
    >>> sorted(p.name for p in out.iterdir())
    ['config.json', 'lit_accel_export.json']
    >>> write_directory(out, overwrite=False, write=lambda tmp: None)
    Traceback (most recent call last):
    ...
    FileExistsError: output directory '...' exists and is not empty; choose a new path or pass overwrite=True ...
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import glob
import hashlib
import json
import os
import shutil
import socket
import struct
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from safetensors.torch import load_file
from transformers import PreTrainedModel

__all__ = [
    "EXPORT_MANIFEST",
    "check_output_directory",
    "fingerprint_differences",
    "hf_weight_files",
    "model_fingerprint",
    "read_hf_weights",
    "save_hf_directory",
    "write_directory",
]

EXPORT_MANIFEST = "lit_accel_export.json"
"""The file every export writes into its folder: ``{"format": "lit_accel.export", "version": 1, "files": [...]}``,
the paths (relative, ``/``-separated) of the files that export wrote; ``overwrite`` replaces exactly those."""

# Top-level names of the files a model, adapter or tokenizer directory is read from. Such a file that no export
# recorded is refused under `overwrite`: deleting it would destroy something lit_accel did not write, and keeping it
# next to the new export would leave a folder mixing two models (stale shards, another adapter's config).
_MODEL_FILE_PATTERNS = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "*.bin",
    "*.bin.index.json",
    "*.pt",
    "*.pth",
    "adapter_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "chat_template.*",
    "lit_accel_*.json",
)
_TMP_TAG, _OLD_TAG, _LOCK_TAG = "lit_accel-tmp-", "lit_accel-old-", "lit_accel-lock"


# ---------------------------------------------------------------------------------------------------------------
# What a folder holds
# ---------------------------------------------------------------------------------------------------------------


def _entries(folder: Path) -> tuple[list[str], list[str]]:
    """(files, empty folders) under ``folder``, as sorted relative ``/`` paths; a symbolic link counts as a file."""
    files: list[str] = []
    empty: list[str] = []
    for root, dirs, names in os.walk(folder):
        rel = Path(root).relative_to(folder)
        links = [d for d in dirs if (Path(root) / d).is_symlink()]  # os.walk does not descend into them
        files += [(rel / n).as_posix() for n in [*names, *links]]
        if not dirs and not names and root != str(folder):
            empty.append(rel.as_posix())
    return sorted(files), sorted(empty)


def _recorded(folder: Path) -> set[str]:
    """The files the export in ``folder`` recorded writing (empty when it has no readable manifest)."""
    try:
        manifest = json.loads((folder / EXPORT_MANIFEST).read_text())
    except (OSError, ValueError):
        return set()
    if not isinstance(manifest, dict) or manifest.get("format") != "lit_accel.export":
        return set()
    files = manifest.get("files")
    return {f for f in files if isinstance(f, str)} if isinstance(files, list) else set()


def _split(folder: Path) -> tuple[list[str], list[str], list[str]]:
    """(files of the previous export, the user's files, the user's empty folders) in ``folder``."""
    files, empty = _entries(folder)
    recorded = _recorded(folder) | {EXPORT_MANIFEST}
    return [f for f in files if f in recorded], [f for f in files if f not in recorded], empty


def _looks_like_model_file(rel: str) -> bool:
    return "/" not in rel and any(fnmatch.fnmatch(rel, p) for p in _MODEL_FILE_PATTERNS)


def _shown(names: list[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_output_directory(
    out: Path, overwrite: bool, name: str = "output directory", flag: str = "overwrite=True"
) -> None:
    """Refuses an output path an export may not write: one that is not empty unless ``overwrite``, and even then a
    file, a symbolic link, or a folder holding model files that no previous export recorded writing.

    Args:
        out: The destination folder.
        overwrite: Whether a previous export there may be replaced.
        name: What to call ``out`` in messages (e.g. ``--out``).
        flag: How the user passes ``overwrite`` (e.g. ``--overwrite``), for messages.

    Raises:
        FileExistsError: Naming the path (as ``name``), what is in the way and the ways out.

    Example:
        >>> check_output_directory(Path("no/such/dir"), overwrite=False)  # a new path is fine
    """
    if out.is_symlink():
        raise FileExistsError(f"{name} {str(out)!r} is a symbolic link; pass the folder it points to instead.")
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{name} {str(out)!r} is a file, not a folder; choose another path.")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(
            f"{name} {str(out)!r} exists and is not empty; choose a new path or pass {flag} (which replaces only a"
            f" previous export there, the files its {EXPORT_MANIFEST} lists, and keeps your other files)."
        )
    _, theirs, _ = _split(out)
    foreign = [f for f in theirs if _looks_like_model_file(f)]
    if foreign:
        raise FileExistsError(
            f"{name} {str(out)!r} holds model files that no lit_accel export recorded writing (they are not listed"
            f" in its {EXPORT_MANIFEST}): {_shown(foreign)}. {flag} replaces only a previous export's own files, so"
            " these would be neither replaced nor safe to keep beside the new model; move or delete them (or the"
            " folder), or choose another path."
        )


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------


def _take_lock(path: Path, out: Path, name: str) -> int | None:
    """Locks ``path`` (created if missing) and returns its descriptor; None on a file system without locks."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise FileExistsError(
                f"{name} {str(out)!r} is being written by another export right now ({holder}); two exports to one"
                " folder would replace each other. Wait for it to finish, or choose another path."
            ) from None
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                # No locks here: the rename that never replaces a non-empty folder still keeps two exports to a new
                # folder from both succeeding.
                return None
            raise
        # The holder before us may have removed the file between our open and our lock: then we hold a lock on a
        # file nobody else will open, so take the one now at the path instead.
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            os.ftruncate(fd, 0)
            os.write(fd, f"process {os.getpid()} on {socket.gethostname()}".encode())
            return fd
        os.close(fd)


@contextlib.contextmanager
def _export_lock(out: Path, name: str) -> Iterator[None]:
    """Holds ``.<out.name>.lit_accel-lock`` beside ``out`` (an OS lock, so a killed holder leaves none behind)."""
    path = out.parent / f".{out.name}.{_LOCK_TAG}"
    fd = _take_lock(path, out, name)
    try:
        yield
    finally:
        if fd is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            os.close(fd)


def _clear_leftovers(out: Path) -> None:
    """Removes the temporary folders of exports to ``out`` that were killed; runs under the lock (so none is live).

    A temporary folder holds only new files and links to (or copies of) the user's files, whose originals are still
    in ``out``, so it is safe to remove. A folder set aside during a replacement (an export killed between its two
    renames) holds the previous export and the user's files: it is kept, with a warning that names it.
    """
    for left in sorted(out.parent.glob(f".{glob.escape(out.name)}.{_TMP_TAG}*")):
        shutil.rmtree(left, ignore_errors=True)
    for left in sorted(out.parent.glob(f".{glob.escape(out.name)}.{_OLD_TAG}*")):
        rank_zero_warn(
            f"lit_accel: {str(left)!r} was left by an interrupted export to {str(out)!r}; it holds that folder's"
            " previous contents. Move back what you need, then delete it."
        )


def _carry(src: Path, dst: Path, theirs: list[str], empty: list[str], new: set[str]) -> None:
    """Puts the user's files of ``src`` into the new folder ``dst`` (hard links, else copies), refusing clashes."""
    new_dirs = {p.as_posix() for f in new for p in Path(f).parents if p != Path(".")}
    clash = [
        f for f in [*theirs, *empty] if f in new or f in new_dirs or any(p.as_posix() in new for p in Path(f).parents)
    ]
    if clash:
        raise FileExistsError(
            f"output directory {str(src)!r} holds files of yours that the new export would replace: {_shown(clash)}"
            "; move them or choose another path (nothing was changed)."
        )
    for rel in empty:
        (dst / rel).mkdir(parents=True, exist_ok=True)
    for rel in theirs:
        source, target = src / rel, dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
            continue
        try:
            os.link(source, target)
        except OSError:  # a file system without hard links, or a file of another user's we may not link
            shutil.copy2(source, target)


def _discard(old: Path, out: Path, ours: list[str], theirs: list[str]) -> None:
    """Removes the set-aside folder: the previous export's files and the user's (now in ``out`` too), nothing else."""
    for rel in [*ours, *theirs]:
        if rel in ours or (out / rel).exists() or (out / rel).is_symlink():
            with contextlib.suppress(FileNotFoundError):
                (old / rel).unlink()
    for root, _, _ in sorted(os.walk(old), key=lambda w: -len(w[0])):
        with contextlib.suppress(OSError):
            os.rmdir(root)  # only folders left empty; anything that appeared meanwhile keeps its folder
    if old.exists():
        rank_zero_warn(
            f"lit_accel: files appeared in {str(out)!r} while it was being replaced; they were kept in {str(old)!r}."
        )


def _publish(tmp: Path, out: Path, overwrite: bool, new: set[str]) -> None:
    if overwrite and out.is_dir() and any(out.iterdir()):
        ours, theirs, empty = _split(out)
        _carry(out, tmp, theirs, empty, new)
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.{_OLD_TAG}", dir=out.parent))
        old.rmdir()
        out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            old.rename(out)
            raise
        _discard(old, out, ours, theirs)
        return
    try:
        # rename(2) replaces an empty folder but never a non-empty one: if another writer got here first, this fails.
        tmp.rename(out)
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise
        raise FileExistsError(
            f"output directory {str(out)!r} was filled by another process while this export was being written;"
            " it was left as that process wrote it. Choose another path, or pass overwrite to replace it."
        ) from None


def write_directory(
    out: Path,
    overwrite: bool,
    write: Callable[[Path], None],
    name: str = "output directory",
    flag: str = "overwrite=True",
) -> Path:
    """Writes an export folder atomically: ``write(tmp)`` fills a temporary folder beside ``out``, which replaces it.

    A reader sees no folder (or the previous export) or the complete new one, never a half-written one; a failure in
    ``write`` leaves ``out`` as it was and removes the temporary folder. The folder gets :data:`EXPORT_MANIFEST`
    listing the files ``write`` made. With ``overwrite``, a previous export there (the files its manifest lists) is
    replaced and every other file in the folder is kept; without it, a folder that is not empty is refused.
    A concurrent export to the same ``out`` fails (see the module's notes); ``write`` runs while the lock is held.

    Args:
        out: The destination folder.
        overwrite: Replace a previous export at ``out``.
        write: Fills the folder it is given (it may raise to abandon the export; ``out`` is then untouched).
        name: What to call ``out`` in messages (e.g. ``--out``).
        flag: How the user passes ``overwrite``, for messages.

    Returns:
        ``out``.

    Raises:
        FileExistsError: ``out`` cannot be written (see :func:`check_output_directory`), another export is writing
            it, another process filled it meanwhile, or the user's files there clash with the new export's.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _export_lock(out, name):
        _clear_leftovers(out)
        check_output_directory(out, overwrite, name, flag)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{_TMP_TAG}", dir=out.parent))
        try:
            write(tmp)
            new = {f for f in _entries(tmp)[0] if f != EXPORT_MANIFEST}
            manifest = {"format": "lit_accel.export", "version": 1, "files": sorted(new)}
            (tmp / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            tmp.chmod(0o755)  # mkdtemp makes it private; a model directory is meant to be shared
            _publish(tmp, out, overwrite, new | {EXPORT_MANIFEST})
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


@contextlib.contextmanager
def _inference_config(model: PreTrainedModel) -> Iterator[None]:
    # Training turns the KV cache off (it only costs memory there); an exported model is for inference, where
    # generate() without the cache recomputes every prefix, so the written config.json / generation_config.json
    # say use_cache: true. The live model keeps its training setting.
    configs = [c for c in (getattr(model, "config", None), getattr(model, "generation_config", None)) if c is not None]
    before = [getattr(c, "use_cache", None) for c in configs]
    for c in configs:
        c.use_cache = True
    try:
        yield
    finally:
        for c, value in zip(configs, before):
            c.use_cache = value


def _say_if_vocab_exceeds_tokenizer(model: PreTrainedModel, tokenizer: Any | None) -> None:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    try:
        n = len(tokenizer) if tokenizer is not None else None
    except TypeError:
        n = None
    # Vocabularies padded to a multiple of 128 (for fast matmuls) are normal; beyond that, rows no token reaches.
    if isinstance(vocab, int) and n is not None and vocab > -(-n // 128) * 128:
        rank_zero_info(
            f"lit_accel: the model's vocab_size ({vocab}) is larger than its tokenizer ({n} tokens): embedding rows"
            f" {n}..{vocab - 1} are never used. Train with a tokenizer of the model's size (data bpe_vocab_size unset"
            " follows the model) or a model of the tokenizer's (model config_overrides: {vocab_size: ...})."
        )


def save_hf_directory(
    model: PreTrainedModel,
    state: dict[str, torch.Tensor],
    out: Path,
    tokenizer: Any | None,
    overwrite: bool,
    check: Callable[[Path], None] | None = None,
) -> Path:
    """Writes ``model``'s config and the given full ``state`` as safetensors into ``out`` atomically.

    Args:
        model: Whose config (and ``save_pretrained``) to use.
        state: The full state dict to write.
        out: The destination folder (see :func:`write_directory`).
        tokenizer: Anything with ``save_pretrained(directory)`` to write alongside, or None.
        overwrite: Replace a previous export at ``out``.
        check: Called with the complete temporary folder before it is renamed into place (e.g. reload it and compare
            logits); if it raises, ``out`` is left as it was.

    Example:
        >>> save_hf_directory(model, model.state_dict(), Path("out/model"), None, overwrite=False)  # doctest: +SKIP
    """

    def write(tmp: Path) -> None:
        with _inference_config(model):
            model.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if check is not None:
            check(tmp)

    _say_if_vocab_exceeds_tokenizer(model, tokenizer)
    write_directory(out, overwrite, write)
    rank_zero_info(f"lit_accel: wrote Hugging Face model to {out}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------


def hf_weight_files(directory: str | os.PathLike[str]) -> list[Path]:
    """The weight files a Hugging Face model directory is read from: the shards its safetensors index names, else
    ``model.safetensors``, else every ``*.safetensors``, else every ``pytorch_model*.bin`` (empty if none).

    Example:
        >>> hf_weight_files("no/such/dir")
        []
    """
    path = Path(directory)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        # Sharded checkpoints: exactly the shards the index names (a directory may also hold, e.g., a consolidated
        # copy of the same weights).
        return sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    return sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))


def read_hf_weights(directory: str) -> dict[str, torch.Tensor]:
    """Reads every weight file of a Hugging Face model directory (safetensors, or PyTorch bins without unpickling)."""
    files = hf_weight_files(directory)
    if not files:
        raise ValueError(f"model={directory!r} holds no *.safetensors or pytorch_model*.bin weight files.")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix != ".safetensors":
            state.update(torch.load(f, map_location="cpu", weights_only=True))
            continue
        try:
            state.update(load_file(str(f)))
        except Exception as err:  # safetensors' errors do not name the file
            raise ValueError(f"model={directory!r}: weight file {str(f)!r} is not readable ({err})") from err
    return state


# ---------------------------------------------------------------------------------------------------------------
# Fingerprints
# ---------------------------------------------------------------------------------------------------------------

_WINDOW = 4096
"""Bytes of each tensor's data hashed at its start, middle and end (all of it when it is at most three windows)."""
# Config keys that say how a file was written, not which model it holds.
_CONFIG_NOISE = {"transformers_version", "_name_or_path", "_commit_hash", "torch_dtype", "dtype", "use_cache"}
_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _windows(n: int) -> list[tuple[int, int]]:
    if n <= 3 * _WINDOW:
        return [(0, n)]
    mid = n // 2 - _WINDOW // 2
    return [(0, _WINDOW), (mid, mid + _WINDOW), (n - _WINDOW, n)]


def _entry(dtype: str, shape: list[int], chunks: list[bytes]) -> str:
    digest = hashlib.blake2b(digest_size=8)
    for chunk in chunks:
        digest.update(chunk)
    return f"{dtype}{list(shape)}:{digest.hexdigest()}"


def _safetensors_entries(f: Path) -> dict[str, str]:
    with open(f, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
        start = 8 + length
        out: dict[str, str] = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            chunks = []
            for a, b in _windows(end - begin):
                fh.seek(start + begin + a)
                chunks.append(fh.read(b - a))
            out[key] = _entry(info["dtype"], info["shape"], chunks)
    return out


def _bin_entries(f: Path) -> dict[str, str]:
    try:  # memory-mapped: only the pages hashed are read
        state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, ValueError):  # the legacy (non-zip) format cannot be mapped
        state = torch.load(f, map_location="cpu", weights_only=True)
    out: dict[str, str] = {}
    for key, t in state.items():
        if not isinstance(t, torch.Tensor):
            continue
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
        chunks = [raw[a:b].numpy().tobytes() for a, b in _windows(raw.numel())]
        out[key] = _entry(_SAFETENSORS_DTYPES.get(t.dtype, str(t.dtype)), list(t.shape), chunks)
    return out


def model_fingerprint(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """What identifies the model in a Hugging Face directory, cheaply enough to compute at every fit start.

    Its ``config.json`` (less the keys that only say how it was written) and, for every tensor of its weight files
    (:func:`hf_weight_files`), its name, dtype, shape and a digest of three 4 KiB windows of its bytes (start,
    middle, end; all of a small tensor), read straight from the files (safetensors headers give the offsets; a
    PyTorch bin is memory-mapped). For a 7B model that is ~300 tensors, ~4 MB read, where hashing every byte would
    read 14 GB. Another model (another fine-tune, size, dtype or initialisation) changes every trained tensor
    throughout, so it differs in every window; what it does not see is an edit confined to bytes between the
    windows, so it guards against a swapped folder, not a tampered one. The same tensors saved sharded or not, or as
    safetensors rather than a bin, give the same fingerprint.

    Args:
        directory: A Hugging Face model directory.

    Returns:
        ``{"format", "version", "directory" (resolved), "config", "tensors" ({name: "DTYPE[shape]:digest"}),
        "digest"}``; JSON-serialisable, so it can be stored in a checkpoint and compared with
        :func:`fingerprint_differences`.

    Example:
        >>> fp = model_fingerprint("exported/quickstart")  # doctest: +SKIP
        >>> fingerprint_differences(fp, model_fingerprint("exported/quickstart"))  # doctest: +SKIP
        []
    """
    path = Path(directory)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"model directory {str(path)!r} has no readable config.json ({err})") from err
    config = {k: v for k, v in config.items() if k not in _CONFIG_NOISE}
    tensors: dict[str, str] = {}
    for f in hf_weight_files(path):
        try:
            tensors.update(_safetensors_entries(f) if f.suffix == ".safetensors" else _bin_entries(f))
        except (OSError, ValueError, KeyError, struct.error) as err:
            raise ValueError(f"model directory {str(path)!r}: weight file {str(f)!r} is not readable ({err})") from err
    body = json.dumps({"config": config, "tensors": tensors}, sort_keys=True, default=str)
    return {
        "format": "lit_accel.model_fingerprint",
        "version": 1,
        "directory": str(path.resolve()),
        "config": config,
        "tensors": tensors,
        "digest": hashlib.sha256(body.encode()).hexdigest(),
    }


def fingerprint_differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """How two :func:`model_fingerprint` results differ, in words (empty when they describe the same model).

    Example:
        >>> a = {"config": {"hidden_size": 64}, "tensors": {"w": "F32[2]:aa"}, "digest": "1"}
        >>> b = {"config": {"hidden_size": 128}, "tensors": {"w": "F32[2]:bb"}, "digest": "2"}
        >>> fingerprint_differences(a, b)
        ['config hidden_size: 64 then, 128 now', 'weights differ in 1 of 1 tensors: w']
    """
    if saved.get("digest") == now.get("digest"):
        return []
    out: list[str] = []
    c0, c1 = dict(saved.get("config") or {}), dict(now.get("config") or {})
    keys = sorted(k for k in set(c0) | set(c1) if c0.get(k, "<absent>") != c1.get(k, "<absent>"))
    for k in keys[:4]:
        out.append(f"config {k}: {c0.get(k, '<absent>')} then, {c1.get(k, '<absent>')} now")
    if len(keys) > 4:
        out.append(f"... {len(keys) - 4} more config keys")
    t0, t1 = dict(saved.get("tensors") or {}), dict(now.get("tensors") or {})
    gone, added = sorted(set(t0) - set(t1)), sorted(set(t1) - set(t0))
    if gone:
        out.append(f"{len(gone)} tensors gone: {_shown(gone, 3)}")
    if added:
        out.append(f"{len(added)} tensors added: {_shown(added, 3)}")
    both = sorted(set(t0) & set(t1))
    layout = [
        f"{k} {t0[k].split(':')[0]} then, {t1[k].split(':')[0]} now"
        for k in both
        if t0[k].split(":")[0] != t1[k].split(":")[0]
    ]
    if layout:
        out.append("dtype or shape differs: " + _shown(layout, 3))
    content = [k for k in both if t0[k].split(":")[0] == t1[k].split(":")[0] and t0[k] != t1[k]]
    if content:
        out.append(f"weights differ in {len(content)} of {len(both)} tensors: {_shown(content, 3)}")
    return out or ["the fingerprints differ"]
