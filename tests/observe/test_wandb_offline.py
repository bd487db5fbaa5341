"""W&B credentials without a network: the logger writes the run offline within seconds, with one warning naming the
folder and the `wandb sync` command, instead of waiting ~100 s for wandb.init to fail."""

from __future__ import annotations

import http.server
import os
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import wandb
from _helpers import quiet_trainer
from lightning.pytorch.loggers.logger import DummyExperiment
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader

import lit_accel.observe.wandb as wandb_module
from lit_accel.models import CausalLM
from lit_accel.observe import WandbLogger

FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"
PROXY_VARIABLES = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "WANDB_HTTP_PROXY", "WANDB_HTTPS_PROXY")
BLACKHOLE_IP = "http://10.255.255.1"
"""A private address routed nowhere on most networks (connect() times out); some sandboxes' proxies answer it."""


@pytest.fixture
def closed_port() -> Iterator[str]:
    """A local URL whose port nothing listens on: the connection is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    yield f"http://127.0.0.1:{port}"


@pytest.fixture
def blackhole() -> Iterator[str]:
    """A local URL whose connect() hangs until its timeout, as a firewall that drops packets does: a listening
    socket with a backlog of 0 and one connection never accepted, so the kernel drops every further SYN."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port), timeout=1)
    with socket.socket() as probe:
        probe.settimeout(0.3)
        try:
            probe.connect(("127.0.0.1", port))
        except TimeoutError:  # the queue is full: this kernel drops the handshake, as wanted
            pass
        else:
            filler.close()
            server.close()
            pytest.skip("this kernel completes connections beyond a full listen backlog")
    yield f"http://127.0.0.1:{port}"
    filler.close()
    server.close()


class NotWandb(http.server.BaseHTTPRequestHandler):
    """Answers every request with 404, as a proxy or a web server that is not W&B does."""

    def _not_found(self) -> None:
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = do_POST = _not_found

    def log_message(self, format: str, *args: Any) -> None:  # keep the test output clean
        pass


@pytest.fixture
def answering_server() -> Iterator[str]:
    """A local HTTP server that answers every request with 404: it is there, but it is not W&B."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotWandb)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def with_credentials(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """A fake API key and no WANDB_MODE; the set test picks WANDB_BASE_URL. Every change is undone afterwards."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    for name in PROXY_VARIABLES:  # the local servers are asked directly
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(wandb_module, "_probed", {})
    # wandb reads the WANDB_* variables once per process, at its first set-up, and ignores later changes: start it
    # afresh so it sees this test's, and again afterwards so later tests see theirs (WANDB_MODE=offline).
    wandb.teardown()
    yield monkeypatch
    if wandb.run is not None:
        wandb.finish()
    wandb.teardown()


def _start(logger: WandbLogger) -> tuple[Any, float, list[str]]:
    """Starts the logger's run; returns it, the seconds it took and the messages of the warnings raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        run = logger.experiment
        elapsed = time.perf_counter() - start
    return run, elapsed, [str(w.message) for w in caught]


def _assert_offline_with_one_warning(logger: WandbLogger, run: Any, elapsed: float, messages: list[str]) -> None:
    assert elapsed < 10, f"starting the run took {elapsed:.1f} s"
    assert run.settings.mode in ("offline", "dryrun") and logger.offline is True
    run_dir = Path(run.dir).parent
    assert run_dir.name.startswith("offline-run-") and run_dir.is_dir()
    assert (run_dir / f"run-{run.id}.wandb").is_file()  # the transaction log `wandb sync` uploads
    ours = [m for m in messages if "W&B" in m or "wandb" in m]
    assert ours == [m for m in messages if f"`wandb sync {run_dir}`" in m and "offline" in m], messages
    assert len(ours) == 1, messages


@pytest.mark.parametrize("server", ["closed_port", "blackhole", "blackhole_ip", "answering_server"])
@pytest.mark.parametrize("offline", [None, False])
def test_unreachable_server_gives_an_offline_run_and_one_warning_within_seconds(
    server: str,
    offline: bool | None,
    request: pytest.FixtureRequest,
    with_credentials: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    url = BLACKHOLE_IP if server == "blackhole_ip" else request.getfixturevalue(server)
    with_credentials.setenv("WANDB_BASE_URL", url)
    logger = WandbLogger(project="t", save_dir=str(tmp_path / "wb"), offline=offline)
    assert logger.offline is False  # decided online from the key; the probe runs only when the run starts
    run, elapsed, messages = _start(logger)
    _assert_offline_with_one_warning(logger, run, elapsed, messages)
    assert url in messages[0]
    assert "WANDB_MODE" not in os.environ  # the fallback leaves the process environment alone
    run.log({"x": 1.0})
    run.finish()


def test_a_fit_with_the_fallen_back_logger_finishes(
    closed_port: str, with_credentials: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with_credentials.setenv("WANDB_BASE_URL", closed_port)
    logger = WandbLogger(project="t", save_dir=str(tmp_path / "wb"))
    config = {"vocab_size": 64, "num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64}
    module = CausalLM("llama-tiny", config_overrides=config, warmup_steps=0)
    data = torch.randint(0, 64, (8, 8), generator=torch.Generator().manual_seed(0))
    loader: DataLoader[Any] = DataLoader([{"input_ids": x} for x in data], batch_size=4)  # type: ignore[arg-type]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = quiet_trainer(logger=logger, max_steps=2)
        trainer.fit(module, loader)
    assert trainer.global_step == 2
    run = logger.experiment
    run_dir = Path(run.dir).parent
    assert logger.offline is True and run_dir.is_dir()
    assert [str(w.message) for w in caught if "wandb sync" in str(w.message)] == [
        next(str(w.message) for w in caught if "wandb sync" in str(w.message))
    ]
    run.finish()
    assert (run_dir / f"run-{run.id}.wandb").stat().st_size > 0


def test_other_ranks_neither_probe_nor_start_a_run(
    closed_port: str, with_credentials: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Under DDP only rank zero creates the run (Lightning's rank_zero_experiment); the probe belongs to it too.
    with_credentials.setenv("WANDB_BASE_URL", closed_port)
    with_credentials.setattr(rank_zero_only, "rank", 1)
    with_credentials.setattr(wandb_module, "wandb_server_unreachable", _must_not_probe)
    logger = WandbLogger(project="t", save_dir=str(tmp_path / "wb"))
    run, _, messages = _start(logger)
    assert isinstance(run, DummyExperiment) and messages == [] and wandb.run is None
    assert not (tmp_path / "wb" / "wandb").exists()


def _must_not_probe(*args: object, **kwargs: object) -> str | None:
    raise AssertionError("the W&B server was probed")


@pytest.mark.parametrize("how", ["env", "kwarg"])
def test_a_mode_the_user_chose_is_used_as_given(
    how: str, closed_port: str, with_credentials: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with_credentials.setenv("WANDB_BASE_URL", closed_port)
    with_credentials.setattr(wandb_module, "wandb_server_unreachable", _must_not_probe)
    if how == "env":
        with_credentials.setenv("WANDB_MODE", "offline")
        logger = WandbLogger(project="t", save_dir=str(tmp_path / "wb"))
    else:
        logger = WandbLogger(project="t", save_dir=str(tmp_path / "wb"), mode="offline")
    run, _, messages = _start(logger)
    assert run.settings.mode in ("offline", "dryrun") and messages == []
    with_credentials.setenv("WANDB_MODE", "online")
    assert WandbLogger(project="t", save_dir=str(tmp_path / "wb")).may_fall_back is False
    run.finish()


def test_the_probe_counts_any_answer_and_asks_each_server_once(
    closed_port: str, blackhole: str, answering_server: str
) -> None:
    probed: dict[tuple[str, str | None], str | None] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(wandb_module, "_probed", probed)
        for name in PROXY_VARIABLES:
            mp.delenv(name, raising=False)
        assert wandb_module.wandb_server_unreachable(answering_server) is None  # a 404 is an answer
        assert "refused" in str(wandb_module.wandb_server_unreachable(closed_port))
        start = time.perf_counter()
        silent = wandb_module.wandb_server_unreachable(blackhole, timeout=0.5)
        assert silent is not None and time.perf_counter() - start < 2
        # Asked once per process: a later call answers from the cache without a network round.
        start = time.perf_counter()
        assert wandb_module.wandb_server_unreachable(blackhole, timeout=0.5) == silent
        assert time.perf_counter() - start < 0.05
        assert set(probed) == {(answering_server, None), (closed_port, None), (blackhole, None)}
