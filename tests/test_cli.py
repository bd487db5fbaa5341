"""The `lit-accel` command end to end on CPU: fit, --print_config, fragments, resume, export, crash safety."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import lightning as L
import pytest
import torch
import wandb
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from lit_accel.cli import LitAccelCLI, main
from lit_accel.data import TextDataModule
from lit_accel.models import CausalLM

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli_cache")


def _config(tmp: Path, cache: Path, name: str, max_steps: int = 8, extra_callbacks: list | None = None) -> Path:
    cfg = {
        "seed_everything": 7,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": max_steps,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "limit_val_batches": 2,
            "val_check_interval": 4,
            "check_val_every_n_epoch": None,
            "num_sanity_val_steps": 0,
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(tmp / f"logs_{name}")},
            },
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "dirpath": str(tmp / f"ckpt_{name}"),
                        "every_n_train_steps": 4,
                        "save_last": True,
                        "save_top_k": -1,
                    },
                },
                *(extra_callbacks or []),
            ],
        },
        "model": {"model": "llama-tiny", "warmup_steps": 2, "learning_rate": 1e-3},
        "data": {
            "corpus": "stdlib",
            "max_corpus_bytes": 400_000,
            "bpe_vocab_size": 512,
            "bpe_train_bytes": 200_000,
            "seq_len": 32,
            "batch_size": 4,
            "max_val_sequences": 8,
            "cache_dir": str(cache),
        },
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _losses(log_dir: Path) -> dict[int, float]:
    out: dict[int, float] = {}
    for metrics in sorted(log_dir.rglob("metrics.csv")):
        for row in csv.DictReader(metrics.open()):
            if row.get("train/loss"):
                out[int(row["step"])] = float(row["train/loss"])
    return out


def test_resume_from_last_reproduces_the_uninterrupted_losses(tmp_path: Path, cache: Path) -> None:
    main(["fit", "--config", str(_config(tmp_path, cache, "full"))])
    crash = [{"class_path": "_helpers.CrashAtStep", "init_args": {"step": 5}}]
    with pytest.raises(RuntimeError, match="simulated crash at step 5"):
        main(["fit", "--config", str(_config(tmp_path, cache, "resumed", extra_callbacks=crash))])
    assert (tmp_path / "ckpt_resumed" / "last.ckpt").is_file()
    # Resume from step 4 (the last checkpoint before the crash): the rest of the run equals the uninterrupted one.
    main(["fit", "--config", str(_config(tmp_path, cache, "resumed")), "--ckpt_path", "last"])
    full, resumed = _losses(tmp_path / "logs_full"), _losses(tmp_path / "logs_resumed")
    assert sorted(full) == list(range(8))
    assert set(range(4, 8)) <= set(resumed)
    for step in range(8):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5, abs=1e-6), step


def test_print_config_and_fragment_append(tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture) -> None:
    fragment = tmp_path / "fragment.yaml"
    fragment.write_text("trainer:\n  callbacks+:\n    - class_path: lit_accel.callbacks.Throughput\n")
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(_config(tmp_path, cache, "p")), "--config", str(fragment), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    paths = [c["class_path"] for c in printed["trainer"]["callbacks"]]
    assert paths == ["lightning.pytorch.callbacks.ModelCheckpoint", "lit_accel.callbacks.Throughput"]
    assert printed["model"]["model"] == "llama-tiny"


def test_export_lightning_checkpoint_to_hf(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cli = LitAccelCLI(args=["--config", str(_config(tmp_path, cache, "exp", max_steps=4))], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    ckpt = tmp_path / "ckpt_exp" / "last.ckpt"
    out = tmp_path / "hf"
    main(["export", "--ckpt", str(ckpt), "--out", str(out)])
    hf = AutoModelForCausalLM.from_pretrained(out)
    x = torch.randint(0, 512, (2, 16))
    cli.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, cli.model(x).logits, rtol=0, atol=0)
    tok = AutoTokenizer.from_pretrained(out)  # the run's tokenizer travels with the model
    assert len(tok) == cli.datamodule.vocab_size
    monkeypatch.setenv("LIT_ACCEL_DEBUG", "1")  # the refusals as exceptions, not one-line exits
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        main(["export", "--ckpt", str(ckpt), "--out", str(out)])
    with pytest.raises(ValueError, match="does not exist"):
        main(["export", "--ckpt", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "o2")])
    with pytest.raises(ValueError, match="not a DeepSpeed checkpoint"):
        main(["export", "--ckpt", str(tmp_path), "--out", str(tmp_path / "o3")])
    (tmp_path / "junk.ckpt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a readable"):
        main(["export", "--ckpt", str(tmp_path / "junk.ckpt"), "--out", str(tmp_path / "o4")])


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path: Path, cache: Path, monkeypatch) -> None:
    import lit_accel.checkpoint_io as checkpoint_io

    data = TextDataModule(
        corpus="stdlib",
        max_corpus_bytes=400_000,
        bpe_vocab_size=512,
        bpe_train_bytes=200_000,
        seq_len=32,
        batch_size=4,
        cache_dir=str(cache),
    )
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_last=True, save_top_k=1)
    calls = {"n": 0}
    original = torch.save

    def flaky_save(obj, f, *args, **kwargs):  # the second checkpoint's write dies half-way, as a full disk would
        calls["n"] += 1
        if calls["n"] >= 3:
            f.write(b"PK\x03\x04 half a checkpoint")
            raise OSError("No space left on device (simulated)")
        return original(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint_io.torch, "save", flaky_save)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=4,
        logger=False,
        callbacks=[ckpt],
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    with pytest.raises(OSError, match="simulated"):
        trainer.fit(CausalLM("llama-tiny", warmup_steps=1), datamodule=data)
    monkeypatch.setattr(checkpoint_io.torch, "save", original)
    saved = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 2  # the checkpoint from before the failed save, intact and loadable
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".ckpt" and "step=4" in p.name]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no temporary left behind


def test_a_fresh_run_never_overwrites_existing_checkpoints(tmp_path: Path, cache: Path) -> None:
    config = str(_config(tmp_path, cache, "twice", max_steps=4))
    main(["fit", "--config", config])
    ckpt_dir = tmp_path / "ckpt_twice"
    before = {p.name: p.read_bytes() for p in ckpt_dir.iterdir()}
    main(["fit", "--config", config])  # the same config again, not resuming
    after = {p.name: p.read_bytes() for p in ckpt_dir.iterdir()}
    assert all(after[name] == data for name, data in before.items())  # every earlier file is untouched
    assert "last-v1.ckpt" in after  # the new run's files are versioned next to them


def test_wandb_offline_run_gets_the_resolved_config(tmp_path: Path, cache: Path, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    path = _config(tmp_path, cache, "wb", max_steps=2)
    cfg = yaml.safe_load(path.read_text())
    cfg["trainer"]["logger"] = {
        "class_path": "lit_accel.observe.WandbLogger",
        "init_args": {"project": "t", "save_dir": str(tmp_path / "wb")},
    }
    path.write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", str(path)])
    saved = list((tmp_path / "wb").glob("config-*.yaml"))
    assert len(saved) == 1
    run_files = list((tmp_path / "wb" / "wandb").glob("offline-run-*/files/lit_accel_config.yaml"))
    assert len(run_files) == 1
    resolved = yaml.safe_load(run_files[0].read_text())
    assert resolved["model"]["model"] == "llama-tiny"
    # The data module is in subclass mode: the resolved config names its class.
    assert resolved["data"]["class_path"] == "lit_accel.data.TextDataModule"
    assert resolved["data"]["init_args"]["seq_len"] == 32


def test_export_needs_neither_the_original_model_directory_nor_its_eos_default(tmp_path: Path) -> None:
    import shutil

    base = CausalLM("llama-tiny")
    base.configure_model()
    src = base.save_hf(tmp_path / "src")
    module = CausalLM(str(src), warmup_steps=1)
    module.source.config.eos_token_id = 7  # as CausalLM.setup does with the data's tokenizer
    data = [{"input_ids": torch.randint(0, 4096, (16,))} for _ in range(4)]
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    shutil.rmtree(src)  # the pretrained directory is gone by export time
    out = main(["export", "--ckpt", str(tmp_path / "run.ckpt"), "--out", str(tmp_path / "hf")])
    assert out is None
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert hf.config.eos_token_id == 7
    x = torch.randint(0, 4096, (2, 12))
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, module(x).logits, rtol=0, atol=0)


def test_data_is_text_datamodule_by_default_or_any_subclass_by_class_path(tmp_path: Path, cache: Path) -> None:
    from lit_accel.data import MultiDomainDataModule

    plain = _config(tmp_path, cache, "plain")
    cli = LitAccelCLI(args=["--config", str(plain), "--data.batch_size", "3"], run=False)
    assert type(cli.datamodule) is TextDataModule and cli.datamodule.batch_size == 3
    cfg = yaml.safe_load(plain.read_text())
    cfg["data"] = {
        "class_path": "lit_accel.data.MultiDomainDataModule",
        "init_args": {"domains": {"json": "stdlib:json", "rest": "stdlib:*"}, "reference_losses": "initial"},
    }
    multi = tmp_path / "multi.yaml"
    multi.write_text(yaml.safe_dump(cfg))
    cli = LitAccelCLI(args=["--config", str(multi), "--data.seq_len", "16"], run=False)
    assert isinstance(cli.datamodule, MultiDomainDataModule)
    assert cli.datamodule.names == ["json", "rest"] and cli.datamodule.seq_len == 16
    assert cli.datamodule.measure_reference


def test_wandb_disabled_run_needs_no_run_directory(tmp_path: Path, cache: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")  # a no-op run: its dir does not exist, so nothing is written there
    path = _config(tmp_path, cache, "wbd", max_steps=1)
    cfg = yaml.safe_load(path.read_text())
    cfg["trainer"]["logger"] = {
        "class_path": "lit_accel.observe.WandbLogger",
        "init_args": {"project": "t", "save_dir": str(tmp_path / "wbd")},
    }
    path.write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", str(path)])
    assert len(list((tmp_path / "wbd").glob("config-*.yaml"))) == 1


def test_resume_without_a_logger_keeps_the_first_config_and_saves_its_own(tmp_path: Path, cache: Path) -> None:
    config = yaml.safe_load(_config(tmp_path, cache, "nolog", max_steps=4).read_text())
    config["trainer"]["logger"] = False
    config["trainer"]["default_root_dir"] = str(tmp_path / "root")
    path = tmp_path / "nolog.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path)])
    first = (tmp_path / "root" / "config.yaml").read_text()
    main(["fit", "--config", str(path), "--trainer.max_steps", "8", "--ckpt_path", "last"])
    assert (tmp_path / "root" / "config.yaml").read_text() == first  # the first run's config is untouched
    resumed = yaml.safe_load((tmp_path / "root" / "config.resumed-1.yaml").read_text())
    assert resumed["trainer"]["max_steps"] == 8 and resumed["ckpt_path"] == "last"


def test_a_technique_fragment_gives_the_run_its_own_folder_and_name(tmp_path: Path, cache: Path) -> None:
    path = _config(tmp_path, cache, "base", max_steps=2)
    cfg = yaml.safe_load(path.read_text())
    root = str(tmp_path / "runs" / "base")
    cfg["trainer"]["default_root_dir"] = root
    cfg["trainer"]["callbacks"][0]["init_args"]["dirpath"] = f"{root}/checkpoints"
    cfg["trainer"]["logger"] = {
        "class_path": "lit_accel.observe.WandbLogger",
        "init_args": {"name": "base", "save_dir": root, "offline": True},
    }
    path.write_text(yaml.safe_dump(cfg))
    fragment = tmp_path / "dropbp.yaml"
    fragment.write_text(
        yaml.safe_dump(
            {"trainer": {"callbacks+": [{"class_path": "lit_accel.callbacks.DropBP", "init_args": {"target": 0.3}}]}}
        )
    )
    cli = LitAccelCLI(args=["--config", str(path), "--config", str(fragment)], run=False)
    assert cli.trainer.default_root_dir == f"{root}+dropbp"
    assert cli.trainer.checkpoint_callback is not None
    assert cli.trainer.checkpoint_callback.dirpath == f"{root}+dropbp/checkpoints"
    assert cli.trainer.logger is not None and cli.trainer.logger._wandb_init["name"] == "base+dropbp"
    assert cli.trainer.logger.save_dir == f"{root}+dropbp"
    # the base config alone, or a value set on the command line, is left as written
    plain = LitAccelCLI(args=["--config", str(path)], run=False)
    assert plain.trainer.default_root_dir == root
    mine = str(tmp_path / "mine")
    chosen = LitAccelCLI(
        args=["--config", str(path), "--config", str(fragment), "--trainer.default_root_dir", mine], run=False
    )
    assert chosen.trainer.default_root_dir == mine


def test_test_subcommand_evaluates_held_out_documents_and_predict_is_gone(
    tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture
) -> None:
    config = str(_config(tmp_path, cache, "tested", max_steps=2))
    main(["fit", "--config", config])
    ckpt = tmp_path / "ckpt_tested" / "last.ckpt"
    main(["test", "--config", config, "--ckpt_path", str(ckpt)])
    assert "test/loss" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["predict", "--config", config])
    assert "invalid choice: 'predict'" in capsys.readouterr().err


def test_the_test_split_is_disjoint_from_train_and_validation(tmp_path: Path, cache: Path) -> None:
    dm = TextDataModule(
        corpus="stdlib", max_corpus_bytes=400_000, bpe_vocab_size=512, seq_len=32, cache_dir=str(cache),
        test_fraction=0.1,
    )  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    assert dm._shards is not None and dm._train is not None and dm._val is not None
    test = dm._shards.test_split(dm.val_fraction, 0.1, 32)
    spans = {
        name: {(int(a), int(a + n)) for a, n in ds.runs}
        for name, ds in (("train", dm._train), ("val", dm._val), ("test", test))
    }
    assert spans["test"] and len(test) > 0
    for a, b in (("train", "test"), ("val", "test"), ("train", "val")):
        assert not any(s < e2 and s2 < e for s, e in spans[a] for s2, e2 in spans[b]), (a, b)
    # without a test share, train keeps those documents
    plain = TextDataModule(
        corpus="stdlib", max_corpus_bytes=400_000, bpe_vocab_size=512, seq_len=32, cache_dir=str(cache),
        test_fraction=0.0,
    )  # fmt: skip
    plain.prepare_data()
    plain.setup("fit")
    assert plain._train is not None and len(plain._train) > len(dm._train)
    with pytest.raises(ValueError, match="the test split is empty"):
        plain.test_dataloader()


def test_errors_are_one_line_and_short_callback_names_work(
    tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture
) -> None:
    config = str(_config(tmp_path, cache, "errors", max_steps=1))

    def fragment(name: str, init_args: dict) -> str:
        path = tmp_path / f"{name}.yaml"
        callback = {"class_path": "lit_accel.callbacks.DropBP", "init_args": init_args}
        path.write_text(yaml.safe_dump({"trainer": {"callbacks+": [callback]}}))
        return str(path)

    cases = [
        (
            ["--config", fragment("range", {"target": 5})],
            "DropBP target=5.0 is not allowed; target must be in [0, 0.9]",
        ),
        (
            ["--config", fragment("literal", {"sampling": "sideways"})],
            "sampling: Expected a typing.Literal['systematic', 'independent']. Got value: sideways",
        ),
        (["--trainer.max_stepz", "3"], "unrecognized arguments: --trainer.max_stepz 3"),
    ]
    for extra, expected in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", config, *extra])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("lit-accel: error:")]
        assert len(lines) == 1 and expected in lines[0], err
        assert "Traceback" not in err and "Subtypes" not in err
    with pytest.raises(SystemExit):
        main(["export", "--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "out")])
    assert "lit-accel: error: --ckpt" in capsys.readouterr().err

    # short names of lit_accel's callbacks
    cli = LitAccelCLI(
        args=["--config", config, "--trainer.callbacks+=DropBP", "--trainer.callbacks.target=0.3"], run=False
    )
    assert [type(c).__name__ for c in cli.trainer.callbacks if type(c).__name__ == "DropBP"] == ["DropBP"]


def test_a_resume_continues_the_same_wandb_run(tmp_path: Path, cache: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    path = _config(tmp_path, cache, "wbresume", max_steps=4)
    cfg = yaml.safe_load(path.read_text())
    cfg["trainer"]["logger"] = {
        "class_path": "lit_accel.observe.WandbLogger",
        "init_args": {"project": "t", "save_dir": str(tmp_path / "wb")},
    }
    path.write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", str(path), "--trainer.max_steps", "4"])
    wandb.finish()
    ckpt = tmp_path / "ckpt_wbresume" / "last.ckpt"
    first = torch.load(ckpt, weights_only=True)["lit_accel"]["wandb_run_id"]
    main(["fit", "--config", str(path), "--trainer.max_steps", "8", "--ckpt_path", "last"])
    wandb.finish()
    runs = sorted((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    # wandb names an offline folder offline-run-<time>-<id>, adding "-1" when two runs of one id
    # start within the same second
    ids = [re.sub(r"-\d+$", "", r.name.split("-", 3)[3]) for r in runs]
    assert len(runs) == 2 and all(i == first for i in ids), runs
    assert torch.load(ckpt, weights_only=True)["lit_accel"]["wandb_run_id"] == first
    # a run refused at set-up (another configuration's checkpoint) opens no W&B run at all
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(path), "--model.learning_rate", "0.5", "--ckpt_path", "last"])
    wandb.finish()
    assert len(sorted((tmp_path / "wb" / "wandb").glob("offline-run-*"))) == 2
    # validating the checkpoint logs to a W&B run of its own, config included (the training run's history is at a
    # later step)
    main(["validate", "--config", str(path), "--ckpt_path", "last"])
    wandb.finish()
    runs = sorted((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    (validation,) = [r for r in runs if first not in r.name]
    assert (validation / "files" / "lit_accel_config.yaml").is_file()


def test_the_launcher_never_initialises_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch.cuda.is_available() would initialise CUDA in the launching process, and the processes ddp_fork and
    # ddp_notebook fork from it could no longer use the GPU; the CLI counts devices through NVML instead
    from lit_accel.cli import _quiet_console, require_gpu_when_asked

    def poisoned() -> bool:
        raise AssertionError("torch.cuda.is_available() called")

    monkeypatch.setattr(torch.cuda, "is_available", poisoned)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    _quiet_console()
    with pytest.raises(ValueError, match=r"trainer.accelerator='gpu' \(a.yaml\) needs a CUDA GPU"):
        require_gpu_when_asked({"trainer": {"accelerator": "gpu"}, "config": ["configs/a.yaml"]})
    require_gpu_when_asked({"trainer": {"accelerator": "cpu"}})
