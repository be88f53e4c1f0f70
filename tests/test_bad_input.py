"""Random and adversarial input to every RPC: each gets an answer or a documented status code,
the server stays healthy, and a canary session beside it is bit-for-bit unaffected."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lstmd.v1 import lstmd_pb2 as pb

from server.app import RunningServer
from tests.conftest import Reference

DOCUMENTED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

texts = st.one_of(st.text(max_size=300), st.sampled_from(["", " ", "\n", "<unk>", "<eos>", "\x00", "\ud7ff" * 50]))
ids = st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=20)
session_ids = st.one_of(st.text(max_size=40), st.just("0" * 32), st.from_regex(r"[0-9a-f]{32}", fullmatch=True))
counts = st.integers(min_value=0, max_value=2**32 - 1)


async def outcome(call: Any) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as e:
        assert e.code() in DOCUMENTED, f"{e.code()}: {e.details()}"
        assert e.details(), "an error always says what to change"
        return e.code()
    return grpc.StatusCode.OK


class Canary:
    """A session fed the same text before and after the fuzzing must predict the same, exactly."""

    def __init__(self, stub: Any):
        self.stub = stub

    async def start(self) -> None:
        self.session = await self.stub.CreateSession(pb.CreateSessionRequest(top_k=10))
        self.before = await self.stub.Feed(pb.FeedRequest(session_id=self.session.session_id, text="the king"))

    async def check(self, reference: Reference) -> None:
        after = await self.stub.Feed(pb.FeedRequest(session_id=self.session.session_id, text="and the queen"))
        assert after.position == 5
        expected = reference.logprobs(reference.ids("the king and the queen"))
        top = np.argsort(-expected, kind="stable")[:10]
        assert [c.token_id for c in after.candidates] == top.tolist()


@pytest.fixture(scope="module")
async def canary(shared: tuple[RunningServer, Any]) -> Canary:
    canary = Canary(shared[1])
    await canary.start()
    return canary


@FUZZ
@given(text=texts, token_ids=ids, use_text=st.booleans(), session_id=session_ids, top_k=counts,
       position=st.one_of(st.none(), counts), logprobs=st.booleans())  # fmt: skip
async def test_fuzzed_feeds(
    shared: tuple[RunningServer, Any], canary: Canary, text: str, token_ids: list[int], use_text: bool, session_id: str,
    top_k: int, position: int | None, logprobs: bool,
) -> None:  # fmt: skip
    _, stub = shared
    real = (await stub.CreateSession(pb.CreateSessionRequest())).session_id
    for sid in (session_id, real):
        request = pb.FeedRequest(
            session_id=sid, top_k=top_k, expected_position=position, return_token_logprobs=logprobs
        )
        if use_text:
            request.text = text
        else:
            request.tokens.ids.extend(token_ids)
        await outcome(stub.Feed(request))
        await outcome(_stream_once(stub, sid, request))


async def _stream_once(stub: Any, session_id: str, feed: pb.FeedRequest) -> None:
    request = pb.StreamRequest(
        session_id=session_id, top_k=feed.top_k, return_token_logprobs=feed.return_token_logprobs
    )
    request.MergeFrom(
        pb.StreamRequest(text=feed.text) if feed.HasField("text") else pb.StreamRequest(tokens=feed.tokens)
    )
    async for _ in stub.Stream(iter([request])):
        pass


@FUZZ
@given(prompt=texts, max_tokens=st.integers(min_value=0, max_value=2000), temperature=st.floats(allow_nan=True),
       top_k=counts, top_p=st.floats(allow_nan=True), stop=st.lists(st.text(max_size=10), max_size=3),
       model=st.sampled_from(["", "tiny", "nope", "\x00"]))  # fmt: skip
async def test_fuzzed_generate_and_sessions(
    shared: tuple[RunningServer, Any], canary: Canary, prompt: str, max_tokens: int, temperature: float,
    top_k: int, top_p: float, stop: list[str], model: str,
) -> None:  # fmt: skip
    _, stub = shared
    request = pb.GenerateRequest(prompt=prompt, max_tokens=min(max_tokens, 30) if max_tokens < 1025 else max_tokens,
                                 temperature=temperature, top_k=top_k, top_p=top_p, stop=stop, model=model)  # fmt: skip

    async def generate() -> None:
        async for _ in stub.Generate(request):
            pass

    await outcome(generate())
    await outcome(stub.CreateSession(pb.CreateSessionRequest(model=model, top_k=top_k)))


async def test_the_canary_is_untouched_and_the_server_healthy(canary: Canary, reference: Reference) -> None:
    """Runs after the fuzz tests above (pytest keeps file order); the canary was fed before them."""
    await canary.check(reference)
    assert (await canary.stub.ListModels(pb.ListModelsRequest())).models
