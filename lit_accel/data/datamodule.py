"""The LightningDataModule for causal-LM pretraining on a local corpus, and its resumable distributed sampler.

Example:
    >>> import lightning as L
    >>> from lit_accel.data import TextDataModule
    >>> dm = TextDataModule(corpus="stdlib", bpe_vocab_size=8192, seq_len=256, batch_size=16)
    >>> trainer = L.Trainer(max_steps=100)  # doctest: +SKIP
    >>> trainer.fit(model, datamodule=dm)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Iterator, Sized
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, DistributedSampler

from lit_accel.data.corpus import STDLIB, CorpusInfo, corpus_fingerprint, load_documents, validate_corpus
from lit_accel.data.model_tokenizer import model_vocab, resolve_tokenizer
from lit_accel.data.shards import SHARD_FORMAT_VERSION, PackedTokenDataset, TokenShards, build_shards
from lit_accel.data.tokenizer import (
    bpe_training_texts,
    hash_tokenizer_dir,
    load_tokenizer,
    train_bpe_tokenizer,
)
from lit_accel.models.params import global_rank, world_size
from lit_accel.resume import complete_epoch_end_loop_state, keep_global_batch, set_epoch_batches_done

__all__ = ["DEFAULT_BPE_TRAIN_BYTES", "ResumableSampler", "ShardedSequentialSampler", "TextDataModule"]

DEFAULT_BPE_TRAIN_BYTES = 16 * 2**20
"""BPE training reads at most this much text by default (16 MiB: about 6 s on 2 CPU cores at 8192 tokens)."""

_TOKENIZER_FORMAT_VERSION = 1


def _mix_seed(seed: int, epoch: int) -> int:
    digest = hashlib.sha256(f"lit_accel-sampler\0{seed}\0{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def _as_sized(data: Sized | int) -> Any:
    return range(data) if isinstance(data, int) else data


def _samples_done(saved: dict[str, int]) -> int:
    """The sequences of the saved epoch already used, over all ranks (see :meth:`ResumableSampler.resume_at`)."""
    return saved["batches_done"] * saved.get("batch_size", 1) * saved.get("world_size", 1)


class ResumableSampler(DistributedSampler):
    """Shuffling sampler that shards across ranks and can resume in the middle of an epoch.

    Each epoch draws ``torch.randperm`` from a generator seeded with ``(seed, epoch)``, truncates it to a multiple of
    ``world_size`` and gives rank ``r`` the indices ``perm[r::world_size]``. So after ``k`` batches of ``B`` on each
    of ``W`` ranks the run has used exactly the first ``k * B * W`` entries of the permutation, whatever ``W`` and
    ``B`` are: :meth:`resume_at` continues from such a position on any world size and batch size (the rest of the
    epoch split over the ranks as ``perm[start + r::world_size]``, trimmed so that every rank gets as many), and no
    sample is seen twice or skipped. ``len()`` stays the full epoch length; the resumed epoch ends when its
    iterator does.

    It subclasses ``DistributedSampler`` so that Lightning does not wrap it in another distributed sampler.

    Args:
        data_source: the dataset (or its length).
        batch_size: per-rank batch size (used to turn ``batches_done`` into samples).
        seed: the base seed, identical on all ranks.
        rank: this rank.
        world_size: number of ranks.

    Example:
        >>> s0 = ResumableSampler(10, batch_size=2, seed=0, rank=0, world_size=2)
        >>> s1 = ResumableSampler(10, batch_size=2, seed=0, rank=1, world_size=2)
        >>> sorted(list(s0) + list(s1)) == list(range(10))
        True
        >>> s0.resume(epoch=0, batches_done=1)
        >>> list(s0) == list(ResumableSampler(10, batch_size=2, seed=0, rank=0, world_size=2))[2:]
        True
    """

    def __init__(
        self, data_source: Sized | int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size}).")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1.")
        super().__init__(_as_sized(data_source), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        self.size = len(_as_sized(data_source))
        self.batch_size = batch_size
        self.world_size = world_size
        self.num_samples = self.size // world_size
        self.total_size = self.num_samples * world_size
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose permutation the next iteration uses (Lightning calls this every epoch)."""
        self.epoch = epoch

    def resume(self, epoch: int, batches_done: int) -> None:
        """Skip the first ``batches_done`` batches (of this sampler's world size and batch size) of ``epoch``."""
        self.resume_at(epoch, int(batches_done) * self.batch_size * self.world_size)

    def resume_at(self, epoch: int, samples_done: int) -> None:
        """Continue ``epoch`` after its first ``samples_done`` samples, counted over all ranks (``k * B * W`` for a
        run of ``W`` ranks that did ``k`` batches of ``B``): the same position on any world size and batch size.

        Example:
            >>> before = [ResumableSampler(12, batch_size=2, rank=r, world_size=2) for r in range(2)]
            >>> seen = [i for s in before for i in list(s)[:2]]  # one batch of 2 on each of 2 ranks
            >>> after = [ResumableSampler(12, batch_size=1, rank=r, world_size=4) for r in range(4)]
            >>> for s in after:
            ...     s.resume_at(epoch=0, samples_done=4)
            >>> rest = [i for s in after for i in s]
            >>> sorted(seen + rest) == list(range(12))
            True
        """
        if samples_done < 0:
            raise ValueError(f"samples_done={samples_done} must be >= 0")
        self._resume = (int(epoch), int(samples_done))

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's full index order for ``epoch`` (ignoring any resume skip)."""
        return self._permutation(epoch)[self.rank :: self.world_size].tolist()

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator()
        g.manual_seed(_mix_seed(self.seed, epoch))
        return torch.randperm(self.size, generator=g)[: self.total_size]

    def __iter__(self) -> Iterator[int]:
        if self._resume is None or self._resume[0] != self.epoch:
            return iter(self.epoch_indices(self.epoch))
        start = min(self._resume[1], self.total_size)
        # every rank as many samples: with another world size the rest need not divide evenly
        end = start + (self.total_size - start) // self.world_size * self.world_size
        return iter(self._permutation(self.epoch)[start:end][self.rank :: self.world_size].tolist())

    def __len__(self) -> int:
        return self.num_samples


class ShardedSequentialSampler(DistributedSampler):
    """In-order sampler giving rank ``r`` the indices ``r, r + world_size, ...`` (no padding, no shuffling).

    Example:
        >>> list(ShardedSequentialSampler(5, rank=1, world_size=2))
        [1, 3]
    """

    def __init__(self, data_source: Sized | int, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(_as_sized(data_source), num_replicas=world_size, rank=rank, shuffle=False)
        self.size = len(_as_sized(data_source))
        self.num_samples = len(range(rank, self.size, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


class _ResumableDataLoader(DataLoader):
    """A DataLoader that tells Lightning it resumes mid-epoch.

    The resume position lives in :meth:`TextDataModule.state_dict` (applied through :class:`ResumableSampler`); these
    no-op hooks only mark the loader as stateful, so Lightning does not warn that a mid-epoch resume is unreliable.
    """

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


class TextDataModule(L.LightningDataModule):
    """Causal-LM data from a local corpus: local BPE (or a local HF tokenizer), cached memory-mapped token shards,
    packed ``seq_len`` sequences, and deterministic, resumable, rank-sharded sampling.

    Nothing is downloaded. The default corpus is the running interpreter's standard library (``.py`` files, ~30 MB).
    Local rank 0 trains the tokenizer and tokenises in :meth:`prepare_data`; other ranks wait for the files in
    :meth:`setup`. A training sample is ``{"input_ids": LongTensor[seq_len]}``; labels are the same ids (the model
    shifts them). Resuming from a Lightning checkpoint continues with the next unseen sample, also mid-epoch, also on
    another number of devices or another ``batch_size``: then the global batch (devices x ``batch_size`` x
    ``accumulate_grad_batches``) is kept by changing the Trainer's gradient accumulation when it divides evenly
    (``keep_global_batch``), and logged.

    Args:
        corpus: ``"stdlib"``, a text/``.jsonl``/``.parquet`` file, a folder of such files, or a ``save_to_disk``
            folder (a ``DatasetDict`` uses its ``"train"`` split, else all splits); see :mod:`lit_accel.data.corpus`.
        tokenizer: ``"auto"`` (the model directory's own tokenizer when the trainer's model was loaded from one
            that has it, else ``"bpe"``), ``"bpe"`` (train a byte-level BPE on the corpus) or the path of a local
            HF tokenizer directory. A tokenizer larger than the model's vocabulary is refused before tokenising
            (see :mod:`lit_accel.data.model_tokenizer`).
        bpe_vocab_size: vocabulary size of the trained BPE, in [257, 2**32]; ``None``: the model's ``vocab_size``
            (32000 without a model).
        bpe_train_bytes: train the BPE on at most this many bytes of text, spread over the corpus; None: all.
        seq_len: tokens per training sequence (>= 2).
        batch_size: training sequences per batch and rank.
        val_batch_size: validation batch size (default: ``batch_size``).
        val_fraction: fraction of documents held out for validation, in (0, 0.5]; at least one document (enough
            for one sequence) is always held out.
        max_val_sequences: validate on at most this many sequences (None: all).
        max_corpus_bytes: use only the first this many bytes of the documents in sorted order (quick runs, tests).
        num_workers: DataLoader workers.
        text_field: the field/column holding the text in ``.jsonl``, ``.parquet`` and datasets corpora.
        cache_dir: where tokenizers, shards and corpus fingerprints are cached.
        seed: the shuffling seed.
        test_fraction: fraction of documents held out for :meth:`test_dataloader` (``lit-accel test``), in
            [0, 0.5); they are in neither train nor validation. Corpora of fewer than 3 documents have no test split.
        keep_global_batch: when a run resumes on another number of devices or ``batch_size``, set the Trainer's
            ``accumulate_grad_batches`` so that each optimizer step sees as many sequences as before (when that
            divides evenly; else a warning says how the global batch changes). False keeps the Trainer's value.

    Example:
        >>> dm = TextDataModule(max_corpus_bytes=1_000_000, bpe_vocab_size=1000, seq_len=128, cache_dir="/tmp/c")
        >>> dm.prepare_data(); dm.setup("fit")  # doctest: +SKIP
        >>> next(iter(dm.train_dataloader()))["input_ids"].shape  # doctest: +SKIP
        torch.Size([8, 128])
    """

    setup_timeout_s: float = 6 * 3600.0
    """How long non-zero ranks wait in :meth:`setup` for local rank 0 to finish :meth:`prepare_data`."""

    def __init__(
        self,
        corpus: str = STDLIB,
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
        test_fraction: float = 0.005,
        keep_global_batch: bool = True,
    ) -> None:
        super().__init__()
        corpus = str(corpus)
        tokenizer = str(tokenizer)
        validate_corpus(corpus)
        if tokenizer not in ("auto", "bpe") and not Path(tokenizer).is_dir():
            raise ValueError(
                f"tokenizer={tokenizer!r} is not 'auto', 'bpe' or a local directory; pass 'auto' (the model"
                " directory's tokenizer, else a BPE), 'bpe' to train one on the corpus, or the path of a local"
                " Hugging Face tokenizer directory (hub ids are not downloaded)."
            )
        if bpe_vocab_size is not None and not 257 <= bpe_vocab_size <= 2**32:
            raise ValueError(f"bpe_vocab_size={bpe_vocab_size} must be in [257, 2**32] (256 bytes + eos at least).")
        if bpe_train_bytes is not None and bpe_train_bytes < 1:
            raise ValueError(f"bpe_train_bytes={bpe_train_bytes} must be >= 1 or None (all of the corpus).")
        if seq_len < 2:
            raise ValueError(f"seq_len={seq_len} must be >= 2 (a causal LM predicts token t+1 from tokens <= t).")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1.")
        if val_batch_size is not None and val_batch_size < 1:
            raise ValueError(f"val_batch_size={val_batch_size} must be >= 1 or None (same as batch_size).")
        if not 0.0 < val_fraction <= 0.5:
            raise ValueError(f"val_fraction={val_fraction} must be in (0, 0.5].")
        if not 0.0 <= test_fraction < 0.5:
            raise ValueError(f"test_fraction={test_fraction} must be in [0, 0.5) (0: no test split).")
        if max_val_sequences is not None and max_val_sequences < 1:
            raise ValueError(f"max_val_sequences={max_val_sequences} must be >= 1 or None (all).")
        if max_corpus_bytes is not None and max_corpus_bytes < 1:
            raise ValueError(f"max_corpus_bytes={max_corpus_bytes} must be >= 1 or None (the whole corpus).")
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} must be >= 0.")
        self.save_hyperparameters()
        self.corpus = corpus
        self.tokenizer_arg = tokenizer
        self.bpe_vocab_size: int | None = bpe_vocab_size
        self._tokenizer_resolved = False
        self.bpe_train_bytes = bpe_train_bytes
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.max_val_sequences = max_val_sequences
        self.max_corpus_bytes = max_corpus_bytes
        self.num_workers = num_workers
        self.text_field = text_field
        self.cache_dir = Path(cache_dir)
        self.seed = seed
        self.keep_global_batch = bool(keep_global_batch)
        self._seq_len = seq_len
        self._info: CorpusInfo | None = None
        self._tokenizer: Any = None
        self._tokenizer_dir: Path | None = None
        self._shards: TokenShards | None = None
        self._train: PackedTokenDataset | None = None
        self._val: PackedTokenDataset | None = None
        self._resume_state: dict[str, int] | None = None

    # ----------------------------------------------------------------------------------------------- cache keys
    def _corpus_info(self) -> CorpusInfo:
        if self._info is None:
            info = corpus_fingerprint(self.corpus, self.text_field, self.max_corpus_bytes, self.cache_dir)
            if info.num_documents == 0:
                raise ValueError(
                    f"corpus={self.corpus!r} has no text: no non-empty, UTF-8 decodable documents were found"
                    + (f" (text_field={self.text_field!r})" if self.corpus != STDLIB else "")
                    + "."
                )
            self._info = info
        return self._info

    def _resolve_tokenizer(self) -> None:
        # "auto" and an unset BPE size depend on the model the trainer runs, known only once the data module is
        # attached: resolved (and checked against the model) before anything is trained or tokenised.
        if self._tokenizer_resolved:
            return
        module = self.trainer.lightning_module if self.trainer is not None else None
        model = model_vocab(module) if module is not None else None
        self.tokenizer_arg, self.bpe_vocab_size = resolve_tokenizer(self.tokenizer_arg, self.bpe_vocab_size, model)
        self._tokenizer_resolved = True

    def _bpe_size(self) -> int:
        self._resolve_tokenizer()
        assert self.bpe_vocab_size is not None  # resolved: the model's size or the default
        return self.bpe_vocab_size

    def _tokenizer_path(self) -> Path:
        self._resolve_tokenizer()
        if self.tokenizer_arg != "bpe":
            return Path(self.tokenizer_arg)
        key = _key(
            "bpe", _TOKENIZER_FORMAT_VERSION, self._corpus_info().fingerprint, self.bpe_vocab_size, self.bpe_train_bytes
        )
        return self.cache_dir / "tokenizers" / f"bpe-{self.bpe_vocab_size}-{key}"

    def _shard_path(self, tokenizer_dir: Path) -> Path:
        python = sys.version if self.corpus == STDLIB else None
        key = _key(SHARD_FORMAT_VERSION, self._corpus_info().fingerprint, hash_tokenizer_dir(tokenizer_dir), python)
        return self.cache_dir / "shards" / key

    # --------------------------------------------------------------------------------------------------- build
    def _build(self) -> tuple[Path, Path]:
        info = self._corpus_info()
        tok_dir = self._tokenizer_path()
        if self.tokenizer_arg == "bpe" and not (tok_dir / "tokenizer.json").is_file():
            texts = bpe_training_texts(
                load_documents(self.corpus, self.text_field, self.max_corpus_bytes),
                info.num_bytes,
                self.bpe_train_bytes,
            )
            train_bpe_tokenizer(texts, self._bpe_size(), tok_dir)
        shard_dir = self._shard_path(tok_dir)
        if not TokenShards.is_complete(shard_dir):
            build_shards(
                load_documents(self.corpus, self.text_field, self.max_corpus_bytes),
                load_tokenizer(tok_dir),
                shard_dir,
                total_bytes=info.num_bytes,
                extra_meta={"corpus": self.corpus, "corpus_fingerprint": info.fingerprint, "tokenizer": str(tok_dir)},
            )
        return tok_dir, shard_dir

    def prepare_data(self) -> None:
        """Train the tokenizer (if ``"bpe"``) and tokenise the corpus into the cache, unless already there.

        Lightning calls this on local rank 0 only.
        """
        self._build()

    def _wait_for(self, what: str, ready: Any, path: Path, rank: int) -> None:
        start = time.monotonic()
        while not ready():
            waited = time.monotonic() - start
            if waited > self.setup_timeout_s:
                raise RuntimeError(
                    f"rank {rank} waited {waited:.0f} s for the {what} at {path}, which local rank 0 writes in "
                    "prepare_data(); check rank 0's log for an error, make sure cache_dir is on a file system all "
                    "ranks of a node see, or raise TextDataModule.setup_timeout_s for a very large corpus."
                )
            time.sleep(1.0)

    def _is_builder(self) -> tuple[bool, int]:
        if self.trainer is not None:
            rank = self.trainer.local_rank if self.prepare_data_per_node else self.trainer.global_rank
            return rank == 0, self.trainer.global_rank
        return global_rank() == 0, global_rank()

    def setup(self, stage: str | None = None) -> None:
        """Load the tokenizer and shards, building them first on the builder rank (or in a single process).

        Raises:
            ValueError: if the corpus is too small for one train and one val sequence of ``seq_len`` tokens.
            RuntimeError: if a non-builder rank times out waiting for the files.
        """
        if self._train is not None:
            return
        builder, rank = self._is_builder()
        if builder:
            tok_dir, shard_dir = self._build()
        else:
            tok_dir = self._tokenizer_path()
            if self.tokenizer_arg == "bpe":  # only ours is written by rank 0; a model's may have no tokenizer.json
                self._wait_for("tokenizer", lambda: (tok_dir / "tokenizer.json").is_file(), tok_dir, rank)
            shard_dir = self._shard_path(tok_dir)
            self._wait_for("token shards", lambda: TokenShards.is_complete(shard_dir), shard_dir, rank)
        tokenizer = load_tokenizer(tok_dir)
        shards = TokenShards(shard_dir)
        train, val = shards.split(self.val_fraction, self._seq_len, self.max_val_sequences, self.test_fraction)
        self._tokenizer, self._tokenizer_dir, self._shards, self._train, self._val = (
            tokenizer,
            tok_dir,
            shards,
            train,
            val,
        )

    # ------------------------------------------------------------------------------------------------ loaders
    def _world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.world_size, self.trainer.global_rank
        return world_size(), global_rank()

    def _require_setup(self, name: str) -> Any:
        if self._train is None:
            raise RuntimeError(f"TextDataModule.{name} is available only after prepare_data() and setup().")
        return self._train

    def train_dataloader(self) -> DataLoader:
        """Shuffled, rank-sharded, resumable loader of ``{"input_ids": LongTensor[batch, seq_len]}``."""
        train = self._require_setup("train_dataloader()")
        world_size, rank = self._world()
        if len(train) // world_size < self.batch_size:
            raise ValueError(
                f"batch_size={self.batch_size} is larger than the {len(train) // world_size} training sequences per "
                f"rank ({len(train)} sequences over {world_size} rank(s)); use a larger corpus or smaller batch_size."
            )
        sampler = ResumableSampler(train, self.batch_size, self.seed, rank, world_size)
        if self._resume_state is not None:
            sampler.resume_at(self._resume_state["epoch"], _samples_done(self._resume_state))
        return _ResumableDataLoader(
            train,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            drop_last=True,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        """In-order, rank-sharded loader over at most ``max_val_sequences`` validation sequences."""
        self._require_setup("val_dataloader()")
        assert self._val is not None
        world_size, rank = self._world()
        return DataLoader(
            self._val,
            batch_size=self.val_batch_size,
            sampler=ShardedSequentialSampler(self._val, rank, world_size),
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
        )

    def test_dataloader(self) -> DataLoader:
        """In-order, rank-sharded loader over the held-out test documents (``test_fraction``)."""
        self._require_setup("test_dataloader()")
        assert self._shards is not None
        test = self._shards.test_split(self.val_fraction, self.test_fraction, self._seq_len)
        if len(test) == 0:
            raise ValueError(
                f"the test split is empty: test_fraction={self.test_fraction} of the corpus's documents hold no full"
                f" sequence of seq_len={self._seq_len} tokens. Train with a larger data test_fraction (documents are"
                " then held out from training too), or evaluate the validation split with `lit-accel validate`."
            )
        world_size, rank = self._world()
        return DataLoader(
            test,
            batch_size=self.val_batch_size,
            sampler=ShardedSequentialSampler(test, rank, world_size),
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
        )

    # ------------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The resume position: ``{"epoch", "batches_done", "batch_size", "world_size", "accumulate_grad_batches"}``
        (saved in checkpoints)."""
        if self.trainer is None:
            return dict(self._resume_state or {})
        # `current` is a _ProcessedTracker at runtime; its annotation is the narrower base class.
        progress: Any = self.trainer.fit_loop.epoch_loop.batch_progress.current
        return {
            "epoch": int(self.trainer.current_epoch),
            "batches_done": int(progress.processed),
            "batch_size": self.batch_size,
            "world_size": int(self.trainer.world_size),
            "accumulate_grad_batches": int(self.trainer.accumulate_grad_batches),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Remember the resume position; the next :meth:`train_dataloader` skips the batches already seen.

        Lightning calls this before it restores its loops; if the checkpoint was saved at the end of an epoch
        (``on_train_epoch_end``), the loop state is first made to start the next epoch cleanly, which Lightning
        gets wrong for ``max_steps`` training (see :func:`lit_accel.resume.complete_epoch_end_loop_state`).
        """
        if "epoch" in state_dict and "batches_done" in state_dict:
            self._resume_state = {k: int(v) for k, v in state_dict.items()}
        # The whole checkpoint is not passed to data-module hooks; the connector holds it until the loops load it.
        connector = getattr(self.trainer, "_checkpoint_connector", None)
        checkpoint = getattr(connector, "_loaded_checkpoint", None)
        if isinstance(checkpoint, dict):
            at_epoch_end = complete_epoch_end_loop_state(checkpoint)
            if self._resume_state is not None and self._elastic_position:
                self._resume_elsewhere(checkpoint, self._resume_state, at_epoch_end)

    _elastic_position = True
    """Whether the sampler resumes from a sample position (so another world size or batch size continues exactly)."""

    def _resume_elsewhere(self, checkpoint: dict[str, Any], saved: dict[str, int], at_epoch_end: bool) -> None:
        """On another world size or batch size: the fit loop's batch counter in this run's batches (unless the
        checkpoint was saved at an epoch's end: the next epoch starts from its first batch anyway), and the global
        batch kept through gradient accumulation (:attr:`keep_global_batch`; training only, automatic optimization)."""
        trainer = self.trainer
        assert trainer is not None
        world, batch = int(trainer.world_size), self.batch_size
        saved_world, saved_batch = saved.get("world_size", world), saved.get("batch_size", batch)
        if (saved_world, saved_batch) == (world, batch) or trainer.state.fn != TrainerFn.FITTING:
            return
        samples = 0 if at_epoch_end else _samples_done(saved)
        if not at_epoch_end:
            set_epoch_batches_done(checkpoint, samples // (world * batch))
        where = f"{saved_world} x {saved_batch} sequences per batch -> {world} x {batch}"
        if samples % (world * batch):
            rank_zero_warn(
                f"resuming on {where}: the {samples} sequences already used in this epoch are not a whole number of"
                " this run's batches; training continues from the next unused sequence, with the epoch's batch"
                " counter rounded down"
            )
        module = trainer.lightning_module
        if "accumulate_grad_batches" not in saved or (module is not None and not module.automatic_optimization):
            return
        global_batch = saved_world * saved_batch * saved["accumulate_grad_batches"]
        accumulate = keep_global_batch(global_batch, world, batch)
        current = int(trainer.accumulate_grad_batches)
        if accumulate is None or not self.keep_global_batch:
            reason = (
                "keep_global_batch=False"
                if not self.keep_global_batch
                else f"{global_batch} is not a multiple of {world} x {batch}"
            )
            rank_zero_warn(
                f"resuming on {where}: the global batch changes from {global_batch} to {world * batch * current}"
                f" sequences per optimizer step ({reason}); learning-rate schedules and step counts are in steps"
            )
            return
        if accumulate != current:
            trainer.accumulate_grad_batches = accumulate
            engine = getattr(trainer.strategy, "deepspeed_engine", None)
            if engine is not None:  # DeepSpeed scales the loss and steps by its own accumulation count
                engine.set_train_batch_size(accumulate * engine.train_micro_batch_size_per_gpu() * engine.dp_world_size)
        rank_zero_info(
            f"resuming on {where}: accumulate_grad_batches {current} -> {accumulate} keeps the global batch of"
            f" {global_batch} sequences per optimizer step"
        )

    # -------------------------------------------------------------------------------------------- properties
    @property
    def seq_len(self) -> int:
        """Tokens per sequence."""
        return self._seq_len

    @property
    def tokenizer(self) -> Any:
        """The ``PreTrainedTokenizerFast`` (after :meth:`setup`)."""
        self._require_setup("tokenizer")
        return self._tokenizer

    @property
    def tokenizer_dir(self) -> str:
        """The tokenizer directory (``AutoTokenizer.from_pretrained`` loads it; after :meth:`setup`)."""
        self._require_setup("tokenizer_dir")
        return str(self._tokenizer_dir)

    @property
    def vocab_size(self) -> int:
        """``len(tokenizer)`` (after :meth:`setup`)."""
        self._require_setup("vocab_size")
        return len(self._tokenizer)

    @property
    def eos_token_id(self) -> int:
        """The id appended after every document (after :meth:`setup`)."""
        self._require_setup("eos_token_id")
        return int(self._tokenizer.eos_token_id)

    @property
    def num_train_sequences(self) -> int:
        """Packed training sequences over all ranks (after :meth:`setup`)."""
        return len(self._require_setup("num_train_sequences"))

    @property
    def num_val_tokens(self) -> int:
        """Tokens in the validation sequences served, after ``max_val_sequences`` (after :meth:`setup`)."""
        self._require_setup("num_val_tokens")
        assert self._val is not None
        return self._val.num_tokens

    @property
    def steps_per_epoch(self) -> int:
        """Training batches per epoch and rank (after :meth:`setup`)."""
        train = self._require_setup("steps_per_epoch")
        world_size, _ = self._world()
        return math.floor(len(train) // world_size / self.batch_size)
