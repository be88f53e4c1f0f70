"""Why a session ended: NOT_FOUND of a caller's own session says the reason and the time (trailing
metadata ``lstmd-session-end`` and ``lstmd-session-ended-at``, FeedError.session_end / ended_at, the
client's NotFound.reason / ended_at) for each way a session ends, on real servers: in this process,
as real processes restarted with and without snapshots, and on a real redis-server. Another key's
caller, and an unknown id, get the plain NOT_FOUND, the same byte for byte."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import time
import tracemalloc
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import pytest

from bench.cluster import Redis
from lstmd import client
from lstmd.client import AsyncClient, Client
from lstmd.server.endings import Ending, Endings
from lstmd.server.session_ids import SECRET_FILE, SessionIds
from lstmd.v1 import lstmd_pb2 as pb
from lstmd.v1 import lstmd_pb2_grpc
from tests.conftest import ServerFactory, ServerProcess, memory_sessions, serve
from tests.test_metrics import delta, scrape

ALICE, BOB = "alice-key-Qm4v8Tz1pXw3", "bob-key-Hn6r2Ks9Ld5c"
API_KEYS = f"alice:{ALICE},bob:{BOB}"
SESSION_KEY = "session-key-for-the-end-tests-0123456789"
UNKNOWN = "0123456789abcdef0123456789abcdef"  # well formed, never issued


def auth(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


async def ended(call: Any) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    """The status code, message and trailing metadata a call ended with; it must fail."""
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call
    return error.value.code(), error.value.details() or "", dict(error.value.trailing_metadata() or ())


def ended_at(metadata: dict[str, str]) -> float:
    stamp = metadata["lstmd-session-ended-at"]
    assert stamp.endswith("Z") and len(stamp) == len("2026-12-02T06:00:00.123Z")
    return datetime.fromisoformat(stamp).timestamp()


async def assert_ended(stub: Any, session_id: str, reason: str, after: float, before: float | None = None,
                       metadata: tuple[tuple[str, str], ...] = ()) -> str:  # fmt: skip
    """GetSession and Feed of ``session_id`` end NOT_FOUND with ``reason``, at a time in [after, before]
    (to the millisecond; ``before`` None: when the GetSession was answered); returns the message."""
    code, message, trailing = await ended(stub.GetSession(pb.GetSessionRequest(session_id=session_id),
                                                          metadata=metadata))  # fmt: skip
    before = time.time() if before is None else before
    assert code == grpc.StatusCode.NOT_FOUND and trailing["lstmd-session-end"] == reason, message
    assert after - 0.001 <= ended_at(trailing) <= before + 0.001
    assert message.startswith(f"session {session_id} ") and trailing["lstmd-session-ended-at"] in message
    feed = stub.Feed(pb.FeedRequest(session_id=session_id, text="the"), metadata=metadata)
    assert await ended(feed) == (code, message, trailing)
    return message


async def assert_plain(stub: Any, session_id: str, metadata: tuple[tuple[str, str], ...] = ()) -> None:
    """NOT_FOUND exactly as for an id never issued: the same code, message (but the id) and metadata."""
    calls: list[Callable[[str], Any]] = [
        lambda i: stub.GetSession(pb.GetSessionRequest(session_id=i), metadata=metadata),
        lambda i: stub.Feed(pb.FeedRequest(session_id=i, text="the"), metadata=metadata),
        lambda i: stub.DeleteSession(pb.DeleteSessionRequest(session_id=i), metadata=metadata),
    ]
    for call in calls:
        code, message, trailing = await ended(call(session_id))
        assert (code, message.replace(session_id, UNKNOWN), trailing) == await ended(call(UNKNOWN))
        assert code == grpc.StatusCode.NOT_FOUND and not any(k.startswith("lstmd-") for k in trailing)


async def create(stub: Any, metadata: tuple[tuple[str, str], ...] = ()) -> str:
    session_id: str = (await stub.CreateSession(pb.CreateSessionRequest(), metadata=metadata)).session_id
    return session_id


# each reason


async def test_deleted_sessions_and_ephemeral_ones_say_deleted_and_when(make_server: ServerFactory) -> None:
    async with make_server() as (_, stub):
        session_id = await create(stub)
        before = time.time()
        await stub.DeleteSession(pb.DeleteSessionRequest(session_id=session_id))
        message = await assert_ended(stub, session_id, "deleted", before)
        assert "was deleted" in message and message.endswith("create a new one")
        before = time.time()
        async for prediction in stub.Stream(iter([pb.StreamRequest(text="the cat")])):  # an ephemeral session
            ephemeral = prediction.session_id
        await assert_ended(stub, ephemeral, "deleted", before)


async def test_idle_sessions_say_expired(make_server: ServerFactory) -> None:
    async with make_server(session_ttl_s=0.2, sweep_interval_s=0.05) as (running, stub):
        session_id = await create(stub)
        created = time.time()
        while len(memory_sessions(running)):
            await asyncio.sleep(0.05)
        message = await assert_ended(stub, session_id, "expired", created + 0.2)
        assert "expired after 0.2 s idle" in message


async def test_the_least_recently_used_says_evicted(make_server: ServerFactory) -> None:
    async with make_server(max_sessions=2, at_capacity="evict") as (running, stub):
        first = await create(stub)
        await create(stub)
        counted = scrape(running.metrics_port)
        before = time.time()
        await create(stub)
        assert "was evicted" in await assert_ended(stub, first, "evicted", before)
        now = scrape(running.metrics_port)
        assert delta(counted, now, "lstmd_sessions_ended_total", reason="evicted") == 1
        assert delta(counted, now, "lstmd_sessions_evicted_total") == 1


async def test_a_session_ends_at_its_lifetime_however_it_is_used(make_server: ServerFactory) -> None:
    """Fed all the time, it still ends: the feed after the deadline is NOT_FOUND "lifetime", and so is a
    stream's next feed after it; Session.expires says when. The sweeper ends idle ones."""
    lifetime = 0.6
    async with make_server(session_max_lifetime_s=lifetime, sweep_interval_s=3600) as (_, stub):
        info = await stub.CreateSession(pb.CreateSessionRequest())
        created = info.created.ToNanoseconds() / 1e9
        assert info.expires.ToNanoseconds() / 1e9 == pytest.approx(created + lifetime, abs=1e-6)
        streamed = await stub.CreateSession(pb.CreateSessionRequest())
        stream = stub.Stream()
        await stream.write(pb.StreamRequest(session_id=streamed.session_id, text="the"))
        assert (await stream.read()).position == 1
        while time.time() < created + lifetime - 0.2:
            await stub.Feed(pb.FeedRequest(session_id=info.session_id, text="the"))
            await asyncio.sleep(0.05)
        await asyncio.sleep(streamed.created.ToNanoseconds() / 1e9 + lifetime - time.time() + 0.01)
        message = await assert_ended(stub, info.session_id, "lifetime", created + lifetime)
        assert f"maximum session lifetime of {lifetime:g} s" in message
        await stream.write(pb.StreamRequest(text="cat"))  # the stream held it at the deadline
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stream.read()
        assert dict(error.value.trailing_metadata() or ())["lstmd-session-end"] == "lifetime"
    async with make_server(session_max_lifetime_s=0.2, sweep_interval_s=0.05) as (running, stub):
        session_id = await create(stub)
        created = time.time()
        while len(memory_sessions(running)):  # nobody calls: the sweeper ends it
            await asyncio.sleep(0.05)
        await assert_ended(stub, session_id, "lifetime", created + 0.2)
    async with make_server() as (_, stub):
        assert not (await stub.CreateSession(pb.CreateSessionRequest())).HasField("expires")  # no limit


# what another key, and a forgotten record, see


async def test_another_key_learns_nothing_of_a_session_that_ended(make_server: ServerFactory) -> None:
    async with make_server(api_keys=API_KEYS) as (_, stub):
        gone, live = await create(stub, auth(ALICE)), await create(stub, auth(ALICE))
        before = time.time()
        await stub.DeleteSession(pb.DeleteSessionRequest(session_id=gone), metadata=auth(ALICE))
        await assert_ended(stub, gone, "deleted", before, metadata=auth(ALICE))
        for session_id in (gone, live, UNKNOWN[::-1]):
            await assert_plain(stub, session_id, auth(BOB))
        await stub.GetSession(pb.GetSessionRequest(session_id=live), metadata=auth(ALICE))  # untouched


async def test_the_records_are_bounded_and_the_oldest_is_forgotten(make_server: ServerFactory) -> None:
    async with make_server(ended_sessions_kept=3) as (_, stub):
        ids = [await create(stub) for _ in range(4)]
        for session_id in ids:
            await stub.DeleteSession(pb.DeleteSessionRequest(session_id=session_id))
        await assert_plain(stub, ids[0])  # forgotten: issued by this run, so not "restart" either
        for session_id in ids[1:]:
            await assert_ended(stub, session_id, "deleted", 0)


def test_a_record_costs_about_250_bytes(figures: Callable[[str], None]) -> None:
    """The figure docs/reliability.md states, measured: records of distinct 32-character ids."""
    count, ids, owner = 20_000, SessionIds.per_process(), "alice"
    made = [ids.new(owner) for _ in range(count)]
    endings = Endings(count)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for session_id in made:
            endings.add(Ending(session_id, "deleted", time.time(), owner))
        per_record = (tracemalloc.get_traced_memory()[0] - before) / count
    finally:
        tracemalloc.stop()
    ids_bytes = sum(map(len, made)) / count + 49  # the ids, held by the sessions before: not the record's
    figures(f"session end/records: {per_record + ids_bytes:.0f} bytes a record with its id "
            f"({per_record:.0f} without), {count:,} records")  # fmt: skip
    assert 100 < per_record + ids_bytes < 400 and len(endings) == count


async def test_a_feed_many_item_carries_the_reason(make_server: ServerFactory) -> None:
    async with make_server() as (_, stub):
        gone, live = await create(stub), await create(stub)
        before = time.time()
        await stub.DeleteSession(pb.DeleteSessionRequest(session_id=gone))
        after = time.time()
        items = [pb.FeedRequest(session_id=i, text="the") for i in (gone, live, UNKNOWN)]
        async for response in stub.FeedMany(iter([pb.FeedManyRequest(items=items)])):
            error, fed, unknown = response.results
        assert error.error.code == grpc.StatusCode.NOT_FOUND.value[0] and "was deleted" in error.error.message
        assert error.error.session_end == pb.SESSION_END_DELETED
        assert before - 0.001 <= error.error.ended_at.ToNanoseconds() / 1e9 <= after + 0.001
        assert fed.prediction.position == 1
        assert unknown.error.session_end == pb.SESSION_END_UNSPECIFIED and not unknown.error.HasField("ended_at")


async def test_the_client_library_carries_the_reason(make_server: ServerFactory) -> None:
    async with (
        make_server(max_sessions=2, at_capacity="evict") as (running, stub),
        AsyncClient(f"127.0.0.1:{running.port}", retries=0) as lstmd,  # feeds go as FeedMany items
        AsyncClient(f"127.0.0.1:{running.port}", retries=0, coalesce_feeds=False) as unary,  # as Feed calls
    ):
        session = await lstmd.create_session()
        await session.feed("the cat")
        before = time.time()
        await stub.DeleteSession(pb.DeleteSessionRequest(session_id=session.id))
        with pytest.raises(client.NotFound) as error:
            await lstmd.feed(session.id, "sat")
        assert error.value.reason == "deleted" and error.value.ended_at is not None
        assert before - 0.001 <= error.value.ended_at.timestamp() <= time.time() + 0.001
        with pytest.raises(client.NotFound) as direct:
            await unary.feed(session.id, "sat")
        assert (direct.value.reason, direct.value.ended_at) == ("deleted", error.value.ended_at)
        answers = await lstmd.feed_many([(session.id, "sat")])
        assert isinstance(answers[0], client.NotFound) and answers[0].reason == "deleted"
        assert answers[0].ended_at == error.value.ended_at
        with pytest.raises(client.NotFound) as unknown:
            await lstmd.feed(UNKNOWN, "sat")
        assert (unknown.value.reason, unknown.value.ended_at) == (None, None)
        kept = await lstmd.create_session()
        await kept.feed("the dog")
        await create(stub)
        await create(stub)  # evicts it
        await kept.feed("ran")  # recovered from its tail
        (recovery,) = kept.recoveries
        assert (recovery.reason, recovery.ended, recovery.exact) == ("not_found", "evicted", True)


# restarts


def test_a_session_lost_at_a_restart_says_restart_with_a_session_key(models_dir: Path, servers: list[Any]) -> None:
    """No snapshot, but a session key: the restarted server recognises the ids the first one issued
    to the caller; another key's, and an unknown id, get the plain NOT_FOUND."""
    flags = ("--api-keys", API_KEYS, "--session-keys", SESSION_KEY)
    servers.append(ServerProcess(models_dir, *flags))

    async def before_restart() -> str:
        async with grpc.aio.insecure_channel(servers[0].target) as channel:
            return await create(lstmd_pb2_grpc.LstmdStub(channel), auth(ALICE))

    session_id = asyncio.run(before_restart())
    servers[0].process.kill()
    servers[0].wait()
    started = time.time()
    servers.append(ServerProcess(models_dir, *flags))

    async def after_restart() -> None:
        async with grpc.aio.insecure_channel(servers[1].target) as channel:
            stub = lstmd_pb2_grpc.LstmdStub(channel)
            message = await assert_ended(stub, session_id, "restart", started, metadata=auth(ALICE))
            assert "lost when the server restarted" in message
            await assert_plain(stub, session_id, auth(BOB))
            await assert_plain(stub, await create(stub, auth(ALICE)), auth(BOB))

    asyncio.run(after_restart())
    with Client(servers[1].target, api_key=ALICE, retries=0) as blocking:  # the blocking client says it too
        with pytest.raises(client.NotFound) as error:
            blocking.feed(session_id, "the")
        assert error.value.reason == "restart" and error.value.ended_at is not None
        assert started - 0.001 <= error.value.ended_at.timestamp() <= time.time()


def test_with_a_snapshot_dir_records_survive_a_graceful_restart_and_a_crash_says_restart(
    models_dir: Path, servers: list[Any], tmp_path: Path
) -> None:
    """No session key: the id secret is kept in the snapshot folder (mode 0600). A session deleted
    before a graceful restart is still "deleted" after it, at its time; one created after the last
    snapshot and lost in a crash is "restart"."""
    flags = ("--snapshot-dir", str(tmp_path))
    servers.append(ServerProcess(models_dir, *flags))
    secret = tmp_path / SECRET_FILE
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and len(kept_secret := secret.read_bytes()) == 32

    async def on(server: Any, work: Callable[[Any], Any]) -> Any:
        async with grpc.aio.insecure_channel(server.target) as channel:
            return await work(lstmd_pb2_grpc.LstmdStub(channel))

    async def first(stub: Any) -> tuple[str, str, float, float]:
        deleted, kept = await create(stub), await create(stub)
        before = time.time()
        await stub.DeleteSession(pb.DeleteSessionRequest(session_id=deleted))
        return deleted, kept, before, time.time()

    deleted, kept, before, after = asyncio.run(on(servers[0], first))
    servers[0].process.send_signal(signal.SIGTERM)
    assert servers[0].wait() == 0
    servers.append(ServerProcess(models_dir, *flags))

    async def second(stub: Any) -> str:
        await assert_ended(stub, deleted, "deleted", before, after)
        await stub.GetSession(pb.GetSessionRequest(session_id=kept))  # restored
        return await create(stub)

    lost = asyncio.run(on(servers[1], second))
    servers[1].process.kill()  # no snapshot of ``lost``
    servers[1].wait()
    started = time.time()
    servers.append(ServerProcess(models_dir, *flags))

    async def third(stub: Any) -> None:
        await assert_ended(stub, lost, "restart", started)
        await assert_ended(stub, deleted, "deleted", before, after)  # the graceful restart's snapshot holds it
        await assert_plain(stub, UNKNOWN[::-1])

    asyncio.run(on(servers[2], third))
    assert secret.read_bytes() == kept_secret and stat.S_IMODE(os.stat(secret).st_mode) == 0o600


# Redis


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[Redis]:
    server = Redis(tmp_path)
    yield server
    server.stop()


async def test_in_redis_each_replica_tells_why(models_dir: Path, redis: Redis) -> None:
    """Two replicas with the same session key: a session deleted on one is "deleted" on the other; one
    that Redis expired is "expired", at its expiry; one past its lifetime is "lifetime"; another key
    learns nothing."""
    settings = {"session_store": redis.url, "api_keys": API_KEYS, "session_keys": SESSION_KEY,
                "session_ttl_s": 0.5, "sweep_interval_s": 0.1, "session_max_lifetime_s": 2.0}  # fmt: skip
    async with serve(models_dir, **settings) as (_, one), serve(models_dir, **settings) as (_, two):
        idle_since = time.time()
        deleted, idle = await create(one, auth(ALICE)), await create(one, auth(ALICE))
        before = time.time()
        await one.DeleteSession(pb.DeleteSessionRequest(session_id=deleted), metadata=auth(ALICE))
        await assert_ended(two, deleted, "deleted", before, metadata=auth(ALICE))
        await assert_plain(two, deleted, auth(BOB))
        await asyncio.sleep(0.8)  # past the TTL: Redis drops the hash, the index prune records why
        await assert_ended(two, idle, "expired", idle_since + 0.5, metadata=auth(ALICE))
        await assert_plain(one, idle, auth(BOB))
        used = await one.CreateSession(pb.CreateSessionRequest(), metadata=auth(ALICE))
        created = used.created.ToNanoseconds() / 1e9
        while time.time() < created + 2.0 - 0.3:
            await two.Feed(pb.FeedRequest(session_id=used.session_id, text="the"), metadata=auth(ALICE))
            await asyncio.sleep(0.1)
        await asyncio.sleep(created + 2.0 - time.time() + 0.01)
        await assert_ended(one, used.session_id, "lifetime", created + 2.0, metadata=auth(ALICE))
