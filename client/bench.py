"""``lstmd bench``: a load generator in the manner of Triton's perf_analyzer in sequence mode.

N concurrent streams, each its own session, feed random in-vocabulary token ids: one token
per feed (stream mode), or ``--prompt-tokens`` per feed (prompt mode), for ``--tokens`` feeds
per stream or for ``--duration`` seconds. Reports tokens/s, latency percentiles per feed,
errors by status code, and the load generator's own CPU use; ``--processes`` spreads the
streams over several processes when one is not enough to saturate the server.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from lstmd.client._args import client_options
from lstmd.client._async import AsyncClient
from lstmd.client._errors import LstmdError


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="", help="model name (default: the server's default)")
    p.add_argument("--streams", type=int, default=8, help="concurrent streams, one session each")
    p.add_argument("--tokens", type=int, default=100, help="feeds per stream (unless --duration)")
    p.add_argument("--duration", type=float, default=0.0, help="run this many seconds instead of a count")
    p.add_argument("--prompt-tokens", type=int, default=1, help="tokens per feed: 1 = streaming, more = prompts")
    p.add_argument("--processes", type=int, default=1, help="load-generating processes (streams are split)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random token ids")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress line")


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)  # seconds per feed
    tokens: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    started: float = 0.0  # wall-clock span of the load, without start-up
    finished: float = 0.0
    cpu: float = 0.0  # this process's CPU seconds during the load


async def _one_stream(client: AsyncClient, args: argparse.Namespace, vocab: int, seed: int, deadline: float,
                      tally: Tally, progress: Any) -> None:  # fmt: skip
    rng = random.Random(seed)
    feeds = 0
    stream = client.open_stream(model=args.model)
    try:
        while (feeds < args.tokens) if not args.duration else (time.monotonic() < deadline):
            ids = [rng.randrange(2, vocab) for _ in range(args.prompt_tokens)]
            started = time.perf_counter()
            try:
                await stream.feed(ids, top_k=1)
            except LstmdError as e:
                tally.errors[e.code] = tally.errors.get(e.code, 0) + 1
                await stream.close()
                stream = client.open_stream(model=args.model)
            else:
                tally.latencies.append(time.perf_counter() - started)
                tally.tokens += len(ids)
                with progress.get_lock():
                    progress.value += len(ids)
            feeds += 1
    finally:
        await stream.close()


async def _run(args: argparse.Namespace, streams: int, first_seed: int, progress: Any) -> Tally:
    async with AsyncClient(**client_options(args)) as client:
        models = await client.list_models()
        model = next(m for m in models if m.name == args.model or (not args.model and m.is_default))
        deadline = time.monotonic() + args.duration
        tallies = [Tally() for _ in range(streams)]
        merged = Tally(started=time.time())
        cpu = time.process_time()
        await asyncio.gather(*(_one_stream(client, args, model.vocab_size, first_seed + i, deadline, t, progress)
                               for i, t in enumerate(tallies)))  # fmt: skip
        merged.cpu, merged.finished = time.process_time() - cpu, time.time()
    for t in tallies:
        merged.latencies += t.latencies
        merged.tokens += t.tokens
        for code, n in t.errors.items():
            merged.errors[code] = merged.errors.get(code, 0) + n
    return merged


_progress: Any = None  # tokens done, shared by all load-generating processes


def _init_worker(progress: Any) -> None:
    global _progress
    _progress = progress


def _worker(args: argparse.Namespace, streams: int, first_seed: int) -> dict[str, Any]:
    return asyncio.run(_run(args, streams, first_seed, _progress)).__dict__


def _show_progress(progress: Any, total: int, started: float) -> None:
    done = progress.value
    rate = done / max(time.monotonic() - started, 1e-9)
    of = f"/{total}" if total else ""
    print(f"\r{done}{of} tokens  {rate:,.0f} tokens/s", end="", file=sys.stderr, flush=True)


def run_bench(args: argparse.Namespace) -> int:
    if args.streams < 1 or args.processes < 1 or args.prompt_tokens < 1:
        print("lstmd bench: --streams, --processes and --prompt-tokens must be at least 1", file=sys.stderr)
        return 2
    context = multiprocessing.get_context("spawn")
    progress = context.Value("q", 0)
    shares = [args.streams // args.processes + (i < args.streams % args.processes) for i in range(args.processes)]
    total = 0 if args.duration else args.streams * args.tokens * args.prompt_tokens
    started = time.monotonic()
    with context.Pool(args.processes, initializer=_init_worker, initargs=(progress,)) as pool:
        seeds = itertools.accumulate([args.seed * 100_000, *shares[:-1]])  # each stream its own seed
        pending = pool.starmap_async(_worker, [(args, n, s) for n, s in zip(shares, seeds, strict=True)])
        while not pending.ready():
            if not args.quiet:
                _show_progress(progress, total, started)
            pending.wait(0.25)
        results = pending.get()
    if not args.quiet:
        _show_progress(progress, total, started)
        print(file=sys.stderr)
    report = summarize(args, results)
    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report))
    return 0


def summarize(args: argparse.Namespace, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge the processes' tallies. Time counts from the first process starting its load to the
    last one finishing, so process start-up is not counted."""
    latencies = [x * 1000 for r in results for x in r["latencies"]]
    tokens = sum(r["tokens"] for r in results)
    errors: dict[str, int] = {}
    for r in results:
        for code, n in r["errors"].items():
            errors[code] = errors.get(code, 0) + n
    cpu = sum(r["cpu"] for r in results)
    wall = max(r["finished"] for r in results) - min(r["started"] for r in results)
    percentiles = {f"p{q}": _percentile(latencies, q) for q in (50, 90, 99)}
    return {
        "streams": args.streams,
        "processes": args.processes,
        "tokens_per_feed": args.prompt_tokens,
        "feeds": len(latencies),
        "tokens": tokens,
        "seconds": wall,
        "tokens_per_s": tokens / wall,
        "latency_ms": {**percentiles, "max": max(latencies, default=0.0)},
        "errors": errors,
        "client_cpu_percent": 100 * cpu / wall / args.processes,
    }


def _percentile(values: list[float], q: int) -> float:
    """The q-th percentile, interpolated between the two nearest values (numpy's default); 0 for none."""
    if len(values) < 2:
        return values[0] if values else 0.0
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def format_report(r: dict[str, Any]) -> str:
    lat = r["latency_ms"]
    lines = [
        f"{r['streams']} streams x {r['tokens_per_feed']} token(s) per feed, {r['processes']} process(es): "
        f"{r['feeds']} feeds, {r['tokens']} tokens in {r['seconds']:.2f} s",
        "",
        f"  throughput        {r['tokens_per_s']:,.0f} tokens/s",
        f"  latency per feed  p50 {lat['p50']:.2f} ms  p90 {lat['p90']:.2f} ms  p99 {lat['p99']:.2f} ms  "
        f"max {lat['max']:.2f} ms",
        f"  errors            {', '.join(f'{c}: {n}' for c, n in r['errors'].items()) or 'none'}",
        f"  load generator    {r['client_cpu_percent']:.0f}% of a core per process",
    ]
    if r["client_cpu_percent"] > 80:
        lines.append("  (the load generator is near a full core: add --processes to be sure it is not the limit)")
    return "\n".join(lines)
