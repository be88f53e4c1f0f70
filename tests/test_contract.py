"""The contract says what the server does, in the small ways a client in another language meets
first: each test drives the raw stubs and checks the answer the proto's comments promise."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from lstmd.v1 import lstmd_pb2 as pb
from tests.conftest import HIDDEN, LAYERS


async def test_state_bytes_is_h_and_c_after_and_before_the_last_token(stub: Any) -> None:
    [tiny] = [m for m in (await stub.ListModels(pb.ListModelsRequest())).models if m.name == "tiny"]
    assert tiny.state_bytes == 2 * 2 * LAYERS * HIDDEN * 4


async def test_a_later_stream_message_naming_another_session_is_invalid_argument(stub: Any) -> None:
    first = await stub.CreateSession(pb.CreateSessionRequest())
    other = await stub.CreateSession(pb.CreateSessionRequest())
    call = stub.Stream()
    await call.write(pb.StreamRequest(session_id=first.session_id, text="the cat"))
    await call.write(pb.StreamRequest(session_id=first.session_id, text="sat"))  # the same one: allowed
    await call.write(pb.StreamRequest(session_id=other.session_id, text="on"))
    await call.done_writing()
    answers = []
    with pytest.raises(grpc.aio.AioRpcError) as error:
        async for prediction in call:
            answers.append(prediction)
    assert [a.position for a in answers] == [2, 3]
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "first message only" in (error.value.details() or "")
    untouched = await stub.GetSession(pb.GetSessionRequest(session_id=other.session_id))
    assert untouched.position == 0


async def test_a_retry_with_other_options_is_refused_without_advice_to_apply_it_again(stub: Any) -> None:
    session = await stub.CreateSession(pb.CreateSessionRequest())
    feed = pb.FeedRequest(session_id=session.session_id, text="the cat", expected_position=0, top_k=3)
    await stub.Feed(feed)
    feed.top_k = 4
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.Feed(feed)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = error.value.details() or ""
    assert "re-read" in details and "retry with expected_position" not in details
    assert dict(error.value.trailing_metadata() or ())["lstmd-position"] == "2"


async def test_generate_top_k_is_limited_by_the_vocabulary_not_the_candidate_limit(make_server: Any) -> None:
    async with make_server(max_top_k=10) as (_, stub):
        [tiny] = [m for m in (await stub.ListModels(pb.ListModelsRequest())).models if m.name == "tiny"]
        words = [t async for t in stub.Generate(pb.GenerateRequest(prompt="the", max_tokens=2, top_k=50, seed=1))]
        assert len(words) == 2
        with pytest.raises(grpc.aio.AioRpcError) as error:
            async for _ in stub.Generate(pb.GenerateRequest(prompt="the", max_tokens=2, top_k=tiny.vocab_size + 1)):
                pass
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"at most the vocabulary size, {tiny.vocab_size}" in (error.value.details() or "")
