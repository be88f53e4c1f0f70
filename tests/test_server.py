"""The server over a real channel: every RPC, its errors, and the guarantees sessions rely on."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY

from lstmd.model.tokenizer import detokenize
from lstmd.server.app import RunningServer
from lstmd.v1 import lstmd_pb2 as pb
from lstmd.v1 import lstmd_pb2_grpc
from tests.conftest import HIDDEN, LAYERS, WORDS, Reference, ServerFactory, memory_sessions

# A client whose receive window is small and never grows: a Generate it does not read fills the
# window after a few tokens, and the server's next write waits.
SMALL_WINDOW = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
TEXTS = [
    "the cat sat on the mat .",
    "a whale in the sea , the ship !",
    "they saw the king and the queen in the city at night",
    "clouds are in the sky",
]


async def code_of(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await call
    return exc.value.code(), exc.value.details() or ""


def sample(name: str, **labels: str) -> float:
    """A metric's current value in this process (the steps counters are labelled model=tiny, phase=step)."""
    if name.startswith("lstmd_batch_size"):
        labels = {"model": "tiny", "version": "1", "phase": "step", **labels}
    return REGISTRY.get_sample_value(name, labels) or 0.0


def assert_matches(prediction: pb.Prediction, expected: np.ndarray, tolerance: float = 1e-5) -> None:
    """The prediction's candidates are the top of ``expected`` (log-probabilities), same values."""
    top = np.argsort(-expected, kind="stable")[: len(prediction.candidates)]
    got = [c.token_id for c in prediction.candidates]
    assert got == top.tolist()
    assert np.allclose([c.probability for c in prediction.candidates], np.exp(expected[top]), atol=tolerance)


# models and sessions


async def test_list_models_reports_metadata(stub: Any) -> None:
    reply = await stub.ListModels(pb.ListModelsRequest())
    models = {m.name: m for m in reply.models}
    assert set(models) == {"tiny", "tiny2"}
    tiny = models["tiny"]
    assert (tiny.num_layers, tiny.hidden_size, tiny.is_default, tiny.precision) == (LAYERS, HIDDEN, True, "fp32")
    assert tiny.state_bytes == 2 * 2 * LAYERS * HIDDEN * 4  # (h, c) after and before the last token
    assert not models["tiny2"].is_default
    assert tiny.tokenizer == models["tiny2"].tokenizer == "words"


async def test_session_lifecycle(stub: Any) -> None:
    created = await stub.CreateSession(pb.CreateSessionRequest(top_k=3))
    assert len(created.session_id) == 32 and created.position == 0 and created.top_k == 3
    assert created.model == "tiny"
    got = await stub.GetSession(pb.GetSessionRequest(session_id=created.session_id))
    assert got.session_id == created.session_id
    await stub.DeleteSession(pb.DeleteSessionRequest(session_id=created.session_id))
    code, message = await code_of(stub.GetSession(pb.GetSessionRequest(session_id=created.session_id)))
    assert code == grpc.StatusCode.NOT_FOUND and "create a new one" in message


async def test_session_ids_are_random(stub: Any) -> None:
    ids = [(await stub.CreateSession(pb.CreateSessionRequest())).session_id for _ in range(20)]
    assert len(set(ids)) == 20 and len({i[:8] for i in ids}) == 20


async def test_model_is_chosen_per_session(stub: Any, models_dir: Any) -> None:
    one = await stub.CreateSession(pb.CreateSessionRequest(model="tiny"))
    two = await stub.CreateSession(pb.CreateSessionRequest(model="tiny2"))
    a = await stub.Feed(pb.FeedRequest(session_id=one.session_id, text="the cat"))
    b = await stub.Feed(pb.FeedRequest(session_id=two.session_id, text="the cat"))
    ids = Reference(models_dir / "tiny" / "1").ids("the cat")
    assert_matches(a, Reference(models_dir / "tiny" / "1").logprobs(ids))
    assert_matches(b, Reference(models_dir / "tiny2" / "1").logprobs(ids))


@pytest.mark.parametrize(
    ("request_", "code", "words"),
    [
        (pb.CreateSessionRequest(model="nope"), grpc.StatusCode.NOT_FOUND, "no model named 'nope'"),
        (pb.CreateSessionRequest(top_k=1000), grpc.StatusCode.INVALID_ARGUMENT, "top_k 1000 is out of range"),
    ],
)
async def test_create_session_errors(stub: Any, request_: Any, code: grpc.StatusCode, words: str) -> None:
    got, message = await code_of(stub.CreateSession(request_))
    assert got == code and words in message


@pytest.mark.parametrize("method", ["GetSession", "DeleteSession", "ForkSession"])
@pytest.mark.parametrize(
    ("session_id", "code"),
    [
        ("f" * 32, grpc.StatusCode.NOT_FOUND),
        ("not-an-id", grpc.StatusCode.INVALID_ARGUMENT),
        ("", grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
async def test_session_rpcs_reject_unknown_and_malformed_ids(
    stub: Any, method: str, session_id: str, code: grpc.StatusCode
) -> None:
    request = getattr(pb, f"{method}Request")(session_id=session_id)
    assert (await code_of(getattr(stub, method)(request)))[0] == code


# tokenizing

ID = {w: i for i, w in enumerate(["<unk>", "<eos>", *WORDS])}  # the tiny models' vocabulary, as conftest builds it


async def test_tokenize_shows_the_tokens_a_feed_would_apply_and_steps_nothing(
    shared: tuple[RunningServer, Any],
) -> None:
    running, stub = shared
    held = len(memory_sessions(running))
    reply = await stub.Tokenize(pb.TokenizeRequest(text="The Cat sat, zyzzyva!\nthe"))
    assert (reply.model, reply.tokenizer) == ("tiny", "words")
    assert [(t.id, t.word, t.unknown) for t in reply.tokens] == [
        (ID["the"], "the", False),
        (ID["cat"], "cat", False),
        (ID["sat"], "sat", False),
        (ID[","], ",", False),
        (ID["<unk>"], "zyzzyva", True),
        (ID["!"], "!", False),
        (ID["<eos>"], "<eos>", False),
        (ID["the"], "the", False),
    ]
    assert (await stub.Tokenize(pb.TokenizeRequest(model="tiny2", text="sea"))).model == "tiny2"
    assert len(memory_sessions(running)) == held, "no session was made"
    session = await stub.CreateSession(pb.CreateSessionRequest())
    fed = await stub.Feed(pb.FeedRequest(session_id=session.session_id, text="The Cat sat, zyzzyva!\nthe"))
    assert list(fed.tokens) == list(reply.tokens)


@pytest.mark.parametrize(
    ("request_", "code", "words"),
    [
        (pb.TokenizeRequest(model="nope", text="the"), grpc.StatusCode.NOT_FOUND, "no model named 'nope'"),
        (pb.TokenizeRequest(text=""), grpc.StatusCode.INVALID_ARGUMENT, "the input is empty"),
        (pb.TokenizeRequest(text=" \t "), grpc.StatusCode.INVALID_ARGUMENT, "the input is empty"),
        (pb.TokenizeRequest(text="a" * 100_001), grpc.StatusCode.INVALID_ARGUMENT, "the limit is 100000"),
        (pb.TokenizeRequest(text="the " * 5000), grpc.StatusCode.INVALID_ARGUMENT, "text is 5000 tokens"),
    ],
    ids=["unknown-model", "empty", "blank", "over-max-chars", "over-max-tokens"],
)
async def test_tokenize_errors(stub: Any, request_: pb.TokenizeRequest, code: grpc.StatusCode, words: str) -> None:
    got, message = await code_of(stub.Tokenize(request_))
    assert got == code and words in message


# feeding


async def test_feed_text_and_token_ids_give_the_model_s_prediction(stub: Any, reference: Reference) -> None:
    session = await stub.CreateSession(pb.CreateSessionRequest(top_k=5))
    first = await stub.Feed(pb.FeedRequest(session_id=session.session_id, text="The cat sat zyzzyva"))
    assert [t.word for t in first.tokens] == ["the", "cat", "sat", "zyzzyva"]
    assert [t.unknown for t in first.tokens] == [False, False, False, True]
    assert first.tokens[3].id == reference.vocab.unk_id and first.position == 4
    ids = reference.ids("the cat sat zyzzyva")
    assert_matches(first, reference.logprobs(ids))
    more = reference.ids("on the mat")
    second = await stub.Feed(pb.FeedRequest(session_id=session.session_id, tokens=pb.TokenIds(ids=more), top_k=2))
    assert second.position == 7 and len(second.candidates) == 2
    assert [t.word for t in second.tokens] == ["on", "the", "mat"]
    assert_matches(second, reference.logprobs(ids + more))


async def test_token_logprobs_score_every_fed_token(stub: Any, reference: Reference) -> None:
    session = await stub.CreateSession(pb.CreateSessionRequest())
    ids = reference.ids("a whale in the sea , the ship")
    await stub.Feed(pb.FeedRequest(session_id=session.session_id, tokens=pb.TokenIds(ids=ids[:3])))
    reply = await stub.Feed(
        pb.FeedRequest(session_id=session.session_id, tokens=pb.TokenIds(ids=ids[3:]), return_token_logprobs=True)
    )
    expected = [reference.logprobs(ids[:i])[ids[i]] for i in range(3, len(ids))]
    assert np.allclose(reply.token_logprobs, expected, atol=1e-5)
    assert_matches(reply, reference.logprobs(ids))


async def test_streaming_each_token_equals_a_whole_sequence_run(stub: Any, reference: Reference) -> None:
    ids = reference.ids(TEXTS[2])
    requests = [pb.StreamRequest(tokens=pb.TokenIds(ids=[i])) for i in ids]
    replies = [r async for r in stub.Stream(iter(requests))]
    assert [r.position for r in replies] == list(range(1, len(ids) + 1))
    for n, reply in enumerate(replies, start=1):
        assert_matches(reply, reference.logprobs(ids[:n]))


async def test_a_prompt_in_one_call_equals_the_same_tokens_one_by_one(stub: Any) -> None:
    text = TEXTS[2]
    whole = await stub.CreateSession(pb.CreateSessionRequest())
    stepped = await stub.CreateSession(pb.CreateSessionRequest())
    one_call = await stub.Feed(pb.FeedRequest(session_id=whole.session_id, text=text))
    for word in text.split():
        last = await stub.Feed(pb.FeedRequest(session_id=stepped.session_id, text=word))
    assert [c.token_id for c in one_call.candidates] == [c.token_id for c in last.candidates]
    assert np.allclose(
        [c.probability for c in one_call.candidates], [c.probability for c in last.candidates], atol=1e-5
    )


async def test_concurrent_prompts_of_different_lengths_do_not_leak_into_each_other(
    stub: Any, reference: Reference
) -> None:
    sessions = [await stub.CreateSession(pb.CreateSessionRequest()) for _ in TEXTS * 4]
    texts = [TEXTS[i % len(TEXTS)][: 10 + 7 * i] for i in range(len(sessions))]
    replies = await asyncio.gather(
        *(stub.Feed(pb.FeedRequest(session_id=s.session_id, text=t)) for s, t in zip(sessions, texts, strict=True))
    )
    for reply, text in zip(replies, texts, strict=True):
        assert_matches(reply, reference.logprobs(reference.ids(text)))
    # and their states are right: one more token each
    follow = await asyncio.gather(*(stub.Feed(pb.FeedRequest(session_id=s.session_id, text="the")) for s in sessions))
    for reply, text in zip(follow, texts, strict=True):
        assert_matches(reply, reference.logprobs(reference.ids(text + " the")))


async def test_64_concurrent_streams_never_cross_talk(shared: tuple[RunningServer, Any], reference: Reference) -> None:
    _, stub = shared
    rng = np.random.default_rng(7)
    texts = [rng.integers(2, len(reference.vocab), size=12).tolist() for _ in range(64)]

    async def one_stream(ids: list[int]) -> list[pb.Prediction]:
        requests = [pb.StreamRequest(tokens=pb.TokenIds(ids=[i])) for i in ids]
        return [r async for r in stub.Stream(iter(requests))]

    before, count_before = sample("lstmd_batch_size_sum"), sample("lstmd_batch_size_count")
    results = await asyncio.gather(*(one_stream(ids) for ids in texts))
    for ids, replies in zip(texts, results, strict=True):
        for n, reply in enumerate(replies, start=1):
            assert_matches(reply, reference.logprobs(ids[:n]))
    steps = sample("lstmd_batch_size_sum") - before
    calls = sample("lstmd_batch_size_count") - count_before
    assert steps == 64 * 12 and calls < steps / 2, "steps of different sessions shared ONNX Runtime calls"


@pytest.mark.parametrize(
    ("feed", "code", "words"),
    [
        (pb.FeedRequest(), grpc.StatusCode.INVALID_ARGUMENT, "the input is empty"),
        (pb.FeedRequest(text=" ... "[:0] + "   "), grpc.StatusCode.INVALID_ARGUMENT, "the input is empty"),
        (pb.FeedRequest(tokens=pb.TokenIds(ids=[-1])), grpc.StatusCode.INVALID_ARGUMENT, "token id -1 is outside"),
        (pb.FeedRequest(tokens=pb.TokenIds(ids=[10**9])), grpc.StatusCode.INVALID_ARGUMENT, "outside the vocabulary"),
        (pb.FeedRequest(text="x", top_k=101), grpc.StatusCode.INVALID_ARGUMENT, "top_k 101 is out of range"),
        (pb.FeedRequest(text="the " * 5000), grpc.StatusCode.INVALID_ARGUMENT, "the limit per feed is 4096"),
        (pb.FeedRequest(text="a" * 100_001), grpc.StatusCode.INVALID_ARGUMENT, "the limit is 100000"),
        (pb.FeedRequest(text="x" * (2 << 20)), grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
    ],
)
async def test_bad_feeds_are_refused_and_change_nothing(
    stub: Any, reference: Reference, feed: pb.FeedRequest, code: grpc.StatusCode, words: str
) -> None:
    session = await stub.CreateSession(pb.CreateSessionRequest())
    await stub.Feed(pb.FeedRequest(session_id=session.session_id, text="the cat"))
    feed.session_id = session.session_id
    got, message = await code_of(stub.Feed(feed))
    assert got == code and words in message
    after = await stub.Feed(pb.FeedRequest(session_id=session.session_id, text="sat"))
    assert after.position == 3
    assert_matches(after, reference.logprobs(reference.ids("the cat sat")))


# exactly-once and ordering


async def test_exactly_once_replays_a_retry_and_refuses_a_stale_position(stub: Any) -> None:
    session = await stub.CreateSession(pb.CreateSessionRequest())
    sid = session.session_id
    first = await stub.Feed(pb.FeedRequest(session_id=sid, text="the cat", expected_position=0))
    retry = await stub.Feed(pb.FeedRequest(session_id=sid, text="the cat", expected_position=0))
    assert retry.replayed and not first.replayed
    assert retry.position == first.position == 2 and list(retry.candidates) == list(first.candidates)
    assert (await stub.GetSession(pb.GetSessionRequest(session_id=sid))).position == 2, "applied once"
    code, message = await code_of(stub.Feed(pb.FeedRequest(session_id=sid, text="the dog", expected_position=0)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "session's position 2" in message
    call = stub.Feed(pb.FeedRequest(session_id=sid, text="sat", expected_position=5))
    code, _ = await code_of(call)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert ("lstmd-position", "2") in list(await call.trailing_metadata()), "the actual position, machine-readable"
    nxt = await stub.Feed(pb.FeedRequest(session_id=sid, text="sat", expected_position=2))
    assert nxt.position == 3 and not nxt.replayed


async def test_concurrent_feeds_to_one_session_apply_one_at_a_time_in_order(stub: Any, reference: Reference) -> None:
    session = await stub.CreateSession(pb.CreateSessionRequest())
    ids = reference.ids(TEXTS[2])
    replies = await asyncio.gather(
        *(stub.Feed(pb.FeedRequest(session_id=session.session_id, tokens=pb.TokenIds(ids=[i]))) for i in ids)
    )
    assert sorted(r.position for r in replies) == list(range(1, len(ids) + 1))
    applied = [r.tokens[0].id for r in sorted(replies, key=lambda r: r.position)]
    assert applied == ids, "feeds are applied in arrival order"
    for reply in replies:
        assert_matches(reply, reference.logprobs(applied[: reply.position]))


async def test_fork_copies_state_and_then_evolves_independently(stub: Any, reference: Reference) -> None:
    original = await stub.CreateSession(pb.CreateSessionRequest())
    await stub.Feed(pb.FeedRequest(session_id=original.session_id, text="the king"))
    fork = await stub.ForkSession(pb.ForkSessionRequest(session_id=original.session_id))
    assert fork.session_id != original.session_id and fork.position == 2
    await stub.Feed(pb.FeedRequest(session_id=fork.session_id, text="and the queen"))
    a = await stub.Feed(pb.FeedRequest(session_id=original.session_id, text="saw"))
    b = await stub.Feed(pb.FeedRequest(session_id=fork.session_id, text="saw"))
    assert a.position == 3 and b.position == 6
    assert_matches(a, reference.logprobs(reference.ids("the king saw")))
    assert_matches(b, reference.logprobs(reference.ids("the king and the queen saw")))


# streams


async def test_stream_continues_a_named_session(stub: Any, reference: Reference) -> None:
    session = await stub.CreateSession(pb.CreateSessionRequest())
    requests = [pb.StreamRequest(session_id=session.session_id, text="the cat"), pb.StreamRequest(text="sat")]
    replies = [r async for r in stub.Stream(iter(requests))]
    assert [r.session_id for r in replies] == [session.session_id] * 2
    assert (await stub.GetSession(pb.GetSessionRequest(session_id=session.session_id))).position == 3
    assert_matches(replies[-1], reference.logprobs(reference.ids("the cat sat")))


async def test_ephemeral_stream_sessions_are_freed_at_end_and_on_cancel(shared: tuple[RunningServer, Any]) -> None:
    running, stub = shared
    before = len(memory_sessions(running))
    replies = [r async for r in stub.Stream(iter([pb.StreamRequest(model="tiny2", text="the cat")]))]
    assert len(memory_sessions(running)) == before
    code, _ = await code_of(stub.GetSession(pb.GetSessionRequest(session_id=replies[0].session_id)))
    assert code == grpc.StatusCode.NOT_FOUND

    queue: asyncio.Queue[pb.StreamRequest] = asyncio.Queue()

    async def requests() -> Any:
        while True:
            yield await queue.get()

    call = stub.Stream(requests())
    await queue.put(pb.StreamRequest(text="the"))
    await call.read()
    assert len(memory_sessions(running)) == before + 1
    call.cancel()
    for _ in range(100):
        if len(memory_sessions(running)) == before:
            break
        await asyncio.sleep(0.02)
    assert len(memory_sessions(running)) == before


async def test_stream_error_ends_the_stream_after_applied_feeds(stub: Any) -> None:
    session = await stub.CreateSession(pb.CreateSessionRequest())
    requests = [pb.StreamRequest(session_id=session.session_id, text="the"), pb.StreamRequest(text="")]
    call = stub.Stream(iter(requests))
    first = await call.read()
    assert first.position == 1
    code, _ = await code_of(call.read())
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert (await stub.GetSession(pb.GetSessionRequest(session_id=session.session_id))).position == 1


# generation


async def test_generate_is_reproducible_with_a_seed_and_advances_the_session(stub: Any) -> None:
    base = await stub.CreateSession(pb.CreateSessionRequest())
    await stub.Feed(pb.FeedRequest(session_id=base.session_id, text="the king and"))
    fork = await stub.ForkSession(pb.ForkSessionRequest(session_id=base.session_id))
    runs = []
    for sid in (base.session_id, fork.session_id):
        request = pb.GenerateRequest(session_id=sid, max_tokens=12, seed=42, temperature=0.9, top_p=0.95)
        runs.append([t async for t in stub.Generate(request)])
    assert [t.word for t in runs[0]] == [t.word for t in runs[1]]
    assert [t.position for t in runs[0]] == list(range(4, 16))
    assert runs[0][-1].finish_reason == pb.FINISH_REASON_MAX_TOKENS
    assert all(t.word not in ("<unk>", "<eos>") for t in runs[0])
    assert (await stub.GetSession(pb.GetSessionRequest(session_id=base.session_id))).position == 15


async def test_generate_with_top_k_one_is_greedy_and_stops_at_a_stop_word(stub: Any, reference: Reference) -> None:
    request = pb.GenerateRequest(prompt="the cat", max_tokens=20, top_k=1)
    words = [t async for t in stub.Generate(request)]
    ids = reference.ids("the cat")
    for token in words:
        probs = reference.logprobs(ids)
        probs[[reference.vocab.unk_id, reference.vocab.eos_id]] = -np.inf
        assert token.token_id == int(np.argmax(probs)) and math.isclose(token.probability, 1.0)
        ids.append(token.token_id)
    stop = words[2].word
    stopped = [
        t async for t in stub.Generate(pb.GenerateRequest(prompt="the cat", max_tokens=20, top_k=1, stop=[stop]))
    ]
    assert [t.word for t in stopped] == [t.word for t in words[: len(stopped)]]
    assert stopped[-1].word == stop and stopped[-1].finish_reason == pb.FINISH_REASON_STOP_WORD


async def test_generate_sends_the_text_each_token_adds(stub: Any) -> None:
    """For lstmd's word models: a space before each word, none before closing punctuation, a newline
    for "<eos>"; after the prompt, the texts add up to detokenizing prompt and generation whole."""
    request = pb.GenerateRequest(prompt="the king", max_tokens=200, seed=0, allow_eos=True)
    tokens = [t async for t in stub.Generate(request)]
    assert "".join(t.text for t in tokens) == detokenize(["the", "king", *(t.word for t in tokens)])[len("the king") :]
    assert {t.word for t in tokens} & {'"', ",", "<eos>"} == {'"', ",", "<eos>"}, "the seed reaches each case"
    for t in tokens:
        assert t.text in ("\n" if t.word == "<eos>" else t.word, " " + t.word)
    assert [t.text for t in tokens if t.word == ","] == [","] * sum(t.word == "," for t in tokens)


async def test_a_cancelled_generation_applies_nothing_and_the_same_seed_gives_the_same_words(
    make_server: ServerFactory,
) -> None:
    """A slow reader cancels after 3 tokens, while the server has run ahead of it: the session is
    where it was (prompt included), and the same seeded Generate gives the words of an uncancelled run."""
    async with make_server(max_generate_tokens=100_000) as (_, stub):
        sid = (await stub.CreateSession(pb.CreateSessionRequest())).session_id
        await stub.Feed(pb.FeedRequest(session_id=sid, text="the king and"))
        fork = (await stub.ForkSession(pb.ForkSessionRequest(session_id=sid))).session_id

        def seeded(**fields: Any) -> pb.GenerateRequest:
            return pb.GenerateRequest(seed=7, temperature=0.9, **fields)

        uncancelled = [t async for t in stub.Generate(seeded(session_id=fork, max_tokens=20))]
        for prompt in ("", "the cat"):
            call = stub.Generate(seeded(session_id=sid, prompt=prompt, max_tokens=100_000))
            read = 0
            async for _ in call:
                read += 1
                if read == 3:
                    break
                await asyncio.sleep(0.05)
            call.cancel()
            assert (await stub.GetSession(pb.GetSessionRequest(session_id=sid))).position == 3
        words = [t async for t in stub.Generate(seeded(session_id=sid, max_tokens=20, expected_position=3))]
        assert [(t.word, t.position) for t in words] == [(t.word, t.position) for t in uncancelled]
        assert (await stub.GetSession(pb.GetSessionRequest(session_id=sid))).position == 23


async def test_a_generation_whose_reader_stalls_frees_its_session_after_the_write_timeout(
    make_server: ServerFactory, figures: Callable[[str], None]
) -> None:
    """A client that never reads a Generate (its flow-control window stays full) held the session
    for ever: feeds from other clients waited. After the write timeout the generation ends
    DEADLINE_EXCEEDED, applying nothing, and the feed goes through."""
    async with make_server(max_generate_tokens=100_000, generate_write_timeout_s=0.5) as (running, stub):
        sid = (await stub.CreateSession(pb.CreateSessionRequest())).session_id
        await stub.Feed(pb.FeedRequest(session_id=sid, text="the cat"))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}", options=SMALL_WINDOW) as channel:
            call = lstmd_pb2_grpc.LstmdStub(channel).Generate(
                pb.GenerateRequest(session_id=sid, max_tokens=100_000, seed=1)
            )
            await asyncio.sleep(0.2)  # the generation fills the window, then waits for the reader
            started = time.monotonic()
            reply = await stub.Feed(pb.FeedRequest(session_id=sid, text="sat", expected_position=2), timeout=5)
            waited = time.monotonic() - started
            assert reply.position == 3 and waited < 2.5
            late = 0
            with pytest.raises(grpc.aio.AioRpcError) as stopped:  # what a reader sees when it reads at last
                async for _ in call:
                    late += 1
            assert stopped.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "read nothing for 0.5 s" in (stopped.value.details() or "")
    figures(
        f"generate/stalled reader: a Generate never read (1 KB receive window) held its session {waited:.2f} s "
        f"after another client's feed arrived (write timeout 0.5 s); read late: {late} tokens, then "
        "DEADLINE_EXCEEDED, none applied"
    )


async def test_deleting_the_session_ends_its_generation_with_not_found(make_server: ServerFactory) -> None:
    """The tokens the server had sent ahead of the reader arrive, then NOT_FOUND; the session stays deleted."""
    async with make_server(max_generate_tokens=100_000) as (_, stub):
        sid = (await stub.CreateSession(pb.CreateSessionRequest())).session_id
        call = stub.Generate(pb.GenerateRequest(session_id=sid, prompt="the cat", max_tokens=100_000, seed=3))
        read = 0
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            async for _ in call:
                read += 1
                if read == 3:
                    await stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid))
        assert ended.value.code() == grpc.StatusCode.NOT_FOUND
        assert "it ended during the generation: nothing of the generation was applied" in (ended.value.details() or "")
        assert dict(ended.value.trailing_metadata() or ())["lstmd-session-end"] == "deleted"
        assert read < 10_000, "it ended soon after the delete, not at max_tokens"
        code, _ = await code_of(stub.GetSession(pb.GetSessionRequest(session_id=sid)))
        assert code == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("request_", "words"),
    [
        (pb.GenerateRequest(max_tokens=0), "max_tokens must be between 1 and 1024"),
        (pb.GenerateRequest(max_tokens=5000), "max_tokens must be between 1 and 1024"),
        (pb.GenerateRequest(max_tokens=3, temperature=-1), "temperature"),
        (pb.GenerateRequest(max_tokens=3, top_p=1.5), "top_p"),
        (pb.GenerateRequest(max_tokens=3, top_k=10**6), "top_k"),
    ],
)
async def test_generate_rejects_bad_settings(stub: Any, request_: pb.GenerateRequest, words: str) -> None:
    code, message = await code_of(stub.Generate(request_).read())
    assert code == grpc.StatusCode.INVALID_ARGUMENT and words in message


# capacity and expiry


async def test_idle_sessions_expire(make_server: ServerFactory) -> None:
    async with make_server(session_ttl_s=0.3, sweep_interval_s=0.05) as (running, stub):
        session = await stub.CreateSession(pb.CreateSessionRequest())
        await asyncio.sleep(0.6)
        code, _ = await code_of(stub.GetSession(pb.GetSessionRequest(session_id=session.session_id)))
        assert code == grpc.StatusCode.NOT_FOUND and len(memory_sessions(running)) == 0


async def test_at_capacity_reject_refuses_new_sessions(make_server: ServerFactory) -> None:
    async with make_server(max_sessions=2, at_capacity="reject") as (_, stub):
        for _ in range(2):
            await stub.CreateSession(pb.CreateSessionRequest())
        code, message = await code_of(stub.CreateSession(pb.CreateSessionRequest()))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "maximum of 2 sessions" in message


async def test_at_capacity_evict_drops_the_least_recently_used_idle_session(make_server: ServerFactory) -> None:
    async with make_server(max_sessions=2, at_capacity="evict") as (_, stub):
        old = await stub.CreateSession(pb.CreateSessionRequest())
        recent = await stub.CreateSession(pb.CreateSessionRequest())
        await stub.Feed(pb.FeedRequest(session_id=old.session_id, text="the"))  # now old is the recent one
        evicted_before = sample("lstmd_sessions_evicted_total")
        await stub.CreateSession(pb.CreateSessionRequest())
        assert sample("lstmd_sessions_evicted_total") == evicted_before + 1
        assert (await code_of(stub.GetSession(pb.GetSessionRequest(session_id=recent.session_id))))[0] == (
            grpc.StatusCode.NOT_FOUND
        )
        assert (await stub.GetSession(pb.GetSessionRequest(session_id=old.session_id))).position == 1


async def test_at_capacity_evict_never_evicts_the_session_being_forked(make_server: ServerFactory) -> None:
    """The least recently used session is the fork's source: the fork copies it and evicts another."""
    async with make_server(max_sessions=2, at_capacity="evict") as (_, stub):
        source = await stub.CreateSession(pb.CreateSessionRequest())
        await stub.Feed(pb.FeedRequest(session_id=source.session_id, text="the cat"))
        other = await stub.CreateSession(pb.CreateSessionRequest())  # now source is the least recently used
        evicted_before = sample("lstmd_sessions_evicted_total")
        fork = await stub.ForkSession(pb.ForkSessionRequest(session_id=source.session_id))
        assert sample("lstmd_sessions_evicted_total") == evicted_before + 1
        assert (await stub.GetSession(pb.GetSessionRequest(session_id=source.session_id))).position == 2
        assert fork.position == 2
        assert (await code_of(stub.GetSession(pb.GetSessionRequest(session_id=other.session_id))))[0] == (
            grpc.StatusCode.NOT_FOUND
        )


# failures stay contained


async def test_an_internal_error_is_contained(shared: tuple[RunningServer, Any], reference: Reference) -> None:
    running, stub = shared
    bystander = await stub.CreateSession(pb.CreateSessionRequest())
    await stub.Feed(pb.FeedRequest(session_id=bystander.session_id, text="the cat"))
    victim = await stub.CreateSession(pb.CreateSessionRequest())
    model = running.engine.registry.get("tiny")
    real_run = model.run

    def broken(*args: Any, **kwargs: Any) -> Any:
        model.run = real_run  # type: ignore[method-assign]
        raise RuntimeError("injected fault")

    model.run = broken  # type: ignore[method-assign]
    code, message = await code_of(stub.Feed(pb.FeedRequest(session_id=victim.session_id, text="the dog")))
    assert code == grpc.StatusCode.INTERNAL and "server log" in message and "injected" not in message
    assert (await stub.GetSession(pb.GetSessionRequest(session_id=victim.session_id))).position == 0
    after = await stub.Feed(pb.FeedRequest(session_id=bystander.session_id, text="sat"))
    assert_matches(after, reference.logprobs(reference.ids("the cat sat")))


# health and reflection


async def test_health_and_reflection(shared: tuple[RunningServer, Any]) -> None:
    running, _ = shared
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        for service in ("", "lstmd.v1.Lstmd"):
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING  # it writes with context.write
        watch.cancel()
        call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        reply = await call.read()
        names = {s.name for s in reply.list_services_response.service}
        assert {"lstmd.v1.Lstmd", "grpc.health.v1.Health"} <= names


async def test_health_watch_streams_the_status(shared: tuple[RunningServer, Any]) -> None:
    """Watch writes with ``context.write`` rather than yielding: the interceptors must pass it through."""
    running, _ = shared
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="lstmd.v1.Lstmd"))
        reply = await asyncio.wait_for(call.read(), 10)
        assert isinstance(reply, health_pb2.HealthCheckResponse)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        call.cancel()


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
async def test_reflection_speaks_v1_and_v1alpha(shared: tuple[RunningServer, Any], version: str) -> None:
    """A raw reflection stub of each version lists the services and describes them, the v1 service
    included. (The two versions' messages are the same on the wire, so the v1alpha classes encode v1.)"""
    running, _ = shared
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        info = channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="lstmd.v1.Lstmd"),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="grpc.reflection.v1.ServerReflection"),
        ]
        listed, lstmd, v1 = [reply async for reply in info(iter(requests))]
    names = {s.name for s in listed.list_services_response.service}
    assert names == {"lstmd.v1.Lstmd", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
                     "grpc.reflection.v1alpha.ServerReflection"}  # fmt: skip
    files = lstmd.file_descriptor_response.file_descriptor_proto
    first = descriptor_pb2.FileDescriptorProto.FromString(files[0])
    assert first.name == "lstmd/v1/lstmd.proto" and "Feed" in {m.name for m in first.service[0].method}
    described = descriptor_pb2.FileDescriptorProto.FromString(v1.file_descriptor_response.file_descriptor_proto[0])
    assert (described.name, described.package) == ("grpc/reflection/v1/reflection.proto", "grpc.reflection.v1")
    method = described.service[0].method[0]
    assert (method.input_type, method.output_type) == (
        ".grpc.reflection.v1.ServerReflectionRequest", ".grpc.reflection.v1.ServerReflectionResponse"
    )  # fmt: skip
