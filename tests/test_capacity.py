"""Capacity: a flood of concurrent CreateSession calls against a server bounded at 100 sessions,
in both policies. ``reject``: exactly the free places are granted, every other call gets
RESOURCE_EXHAUSTED (so do forks and ephemeral streams once full); ``evict``: every call is granted
and the least recently used idle sessions make room, never a session in use. Either way the
process stays up, health says SERVING, and a canary session answers bit-for-bit as a reference
session fed the same text does.

With thousands of calls in flight at once, gRPC itself sheds some before they reach lstmd: over
about 1,000 pending calls, a call that has waited a second is ended CANCELLED (gRPC core's
pending-request limit). Those were never applied (the server's own counts below show every call
that reached it got OK or RESOURCE_EXHAUSTED) and are safe to retry."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
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
    process = ServerProcess(models_dir, "--max-sessions", str(LIMIT), "--at-capacity", request.param)
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
        assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED", "CANCELLED"} and codes["OK"] == LIMIT - 1
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
            f"granted, {codes['RESOURCE_EXHAUSTED']} RESOURCE_EXHAUSTED, {codes['CANCELLED']} CANCELLED by gRPC's "
            "pending-call limit (never reached lstmd); fork and ephemeral stream refused too; health SERVING, canary "
            "bit-for-bit unaffected")  # fmt: skip


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
        assert set(codes) <= {"OK", "CANCELLED"} and handled(server, "OK") == codes["OK"] + 2
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
            f"granted, {codes['CANCELLED']} CANCELLED by gRPC's pending-call limit; {int(evicted)} idle sessions "
            "evicted, the one in use kept; health SERVING, canary bit-for-bit unaffected")  # fmt: skip
