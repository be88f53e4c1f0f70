"""The session limits hold across replicas sharing Redis: ``--max-sessions`` and
``--max-sessions-per-key`` count every replica's sessions, atomically, and ``lstmd_sessions_active``
reports the shared count; a store closed at shutdown leaves no connection behind. Two real servers in
this process, one real redis-server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from bench.cluster import Redis
from lstmd.server import metrics
from lstmd.server.errors import NotFound, StoreUnavailable
from lstmd.server.redis_store import RedisSessionStore
from lstmd.server.registry import ModelRegistry
from lstmd.v1 import lstmd_pb2 as pb
from tests.conftest import serve

KEYS = {"alice": "alice-key-0123456789", "bob": "bob-key-0123456789ab"}


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[Redis]:
    server = Redis(tmp_path)
    yield server
    server.stop()


@contextlib.asynccontextmanager
async def replicas(models_dir: Path, redis: Redis, **settings: Any) -> AsyncIterator[list[Any]]:
    async with contextlib.AsyncExitStack() as stack:
        stubs = [(await stack.enter_async_context(serve(models_dir, session_store=redis.url, **settings)))[1]
                 for _ in range(2)]  # fmt: skip
        yield stubs


def auth(name: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {KEYS[name]}"),)


async def create(stub: Any, name: str) -> pb.Session:
    session: pb.Session = await stub.CreateSession(pb.CreateSessionRequest(), metadata=auth(name))
    return session


async def refused(stub: Any, name: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await create(stub, name)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    return error.value.details() or ""


async def test_max_sessions_and_the_per_key_quota_count_every_replicas_sessions(models_dir: Path, redis: Redis) -> None:
    api_keys = ",".join(f"{name}:{key}" for name, key in KEYS.items())
    async with replicas(models_dir, redis, api_keys=api_keys, max_sessions=3, max_sessions_per_key=2) as (one, two):
        first = await create(one, "alice")
        await create(two, "alice")
        assert "API key 'alice' holds its maximum of 2 sessions" in await refused(one, "alice")
        assert "API key 'alice'" in await refused(two, "alice")
        bobs = await create(two, "bob")
        assert "maximum of 3 sessions" in await refused(one, "bob")
        assert metrics.sessions_active._value.get() == 3
        await one.DeleteSession(pb.DeleteSessionRequest(session_id=first.session_id), metadata=auth("alice"))
        await create(two, "alice")  # the slot alice freed on one replica, taken on the other
        assert "maximum of 3 sessions" in await refused(one, "bob")
        await two.DeleteSession(pb.DeleteSessionRequest(session_id=bobs.session_id), metadata=auth("bob"))
        assert metrics.sessions_active._value.get() == 2


async def test_concurrent_creates_on_two_replicas_never_overshoot(models_dir: Path, redis: Redis) -> None:
    async with replicas(models_dir, redis, max_sessions=10) as stubs:

        async def attempt(n: int) -> bool:
            try:
                await stubs[n % 2].CreateSession(pb.CreateSessionRequest())
                return True
            except grpc.aio.AioRpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                return False

        created = await asyncio.gather(*(attempt(n) for n in range(40)))
    assert sum(created) == 10
    assert int(redis.cli("ZCARD", "lstmd:index").strip()) == 10


async def test_expired_sessions_free_their_places(models_dir: Path, redis: Redis) -> None:
    async with replicas(models_dir, redis, max_sessions=2, session_ttl_s=1.0, sweep_interval_s=0.2) as (one, two):
        await one.CreateSession(pb.CreateSessionRequest())
        await two.CreateSession(pb.CreateSessionRequest())
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await one.CreateSession(pb.CreateSessionRequest())
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        await asyncio.sleep(1.5)
        assert metrics.sessions_active._value.get() == 0  # the count every replica reports, refreshed
        await two.CreateSession(pb.CreateSessionRequest())


async def test_closing_the_store_with_calls_in_flight_leaves_no_connection_open(models_dir: Path, redis: Redis) -> None:
    store = RedisSessionStore(redis.url, ModelRegistry({}, ""), ttl_s=60)  # no session is read
    await store.start()
    queued = [asyncio.ensure_future(store.get(f"{n:032x}", "")) for n in range(3)]
    await asyncio.sleep(0)  # their reads are queued for the next round trip
    late = [asyncio.ensure_future(store.get(f"{n:032x}", "")) for n in range(3, 6)]  # first run after close
    await store.close()
    answers = await asyncio.gather(*queued, *late, return_exceptions=True)
    assert all(isinstance(a, NotFound | StoreUnavailable) for a in answers), answers
    assert all("stopping" in str(a) for a in answers[3:] if isinstance(a, StoreUnavailable))
    # A round trip after the pool closed used to open a connection nothing closed (a ResourceWarning
    # at exit); the store is still referenced here, so such a connection would still be listed.
    assert redis.cli("client", "list").count("id=") == 1  # redis-cli's own
