"""A multi-domain DataModule for dynamic batch loading (Sheared LLaMA, Xia et al. 2023, Alg. 1): its domain weights
follow the per-domain validation loss against a reference loss.

Domains are named corpora. Each is a corpus accepted by :func:`~lit_accel.data.load_documents` (``"stdlib"``, a
file, a folder), or a slice of the embedded corpus: ``"stdlib:<name>[,<name>...]"`` selects top-level standard-library
packages or modules (``"stdlib:email,html,json"``: ``email/``, ``html/``, ``json/``, or ``json.py``), and
``"stdlib:*"`` means every top-level package/module *not* named by another domain's ``stdlib:`` list (the "rest").

One byte-level BPE is trained on the union of all domains; each domain is tokenised into its own cached shards.
Every training batch draws its ``batch_size`` domains i.i.d. from the current weights, with a generator seeded by
``(seed, step)``: all ranks draw the same domains, and take disjoint sequences of them (rank ``r`` takes element
``k * world_size + r`` of the domain's shuffled order, ``k`` counting that domain's draws so far).

Updates (:func:`update_domain_weights`) are applied by the :class:`~lit_accel.data.DynamicBatchLoading` callback
(:mod:`lit_accel.data.dynamic_batch`) every ``update_every`` optimizer steps, from losses it measures itself on each
domain's validation split.

**Reference losses** (``MultiDomainDataModule(reference_losses=...)``), the per-domain losses the update compares
against, come from one of:

* a dict ``{domain: loss}`` given in the config: the paper's choice, the losses of a reference model (for pruning:
  what a model of the target size reaches, e.g. predicted by a scaling law or measured on a model trained from
  scratch at that size);
* ``"initial"``: :class:`~lit_accel.data.DynamicBatchLoading` measures each domain's validation loss of the model as
  it is when training starts, before the first step. For a pruning run these are the *source* model's losses (the
  masks are switched off while measuring, through ``StructuredPruning.bypass``), so the weights shift towards the
  domains that pruning has hurt the most. They are saved in checkpoints (a resumed run keeps them) and logged as
  ``data/reference_loss/<domain>``;
* the path of a checkpoint of a run that had them (either way): :func:`reference_losses_from_checkpoint` reads them,
  e.g. to continue pre-training a pruned model against the source model's losses.

Example:
    >>> import lightning as L
    >>> from lit_accel.data import MultiDomainDataModule, DynamicBatchLoading
    >>> dm = MultiDomainDataModule(
    ...     {"text": "stdlib:email,html,xml", "net": "stdlib:asyncio,http,urllib", "rest": "stdlib:*"},
    ...     reference_losses={"text": 2.0, "net": 2.1, "rest": 2.3}, update_every=50)
    >>> dm = MultiDomainDataModule({"net": "stdlib:asyncio,http", "rest": "stdlib:*"}, reference_losses="initial")
    >>> trainer = L.Trainer(callbacks=[DynamicBatchLoading()])  # doctest: +SKIP
    >>> trainer.fit(model, datamodule=dm)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import sysconfig
import warnings
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lit_accel.checkpoint import deepspeed_client_state_file, load_checkpoint_file
from lit_accel.data.corpus import (
    STDLIB,
    cap_bytes,
    corpus_fingerprint,
    load_documents,
    stdlib_corpus_files,
    validate_corpus,
)
from lit_accel.data.datamodule import (
    DEFAULT_BPE_TRAIN_BYTES,
    ShardedSequentialSampler,
    TextDataModule,
    _key,
    _ResumableDataLoader,
)
from lit_accel.data.shards import SHARD_FORMAT_VERSION, PackedTokenDataset, TokenShards, build_shards
from lit_accel.data.tokenizer import bpe_training_texts, hash_tokenizer_dir, load_tokenizer, train_bpe_tokenizer

__all__ = [
    "INITIAL",
    "DomainBatchSampler",
    "MultiDomainDataModule",
    "reference_losses_from_checkpoint",
    "update_domain_weights",
]

_STDLIB_PREFIX = "stdlib:"
_REST = "*"
_TOKENIZER_FORMAT_VERSION = 1
INITIAL = "initial"
"""``reference_losses="initial"``: measure them on the model when training starts (see the module docstring)."""


def reference_losses_from_checkpoint(ckpt: str | os.PathLike[str]) -> dict[str, float]:
    """The reference losses saved in a checkpoint by a :class:`MultiDomainDataModule` (given or measured).

    Args:
        ckpt: A Lightning ``.ckpt`` file or a DeepSpeed checkpoint folder. It is read memory-mapped, so the
            weights are not loaded.

    Raises:
        ValueError: The path does not exist, is not a checkpoint, or holds no reference losses.

    Example:
        >>> reference_losses_from_checkpoint("runs/prune/checkpoints/last.ckpt")  # doctest: +SKIP
        {'tests': 2.31, 'net': 2.87, 'runtime': 2.65, 'rest': 2.74}
    """
    path = Path(ckpt)
    states = deepspeed_client_state_file(path) if path.is_dir() else path
    files = [states] if states is not None else []
    if not path.exists() or not files:
        raise ValueError(
            f"reference_losses={str(ckpt)!r} is neither 'initial' nor an existing checkpoint (a Lightning .ckpt "
            "file or a DeepSpeed checkpoint folder of a run with a MultiDomainDataModule)."
        )
    checkpoint = load_checkpoint_file(files[0], mmap=True, name="reference_losses")
    for value in checkpoint.values() if isinstance(checkpoint, dict) else ():
        if isinstance(value, dict) and "schedule" in value and isinstance(value.get("reference_losses"), dict):
            return {str(k): float(v) for k, v in value["reference_losses"].items()}
    raise ValueError(
        f"reference_losses={str(ckpt)!r}: the checkpoint holds no reference losses (no MultiDomainDataModule state "
        "with 'reference_losses'; with reference_losses='initial' they exist once training has started)."
    )


def update_domain_weights(
    weights: Sequence[float],
    losses: Sequence[float],
    reference_losses: Sequence[float],
    eta: float = 1.0,
    smoothing: float = 1e-4,
    clip: bool = True,
) -> list[float]:
    """One dynamic-batch-loading update of the domain weights (Sheared LLaMA, Alg. 1).

    ``excess = max(loss - ref, 0)``; ``w' = softmax(log w + eta * excess)`` (i.e. ``w * exp(eta * excess)``
    normalised); ``w'' = (1 - smoothing) * w' + smoothing / k``, renormalised in float64.

    The paper clips the excess at 0 (a domain already below its reference loss is not down-weighted for it); the
    LLM-Shearing code (``DynamicLoadingCallback.update_proportion``, ``"doremi"``) uses the signed difference.
    ``clip=False`` gives that form. ``eta=1`` and ``smoothing=1e-4`` are the defaults of both (from DoReMi).

    Args:
        weights: current weights (non-negative, summing to 1).
        losses: current per-domain losses.
        reference_losses: per-domain reference (target) losses.
        eta: step size (> 0).
        smoothing: mixing weight ``c`` of the uniform distribution, in [0, 1].
        clip: clip the excess loss at 0 (the paper) or not (the reference code).

    Returns:
        The new weights (sum 1).

    Example:
        >>> [round(w, 4) for w in update_domain_weights([0.5, 0.5], [3.0, 2.0], [2.0, 2.0], smoothing=0.0)]
        [0.7311, 0.2689]
    """
    k = len(weights)
    if k == 0 or len(losses) != k or len(reference_losses) != k:
        raise ValueError(
            f"weights, losses and reference_losses must have the same non-zero length; got {k}, {len(losses)}, "
            f"{len(reference_losses)}."
        )
    _check_weights(weights, "weights")
    if not eta > 0:
        raise ValueError(f"eta={eta} must be > 0.")
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"smoothing={smoothing} must be in [0, 1].")
    if not all(math.isfinite(x) for x in chain(losses, reference_losses)):
        raise ValueError(f"losses={list(losses)} and reference_losses={list(reference_losses)} must be finite.")
    w = torch.tensor(list(weights), dtype=torch.float64)
    diff = torch.tensor(list(losses), dtype=torch.float64) - torch.tensor(list(reference_losses), dtype=torch.float64)
    if clip:
        diff = diff.clamp(min=0.0)
    new = torch.softmax(torch.log(w) + eta * diff, dim=0)  # log(0) = -inf keeps a zero weight at zero
    new = (1.0 - smoothing) * new + smoothing / k
    return (new / new.sum()).tolist()


def _check_weights(weights: Sequence[float], name: str) -> None:
    if any(not math.isfinite(w) or w < 0 for w in weights) or not math.isclose(sum(weights), 1.0, abs_tol=1e-6):
        raise ValueError(f"{name}={list(weights)} must be non-negative and sum to 1.")


# ------------------------------------------------------------------------------------------------- domain corpora
def _stdlib_top_level() -> dict[str, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    groups: dict[str, list[Path]] = {}
    for f in stdlib_corpus_files():
        first = f.relative_to(root).parts[0]
        groups.setdefault(first.removesuffix(".py"), []).append(f)
    return groups


def _parse_domains(domains: dict[str, str | list[str]]) -> dict[str, list[str]]:
    """Normalise to ``{name: [spec, ...]}`` and validate every spec (naming the argument on error)."""
    if not isinstance(domains, dict) or not domains:
        raise ValueError(f"domains={domains!r} must be a non-empty dict of name -> corpus spec(s).")
    out: dict[str, list[str]] = {}
    top: dict[str, list[Path]] | None = None
    for name, spec in domains.items():
        specs = [spec] if isinstance(spec, str) else [str(s) for s in spec]
        if not isinstance(name, str) or not name or not specs:
            raise ValueError(f"domains[{name!r}]={spec!r}: need a non-empty name and at least one corpus spec.")
        for s in specs:
            if s.startswith(_STDLIB_PREFIX):
                top = top if top is not None else _stdlib_top_level()
                pkgs = [p.strip() for p in s[len(_STDLIB_PREFIX) :].split(",") if p.strip()]
                unknown = [p for p in pkgs if p != _REST and p not in top]
                if not pkgs or unknown:
                    raise ValueError(
                        f"domains[{name!r}]={spec!r}: unknown standard-library package(s) {unknown or pkgs}; use "
                        f"'stdlib:<top-level package or module>[,...]' (e.g. 'stdlib:json,email') or 'stdlib:*'."
                    )
            else:
                try:
                    validate_corpus(s)
                except ValueError as e:
                    raise ValueError(f"domains[{name!r}]: {e}") from None
        out[str(name)] = specs
    return out


def _claimed_stdlib(domains: dict[str, list[str]]) -> set[str]:
    claimed: set[str] = set()
    for specs in domains.values():
        for s in specs:
            if s.startswith(_STDLIB_PREFIX):
                claimed.update(p.strip() for p in s[len(_STDLIB_PREFIX) :].split(",") if p.strip() != _REST)
    return claimed


def _iter_stdlib_subset(packages: set[str], rest_excluding: set[str] | None) -> Iterator[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for top, files in sorted(_stdlib_top_level().items()):
        if top in packages or (rest_excluding is not None and top not in rest_excluding):
            for f in files:
                text = f.read_bytes().decode("utf-8", errors="replace")
                if text:
                    yield f.relative_to(root).as_posix(), text


def _domain_documents(
    specs: list[str], claimed: set[str], text_field: str, max_corpus_bytes: int | None
) -> Iterator[tuple[str, str]]:
    """The documents of one domain, names prefixed by the spec index (unique), cut at ``max_corpus_bytes``."""

    def all_docs() -> Iterator[tuple[str, str]]:
        for i, s in enumerate(specs):
            if s.startswith(_STDLIB_PREFIX):
                pkgs = {p.strip() for p in s[len(_STDLIB_PREFIX) :].split(",") if p.strip()}
                docs: Iterable[tuple[str, str]] = _iter_stdlib_subset(
                    pkgs - {_REST}, claimed if _REST in pkgs else None
                )
            else:
                docs = load_documents(s, text_field)
            for name, text in docs:
                yield f"{i}/{name}", text

    yield from cap_bytes(all_docs(), max_corpus_bytes)


# ------------------------------------------------------------------------------------------------------ sampling
def _mix(*parts: Any) -> int:
    digest = hashlib.sha256("\0".join(["lit_accel-domains", *map(str, parts)]).encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


class _MultiDomainDataset(Dataset[dict[str, torch.Tensor]]):
    """Takes a list of ``(domain, index)`` pairs and returns the collated batch with a ``"domain"`` id tensor."""

    def __init__(self, datasets: list[PackedTokenDataset]) -> None:
        self.datasets = datasets

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)

    def __getitem__(self, pairs: Any) -> dict[str, torch.Tensor]:
        ids = [self.datasets[d][i]["input_ids"] for d, i in pairs]
        return {"input_ids": torch.stack(ids), "domain": torch.tensor([d for d, _ in pairs], dtype=torch.long)}


class DomainBatchSampler(DistributedSampler):
    """Yields one batch per step as a list of ``(domain, index)`` pairs, domains drawn from the current weights.

    Step ``s`` (counted over epochs: ``epoch * len(self) + batch``) draws ``batch_size`` domains with
    ``torch.multinomial`` from a generator seeded by ``(seed, s)`` using the weights in force at ``s``: the last
    entry ``(from_step, weights)`` of ``schedule`` with ``from_step <= s``. The same draws happen on every rank.
    Domain ``d``'s ``k``-th draw overall takes element ``(k mod m) * world_size + rank`` of a permutation of its
    sequences seeded by ``(seed, d, k // m)``, where ``m = size_d // world_size``; so ranks get disjoint
    sequences, and each domain's sequences are all used before any is repeated.

    It subclasses ``DistributedSampler`` (each "index" is a whole batch; use it with ``batch_size=None``), so that
    Lightning does not wrap it in another distributed sampler.

    Args:
        sizes: number of training sequences per domain.
        batch_size: sequences per batch and rank.
        schedule: list of ``(from_step, weights)``, sorted, first ``from_step`` 0; shared, may grow while iterating.
        steps_per_epoch: ``len(self)``.
        seed: base seed, identical on all ranks.
        rank: this rank.
        world_size: number of ranks.

    Example:
        >>> s = DomainBatchSampler([10, 10], 2, [(0, [1.0, 0.0])], steps_per_epoch=3)
        >>> [d for d, _ in next(iter(s))]
        [0, 0]
    """

    def __init__(
        self,
        sizes: Sequence[int],
        batch_size: int,
        schedule: list[tuple[int, list[float]]],
        steps_per_epoch: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size}).")
        if batch_size < 1 or steps_per_epoch < 1:
            raise ValueError(f"batch_size={batch_size} and steps_per_epoch={steps_per_epoch} must be >= 1.")
        if any(n < world_size for n in sizes):
            raise ValueError(f"every domain needs at least world_size={world_size} sequences; sizes={list(sizes)}.")
        super().__init__(range(steps_per_epoch), num_replicas=world_size, rank=rank, shuffle=False, seed=seed)  # type: ignore[arg-type]
        self.sizes = [int(n) for n in sizes]
        self.batch_size = batch_size
        self.schedule = schedule
        self.steps_per_epoch = steps_per_epoch
        self.world_size = world_size
        self.next_step = 0
        """The next step this sampler will produce (ahead of training by the loader's prefetch)."""
        self._resume: tuple[int, int] | None = None
        self._perms: dict[tuple[int, int], list[int]] = {}

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch the next iteration produces (Lightning calls this every epoch)."""
        self.epoch = epoch

    def resume(self, epoch: int, batches_done: int) -> None:
        """Skip the first ``batches_done`` batches of ``epoch`` when that epoch is iterated."""
        self._resume = (int(epoch), int(batches_done))

    def weights_at(self, step: int) -> list[float]:
        """The weights in force at ``step``."""
        current = self.schedule[0][1]
        for from_step, weights in self.schedule:
            if from_step > step:
                break
            current = weights
        return current

    def draw_domains(self, step: int) -> list[int]:
        """The domains of the batch at global ``step`` (identical on every rank)."""
        g = torch.Generator().manual_seed(_mix(self.seed, "step", step))
        w = torch.tensor(self.weights_at(step), dtype=torch.float64)
        return torch.multinomial(w, self.batch_size, replacement=True, generator=g).tolist()

    def _index(self, domain: int, k: int) -> int:
        m = self.sizes[domain] // self.world_size
        key = (domain, k // m)
        if key not in self._perms:
            if len(self._perms) > 4 * len(self.sizes):
                self._perms.clear()
            g = torch.Generator().manual_seed(_mix(self.seed, "domain", domain, k // m))
            self._perms[key] = torch.randperm(self.sizes[domain], generator=g).tolist()
        return self._perms[key][(k % m) * self.world_size + self.rank]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        start = self.epoch * self.steps_per_epoch
        skip = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            skip = self._resume[1]
        counts = [0] * len(self.sizes)
        for step in range(start + skip):  # replay the draws before the start (cheap: no data is read)
            for d in self.draw_domains(step):
                counts[d] += 1
        for step in range(start + skip, start + self.steps_per_epoch):
            self.next_step = step + 1
            batch = []
            for d in self.draw_domains(step):
                batch.append((d, self._index(d, counts[d])))
                counts[d] += 1
            yield batch

    def __len__(self) -> int:
        return self.steps_per_epoch


# ---------------------------------------------------------------------------------------------------- DataModule
class MultiDomainDataModule(TextDataModule):
    """Causal-LM data from several named domains, mixed by weights that dynamic batch loading updates.

    Training batches are ``{"input_ids": LongTensor[batch, seq_len], "domain": LongTensor[batch]}`` (see
    :class:`DomainBatchSampler`). :meth:`val_dataloader` is one in-order loader over every domain's validation
    sequences (so a model's single ``val/loss`` is the loss on the union); :meth:`domain_val_dataloaders` gives one
    loader per domain, which :class:`~lit_accel.data.DynamicBatchLoading` evaluates every ``update_every`` steps and
    passes to :meth:`update`. The checkpoint state (:meth:`state_dict`) holds the resume position and the whole weight
    schedule, so a resumed run draws exactly the batches an uninterrupted one would.

    Args:
        domains: ``{name: spec}``; a spec (or a list of specs, concatenated) is a corpus for
            :func:`~lit_accel.data.load_documents`, ``"stdlib:<pkg>[,<pkg>...]"`` (top-level standard-library
            packages/modules) or ``"stdlib:*"`` (the top-level packages/modules no other ``stdlib:`` spec names).
        reference_losses: ``{name: loss}`` for every domain; ``"initial"``:
            :class:`~lit_accel.data.DynamicBatchLoading` measures them on the model when training starts (for
            pruning, the source model); the path of a checkpoint that holds them
            (:func:`reference_losses_from_checkpoint`); None: :meth:`update` is not allowed (fixed weights). See the
            module docstring.
        update_every: optimizer steps between updates (>= 1).
        eta: update step size (> 0).
        smoothing: weight of the uniform distribution mixed in after each update, in [0, 1].
        initial_weights: ``{name: weight}`` (non-negative, sum 1); None: proportional to each domain's training
            sequences (the natural mix).
        clip_excess: clip ``loss - reference`` at 0 (the paper) or not (the LLM-Shearing code).
        max_corpus_bytes: use at most this many bytes of text per domain.
        max_val_sequences: validation sequences per domain.
        others: as :class:`~lit_accel.data.TextDataModule`.
    """

    # Its sampler draws whole batches per step from per-domain streams: a resume on another world size or batch
    # size continues with a warning, not from the same sample.
    _elastic_position = False

    def __init__(
        self,
        domains: dict[str, str | list[str]],
        reference_losses: dict[str, float] | str | None = None,
        update_every: int = 50,
        eta: float = 1.0,
        smoothing: float = 1e-4,
        initial_weights: dict[str, float] | None = None,
        clip_excess: bool = True,
        tokenizer: str = "auto",
        bpe_vocab_size: int | None = None,
        bpe_train_bytes: int | None = DEFAULT_BPE_TRAIN_BYTES,
        seq_len: int = 512,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        val_fraction: float = 0.005,
        max_val_sequences: int | None = 256,
        max_corpus_bytes: int | None = None,
        num_workers: int = 0,
        text_field: str = "text",
        cache_dir: str = ".cache/lit_accel",
        seed: int = 1234,
    ) -> None:
        super().__init__(
            STDLIB,
            tokenizer,
            bpe_vocab_size,
            bpe_train_bytes,
            seq_len,
            batch_size,
            val_batch_size,
            val_fraction,
            max_val_sequences,
            max_corpus_bytes,
            num_workers,
            text_field,
            cache_dir,
            seed,
            test_fraction=0.0,  # the domains' documents all feed training or per-domain validation
        )
        self.domains = _parse_domains(domains)
        self.names = list(self.domains)
        if update_every < 1:
            raise ValueError(f"update_every={update_every} must be >= 1.")
        if not eta > 0:
            raise ValueError(f"eta={eta} must be > 0.")
        if not 0.0 <= smoothing <= 1.0:
            raise ValueError(f"smoothing={smoothing} must be in [0, 1].")
        self.measure_reference = reference_losses == INITIAL
        """Whether :class:`~lit_accel.data.DynamicBatchLoading` measures the reference losses when training starts."""
        if isinstance(reference_losses, (str, os.PathLike)):
            reference_losses = None if self.measure_reference else reference_losses_from_checkpoint(reference_losses)
        if reference_losses is not None and set(reference_losses) != set(self.names):
            raise ValueError(
                f"reference_losses keys {sorted(reference_losses)} must be exactly the domains {sorted(self.names)}."
            )
        if reference_losses is not None and not all(math.isfinite(float(v)) for v in reference_losses.values()):
            raise ValueError(f"reference_losses={dict(reference_losses)} must be finite numbers.")
        if initial_weights is not None:
            if set(initial_weights) != set(self.names):
                raise ValueError(
                    f"initial_weights keys {sorted(initial_weights)} must be exactly the domains {sorted(self.names)}."
                )
            _check_weights([float(initial_weights[n]) for n in self.names], "initial_weights")
        self.reference_losses: dict[str, float] | None = (
            None if reference_losses is None else {k: float(v) for k, v in reference_losses.items()}
        )
        self.update_every = update_every
        self.eta = eta
        self.smoothing = smoothing
        self.initial_weights = initial_weights
        self.clip_excess = clip_excess
        self.schedule: list[tuple[int, list[float]]] = []
        self._sampler: DomainBatchSampler | None = None
        self._train_sets: list[PackedTokenDataset] = []
        self._val_sets: list[PackedTokenDataset] = []
        self._infos: dict[str, tuple[str, int]] | None = None

    # ----------------------------------------------------------------------------------------------- cache keys
    def _domain_docs(self, name: str) -> Iterator[tuple[str, str]]:
        return _domain_documents(
            self.domains[name], _claimed_stdlib(self.domains), self.text_field, self.max_corpus_bytes
        )

    def _domain_infos(self) -> dict[str, tuple[str, int]]:
        """``{name: (fingerprint, bytes)}``; plain single corpora use the memoised corpus fingerprint."""
        if self._infos is None:
            infos: dict[str, tuple[str, int]] = {}
            for name, specs in self.domains.items():
                if len(specs) == 1 and not specs[0].startswith(_STDLIB_PREFIX):
                    info = corpus_fingerprint(specs[0], self.text_field, self.max_corpus_bytes, self.cache_dir)
                    fp, n_bytes = f"corpus:{info.fingerprint}", info.num_bytes
                else:
                    h = hashlib.sha256(f"lit_accel-domain\0{specs}\0".encode())
                    n_bytes = 0
                    for doc, text in self._domain_docs(name):
                        data = text.encode("utf-8", errors="replace")
                        h.update(f"{doc}\0{len(data)}\0".encode())
                        h.update(data)
                        n_bytes += len(data)
                    fp = h.hexdigest()
                if n_bytes == 0:
                    raise ValueError(f"domains[{name!r}]={specs!r} has no text.")
                infos[name] = (fp, n_bytes)
            self._infos = infos
        return self._infos

    def _tokenizer_path(self) -> Path:
        self._resolve_tokenizer()
        if self.tokenizer_arg != "bpe":
            return Path(self.tokenizer_arg)
        fps = sorted(fp for fp, _ in self._domain_infos().values())
        key = _key("bpe-multi", _TOKENIZER_FORMAT_VERSION, fps, self.bpe_vocab_size, self.bpe_train_bytes)
        return self.cache_dir / "tokenizers" / f"bpe-{self.bpe_vocab_size}-{key}"

    def _domain_shard_path(self, name: str, tokenizer_dir: Path) -> Path:
        key = _key(SHARD_FORMAT_VERSION, self._domain_infos()[name][0], hash_tokenizer_dir(tokenizer_dir), sys.version)
        return self.cache_dir / "shards" / key

    # --------------------------------------------------------------------------------------------------- build
    def _build(self) -> tuple[Path, Path]:
        infos = self._domain_infos()
        tok_dir = self._tokenizer_path()
        if self.tokenizer_arg == "bpe" and not (tok_dir / "tokenizer.json").is_file():
            docs = chain.from_iterable(self._domain_docs(n) for n in self.names)
            total = sum(b for _, b in infos.values())
            train_bpe_tokenizer(bpe_training_texts(docs, total, self.bpe_train_bytes), self._bpe_size(), tok_dir)
        tokenizer = None
        for name in self.names:
            shard_dir = self._domain_shard_path(name, tok_dir)
            if not TokenShards.is_complete(shard_dir):
                tokenizer = tokenizer or load_tokenizer(tok_dir)
                build_shards(
                    self._domain_docs(name),
                    tokenizer,
                    shard_dir,
                    total_bytes=infos[name][1],
                    extra_meta={"domain": name, "specs": self.domains[name], "tokenizer": str(tok_dir)},
                )
        return tok_dir, self.cache_dir / "shards"

    def setup(self, stage: str | None = None) -> None:
        """Load the tokenizer and every domain's shards, building them first on the builder rank.

        Raises:
            ValueError: if a domain is too small for one train and one val sequence of ``seq_len`` tokens.
        """
        if self._train is not None:
            return
        builder, rank = self._is_builder()
        if builder:
            tok_dir, _ = self._build()
        else:
            tok_dir = self._tokenizer_path()
            if self.tokenizer_arg == "bpe":  # only ours is written by rank 0; a model's may have no tokenizer.json
                self._wait_for("tokenizer", lambda: (tok_dir / "tokenizer.json").is_file(), tok_dir, rank)
        train_sets, val_sets = [], []
        for name in self.names:
            shard_dir = self._domain_shard_path(name, tok_dir)
            if not builder:
                self._wait_for("token shards", lambda d=shard_dir: TokenShards.is_complete(d), shard_dir, rank)
            try:
                train, val = TokenShards(shard_dir).split(self.val_fraction, self._seq_len, self.max_val_sequences)
            except ValueError as e:
                raise ValueError(f"domains[{name!r}]: {e}") from None
            train_sets.append(train)
            val_sets.append(val)
        self._tokenizer, self._tokenizer_dir = load_tokenizer(tok_dir), tok_dir
        self._train_sets, self._val_sets = train_sets, val_sets
        if not self.schedule:
            if self.initial_weights is not None:
                w = [float(self.initial_weights[n]) for n in self.names]
            else:
                total = sum(len(t) for t in train_sets)
                w = [len(t) / total for t in train_sets]
            self.schedule = [(0, w)]
        self._train = _MultiDomainDataset(train_sets)  # type: ignore[assignment]

    # ------------------------------------------------------------------------------------------------ loaders
    def train_dataloader(self) -> DataLoader:
        """Batches mixed by the current weights; deterministic, rank-disjoint and resumable."""
        train = self._require_setup("train_dataloader()")
        world_size, rank = self._world()
        sampler = DomainBatchSampler(
            [len(t) for t in self._train_sets],
            self.batch_size,
            self.schedule,
            self.steps_per_epoch,
            self.seed,
            rank,
            world_size,
        )
        if self._resume_state is not None:
            saved = self._resume_state
            if saved.get("batch_size", self.batch_size) != self.batch_size or saved.get("world_size") != world_size:
                warnings.warn(
                    f"resuming with batch_size={self.batch_size} and world_size={world_size}, but the checkpoint "
                    f"was saved with batch_size={saved.get('batch_size')} and world_size={saved.get('world_size')}; "
                    "the data order after resume will not match an uninterrupted run.",
                    stacklevel=2,
                )
            sampler.resume(saved["epoch"], saved["batches_done"])
        self._sampler = sampler
        return _ResumableDataLoader(
            train,
            batch_size=None,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def _val_loader(self, dataset: Dataset[Any]) -> DataLoader:
        world_size, rank = self._world()
        return DataLoader(
            dataset,
            batch_size=self.val_batch_size,
            sampler=ShardedSequentialSampler(len(dataset), rank, world_size),  # type: ignore[arg-type]
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
        )

    def val_dataloader(self) -> DataLoader:
        """One in-order, rank-sharded loader over the validation sequences of every domain."""
        self._require_setup("val_dataloader()")
        return self._val_loader(torch.utils.data.ConcatDataset(self._val_sets))

    def test_dataloader(self) -> DataLoader:
        """Refused: every domain's documents feed training or that domain's validation; there is no test split.

        Raises:
            ValueError: Always, saying what to run instead.
        """
        raise ValueError(
            "MultiDomainDataModule has no test split (test_dataloader): every domain's documents feed training or"
            " that domain's validation. Measure the per-domain validation losses with `lit-accel validate`, or test"
            " on held-out text with a TextDataModule (data.corpus <held-out files>, data.test_fraction)."
        )

    def domain_val_dataloaders(self) -> dict[str, DataLoader]:
        """``{domain: loader}`` over each domain's validation sequences (rank-sharded)."""
        self._require_setup("domain_val_dataloaders()")
        return {n: self._val_loader(v) for n, v in zip(self.names, self._val_sets)}

    # ------------------------------------------------------------------------------------------------- update
    @property
    def weights(self) -> dict[str, float]:
        """The latest weights (after :meth:`setup`)."""
        self._require_setup("weights")
        return dict(zip(self.names, self.schedule[-1][1]))

    def update(self, step: int, per_domain_val_losses: dict[str, float]) -> dict[str, float]:
        """Apply :func:`update_domain_weights` and schedule the new weights for the batches not yet drawn.

        They take effect from ``max(step, next step the live sampler produces)`` (the loader may have drawn a batch
        or two ahead); the schedule is saved in checkpoints, so a resumed run uses the same switch points.

        Returns:
            The new weights.
        """
        if self.reference_losses is None:
            raise ValueError(
                "update() needs reference_losses; pass them to MultiDomainDataModule(reference_losses=...) (with "
                "reference_losses='initial', DynamicBatchLoading measures them when training starts)."
            )
        if set(per_domain_val_losses) != set(self.names):
            raise ValueError(
                f"per_domain_val_losses keys {sorted(per_domain_val_losses)} must be the domains {sorted(self.names)}."
            )
        current = self.weights
        new = update_domain_weights(
            [current[n] for n in self.names],
            [float(per_domain_val_losses[n]) for n in self.names],
            [self.reference_losses[n] for n in self.names],
            self.eta,
            self.smoothing,
            self.clip_excess,
        )
        from_step = max(int(step), self._sampler.next_step if self._sampler is not None else 0)
        self.schedule[:] = [e for e in self.schedule if e[0] < from_step] + [(from_step, new)]  # in place: shared
        return dict(zip(self.names, new))

    # ------------------------------------------------------------------------------------------------- state
    def set_reference_losses(self, losses: dict[str, float]) -> None:
        """Set the reference losses (:class:`~lit_accel.data.DynamicBatchLoading` does, with
        ``reference_losses="initial"``)."""
        if set(losses) != set(self.names) or not all(math.isfinite(float(v)) for v in losses.values()):
            raise ValueError(f"reference losses {losses} must be finite numbers for exactly the domains {self.names}.")
        self.reference_losses = {n: float(losses[n]) for n in self.names}

    def state_dict(self) -> dict[str, Any]:
        """The resume position (as :class:`TextDataModule`), ``"schedule"`` (the weights and their steps) and
        ``"reference_losses"`` (None until known)."""
        state = super().state_dict()
        state["schedule"] = [[s, list(w)] for s, w in self.schedule]
        state["reference_losses"] = None if self.reference_losses is None else dict(self.reference_losses)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the resume position, the weight schedule and measured (``"initial"``) reference losses.

        Reference losses given to the constructor win over the checkpoint's: a config may change them on resume.
        """
        state = dict(state_dict)
        schedule = state.pop("schedule", None)
        references = state.pop("reference_losses", None)
        super().load_state_dict(state)
        if schedule:
            self.schedule[:] = [(int(s), [float(x) for x in w]) for s, w in schedule]
        if references is not None and self.measure_reference:
            self.set_reference_losses(references)

    # -------------------------------------------------------------------------------------------- properties
    @property
    def num_val_tokens(self) -> int:
        """Tokens in the validation sequences of all domains (after :meth:`setup`)."""
        self._require_setup("num_val_tokens")
        return sum(v.num_tokens for v in self._val_sets)

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch and rank: all domains' training sequences / (world size * batch size)."""
        train = self._require_setup("steps_per_epoch")
        world_size, _ = self._world()
        steps = len(train) // world_size // self.batch_size
        if steps < 1 or any(len(t) < world_size for t in self._train_sets):
            raise ValueError(
                f"batch_size={self.batch_size} with world_size={world_size} needs more training sequences; the "
                f"domains have {[len(t) for t in self._train_sets]}; use more text or a smaller batch_size/seq_len."
            )
        return steps
