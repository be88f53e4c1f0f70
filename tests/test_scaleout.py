"""Scale-out: two lstmd-server replicas sharing sessions in a real Redis, behind a real nginx, all
on loopback. Every prediction is compared, bit for bit, with an in-memory server fed the same
tokens one feed at a time."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.cluster import Nginx, Redis, free_port
from lstmd.v1 import lstmd_pb2 as pb
from lstmd.v1 import lstmd_pb2_grpc
from tests.conftest import ServerFactory, ServerProcess
from tests.test_metrics import scrape

WORDS = [5, 9, 13, 2, 40, 7, 22, 31, 8, 17, 3, 50, 11, 26, 44, 6]  # token ids of the tiny vocabulary


class Replica:
    """An lstmd-server process on a fixed port (so nginx's upstream stays valid across restarts)."""

    def __init__(self, models_dir: Path, store: str):
        self.models_dir, self.store, self.port = models_dir, store, free_port()
        self.start()

    def start(self) -> None:
        self.process = ServerProcess(self.models_dir, "--session-store", self.store, "--port", str(self.port))

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


def stub(target: str) -> Any:
    return lstmd_pb2_grpc.LstmdStub(grpc.insecure_channel(target))


def feed(s: Any, session_id: str, ids: list[int], expected: int | None = None) -> pb.Prediction:
    request = pb.FeedRequest(session_id=session_id, tokens=pb.TokenIds(ids=ids), top_k=5, return_token_logprobs=True)
    if expected is not None:
        request.expected_position = expected
    reply: pb.Prediction = s.Feed(request, timeout=10)
    return reply


def same(a: pb.Prediction, b: pb.Prediction) -> bool:
    """Equal as the client sees them, floats bit for bit; session ids aside."""
    return (a.position, list(a.tokens), list(a.candidates), list(a.token_logprobs)) == (
        b.position, list(b.tokens), list(b.candidates), list(b.token_logprobs)
    )  # fmt: skip


def reference(target: str, ids: list[int]) -> list[pb.Prediction]:
    """An in-memory server's predictions after each of ``ids``, fed one per feed."""
    s = stub(target)
    session = s.CreateSession(pb.CreateSessionRequest())
    return [feed(s, session.session_id, [i]) for i in ids]


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Redis]:
    server = Redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def replicas(models_dir: Path, redis: Redis) -> Iterator[list[Replica]]:
    pair = [Replica(models_dir, redis.url) for _ in range(2)]
    yield pair
    for replica in pair:
        replica.process.close()


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory, replicas: list[Replica]) -> Iterator[Nginx]:
    proxy = Nginx(tmp_path_factory.mktemp("nginx"), [r.port for r in replicas])
    yield proxy
    proxy.stop()


def test_a_session_continues_on_any_replica_with_identical_predictions(
    replicas: list[Replica], nginx: Nginx, server_target: str
) -> None:
    a, b, lb = stub(replicas[0].target), stub(replicas[1].target), stub(nginx.target)
    session = a.CreateSession(pb.CreateSessionRequest()).session_id
    got = [feed([a, b, lb][i % 3], session, [t]) for i, t in enumerate(WORDS)]  # A, B, nginx, A, ...
    want = reference(server_target, WORDS)
    assert all(same(g, w) for g, w in zip(got, want, strict=True))
    assert b.GetSession(pb.GetSessionRequest(session_id=session)).position == len(WORDS)
    fork = lb.ForkSession(pb.ForkSessionRequest(session_id=session)).session_id
    assert same(feed(a, fork, [4]), feed(b, session, [4]))
    lb.DeleteSession(pb.DeleteSessionRequest(session_id=session))
    with pytest.raises(grpc.RpcError) as gone:
        feed(a, session, [4])
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND


def test_concurrent_feeds_through_two_replicas_are_serialised_never_doubled(
    replicas: list[Replica], server_target: str
) -> None:
    session = stub(replicas[0].target).CreateSession(pb.CreateSessionRequest()).session_id
    answers: list[pb.Prediction] = []
    per_replica = 25

    def feeder(target: str, base: int) -> None:
        s = stub(target)
        for i in range(per_replica):  # no expected_position: each feed applies once, wherever the session is
            answers.append(feed(s, session, [base + i]))

    threads = [threading.Thread(target=feeder, args=(r.target, 2 + 25 * n)) for n, r in enumerate(replicas)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = 2 * per_replica
    assert sorted(a.position for a in answers) == list(range(1, total + 1)), "each step applied exactly once"
    applied = [a.tokens[0].id for a in sorted(answers, key=lambda a: a.position)]
    assert sorted(applied) == list(range(2, 2 + total))
    want = reference(server_target, applied)
    assert all(same(a, want[a.position - 1]) for a in answers), "every answer is the reference's at its position"
    conflicts = sum(scrape(r.process.metrics_port).get(("lstmd_store_conflicts_total", frozenset()), 0)
                    for r in replicas)  # fmt: skip
    print(f"{conflicts:g} compare-and-set conflicts resolved")


def test_a_stream_survives_killing_its_replica(replicas: list[Replica], nginx: Nginx, server_target: str) -> None:
    lb = stub(nginx.target)
    session = lb.CreateSession(pb.CreateSessionRequest()).session_id
    before = [scrape(r.process.metrics_port) for r in replicas]
    requests: list[pb.StreamRequest | None] = []
    gate = threading.Semaphore(0)

    def outgoing() -> Iterator[pb.StreamRequest]:
        while True:
            gate.acquire()
            request = requests.pop(0)
            if request is None:
                return
            yield request

    def send(position: int, token: int) -> None:
        requests.append(pb.StreamRequest(session_id=session, tokens=pb.TokenIds(ids=[token]), top_k=5,
                                         return_token_logprobs=True, expected_position=position))  # fmt: skip
        gate.release()

    replies = lb.Stream(outgoing())
    got: dict[int, pb.Prediction] = {}
    for position, token in enumerate(WORDS[:8]):
        send(position, token)
        got[position + 1] = next(replies)
    key = ("grpc_server_started_total", frozenset({("grpc_type", "bidi_stream"), ("grpc_service", "lstmd.v1.Lstmd"),
                                                   ("grpc_method", "Stream")}))  # fmt: skip
    on = [scrape(r.process.metrics_port).get(key, 0) - b.get(key, 0) for r, b in zip(replicas, before, strict=True)]
    victim = replicas[on.index(1)]
    send(8, WORDS[8])  # in flight while its replica dies: applied or not, never twice
    victim.process.process.kill()
    victim.process.wait()
    try:
        with pytest.raises(grpc.RpcError):
            for reply in replies:
                got[reply.position] = reply
        requests.append(None)  # ends the request iterator's thread
        gate.release()
        # the client's recovery: a new stream through nginx (to the surviving replica), resending from
        # the last position it knows with expected_position; the server replays what was applied
        resumed = lb.Stream(
            pb.StreamRequest(session_id=session if i == 8 else "", tokens=pb.TokenIds(ids=[t]), top_k=5,
                             return_token_logprobs=True, expected_position=i)
            for i, t in enumerate(WORDS) if i >= 8
        )  # fmt: skip
        for reply in resumed:
            got[reply.position] = reply
        assert lb.GetSession(pb.GetSessionRequest(session_id=session)).position == len(WORDS)
        want = reference(server_target, WORDS)
        assert sorted(got) == list(range(1, len(WORDS) + 1))
        assert all(same(got[p], want[p - 1]) for p in got)
    finally:
        victim.start()


async def test_a_generation_in_redis_is_all_or_nothing(make_server: ServerFactory, redis: Redis) -> None:
    """Generate on replica A, seen from replica B: a cancelled generation leaves the session in Redis
    as it was; a feed through B during it wins and the generation ends FAILED_PRECONDITION having
    applied nothing; a delete through B ends it NOT_FOUND."""
    settings = {"session_store": redis.url, "max_generate_tokens": 100_000}
    async with make_server(**settings) as (_, a), make_server(**settings) as (_, b):
        sid = (await a.CreateSession(pb.CreateSessionRequest())).session_id
        await a.Feed(pb.FeedRequest(session_id=sid, tokens=pb.TokenIds(ids=WORDS[:3])))
        fork = (await b.ForkSession(pb.ForkSessionRequest(session_id=sid))).session_id
        uncancelled = [t.word async for t in b.Generate(pb.GenerateRequest(session_id=fork, max_tokens=12, seed=5))]

        async def three_tokens_then(action: Any, prompt: str = "") -> Any:
            call = a.Generate(pb.GenerateRequest(session_id=sid, prompt=prompt, max_tokens=100_000, seed=5))
            read = 0
            async for _ in call:
                read += 1
                if read == 3:
                    await action(call)
                    break
                await asyncio.sleep(0.02)
            return call

        async def cancel(call: Any) -> None:
            call.cancel()

        for prompt in ("", "the"):
            await three_tokens_then(cancel, prompt)
            assert (await b.GetSession(pb.GetSessionRequest(session_id=sid))).position == 3
        again = pb.GenerateRequest(session_id=sid, max_tokens=12, seed=5, expected_position=3)
        assert [t.word async for t in b.Generate(again)] == uncancelled

        async def feed_through_b(call: Any) -> None:
            reply = await b.Feed(pb.FeedRequest(session_id=sid, tokens=pb.TokenIds(ids=[4]), expected_position=15))
            assert reply.position == 16
            with pytest.raises(grpc.aio.AioRpcError) as lost:
                async for _ in call:
                    pass
            assert lost.value.code() == grpc.StatusCode.FAILED_PRECONDITION

        await three_tokens_then(feed_through_b)
        assert (await b.GetSession(pb.GetSessionRequest(session_id=sid))).position == 16

        async def delete_through_b(call: Any) -> None:
            await b.DeleteSession(pb.DeleteSessionRequest(session_id=sid))
            with pytest.raises(grpc.aio.AioRpcError) as gone:
                async for _ in call:
                    pass
            assert gone.value.code() == grpc.StatusCode.NOT_FOUND
            assert "nothing of the generation was applied" in (gone.value.details() or "")

        await three_tokens_then(delete_through_b)
        with pytest.raises(grpc.aio.AioRpcError) as deleted:
            await a.GetSession(pb.GetSessionRequest(session_id=sid))
        assert deleted.value.code() == grpc.StatusCode.NOT_FOUND


def test_sessions_survive_a_redis_restart(replicas: list[Replica], redis: Redis, server_target: str) -> None:
    a, b = stub(replicas[0].target), stub(replicas[1].target)
    session = a.CreateSession(pb.CreateSessionRequest()).session_id
    got = [feed(a, session, [t], expected=i) for i, t in enumerate(WORDS[:6])]
    redis.stop(kill=True)  # no shutdown save: what is back comes from the append-only file
    redis.start()
    got += [feed(b, session, [t], expected=i + 6) for i, t in enumerate(WORDS[6:])]
    want = reference(server_target, WORDS)
    assert all(same(g, w) for g, w in zip(got, want, strict=True))


def test_redis_unreachable_is_unavailable_and_the_server_recovers(replicas: list[Replica], redis: Redis) -> None:
    a = stub(replicas[0].target)
    session = a.CreateSession(pb.CreateSessionRequest()).session_id
    feed(a, session, [5], expected=0)
    redis.stop()
    try:
        for call in (lambda: feed(a, session, [6], expected=1), lambda: a.CreateSession(pb.CreateSessionRequest())):
            with pytest.raises(grpc.RpcError) as refused:
                call()
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            details = refused.value.details() or ""
            assert "session store" in details and "unreachable" in details, details
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(replicas[0].target))
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        assert replicas[0].process.process.poll() is None
    finally:
        redis.start()
    assert feed(a, session, [6], expected=1).position == 2
