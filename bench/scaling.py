"""The shared session store's cost: lstmd with sessions in memory and in Redis, one replica and two
behind nginx, at 1 and 64 streams, all driven by the same load generator (bench/loadgen).

    python -m bench.scaling [--out docs/scaling] [--seconds 6]

Starts redis-server and nginx from the system's packages (as the tests do: tests/cluster.py) and
the replicas as processes on loopback, on the bundled model. Reports tokens/s, latency and CPU
seconds per 1,000 tokens of the lstmd replicas (summed), of Redis and of nginx; writes
``scaling.json`` and ``scaling.md`` to ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench import _process
from bench.cluster import Nginx, Redis
from lstmd.server.settings import BUNDLED_MODELS

STREAMS = [1, 64]


@dataclass
class Replicas(_process.Server):
    """Several lstmd servers reached through one target (nginx's); CPU and RSS are their sums."""

    members: list[_process.Server] = field(default_factory=list)

    def cpu_seconds(self) -> float:
        return sum(m.cpu_seconds() for m in self.members)

    def rss_mib(self) -> float:
        return sum(m.rss_mib() for m in self.members)


def cpu_of(pid: int) -> float:
    """User + system CPU of a process and its children (nginx's workers) so far."""
    process = psutil.Process(pid)
    total = 0.0
    for p in [process, *process.children(recursive=True)]:
        times = p.cpu_times()
        total += times.user + times.system
    return total


@contextmanager
def deployment(models_dir: str, store: str, replicas: int, folder: Path) -> Iterator[tuple[_process.Server, int]]:
    """``replicas`` lstmd servers with ``store``; behind nginx when more than one. Yields the server
    to load and the pid of the proxy (0: none)."""
    with ExitStack() as stack:
        flags = ["--session-store", store]
        members = [stack.enter_context(_process.serve(_process.lstmd_server(models_dir, *flags),
                                                      _process.LSTMD_READY)) for _ in range(replicas)]  # fmt: skip
        if replicas == 1:
            yield members[0], 0
            return
        proxy = Nginx(folder / f"nginx-{store[:5]}", [int(m.target.rsplit(":", 1)[1]) for m in members])
        stack.callback(proxy.stop)
        yield Replicas(members[0].process, proxy.target, members), proxy.process.pid


def measure(models_dir: str, seconds: float) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "redis").mkdir()
        redis = Redis(folder / "redis")
        try:
            for store in ("memory", redis.url):
                for replicas in (1, 2):
                    with deployment(models_dir, store, replicas, folder) as (server, proxy_pid):
                        _process.load(server, 8, 1)  # warm-up
                        for streams in STREAMS:
                            assert redis.process is not None
                            redis_cpu = cpu_of(redis.process.pid)
                            proxy_cpu = cpu_of(proxy_pid) if proxy_pid else 0.0
                            # no warm-up: the run above warmed the deployment, and Redis's and nginx's
                            # CPU are read around the whole run, not its measured window
                            report = _process.load(server, streams, seconds, warmup=0)
                            tokens = max(report["tokens"], 1)
                            row = {
                                "store": "memory" if store == "memory" else "redis",
                                "replicas": replicas,
                                "streams": streams,
                                "tokens_per_s": report["tokens_per_s"],
                                "latency_ms": report["latency_ms"],
                                "errors": report["errors"],
                                "server_cpu_s_per_1k_tokens": report["server_cpu_s_per_1k_tokens"],
                                "redis_cpu_s_per_1k_tokens": 1000 * (cpu_of(redis.process.pid) - redis_cpu) / tokens,
                                "nginx_cpu_s_per_1k_tokens": (
                                    1000 * (cpu_of(proxy_pid) - proxy_cpu) / tokens if proxy_pid else 0.0
                                ),
                            }
                            rows.append(row)
                            print(line(row), flush=True)
        finally:
            redis.stop()
    return rows


HEADER = (
    "| store | replicas | streams | tokens/s | p50 ms | p99 ms | lstmd CPU s/1k tok | Redis CPU s/1k tok "
    "| nginx CPU s/1k tok | errors |\n|---|---|---|---|---|---|---|---|---|---|"
)


def line(r: dict[str, Any]) -> str:
    lat = r["latency_ms"]
    return (
        f"| {r['store']} | {r['replicas']} | {r['streams']} | {r['tokens_per_s']:,.0f} | {lat['p50']:.2f} "
        f"| {lat['p99']:.2f} | {r['server_cpu_s_per_1k_tokens']:.3f} | {r['redis_cpu_s_per_1k_tokens']:.3f} "
        f"| {r['nginx_cpu_s_per_1k_tokens']:.3f} | {sum(r['errors'].values()) if r['errors'] else 0} |"
    )


def ratios(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for replicas in (1, 2):
        pick = {r["store"]: r for r in rows if r["replicas"] == replicas and r["streams"] == 64}
        if len(pick) == 2:
            ratio = pick["redis"]["server_cpu_s_per_1k_tokens"] / pick["memory"]["server_cpu_s_per_1k_tokens"]
            out.append(f"{replicas} replica(s), 64 streams: lstmd CPU per token, Redis / memory = {ratio:.2f}x "
                       f"(target: within 2x): {'met' if ratio <= 2 else 'NOT met'}")  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/scaling", help="folder for scaling.json and scaling.md")
    parser.add_argument("--models-dir", default=str(BUNDLED_MODELS))
    parser.add_argument("--seconds", type=float, default=6.0, help="load time per measured point")
    args = parser.parse_args()
    print(HEADER)
    rows = measure(args.models_dir, args.seconds)
    summary = ratios(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {psutil.cpu_count()} CPUs, Python {platform.python_version()}"
    (out / "scaling.json").write_text(json.dumps({"machine": machine, "seconds": args.seconds, "rows": rows},
                                                 indent=1) + "\n")  # fmt: skip
    table = "\n".join([HEADER, *map(line, rows)])
    (out / "scaling.md").write_text(f"{machine}; {args.seconds:g} s per point\n\n{table}\n\n" +
                                    "\n".join(f"- {s}" for s in summary) + "\n")  # fmt: skip
    print("\n".join(summary))


if __name__ == "__main__":
    main()
