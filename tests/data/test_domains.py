"""Tests for dynamic batch loading: the update rule, the domain sampler, the multi-domain DataModule and callback."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from lit_accel.data import DomainBatchSampler, DynamicBatchLoading, MultiDomainDataModule, update_domain_weights

DOMAINS = {"json": "stdlib:json", "email": "stdlib:email", "rest": "stdlib:*"}


def test_update_rule_by_hand() -> None:
    w = update_domain_weights([0.5, 0.5], [3.0, 2.0], [2.0, 2.0], eta=1.0, smoothing=0.0)
    assert w == pytest.approx([math.e / (math.e + 1), 1 / (math.e + 1)])
    # zero excess everywhere (clipped): unchanged up to smoothing
    w0 = [0.2, 0.3, 0.5]
    c = 1e-2
    out = update_domain_weights(w0, [1.0, 1.0, 1.0], [2.0, 2.0, 2.0], smoothing=c)
    assert out == pytest.approx([(1 - c) * x + c / 3 for x in w0])
    assert sum(out) == pytest.approx(1.0)
    # larger excess -> larger weight
    out = update_domain_weights([1 / 3] * 3, [2.5, 2.1, 3.0], [2.0, 2.0, 2.0])
    assert out[2] > out[0] > out[1] and sum(out) == pytest.approx(1.0)
    # unclipped (LLM-Shearing code): a domain below its reference loses weight
    out = update_domain_weights([0.5, 0.5], [1.0, 2.0], [2.0, 2.0], smoothing=0.0, clip=False)
    assert out[0] == pytest.approx(1 / (1 + math.e))
    assert update_domain_weights([0.5, 0.5], [1.0, 2.0], [2.0, 2.0], smoothing=0.0) == pytest.approx([0.5, 0.5])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weights": [0.5, 0.6]}, "weights="),
        ({"weights": [-0.5, 1.5]}, "weights="),
        ({"eta": 0.0}, "eta="),
        ({"smoothing": 2.0}, "smoothing="),
        ({"losses": [1.0]}, "same non-zero length"),
    ],
)
def test_update_rule_errors(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"weights": [0.5, 0.5], "losses": [1.0, 2.0], "reference_losses": [1.0, 1.0]}
    with pytest.raises(ValueError, match=match):
        update_domain_weights(**{**args, **kwargs})


def test_batch_composition_follows_weights() -> None:
    weights = [0.6, 0.3, 0.1]
    s = DomainBatchSampler([500, 400, 300], 8, [(0, weights)], steps_per_epoch=250, seed=3)
    counts = Counter(d for batch in s for d, _ in batch)
    total = sum(counts.values())
    for d, w in enumerate(weights):
        assert counts[d] / total == pytest.approx(w, abs=0.03)


def test_determinism_and_rank_disjointness() -> None:
    sched = [(0, [0.5, 0.5]), (5, [0.9, 0.1])]
    ranks = [DomainBatchSampler([500, 400], 4, sched, 10, seed=7, rank=r, world_size=2) for r in (0, 1)]
    b0, b1 = list(ranks[0]), list(ranks[1])
    assert b0 == list(DomainBatchSampler([500, 400], 4, sched, 10, seed=7, rank=0, world_size=2))
    for x, y in zip(b0, b1):
        assert [d for d, _ in x] == [d for d, _ in y]  # same domain mix on every rank
    seen = [p for b in b0 + b1 for p in b]
    assert len(seen) == len(set(seen))  # disjoint within each domain's pass (no domain wraps in 80 draws)
    late = Counter(d for b in b0[5:] for d, _ in b)
    assert late[0] > late[1]  # the schedule switched at step 5


def test_sampler_resume_mid_epoch() -> None:
    sched = [(0, [0.3, 0.7])]
    full = list(DomainBatchSampler([30, 30], 4, sched, 12, seed=1))
    s = DomainBatchSampler([30, 30], 4, sched, 12, seed=1)
    s.resume(epoch=0, batches_done=5)
    assert list(s) == full[5:]
    s.set_epoch(1)
    assert list(s) != full  # the next epoch draws new domains and continues each domain's order


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("domains_cache")


def _dm(cache: Path, **kwargs: Any) -> MultiDomainDataModule:
    args: dict[str, Any] = {
        "domains": DOMAINS,
        "reference_losses": {"json": 3.0, "email": 3.0, "rest": 3.0},
        "bpe_vocab_size": 500,
        "bpe_train_bytes": 200_000,
        "max_corpus_bytes": 150_000,
        "seq_len": 32,
        "batch_size": 4,
        "val_fraction": 0.1,
        "max_val_sequences": 8,
        "cache_dir": str(cache),
        "update_every": 2,
    }
    args.update(kwargs)
    return MultiDomainDataModule(**args)


def test_datamodule_batches_update_and_state(cache: Path) -> None:
    dm = _dm(cache)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.vocab_size == 500
    assert sum(dm.weights.values()) == pytest.approx(1.0)
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 32) and batch["domain"].shape == (4,)
    assert set(dm.domain_val_dataloaders()) == set(DOMAINS)
    assert next(iter(dm.val_dataloader()))["input_ids"].shape[1] == 32
    new = dm.update(10, {"json": 5.0, "email": 3.0, "rest": 2.0})
    assert new["json"] > new["email"] and new["json"] > new["rest"]
    # resume: a fresh module with the saved state draws the same batches from the saved position
    dm._resume_state = {"epoch": 0, "batches_done": 12, "batch_size": 4, "world_size": 1}
    state = dm.state_dict()
    expected = [b["input_ids"] for _, b in zip(range(20), dm.train_dataloader())]
    dm2 = _dm(cache)
    dm2.setup("fit")
    dm2.load_state_dict(state)
    got = [b["input_ids"] for _, b in zip(range(20), dm2.train_dataloader())]
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert dm2.weights == pytest.approx(new)


def test_stdlib_rest_excludes_named_packages(cache: Path) -> None:
    from lit_accel.data.domains import _claimed_stdlib, _domain_documents, _parse_domains

    parsed = _parse_domains(DOMAINS)
    names = {n.split("/")[1] for n, _ in _domain_documents(parsed["rest"], _claimed_stdlib(parsed), "text", None)}
    assert "json" not in names and "email" not in names and "os.py" in names


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"domains": {}}, "domains="),
        ({"domains": {"a": "stdlib:nosuchpkg"}}, r"domains\['a'\].*nosuchpkg"),
        ({"domains": {"a": "/no/such/path"}}, r"domains\['a'\]"),
        ({"update_every": 0}, "update_every=0"),
        ({"reference_losses": {"json": 1.0}}, "reference_losses keys"),
        ({"initial_weights": {"json": 0.5, "email": 0.6, "rest": 0.1}}, "initial_weights="),
        ({"initial_weights": {"json": -0.5, "email": 1.0, "rest": 0.5}}, "initial_weights="),
        ({"initial_weights": {"json": 1.0}}, "initial_weights keys"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], match: str, tmp_path: Path) -> None:
    if "domains" in kwargs:
        kwargs = {**kwargs, "reference_losses": None}
    with pytest.raises(ValueError, match=match):
        _dm(tmp_path, **kwargs)


def test_callback_updates_weights_in_trainer(cache: Path, tmp_path: Path) -> None:
    from lit_accel.models import CausalLM

    dm = _dm(cache)
    dm.setup("fit")
    model = CausalLM("llama-tiny", config_overrides={"vocab_size": dm.vocab_size})
    trainer = L.Trainer(
        max_steps=4,
        accelerator="cpu",
        callbacks=[DynamicBatchLoading()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    assert len(dm.schedule) == 3  # initial + updates at steps 2 and 4
    assert {f"data/weight/{n}" for n in DOMAINS} <= set(trainer.callback_metrics)
    assert {f"data/val_loss/{n}" for n in DOMAINS} <= set(trainer.callback_metrics)


@torch.no_grad()
def _domain_losses(model: Any, dm: MultiDomainDataModule) -> dict[str, float]:
    out = {}
    for name, loader in dm.domain_val_dataloaders().items():
        total, count = 0.0, 0
        for batch in loader:
            ids = batch["input_ids"]
            total += float(model(ids, labels=ids).loss) * len(ids)
            count += len(ids)
        out[name] = total / count
    return out


def test_initial_reference_losses_are_measured_on_the_source_model_and_saved(cache: Path, tmp_path: Path) -> None:
    from lit_accel.data.domains import reference_losses_from_checkpoint
    from lit_accel.models import CausalLM
    from lit_accel.pruning import StructuredPruning

    dm = _dm(cache, reference_losses="initial")
    dm.setup("fit")
    assert dm.measure_reference and dm.reference_losses is None
    model = CausalLM("llama-tiny", config_overrides={"vocab_size": dm.vocab_size})
    model.configure_model()
    model.eval()
    source = _domain_losses(model, dm)
    model.train()
    # Pruning at set-up masks the model down to its target in evaluation; the references must not see that.
    pruning = StructuredPruning(num_kv_heads=1, intermediate_size=96, hidden_size=64)
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        callbacks=[pruning, DynamicBatchLoading()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    assert dm.reference_losses == pytest.approx(source, rel=1e-5)
    with torch.no_grad():
        model.eval()
        masked = _domain_losses(model, dm)  # the trained, masked model: not what was measured
    assert masked != pytest.approx(source, rel=1e-3)
    ckpt = tmp_path / "run.ckpt"
    trainer.save_checkpoint(ckpt)
    assert reference_losses_from_checkpoint(ckpt) == pytest.approx(source, rel=1e-5)
    # Continue-stage style: the references of another run, by checkpoint path.
    assert _dm(cache, reference_losses=str(ckpt)).reference_losses == pytest.approx(source, rel=1e-5)
    # A resumed "initial" run keeps the saved references instead of measuring the current model.
    resumed = _dm(cache, reference_losses="initial")
    resumed.load_state_dict(torch.load(ckpt, weights_only=False)["MultiDomainDataModule"])
    assert resumed.reference_losses == pytest.approx(source, rel=1e-5)
    # Given references win over a checkpoint's.
    given = _dm(cache, reference_losses={"json": 1.0, "email": 1.0, "rest": 1.0})
    given.load_state_dict(torch.load(ckpt, weights_only=False)["MultiDomainDataModule"])
    assert given.reference_losses == {"json": 1.0, "email": 1.0, "rest": 1.0}
    with pytest.raises(ValueError, match=r"reference_losses='/no/such\.ckpt' is neither 'initial' nor an existing"):
        _dm(cache, reference_losses="/no/such.ckpt")
    no_refs = tmp_path / "norefs.ckpt"
    torch.save({"state_dict": {}, "MultiDomainDataModule": {"schedule": [], "reference_losses": None}}, no_refs)
    with pytest.raises(ValueError, match="holds no reference losses"):
        _dm(cache, reference_losses=str(no_refs))
    with pytest.raises(ValueError, match="DynamicBatchLoading needs MultiDomainDataModule"):
        L.Trainer(max_steps=1, accelerator="cpu", callbacks=[DynamicBatchLoading()], logger=False).fit(
            CausalLM("llama-tiny", config_overrides={"vocab_size": dm.vocab_size}),
            datamodule=_dm(cache, reference_losses=None),
        )


def test_the_cli_reports_a_wrapped_refusal_with_its_context(tmp_path: Path) -> None:
    from lit_accel.cli import _user_error

    with pytest.raises(ValueError) as info:
        _dm(tmp_path, domains={"a": "/no/such/path"}, reference_losses=None)
    refusal = _user_error(info.value)
    # the domain the message is about survives: the CLI prints the outermost of lit_accel's refusals
    assert refusal is not None and str(refusal).startswith("domains['a']: "), refusal


def test_multi_domain_data_has_no_test_split_and_says_so(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"MultiDomainDataModule has no test split .* `lit-accel validate`"):
        _dm(tmp_path, reference_losses=None).test_dataloader()
