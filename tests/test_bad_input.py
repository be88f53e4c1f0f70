"""Random and adversarial input to every RPC: each gets an answer or a documented status code,
the server stays healthy, and a canary session beside it is bit-for-bit unaffected.

Covered: random and adversarial unicode, empty, huge and oversized texts and prompts, negative
and out-of-range token ids, zero and huge top_k / max_tokens / temperature / top_p, unknown
models and sessions, malformed session ids (Feed, Stream, Generate, Get/Delete/ForkSession,
CreateSession, Tokenize), too many tokens, messages over the server's size limit, request bytes that
are not a valid message (every method, streams included), and clients cancelling streams,
generations and feeds midway; denormal and huge temperatures (greedy with probability 1, never
NaN), huge values that error messages and log lines would echo (cut), texts that Unicode
normalisation expands past the limits (refused early, off the event loop: other calls keep
answering), too many or too long stop words, and invisible format characters (dropped, never
``<unk>``). Every input tried is counted; the last test reports the counts (pytest's "reliability
figures" section)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import grpc
import numpy as np
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lstmd.server.app import RunningServer
from lstmd.v1 import lstmd_pb2 as pb
from lstmd.v1 import lstmd_pb2_grpc
from lstmd.v1.lstmd_pb2_grpc import LstmdStub
from tests.conftest import WORDS, Reference, ServerProcess, memory_sessions
from tests.test_metrics import delta, scrape

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
VOCAB_SIZE = 2 + len(WORDS)
FLOAT32_MAX = float(np.finfo(np.float32).max)
TRIED: Counter[tuple[str, str]] = Counter()  # (RPC, status code) of every input tried
LINES: list[str] = []  # further summary lines of this suite, reported with the counts


async def outcome(call: Any, rpc: str) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as e:
        assert e.code() in DOCUMENTED, f"{e.code()}: {e.details()}"
        assert e.details(), "an error always says what to change"
        TRIED[rpc, e.code().name] += 1
        return e.code()
    TRIED[rpc, "OK"] += 1
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
        await outcome(stub.Feed(request), "Feed")
        await outcome(_stream_once(stub, sid, request), "Stream")


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
        async for token in stub.Generate(request):
            assert 0 <= token.probability <= 1, token  # never NaN
            assert 0 <= token.token_id < VOCAB_SIZE

    await outcome(generate(), "Generate")
    await outcome(stub.CreateSession(pb.CreateSessionRequest(model=model, top_k=top_k)), "CreateSession")


@FUZZ
@given(session_id=session_ids, position=st.one_of(st.none(), counts), model=st.sampled_from(["", "tiny", "nope"]))
async def test_fuzzed_session_calls(
    shared: tuple[RunningServer, Any], canary: Canary, session_id: str, position: int | None, model: str
) -> None:
    _, stub = shared
    await outcome(stub.GetSession(pb.GetSessionRequest(session_id=session_id)), "GetSession")
    await outcome(stub.ForkSession(pb.ForkSessionRequest(session_id=session_id)), "ForkSession")
    await outcome(stub.DeleteSession(pb.DeleteSessionRequest(session_id=session_id)), "DeleteSession")

    async def generate() -> None:
        request = pb.GenerateRequest(session_id=session_id, model=model, max_tokens=2, expected_position=position)
        async for _ in stub.Generate(request):
            pass

    await outcome(generate(), "Generate")
    await outcome(_stream_once(stub, "", pb.FeedRequest(session_id=session_id, text="the")), "Stream")


@FUZZ
@given(text=texts, model=st.sampled_from(["", "tiny", "nope", "\x00"]))
async def test_fuzzed_tokenize(shared: tuple[RunningServer, Any], canary: Canary, text: str, model: str) -> None:
    _, stub = shared
    await outcome(stub.Tokenize(pb.TokenizeRequest(model=model, text=text)), "Tokenize")


HUGE = 100_001  # characters: over the default --max-text-chars
OVERSIZED = 2 << 20  # bytes: over the default --max-message-bytes (1 MiB)


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        (pb.FeedRequest(text="a" * HUGE), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.FeedRequest(text="the " * 5000), grpc.StatusCode.INVALID_ARGUMENT),  # 5000 tokens: over 4096
        (pb.FeedRequest(tokens=pb.TokenIds(ids=[2] * 5000)), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.FeedRequest(text="\u0301" * 50_000), grpc.StatusCode.INVALID_ARGUMENT),  # only combining marks
        (pb.FeedRequest(text="x" * OVERSIZED), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (pb.FeedRequest(tokens=pb.TokenIds(ids=[2**62] * 200_000)), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (pb.GenerateRequest(prompt="a" * HUGE, max_tokens=1), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.GenerateRequest(prompt="x" * OVERSIZED, max_tokens=1), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (pb.StreamRequest(text="x" * OVERSIZED), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (pb.CreateSessionRequest(model="m" * OVERSIZED), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (pb.TokenizeRequest(text="a" * HUGE), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.TokenizeRequest(text="the " * 5000), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.TokenizeRequest(text="x" * OVERSIZED), grpc.StatusCode.RESOURCE_EXHAUSTED),
    ],
    ids=[
        "text-over-max-chars",
        "text-over-max-tokens",
        "ids-over-max-tokens",
        "combining-marks",
        "feed-2MiB",
        "ids-2MiB",
        "prompt-over-max-chars",
        "prompt-2MiB",
        "stream-2MiB",
        "create-2MiB",
        "tokenize-over-max-chars",
        "tokenize-over-max-tokens",
        "tokenize-2MiB",
    ],
)
async def test_huge_and_oversized_inputs(
    shared: tuple[RunningServer, Any], canary: Canary, request_: Any, code: grpc.StatusCode
) -> None:
    _, stub = shared
    if isinstance(request_, pb.FeedRequest):
        request_.session_id = (await stub.CreateSession(pb.CreateSessionRequest())).session_id
        assert await outcome(stub.Feed(request_), "Feed") == code
    elif isinstance(request_, pb.StreamRequest):
        assert await outcome(_stream_once(stub, "", pb.FeedRequest(text=request_.text)), "Stream") == code
    elif isinstance(request_, pb.GenerateRequest):

        async def generate() -> None:
            async for _ in stub.Generate(request_):
                pass

        assert await outcome(generate(), "Generate") == code
    elif isinstance(request_, pb.TokenizeRequest):
        assert await outcome(stub.Tokenize(request_), "Tokenize") == code
    else:
        assert await outcome(stub.CreateSession(request_), "CreateSession") == code


async def test_clients_cancelling_midway_leave_sessions_whole(
    shared: tuple[RunningServer, Any], canary: Canary
) -> None:
    """Streams, generations and long feeds cancelled at random moments: each feed is applied whole
    or not at all, ephemeral sessions are freed, and the session goes on from where it stands."""
    running, stub = shared
    rng = np.random.default_rng(0)
    held = len(memory_sessions(running))
    for i in range(20):
        session = await stub.CreateSession(pb.CreateSessionRequest())
        sid = session.session_id
        delay = float(rng.uniform(0, 0.01))
        stream = stub.Stream()
        for word in ("the", "cat"):
            await stream.write(pb.StreamRequest(session_id=sid if word == "the" else "", text=word))
        await asyncio.sleep(delay)
        stream.cancel()
        generation = stub.Generate(pb.GenerateRequest(session_id=sid if i % 2 else "", max_tokens=1024))
        await asyncio.sleep(delay)
        generation.cancel()
        feed = stub.Feed(pb.FeedRequest(session_id=sid, tokens=pb.TokenIds(ids=[2] * 4096)))
        await asyncio.sleep(delay)
        feed.cancel()
        for call in (stream, generation, feed):
            code = await call.code()  # CANCELLED, or OK when the call had ended before the client cancelled
            assert code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.OK)
            TRIED["cancelled midway", code.name] += 1
        await asyncio.sleep(0.05)  # let the server see the cancellations
        position = (await stub.GetSession(pb.GetSessionRequest(session_id=sid))).position
        after = await stub.Feed(pb.FeedRequest(session_id=sid, text="sat", expected_position=position))
        assert after.position == position + 1
        await stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid))
    assert len(memory_sessions(running)) == held, "ephemeral sessions of cancelled calls were freed"


# sampling: every accepted temperature gives numbers, never NaN


@pytest.mark.parametrize("temperature", [1e-45, 1e-40, 1e-38, 1e-30, 1e-6])
async def test_tiny_temperatures_give_the_greedy_words_with_probability_one(
    shared: tuple[RunningServer, Any], canary: Canary, reference: Reference, temperature: float
) -> None:
    """A temperature near 0 (down to the smallest float32, a denormal) is greedy decoding: each
    word is the most likely one by ONNX Runtime's own distribution, with probability 1."""
    _, stub = shared
    ids = reference.ids("the king")
    request = pb.GenerateRequest(prompt="the king", max_tokens=8, temperature=temperature, seed=0)
    async for token in stub.Generate(request):
        expected = reference.logprobs(ids)
        expected[[reference.vocab.unk_id, reference.vocab.eos_id]] = -np.inf  # never drawn without allow_eos
        assert (token.token_id, token.probability) == (int(np.argmax(expected)), 1.0), temperature
        ids.append(token.token_id)
    TRIED["Generate", "OK"] += 1


@FUZZ
@given(temperature=st.floats(min_value=0.0, max_value=FLOAT32_MAX, width=32), top_k=st.integers(0, 20),
       top_p=st.floats(min_value=0.0, max_value=1.0, width=32))  # fmt: skip
async def test_no_accepted_setting_gives_nan(
    shared: tuple[RunningServer, Any], canary: Canary, temperature: float, top_k: int, top_p: float
) -> None:
    """Any temperature, top_k and top_p the server accepts (denormals and the largest float32
    included): probabilities of generated words, candidates and fed tokens are numbers."""
    _, stub = shared
    session = await stub.CreateSession(pb.CreateSessionRequest())
    request = pb.GenerateRequest(session_id=session.session_id, prompt="the", max_tokens=4, temperature=temperature,
                                 top_k=top_k, top_p=top_p, seed=1)  # fmt: skip
    async for token in stub.Generate(request):
        assert 0 <= token.probability <= 1, (temperature, top_k, top_p, token)
    fed = await stub.Feed(pb.FeedRequest(session_id=session.session_id, text="the sea", return_token_logprobs=True))
    assert all(0 <= c.probability <= 1 for c in fed.candidates)
    assert all(lp <= 0 for lp in fed.token_logprobs) and not any(math.isnan(lp) for lp in fed.token_logprobs)
    TRIED["Generate", "OK"] += 1


# what the server echoes of a request is cut

LONG = 100_000  # characters: under the message size limit, far over anything worth repeating


async def test_long_values_are_cut_in_error_messages_and_log_lines(
    shared: tuple[RunningServer, Any], canary: Canary, caplog: pytest.LogCaptureFixture
) -> None:
    """A 100,000-character model name, session id, word prefix or stop word: the error names the
    start of it and its length, never all of it (all of it would overflow the client's metadata
    limit, so the caller saw RESOURCE_EXHAUSTED, and the log got a 100 KB line per call)."""
    _, stub = shared
    long = "m" * LONG
    sid = (await stub.CreateSession(pb.CreateSessionRequest())).session_id

    async def generate(request: pb.GenerateRequest) -> None:
        async for _ in stub.Generate(request):
            pass

    async def stream(request: pb.StreamRequest) -> None:
        async for _ in stub.Stream(iter([request])):
            pass

    calls = [
        ("CreateSession", stub.CreateSession(pb.CreateSessionRequest(model=long))),
        ("Tokenize", stub.Tokenize(pb.TokenizeRequest(model=long, text="the"))),
        ("GetSession", stub.GetSession(pb.GetSessionRequest(session_id=long))),
        ("Feed", stub.Feed(pb.FeedRequest(session_id=sid, text="the", word_prefix=long))),
        ("Stream", stream(pb.StreamRequest(model=long, text="the"))),
        ("Generate", generate(pb.GenerateRequest(model=long, max_tokens=1))),
        ("Generate", generate(pb.GenerateRequest(session_id=sid, prompt="the", max_tokens=1, stop=[long]))),
    ]
    with caplog.at_level(logging.INFO, logger="lstmd"):
        for rpc, call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await call
            code, details = error.value.code(), error.value.details() or ""
            assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), (rpc, code, details[:200])
            assert "m" * 20 in details and f"{LONG:,}" in details and len(details) < 400, (rpc, details)
            TRIED[rpc, code.name] += 1
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("lstmd")]
    assert lines, "each refusal is logged"
    assert max(map(len, lines)) < 500, max(lines, key=len)[:200]


# texts that Unicode normalisation expands, and stop words: bounded, and off the event loop

LIGATURE = "\ufdfa"  # ARABIC LIGATURE SALLALLAHOU ALAYHE WASALLAM: 18 characters after NFKC


@pytest.mark.parametrize("copies", [100_000, 6_000])
async def test_text_that_normalisation_expands_past_the_limit_is_refused_by_its_length(
    shared: tuple[RunningServer, Any], canary: Canary, copies: int
) -> None:
    """The character limit holds after normalisation too: 6,000 ligatures are 108,000 characters,
    and 100,000 of them (1.8 million) are refused before most of the work of spelling them out."""
    _, stub = shared
    started = time.perf_counter()
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.Tokenize(pb.TokenizeRequest(text=LIGATURE * copies))
    seconds = time.perf_counter() - started
    details = error.value.details() or ""
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "characters after Unicode normalisation" in details and "100000" in details, details
    assert seconds < 0.15, f"{seconds:.3f} s: the expansion was measured whole before refusing it"
    TRIED["Tokenize", "INVALID_ARGUMENT"] += 1


@pytest.mark.parametrize(
    ("stop", "words"),
    [(["x"] * 100_000, "stop words"), (["x" * 65], "stop word 'xxx"), (["ok", "\ufdfa" * 10], "characters")],
    ids=["too-many", "too-long", "expands"],
)
async def test_stop_words_are_bounded(
    shared: tuple[RunningServer, Any], canary: Canary, stop: list[str], words: str
) -> None:
    _, stub = shared
    request = pb.GenerateRequest(prompt="the", max_tokens=1, stop=stop)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        async for _ in stub.Generate(request):
            pass
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in (error.value.details() or ""), error.value.details()
    TRIED["Generate", "INVALID_ARGUMENT"] += 1


RESPONSIVE_S = 0.1  # the slowest health check or one-word feed allowed while expanding texts arrive


async def test_expanding_texts_do_not_hold_up_other_calls(servers: list[ServerProcess], models_dir: Path) -> None:
    """Three clients send texts that NFKC spells out 18 times longer, as fast as the server answers
    them; meanwhile health checks and one-word feeds of another session each answer within tens of
    ms. (Normalising 100,000 ligatures on the event loop held every call for a third of a second or
    more.) The server runs in its own process, as in production: only its own work is measured."""
    servers.append(server := ServerProcess(models_dir))
    async with grpc.aio.insecure_channel(server.target) as channel, grpc.aio.insecure_channel(server.target) as own:
        stub, health, feeder = LstmdStub(channel), health_pb2_grpc.HealthStub(own), LstmdStub(own)
        victim = (await stub.CreateSession(pb.CreateSessionRequest())).session_id
        attacker = (await stub.CreateSession(pb.CreateSessionRequest())).session_id
        await health.Check(health_pb2.HealthCheckRequest())  # connected before anything is timed
        sent: Counter[str] = Counter()
        done = asyncio.Event()

        async def attack(name: str, call: Any) -> None:
            while not done.is_set():
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await call()
                sent[name] += 1

        attacks = [
            attack("Tokenize calls of 100,000", lambda: stub.Tokenize(pb.TokenizeRequest(text=LIGATURE * 100_000))),
            attack("feeds of 5,500", lambda: stub.Feed(pb.FeedRequest(session_id=attacker, text=LIGATURE * 5_500))),
            attack("feeds of 900", lambda: stub.Feed(pb.FeedRequest(session_id=attacker, text=LIGATURE * 900))),
        ]
        tasks = [asyncio.create_task(a) for a in attacks]
        checks: list[float] = []
        feeds: list[float] = []
        try:
            await asyncio.sleep(0.2)
            started = time.perf_counter()
            while len(feeds) < 100 and time.perf_counter() - started < 10:
                t0 = time.perf_counter()
                answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=30)
                t1 = time.perf_counter()
                await feeder.Feed(pb.FeedRequest(session_id=victim, text="the"), timeout=30)
                t2 = time.perf_counter()
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
                checks.append(t1 - t0)
                feeds.append(t2 - t1)
                await asyncio.sleep(0.01)
        finally:
            done.set()
            await asyncio.gather(*tasks)
        position = (await stub.GetSession(pb.GetSessionRequest(session_id=victim))).position
    assert position == len(feeds), "every one-word feed applied, nothing else"
    attacked = ", ".join(f"{n} {name}" for name, n in sent.items())
    LINES.append(f"bad input/event loop: while 3 clients sent U+FDFA ligatures ({attacked}), {len(checks)} health "
                 f"checks and {len(feeds)} one-word feeds of another session answered in at most "
                 f"{max(checks) * 1000:.0f} and {max(feeds) * 1000:.0f} ms (median {np.median(checks) * 1000:.1f} "
                 f"and {np.median(feeds) * 1000:.1f} ms; bound {RESPONSIVE_S * 1000:.0f} ms)")  # fmt: skip
    assert min(sent.values()) >= 3, sent
    assert max(checks) < RESPONSIVE_S and max(feeds) < RESPONSIVE_S, LINES[-1]


# invisible characters


async def test_format_characters_never_become_tokens(shared: tuple[RunningServer, Any], canary: Canary) -> None:
    """Zero-width spaces and joiners, byte-order marks, bidirectional controls and soft hyphens
    (Unicode format characters) are dropped by the words tokenizer: no ``<unk>`` for them, and a
    text of only them is empty input."""
    _, stub = shared
    text = "\ufeffthe\u200b ki\u00adng\u200d \u202ethe\u202c \u2066qu\u200ceen\u2069\u200e\u200f\u2060"
    tokens = (await stub.Tokenize(pb.TokenizeRequest(text=text))).tokens
    assert [(t.word, t.unknown) for t in tokens] == [("the", False), ("king", False), ("the", False),
                                                     ("queen", False)]  # fmt: skip
    sid = (await stub.CreateSession(pb.CreateSessionRequest())).session_id
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.Feed(pb.FeedRequest(session_id=sid, text="\u200b\ufeff\u202e\u2069"))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "empty" in (error.value.details() or "")
    assert (await stub.GetSession(pb.GetSessionRequest(session_id=sid))).position == 0
    TRIED["Tokenize", "OK"] += 1
    TRIED["Feed", "INVALID_ARGUMENT"] += 1


def _varint(n: int) -> bytes:
    out = b""
    while n > 0x7F:
        out, n = out + bytes([n & 0x7F | 0x80]), n >> 7
    return out + bytes([n])


def undecodable(message: Descriptor) -> dict[str, bytes]:
    """Request bytes that are not a valid ``message``, by kind: a 1-byte request, a field cut short,
    and invalid UTF-8 in its first string field (when it has one)."""
    payloads = {"one byte": b"\xff", "truncated": b"\x0a\x05ab"}
    text = next((f for f in message.fields if f.type == FieldDescriptor.TYPE_STRING), None)
    if text is not None:
        payloads["bad UTF-8"] = _varint(text.number << 3 | 2) + b"\x02\xff\xfe"
    return payloads


LSTMD = pb.DESCRIPTOR.services_by_name["Lstmd"]
HEALTH_CHECK = health_pb2.DESCRIPTOR.services_by_name["Health"].methods_by_name["Check"]


async def raw_call(channel: grpc.aio.Channel, method: MethodDescriptor, *requests: bytes) -> grpc.aio.AioRpcError:
    """Send ``requests`` as they are (identity serializers) to ``method``; the error it ends with."""
    path, raw = f"/{method.containing_service.full_name}/{method.name}", cast(Any, channel)  # bytes, not messages
    with pytest.raises(grpc.aio.AioRpcError) as error:
        if method.client_streaming:
            async for _ in raw.stream_stream(path)(iter(requests)):
                pass
        elif method.server_streaming:
            async for _ in raw.unary_stream(path)(requests[0]):
                pass
        else:
            await raw.unary_unary(path)(requests[0])
    return error.value


async def test_undecodable_request_bytes_are_invalid_argument_on_every_method(
    models_dir: Path, servers: list[ServerProcess]
) -> None:
    """Bytes that are not the method's request message (on every method, health's included, and on a
    stream as its first or a later message) end the call INVALID_ARGUMENT with a message naming the
    type and what is wrong; the calls are counted in the gRPC metrics, the log gets no traceback and
    at most a line or two for all of them, and a session beside them is untouched."""
    server = ServerProcess(models_dir)
    servers.append(server)
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = lstmd_pb2_grpc.LstmdStub(channel)
        canary = (await stub.CreateSession(pb.CreateSessionRequest(top_k=10))).session_id
        await stub.Feed(pb.FeedRequest(session_id=canary, text="the king"))
        before, logged = scrape(server.metrics_port), len(server.lines)
        sent: Counter[str] = Counter()
        for method in [*LSTMD.methods, HEALTH_CHECK]:
            for kind, payload in undecodable(method.input_type).items():
                error = await raw_call(channel, method, payload)
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (method.name, kind, error.details())
                assert (error.details() or "").startswith(
                    f"the request is not a valid {method.input_type.full_name} message: "
                ), error.details()
                sent[method.full_name] += 1
        stream = LSTMD.methods_by_name["Stream"]
        first = pb.StreamRequest(session_id=canary, text="and").SerializeToString()
        for kind, payload in undecodable(stream.input_type).items():  # a bad message after a good one
            error = await raw_call(channel, stream, first, payload)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "valid lstmd.v1.StreamRequest" in (
                error.details() or ""
            ), (kind, error.details())
            sent[stream.full_name] += 1
        after, log = scrape(server.metrics_port), server.lines[logged:]

        for name, n in sent.items():
            service, _, method_name = name.rpartition(".")
            method = LSTMD.methods_by_name.get(method_name, HEALTH_CHECK)
            kind = {(False, False): "unary", (False, True): "server_stream", (True, True): "bidi_stream"}[
                method.client_streaming, method.server_streaming
            ]
            labels = {"grpc_type": kind, "grpc_service": service, "grpc_method": method_name}
            assert delta(before, after, "grpc_server_started_total", **labels) == n, name
            assert delta(before, after, "grpc_server_handled_total", **labels, grpc_code="INVALID_ARGUMENT") == n, name
        assert not [line for line in log if "Traceback" in line or " ERROR " in line], "".join(log)
        assert len(log) <= 2, "a line per interval, not per call: " + "".join(log)

        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        # the canary was fed "and" by each of the three streams above before their bad message
        reply = await stub.Feed(pb.FeedRequest(session_id=canary, text="the queen", top_k=10))
        fresh = (await stub.CreateSession(pb.CreateSessionRequest(top_k=10))).session_id
        expected = await stub.Feed(pb.FeedRequest(session_id=fresh, text="the king and and and the queen", top_k=10))
        assert reply.position == expected.position == 7
        assert [c.token_id for c in reply.candidates] == [c.token_id for c in expected.candidates]
    TRIED["malformed bytes", "INVALID_ARGUMENT"] += sum(sent.values())


async def test_the_canary_is_untouched_and_the_server_healthy(
    canary: Canary, reference: Reference, figures: Callable[[str], None]
) -> None:
    """Runs after the fuzz tests above (pytest keeps file order); the canary was fed before them."""
    await canary.check(reference)
    assert (await canary.stub.ListModels(pb.ListModelsRequest())).models
    by_rpc: Counter[str] = Counter()
    by_code: Counter[str] = Counter()
    for (rpc, code), n in TRIED.items():
        by_rpc[rpc] += n
        by_code[code] += n
    rpcs = ", ".join(f"{r} {n}" for r, n in sorted(by_rpc.items()))
    codes = ", ".join(f"{c} {n}" for c, n in by_code.most_common())
    figures(f"bad input: {sum(TRIED.values())} inputs tried ({rpcs}); answers: {codes}; no undocumented code, "
            "server healthy, canary bit-for-bit unaffected")  # fmt: skip
    for line in LINES:
        figures(line)
