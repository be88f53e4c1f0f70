"""AsyncClient coalesces concurrent feeds of many sessions into FeedMany messages: each caller
gets exactly its own feed's answer or error, the server sees FeedMany instead of Feed calls,
and a server without FeedMany is fed with Feed."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from bench.cluster import free_port
from lstmd.client import AsyncClient, Client, InvalidInput, NotFound, PositionMismatch
from lstmd.server import metrics
from lstmd.v1 import lstmd_pb2 as pb
from tests.conftest import Reference, serve


def calls(method: str) -> float:
    kind = "unary" if method == "Feed" else "bidi_stream"
    return float(metrics.rpc_started.labels(kind, "lstmd.v1.Lstmd", method)._value.get())


async def test_concurrent_feeds_of_32_sessions_travel_as_feed_many(shared: Any, reference: Reference) -> None:
    running, _ = shared
    vocab = len(reference.vocab)
    rng = random.Random(1)
    async with AsyncClient(f"127.0.0.1:{running.port}") as client:
        sessions = [await client.create_session() for _ in range(32)]
        fed: dict[str, list[int]] = {s.id: [] for s in sessions}
        feeds, streams = calls("Feed"), calls("FeedMany")
        for _ in range(4):
            ids = {s.id: rng.randrange(2, vocab) for s in sessions}
            answers = await asyncio.gather(*(s.feed([ids[s.id]], top_k=2, tokens=True) for s in sessions))
            for s, answer in zip(sessions, answers, strict=True):
                fed[s.id].append(ids[s.id])
                assert answer.session_id == s.id and answer.position == len(fed[s.id])
                expected = reference.logprobs(fed[s.id])
                assert [c.token_id for c in answer.candidates] == np.argsort(-expected, kind="stable")[:2].tolist()
        assert calls("Feed") == feeds  # no Feed call at all
        assert calls("FeedMany") == streams + 1  # one stream for all 128 feeds


async def test_one_callers_error_is_its_own(shared: Any, reference: Reference) -> None:
    running, _ = shared
    async with AsyncClient(f"127.0.0.1:{running.port}") as client:
        good, bad, moved = [await client.create_session() for _ in range(3)]
        await client.feed(moved.id, "the cat")  # moved on behind its AsyncSession's back
        results = await asyncio.gather(
            good.feed("the"), bad.feed([len(reference.vocab) + 3]),
            client.feed(moved.id, "sat", expected_position=0), return_exceptions=True,
        )  # fmt: skip
        assert results[0].position == 1  # type: ignore[union-attr]
        assert isinstance(results[1], InvalidInput) and "outside the vocabulary" in results[1].details
        assert isinstance(results[2], PositionMismatch) and results[2].actual_position == 2
        assert (await client.get_session(bad.id)).position == 0


async def test_without_coalescing_feeds_are_feed_calls(shared: Any) -> None:
    running, _ = shared
    async with AsyncClient(f"127.0.0.1:{running.port}", coalesce_feeds=False) as client:
        feeds, streams = calls("Feed"), calls("FeedMany")
        sessions = [await client.create_session() for _ in range(4)]
        await asyncio.gather(*(s.feed("the cat") for s in sessions))
        assert (calls("Feed") - feeds, calls("FeedMany") - streams) == (4, 0)


async def feed_only(request: pb.FeedRequest, context: Any) -> pb.Prediction:
    return pb.Prediction(session_id=request.session_id, position=7)


async def test_a_server_without_feed_many_is_fed_with_feed() -> None:
    """A server from before FeedMany: its lstmd.v1.Lstmd has Feed, and FeedMany is UNIMPLEMENTED."""
    server = grpc.aio.server()
    feed = grpc.unary_unary_rpc_method_handler(feed_only, pb.FeedRequest.FromString, pb.Prediction.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("lstmd.v1.Lstmd", {"Feed": feed}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with AsyncClient(f"127.0.0.1:{port}") as client:
            first = await asyncio.gather(*(client.feed("0" * 32, "the") for _ in range(3)))
            again = await client.feed("1" * 32, "the")
        assert [p.position for p in first] == [7, 7, 7] and again.session_id == "1" * 32
    finally:
        await server.stop(0)


async def test_a_timeout_is_deadline_exceeded(shared: Any) -> None:
    running, _ = shared
    async with AsyncClient(f"127.0.0.1:{running.port}", timeout=1e-6, retries=0) as client:
        with pytest.raises(Exception) as error:
            await client.feed("0" * 32, "the")
        assert getattr(error.value, "code", "") == "DEADLINE_EXCEEDED"


def test_the_blocking_client_sends_feed_many_directly(server_target: str) -> None:
    with Client(server_target) as client:
        a, b = client.create_session(), client.create_session()
        first = client.feed_many([(a.id, "the cat"), (b.id, "a dog"), ("0" * 32, "the")])
        assert [type(r).__name__ for r in first] == ["Prediction", "Prediction", "NotFound"]
        assert isinstance(first[2], NotFound)
        again = client.feed_many([(a.id, "sat", {"expected_position": 2}), (a.id, "on", {"expected_position": 2})])
        assert again[0].position == 3  # type: ignore[union-attr]
        assert isinstance(again[1], PositionMismatch) and again[1].actual_position == 3


async def test_the_async_client_sends_feed_many_directly(shared: Any) -> None:
    running, _ = shared
    async with AsyncClient(f"127.0.0.1:{running.port}") as client:
        a = await client.create_session()
        [p, q] = await client.feed_many([(a.id, "the"), (a.id, [3, 4], {"top_k": 2, "tokens": True})])
        assert (p.position, q.position, len(q.candidates)) == (1, 3, 2)  # type: ignore[union-attr]


async def test_a_lone_feed_after_the_stream_ended_is_sent_at_once(models_dir: Path) -> None:
    """The server the FeedMany stream went to stopped, and another took its port: the next feed, the
    only one waiting, opens a new stream and is answered, not left queued until the client's timeout."""
    port = free_port()
    async with AsyncClient(f"127.0.0.1:{port}", timeout=5) as client:
        async with serve(models_dir, port=port):
            await (await client.create_session()).feed("the")  # the coalescer's stream opens
        async with serve(models_dir, port=port):
            session = await client.create_session()  # unary: reconnects the channel
            started = time.monotonic()
            prediction = await session.feed("the")
            assert prediction.position == 1
            assert time.monotonic() - started < 2.5, "answered well within the client's 5 s timeout"
