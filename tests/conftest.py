"""Shared fixtures: a small real model (random weights, exported to ONNX like any other) and
real servers on free ports with real channels."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from lstmd.export.model import LSTMLanguageModel, ModelConfig
from lstmd.export.onnx_export import write_model_dir
from lstmd.model import graph
from lstmd.model.tokenizer import EOS, UNK, Vocab
from lstmd.server.app import RunningServer, start
from lstmd.server.memory_store import MemorySessionStore
from lstmd.server.registry import load_models
from lstmd.server.settings import Settings
from lstmd.v1 import lstmd_pb2_grpc

WORDS = """
the a an of to in and is was it he she they we you i that this on for with as at by from be have not but or
his her their our my your cat dog sat ran saw mat log house tree river city day night time year man woman
child world life hand eye head heart love war peace king queen ship sea whale clouds are sky sun moon star
rain snow wind fire water stone . , ; : ! ? ' " ( )
""".split()  # noqa: SIM905
LAYERS, HIDDEN = 2, 24


FIGURES: list[str] = []  # the reliability suites' summary lines, shown at the end of every run


@pytest.fixture
def figures() -> Callable[[str], None]:
    """``figures(line)``: a suite's summary (requests sent, failures, sessions restored, inputs
    tried), printed in pytest's terminal summary, so every run shows the counts without ``-s``."""
    return FIGURES.append


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("reliability figures")
        for line in FIGURES:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder holding "tiny" (and "tiny2", to test model choice)."""
    root = tmp_path_factory.mktemp("models")
    vocab = Vocab([UNK, EOS, *WORDS])
    for seed, name in ((0, "tiny"), (1, "tiny2")):
        torch.manual_seed(seed)
        lm = LSTMLanguageModel(ModelConfig(len(vocab), HIDDEN, HIDDEN, LAYERS, dropout=0.0))
        with torch.no_grad():  # larger weights than the default init, so distributions differ clearly
            for p in lm.parameters():
                p.mul_(8)
        write_model_dir(lm.eval(), vocab, root / name / "1", name, "1")
    return root


class Reference:
    """Runs a model's ONNX file directly, the way a session would see it, for comparison."""

    def __init__(self, folder: Path):
        self.vocab = Vocab.load(folder / "vocab.txt")
        self.session = graph.load(folder / "model.onnx")

    def logprobs(self, ids: list[int]) -> np.ndarray:
        """The next-word log-probabilities after ``ids``, fed whole to a new session."""
        zero = np.zeros((LAYERS, 1, HIDDEN), np.float32)
        tokens = np.array([[self.vocab.eos_id, *ids]], np.int64)  # sessions start after "<eos>"
        logprobs: np.ndarray = graph.run(self.session, tokens, zero, zero, 1).logprobs[0]
        return logprobs

    def ids(self, text: str) -> list[int]:
        return self.vocab.encode_text(text)


@pytest.fixture(scope="session")
def reference(models_dir: Path) -> Reference:
    return Reference(models_dir / "tiny" / "1")


def settings_for(models_dir: Path, **overrides: Any) -> Settings:
    base = Settings(host="127.0.0.1", port=0, metrics_port=0, models_dir=str(models_dir), default_model="tiny")
    return dataclasses.replace(base, **overrides)


def memory_sessions(running: RunningServer) -> MemorySessionStore:
    """The in-memory store of a server started with the default ``--session-store memory``."""
    store = running.engine.store
    assert isinstance(store, MemorySessionStore)
    return store


ServerFactory = Callable[..., contextlib.AbstractAsyncContextManager[tuple[RunningServer, Any]]]


@contextlib.asynccontextmanager
async def serve(models_dir: Path, **overrides: Any) -> AsyncIterator[tuple[RunningServer, Any]]:
    """A real server in this process for the models under ``models_dir``, and a raw stub on it."""
    settings = settings_for(models_dir, **overrides)
    running = await start(settings, load_models(settings))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        yield running, lstmd_pb2_grpc.LstmdStub(channel)
    finally:
        await channel.close()
        await running.stop(0)


@pytest.fixture(scope="session")
def make_server(models_dir: Path) -> ServerFactory:
    """``async with make_server(max_sessions=2) as (server, stub)``: a fresh server with settings."""
    return functools.partial(serve, models_dir)


@pytest.fixture(scope="session")
async def shared(make_server: ServerFactory) -> AsyncIterator[tuple[RunningServer, Any]]:
    """One server with default settings, shared by tests that do not change settings."""
    async with make_server() as pair:
        yield pair


@pytest.fixture
def stub(shared: tuple[RunningServer, Any]) -> Any:
    return shared[1]


def start_process(models_dir: Path, *flags: str) -> tuple[subprocess.Popen[str], int]:
    """Start ``python -m lstmd.server`` on a free port; return it once it serves, with its port."""
    command = [sys.executable, "-m", "lstmd.server", "--models-dir", str(models_dir), "--host", "127.0.0.1",
               "--port", "0", "--metrics-port", "0", *flags]  # fmt: skip
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    for line in process.stderr:
        match = re.search(r"serving .* on 127\.0\.0\.1:(\d+)", line)
        if match:
            return process, int(match.group(1))
    raise AssertionError(f"server did not start: exit code {process.wait()}")


@pytest.fixture(scope="session")
def server_target(models_dir: Path) -> Iterator[str]:
    """``host:port`` of an lstmd-server process serving the tiny models, for blocking clients and the CLI."""
    process, port = start_process(models_dir)
    yield f"127.0.0.1:{port}"
    process.terminate()
    process.communicate(timeout=30)


class ServerProcess:
    """``python -m lstmd.server`` on free ports, its whole log kept in ``lines`` (read by a thread, so a
    chatty server never blocks on a full pipe). For tests that signal, kill and restart servers."""

    def __init__(self, models_dir: Path, *flags: str):
        command = [sys.executable, "-m", "lstmd.server", "--models-dir", str(models_dir), "--host", "127.0.0.1",
                   "--port", "0", "--metrics-port", "0", *flags]  # fmt: skip
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            match = re.search(r"serving .* on 127\.0\.0\.1:(\d+), metrics on :(\d+)/metrics", line)
            if match:
                self.port, self.metrics_port = int(match.group(1)), int(match.group(2))
                break
        else:
            raise AssertionError(f"server did not start: exit code {self.process.wait()}\n{''.join(self.lines)}")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return "".join(self.lines)

    def wait(self, timeout: float = 30) -> int:
        """Exit code, once the process ended and its log was read to the end."""
        code = self.process.wait(timeout)
        self._reader.join(timeout)
        assert self.process.stderr is not None
        self.process.stderr.close()
        return code

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.wait()


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    """Start servers with ``servers.append(ServerProcess(...))``; all are closed at the end."""
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.close()
