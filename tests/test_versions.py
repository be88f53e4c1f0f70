"""New model versions while sessions live: a version added (ReloadModels, SIGHUP) serves new
sessions while old sessions and their forks stay on theirs; a drained version unloads when its last
session ends or at its deadline (its sessions then NOT_FOUND "unloaded", recovered by the client onto
the served version); pins; the admin guard; snapshots and Redis keep each session on its version.

Expected predictions come from the model files run directly (tests.conftest.Reference), never from
the server."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from bench.cluster import Redis
from lstmd.client import AsyncClient, NotFound, Recovery
from lstmd.export.model import LSTMLanguageModel, ModelConfig
from lstmd.export.onnx_export import write_model_dir
from lstmd.model.tokenizer import EOS, UNK, Vocab
from lstmd.server.errors import END_KEY
from lstmd.server.registry import version_folders, vocabulary_sha256
from lstmd.v1 import lstmd_pb2 as pb
from lstmd.v1 import lstmd_pb2_grpc
from tests.conftest import HIDDEN, LAYERS, WORDS, Reference, ServerFactory, ServerProcess, serve
from tests.test_cli import lstmd
from tests.test_metrics import scrape
from tests.test_server import assert_matches

# Batching: a session's step may run in one ONNX Runtime call with other sessions' steps, whose
# matrix products may round differently from the reference's call of one row; the two versions'
# distributions differ by far more (checked below), so a session stepped on the wrong version, or
# from another session's state, cannot pass.
TOLERANCE = 1e-5


def tiny_version(folder: Path, words: list[str]) -> Path:
    """Version 2 of "tiny" in ``folder``: other weights, the vocabulary ``words``."""
    torch.manual_seed(7)
    lm = LSTMLanguageModel(ModelConfig(len(words) + 2, HIDDEN, HIDDEN, LAYERS, dropout=0.0))
    with torch.no_grad():
        for p in lm.parameters():
            p.mul_(8)
    write_model_dir(lm.eval(), Vocab([UNK, EOS, *words]), folder, "tiny", "2")
    return folder


@pytest.fixture(scope="module")
def version_2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Version 2 of "tiny": the same vocabulary, other weights."""
    return tiny_version(tmp_path_factory.mktemp("v2") / "2", WORDS)


@pytest.fixture
def root(models_dir: Path, tmp_path: Path) -> Path:
    """A models folder holding "tiny" version 1 only."""
    shutil.copytree(models_dir / "tiny" / "1", tmp_path / "models" / "tiny" / "1")
    return tmp_path / "models"


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[Redis]:
    """A real redis-server of this test's own, restartable (its data in an append-only file)."""
    (tmp_path / "redis").mkdir()
    server = Redis(tmp_path / "redis")
    yield server
    server.stop()


async def a_v1_session_left_in(redis: Redis, root: Path, version_2: Path) -> str:
    """The id of a session on version 1, fed "the cat", that a replica which then stopped left in
    ``redis``; version 2 is added to ``root`` after."""
    async with serve(root, session_store=redis.url) as (_, stub):
        session = await stub.CreateSession(pb.CreateSessionRequest())
        await stub.Feed(pb.FeedRequest(session_id=session.session_id, text="the cat"))
    shutil.copytree(version_2, root / "tiny" / "2")
    return str(session.session_id)


def refs(root: Path, version_2: Path, models_dir: Path) -> dict[str, Reference]:
    return {"1": Reference(models_dir / "tiny" / "1"), "2": Reference(version_2)}


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "the condition did not hold in time"
        await asyncio.sleep(0.1)


async def versions(stub: Any) -> dict[str, pb.ModelInfo]:
    return {m.version: m for m in (await stub.ListModels(pb.ListModelsRequest())).models if m.name == "tiny"}


async def serves(stub: Any, version: str) -> bool:
    """Whether ``stub``'s server serves ``version`` of "tiny" to new sessions."""
    return (await versions(stub)).get(version, pb.ModelInfo()).serving


def open_stream(stub: Any) -> tuple[asyncio.Queue[pb.StreamRequest | None], Any]:
    """A Stream call fed from a queue: put requests on it, and None to end the stream."""
    requests: asyncio.Queue[pb.StreamRequest | None] = asyncio.Queue()

    async def sent() -> Any:
        while (request := await requests.get()) is not None:
            yield request

    return requests, stub.Stream(sent())


def assert_history(ref: Reference, history: list[int], predictions: list[pb.Prediction]) -> None:
    """Each prediction is what the model computes after the session's tokens up to it."""
    for n, prediction in enumerate(predictions, start=len(history) - len(predictions) + 1):
        assert_matches(prediction, ref.logprobs(history[:n]), TOLERANCE)


class Streamer:
    """A session fed one token at a time with expected_position, recording what it was fed."""

    def __init__(self, stub: Any, session: pb.Session, history: list[int], rng: np.random.Generator):
        self.stub, self.id, self.version = stub, session.session_id, session.model_version
        self.history = list(history)  # every token of the session (a fork's: its source's, then its own)
        self.predictions: list[pb.Prediction] = []  # one per token it fed itself
        self.rng = rng

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            token = int(self.rng.integers(2, len(WORDS) + 2))
            self.history.append(token)
            request = pb.FeedRequest(session_id=self.id, tokens=pb.TokenIds(ids=[token]),
                                     expected_position=len(self.history) - 1, top_k=5)  # fmt: skip
            prediction = await self.stub.Feed(request)
            assert prediction.position == len(self.history) and not prediction.replayed
            self.predictions.append(prediction)


def test_version_folders_sort_numbers_by_value_and_every_other_name_first(tmp_path: Path) -> None:
    """The newest is the last: the same on every replica, whatever the folder names."""
    for name in ["2", "10", "1", "01", "\u00b2", "beta", ".staging"]:  # "²" is a digit to str.isdigit
        (tmp_path / "m" / name).mkdir(parents=True)
    assert [p.name for p in version_folders(tmp_path, "m")] == ["beta", "\u00b2", "01", "1", "2", "10"]


async def test_a_version_added_under_streaming_load_serves_new_sessions_and_the_old_one_drains(
    root: Path, version_2: Path, models_dir: Path, figures: Callable[[str], None]
) -> None:
    rng = np.random.default_rng(0)
    async with serve(root) as (running, stub):
        stop = asyncio.Event()
        streamers = [Streamer(stub, await stub.CreateSession(pb.CreateSessionRequest()), [], rng) for _ in range(4)]
        tasks = [asyncio.create_task(s.run(stop)) for s in streamers]
        await asyncio.sleep(0.3)
        shutil.copytree(version_2, root / "tiny" / "2")
        reloaded = await stub.ReloadModels(pb.ReloadModelsRequest())
        assert (list(reloaded.loaded), list(reloaded.draining)) == (["tiny/2"], ["tiny/1"])
        info = {m.version: m for m in reloaded.models}
        assert (info["1"].serving, info["1"].draining, info["1"].sessions) == (False, True, 4)
        assert (info["2"].serving, info["2"].draining, info["2"].sessions) == (True, False, 0)
        assert info["1"].HasField("unload_at") and not info["2"].HasField("unload_at")
        assert info["1"].vocabulary_sha256 == info["2"].vocabulary_sha256 == vocabulary_sha256([UNK, EOS, *WORDS])
        new = [Streamer(stub, await stub.CreateSession(pb.CreateSessionRequest()), [], rng) for _ in range(2)]
        source = streamers[0]
        fork = await stub.ForkSession(pb.ForkSessionRequest(session_id=source.id))
        forked = Streamer(stub, fork, source.history[: fork.position], rng)
        more = [*new, forked]
        tasks += [asyncio.create_task(s.run(stop)) for s in more]
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*tasks)  # any failed call fails the test here

        assert [s.version for s in new] == ["2", "2"] and forked.version == "1"
        assert [s.version for s in streamers] == ["1"] * 4
        reference = refs(root, version_2, models_dir)
        for s in [*streamers, *more]:
            assert len(s.predictions) >= 3, "every session streamed on both sides of the reload"
            assert_history(reference[s.version], s.history, s.predictions)
        other = {"1": "2", "2": "1"}  # the versions differ far beyond the tolerance: a mix-up cannot pass
        for s in [*streamers, *more]:
            gap = np.abs(reference[other[s.version]].logprobs(s.history) - reference[s.version].logprobs(s.history))
            assert gap.max() > 100 * TOLERANCE

        assert (await versions(stub))["1"].sessions == 5
        for s in [*streamers, forked]:
            await stub.DeleteSession(pb.DeleteSessionRequest(session_id=s.id))

        async def v1_unloaded() -> bool:
            return list(await versions(stub)) == ["2"]

        await eventually(v1_unloaded)
        metrics = scrape(running.metrics_port)
        # Metrics are per process, and the suite's shared server in this process republishes its own
        # lstmd_model_sessions{tiny,1} every second; the SIGHUP test checks every series in a process of its own.
        labels = [dict(labels) for name, labels in metrics
                  if name.startswith("lstmd_") and not name.startswith("lstmd_model_sessions")]  # fmt: skip
        assert not [x for x in labels if x.get("model") == "tiny" and x.get("version") == "1"], "v1's metrics are gone"
        assert metrics[("lstmd_model_sessions", frozenset({"model": "tiny", "version": "2"}.items()))] == 2
        assert metrics[("lstmd_tokens_total", frozenset({"model": "tiny", "version": "2", "phase": "step"}.items()))]
        fed = sum(len(s.predictions) for s in [*streamers, *more])
        figures(f"versions/reload under load: {fed} feeds by 7 sessions (4 on v1 streaming through the reload, a fork "
                "of one, 2 new on v2), 0 failed, every prediction equal to ONNX Runtime on its own version; v1 "
                "unloaded once its 5 sessions were deleted")  # fmt: skip


async def test_at_the_drain_deadline_sessions_end_unloaded_and_the_client_recovers_them(
    root: Path, version_2: Path, models_dir: Path
) -> None:
    async with serve(root, version_drain_s=0.5) as (running, stub), AsyncClient(f"127.0.0.1:{running.port}") as c:
        raw = await stub.CreateSession(pb.CreateSessionRequest())
        await stub.Feed(pb.FeedRequest(session_id=raw.session_id, text="the cat"))
        session = await c.create_session()
        await session.feed("the cat sat")
        assert session.info.vocabulary_sha256 == raw.vocabulary_sha256 != ""
        shutil.copytree(version_2, root / "tiny" / "2")
        await stub.ReloadModels(pb.ReloadModelsRequest())

        async def v1_unloaded() -> bool:
            return list(await versions(stub)) == ["2"]

        await eventually(v1_unloaded)
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await stub.Feed(pb.FeedRequest(session_id=raw.session_id, text="sat", expected_position=3))
        assert ended.value.code() == grpc.StatusCode.NOT_FOUND
        assert (END_KEY, "unloaded") in tuple(ended.value.trailing_metadata() or ())
        assert "unloaded after its drain" in (ended.value.details() or "") and "create a new one" in (
            ended.value.details() or ""
        )

        old = session.id
        prediction = await session.feed("on")
        assert session.info.model_version == "2" and session.id != old
        [recovery] = session.recoveries
        assert recovery == Recovery("unloaded", old, session.id, 0, 3, 3, False, "unloaded") and not session.exact
        v2 = Reference(version_2)
        assert_matches(_as_pb(prediction), v2.logprobs(v2.ids("the cat sat on")), TOLERANCE)


async def test_a_session_streaming_at_the_deadline_ends_when_its_stream_ends(
    root: Path, version_2: Path, models_dir: Path
) -> None:
    async with serve(root, version_drain_s=0.3) as (_, stub):
        session = await stub.CreateSession(pb.CreateSessionRequest())
        requests, stream = open_stream(stub)
        await requests.put(pb.StreamRequest(session_id=session.session_id, text="the"))
        assert (await stream.read()).position == 1
        shutil.copytree(version_2, root / "tiny" / "2")
        reloaded = await stub.ReloadModels(pb.ReloadModelsRequest())
        unload_at = next(m for m in reloaded.models if m.version == "1").unload_at.ToNanoseconds() / 1e9
        await asyncio.sleep(max(0.0, unload_at - time.time()) + 1.5)  # the deadline, and a check after it
        assert (await versions(stub))["1"].sessions == 1, "a session in use is not ended under its stream"
        await requests.put(pb.StreamRequest(text="cat"))
        prediction = await stream.read()
        v1 = Reference(models_dir / "tiny" / "1")
        assert prediction.position == 2
        assert_matches(prediction, v1.logprobs(v1.ids("the cat")), TOLERANCE)
        await requests.put(None)
        assert await stream.code() == grpc.StatusCode.OK

        async def v1_unloaded() -> bool:
            return list(await versions(stub)) == ["2"]

        await eventually(v1_unloaded)
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await stub.GetSession(pb.GetSessionRequest(session_id=session.session_id))
        assert (END_KEY, "unloaded") in tuple(ended.value.trailing_metadata() or ())


def _as_pb(prediction: Any) -> pb.Prediction:
    """The client's Prediction as the message assert_matches reads."""
    message = pb.Prediction()
    for c in prediction.candidates:
        message.candidates.add(token_id=c.token_id, probability=c.probability)
    return message


async def test_the_folder_poll_loads_a_version_and_no_session_is_recovered_onto_another_vocabulary(
    root: Path, tmp_path: Path
) -> None:
    async with serve(root, models_poll_s=0.2, version_drain_s=0.3) as (running, stub):
        async with AsyncClient(f"127.0.0.1:{running.port}") as c:
            session = await c.create_session()
            await session.feed("the cat")
            tiny_version(root / "tiny" / "2", WORDS[::-1])  # the same words in another order: other ids

            async def v1_unloaded() -> bool:
                return list(await versions(stub)) == ["2"]

            await eventually(v1_unloaded)
            with pytest.raises(NotFound) as ended:
                await session.feed("sat")
            assert ended.value.reason == "unloaded" and not session.recoveries
        info = (await versions(stub))["2"]
        assert info.vocabulary_sha256 == vocabulary_sha256([UNK, EOS, *WORDS[::-1]]) != session.info.vocabulary_sha256
        assert info.sessions == 0, "the trial session on version 2 was deleted"


async def test_sighup_loads_a_new_version_and_a_broken_one_is_logged_and_changes_nothing(
    root: Path, version_2: Path, servers: list[ServerProcess]
) -> None:
    servers.append(server := ServerProcess(root))
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = lstmd_pb2_grpc.LstmdStub(channel)
        old = await stub.CreateSession(pb.CreateSessionRequest())
        (root / "tiny" / "3").mkdir()
        (root / "tiny" / "3" / "model.json").write_text("{not json")
        server.process.send_signal(signal.SIGHUP)

        async def logged() -> bool:
            return " ERROR " in server.log() and str(root / "tiny" / "3") in server.log()

        await eventually(logged)
        assert list(await versions(stub)) == ["1"]
        shutil.rmtree(root / "tiny" / "3")
        shutil.copytree(version_2, root / "tiny" / "2")
        server.process.send_signal(signal.SIGHUP)

        await eventually(lambda: serves(stub, "2"))
        assert (await stub.CreateSession(pb.CreateSessionRequest())).model_version == "2"
        assert (await stub.GetSession(pb.GetSessionRequest(session_id=old.session_id))).model_version == "1"
        await stub.Feed(pb.FeedRequest(session_id=old.session_id, text="the"))
        assert any(labels == {"model": "tiny", "version": "1"} for labels in _series(server.metrics_port))
        await stub.DeleteSession(pb.DeleteSessionRequest(session_id=old.session_id))

        async def v1_unloaded() -> bool:
            return list(await versions(stub)) == ["2"]

        await eventually(v1_unloaded)  # and in the same turn its metric series went
        assert not [x for x in _series(server.metrics_port) if x.get("version") == "1"], "v1's series are gone"


def _series(metrics_port: int) -> list[dict[str, str]]:
    """The label sets of lstmd's samples, without the histogram buckets' "le"."""
    scraped = scrape(metrics_port)
    return [{k: v for k, v in labels if k != "le"} for name, labels in scraped if name.startswith("lstmd_")]


async def test_pins_choose_the_served_version_and_pinning_back_drains_the_newer(
    root: Path, version_2: Path, make_server: ServerFactory
) -> None:
    shutil.copytree(version_2, root / "tiny" / "2")
    async with serve(root, model_versions="tiny=1") as (running, stub):
        assert {v: m.serving for v, m in (await versions(stub)).items()} == {"1": True}
        assert (await stub.CreateSession(pb.CreateSessionRequest())).model_version == "1"
        unpinned = await stub.ReloadModels(pb.ReloadModelsRequest(pins={"tiny": ""}))
        assert (list(unpinned.loaded), list(unpinned.draining)) == (["tiny/2"], ["tiny/1"])
        assert (await stub.CreateSession(pb.CreateSessionRequest())).model_version == "2"
        back = await stub.ReloadModels(pb.ReloadModelsRequest(pins={"tiny": "1"}))
        assert (list(back.loaded), list(back.draining)) == ([], ["tiny/2"])
        info = {m.version: m for m in back.models}
        assert (info["1"].serving, info["2"].draining, info["2"].sessions) == (True, True, 1)
        shown = await asyncio.to_thread(lstmd, "models", "--target", f"127.0.0.1:{running.port}")
        table = [row.replace(" (default)", "").split() for row in shown.stdout.splitlines()[2:]]
        deadline = info["2"].unload_at.ToDatetime().strftime("%Y-%m-%dT%H:%M:%SZ")
        assert {cols[1]: cols[2:5] for cols in table} == {"1": ["serving", "-", str(info["1"].sessions)],
                                                          "2": ["draining", deadline, "1"]}  # fmt: skip
        assert (await stub.CreateSession(pb.CreateSessionRequest())).model_version == "1"
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.ReloadModels(pb.ReloadModelsRequest(pins={"tiny": "9"}))
        assert missing.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "tiny to version '9'" in (missing.value.details() or "")
        assert "holds 1, 2" in (missing.value.details() or "")
        assert (await stub.CreateSession(pb.CreateSessionRequest())).model_version == "1", "nothing changed"


async def test_lstmd_reload_and_the_client_library_load_pin_and_report(root: Path, version_2: Path) -> None:
    async with serve(root) as (running, _), AsyncClient(f"127.0.0.1:{running.port}") as client:
        target = ("--target", f"127.0.0.1:{running.port}")
        nothing = (await asyncio.to_thread(lstmd, "reload", *target)).stdout
        assert nothing.startswith("loaded: nothing new; draining: none")
        await client.create_session()  # keeps version 1 loaded while it drains
        shutil.copytree(version_2, root / "tiny" / "2")
        shown = (await asyncio.to_thread(lstmd, "reload", *target)).stdout.splitlines()
        assert shown[0] == "loaded: tiny/2; draining: tiny/1"
        rows = [row.replace(" (default)", "").split() for row in shown[3:]]
        assert [cols[1:3] + cols[4:5] for cols in rows] == [["1", "draining", "1"], ["2", "serving", "0"]]
        assert (await client.create_session()).info.model_version == "2"
        pinned = await client.reload_models({"tiny": "1"})
        assert (pinned.loaded, pinned.draining) == ([], ["tiny/2"])
        assert {m.version: (m.serving, m.draining, m.sessions) for m in pinned.models} == {
            "1": (True, False, 1), "2": (False, True, 1)}  # fmt: skip
        assert (await client.create_session()).info.model_version == "1"
        unpinned = json.loads((await asyncio.to_thread(lstmd, "reload", *target, "--unpin", "tiny", "--json")).stdout)
        assert (unpinned["loaded"], unpinned["draining"]) == ([], ["tiny/1"])
        assert {m["version"]: m["serving"] for m in unpinned["models"]} == {"1": False, "2": True}
        refused = await asyncio.to_thread(lstmd, "reload", *target, "--pin", "tiny=9", check=False)
        assert refused.returncode == 1 and refused.stderr.startswith("lstmd: INVALID_ARGUMENT:")
        assert "holds 1, 2" in refused.stderr
        bad = await asyncio.to_thread(lstmd, "reload", *target, "--pin", "tiny", check=False)
        assert bad.returncode == 2 and "expected NAME=VERSION" in bad.stderr
        both = await asyncio.to_thread(lstmd, "reload", *target, "--pin", "tiny=1", "--unpin", "tiny", check=False)
        assert both.returncode == 2 and "tiny pinned or unpinned more than once" in both.stderr


async def test_reload_is_for_admin_keys_and_a_broken_folder_fails_it_and_changes_nothing(
    root: Path, version_2: Path
) -> None:
    keys = "admin:admin-key-9f8e7d6c5b4a3210,user:user-key-0123456789abcdef"
    async with (
        serve(root, api_keys=keys, admin_keys="admin") as (running, _),
        grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel,
    ):
        stub = lstmd_pb2_grpc.LstmdStub(channel)
        user = (("authorization", "Bearer user-key-0123456789abcdef"),)
        admin = (("authorization", "Bearer admin-key-9f8e7d6c5b4a3210"),)
        session = await stub.CreateSession(pb.CreateSessionRequest(), metadata=user)
        shutil.copytree(version_2, root / "tiny" / "2")
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await stub.ReloadModels(pb.ReloadModelsRequest(), metadata=user)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "LSTMD_ADMIN_KEYS" in (denied.value.details() or "")
        (root / "tiny" / "3").mkdir()
        (root / "tiny" / "3" / "model.onnx").write_bytes(b"not a model")
        with pytest.raises(grpc.aio.AioRpcError) as broken:
            await stub.ReloadModels(pb.ReloadModelsRequest(), metadata=admin)
        assert broken.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert str(root / "tiny" / "3") in (broken.value.details() or "")
        listed = (await stub.ListModels(pb.ListModelsRequest(), metadata=user)).models
        assert [(m.version, m.serving) for m in listed if m.name == "tiny"] == [("1", True)]
        await stub.Feed(pb.FeedRequest(session_id=session.session_id, text="the"), metadata=user)
        shutil.rmtree(root / "tiny" / "3")
        shutil.copytree(root / "tiny" / "1", root / "tiny" / "3")  # its card still says version 1
        with pytest.raises(grpc.aio.AioRpcError) as copied:
            await stub.ReloadModels(pb.ReloadModelsRequest(), metadata=admin)
        assert copied.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "says version '1', its folder '3'" in (copied.value.details() or "")
        shutil.rmtree(root / "tiny" / "3")
        reloaded = await stub.ReloadModels(pb.ReloadModelsRequest(), metadata=admin)
        assert list(reloaded.loaded) == ["tiny/2"]


async def test_a_snapshot_with_sessions_of_two_versions_restores_both(
    root: Path, version_2: Path, models_dir: Path, tmp_path: Path
) -> None:
    snapshots = str(tmp_path / "snapshots")
    async with serve(root, snapshot_dir=snapshots) as (_, stub):
        one = await stub.CreateSession(pb.CreateSessionRequest())
        await stub.Feed(pb.FeedRequest(session_id=one.session_id, text="the cat"))
        shutil.copytree(version_2, root / "tiny" / "2")
        await stub.ReloadModels(pb.ReloadModelsRequest())
        two = await stub.CreateSession(pb.CreateSessionRequest())
        await stub.Feed(pb.FeedRequest(session_id=two.session_id, text="the dog"))
    async with serve(root, snapshot_dir=snapshots) as (_, stub):
        info = await versions(stub)
        assert (info["1"].draining, info["1"].sessions, info["2"].serving, info["2"].sessions) == (True, 1, True, 1)
        reference = refs(root, version_2, models_dir)
        for session, text, version in ((one, "the cat sat", "1"), (two, "the dog sat", "2")):
            got = await stub.GetSession(pb.GetSessionRequest(session_id=session.session_id))
            assert (got.model_version, got.position) == (version, 2)
            prediction = await stub.Feed(pb.FeedRequest(session_id=session.session_id, text="sat"))
            assert_matches(prediction, reference[version].logprobs(reference[version].ids(text)), TOLERANCE)


async def test_with_redis_sessions_of_both_versions_are_served_and_counted(
    root: Path, version_2: Path, models_dir: Path, redis: Redis
) -> None:
    async with (
        serve(root, session_store=redis.url, version_drain_s=2.0) as (first, stub),
        serve(root, session_store=redis.url, version_drain_s=2.0) as (_, other),  # another replica
    ):
        one = await stub.CreateSession(pb.CreateSessionRequest())
        shutil.copytree(version_2, root / "tiny" / "2")
        await first.versions.reload()  # as SIGHUP does: this replica only
        two = await stub.CreateSession(pb.CreateSessionRequest())
        reference = refs(root, version_2, models_dir)
        for session, version in ((one, "1"), (two, "2")):
            prediction = await stub.Feed(pb.FeedRequest(session_id=session.session_id, text="the cat"))
            assert_matches(prediction, reference[version].logprobs(reference[version].ids("the cat")), TOLERANCE)
        info = await versions(stub)
        assert (info["1"].sessions, info["1"].draining, info["2"].sessions) == (1, True, 1)
        with pytest.raises(grpc.aio.AioRpcError) as not_yet:  # the other replica is not reloaded yet
            await other.Feed(pb.FeedRequest(session_id=two.session_id, text="sat"))
        assert not_yet.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "version '2', which this replica has not loaded" in (not_yet.value.details() or "")
        await other.ReloadModels(pb.ReloadModelsRequest())
        prediction = await other.Feed(pb.FeedRequest(session_id=two.session_id, text="sat", expected_position=2))
        assert_matches(prediction, reference["2"].logprobs(reference["2"].ids("the cat sat")), TOLERANCE)

        async def v1_unloaded() -> bool:
            return list(await versions(stub)) == ["2"]

        await eventually(v1_unloaded)
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await stub.GetSession(pb.GetSessionRequest(session_id=one.session_id))
        assert ended.value.code() == grpc.StatusCode.NOT_FOUND
        assert (END_KEY, "unloaded") in tuple(ended.value.trailing_metadata() or ())
        await stub.Feed(pb.FeedRequest(session_id=two.session_id, text="on"))


async def test_a_call_stepping_a_session_when_its_version_unloads_ends_unloaded_and_never_hangs(
    root: Path, version_2: Path
) -> None:
    """The last v1 session is deleted while a long feed on it runs, so v1 unloads under the feed: its
    batcher stops with the feed's steps in it, and the feed must end (NOT_FOUND, "unloaded"), not wait."""
    async with serve(root, version_drain_s=600) as (running, stub):
        session = await stub.CreateSession(pb.CreateSessionRequest())
        shutil.copytree(version_2, root / "tiny" / "2")
        await stub.ReloadModels(pb.ReloadModelsRequest())
        long = pb.FeedRequest(session_id=session.session_id, tokens=pb.TokenIds(ids=[2] * 4000),
                              return_token_logprobs=True)  # fmt: skip
        feed = asyncio.ensure_future(stub.Feed(long))
        await asyncio.sleep(0.2)
        assert not feed.done(), "the feed is still stepping"
        await stub.DeleteSession(pb.DeleteSessionRequest(session_id=session.session_id))
        await running.versions.check()  # what the loop does every second
        assert list(await versions(stub)) == ["2"], "v1 unloaded with the feed in flight"
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await asyncio.wait_for(feed, 10)
        assert ended.value.code() == grpc.StatusCode.NOT_FOUND
        assert (END_KEY, "unloaded") in tuple(ended.value.trailing_metadata() or ())
        new = await stub.CreateSession(pb.CreateSessionRequest())
        assert (await stub.Feed(pb.FeedRequest(session_id=new.session_id, text="the"))).position == 1


async def test_in_redis_a_stream_across_the_deadline_and_a_session_missing_from_the_version_index(
    root: Path, version_2: Path, redis: Redis
) -> None:
    """A stream holding a v1 session in Redis past the deadline gets NOT_FOUND "unloaded" on its next
    feed; a live session missing from its version's index (written by an older lstmd) is put back in it
    by its next step, so the drain counts it."""
    async with serve(root, session_store=redis.url, version_drain_s=1.0) as (_, stub):
        streamed, unindexed = [await stub.CreateSession(pb.CreateSessionRequest()) for _ in range(2)]
        redis.cli("ZREM", "lstmd:version:tiny/1", unindexed.session_id)
        await stub.Feed(pb.FeedRequest(session_id=unindexed.session_id, text="the cat"))
        assert redis.cli("ZSCORE", "lstmd:version:tiny/1", unindexed.session_id).strip(), "back in the index"
        requests, stream = open_stream(stub)
        await requests.put(pb.StreamRequest(session_id=streamed.session_id, text="the"))
        assert (await stream.read()).position == 1
        shutil.copytree(version_2, root / "tiny" / "2")
        await stub.ReloadModels(pb.ReloadModelsRequest())
        assert (await versions(stub))["1"].sessions == 2

        async def v1_unloaded() -> bool:
            return list(await versions(stub)) == ["2"]

        await eventually(v1_unloaded)
        await requests.put(pb.StreamRequest(text="cat"))
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await asyncio.wait_for(stream.read(), 10)
        assert ended.value.code() == grpc.StatusCode.NOT_FOUND
        assert (END_KEY, "unloaded") in tuple(ended.value.trailing_metadata() or ())
        await requests.put(None)
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await stub.GetSession(pb.GetSessionRequest(session_id=unindexed.session_id))
        assert (END_KEY, "unloaded") in tuple(gone.value.trailing_metadata() or ())


async def test_in_redis_a_replica_restarted_after_an_upgrade_serves_the_older_versions_sessions(
    root: Path, version_2: Path, models_dir: Path, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """A replica started with version 2 newest loads version 1 too, draining, while sessions in Redis
    are on it (a rolling restart after an upgrade), and leaves a newer version than it serves alone."""
    reference = refs(root, version_2, models_dir)
    old = await a_v1_session_left_in(redis, root, version_2)
    async with serve(root, session_store=redis.url) as (_, stub):  # restarted with both folders
        info = await versions(stub)
        assert (info["1"].draining, info["1"].sessions, info["2"].serving) == (True, 1, True)
        prediction = await stub.Feed(pb.FeedRequest(session_id=old, text="sat", expected_position=2))
        assert_matches(prediction, reference["1"].logprobs(reference["1"].ids("the cat sat")), TOLERANCE)
        new = await stub.CreateSession(pb.CreateSessionRequest())
        assert new.model_version == "2"
        await stub.DeleteSession(pb.DeleteSessionRequest(session_id=old))

        async def v1_unloaded() -> bool:
            return list(await versions(stub)) == ["2"]

        await eventually(v1_unloaded)
    with caplog.at_level("WARNING", logger="lstmd.server.versions"):
        async with serve(root, session_store=redis.url, model_versions="tiny=1") as (_, stub):
            assert list(await versions(stub)) == ["1"], "version 2, newer than served, is not loaded"
            with pytest.raises(grpc.aio.AioRpcError) as elsewhere:
                await stub.GetSession(pb.GetSessionRequest(session_id=new.session_id))
            assert elsewhere.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "sessions in the store are on tiny version 2, which this replica does not load" in caplog.text


async def test_in_redis_a_replica_started_while_redis_is_down_loads_the_older_version_once_it_is_back(
    root: Path, version_2: Path, models_dir: Path, redis: Redis
) -> None:
    reference = refs(root, version_2, models_dir)
    old = await a_v1_session_left_in(redis, root, version_2)
    redis.stop()
    async with serve(root, session_store=redis.url) as (_, stub):
        with pytest.raises(grpc.aio.AioRpcError) as down:
            await stub.GetSession(pb.GetSessionRequest(session_id=old))
        assert down.value.code() == grpc.StatusCode.UNAVAILABLE
        assert list(await versions(stub)) == ["2"]  # ListModels answers all the same
        redis.start()  # its data kept (append-only file)

        async def v1_draining() -> bool:
            return (await versions(stub)).get("1", pb.ModelInfo()).draining

        await eventually(v1_draining)
        prediction = await stub.Feed(pb.FeedRequest(session_id=old, text="sat", expected_position=2))
        assert_matches(prediction, reference["1"].logprobs(reference["1"].ids("the cat sat")), TOLERANCE)
        redis.stop()
        pinned = await stub.ReloadModels(pb.ReloadModelsRequest(pins={"tiny": "1"}))  # took effect: says so
        assert (list(pinned.loaded), list(pinned.draining)) == ([], ["tiny/2"])
        assert {m.version: (m.serving, m.sessions) for m in pinned.models} == {"1": (True, 1), "2": (False, 0)}


async def test_in_redis_a_canary_reload_ends_no_session_of_a_version_another_replica_still_serves(
    root: Path, version_2: Path, models_dir: Path, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Only replica A is reloaded (a canary, by SIGHUP): past A's deadline for version 1 the sessions replica B
    creates and feeds on it live on, and A keeps it draining; once B is reloaded too, the deadline
    ends them and both unload it."""
    v1 = Reference(models_dir / "tiny" / "1")
    with caplog.at_level("WARNING", logger="lstmd.server.versions"):
        async with (
            serve(root, session_store=redis.url, version_drain_s=1.0) as (canary, a),
            serve(root, session_store=redis.url, version_drain_s=1.0) as (_, b),
        ):
            shutil.copytree(version_2, root / "tiny" / "2")
            await canary.versions.reload()  # as SIGHUP does: this replica only
            unload_at = (await versions(a))["1"].unload_at.ToNanoseconds() / 1e9
            before = await b.CreateSession(pb.CreateSessionRequest())  # on v1, after A's reload
            await asyncio.sleep(max(0.0, unload_at - time.time()) + 2.5)  # A's deadline, and checks after it
            after = await b.CreateSession(pb.CreateSessionRequest())
            for session in (before, after):
                prediction = await b.Feed(pb.FeedRequest(session_id=session.session_id, text="the cat"))
                assert_matches(prediction, v1.logprobs(v1.ids("the cat")), TOLERANCE)
                got = await b.GetSession(pb.GetSessionRequest(session_id=session.session_id))
                assert (got.model_version, got.position) == ("1", 2)
            info = await versions(a)
            assert (info["1"].draining, info["1"].sessions) == (True, 2), "A keeps v1 draining past its deadline"
            assert caplog.text.count("other replicas still serve it") == 1, "warned once"
            assert len(redis.cli("ZRANGE", "lstmd:serving:tiny/1", "0", "-1").split()) == 1, "A took its own out"

            await b.ReloadModels(pb.ReloadModelsRequest())

            async def v1_unloaded() -> bool:
                return list(await versions(a)) == list(await versions(b)) == ["2"]

            await eventually(v1_unloaded)
            for session in (before, after):
                with pytest.raises(grpc.aio.AioRpcError) as ended:
                    await b.Feed(pb.FeedRequest(session_id=session.session_id, text="sat"))
                assert ended.value.code() == grpc.StatusCode.NOT_FOUND
                assert (END_KEY, "unloaded") in tuple(ended.value.trailing_metadata() or ())
            assert len(redis.cli("ZRANGE", "lstmd:serving:tiny/2", "0", "-1").split()) == 2
    assert redis.cli("ZRANGE", "lstmd:serving:tiny/2", "0", "-1").split() == [], "stopped replicas serve nothing"


async def test_in_redis_reload_models_on_one_replica_reloads_them_all_with_its_pins(
    root: Path, version_2: Path, redis: Redis
) -> None:
    """The others follow within a check round or two; a replica started later chooses by its own settings."""
    async with (
        serve(root, session_store=redis.url) as (_, a),
        serve(root, session_store=redis.url) as (_, b),
    ):
        shutil.copytree(version_2, root / "tiny" / "2")
        assert list((await a.ReloadModels(pb.ReloadModelsRequest())).loaded) == ["tiny/2"]
        await eventually(lambda: serves(b, "2"))
        assert (await b.CreateSession(pb.CreateSessionRequest())).model_version == "2"
        await a.ReloadModels(pb.ReloadModelsRequest(pins={"tiny": "1"}))
        await eventually(lambda: serves(b, "1"))
        assert (await b.CreateSession(pb.CreateSessionRequest())).model_version == "1"
        await b.ReloadModels(pb.ReloadModelsRequest(pins={"tiny": ""}))  # and back, from the other one
        await eventually(lambda: serves(a, "2"))
        async with serve(root, session_store=redis.url, model_versions="tiny=1") as (_, c):
            await asyncio.sleep(2.5)  # rounds of its check
            assert (await c.CreateSession(pb.CreateSessionRequest())).model_version == "1", "its own pin"
        redis.cli("DEL", "lstmd:reload")  # as when Redis restarts without its data: the count starts again
        await asyncio.sleep(2.5)
        assert await serves(b, "2"), "no reload record is no reload"
        await a.ReloadModels(pb.ReloadModelsRequest(pins={"tiny": "1"}))  # number 1, below what b saw
        await eventually(lambda: serves(b, "1"))
