"""Faults under load, seen through the client library: the server is stopped (SIGTERM) or killed
(SIGKILL) while sessions are being fed, and restarted by the test on the same port and snapshot
folder. The callers' feeds must all succeed (the library waits out the restart and recovers
sessions), and every session must end bit-for-bit where a session that never saw a restart
ends, fed the same feeds.

(Corrupt, truncated and newer-format snapshots and an unwritable snapshot folder are in
tests/test_durable_sessions.py.)
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lstmd.client import AsyncClient, AsyncSession, Prediction
from lstmd.server.app import RunningServer
from lstmd.v1 import lstmd_pb2 as pb
from tests.conftest import ServerProcess
from tests.test_durable_sessions import PROBE, VOCAB

SESSIONS, FEEDS = 16, 40  # per test: sessions under load, feeds each


@dataclass
class Load:
    """One caller: a session fed FEEDS random feeds of 1 to 3 tokens, with its history."""

    session: AsyncSession
    rng: np.random.Generator
    chunks: list[list[int]] = field(default_factory=list)
    done: int = 0

    async def run(self, pause: float) -> None:
        for _ in range(FEEDS):
            ids = self.rng.integers(0, VOCAB, 3 if self.rng.random() < 0.2 else 1).tolist()
            await self.session.feed(ids)  # any failure fails the test
            self.chunks.append(ids)
            self.done += 1
            await asyncio.sleep(pause)


async def start_loads(client: AsyncClient, seed: int) -> list[Load]:
    loads = []
    for i in range(SESSIONS):
        session = await client.create_session(model="tiny2" if i % 4 == 3 else "tiny", top_k=1 + i % 5)
        load = Load(session, np.random.default_rng(seed + i))
        prompt = load.rng.integers(0, VOCAB, 12).tolist()
        await session.feed(prompt)
        load.chunks.append(prompt)
        loads.append(load)
    return loads


async def probe(session: AsyncSession) -> Prediction:
    return await session.feed([PROBE], top_k=10, token_logprobs=True)


async def reference_probe(stub: Any, load: Load) -> pb.Prediction:
    """The probe on a session that never saw a restart, fed the same feeds one at a time."""
    session = await stub.CreateSession(pb.CreateSessionRequest(model=load.session.info.model, top_k=1))
    feeds = [pb.StreamRequest(session_id=session.session_id, tokens=pb.TokenIds(ids=ids)) for ids in load.chunks]
    async for _ in stub.Stream(iter(feeds)):
        pass
    request = pb.FeedRequest(session_id=session.session_id, tokens=pb.TokenIds(ids=[PROBE]), top_k=10,
                             return_token_logprobs=True)  # fmt: skip
    reply: pb.Prediction = await stub.Feed(request)
    return reply


def same(got: Prediction, expected: pb.Prediction) -> bool:
    return (got.position, [(c.token_id, c.probability) for c in got.candidates], got.token_logprobs) == (
        expected.position, [(c.token_id, c.probability) for c in expected.candidates], list(expected.token_logprobs)
    )  # fmt: skip


async def restart(first: ServerProcess, models_dir: Path, flags: tuple[str, ...]) -> tuple[ServerProcess, float]:
    """Wait for ``first`` to end, start a server on its port; the seconds no server listened."""
    await asyncio.to_thread(first.wait)
    down = time.perf_counter()
    second = await asyncio.to_thread(ServerProcess, models_dir, *flags, "--port", str(first.port))
    return second, time.perf_counter() - down


async def test_sigterm_under_load_no_request_fails_and_every_session_is_restored_exactly(
    models_dir: Path, tmp_path: Path, shared: tuple[RunningServer, Any], servers: list[ServerProcess],
    figures: Callable[[str], None],
) -> None:  # fmt: skip
    flags = ("--snapshot-dir", str(tmp_path), "--grace-s", "10")
    servers.append(first := ServerProcess(models_dir, *flags))
    async with AsyncClient(first.target, wait_for_restart_s=60) as client:
        loads = await start_loads(client, seed=100)
        running = [asyncio.create_task(load.run(pause=0.01)) for load in loads]
        while min(load.done for load in loads) < FEEDS // 3:
            await asyncio.sleep(0.01)
        first.process.send_signal(signal.SIGTERM)
        second, down_s = await restart(first, models_dir, flags)
        servers.append(second)
        await asyncio.gather(*running)  # raises if any feed failed
        assert first.process.returncode == 0 and f"restored {SESSIONS} of {SESSIONS} sessions" in second.log()
        for load in loads:
            assert load.session.recoveries == [], "a graceful restart loses nothing: no recovery needed"
            assert same(await probe(load.session), await reference_probe(shared[1], load))
    feeds = sum(load.done + 1 for load in loads)
    figures(f"faults/SIGTERM: {SESSIONS} sessions, {feeds} feeds sent under load through a graceful restart, "
            f"0 failed; {SESSIONS} of {SESSIONS} restored exactly (bit-for-bit against a never-restarted "
            f"reference), 0 recoveries needed; new server serving {down_s:.2f} s after the old one exited")  # fmt: skip


async def test_sigkill_under_load_sessions_come_back_from_the_periodic_snapshot_and_are_caught_up(
    models_dir: Path, tmp_path: Path, shared: tuple[RunningServer, Any], servers: list[ServerProcess],
    figures: Callable[[str], None],
) -> None:  # fmt: skip
    flags = ("--snapshot-dir", str(tmp_path), "--snapshot-interval-s", "0.25")
    servers.append(first := ServerProcess(models_dir, *flags))
    async with AsyncClient(first.target, wait_for_restart_s=60) as client:
        loads = await start_loads(client, seed=200)
        running = [asyncio.create_task(load.run(pause=0.02)) for load in loads]
        while min(load.done for load in loads) < FEEDS // 3:
            await asyncio.sleep(0.01)
        first.process.kill()
        async with grpc.aio.insecure_channel(first.target) as raw:  # what callers get while no server runs
            with pytest.raises(grpc.aio.AioRpcError) as down:
                await health_pb2_grpc.HealthStub(raw).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert down.value.code() == grpc.StatusCode.UNAVAILABLE
        second, down_s = await restart(first, models_dir, flags)
        servers.append(second)
        await asyncio.gather(*running)  # raises if any feed failed
        restored = int(second.log().split(" of ")[0].rsplit("restored ", 1)[1])
        for load in loads:
            assert load.session.exact, "the tail (4096 tokens) covers each whole history"
            assert same(await probe(load.session), await reference_probe(shared[1], load))
    recoveries = [r for load in loads for r in load.session.recoveries]
    caught_up = sum(r.reason == "behind" for r in recoveries)
    recreated = sum(r.reason == "not_found" for r in recoveries)
    assert caught_up + recreated >= 1, "SIGKILL after the last snapshot leaves sessions behind their callers"
    feeds = sum(load.done + 1 for load in loads)
    figures(f"faults/SIGKILL: {SESSIONS} sessions, {feeds} feeds sent under load through a crash and restart, "
            f"0 failed (callers saw UNAVAILABLE until the new server served, {down_s:.2f} s after the kill); "
            f"{restored} restored from the last periodic snapshot (0.25 s), {caught_up} caught up and {recreated} "
            f"recreated by the client from its tail ({sum(r.refed for r in recoveries)} tokens re-fed); all "
            f"{SESSIONS} end bit-for-bit equal to a reference fed the same tokens")  # fmt: skip
