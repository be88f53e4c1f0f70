"""Capacity: floods against a server with limits, each answered by lstmd itself.

Sessions: a flood of concurrent CreateSession calls against a server bounded at 100 sessions, in
both policies. ``reject``: exactly the free places are granted, every other call gets
RESOURCE_EXHAUSTED (so do forks and ephemeral streams once full); ``evict``: every call is granted
and the least recently used idle sessions make room, never a session in use. Either way the
process stays up, health says SERVING, and a canary session answers bit-for-bit as a reference
session fed the same text does.

Calls: a flood of streams opened at once against --max-concurrent-calls: the admitted ones are
answered, the others refused RESOURCE_EXHAUSTED with a retry hint, health stays SERVING.

No call of a flood is shed by gRPC core before lstmd sees it: core's own limit on calls waiting for
the event loop (by default it drops some at random beyond 1,000, as CANCELLED, or INTERNAL on
streams) is raised well above these floods, and lstmd refuses what it cannot take at once."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lstmd.server.app import RunningServer
from lstmd.v1 import lstmd_pb2 as pb
from lstmd.v1 import lstmd_pb2_grpc
from tests.conftest import ServerProcess
from tests.test_metrics import scrape

LIMIT, FLOOD = 100, 2000


async def flood(stub: Any) -> Counter[str]:
    """FLOOD CreateSession calls at once; the status code names they ended with."""

    async def one() -> str:
        try:
            await stub.CreateSession(pb.CreateSessionRequest(), timeout=60)
        except grpc.aio.AioRpcError as e:
            assert e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or "maximum of 100 sessions" in (e.details() or "")
            return e.code().name
        return "OK"

    return Counter(await asyncio.gather(*(one() for _ in range(FLOOD))))


async def canary_reply(stub: Any, session_id: str, text: str) -> pb.Prediction:
    reply = await stub.Feed(pb.FeedRequest(session_id=session_id, text=text, top_k=10, return_token_logprobs=True))
    reply.ClearField("session_id")
    assert isinstance(reply, pb.Prediction)
    return reply


async def reference_reply(stub: Any, *feeds: str) -> pb.Prediction:
    """The canary's last reply on a session of the never-flooded shared server, fed the same feeds."""
    session = await stub.CreateSession(pb.CreateSessionRequest())
    for text in feeds[:-1]:
        await stub.Feed(pb.FeedRequest(session_id=session.session_id, text=text))
    return await canary_reply(stub, session.session_id, feeds[-1])


async def assert_healthy(server: ServerProcess, channel: grpc.aio.Channel) -> None:
    assert server.process.poll() is None, "the server process is still running"
    health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def handled(server: ServerProcess, code: str) -> float:
    """CreateSession calls the server's handler finished with ``code``."""
    labels = {("grpc_type", "unary"), ("grpc_service", "lstmd.v1.Lstmd"), ("grpc_method", "CreateSession")}
    return scrape(server.metrics_port).get(("grpc_server_handled_total", frozenset({*labels, ("grpc_code", code)})), 0)


@pytest.fixture
def server(models_dir: Path, request: pytest.FixtureRequest) -> Any:
    # room for every call of the flood at once: these tests are about the session limit
    flags = ("--max-sessions", str(LIMIT), "--at-capacity", request.param, "--max-concurrent-calls", str(FLOOD))
    process = ServerProcess(models_dir, *flags)
    yield process
    process.close()


@pytest.mark.parametrize("server", ["reject"], indirect=True)
async def test_reject_a_flood_gets_resource_exhausted_and_the_server_stays_healthy(
    server: ServerProcess, shared: tuple[RunningServer, Any], figures: Callable[[str], None]
) -> None:
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = lstmd_pb2_grpc.LstmdStub(channel)
        canary = await stub.CreateSession(pb.CreateSessionRequest())
        await stub.Feed(pb.FeedRequest(session_id=canary.session_id, text="the king"))
        codes = await flood(stub)
        assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"} and codes["OK"] == LIMIT - 1, codes
        assert handled(server, "OK") == LIMIT and handled(server, "RESOURCE_EXHAUSTED") == codes["RESOURCE_EXHAUSTED"]
        with pytest.raises(grpc.aio.AioRpcError) as fork:
            await stub.ForkSession(pb.ForkSessionRequest(session_id=canary.session_id))
        with pytest.raises(grpc.aio.AioRpcError) as ephemeral:
            async for _ in stub.Stream(iter([pb.StreamRequest(text="the")])):
                pass
        assert fork.value.code() == ephemeral.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        await assert_healthy(server, channel)
        expected = await reference_reply(shared[1], "the king", "and the queen")
        assert await canary_reply(stub, canary.session_id, "and the queen") == expected
        assert scrape(server.metrics_port)[("lstmd_sessions_active", frozenset())] == LIMIT
    figures(f"capacity/reject: {FLOOD} concurrent CreateSession against --max-sessions {LIMIT}: {codes['OK']} "
            f"granted, {codes['RESOURCE_EXHAUSTED']} RESOURCE_EXHAUSTED, none shed by gRPC core; fork and ephemeral "
            "stream refused too; health SERVING, canary bit-for-bit unaffected")  # fmt: skip


@pytest.mark.parametrize("server", ["evict"], indirect=True)
async def test_evict_a_flood_evicts_idle_sessions_never_one_in_use(
    server: ServerProcess, shared: tuple[RunningServer, Any], figures: Callable[[str], None]
) -> None:
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = lstmd_pb2_grpc.LstmdStub(channel)
        canary = await stub.CreateSession(pb.CreateSessionRequest())
        await stub.Feed(pb.FeedRequest(session_id=canary.session_id, text="the king"))
        in_use = stub.Stream()  # an open stream on the canary: in use, so never evicted
        await in_use.write(pb.StreamRequest(session_id=canary.session_id, text="and", expected_position=2))
        first = await in_use.read()
        assert isinstance(first, pb.Prediction) and first.position == 3
        idle = await stub.CreateSession(pb.CreateSessionRequest())  # the least recently used idle one
        codes = await flood(stub)
        assert set(codes) == {"OK"} and handled(server, "OK") == codes["OK"] + 2, codes
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await stub.GetSession(pb.GetSessionRequest(session_id=idle.session_id))
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        await in_use.write(pb.StreamRequest(text="the queen", top_k=10, return_token_logprobs=True))
        reply = await in_use.read()
        await in_use.done_writing()
        assert isinstance(reply, pb.Prediction)
        reply.ClearField("session_id")
        assert reply == await reference_reply(shared[1], "the king", "and", "the queen")
        await assert_healthy(server, channel)
        metrics = scrape(server.metrics_port)
        evicted = metrics[("lstmd_sessions_evicted_total", frozenset())]
        assert metrics[("lstmd_sessions_active", frozenset())] == LIMIT and evicted == codes["OK"] + 2 - LIMIT
    figures(f"capacity/evict: {FLOOD} concurrent CreateSession against --max-sessions {LIMIT}: {codes['OK']} "
            f"granted, none shed by gRPC core; {int(evicted)} idle sessions evicted, the one in use kept; health "
            "SERVING, canary bit-for-bit unaffected")  # fmt: skip


CALLS_LIMIT, STREAMS = 50, 2000


async def test_a_flood_of_streams_over_the_call_limit_is_refused_with_a_retry_hint(
    models_dir: Path, servers: list[ServerProcess], figures: Callable[[str], None]
) -> None:
    """STREAMS streams opened at once against --max-concurrent-calls CALLS_LIMIT, each sending one feed
    and staying open: exactly CALLS_LIMIT are admitted and answered, every other one is refused
    RESOURCE_EXHAUSTED with the retry hint (none INTERNAL or CANCELLED: gRPC core sheds nothing), health
    answers SERVING throughout, and once the admitted streams end the server takes new ones."""
    servers.append(server := ServerProcess(models_dir, "--max-concurrent-calls", str(CALLS_LIMIT)))
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub, health = lstmd_pb2_grpc.LstmdStub(channel), health_pb2_grpc.HealthStub(channel)
        await stub.ListModels(pb.ListModelsRequest())  # the connection is up
        logged = len(server.lines)
        release, answered, outcomes = asyncio.Event(), asyncio.Event(), Counter[str]()
        positions: list[int] = []

        async def requests() -> AsyncIterator[pb.StreamRequest]:
            yield pb.StreamRequest(text="the cat")
            await release.wait()  # admitted streams stay open (and in flight) until all have an answer

        async def one() -> None:
            call = stub.Stream(requests(), timeout=120)
            try:
                async for reply in call:
                    positions.append(reply.position)
                    outcomes["admitted"] += 1
                    break
                await call.code()  # ends once released
            except grpc.aio.AioRpcError as e:
                outcomes[e.code().name] += 1
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    hint = dict(e.trailing_metadata() or ())
                    assert hint.get("lstmd-retry-after-ms") == hint.get("grpc-retry-pushback-ms") == "250", hint
                    assert "--max-concurrent-calls" in (e.details() or "") and "retry in 250 ms" in (e.details() or "")
            finally:
                if sum(outcomes.values()) == STREAMS:
                    answered.set()

        async def check_health() -> list[int]:
            statuses = []
            while not answered.is_set():
                statuses.append((await health.Check(health_pb2.HealthCheckRequest(), timeout=10)).status)
                await asyncio.sleep(0.02)
            return statuses

        checks = asyncio.create_task(check_health())
        flood = [asyncio.create_task(one()) for _ in range(STREAMS)]
        await asyncio.wait_for(answered.wait(), 120)
        statuses = await checks
        release.set()
        await asyncio.gather(*flood)
        assert outcomes == {"admitted": CALLS_LIMIT, "RESOURCE_EXHAUSTED": STREAMS - CALLS_LIMIT}, outcomes
        assert positions == [2] * CALLS_LIMIT, "each admitted stream's feed was answered"
        assert statuses and set(statuses) == {health_pb2.HealthCheckResponse.SERVING}

        after = [reply.position async for reply in stub.Stream(iter([pb.StreamRequest(text="the cat sat")]))]
        assert after == [3], "the slots are free again"
        await asyncio.sleep(0.1)  # the last calls' done callbacks
        metrics = scrape(server.metrics_port)
        stream = {("grpc_type", "bidi_stream"), ("grpc_service", "lstmd.v1.Lstmd"), ("grpc_method", "Stream")}
        assert metrics[("lstmd_calls_refused_total", frozenset())] == STREAMS - CALLS_LIMIT
        assert metrics[("lstmd_calls_in_flight", frozenset())] == 0
        refused = metrics[("grpc_server_handled_total", frozenset({*stream, ("grpc_code", "RESOURCE_EXHAUSTED")}))]
        assert refused == STREAMS - CALLS_LIMIT
        log = server.lines[logged:]
        assert not [line for line in log if "Traceback" in line or " ERROR " in line], "".join(log)
        assert len(log) <= 2, "refusals are logged a line per interval, not per call: " + "".join(log)
    figures(f"capacity/calls: {STREAMS} streams opened at once against --max-concurrent-calls {CALLS_LIMIT}: "
            f"{outcomes['admitted']} admitted and answered, {outcomes['RESOURCE_EXHAUSTED']} RESOURCE_EXHAUSTED with "
            f"the retry hint (250 ms), 0 INTERNAL, 0 shed by gRPC core; health SERVING in {len(statuses)} checks "
            "throughout; slots free again after")  # fmt: skip
