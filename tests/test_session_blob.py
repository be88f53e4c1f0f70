"""Portable session state (ExportSession, ImportSession), for real: servers with session keys on real
ports, blobs carried from one to another, every kind of damaged or foreign blob refused with
INVALID_ARGUMENT, the precondition, permission, id and capacity errors, the Redis store, and the
client library running the README's three uses."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

import lstmd.client
from bench.cluster import Redis
from lstmd.client import AlreadyExists, AsyncClient, Client, FailedPrecondition, InvalidInput, NotFound
from lstmd.export.model import LSTMLanguageModel, ModelConfig
from lstmd.export.onnx_export import write_model_dir
from lstmd.model import graph
from lstmd.model.tokenizer import EOS, UNK, TokenizerSpec, Vocab
from lstmd.server.app import RunningServer
from lstmd.server.security import SecurityConfigError
from lstmd.v1 import lstmd_pb2 as pb
from tests.conftest import HIDDEN, LAYERS, WORDS, ServerFactory, ServerProcess, serve
from tests.test_security import KEY_A, KEY_B, As, open_channel
from tests.test_server import code_of

KEY = "session-key-Jq7Xv2Lp9Rt4Wm6Zc1Bn8Hd3Fs5Gk0Ya"  # at least 32 characters
OLD_KEY = "session-key-old-Pz4Nq8Rw2Tx6Vb0Mc3Lh7Kd9Js1Gf5"
OTHER_KEY = "session-key-other-Ue2Wr5Ty8Ii1Oo4Pa7Sd0Fg3Hj6K"
FEEDS = [[5, 9, 13], [2, 40, 7, 22], [31], [8, 17, 3, 50]]  # token ids of the tiny vocabulary
PROBE = [11, 26, 44, 6]
HEADER = struct.Struct("<8sHH8sI")  # as docs/reliability.md and server/session_blob.py document it


def derived(key: str, label: bytes) -> bytes:
    """A key derived from a session key as the format documents it (HKDF-SHA-256, no salt)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label).derive(key.encode())


MAC_KEY = derived(KEY, b"lstmd session blob v1: MAC")


def probe_request(session_id: str) -> pb.FeedRequest:
    return pb.FeedRequest(session_id=session_id, tokens=pb.TokenIds(ids=PROBE), top_k=10, return_token_logprobs=True,
                          candidates=pb.CANDIDATE_KIND_TOKEN)  # fmt: skip


def seen(p: pb.Prediction) -> tuple[Any, ...]:
    """A prediction as the client sees it, floats bit for bit, the session id aside."""
    return p.position, list(p.tokens), list(p.candidates), list(p.token_logprobs), p.replayed


async def fed(stub: Any, feeds: list[list[int]] = FEEDS) -> str:
    """A new session fed ``feeds`` exactly-once (each with expected_position); its id."""
    session = await stub.CreateSession(pb.CreateSessionRequest(top_k=7))
    position = session.position
    for ids in feeds:
        request = pb.FeedRequest(session_id=session.session_id, tokens=pb.TokenIds(ids=ids), expected_position=position)
        position = (await stub.Feed(request)).position
    return str(session.session_id)


async def export(stub: Any, session_id: str, encrypt: bool = False, end: bool = False) -> pb.ExportSessionResponse:
    reply: pb.ExportSessionResponse = await stub.ExportSession(
        pb.ExportSessionRequest(session_id=session_id, encrypt=encrypt, end_session=end)
    )
    return reply


async def import_(stub: Any, blob: bytes, keep_id: bool = False) -> pb.Session:
    reply: pb.Session = await stub.ImportSession(pb.ImportSessionRequest(blob=blob, keep_id=keep_id))
    return reply


@pytest.fixture
async def two(make_server: ServerFactory) -> AsyncIterator[tuple[Any, Any]]:
    """Two servers with the same session key: raw stubs on each."""
    async with make_server(session_keys=KEY) as (_, a), make_server(session_keys=KEY) as (_, b):
        yield a, b


# the round trip


@pytest.mark.parametrize("encrypt", [False, True])
async def test_an_imported_session_answers_bit_for_bit_as_the_exported_one(two: tuple[Any, Any], encrypt: bool) -> None:
    a, b = two
    source = await fed(a)
    exported = await export(a, source, encrypt)
    assert exported.session.session_id == source and exported.session.position == sum(map(len, FEEDS))
    imported = await import_(b, exported.blob)
    assert imported.session_id != source
    assert (imported.model, imported.model_version, imported.position, imported.top_k) == (
        "tiny", "1", exported.session.position, 7
    )  # fmt: skip
    assert imported.created == exported.session.created
    # the first log-probability comes from the state before the last token, the rest from the state after it
    here, there = await a.Feed(probe_request(source)), await b.Feed(probe_request(imported.session_id))
    assert seen(here) == seen(there) and len(there.token_logprobs) == len(PROBE)
    generate = pb.GenerateRequest(max_tokens=8, seed=3)
    words = [[t.token_id async for t in s.Generate(generate)] for s, generate.session_id in
             ((a, source), (b, imported.session_id))]  # fmt: skip
    assert words[0] == words[1]
    assert (await a.GetSession(pb.GetSessionRequest(session_id=source))).position == here.position + 8


async def test_the_blob_holds_the_state_as_the_format_documents_it(two: tuple[Any, Any], models_dir: Path) -> None:
    """Read with the documented layout alone: header, MAC under the derived key, metadata, and the state
    as the model itself computes it (the ONNX graph run here on the same tokens)."""
    a, _ = two
    source = await fed(a)
    blob = (await export(a, source)).blob
    magic, version, flags, key_id, length = HEADER.unpack_from(blob)
    assert (magic, version, flags, key_id) == (b"LSTMDSES", 1, 0, hashlib.sha256(MAC_KEY).digest()[:8])
    assert len(blob) == HEADER.size + length + 32
    assert blob[-32:] == hmac.digest(MAC_KEY, blob[:-32], "sha256")
    (meta_len,) = struct.unpack_from("<I", blob, HEADER.size)
    meta = json.loads(blob[HEADER.size + 4 : HEADER.size + 4 + meta_len])
    ids = [i for feed in FEEDS for i in feed]
    assert {k: meta[k] for k in ("id", "model", "model_version", "position", "last_token", "top_k", "owner", "shape")
            } == {"id": source, "model": "tiny", "model_version": "1", "position": len(ids), "last_token": ids[-1],
                  "top_k": 7, "owner": "", "shape": [2, LAYERS, HIDDEN]}  # fmt: skip
    assert meta["exported_at"] >= meta["created"] > 0
    assert meta["last_request"]["key"][:2] == [len(ids) - len(FEEDS[-1]), FEEDS[-1]]  # the last exactly-once feed
    states = np.frombuffer(blob[HEADER.size + 4 + meta_len : -32], "<f4").reshape(2, 2, LAYERS, HIDDEN)
    model = graph.load(models_dir / "tiny" / "1" / "model.onnx")
    vocab = Vocab.load(models_dir / "tiny" / "1" / "vocab.txt")
    zero = np.zeros((LAYERS, 1, HIDDEN), np.float32)
    before = graph.run(model, np.array([[vocab.eos_id, *ids[:-1]]], np.int64), zero, zero, 1)
    after = graph.run(model, np.array([ids[-1:]], np.int64), before.h, before.c, 1)
    assert np.allclose(states[0], np.stack([after.h[:, 0], after.c[:, 0]]), atol=1e-5)
    assert np.allclose(states[1], np.stack([before.h[:, 0], before.c[:, 0]]), atol=1e-5)


async def test_an_encrypted_blob_shows_nothing_of_the_session(two: tuple[Any, Any]) -> None:
    a, b = two
    source = await fed(a)
    plain, sealed = (await export(a, source)).blob, (await export(a, source, encrypt=True)).blob
    assert HEADER.unpack_from(sealed)[2] == 1  # flags: encrypted
    body = plain[HEADER.size : -32]
    (meta_len,) = struct.unpack_from("<I", body)
    state = body[4 + meta_len :]
    nonce, ciphertext = sealed[HEADER.size : HEADER.size + 12], sealed[HEADER.size + 12 : -32]
    opened = AESGCM(derived(KEY, b"lstmd session blob v1: encryption")).decrypt(
        nonce, ciphertext, sealed[: HEADER.size]
    )
    assert opened.endswith(state) and json.loads(opened[4 : 4 + struct.unpack_from("<I", opened)[0]])["id"] == source
    for secret in (source.encode(), b'"tiny"', state[:16], state[len(state) // 2 : len(state) // 2 + 16]):
        assert secret in plain and secret not in sealed
    assert (await export(a, source, encrypt=True)).blob != sealed  # a fresh nonce each time
    assert (await import_(b, sealed)).position == sum(map(len, FEEDS))


async def test_the_exactly_once_record_travels_and_a_retry_is_replayed(two: tuple[Any, Any]) -> None:
    a, b = two
    source = await fed(a, FEEDS[:-1])
    position = sum(map(len, FEEDS[:-1]))
    last = pb.FeedRequest(session_id=source, tokens=pb.TokenIds(ids=FEEDS[-1]), expected_position=position, top_k=5,
                          return_token_logprobs=True)  # fmt: skip
    answer = await a.Feed(last)
    imported = await import_(b, (await export(a, source)).blob)
    last.session_id = imported.session_id
    replayed = await b.Feed(last)
    assert replayed.replayed and replayed.session_id == imported.session_id
    assert seen(replayed)[:4] == seen(answer)[:4]
    assert (await b.GetSession(pb.GetSessionRequest(session_id=imported.session_id))).position == answer.position
    last.tokens.ids[:] = [1]  # other input at the old position: refused, not replayed
    code, message = await code_of(b.Feed(last))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and f"session's position {answer.position}" in message


async def test_export_waits_for_a_generation_in_flight(make_server: ServerFactory) -> None:
    """A generation holds the session until it ends; an export sent meanwhile waits and holds all of it.
    The generation is long enough to stall on the HTTP/2 window until it is read, so it is in flight."""
    async with make_server(session_keys=KEY, max_generate_tokens=100_000) as (_, a):
        source = await fed(a)
        start = sum(map(len, FEEDS))
        call = a.Generate(pb.GenerateRequest(session_id=source, max_tokens=3000, seed=1))
        first = await call.read()
        assert first.position == start + 1
        task = asyncio.ensure_future(export(a, source))
        await asyncio.sleep(0.05)
        assert not task.done()
        last = first
        while (token := await call.read()) is not grpc.aio.EOF:
            last = token
        assert last.position == start + 3000
        assert (await task).session.position == start + 3000


async def test_a_session_with_nothing_fed_of_a_model_that_starts_from_zeros_moves_too(
    other_models: Path,
) -> None:
    """No last token yet (-1 in the blob): the imported session, too, gives its first token no log-probability."""
    async with (
        serve(other_models, session_keys=KEY) as (_, a),
        serve(other_models, session_keys=KEY) as (_, b),
    ):
        source = (await a.CreateSession(pb.CreateSessionRequest(model="zero"))).session_id
        imported = await import_(b, (await export(a, source, encrypt=True)).blob)
        assert imported.position == 0
        here, there = await a.Feed(probe_request(source)), await b.Feed(probe_request(imported.session_id))
        assert seen(here) == seen(there) and len(there.token_logprobs) == len(PROBE) - 1


# refusals


def flipped(blob: bytes, at: int) -> bytes:
    return blob[:at] + bytes([blob[at] ^ 0x01]) + blob[at + 1 :]


def damaged(blob: bytes) -> dict[str, bytes]:
    """``blob`` (plain) changed at a byte of each part of the documented layout, cut short and extended."""
    (meta_len,) = struct.unpack_from("<I", blob, HEADER.size)
    state = HEADER.size + 4 + meta_len
    return {
        "magic": flipped(blob, 0), "version": flipped(blob, 8), "flags": flipped(blob, 10), "key id": flipped(blob, 12),
        "length": flipped(blob, 20), "meta length": flipped(blob, HEADER.size), "metadata": flipped(blob, state - 5),
        "state": flipped(blob, state + 3), "prev_state": flipped(blob, len(blob) - 40),
        "mac": flipped(blob, len(blob) - 1), "cut short": blob[:-1], "half": blob[: len(blob) // 2],
        "extended": blob + b"\0", "empty": b"", "not a blob": b"LSTMDSNP" + bytes(200),
        "random": np.random.default_rng(0).bytes(2000),
    }  # fmt: skip


def damaged_sealed(blob: bytes) -> dict[str, bytes]:
    """An encrypted ``blob`` changed in its header, nonce, ciphertext, GCM tag and MAC."""
    return {
        "version": flipped(blob, 8), "flags": flipped(blob, 10), "key id": flipped(blob, 12),
        "length": flipped(blob, 20), "nonce": flipped(blob, HEADER.size + 3), "ciphertext": flipped(blob, 100),
        "tag": flipped(blob, len(blob) - 40), "mac": flipped(blob, len(blob) - 1), "cut short": blob[:-1],
    }  # fmt: skip


WHY = {  # the words each refusal's message must hold
    "magic": "not an lstmd session blob", "version": "format version 0;", "flags": "changed or damaged",
    "key id": "signed with a session key this server does not have", "length": "the header announces",
    "meta length": "changed or damaged", "metadata": "changed or damaged", "state": "changed or damaged",
    "prev_state": "changed or damaged", "mac": "changed or damaged", "cut short": "cut short", "half": "cut short",
    "extended": "extended", "empty": "not an lstmd session blob", "not a blob": "not an lstmd session blob",
    "random": "not an lstmd session blob", "nonce": "changed or damaged", "ciphertext": "changed or damaged",
    "tag": "changed or damaged",
}  # fmt: skip


@pytest.mark.parametrize("encrypt", [False, True])
async def test_a_damaged_blob_is_invalid_argument_and_nothing_else_changes(two: tuple[Any, Any], encrypt: bool) -> None:
    a, b = two
    source = await fed(a)
    blob = (await export(a, source, encrypt)).blob
    other = await fed(b)
    before = await b.GetSession(pb.GetSessionRequest(session_id=other))
    for part, bad in (damaged_sealed(blob) if encrypt else damaged(blob)).items():
        code, message = await code_of(import_(b, bad))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (part, message)
        assert WHY[part] in message, (part, message)
        assert "unchanged" in message or "key" in message or "version" in message, message
    assert await b.GetSession(pb.GetSessionRequest(session_id=other)) == before
    assert (await import_(b, blob)).position == before.position  # the intact blob still imports


async def test_a_blob_signed_with_another_key_is_refused_and_keys_rotate(make_server: ServerFactory) -> None:
    async with (
        make_server(session_keys=OLD_KEY) as (_, old),
        make_server(session_keys=f"{KEY},{OLD_KEY}") as (_, rotated),
        make_server(session_keys=OTHER_KEY) as (_, other),
        make_server(session_keys=KEY) as (_, new),
    ):
        from_old = (await export(old, await fed(old))).blob
        code, message = await code_of(import_(other, from_old))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert f"key id {HEADER.unpack_from(from_old)[3].hex()}" in message and "LSTMD_SESSION_KEYS" in message
        assert (await import_(rotated, from_old)).position == sum(map(len, FEEDS))  # the old key still verifies
        from_rotated = (await export(rotated, await fed(rotated))).blob  # the first key signs
        assert (await code_of(import_(old, from_rotated)))[0] == grpc.StatusCode.INVALID_ARGUMENT
        assert (await import_(new, from_rotated)).position == sum(map(len, FEEDS))


@pytest.fixture(scope="module")
def other_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder whose "tiny" is version 2 (other weights, the same vocabulary), with no "tiny2" and
    with "zero", a model whose sessions start from the zero state."""
    root = tmp_path_factory.mktemp("other-models")
    torch.manual_seed(5)
    vocab = Vocab([UNK, EOS, *WORDS])
    for name, version, spec in (("tiny", "2", TokenizerSpec()), ("zero", "1", TokenizerSpec(initial="zeros"))):
        lm = LSTMLanguageModel(ModelConfig(len(vocab), HIDDEN, HIDDEN, LAYERS, dropout=0.0))
        write_model_dir(lm.eval(), vocab, root / name / version, name, version, tokenizer=spec)
    return root


async def test_a_blob_of_a_model_version_not_loaded_is_failed_precondition(
    two: tuple[Any, Any], other_models: Path
) -> None:
    a, _ = two
    blob = (await export(a, await fed(a))).blob
    session = await a.CreateSession(pb.CreateSessionRequest(model="tiny2"))
    of_tiny2 = (await export(a, session.session_id)).blob
    async with serve(other_models, session_keys=KEY) as (_, elsewhere):
        code, message = await code_of(import_(elsewhere, blob))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert "model 'tiny' version '1'" in message and "has versions '2' loaded" in message
        code, message = await code_of(import_(elsewhere, of_tiny2))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "serves no model 'tiny2'" in message


async def test_without_a_session_key_both_calls_are_failed_precondition(stub: Any, two: tuple[Any, Any]) -> None:
    a, _ = two
    blob = (await export(a, await fed(a))).blob
    session = await stub.CreateSession(pb.CreateSessionRequest())
    for call in (export(stub, session.session_id), export(stub, "0" * 32), import_(stub, blob), import_(stub, b"x")):
        code, message = await code_of(call)
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "LSTMD_SESSION_KEYS" in message
    assert (await stub.GetSession(pb.GetSessionRequest(session_id=session.session_id))).session_id == session.session_id


async def test_an_unusable_session_key_stops_start_up_without_showing_it(make_server: ServerFactory) -> None:
    for keys, words in (("short-key-1234", "at least 32 characters"), (f"{KEY},{KEY}", "listed twice")):
        with pytest.raises(SecurityConfigError, match=words) as refused:
            async with make_server(session_keys=keys):
                pass
        assert keys.split(",")[0] not in str(refused.value)


async def test_export_of_a_missing_or_malformed_session(two: tuple[Any, Any]) -> None:
    a, _ = two
    assert (await code_of(export(a, "0" * 32)))[0] == grpc.StatusCode.NOT_FOUND
    code, message = await code_of(export(a, "nope"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "malformed session id" in message


async def test_a_blob_of_another_api_key_is_permission_denied_and_quotas_hold(make_server: ServerFactory) -> None:
    keys = f"alice:{KEY_A},bob:{KEY_B}"
    async with (
        make_server(session_keys=KEY, api_keys=keys) as (first, _),
        make_server(session_keys=KEY, api_keys=keys, max_sessions_per_key=1) as (second, _),
        make_server(session_keys=KEY) as (_, keyless),
        open_channel(first) as to_first,
        open_channel(second) as to_second,
    ):
        alice, alice_there, bob_there = As(to_first, KEY_A), As(to_second, KEY_A), As(to_second, KEY_B)
        blob = (await export(alice, await fed(alice), encrypt=True)).blob
        code, message = await code_of(import_(bob_there, blob))
        assert (
            code == grpc.StatusCode.PERMISSION_DENIED and "another API key than this call's (API key 'bob')" in message
        )
        assert "alice" not in message  # an encrypted blob's holder learns nothing of whose it is
        code, message = await code_of(import_(keyless, blob))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "no API key (keys are off here)" in message
        for call in (import_(As(to_second, None), blob), export(As(to_first, None), "0" * 32)):
            assert (await code_of(call))[0] == grpc.StatusCode.UNAUTHENTICATED
        imported = await import_(alice_there, blob)
        assert (await code_of(bob_there.GetSession(pb.GetSessionRequest(session_id=imported.session_id))))[0] == (
            grpc.StatusCode.NOT_FOUND
        )  # fmt: skip
        code, message = await code_of(import_(alice_there, blob))  # alice's quota here is one session
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "'alice' holds its maximum of 1 sessions" in message


async def test_keep_id_takes_the_blobs_id_once(two: tuple[Any, Any]) -> None:
    a, b = two
    source = await fed(a)
    blob = (await export(a, source)).blob
    assert (await import_(b, blob, keep_id=True)).session_id == source
    for stub in (a, b):  # a holds the original, b the import
        code, message = await code_of(import_(stub, blob, keep_id=True))
        assert code == grpc.StatusCode.ALREADY_EXISTS and source in message and "without keep_id" in message
    copy = await import_(a, blob)
    assert copy.session_id not in (source, "")
    await a.Feed(pb.FeedRequest(session_id=copy.session_id, tokens=pb.TokenIds(ids=[3])))  # they evolve apart
    assert (await a.GetSession(pb.GetSessionRequest(session_id=source))).position == sum(map(len, FEEDS))


async def test_end_session_moves_the_session_into_the_blob(two: tuple[Any, Any]) -> None:
    a, b = two
    source = await fed(a)
    expected = await a.Feed(probe_request(await fed(a)))  # a twin fed the same, for the answer after the move
    moved = await export(a, source, end=True)
    assert moved.session.position == sum(map(len, FEEDS))
    for call in (a.GetSession(pb.GetSessionRequest(session_id=source)), a.Feed(probe_request(source)),
                 export(a, source)):  # fmt: skip
        assert (await code_of(call))[0] == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as ended:  # its owner hears why it is gone
        await a.GetSession(pb.GetSessionRequest(session_id=source))
    assert ("lstmd-session-end", "exported") in tuple(ended.value.trailing_metadata() or ())
    assert "ImportSession" in (ended.value.details() or "")
    assert (await import_(b, moved.blob, keep_id=True)).session_id == source
    assert seen(await b.Feed(probe_request(source))) == seen(expected)


async def test_import_respects_the_session_limit(make_server: ServerFactory, two: tuple[Any, Any]) -> None:
    a, _ = two
    blob = (await export(a, await fed(a))).blob
    async with make_server(session_keys=KEY, max_sessions=1, at_capacity="reject") as (_, full):
        await full.CreateSession(pb.CreateSessionRequest())
        code, message = await code_of(import_(full, blob))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "maximum of 1 sessions" in message


# the Redis store


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Redis]:
    server = Redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


async def test_sessions_move_in_and_out_of_the_redis_store(
    two: tuple[Any, Any], redis: Redis, make_server: ServerFactory
) -> None:
    a, _ = two
    source = await fed(a)
    expected = await a.Feed(probe_request(await fed(a)))
    blob = (await export(a, source, end=True)).blob
    async with (
        make_server(session_keys=KEY, session_store=redis.url) as (_, shared),
        make_server(session_keys=KEY, session_store=redis.url) as (_, replica),
    ):
        assert (await import_(shared, blob, keep_id=True)).session_id == source
        assert (await code_of(import_(replica, blob, keep_id=True)))[0] == grpc.StatusCode.ALREADY_EXISTS
        last = pb.FeedRequest(session_id=source, tokens=pb.TokenIds(ids=FEEDS[-1]),
                              expected_position=sum(map(len, FEEDS[:-1])))  # fmt: skip
        assert (await replica.Feed(last)).replayed  # the exactly-once record is in Redis, for every replica
        back = await export(replica, source, end=True)
        assert (await code_of(shared.GetSession(pb.GetSessionRequest(session_id=source))))[0] == (
            grpc.StatusCode.NOT_FOUND
        )  # fmt: skip
    assert (await import_(a, back.blob, keep_id=True)).session_id == source
    assert seen(await a.Feed(probe_request(source))) == seen(expected)


async def test_end_session_in_redis_never_loses_a_feed_made_through_another_replica(
    redis: Redis, make_server: ServerFactory
) -> None:
    """The removal compares the position the blob holds: a replica's stale copy is not ended, and the
    export reads and seals again, so the blob holds every feed."""
    async with (
        make_server(session_keys=KEY, session_store=redis.url) as (running, here),
        make_server(session_keys=KEY, session_store=redis.url) as (_, there),
    ):
        session = (await here.CreateSession(pb.CreateSessionRequest())).session_id
        await here.Feed(pb.FeedRequest(session_id=session, tokens=pb.TokenIds(ids=FEEDS[0])))
        stale = await running.engine.store.get(session, "")
        fed = await there.Feed(pb.FeedRequest(session_id=session, tokens=pb.TokenIds(ids=FEEDS[1])))
        assert not await running.engine.store.end(stale, "exported", at_position=stale.position)
        assert (await there.GetSession(pb.GetSessionRequest(session_id=session))).position == fed.position
        moved = await export(here, session, end=True)
        assert moved.session.position == fed.position
        assert (await code_of(there.GetSession(pb.GetSessionRequest(session_id=session))))[0] == (
            grpc.StatusCode.NOT_FOUND
        )  # fmt: skip


# the client library: the README's three uses


@pytest.fixture(scope="module")
def processes(models_dir: Path) -> Iterator[list[ServerProcess]]:
    """Two server processes with the same session key."""
    started = [ServerProcess(models_dir, "--session-keys", KEY) for _ in range(2)]
    yield started
    for server in started:
        server.close()


@pytest.fixture
def clusters(processes: list[ServerProcess]) -> tuple[str, str]:
    """The two processes' targets: two clusters (or two replicas) as a client sees them."""
    return processes[0].target, processes[1].target


def readme_snippets(a: str, b: str) -> list[str]:
    """The Python blocks of the README's "Portable session state", pointed at the servers ``a`` and ``b``."""
    text = (Path(__file__).parent.parent / "README.md").read_text()
    section = text.split("### Portable session state\n", 1)[1].split("\n### ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    assert len(blocks) == 4, "the README shows the three uses in four blocks"
    return [block.replace("lstmd-a:50051", a).replace("lstmd-b:50051", b) for block in blocks]


def twin(target: str, *texts: str) -> Any:
    """The prediction after feeding ``texts`` to a new session that was never moved."""
    with Client(target) as client:
        session = client.create_session()
        return [session.feed(text) for text in texts][-1]


def test_readme_a_client_keeps_its_context_between_visits(clusters: tuple[str, str]) -> None:
    visit, next_visit, _, _ = readme_snippets(*clusters)
    seen_here: dict[str, Any] = {"Client": Client}
    exec(visit, seen_here)
    assert HEADER.unpack_from(seen_here["saved"])[2] == 1  # encrypted
    with Client(clusters[0]) as client, pytest.raises(NotFound):
        client.get_session(seen_here["session"].id)  # the server keeps nothing between the visits
    exec(next_visit, seen_here)
    assert seen_client(seen_here["prediction"]) == seen_client(twin(clusters[0], "the king and the", " queen"))


def test_readme_a_session_moves_to_another_cluster(clusters: tuple[str, str]) -> None:
    here, there = clusters
    with Client(here) as client:
        session = client.create_session()
        session.feed("the clouds are in the")
    names: dict[str, Any] = {**vars(lstmd.client), "session_id": session.id}  # the README's import
    exec(readme_snippets(here, there)[2], names)
    assert names["moved"].id == session.id and names["moved"].position == session.position
    with Client(here) as client, pytest.raises(NotFound):
        client.get_session(session.id)
    with Client(there) as client:
        assert seen_client(client.feed(session.id, " sky")) == seen_client(twin(here, "the clouds are in the", " sky"))
    with Client(here) as client, Client(there) as other:  # refused there: the session goes back, nothing lost
        kept = client.create_session()
        kept.feed("the clouds")
        other.import_session(client.export_session(kept.id), keep_id=True)  # its id is taken there
        names["session_id"] = kept.id
        with pytest.raises(AlreadyExists):
            exec(readme_snippets(here, there)[2], names)
        assert client.get_session(kept.id).position == kept.position


def test_readme_a_replica_is_drained_without_a_shared_store(clusters: tuple[str, str]) -> None:
    leaving, staying = clusters
    texts = ("the king and the queen", "a ship on the sea", "the sun")
    with Client(leaving) as client:
        sessions = [client.create_session() for _ in texts]
        for session, text in zip(sessions, texts, strict=True):
            session.feed(text)
    names = {**vars(lstmd.client), "session_ids": [s.id for s in sessions]}
    exec(readme_snippets(leaving, staying)[3], names)
    with Client(leaving) as old, Client(staying) as new:
        for session, text in zip(sessions, texts, strict=True):
            with pytest.raises(NotFound):
                old.get_session(session.id)
            moved = new.get_session(session.id)
            assert moved.position == session.position
            assert seen_client(new.feed(moved.id, " and")) == seen_client(twin(leaving, text, " and"))
        with pytest.raises(AlreadyExists):
            new.import_session(new.export_session(sessions[0].id), keep_id=True)


async def test_async_client_exports_and_imports(clusters: tuple[str, str], shared: tuple[RunningServer, Any]) -> None:
    here, there = clusters
    async with AsyncClient(here) as a, AsyncClient(there) as b:
        session = await a.create_session()
        await session.feed("the sun and the moon")
        blob = await session.export(encrypt=True)
        imported = await b.import_session(blob)
        assert imported.position == session.position and imported.id != session.id
        assert seen_client(await imported.feed(" are")) == seen_client(await session.feed(" are"))
        with pytest.raises(InvalidInput, match="changed or damaged"):
            await b.import_session(flipped(blob, len(blob) - 1))
        ended = await b.export_session(imported.id, end_session=True)
        with pytest.raises(NotFound):
            await b.get_session(imported.id)
        assert (await a.import_session(ended, keep_id=True)).id == imported.id
        await session.export(end_session=True)
        with pytest.raises(NotFound) as gone:  # moved into the blob: the session does not recover itself
            await session.feed(" bright")
        assert session.recoveries == [] and gone.value.details.startswith(f"session {session.id}")
    async with AsyncClient(f"127.0.0.1:{shared[0].port}") as keyless:  # the shared server has no key
        with pytest.raises(FailedPrecondition, match="LSTMD_SESSION_KEYS"):
            await keyless.import_session(blob)


def test_a_session_moved_into_its_blob_is_not_deleted_on_leaving_its_with_block(clusters: tuple[str, str]) -> None:
    """Its id is the imported copy's now (keep_id): the block's DeleteSession would delete that."""
    with Client(clusters[0]) as client:
        with client.create_session() as session:
            session.feed("the sun")
            moved = client.import_session(session.export(end_session=True), keep_id=True)
            session.delete()  # as leaving the block does: nothing to delete here
        assert moved.id == session.id and client.get_session(moved.id).position == 2


def seen_client(p: Any) -> tuple[Any, ...]:
    return p.position, p.tokens, p.candidates, p.token_logprobs


def test_the_session_key_never_reaches_the_log(processes: list[ServerProcess], clusters: tuple[str, str]) -> None:
    with Client(clusters[0]) as client:
        session = client.create_session()
        client.import_session(session.export())
        with pytest.raises(InvalidInput):
            client.import_session(b"LSTMDSES" + bytes(64))
    log = processes[0].log()
    assert "session export and import on (session keys: 1)" in log and "ImportSession: INVALID_ARGUMENT" in log
    assert KEY not in log and KEY[:16] not in log and MAC_KEY.hex()[:16] not in log
