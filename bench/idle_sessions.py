"""What idle sessions cost lstmd-server in memory.

    python -m bench.idle_sessions --counts 1000,10000,100000 [--models-dir server/models] [--json]

Starts lstmd-server on a free port (with --max-sessions above the largest count, so nothing is
evicted), reads its RSS after start-up, then creates sessions with CreateSession (a few hundred
calls in flight) up to each count in turn and reads the RSS again. Reports the RSS, its growth
since start-up and that growth per session, next to the model's state_bytes (the h and c the
server keeps per session): the difference is what a session costs beyond its state.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import asdict, dataclass

import grpc
import psutil

from bench import _process
from lstmd.v1 import lstmd_pb2 as pb
from lstmd.v1 import lstmd_pb2_grpc

MIB = 1 << 20


@dataclass
class Row:
    sessions: int
    rss_mib: float
    growth_mib: float
    bytes_per_session: float
    seconds: float  # to create this row's new sessions


@dataclass
class Result:
    state_bytes: int  # ModelInfo.state_bytes of the default model
    rss_after_start_mib: float
    rows: list[Row]


async def create_sessions(stub: lstmd_pb2_grpc.LstmdAsyncStub, count: int, in_flight: int) -> None:
    remaining = count

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await stub.CreateSession(pb.CreateSessionRequest(), timeout=30)

    await asyncio.gather(*(worker() for _ in range(min(in_flight, count))))


async def measure(target: str, pid: int, counts: list[int], in_flight: int) -> Result:
    server = psutil.Process(pid)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = lstmd_pb2_grpc.LstmdStub(channel)
        models = (await stub.ListModels(pb.ListModelsRequest(), timeout=30)).models
        state_bytes = next(m.state_bytes for m in models if m.is_default)
        base = server.memory_info().rss
        rows, held = [], 0
        for count in counts:
            started = time.perf_counter()
            await create_sessions(stub, count - held, in_flight)
            seconds, held = time.perf_counter() - started, count
            rss = server.memory_info().rss
            rows.append(Row(count, rss / MIB, (rss - base) / MIB, (rss - base) / count, seconds))
    return Result(state_bytes, base / MIB, rows)


def idle_sessions(counts: list[int], models_dir: str = "server/models", in_flight: int = 256) -> Result:
    """Start a server, measure, stop it."""
    counts = sorted(counts)
    command = _process.lstmd_server(models_dir, "--max-sessions", str(counts[-1] + 1000))
    with _process.serve(command, _process.LSTMD_READY) as server:
        return asyncio.run(measure(server.target, server.process.pid, counts, in_flight))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="1000,10000,100000", help="session counts, comma separated")
    parser.add_argument("--models-dir", default="server/models")
    parser.add_argument("--in-flight", type=int, default=256, help="CreateSession calls in flight")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    result = idle_sessions([int(c) for c in args.counts.split(",")], args.models_dir, args.in_flight)
    if args.json:
        print(json.dumps(asdict(result)))
        return
    print(f"state_bytes (ModelInfo): {result.state_bytes}   RSS after start-up: {result.rss_after_start_mib:.1f} MiB")
    print(f"{'sessions':>9}  {'RSS MiB':>8}  {'growth MiB':>10}  {'bytes/session':>13}  {'create s':>8}")
    for r in result.rows:
        per_session = f"{r.bytes_per_session:>13,.0f}"
        print(f"{r.sessions:>9,}  {r.rss_mib:>8.1f}  {r.growth_mib:>10.1f}  {per_session}  {r.seconds:>8.1f}")


if __name__ == "__main__":
    main()
