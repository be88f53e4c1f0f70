"""FeedMany, driven with the raw stubs: feeds of many sessions per message, a status per item,
exactly-once per item, items of one session in the order sent, and predictions equal to direct
ONNX Runtime's for many sessions at once."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from lstmd.v1 import lstmd_pb2 as pb
from tests.conftest import Reference

TOKEN = pb.CANDIDATE_KIND_TOKEN


async def sessions(stub: Any, n: int) -> list[str]:
    return [(await stub.CreateSession(pb.CreateSessionRequest())).session_id for _ in range(n)]


def item(session_id: str, ids: list[int], **options: Any) -> pb.FeedRequest:
    return pb.FeedRequest(session_id=session_id, tokens=pb.TokenIds(ids=ids), candidates=TOKEN, **options)


async def exchange(stub: Any, *messages: list[pb.FeedRequest]) -> list[pb.FeedManyResponse]:
    """Sends every message before reading any answer, as a pipelining client does."""
    call = stub.FeedMany()
    for items in messages:
        await call.write(pb.FeedManyRequest(items=items))
    await call.done_writing()
    return [response async for response in call]


async def test_64_sessions_per_message_get_direct_onnx_runtimes_predictions(stub: Any, reference: Reference) -> None:
    ids = await sessions(stub, 64)
    rng = random.Random(0)
    vocab = len(reference.vocab)
    fed: dict[str, list[int]] = {s: [] for s in ids}
    messages = []
    for _ in range(5):  # every session in every message, one token each
        messages.append([item(s, [rng.randrange(2, vocab)], top_k=3) for s in ids])
        for s, feed in zip(ids, messages[-1], strict=True):
            fed[s].append(feed.tokens.ids[0])
    labels = {"model": "tiny", "version": "1", "phase": "step"}
    calls = REGISTRY.get_sample_value("lstmd_batch_size_count", labels) or 0
    responses = await exchange(stub, *messages)
    calls = (REGISTRY.get_sample_value("lstmd_batch_size_count", labels) or 0) - calls
    assert calls <= 10, f"320 steps took {calls} ONNX Runtime calls: a message's items should share them"
    assert [len(r.results) for r in responses] == [64] * 5
    for step, response in enumerate(responses):
        for s, result in zip(ids, response.results, strict=True):
            assert result.WhichOneof("result") == "prediction"
            p = result.prediction
            assert (p.session_id, p.position) == (s, step + 1)
            expected = reference.logprobs(fed[s][: step + 1])
            top = np.argsort(-expected, kind="stable")[:3]
            assert [c.token_id for c in p.candidates] == top.tolist()
            np.testing.assert_allclose([c.probability for c in p.candidates], np.exp(expected[top]), rtol=1e-5)


async def test_one_bad_item_fails_alone_with_feeds_status(stub: Any, reference: Reference) -> None:
    good, other = await sessions(stub, 2)
    vocab = len(reference.vocab)
    [response] = await exchange(stub, [
        item(good, [5]),
        item(other, [vocab + 7]),  # outside the vocabulary
        pb.FeedRequest(session_id="0" * 32, text="the cat"),  # no such session
        pb.FeedRequest(session_id="nope", text="the"),  # malformed id
        item(other, [6], expected_position=3),  # wrong position
        item(other, [7], top_k=10_000),  # top_k out of range
        pb.FeedRequest(session_id=good),  # no input
        item(good, [8]),
    ])  # fmt: skip
    kinds = [r.WhichOneof("result") for r in response.results]
    assert kinds == ["prediction", "error", "error", "error", "error", "error", "error", "prediction"]
    codes = [grpc.StatusCode(next(c for c in grpc.StatusCode if c.value[0] == r.error.code)).name
             for r in response.results if r.HasField("error")]  # fmt: skip
    assert codes == ["INVALID_ARGUMENT", "NOT_FOUND", "INVALID_ARGUMENT", "FAILED_PRECONDITION", "INVALID_ARGUMENT",
                     "INVALID_ARGUMENT"]  # fmt: skip
    assert "outside the vocabulary" in response.results[1].error.message
    assert response.results[4].error.HasField("position") and response.results[4].error.position == 0
    assert not response.results[1].error.HasField("position")
    assert [response.results[i].prediction.position for i in (0, 7)] == [1, 2]
    assert (await stub.GetSession(pb.GetSessionRequest(session_id=other))).position == 0  # nothing applied


async def test_items_of_one_session_apply_in_the_order_sent_across_messages(stub: Any, reference: Reference) -> None:
    [s] = await sessions(stub, 1)
    order = list(range(2, 22))
    # 20 feeds of one session: two in each message, ten messages sent before any answer
    messages = [[item(s, [order[2 * m]]), item(s, [order[2 * m + 1]])] for m in range(10)]
    responses = await exchange(stub, *messages)
    positions = [r.prediction.position for response in responses for r in response.results]
    assert positions == list(range(1, 21))
    last = responses[-1].results[-1].prediction
    assert last.candidates[0].token_id == int(np.argmax(reference.logprobs(order)))


async def test_a_retried_item_is_replayed_not_applied_twice(stub: Any) -> None:
    a, b = await sessions(stub, 2)
    first = [item(a, [5], expected_position=0, top_k=2), item(b, [6], expected_position=0)]
    [answered] = await exchange(stub, first)
    # the client did not see the answer and sends the same items again, with a new one for b
    [retried] = await exchange(stub, [*first, item(b, [7], expected_position=1)])
    again_a, again_b, next_b = (r.prediction for r in retried.results)
    assert again_a.replayed and again_b.replayed and not next_b.replayed
    assert again_a.candidates == answered.results[0].prediction.candidates
    assert (again_a.position, again_b.position, next_b.position) == (1, 1, 2)


async def test_too_many_items_fail_each_item_and_the_stream_goes_on(make_server: Any) -> None:
    async with make_server(max_feed_items=4) as (_, stub):
        ids = await sessions(stub, 5)
        call = stub.FeedMany()
        await call.write(pb.FeedManyRequest(items=[item(s, [5]) for s in ids]))
        big = await call.read()
        assert [r.error.code for r in big.results] == [grpc.StatusCode.INVALID_ARGUMENT.value[0]] * 5
        assert "split it" in big.results[0].error.message
        await call.write(pb.FeedManyRequest(items=[item(s, [5]) for s in ids[:4]]))
        small = await call.read()
        assert [r.prediction.position for r in small.results] == [1, 1, 1, 1]
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK


async def test_a_malformed_message_ends_the_stream_invalid_argument(shared: Any) -> None:
    running, _ = shared
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        call: Any = channel.stream_stream("/lstmd.v1.Lstmd/FeedMany")()  # raw bytes both ways
        await call.write(b"\x0a\x05\xff\xff\xff\xff\xff")  # items: a length that runs past the end
        await call.done_writing()
        with pytest.raises(grpc.aio.AioRpcError) as error:
            async for _ in call:
                pass
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "lstmd.v1.FeedManyRequest" in (error.value.details() or "")
    finally:
        await channel.close()


async def test_many_streams_of_many_sessions_at_once(stub: Any, reference: Reference) -> None:
    """Eight FeedMany streams of eight sessions each, concurrently, five messages each: every
    session's final prediction equals direct ONNX Runtime's on exactly what it was fed."""
    vocab = len(reference.vocab)

    async def one_stream(seed: int) -> list[tuple[list[int], pb.Prediction]]:
        rng = random.Random(seed)
        ids = await sessions(stub, 8)
        fed = {s: [rng.randrange(2, vocab) for _ in range(5)] for s in ids}
        responses = await exchange(stub, *[[item(s, [fed[s][m]]) for s in ids] for m in range(5)])
        return [(fed[s], r.prediction) for s, r in zip(ids, responses[-1].results, strict=True)]

    for fed, last in [x for xs in await asyncio.gather(*(one_stream(i) for i in range(8))) for x in xs]:
        assert last.position == 5
        assert last.candidates[0].token_id == int(np.argmax(reference.logprobs(fed)))
