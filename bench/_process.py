"""Starting the servers under test as processes, and reading what they cost the machine."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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
    threading.Thread(target=process.stdout.read, daemon=True).start()  # keep the pipe drained
    try:
        yield Server(process, f"127.0.0.1:{match.group(1)}")
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def lstmd_server(models_dir: str, *flags: str) -> list[str]:
    return [sys.executable, "-m", "lstmd.server", "--models-dir", models_dir, "--host", "127.0.0.1", "--port", "0",
            "--metrics-port", "-1", *flags]  # fmt: skip


LSTMD_READY = r"serving .* on 127\.0\.0\.1:(\d+)"
BENCH_READY = r"listening on 127\.0\.0\.1:(\d+)"


def load(server: Server, streams: int, seconds: float, processes: int = 1, prompt_tokens: int = 1) -> dict[str, Any]:
    """``lstmd bench`` against ``server`` for ``seconds``; its JSON report plus the server's CPU
    seconds per 1,000 tokens and RSS at the end."""
    command = [sys.executable, "-m", "lstmd.client", "bench", "--target", server.target, "--streams", str(streams),
               "--duration", str(seconds), "--prompt-tokens", str(prompt_tokens), "--processes", str(processes),
               "--json", "--quiet"]  # fmt: skip
    cpu, threads = server.cpu_seconds(), server.cpu_by_thread()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"lstmd bench failed ({done.returncode}): {done.stderr[-2000:]}")
    report: dict[str, Any] = json.loads(done.stdout)
    tokens = max(report["tokens"], 1)
    report["server_cpu_s_per_1k_tokens"] = 1000 * (server.cpu_seconds() - cpu) / tokens
    report["server_cpu_us_per_token_by_thread"] = {
        kind: 1e6 * (seconds - threads[kind]) / tokens for kind, seconds in server.cpu_by_thread().items()
    }
    report["server_rss_mib"] = server.rss_mib()
    return report
