"""Data for causal-LM training without downloads: an embedded default corpus (the Python standard library), a
locally trained byte-level BPE, cached memory-mapped token shards and a resumable LightningDataModule.

Example:
    >>> from lit_accel.data import TextDataModule
    >>> dm = TextDataModule(corpus="stdlib", bpe_vocab_size=8192, seq_len=256)
    >>> dm.prepare_data(); dm.setup("fit")  # doctest: +SKIP
    >>> dm.vocab_size  # doctest: +SKIP
    8192
"""

from lit_accel.data.corpus import (
    STDLIB,
    TEXT_SUFFIXES,
    CorpusInfo,
    corpus_fingerprint,
    is_saved_dataset,
    load_documents,
    stdlib_corpus_files,
)
from lit_accel.data.datamodule import (
    DEFAULT_BPE_TRAIN_BYTES,
    ResumableSampler,
    ShardedSequentialSampler,
    TextDataModule,
)
from lit_accel.data.domains import (
    DomainBatchSampler,
    MultiDomainDataModule,
    reference_losses_from_checkpoint,
    update_domain_weights,
)
from lit_accel.data.dynamic_batch import DynamicBatchLoading
from lit_accel.data.shards import PackedTokenDataset, TokenShards, build_shards, split_runs
from lit_accel.data.tokenizer import EOS_TOKEN, load_tokenizer, token_dtype, train_bpe_tokenizer

__all__ = [
    "DEFAULT_BPE_TRAIN_BYTES",
    "EOS_TOKEN",
    "STDLIB",
    "TEXT_SUFFIXES",
    "CorpusInfo",
    "DomainBatchSampler",
    "DynamicBatchLoading",
    "MultiDomainDataModule",
    "PackedTokenDataset",
    "ResumableSampler",
    "ShardedSequentialSampler",
    "TextDataModule",
    "TokenShards",
    "build_shards",
    "corpus_fingerprint",
    "is_saved_dataset",
    "load_documents",
    "load_tokenizer",
    "reference_losses_from_checkpoint",
    "split_runs",
    "stdlib_corpus_files",
    "token_dtype",
    "train_bpe_tokenizer",
    "update_domain_weights",
]
