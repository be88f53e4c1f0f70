"""Durable sessions with real server processes: SIGTERM under load and a restart restore every
session exactly; periodic snapshots survive SIGKILL; a corrupt, truncated or newer-format file,
or a FIFO in the snapshot's place, is set aside and the server serves; a session of another
model version is refused alone; an unwritable folder leaves the server serving, with an ERROR
line and a metric.

"Exactly" is checked against a reference session on another server that never restarted, fed
the same tokens in the same feeds: after the restart both answer the same probe feed (with
token log-probabilities, which also recompute the distribution from the state before the last
token) with bit-for-bit equal candidates, probabilities and log-probabilities.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from lstmd.server import snapshot_format
from lstmd.server.app import RunningServer
from lstmd.server.session_ids import SECRET_FILE
from lstmd.server.settings import Settings
from lstmd.server.snapshot_format import SessionRecord
from lstmd.server.snapshot_policy import FILE_NAME
from lstmd.v1 import lstmd_pb2 as pb
from lstmd.v1 import lstmd_pb2_grpc
from tests.conftest import HIDDEN, LAYERS, WORDS, ServerFactory, ServerProcess, memory_sessions
from tests.test_metrics import scrape

VOCAB = len(WORDS) + 2  # <unk>, <eos> and the words
PROBE = 2  # "the"
# How a server shutting down gracefully refuses a new call: UNAVAILABLE, or CANCELLED when the call
# reached it just as it stopped accepting. Neither was applied: the restored positions below show it.
REFUSED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}


@dataclass
class Client:
    """What a client knows about one session: every feed it sent, and what was answered."""

    session_id: str
    model: str
    top_k: int
    created: Any
    chunks: list[list[int]] = field(default_factory=list)  # token ids of every feed sent; the last may be unanswered
    confirmed: int = 0  # tokens of the answered feeds
    last: tuple[pb.FeedRequest, pb.Prediction] | None = None

    async def feed(self, stub: Any, ids: list[int]) -> None:
        self.chunks.append(ids)
        request = pb.FeedRequest(session_id=self.session_id, tokens=pb.TokenIds(ids=ids),
                                 expected_position=self.confirmed)  # fmt: skip
        answer = await stub.Feed(request)
        self.confirmed += len(ids)
        assert answer.position == self.confirmed
        self.last = request, answer


async def new_client(stub: Any, model: str, top_k: int, rng: np.random.Generator) -> Client:
    session = await stub.CreateSession(pb.CreateSessionRequest(model=model, top_k=top_k))
    client = Client(session.session_id, model, top_k, session.created)
    await client.feed(stub, rng.integers(0, VOCAB, 12).tolist())  # a prompt: one multi-token feed
    return client


async def load(
    stub: Any, client: Client, rng: np.random.Generator, ends: set[grpc.StatusCode], pause: float = 0.0
) -> int:
    """Feed one (or sometimes three) tokens at a time until the server stops answering. Returns feeds answered."""
    answered = 0
    while True:
        await asyncio.sleep(pause)
        try:
            await client.feed(stub, rng.integers(0, VOCAB, 3 if rng.random() < 0.2 else 1).tolist())
        except grpc.aio.AioRpcError as e:
            assert e.code() in ends, f"{e.code()}: {e.details()}"
            return answered
        answered += 1


async def probe(stub: Any, session_id: str, position: int) -> pb.Prediction:
    """A feed that shows the whole state: candidates from (h, c) after it, and the log-probability of
    the probe token, which the server computes from the state before the session's last token."""
    reply = await stub.Feed(pb.FeedRequest(session_id=session_id, tokens=pb.TokenIds(ids=[PROBE]), top_k=10,
                                           return_token_logprobs=True, expected_position=position))  # fmt: skip
    reply.ClearField("session_id")
    assert isinstance(reply, pb.Prediction)
    return reply


async def reference_probe(reference: Any, client: Client, position: int) -> pb.Prediction:
    """The probe on a never-restarted session fed the client's feeds up to ``position``, one at a time."""
    session = await reference.CreateSession(pb.CreateSessionRequest(model=client.model, top_k=client.top_k))
    feeds, fed = [], 0
    for ids in client.chunks:
        if fed == position:
            break
        feeds.append(pb.StreamRequest(session_id=session.session_id, tokens=pb.TokenIds(ids=ids)))
        fed += len(ids)
    assert fed == position
    async for _ in reference.Stream(iter(feeds)):  # one stream: the same feeds, one at a time, quicker
        pass
    return await probe(reference, session.session_id, position)


async def assert_restored_exactly(stub: Any, reference: Any, client: Client, position: int) -> None:
    info = await stub.GetSession(pb.GetSessionRequest(session_id=client.session_id))
    assert (info.position, info.model, info.model_version, info.top_k) == (position, client.model, "1", client.top_k)
    assert info.created == client.created
    assert await probe(stub, client.session_id, position) == await reference_probe(reference, client, position)


def channel(server: ServerProcess) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(server.target)


@pytest.fixture
def reference(shared: tuple[RunningServer, Any]) -> Any:
    return shared[1]


async def test_sigterm_under_load_then_restart_restores_every_session_exactly(
    models_dir: Path, tmp_path: Path, reference: Any, servers: list[ServerProcess], figures: Callable[[str], None]
) -> None:
    servers.append(first := ServerProcess(models_dir, "--snapshot-dir", str(tmp_path), "--grace-s", "20"))
    rng = np.random.default_rng(0)
    async with channel(first) as ch:
        stub = lstmd_pb2_grpc.LstmdStub(ch)
        clients = [await new_client(stub, "tiny2" if i % 4 == 3 else "tiny", 1 + i % 7, rng) for i in range(16)]
        loads = [asyncio.create_task(load(stub, c, np.random.default_rng(i), REFUSED))
                 for i, c in enumerate(clients)]  # fmt: skip
        while min(c.confirmed for c in clients) < 30:
            await asyncio.sleep(0.01)
        first.process.send_signal(signal.SIGTERM)
        answered = sum(await asyncio.gather(*loads))
    assert first.wait() == 0
    assert "wrote 16 sessions" in first.log()

    started = time.perf_counter()
    servers.append(second := ServerProcess(models_dir, "--snapshot-dir", str(tmp_path)))
    restart_s = time.perf_counter() - started
    assert "restored 16 of 16 sessions" in second.log()
    async with channel(second) as ch:
        stub = lstmd_pb2_grpc.LstmdStub(ch)
        for client in clients:
            assert client.last is not None
            request, answer = client.last  # the exactly-once record survived: a retry is replayed
            replayed = await stub.Feed(request)
            assert replayed.replayed
            replayed.replayed = False
            assert replayed == answer
            await assert_restored_exactly(stub, reference, client, client.confirmed)
    tokens = sum(c.confirmed for c in clients)
    figures(f"durable/SIGTERM: 16 sessions under load, {answered} feeds answered, 16 refused at shutdown, 0 failed; "
          f"16 restored exactly ({tokens} tokens of state); restart to serving {restart_s:.2f} s")  # fmt: skip


async def test_periodic_snapshot_survives_sigkill(
    models_dir: Path, tmp_path: Path, reference: Any, servers: list[ServerProcess], figures: Callable[[str], None]
) -> None:
    flags = ("--snapshot-dir", str(tmp_path), "--snapshot-interval-s", "0.25")
    servers.append(first := ServerProcess(models_dir, *flags))
    rng = np.random.default_rng(1)
    async with channel(first) as ch:
        stub = lstmd_pb2_grpc.LstmdStub(ch)
        clients = [await new_client(stub, "tiny", 5, rng) for _ in range(8)]
        ends = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
        loads = [asyncio.create_task(load(stub, c, np.random.default_rng(i), ends, pause=0.005))
                 for i, c in enumerate(clients)]  # fmt: skip
        await asyncio.sleep(1.0)  # a few periodic snapshots while the load runs
        written = scrape(first.metrics_port)[("lstmd_snapshot_sessions_written_total", frozenset())]
        first.process.kill()
        await asyncio.gather(*loads)
    assert first.wait() == -signal.SIGKILL and written >= 16

    positions = {r.id: r.position for r in snapshot_format.read(tmp_path / FILE_NAME)}  # the last periodic snapshot
    assert set(positions) == {c.session_id for c in clients}
    for client in clients:
        sent = sum(len(ids) for ids in client.chunks)
        assert 12 < positions[client.session_id] <= sent  # after the prompt; the last feed may be unanswered
    servers.append(second := ServerProcess(models_dir, *flags))
    assert "restored 8 of 8 sessions" in second.log()
    async with channel(second) as ch:
        stub = lstmd_pb2_grpc.LstmdStub(ch)
        for client in clients:
            await assert_restored_exactly(stub, reference, client, positions[client.session_id])
    lost = sum(c.confirmed - positions[c.session_id] for c in clients)
    figures(f"durable/SIGKILL: 8 sessions, {sum(c.confirmed for c in clients)} tokens answered, "
          f"{int(written)} session records written by periodic snapshots (0.25 s); after SIGKILL all 8 restored "
          f"exactly as of the last snapshot, {lost} answered tokens lost in the window")  # fmt: skip


def tiny_record(session_id: str, model: str = "tiny", version: str = "1", shape: tuple[int, ...] = (2, LAYERS, HIDDEN),
                last_token: int = 1) -> SessionRecord:  # fmt: skip
    state = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return SessionRecord(session_id, model, version, 5, last_token, 3, time.time(), time.time(), "", state, state)


@pytest.mark.parametrize(
    ("damage", "kind", "reason"),
    [
        (lambda data: data[:-100], "corrupt", "truncated"),
        (lambda data: data[:60] + bytes([data[60] ^ 1]) + data[61:], "corrupt", "checksum mismatch"),
        (lambda data: data[:8] + struct.pack("<I", 3) + data[12:], "unsupported", "format version 3"),
    ],
    ids=["truncated", "corrupted", "newer-format"],
)
async def test_an_unreadable_snapshot_is_set_aside_and_the_server_serves(
    models_dir: Path, tmp_path: Path, servers: list[ServerProcess], damage: Any, kind: str, reason: str
) -> None:
    path = tmp_path / FILE_NAME
    bad = damage(snapshot_format.encode([tiny_record("a" * 32), tiny_record("b" * 32)]))
    path.write_bytes(bad)
    servers.append(server := ServerProcess(models_dir, "--snapshot-dir", str(tmp_path)))
    line = next(line for line in server.lines if "refusing the session snapshot" in line)
    assert " ERROR " in line and reason in line and f"moved it to {FILE_NAME}.{kind}-" in line
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(f"{FILE_NAME}.{kind}-")]
    assert len(aside) == 1 and aside[0].read_bytes() == bad
    async with channel(server) as ch:
        stub = lstmd_pb2_grpc.LstmdStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.GetSession(pb.GetSessionRequest(session_id="a" * 32))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        new = await stub.CreateSession(pb.CreateSessionRequest())
        await stub.Feed(pb.FeedRequest(session_id=new.session_id, text="the cat"))
    server.process.send_signal(signal.SIGTERM)
    assert server.wait() == 0
    assert [r.id for r in snapshot_format.read(path)] == [new.session_id] and aside[0].exists()


@pytest.mark.timeout(60)
async def test_a_snapshot_path_that_is_not_a_regular_file_is_set_aside_and_the_server_serves(
    models_dir: Path, tmp_path: Path, servers: list[ServerProcess]
) -> None:
    """A FIFO in place of the snapshot would block start-up for ever, waiting for a writer."""
    path = tmp_path / FILE_NAME
    os.mkfifo(path)
    servers.append(server := ServerProcess(models_dir, "--snapshot-dir", str(tmp_path)))
    line = next(line for line in server.lines if "refusing the session snapshot" in line)
    assert " ERROR " in line and "not a regular file but a FIFO (named pipe)" in line
    assert f"moved it to {FILE_NAME}.not-a-file-" in line and "starting without sessions" in line
    async with channel(server) as ch:
        stub = lstmd_pb2_grpc.LstmdStub(ch)
        new = await stub.CreateSession(pb.CreateSessionRequest())
    server.process.send_signal(signal.SIGTERM)
    assert server.wait() == 0
    assert [r.id for r in snapshot_format.read(path)] == [new.session_id]
    others = [p for p in tmp_path.iterdir() if p not in (path, tmp_path / SECRET_FILE)]  # the id secret stays
    assert [p.name.startswith(f"{FILE_NAME}.not-a-file-") for p in others] == [True]


async def test_a_session_of_a_version_whose_folder_is_gone_is_refused_and_the_others_load(
    models_dir: Path, tmp_path: Path, servers: list[ServerProcess]
) -> None:
    snapshots = tmp_path / "snapshots"
    servers.append(first := ServerProcess(models_dir, "--snapshot-dir", str(snapshots)))
    rng = np.random.default_rng(2)
    async with channel(first) as ch:
        stub = lstmd_pb2_grpc.LstmdStub(ch)
        clients = [await new_client(stub, model, 3, rng) for model in ("tiny", "tiny2", "tiny", "tiny2", "tiny")]
    first.process.send_signal(signal.SIGTERM)
    assert first.wait() == 0

    upgraded = tmp_path / "models"  # tiny2 is now version 2 (version 1's folder gone); tiny is unchanged
    shutil.copytree(models_dir / "tiny", upgraded / "tiny")
    shutil.copytree(models_dir / "tiny2" / "1", upgraded / "tiny2" / "2")
    card = json.loads((upgraded / "tiny2/2/model.json").read_text())
    (upgraded / "tiny2/2/model.json").write_text(json.dumps({**card, "version": "2"}))
    servers.append(second := ServerProcess(upgraded, "--snapshot-dir", str(snapshots)))
    log = second.log()
    assert "restored 3 of 5 sessions" in log
    async with channel(second) as ch:
        stub = lstmd_pb2_grpc.LstmdStub(ch)
        for client in clients:
            if client.model == "tiny":
                info = await stub.GetSession(pb.GetSessionRequest(session_id=client.session_id))
                assert info.position == client.confirmed == 12
                continue
            line = next(line for line in second.lines if client.session_id in line)
            assert " WARNING " in line and "not restored: the snapshot holds it for model 'tiny2' version '1', whose " \
                "folder is not in the models directory (this server serves 'tiny2' version '2')" in line  # fmt: skip
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await stub.GetSession(pb.GetSessionRequest(session_id=client.session_id))
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_sessions_the_served_models_cannot_take_are_refused_one_by_one(
    make_server: ServerFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    records = [
        tiny_record("0" * 32),  # the least recently used: no room for it
        tiny_record("1" * 32),
        tiny_record("2" * 32, model="gone"),
        tiny_record("3" * 32, shape=(2, LAYERS + 1, HIDDEN)),
        tiny_record("4" * 32, last_token=VOCAB),
        tiny_record("5" * 32, model="tiny2"),
        tiny_record("6" * 32),
    ]  # fmt: skip
    snapshot_format.write(tmp_path / FILE_NAME, records, len(records))
    with caplog.at_level(logging.INFO, logger="lstmd.server.snapshot_policy"):
        async with make_server(snapshot_dir=str(tmp_path), max_sessions=3) as (running, _):
            assert [s.id for s in memory_sessions(running).all()] == ["1" * 32, "5" * 32, "6" * 32]
    messages = [r.getMessage() for r in caplog.records]
    refusals = {m[8:40]: m for m in messages if m.startswith("session ") and "not restored" in m}
    assert sorted(refusals) == ["2" * 32, "3" * 32, "4" * 32]
    assert "model 'gone' version '1', which this server does not serve (it serves tiny, tiny2)" in refusals["2" * 32]
    assert "with state shape (2, 3, 24), the served model's is (2, 2, 24)" in refusals["3" * 32]
    assert f"with last token {VOCAB}, outside the served vocabulary" in refusals["4" * 32]
    assert any("holds 4 sessions this server can take, more than --max-sessions 3: the 1 least recently used are "
               "not restored" in m for m in messages)  # fmt: skip
    assert any("restored 3 of 7 sessions" in m for m in messages)


async def test_an_unwritable_snapshot_folder_leaves_the_server_serving_and_says_so(
    models_dir: Path, tmp_path: Path, servers: list[ServerProcess]
) -> None:
    (tmp_path / "blocker").write_text("a file where the folder's parent should be")  # unwritable even for root
    folder = tmp_path / "blocker" / "snapshots"
    servers.append(server := ServerProcess(models_dir, "--snapshot-dir", str(folder), "--snapshot-interval-s", "0.1"))
    assert "ERROR lstmd.server.snapshot_policy: cannot create the snapshot folder" in server.log()
    async with channel(server) as ch:
        stub = lstmd_pb2_grpc.LstmdStub(ch)
        session = await stub.CreateSession(pb.CreateSessionRequest())
        key: tuple[str, frozenset[tuple[str, str]]] = ("lstmd_snapshot_failures_total", frozenset())
        before = scrape(server.metrics_port)[key]
        deadline = time.monotonic() + 10
        while scrape(server.metrics_port)[key] < before + 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        after = scrape(server.metrics_port)
        assert after[key] >= before + 2 and after[("lstmd_snapshot_last_success_timestamp_seconds", frozenset())] == 0
        reply = await stub.Feed(pb.FeedRequest(session_id=session.session_id, text="the cat sat"))
        assert reply.position == 3
    assert "ERROR lstmd.server.snapshot_policy: cannot write the session snapshot" in server.log()
    assert "still serving, but 1 sessions would not survive a restart" in server.log()
    server.process.send_signal(signal.SIGTERM)
    assert server.wait() == 0 and "stopped" in server.lines[-1]


def test_snapshot_settings_are_checked() -> None:
    assert Settings(snapshot_interval_s=5).problems() == ["--snapshot-interval-s needs --snapshot-dir"]
    negative = Settings(snapshot_dir="x", snapshot_interval_s=-1)
    assert negative.problems() == ["--snapshot-interval-s must not be negative"]
