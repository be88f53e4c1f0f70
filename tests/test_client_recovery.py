"""Client recovery: a session the server lost (restart without it) is recreated from the client's
tail, one the server holds at an older position (an older snapshot) is caught up, both with
``expected_position``; exact when the tail covers what was lost, approximate (and said so)
otherwise. "Exact" is checked bit for bit against a session that was never interrupted."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from pathlib import Path

import pytest

from lstmd import client
from lstmd.client import AsyncClient, AsyncSession, Client, Prediction, Recovery, Session
from lstmd.client._errors import NotFound, PositionMismatch
from lstmd.client._recovery import Tail
from lstmd.server.app import start
from lstmd.server.registry import load_models
from lstmd.server.snapshot_policy import FILE_NAME
from tests.conftest import ServerFactory, ServerProcess, memory_sessions, settings_for

# Feeds of a session's history: text, token ids and single tokens, so chunks of several shapes are re-fed.
HISTORY: list[str | list[int]] = ["the cat sat on", [10, 11, 12], "the mat .", [20], [21], "and the dog ran", [5, 6]]


def same(a: Prediction, b: Prediction) -> bool:
    """Bit for bit the same prediction (apart from session and position)."""
    return (a.tokens, a.candidates, a.token_logprobs) == (b.tokens, b.candidates, b.token_logprobs)


def test_tail_keeps_the_last_tokens_in_their_feeds() -> None:
    tail = Tail(5, 0)
    tail.add([1, 2, 3], 3)
    tail.add([4, 5], 5)
    assert (tail.start, tail.since(0)) == (0, [[1, 2, 3], [4, 5]])
    tail.add([6, 7], 7)  # over the limit: the oldest tokens go, a feed may be cut
    assert (tail.start, tail.since(2), tail.since(4)) == (2, [[3], [4, 5], [6, 7]], [[5], [6, 7]])
    lost = PositionMismatch("FAILED_PRECONDITION", "", actual_position=4)
    plan = tail.plan(lost, 7)
    assert plan is not None and (plan.reason, plan.start, plan.chunks, plan.exact) == ("behind", 4, [[5], [6, 7]], True)
    plan = tail.plan(PositionMismatch("FAILED_PRECONDITION", "", actual_position=1), 7)  # before the tail
    assert plan is not None and (plan.start, plan.chunks, plan.exact) == (1, [[3], [4, 5], [6, 7]], False)
    assert tail.plan(PositionMismatch("FAILED_PRECONDITION", "", actual_position=9), 7) is None  # ahead: not ours
    plan = tail.plan(NotFound("NOT_FOUND", ""), 7)
    assert plan is not None and (plan.recreate, plan.chunks, plan.exact) == (True, [[3], [4, 5], [6, 7]], False)
    tail.add([9], 10)  # someone else fed the session meanwhile: the history is unknown
    assert (tail.start, tail.end, tail.since(0)) == (10, 10, [])
    assert Tail(0, 0).plan(NotFound("NOT_FOUND", ""), 0) is None  # recovery off


def test_sync_session_survives_a_restart_without_snapshots(models_dir: Path, server_target: str) -> None:
    """SIGKILL, no snapshot: the feed waits out the restart (UNAVAILABLE), finds the session gone
    (NOT_FOUND), recreates it from its tail and answers as if nothing happened."""
    first = ServerProcess(models_dir)
    second = None
    try:
        with Client(first.target, wait_for_restart_s=30) as c, Client(server_target) as ref:
            session, reference = c.create_session(top_k=4), ref.create_session(top_k=4)
            for data in HISTORY:
                assert same(session.feed(data), reference.feed(data))
            assert [t.word for t in session.generate(max_tokens=3, seed=5)] == [
                t.word for t in reference.generate(max_tokens=3, seed=5)
            ]
            old_id, position = session.id, session.position
            first.process.kill()
            first.wait()
            answer: list[Prediction] = []
            feeding = threading.Thread(target=lambda: answer.append(session.feed("the", token_logprobs=True)))
            feeding.start()  # retries UNAVAILABLE while no server listens
            feeding.join(0.5)
            assert feeding.is_alive()
            second = ServerProcess(models_dir, "--port", str(first.port))
            feeding.join(30)
            assert answer and same(answer[0], reference.feed("the", token_logprobs=True))
            assert session.id != old_id and answer[0].position == session.position == position + 1
            assert session.recoveries == [Recovery("not_found", old_id, session.id, 0, position, position, True)]
            assert session.exact
    finally:
        first.close()
        if second:
            second.close()


async def test_async_sessions_catch_up_from_an_older_snapshot(
    make_server: ServerFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The server comes back from an older snapshot: a session with a long enough tail is caught up
    exactly; one with a short tail approximately (and says so); one made after the snapshot is
    recreated; one without a tail (recovery off) gets the error."""
    snapshots = tmp_path / "snapshots"
    async with make_server(snapshot_dir=str(snapshots)) as (running, _):
        target = f"127.0.0.1:{running.port}"
        async with AsyncClient(target) as full, AsyncClient(target, recovery_tail=3) as short, \
                AsyncClient(target, recovery_tail=0) as off:  # fmt: skip
            sessions = [await full.create_session(), await short.create_session(), await off.create_session()]
            for data in HISTORY[:3]:
                for session in sessions:
                    await session.feed(data)
            assert running.snapshots and await running.snapshots.write(final=False)
            shutil.copy(snapshots / FILE_NAME, tmp_path / "older")
            late = await full.create_session()  # not in the older snapshot
            for data in HISTORY[:3]:
                await late.feed(data)
            for data in HISTORY[3:]:
                for session in [*sessions, late]:
                    await session.feed(data)
    (tmp_path / "older").replace(snapshots / FILE_NAME)  # as if the server crashed after the older snapshot

    async with make_server(snapshot_dir=str(snapshots), port=running.port):
        with caplog.at_level(logging.INFO, logger="lstmd.client"):
            async with AsyncClient(target) as full, AsyncClient(target, recovery_tail=3) as short, \
                    AsyncClient(target, recovery_tail=0) as off:  # fmt: skip
                moved = [_moved(s, c) for s, c in zip([*sessions, late], [full, short, off, full], strict=True)]
                exact, approximate, none, recreated = moved
                reference = await full.create_session()
                for data in HISTORY:
                    await reference.feed(data)
                expected = await reference.feed("the", token_logprobs=True)
                assert same(await exact.feed("the", token_logprobs=True), expected)
                assert same(await recreated.feed("the", token_logprobs=True), expected)
                assert exact.exact and recreated.exact and exact.id == sessions[0].id != recreated.id
                [caught_up] = exact.recoveries
                assert (caught_up.reason, caught_up.server_position, caught_up.refed) == ("behind", 10, 8)
                assert recreated.recoveries[0].reason == "not_found"

                approx = await approximate.feed("the", token_logprobs=True)  # 10 tokens restored + the last 3
                assert not approximate.exact and approx.position == 10 + 3 + 1 and not same(approx, expected)
                with pytest.raises(client.PositionMismatch) as error:
                    await none.feed("the")
                assert error.value.actual_position == 10 and not none.recoveries
    lines = {r.getMessage(): r.levelname for r in caplog.records}
    assert any(level == "WARNING" and "approximately" in m for m, level in lines.items())
    assert any(level == "INFO" and f"session {exact.id} was at position 10 on the server; caught up by re-feeding "
               "8 tokens, exactly" in m for m, level in lines.items())  # fmt: skip


def _moved(session: AsyncSession, to: AsyncClient) -> AsyncSession:
    """The same session object, now talking through ``to`` (the first client closed with its server)."""
    session.client = to
    return session


def test_a_deleted_session_is_not_recreated(server_target: str) -> None:
    with Client(server_target) as c:
        session: Session = c.create_session()
        session.feed("the cat")
        session.delete()
        with pytest.raises(client.NotFound):
            session.feed("sat")


def test_a_session_deleted_moved_or_past_its_lifetime_through_another_handle_is_not_recreated(
    models_dir: Path, servers: list[ServerProcess]
) -> None:
    """Endings on purpose reach the caller (NotFound with the reason); only losses are recovered."""
    servers.append(ServerProcess(models_dir, "--session-keys", "k" * 40, "--session-max-lifetime-s", "3"))
    with Client(servers[0].target) as c, Client(servers[0].target) as other:
        deleted, exported, aged = (c.create_session() for _ in range(3))
        for session in (deleted, exported, aged):
            session.feed("the cat")
        other.delete_session(deleted.id)
        other.export_session(exported.id, end_session=True)
        ids = (deleted.id, exported.id, aged.id)
        time_left = aged.info.expires.timestamp() - time.time() if aged.info.expires else 0
        assert time_left > 0, "SessionInfo.expires says when the lifetime ends"
        time.sleep(time_left + 0.2)
        for session, reason in ((deleted, "deleted"), (exported, "exported"), (aged, "lifetime")):
            with pytest.raises(client.NotFound) as ended:
                session.feed("sat")
            assert ended.value.reason == reason and not session.recoveries
        assert (deleted.id, exported.id, aged.id) == ids


async def test_a_session_is_not_recreated_on_another_model_version(make_server: ServerFactory, tmp_path: Path) -> None:
    """After a model upgrade the tail's token ids may mean other words: a plain NOT_FOUND (not "unloaded",
    for which see test_versions.py) goes to the caller."""
    async with make_server() as (running, _), AsyncClient(f"127.0.0.1:{running.port}") as c:
        session = await c.create_session()
        await session.feed("the cat")
    upgraded = tmp_path / "models"
    shutil.copytree(Path(running.engine.registry.models["tiny"].folder), upgraded / "tiny" / "2")
    card = json.loads((upgraded / "tiny/2/model.json").read_text())
    (upgraded / "tiny/2/model.json").write_text(json.dumps({**card, "version": "2"}))
    settings = settings_for(upgraded, port=running.port)
    again = await start(settings, load_models(settings))
    try:
        async with AsyncClient(f"127.0.0.1:{running.port}") as c:
            session.client = c
            with pytest.raises(client.NotFound):
                await session.feed("sat")
        assert not session.recoveries and len(memory_sessions(again)) == 0, "the trial session was deleted"
    finally:
        await again.stop(0)
