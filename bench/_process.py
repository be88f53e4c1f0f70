"""Starting the servers under test as processes, and reading what they cost the machine."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil


@dataclass
class Server:
    process: subprocess.Popen[str]
    target: str  # host:port

    def cpu_seconds(self) -> float:
        """User + system CPU of the server and its children (TorchServe's workers) so far."""
        total = 0.0
        for p in [psutil.Process(self.process.pid), *psutil.Process(self.process.pid).children(recursive=True)]:
            try:
                times = p.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
        return total

    def cpu_by_thread(self) -> dict[str, float]:
        """CPU seconds so far by kind of thread: the main thread (lstmd's event loop), gRPC's
        core threads (named ``event_engine`` or ``grpc_*`` by gRPC), and other threads (lstmd's
        ONNX Runtime thread)."""
        pid, kinds = self.process.pid, {"main thread": 0.0, "gRPC core threads": 0.0, "other threads": 0.0}
        for thread in psutil.Process(pid).threads():
            try:
                with open(f"/proc/{pid}/task/{thread.id}/comm") as f:
                    name = f.read().strip()
            except OSError:
                continue
            kind = "main thread" if thread.id == pid else "gRPC core threads" if name.startswith(("event_engine",
                   "grpc")) else "other threads"  # fmt: skip
            kinds[kind] += thread.user_time + thread.system_time
        return kinds

    def rss_mib(self) -> float:
        return float(psutil.Process(self.process.pid).memory_info().rss) / (1 << 20)


@contextmanager
def serve(
    command: list[str], ready: str, cwd: str | None = None, env: dict[str, str] | None = None
) -> Iterator[Server]:
    """Run ``command`` (in ``cwd``, ``env`` added to its environment) until the block ends; ``ready`` is
    a regex whose group 1 is the port, matched against the process's output lines (stdout and stderr together)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
                               env={**os.environ, **(env or {})})  # fmt: skip
    assert process.stdout is not None
    seen: list[str] = []
    for line in process.stdout:
        seen.append(line)
        match = re.search(ready, line)
        if match:
            break
    else:
        raise RuntimeError(f"{' '.join(command)} did not start (exit code {process.wait()}):\n{''.join(seen[-20:])}")
    drain = threading.Thread(target=process.stdout.read, daemon=True)  # keep the pipe drained
    drain.start()
    try:
        yield Server(process, f"127.0.0.1:{match.group(1)}")
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        drain.join(timeout=5)  # the pipe ends with the process (or its children, which hold it too)
        if not drain.is_alive():
            process.stdout.close()


def lstmd_server(models_dir: str, *flags: str) -> list[str]:
    return [sys.executable, "-m", "lstmd.server", "--models-dir", models_dir, "--host", "127.0.0.1", "--port", "0",
            "--metrics-port", "-1", *flags]  # fmt: skip


LSTMD_READY = r"serving .* on 127\.0\.0\.1:(\d+)"
BENCH_READY = r"listening on 127\.0\.0\.1:(\d+)"


LOADGEN = Path(__file__).resolve().parent / "loadgen"


def check_loadgen() -> None:
    """Fail with what to do when the load generator (Node.js and its packages) cannot run."""
    if shutil.which("node") is None:
        raise SystemExit("bench's load generator needs Node.js 18+ (node on PATH); install it, then run "
                         "npm ci --prefix bench/loadgen")  # fmt: skip
    if not (LOADGEN / "node_modules" / "@grpc" / "grpc-js").is_dir():
        raise SystemExit("bench's load generator has no packages: run npm ci --prefix bench/loadgen")


def loadgen(target: str, flags: list[str], window: Callable[[str], None] = lambda edge: None) -> dict[str, Any]:
    """Run ``bench/loadgen/loadgen.js --target target *flags --json`` and return its report. It says on
    stderr when its measured window opens and closes; ``window("measuring")`` and ``window("stopped")``
    are called then, so what the caller samples there covers the same seconds as the figures."""
    check_loadgen()
    command = ["node", str(LOADGEN / "loadgen.js"), "--target", target, *flags, "--json"]
    said: list[str] = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        assert process.stdout is not None and process.stderr is not None
        for line in process.stderr:  # the report is one short line on stdout: its pipe cannot fill meanwhile
            edge = line.removeprefix("loadgen: ").strip()
            if edge in ("measuring", "stopped"):
                window(edge)
            else:
                said.append(line)
        out, code = process.stdout.read(), process.wait()
    if code:
        raise RuntimeError(f"the load generator failed ({code}): {' '.join(command)}\n{''.join(said)[-2000:]}")
    report: dict[str, Any] = json.loads(out)
    return report


def load(
    server: Server, streams: int, seconds: float, prompt_tokens: int = 1, sessions_per_message: int = 0,
    warmup: float = 1.0,
) -> dict[str, Any]:  # fmt: skip
    """The load generator against ``server`` for ``seconds`` after ``warmup`` seconds: ``streams``
    Stream calls of ``prompt_tokens`` tokens per message, or with ``sessions_per_message`` that many
    sessions per FeedMany message on each of ``streams`` FeedMany calls. Its JSON report, plus the
    server's CPU seconds per 1,000 tokens and by thread over the measured window, and its RSS."""
    flags = ["--streams", str(streams), "--duration", str(seconds), "--warmup", str(warmup),
             "--prompt-tokens", str(prompt_tokens)]  # fmt: skip
    if sessions_per_message:
        flags += ["--mode", "many", "--sessions-per-message", str(sessions_per_message)]
    samples: dict[str, tuple[float, dict[str, float]]] = {}

    def window(edge: str) -> None:
        samples[edge] = server.cpu_seconds(), server.cpu_by_thread()

    report = loadgen(server.target, flags, window)
    (cpu, threads), (cpu_end, threads_end) = samples["measuring"], samples["stopped"]
    tokens = max(report["tokens"], 1)
    report["server_cpu_s_per_1k_tokens"] = 1000 * (cpu_end - cpu) / tokens
    report["server_cpu_us_per_token_by_thread"] = {
        kind: 1e6 * (seconds - threads[kind]) / tokens for kind, seconds in threads_end.items()
    }
    report["server_rss_mib"] = server.rss_mib()
    return report
