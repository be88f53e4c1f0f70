"""The client library against a real server process: every call, and the error tree."""

from __future__ import annotations

import math
import time

import pytest

from lstmd import client
from lstmd.client import AsyncClient, Client
from tests.conftest import WORDS, Reference

ID = {w: i for i, w in enumerate(["<unk>", "<eos>", *WORDS])}  # the tiny models' vocabulary


def test_sync_client_session_calls(server_target: str, reference: Reference) -> None:
    with Client(server_target) as c:
        assert c.health() == "SERVING"
        models = {m.name: m for m in c.list_models()}
        assert models["tiny"].is_default and models["tiny2"].vocab_size == len(reference.vocab)
        with c.create_session(top_k=3) as session:
            first = session.feed("the cat")
            assert first.position == 2 == session.position and len(first.candidates) == 3
            assert [t.word for t in first.tokens] == ["the", "cat"]
            second = session.feed(reference.ids("sat on"), token_logprobs=True)
            assert second.position == 4 and len(second.token_logprobs) == 2
            best = max(
                range(len(reference.vocab)), key=lambda i: reference.logprobs(reference.ids("the cat sat on"))[i]
            )
            assert second.candidates[0].token_id == best
            fork = session.fork()
            assert fork.position == 4 and fork.id != session.id
            assert session.refresh().position == 4
            words = [t.word for t in session.generate(max_tokens=5, seed=3)]
            assert len(words) == 5 and session.position == 9
            assert [t.word for t in fork.generate(max_tokens=5, seed=3)] == words
            fork.delete()
            with pytest.raises(client.NotFound):
                c.get_session(fork.id)
        with pytest.raises(client.NotFound):  # the context manager deleted it
            c.get_session(session.id)


def test_sync_streams(server_target: str) -> None:
    with Client(server_target) as c:
        replies = list(c.stream(["the", "cat", "sat"]))
        assert [r.position for r in replies] == [1, 2, 3]
        assert len({r.session_id for r in replies}) == 1
        with c.open_stream(top_k=2) as stream:
            a = stream.feed("the")
            b = stream.feed("cat")
        assert (a.position, b.position, len(b.candidates)) == (1, 2, 2)
        with pytest.raises(client.NotFound):  # ephemeral: freed at the end of the stream
            c.get_session(a.session_id)


def test_sync_errors_map_to_the_client_tree(server_target: str) -> None:
    with Client(server_target, retries=0) as c:
        with pytest.raises(client.NotFound, match="no model named"):
            c.create_session(model="nope")
        with pytest.raises(client.InvalidInput, match="malformed session id"):
            c.get_session("xyz")
        session = c.create_session()
        with pytest.raises(client.InvalidInput, match="the input is empty"):
            session.feed("")
        session.feed("the")
        with pytest.raises(client.PositionMismatch) as exc:
            c.feed(session.id, "cat", expected_position=0)
        assert exc.value.actual_position == 1
        with pytest.raises(client.PositionMismatch) as exc:  # Generate says it too
            list(c.generate(session_id=session.id, expected_position=7, max_tokens=1))
        assert exc.value.actual_position == 1
        with pytest.raises(client.InvalidInput):
            list(c.generate("the", max_tokens=0))
        with pytest.raises(client.NotFound):
            list(c.stream(["the"], session_id="0" * 32))


def test_tokenize_with_both_clients(server_target: str) -> None:
    with Client(server_target, retries=0) as c:
        result = c.tokenize("The sea, zyzzyva")
        assert (result.model, result.tokenizer) == ("tiny", "words")
        assert [(t.id, t.word, t.unknown) for t in result.tokens] == [
            (ID["the"], "the", False),
            (ID["sea"], "sea", False),
            (ID[","], ",", False),
            (ID["<unk>"], "zyzzyva", True),
        ]
        assert c.tokenize("sea", model="tiny2").model == "tiny2"
        assert {m.tokenizer for m in c.list_models()} == {"words"}
        with pytest.raises(client.InvalidInput, match="the input is empty"):
            c.tokenize("")
        with pytest.raises(client.NotFound, match="no model named"):
            c.tokenize("the", model="nope")


async def test_async_tokenize(server_target: str) -> None:
    async with AsyncClient(server_target, retries=0) as c:
        result = await c.tokenize("The sea", model="tiny2")
        assert result == client.Tokenization("tiny2", "words", [client.Token(ID["the"], "the", False),
                                                                client.Token(ID["sea"], "sea", False)])  # fmt: skip
        with pytest.raises(client.NotFound):
            await c.tokenize("the", model="nope")


def test_unreachable_server_is_unavailable_after_retries() -> None:
    with Client("127.0.0.1:1", timeout=2, retries=2, wait_for_restart_s=0) as c, pytest.raises(client.Unavailable):
        c.list_models()


@pytest.mark.parametrize("wait", [0.0, 1.5])
def test_unavailable_is_retried_for_wait_for_restart_s_then_raised(wait: float) -> None:
    with Client("127.0.0.1:1", retries=1, wait_for_restart_s=wait) as c:
        started = time.monotonic()
        with pytest.raises(client.Unavailable):
            c.list_models()
        assert wait <= time.monotonic() - started < wait + 1.5


def test_a_retried_feed_is_never_applied_twice(server_target: str) -> None:
    """A feed whose answer was lost is retried with the same expected_position: replayed, not re-applied."""
    with Client(server_target) as c:
        session = c.create_session()
        c.feed(session.id, "the cat", expected_position=0)  # applied; pretend the answer was lost
        retry = c.feed(session.id, "the cat", expected_position=0)
        assert retry.replayed and retry.position == 2
        assert c.get_session(session.id).position == 2


async def test_async_client_has_the_same_shape(server_target: str) -> None:
    async with AsyncClient(server_target) as c:
        assert await c.health() == "SERVING"
        assert {m.name for m in await c.list_models()} == {"tiny", "tiny2"}
        async with await c.create_session(model="tiny2") as session:
            prediction = await session.feed("the cat", token_logprobs=True)
            assert prediction.position == 2 and all(math.isfinite(x) for x in prediction.token_logprobs)
            fork = await session.fork()
            assert [t.word async for t in fork.generate(max_tokens=3, seed=1)] == [
                t.word async for t in session.generate(max_tokens=3, seed=1)
            ]
            assert (await session.refresh()).position == 5
        replies = [r async for r in c.stream(["the", "cat"])]
        assert [r.position for r in replies] == [1, 2]
        async with c.open_stream() as stream:
            assert (await stream.feed("the")).position == 1
            with pytest.raises(client.InvalidInput):
                await stream.feed("")
        with pytest.raises(client.NotFound):
            await c.get_session("0" * 32)
