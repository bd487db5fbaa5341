"""The tokenizer a data module uses, chosen to fit the model it feeds.

A pretrained model only understands the token ids of its own tokenizer; a model built from scratch needs a
tokenizer no larger than its embedding. :func:`resolve_tokenizer` turns the data module's ``tokenizer="auto"`` and
``bpe_vocab_size=None`` into concrete choices from the model that the trainer runs, and refuses a mismatch before
any text is tokenised:

- ``tokenizer="auto"``: the model directory's own tokenizer when the model was loaded from a local directory that
  has one; otherwise a byte-level BPE trained on the corpus.
- ``bpe_vocab_size=None``: the model's ``vocab_size`` (32000 when no model is known).

Example:
    >>> from types import SimpleNamespace
    >>> model = SimpleNamespace(vocab_size=8192, pretrained_dir=None)
    >>> resolve_tokenizer("auto", None, model)
    ('bpe', 8192)
    >>> resolve_tokenizer("bpe", 32000, model)
    Traceback (most recent call last):
    ...
    ValueError: data bpe_vocab_size=32000 is larger than the model's vocab_size=8192: token ids >= 8192 would ...
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lit_accel.data.tokenizer import load_tokenizer

__all__ = ["DEFAULT_BPE_VOCAB_SIZE", "ModelVocab", "has_tokenizer", "model_vocab", "resolve_tokenizer"]

DEFAULT_BPE_VOCAB_SIZE = 32000
"""The BPE size when neither the data module nor a model says otherwise."""

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass(frozen=True)
class ModelVocab:
    """What the data side needs to know about the model it feeds."""

    vocab_size: int
    """The model's embedding rows (``config.vocab_size``)."""
    pretrained_dir: str | None
    """The local directory the model's weights come from, or ``None`` for a model trained from scratch."""


def has_tokenizer(directory: str | os.PathLike[str] | None) -> bool:
    """Whether a local directory holds a Hugging Face tokenizer."""
    return directory is not None and any((Path(directory) / name).is_file() for name in _TOKENIZER_FILES)


def model_vocab(module: Any) -> ModelVocab | None:
    """Finds the vocabulary size and the pretrained directory of the model a LightningModule trains.

    Reads ``module.source`` (:class:`lit_accel.models.CausalLM`'s model source) when present, else the first
    child with a Hugging Face ``config`` (a ``PreTrainedModel`` loaded in ``__init__``: its ``_name_or_path``
    is the directory when it names one).

    Returns:
        ``None`` when no model (or no ``vocab_size``) is found.
    """
    source = getattr(module, "source", None)
    config = getattr(source, "config", None)
    if config is not None and getattr(config, "vocab_size", None):
        return ModelVocab(int(config.vocab_size), getattr(source, "pretrained_dir", None))
    children = getattr(module, "modules", None)
    for child in children() if callable(children) else []:
        config = getattr(child, "config", None)
        vocab = getattr(config, "vocab_size", None)
        if isinstance(vocab, int) and vocab > 0:
            name = getattr(config, "_name_or_path", None) or None
            return ModelVocab(vocab, name if name and Path(name).is_dir() else None)
    return None


def _tokenizer_size(directory: str) -> int:
    return len(load_tokenizer(directory))


def resolve_tokenizer(tokenizer: str, bpe_vocab_size: int | None, model: ModelVocab | None) -> tuple[str, int]:
    """The tokenizer (``"bpe"`` or a directory) and BPE size to use with ``model``, checked against it.

    Args:
        tokenizer: The data module's ``tokenizer``: ``"auto"``, ``"bpe"`` or a local tokenizer directory.
        bpe_vocab_size: The data module's ``bpe_vocab_size``; ``None`` follows the model.
        model: :func:`model_vocab` of the module the data feeds, or ``None`` (standalone use).

    Returns:
        ``(tokenizer, bpe_vocab_size)`` with ``tokenizer`` either ``"bpe"`` or a directory.

    Raises:
        ValueError: When the tokenizer has more tokens than the model's embedding; the message says which
            argument to change (``--data.tokenizer <model dir>`` when the model directory has a tokenizer).
    """
    size = bpe_vocab_size if bpe_vocab_size is not None else (model.vocab_size if model else DEFAULT_BPE_VOCAB_SIZE)
    if model is None:
        return ("bpe" if tokenizer == "auto" else tokenizer), size
    own = model.pretrained_dir if has_tokenizer(model.pretrained_dir) else None
    if tokenizer == "auto":
        tokenizer = own or "bpe"
    use_own = f" Use the model's own tokenizer: --data.tokenizer {own} (or leave tokenizer at auto)." if own else ""
    if tokenizer == "bpe":
        if size > model.vocab_size:
            raise ValueError(
                f"data bpe_vocab_size={size} is larger than the model's vocab_size={model.vocab_size}: token ids >="
                f" {model.vocab_size} would index past its embedding."
                + (
                    use_own
                    or f" Use bpe_vocab_size <= {model.vocab_size} (or leave it unset: it then follows the model),"
                    f" or set model config_overrides: {{vocab_size: {size}}}."
                )
            )
        if model.pretrained_dir is not None:
            warnings.warn(
                f"data tokenizer='bpe' with the pretrained model in {model.pretrained_dir!r}: unless this BPE is the"
                " one the model was trained with, its token ids mean nothing to the model's embeddings and training"
                " starts from scrambled inputs."
                + (use_own or " Pass the tokenizer the model was trained with: --data.tokenizer <its directory>."),
                stacklevel=3,
            )
        return tokenizer, size
    n = _tokenizer_size(tokenizer)
    if n > model.vocab_size:
        raise ValueError(
            f"data tokenizer {tokenizer!r} has {n} tokens, more than the model's vocab_size={model.vocab_size}:"
            f" token ids >= {model.vocab_size} would index past its embedding."
            + (use_own or f" Use a tokenizer with at most {model.vocab_size} tokens.")
        )
    return tokenizer, size
