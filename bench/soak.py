"""Soak: many streams against one server for a long time, watching the server's memory and file
descriptors for growth after warm-up.

    python bench/soak.py --minutes 30                  # people: the bundled model, 64 streams
    python bench/soak.py --seconds 45 --json           # CI-sized (tests/test_soak.py runs this)
    python bench/soak.py --target HOST:PORT --pid PID  # soak a server that is already running

It starts ``python -m lstmd.server`` on a free port (unless ``--target``), then runs ``--streams``
workers split over ``--channels`` connections. Each worker opens a stream (an ephemeral session),
feeds it ``--feeds`` single random tokens, closes it and opens the next; every tenth cycle it also
creates a named session, feeds it and deletes it; every channel is closed and reopened every
``--reconnect-s`` seconds. So sessions, streams and connections are created and freed all the
time: a leak of any of them shows as growth. The server's RSS and open file descriptors
(psutil) are sampled every second; after ``--warmup-s`` the growth over the first sample after
warm-up must stay within ``--max-rss-growth-mb`` and ``--max-fd-growth``, else exit code 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from lstmd.client import AsyncClient, LstmdError


@dataclass
class Result:
    seconds: float
    streams: int
    feeds: int = 0
    tokens: int = 0
    streams_opened: int = 0
    sessions_created: int = 0
    reconnects: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    rss_mb: list[float] = field(default_factory=list)  # one sample a second
    fds: list[int] = field(default_factory=list)
    warmup_samples: int = 0

    @property
    def rss_growth_mb(self) -> float:
        after = self.rss_mb[self.warmup_samples :]
        return max(after) - after[0] if after else 0.0

    @property
    def fd_growth(self) -> int:
        after = self.fds[self.warmup_samples :]
        return max(after) - after[0] if after else 0

    def summary(self) -> str:
        w = self.warmup_samples
        errors = f"{sum(self.errors.values())} errors" + (f" {self.errors}" if self.errors else "")
        return (
            f"soak: {self.streams} streams for {self.seconds:.0f} s: {self.feeds} feeds "
            f"({self.feeds / self.seconds:.0f}/s), {self.streams_opened} streams and {self.sessions_created} named "
            "sessions opened and closed, "
            f"{self.reconnects} reconnects, {errors}; server RSS "
            f"{self.rss_mb[0]:.0f} MB at start, {self.rss_mb[w]:.0f} MB after warm-up, {max(self.rss_mb[w:]):.0f} MB "
            f"max after (growth {self.rss_growth_mb:.1f} MB); open fds {self.fds[w]} after warm-up, "
            f"{max(self.fds[w:])} max after (growth {self.fd_growth})"
        )


async def _worker(channel: list[AsyncClient], vocab: int, seed: int, args: argparse.Namespace, deadline: float,
                  result: Result) -> None:  # fmt: skip
    rng = np.random.default_rng(seed)
    cycle = 0
    while time.monotonic() < deadline:
        client = channel[0]
        cycle += 1
        try:
            async with client.open_stream(top_k=3) as stream:
                result.streams_opened += 1
                for _ in range(args.feeds):
                    await stream.feed(rng.integers(2, vocab, 1).tolist())
                    result.feeds += 1
                    result.tokens += 1
            if cycle % 10 == 0:
                async with await client.create_session() as session:
                    result.sessions_created += 1
                    await session.feed(rng.integers(2, vocab, 20).tolist())
                    result.feeds += 1
                    result.tokens += 20
        except Exception as e:  # counted, whatever it is, unless its channel was being retired meanwhile
            if client is channel[0]:
                name = e.code if isinstance(e, LstmdError) else type(e).__name__
                result.errors[name] = result.errors.get(name, 0) + 1


async def _reconnect(channels: list[list[AsyncClient]], target: str, every: float, deadline: float,
                     result: Result) -> None:  # fmt: skip
    while time.monotonic() + every < deadline:
        await asyncio.sleep(every / len(channels))
        for channel in channels:
            old, channel[0] = channel[0], AsyncClient(target, wait_for_restart_s=0)
            result.reconnects += 1
            asyncio.get_running_loop().call_later(every, lambda c=old: asyncio.ensure_future(c.close()))  # type: ignore[misc]
            await asyncio.sleep(every / len(channels))


async def _sample(process: psutil.Process, deadline: float, result: Result) -> None:
    while time.monotonic() < deadline:
        result.rss_mb.append(process.memory_info().rss / 2**20)
        result.fds.append(process.num_fds())
        await asyncio.sleep(1.0)


async def soak(target: str, pid: int, args: argparse.Namespace) -> Result:
    seconds = args.seconds or args.minutes * 60
    result = Result(seconds, args.streams, warmup_samples=int(args.warmup_s))
    channels = [[AsyncClient(target, wait_for_restart_s=0)] for _ in range(args.channels)]
    vocab = min(m.vocab_size for m in await channels[0][0].list_models())
    deadline = time.monotonic() + seconds
    tasks = [_worker(channels[i % args.channels], vocab, i, args, deadline, result) for i in range(args.streams)]
    await asyncio.gather(_sample(psutil.Process(pid), deadline, result),
                         _reconnect(channels, target, args.reconnect_s, deadline, result), *tasks)  # fmt: skip
    for channel in channels:
        await channel[0].close()
    return result


def start_server(models_dir: str) -> tuple[subprocess.Popen[str], str]:
    command = [sys.executable, "-m", "lstmd.server", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1",
               "--models-dir", models_dir]  # fmt: skip
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    assert server.stderr is not None
    for line in server.stderr:
        match = re.search(r"serving .* on 127\.0\.0\.1:(\d+)", line)
        if match:
            threading.Thread(target=server.stderr.read, daemon=True).start()  # keep the pipe drained
            return server, f"127.0.0.1:{match.group(1)}"
    raise SystemExit(f"soak: the server did not start (exit code {server.wait()})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0, help="how long to run")
    p.add_argument("--seconds", type=float, default=0.0, help="how long to run, in seconds (wins over --minutes)")
    p.add_argument("--streams", type=int, default=64, help="concurrent streams")
    p.add_argument("--channels", type=int, default=8, help="connections the streams are split over")
    p.add_argument("--feeds", type=int, default=50, help="feeds per stream before it is closed and reopened")
    p.add_argument("--reconnect-s", type=float, default=10.0, help="reopen every connection this often")
    p.add_argument("--warmup-s", type=float, default=15.0, help="growth is measured after this")
    p.add_argument("--max-rss-growth-mb", type=float, default=48.0, help="fail above this RSS growth after warm-up")
    p.add_argument("--max-fd-growth", type=int, default=16, help="fail above this fd growth after warm-up")
    p.add_argument("--models-dir", default="", help="models for the server this starts (default: bundled)")
    p.add_argument("--target", default="", help="soak this running server instead (needs --pid)")
    p.add_argument("--pid", type=int, default=0, help="process id of --target, to sample its RSS and fds")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    if bool(args.target) != bool(args.pid):
        p.error("--target and --pid go together")
    server = None
    target, pid = args.target, args.pid
    if not target:
        models = args.models_dir or str(Path(__file__).resolve().parents[1] / "server" / "models")
        server, target = start_server(models)
        pid = server.pid
    try:
        result = asyncio.run(soak(target, pid, args))
    finally:
        if server:
            server.terminate()
            server.wait(30)
    ok = (not result.errors and result.rss_growth_mb <= args.max_rss_growth_mb
          and result.fd_growth <= args.max_fd_growth)  # fmt: skip
    if args.json:
        print(json.dumps({**asdict(result), "rss_growth_mb": result.rss_growth_mb, "fd_growth": result.fd_growth,
                          "summary": result.summary(), "ok": ok}))  # fmt: skip
    else:
        print(result.summary())
        print("passed" if ok else "FAILED: errors, or growth beyond the bounds")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
