"""Word candidates through the client: completions of a typed prefix (``complete``, ``lstmd predict
--prefix``, ``lstmd type``), token candidates, and special tokens left out; each checked against
the server's own answer to the same request through the raw stubs."""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from lstmd import client
from lstmd.client import AsyncClient, Client, Recovery
from lstmd.server.settings import BUNDLED_MODELS
from lstmd.v1 import lstmd_pb2 as pb
from lstmd.v1 import lstmd_pb2_grpc
from tests.conftest import WORDS, Reference, ServerProcess, start_process
from tests.test_cli import LSTMD, lstmd

SPECIAL = {"<unk>", "<eos>"}
KINDS = {pb.CANDIDATE_KIND_WORD: "word", pb.CANDIDATE_KIND_TOKEN: "token"}


@pytest.fixture(scope="module")
def bundled_target() -> Iterator[str]:
    """``host:port`` of a server process serving the bundled word model (pd-english)."""
    process, port = start_process(BUNDLED_MODELS)
    yield f"127.0.0.1:{port}"
    process.terminate()
    process.communicate(timeout=30)


@contextlib.contextmanager
def raw(target: str) -> Iterator[lstmd_pb2_grpc.LstmdStub]:
    with grpc.insecure_channel(target) as channel:
        yield lstmd_pb2_grpc.LstmdStub(channel)


def server_answer(target: str, feeds: list[pb.FeedRequest]) -> pb.Prediction:
    """The server's answer to the last of ``feeds``, sent through the raw stubs on a new session."""
    with raw(target) as stub:
        session = stub.CreateSession(pb.CreateSessionRequest())
        for request in feeds:
            request.session_id = session.session_id
            answer = stub.Feed(request)
        stub.DeleteSession(pb.DeleteSessionRequest(session_id=session.session_id))
    return answer


def as_json(c: pb.Candidate) -> dict[str, object]:
    """A raw candidate as ``lstmd predict --json`` should print it."""
    return {"word": c.word, "token_id": c.token_id, "probability": c.probability, "kind": KINDS[c.kind],
            "text": c.text, "token_ids": list(c.token_ids)}  # fmt: skip


def typed(text: str, target: str, *flags: str) -> list[str]:
    """``printf TEXT | lstmd type``: its output lines."""
    result = subprocess.run([LSTMD, "type", "--target", target, *flags], input=text, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def shown(prediction: pb.Prediction) -> str:
    return "  ".join(f"{c.word} {c.probability:.0%}" for c in prediction.candidates)


def test_predict_leaves_special_tokens_out_unless_asked(bundled_target: str) -> None:
    """The bundled model's most likely word after "the clouds are in the" is <unk> (README)."""
    args = ("predict", "the clouds are in the", "--target", bundled_target)
    table = lstmd(*args).stdout
    assert "<unk>" not in table and len(table.splitlines()) == 2 + 5
    assert "<unk>" in lstmd(*args, "--special").stdout.splitlines()[2]  # rank 1

    data = json.loads(lstmd(*args, "--json").stdout)
    request = pb.FeedRequest(text="the clouds are in the", top_k=5, exclude_special=True)
    assert data["candidates"] == [as_json(c) for c in server_answer(bundled_target, [request]).candidates]
    assert not {c["word"] for c in data["candidates"]} & SPECIAL
    assert {c["kind"] for c in data["candidates"]} == {"word"}
    special = json.loads(lstmd(*args, "--json", "--special").stdout)
    request = pb.FeedRequest(text="the clouds are in the", top_k=5)
    assert special["candidates"] == [as_json(c) for c in server_answer(bundled_target, [request]).candidates]
    assert special["candidates"][0]["word"] == "<unk>"


def test_type_completes_the_last_word_with_the_servers_completion(bundled_target: str) -> None:
    [line] = typed("the clouds are in the s", bundled_target)
    words = [pair.rsplit(" ", 1)[0] for pair in line.split("  ")]
    assert len(words) == 5 and all(w.startswith("s") for w in words), line
    feeds = [pb.FeedRequest(text="the clouds are in the"),
             pb.FeedRequest(word_prefix="s", top_k=5, exclude_special=True)]  # fmt: skip
    assert line == shown(server_answer(bundled_target, feeds))


def test_type_completes_a_first_word_typed_before_anything_was_fed(bundled_target: str) -> None:
    """A new session of the bundled model starts after <eos>, so it has a completion to give."""
    [line] = typed("clo", bundled_target)
    assert line == shown(server_answer(bundled_target, [pb.FeedRequest(word_prefix="clo", top_k=5,
                                                                       exclude_special=True)]))  # fmt: skip
    assert line.startswith("clo")


def test_type_prints_a_line_per_input_line(bundled_target: str) -> None:
    """A line ending inside a word: its completion, and the word is fed before the next line; a
    line ending with whitespace or punctuation: the next words."""
    lines = typed("the clouds are in the s\nthe united states of \nthe sky .\n", bundled_target)
    texts = [
        "the clouds are in the s\nthe united states of",
        "the clouds are in the s\nthe united states of \nthe sky .",
    ]
    expected = [
        [pb.FeedRequest(text="the clouds are in the"), pb.FeedRequest(word_prefix="s", top_k=5, exclude_special=True)],
        *([pb.FeedRequest(text=text, top_k=5, exclude_special=True)] for text in texts),
    ]
    assert lines == [shown(server_answer(bundled_target, feeds)) for feeds in expected]
    assert lines[0] != lines[1] != lines[2]


def test_predict_prefix_and_tokens(server_target: str, reference: Reference) -> None:
    args = ("predict", "the cat sat on the", "--target", server_target, "--json")
    data = json.loads(lstmd(*args, "--prefix", "s", "--top-k", "4").stdout)
    feeds = [pb.FeedRequest(text="the cat sat on the", word_prefix="s", top_k=4, exclude_special=True)]
    assert data["candidates"] == [as_json(c) for c in server_answer(server_target, feeds).candidates]
    assert data["position"] == 5 and len(data["tokens"]) == 5  # the text was fed, the prefix was not
    # the order is the model's: ONNX Runtime on the model file, words of the vocabulary beginning with "s"
    logprobs = reference.logprobs(reference.ids("the cat sat on the"))
    s_words = sorted((w for w in WORDS if w.startswith("s")), key=lambda w: -logprobs[reference.vocab.ids[w]])
    assert [c["word"] for c in data["candidates"]] == s_words[:4]

    tokens = json.loads(lstmd(*args, "--tokens", "--special", "--top-k", "8").stdout)
    assert {c["kind"] for c in tokens["candidates"]} == {"token"}
    assert [c["token_id"] for c in tokens["candidates"]] == sorted(range(len(logprobs)), key=lambda i: -logprobs[i])[:8]
    assert lstmd("predict", "the", "--tokens", "--target", server_target).stdout.splitlines()[0].split()[1:3] == [
        "next",
        "token",
    ]

    only = json.loads(lstmd("predict", "--prefix", "s", "--json", "--target", server_target).stdout)
    assert only["position"] == 0 and only["tokens"] == []  # a prefix-only feed applies nothing
    assert only["candidates"] and all(c["word"].startswith("s") for c in only["candidates"])


def test_complete_moves_no_position(server_target: str) -> None:
    with Client(server_target, retries=0) as c, c.create_session(top_k=3) as session:
        session.feed("the cat")
        completion = session.complete("s")
        assert completion.position == session.position == 2 == c.get_session(session.id).position
        assert completion.tokens == [] and completion.session_id == session.id
        feeds = [pb.FeedRequest(text="the cat"), pb.FeedRequest(word_prefix="s", exclude_special=True, top_k=3)]
        expected = server_answer(server_target, feeds)
        assert [
            (x.word, x.token_id, x.probability, x.kind, x.text, list(x.token_ids)) for x in completion.candidates
        ] == [
            (x.word, x.token_id, x.probability, KINDS[x.kind], x.text, list(x.token_ids)) for x in expected.candidates
        ]
        assert session.feed(" sat").position == 3  # the next feed is at the unchanged position
        assert [x.word for x in session.complete("o", exclude_special=False).candidates] == [
            x.word for x in session.feed("", word_prefix="o").candidates
        ]
        with pytest.raises(ValueError, match="start of a word"):
            session.complete("")
        with pytest.raises(client.InvalidInput, match="word_prefix"):
            session.complete("s t")
        with c.open_stream(top_k=2) as stream:
            stream.feed("the cat")
            assert [x.word for x in stream.complete("s").candidates] == [x.word for x in completion.candidates[:2]]
            assert stream.feed(" sat").position == 3


async def test_async_complete_moves_no_position(server_target: str) -> None:
    async with AsyncClient(server_target, retries=0) as c, await c.create_session(top_k=3) as session:
        await session.feed("the cat")
        completion = await session.complete("s")
        assert completion.position == session.position == 2 == (await session.refresh()).position
        assert completion.candidates and all(x.word.startswith("s") and x.kind == "word" for x in completion.candidates)
        tokens = await session.feed(" sat", tokens=True)
        assert tokens.position == 3 and {x.kind for x in tokens.candidates} == {"token"}
        async with c.open_stream(top_k=3) as stream:
            await stream.feed("the cat")
            assert [x.word for x in (await stream.complete("s")).candidates] == [x.word for x in completion.candidates]
            assert (await stream.feed(" sat")).position == 3


def test_a_recovered_session_replays_only_real_feeds(
    models_dir: Path, servers: list[ServerProcess], server_target: str
) -> None:
    """Completions between feeds leave nothing in the recovery tail: after the server lost the
    session, the first call (a completion) recreates it from the real feeds only, exactly."""
    servers.append(ServerProcess(models_dir, "--max-sessions", "1"))
    with Client(servers[0].target) as c:
        session = c.create_session(top_k=4)
        session.feed("the cat")
        session.complete("s")
        session.feed(" sat on")
        session.complete("t")
        old_id = session.id
        c.create_session().delete()  # evicts it, behind the session's back
        completion = session.complete("m")
        assert session.recoveries == [Recovery("not_found", old_id, session.id, 0, 4, 4, True, ended="evicted")]
        assert completion.position == session.position == 4 == c.get_session(session.id).position
        feeds = [pb.FeedRequest(text="the cat"), pb.FeedRequest(text=" sat on"),
                 pb.FeedRequest(word_prefix="m", top_k=4, exclude_special=True)]  # fmt: skip
        assert [(x.word, x.probability) for x in completion.candidates] == [
            (x.word, x.probability) for x in server_answer(server_target, feeds).candidates
        ]
        session.delete()


def test_a_completion_is_exactly_once_like_any_feed(server_target: str) -> None:
    """It carries expected_position: a session someone else fed is not completed from there."""
    with Client(server_target) as c, c.create_session() as session:
        session.feed("the cat")
        c.feed(session.id, "sat")  # behind the session's back
        with pytest.raises(client.PositionMismatch) as error:
            session.complete("o")
        assert error.value.actual_position == 3 and not session.recoveries
