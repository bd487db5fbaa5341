"""The data module's tokenizer follows the model it feeds: a pretrained directory's own tokenizer by default, a BPE
sized to the model otherwise, and a tokenizer larger than the model is refused before anything is tokenised."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from lit_accel.data import TextDataModule
from lit_accel.data.model_tokenizer import ModelVocab, model_vocab, resolve_tokenizer
from lit_accel.data.tokenizer import train_bpe_tokenizer
from lit_accel.models import CausalLM

TEXTS = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(300)]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory as `lit-accel export` writes it: weights, config and its 300-token tokenizer."""
    path = tmp_path_factory.mktemp("pretrained") / "model"
    lm = CausalLM("llama-tiny", config_overrides={"vocab_size": 320})
    lm.configure_model()
    assert lm.model is not None
    lm.model.save_pretrained(str(path))
    train_bpe_tokenizer(TEXTS, 300).save_pretrained(str(path))
    return path


def _attached(dm: TextDataModule, module: CausalLM) -> TextDataModule:
    dm.trainer = SimpleNamespace(lightning_module=module, local_rank=0, global_rank=0, world_size=1)  # type: ignore[assignment]
    return dm


def test_resolution_rules(pretrained: Path, tmp_path: Path) -> None:
    scratch = ModelVocab(vocab_size=512, pretrained_dir=None)
    assert resolve_tokenizer("auto", None, scratch) == ("bpe", 512)  # the BPE follows the model
    assert resolve_tokenizer("auto", None, None) == ("bpe", 32000)  # standalone: the documented default
    assert resolve_tokenizer("bpe", 256 + 1, scratch) == ("bpe", 257)
    own = ModelVocab(vocab_size=320, pretrained_dir=str(pretrained))
    assert resolve_tokenizer("auto", None, own) == (str(pretrained), 320)  # the model's own tokenizer
    with pytest.raises(ValueError, match=rf"Use the model's own tokenizer: --data.tokenizer {pretrained}"):
        resolve_tokenizer("bpe", 8192, own)
    with pytest.warns(UserWarning, match="unless this BPE is the one the model was trained with"):
        assert resolve_tokenizer("bpe", 300, own) == ("bpe", 300)
    big = tmp_path / "big"
    train_bpe_tokenizer(TEXTS * 3 + [t.upper() for t in TEXTS], 600, big)
    with pytest.raises(ValueError, match=r"has \d+ tokens, more than the model's vocab_size=320.*--data.tokenizer"):
        resolve_tokenizer(str(big), None, own)


def test_model_vocab_reads_causal_lm_and_plain_hf_models(pretrained: Path) -> None:
    from transformers import AutoModelForCausalLM

    assert model_vocab(CausalLM(str(pretrained))) == ModelVocab(320, str(pretrained))
    assert model_vocab(CausalLM("llama-tiny")) == ModelVocab(CausalLM("llama-tiny").config.vocab_size, None)

    class Holder(SimpleNamespace):
        def modules(self):  # type: ignore[no-untyped-def]
            return [self, self.net]

    holder = Holder(net=AutoModelForCausalLM.from_pretrained(str(pretrained)))
    assert model_vocab(holder) == ModelVocab(320, str(pretrained))


def test_fine_tuning_a_directory_uses_its_tokenizer(pretrained: Path, tmp_path: Path) -> None:
    dm = _attached(
        TextDataModule(corpus="stdlib", max_corpus_bytes=100_000, seq_len=16, cache_dir=str(tmp_path)),
        CausalLM(str(pretrained)),
    )
    dm.prepare_data()
    dm.setup("fit")
    assert dm.tokenizer_dir == str(pretrained) and dm.vocab_size == 300
    assert not (tmp_path / "tokenizers").exists()  # no BPE was trained


def test_a_mismatch_is_refused_before_tokenising(pretrained: Path, tmp_path: Path) -> None:
    dm = _attached(
        TextDataModule(corpus="stdlib", tokenizer="bpe", bpe_vocab_size=4096, cache_dir=str(tmp_path)),
        CausalLM(str(pretrained)),
    )
    with pytest.raises(
        ValueError, match=f"bpe_vocab_size=4096 is larger than the model's vocab_size=320.*{pretrained}"
    ):
        dm.prepare_data()
    assert not (tmp_path / "shards").exists() and not (tmp_path / "tokenizers").exists()


def test_bare_defaults_agree(tmp_path: Path) -> None:
    """`lit-accel fit` with no config: CausalLM's default model and TextDataModule's default BPE fit together."""
    module = CausalLM()
    dm = _attached(TextDataModule(cache_dir=str(tmp_path)), module)
    dm._resolve_tokenizer()
    assert dm.tokenizer_arg == "bpe" and dm.bpe_vocab_size == module.config.vocab_size
    with pytest.raises(ValueError, match="tokenizer='gpt2' is not 'auto', 'bpe' or a local directory"):
        TextDataModule(tokenizer="gpt2")
