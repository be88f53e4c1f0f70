"""The benchmark's load generator (bench/loadgen/loadgen.js) against the echo server, for about a
second per mode: it must measure without errors, count many-mode tokens per item, and say when its
measured window opens and closes. Needs Node.js and ``npm ci --prefix bench/loadgen`` (CI runs it)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench import _process


@pytest.fixture(scope="module")
def echo() -> Iterator[_process.Server]:
    with _process.serve([sys.executable, "-m", "bench.echo_server", "--port", "0"], _process.BENCH_READY) as server:
        yield server


def run(server: _process.Server, *flags: str) -> dict[str, Any]:
    edges: list[str] = []
    report = _process.loadgen(server.target, ["--duration", "1", "--warmup", "0.3", *flags], edges.append)
    assert edges == ["measuring", "stopped"]
    assert 0.9 < report["seconds"] < 1.5, report
    return report


def test_stream_mode_one_token_per_message(echo: _process.Server) -> None:
    report = run(echo, "--streams", "4")
    assert report["mode"] == "stream" and report["errors"] == {}, report
    assert report["tokens"] == report["messages"] > 0, report
    latency = report["latency_ms"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"], latency
    assert 0 < report["client_cpu_cores"] < 2, report


def test_many_mode_counts_every_item(echo: _process.Server) -> None:
    report = run(echo, "--mode", "many", "--sessions-per-message", "16", "--streams", "2")
    assert report["mode"] == "many" and report["errors"] == {}, report
    assert report["sessions_per_message"] == report["tokens_per_message"] == 16, report
    assert report["tokens"] == 16 * report["messages"] > 0, report


def test_bench_says_how_to_install_the_packages(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(_process, "LOADGEN", tmp_path)
    with pytest.raises(SystemExit, match="npm ci --prefix bench/loadgen"):
        _process.check_loadgen()
