"""Should AsyncClient coalesce concurrent feeds into FeedMany messages by default?

    python -m bench.coalesce [--seconds 5] [--sessions 1,8,64,256]

A Python gateway as people write one: N AsyncSessions of one AsyncClient, each feeding one random
token at a time and awaiting its answer (closed loop), all concurrently, against lstmd-server on
the bundled model; once with ``coalesce_feeds=True`` (FeedMany messages) and once with False
(a Feed call per feed), alternating. Prints tokens/s, the median feed latency, and the CPU of the
server and of the gateway process per token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from typing import Any

import psutil

from bench import _process
from lstmd.client import AsyncClient
from lstmd.server.settings import BUNDLED_MODELS


async def gateway(target: str, server: psutil.Process, sessions: int, seconds: float, coalesce: bool) -> dict[str, Any]:
    async with AsyncClient(target, coalesce_feeds=coalesce) as client:
        vocab = (await client.list_models())[0].vocab_size
        people = [await client.create_session() for _ in range(sessions)]
        latencies: list[float] = []

        async def typist(session: Any, seed: int, until: float) -> None:
            rng = random.Random(seed)
            while time.perf_counter() < until:
                started = time.perf_counter()
                await session.feed([rng.randrange(2, vocab)], top_k=1, tokens=True)
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(typist(p, i, time.perf_counter() + 1) for i, p in enumerate(people)))  # warm-up
        latencies.clear()
        server_cpu, cpu, started = sum(server.cpu_times()[:2]), time.process_time(), time.perf_counter()
        await asyncio.gather(*(typist(p, i, started + seconds) for i, p in enumerate(people)))
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
        server_cpu = sum(server.cpu_times()[:2]) - server_cpu
        for p in people:
            await p.delete()
    return {"sessions": sessions, "coalesce": coalesce, "tokens_per_s": len(latencies) / wall,
            "p50_ms": 1000 * statistics.median(latencies), "gateway_cpu_us_per_token": 1e6 * cpu / len(latencies),
            "server_cpu_us_per_token": 1e6 * server_cpu / len(latencies)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--sessions", default="1,8,64,256")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    with _process.serve(_process.lstmd_server(str(BUNDLED_MODELS)), _process.LSTMD_READY) as server:
        process = psutil.Process(server.process.pid)
        for n in map(int, args.sessions.split(",")):
            for coalesce in (False, True):
                rows.append(asyncio.run(gateway(server.target, process, n, args.seconds, coalesce)))
    if args.json:
        print(json.dumps(rows))
        return
    print("| sessions | feeds sent as | tokens/s | p50 ms | server CPU us/token | gateway CPU us/token |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['sessions']} | {'FeedMany (coalesced)' if r['coalesce'] else 'Feed calls'} | "
              f"{r['tokens_per_s']:,.0f} | {r['p50_ms']:.2f} | {r['server_cpu_us_per_token']:.0f} | "
              f"{r['gateway_cpu_us_per_token']:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
