"""Models that start from a zero state (the card's ``tokenizer.initial: "zeros"``), as
pytorch/examples' word_language_model trains and evaluates: a new session is the zero state with
no token before its first.

Expected distributions and log-probabilities come from ONNX Runtime run directly from numpy zeros
on the ids, or from the PyTorch model itself, never through lstmd."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from bench.cluster import Redis
from lstmd.export.model import LSTMLanguageModel, ModelConfig
from lstmd.export.onnx_export import write_model_dir
from lstmd.export.publish import check_servable
from lstmd.export.train import eval_batches, scored_tokens
from lstmd.model import graph
from lstmd.model.folder import read_model_dir
from lstmd.model.tokenizer import EOS, UNK, TokenizerSpec, Vocab
from lstmd.server import snapshot_format
from lstmd.server.snapshot_format import SessionRecord
from lstmd.server.snapshot_policy import FILE_NAME
from lstmd.v1 import lstmd_pb2 as pb
from lstmd.v1 import lstmd_pb2_grpc
from tests.conftest import HIDDEN, LAYERS, WORDS, memory_sessions, serve, start_process
from tests.test_cli import lstmd
from tests.test_client_words import shown, typed

VOCAB = Vocab([UNK, EOS, *WORDS])
IDS = [VOCAB.ids[w] for w in ("the", "cat", "sat", "on", "the", "mat")]


def _lm() -> LSTMLanguageModel:
    torch.manual_seed(3)
    lm = LSTMLanguageModel(ModelConfig(len(VOCAB), HIDDEN, HIDDEN, LAYERS, dropout=0.0))
    with torch.no_grad():  # larger weights than the default init, so distributions differ clearly
        for p in lm.parameters():
            p.mul_(8)
    return lm.eval()


@pytest.fixture(scope="module")
def zero_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Models "zero" (initial zeros) and "eos" (the same weights, starting after <eos>)."""
    root = tmp_path_factory.mktemp("zero-models")
    write_model_dir(_lm(), VOCAB, root / "zero" / "1", "zero", "1", tokenizer=TokenizerSpec(initial="zeros"))
    write_model_dir(_lm(), VOCAB, root / "eos" / "1", "eos", "1")
    return root


def ort_from_zeros(root: Path, ids: list[int]) -> np.ndarray:
    """ONNX Runtime on ``ids`` from numpy zeros: the next token's log-probabilities."""
    zero = np.zeros((LAYERS, 1, HIDDEN), np.float32)
    out = graph.run(graph.load(root / "zero" / "1" / "model.onnx"), np.array([ids], np.int64), zero, zero, 1)
    logprobs: np.ndarray = out.logprobs[0]
    return logprobs


def serving(root: Path, **overrides: Any) -> contextlib.AbstractAsyncContextManager[tuple[Any, Any]]:
    return serve(root, default_model="zero", **overrides)


def feed(session_id: str, ids: list[int], logprobs: bool = False) -> pb.FeedRequest:
    return pb.FeedRequest(session_id=session_id, tokens=pb.TokenIds(ids=ids), top_k=5, return_token_logprobs=logprobs)


async def assert_first_feed_from_zeros(stub: Any, session_id: str, root: Path) -> None:
    """A fresh session's first feed of a, b, c: the distribution after c as ORT from zeros on
    [a, b, c], and the log-probabilities of b and c only (a has nothing before it)."""
    a, b, c = IDS[:3]
    got = await stub.Feed(feed(session_id, [a, b, c], logprobs=True))
    want = ort_from_zeros(root, [a, b, c])
    assert got.position == 3 and [t.id for t in got.tokens] == [a, b, c]
    assert [x.token_id for x in got.candidates] == np.argsort(-want, kind="stable")[:5].tolist()
    for x in got.candidates:
        assert math.isclose(x.probability, math.exp(want[x.token_id]), rel_tol=1e-4)
    assert len(got.token_logprobs) == 2
    assert math.isclose(got.token_logprobs[0], ort_from_zeros(root, [a])[b], abs_tol=1e-4)
    assert math.isclose(got.token_logprobs[1], ort_from_zeros(root, [a, b])[c], abs_tol=1e-4)


async def test_a_fresh_session_predicts_as_onnx_runtime_from_zeros(zero_models: Path) -> None:
    async with serving(zero_models) as (_, stub):
        session = await stub.CreateSession(pb.CreateSessionRequest(model="zero"))
        await assert_first_feed_from_zeros(stub, session.session_id, zero_models)
        d = IDS[3]  # the next feed's first token has a prediction: the one after c
        later = await stub.Feed(feed(session.session_id, [d], logprobs=True))
        assert len(later.token_logprobs) == 1
        assert math.isclose(later.token_logprobs[0], ort_from_zeros(zero_models, IDS[:3])[d], abs_tol=1e-4)

        plain = await stub.CreateSession(pb.CreateSessionRequest(model="zero"))  # without log-probabilities
        got = await stub.Feed(feed(plain.session_id, IDS[:3]))
        want = ort_from_zeros(zero_models, IDS[:3])
        assert got.token_logprobs == []
        assert [x.token_id for x in got.candidates] == np.argsort(-want, kind="stable")[:5].tolist()
        one = await stub.CreateSession(pb.CreateSessionRequest(model="zero"))
        got = await stub.Feed(feed(one.session_id, IDS[:1], logprobs=True))
        assert got.token_logprobs == [] and got.position == 1
        want = ort_from_zeros(zero_models, IDS[:1])
        assert math.isclose(got.candidates[0].probability, math.exp(want.max()), rel_tol=1e-4)


async def test_an_eos_model_still_scores_its_first_token(zero_models: Path) -> None:
    async with serving(zero_models) as (_, stub):
        session = await stub.CreateSession(pb.CreateSessionRequest(model="eos"))
        got = await stub.Feed(feed(session.session_id, IDS[:3], logprobs=True))
    assert len(got.token_logprobs) == 3
    eos = VOCAB.eos_id
    for i, logprob in enumerate(got.token_logprobs):
        assert math.isclose(logprob, ort_from_zeros(zero_models, [eos, *IDS[:i]])[IDS[i]], abs_tol=1e-4)


async def test_generate_needs_a_prompt_on_a_fresh_session(zero_models: Path) -> None:
    async with serving(zero_models) as (_, stub):
        session = await stub.CreateSession(pb.CreateSessionRequest(model="zero"))
        for request in (pb.GenerateRequest(session_id=session.session_id, max_tokens=3),
                        pb.GenerateRequest(model="zero", max_tokens=3)):  # fmt: skip
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                [t async for t in stub.Generate(request)]
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "give a prompt: zero starts from a zero state" in str(refused.value.details())
        info = await stub.GetSession(pb.GetSessionRequest(session_id=session.session_id))
        assert info.position == 0

        prompt = "the cat"  # greedy from the prompt, as ORT from zeros on its ids; <unk> and <eos> banned
        request = pb.GenerateRequest(session_id=session.session_id, prompt=prompt, max_tokens=4, top_k=1)
        generated = [t.token_id async for t in stub.Generate(request)]
        ids = VOCAB.encode_text(prompt)
        for token in generated:
            logprobs = ort_from_zeros(zero_models, ids)
            logprobs[[VOCAB.unk_id, VOCAB.eos_id]] = -np.inf
            assert token == int(np.argmax(logprobs))
            ids.append(token)
        more = [t async for t in stub.Generate(pb.GenerateRequest(session_id=session.session_id, max_tokens=2))]
        assert [t.position for t in more] == [len(ids) + 1, len(ids) + 2]  # once fed, no prompt is needed


async def test_lstmd_score_is_the_zero_state_evaluation_of_pytorch(zero_models: Path, tmp_path: Path) -> None:
    """Sum of log p(t_i | t_<i) for i >= 1, from zeros: PyTorch's own forward on the whole text."""
    text = "the cat sat on the mat .\nthe dog ran to the river .\n"
    (tmp_path / "text.txt").write_text(text)
    async with serving(zero_models) as (running, _):
        target = f"127.0.0.1:{running.port}"
        out = await asyncio.to_thread(lstmd, "score", str(tmp_path / "text.txt"), "--target", target, "--json")
        one = await asyncio.to_thread(lstmd, "score", "--ids", "2", "--target", target, check=False)
    ids = [VOCAB.ids[w] for line in text.split("\n")[:-1] for w in [*line.split(), EOS]]
    lm = _lm()
    with torch.no_grad():
        logits, _ = lm(torch.tensor([ids]), lm.init_state(1))
        logprobs = torch.log_softmax(logits[0], dim=-1)
    total = sum(float(logprobs[i - 1, ids[i]]) for i in range(1, len(ids)))
    data = json.loads(out.stdout)
    assert data["tokens"] == len(ids) - 1 == 15
    assert math.isclose(data["perplexity"], math.exp(-total / (len(ids) - 1)), rel_tol=1e-4)
    assert one.returncode == 1 and "the one token has no prediction before it" in one.stderr


async def test_a_fresh_zero_session_survives_a_snapshot(zero_models: Path, tmp_path: Path) -> None:
    async with serving(zero_models, snapshot_dir=str(tmp_path)) as (_, stub):
        fresh = await stub.CreateSession(pb.CreateSessionRequest(model="zero"))
        fed = await stub.CreateSession(pb.CreateSessionRequest(model="zero"))
        await stub.Feed(feed(fed.session_id, IDS[:2]))
    held = {r.id: r for r in snapshot_format.read(tmp_path / FILE_NAME)}
    assert held[fresh.session_id].last_token == -1 and held[fresh.session_id].position == 0
    assert not held[fresh.session_id].state.any() and held[fed.session_id].last_token == IDS[1]
    async with serving(zero_models, snapshot_dir=str(tmp_path)) as (running, stub):
        assert len(memory_sessions(running).all()) == 2
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            [t async for t in stub.Generate(pb.GenerateRequest(session_id=fresh.session_id, max_tokens=1))]
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        await assert_first_feed_from_zeros(stub, fresh.session_id, zero_models)


async def test_no_last_token_is_refused_where_a_session_must_have_one(
    zero_models: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    zero = np.zeros((2, LAYERS, HIDDEN), np.float32)

    def record(session_id: str, model: str, position: int) -> SessionRecord:
        return SessionRecord(session_id, model, "1", 5, -1, position, 1.0, 2.0, "", zero, zero)

    records = [record("0" * 32, "zero", 0), record("1" * 32, "eos", 0), record("2" * 32, "zero", 3)]
    snapshot_format.write(tmp_path / FILE_NAME, records, len(records))
    with caplog.at_level(logging.INFO, logger="lstmd.server.snapshot_policy"):
        async with serving(zero_models, snapshot_dir=str(tmp_path)) as (running, _):
            assert [s.id for s in memory_sessions(running).all()] == ["0" * 32]
    refusals = [r.getMessage() for r in caplog.records if "not restored" in r.getMessage()]
    assert len(refusals) == 2
    assert any("1" * 32 in m and "with no last token at position 0" in m for m in refusals)
    assert any("2" * 32 in m and "with no last token at position 3" in m for m in refusals)


async def test_a_fresh_zero_session_round_trips_through_redis(zero_models: Path, tmp_path: Path) -> None:
    redis = Redis(tmp_path)
    try:
        async with serving(zero_models, session_store=redis.url) as (_, stub):
            session = await stub.CreateSession(pb.CreateSessionRequest(model="zero"))
        async with serving(zero_models, session_store=redis.url) as (_, stub):  # another replica reads it back
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                [t async for t in stub.Generate(pb.GenerateRequest(session_id=session.session_id, max_tokens=1))]
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            await assert_first_feed_from_zeros(stub, session.session_id, zero_models)
    finally:
        redis.stop()


def test_lstmd_export_onnx_initial_zeros(tmp_path: Path) -> None:
    from lstmd.export.cli import main as export_main
    from tests.user_model import UserLM

    VOCAB.save(tmp_path / "vocab.txt")
    torch.manual_seed(0)
    torch.save(UserLM(len(VOCAB)).state_dict(), tmp_path / "weights.pt")
    args = ["onnx", "--checkpoint", str(tmp_path / "weights.pt"), "--tokenizer", "whitespace",
            "--vocab", str(tmp_path / "vocab.txt"), "--initial", "zeros",
            "--model-class", f"{Path(__file__).parent / 'user_model.py'}:UserLM",
            "--model-kwargs", json.dumps({"vocab_size": len(VOCAB)}), "--out", str(tmp_path / "models"),
            "--name", "z"]  # fmt: skip
    assert export_main(args) == 0
    folder = tmp_path / "models" / "z" / "1"
    card = json.loads((folder / "model.json").read_text())
    assert card["tokenizer"] == {"kind": "whitespace", "file": "vocab.txt", "initial": "zeros"}
    _, tokenizer = read_model_dir(folder)
    assert tokenizer.initial_id is None
    check_servable(folder, "z")  # its first step: token 0 from zeros


def test_training_evaluation_from_zeros_scores_all_tokens_but_the_first() -> None:
    ids = [5, 6, 7, 8, 9, 10, 11]
    for initial, first_target in ((None, 1), (1, 0)):
        inputs, targets = eval_batches(ids, initial, 3)
        scored = targets[targets >= 0].tolist()
        assert sorted(scored) == sorted(ids[first_target:]) and len(scored) == scored_tokens(ids, initial)
        assert inputs[0, 0].item() == (ids[0] if initial is None else initial)


def test_models_say_they_start_from_zeros_and_lstmd_type_completes_only_after_a_feed(zero_models: Path) -> None:
    """ModelInfo.starts_from_zeros tells a client that a new session has nothing to complete from:
    ``lstmd type`` shows nothing for a first word typed alone on such a model (where a prefix-only
    feed would be refused and end its stream), and completes it once text was fed."""
    process, port = start_process(zero_models, "--default-model", "zero")
    target = f"127.0.0.1:{port}"
    try:
        with grpc.insecure_channel(target) as channel:
            stub = lstmd_pb2_grpc.LstmdStub(channel)
            models = {m.name: m.starts_from_zeros for m in stub.ListModels(pb.ListModelsRequest()).models}
            session = stub.CreateSession(pb.CreateSessionRequest(model="zero"))
            with pytest.raises(grpc.RpcError) as refused:
                stub.Feed(pb.FeedRequest(session_id=session.session_id, word_prefix="th"))
            stub.Feed(pb.FeedRequest(session_id=session.session_id, text="th\nthe cat"))  # as lstmd type feeds it
            expected = stub.Feed(pb.FeedRequest(session_id=session.session_id, word_prefix="s", top_k=5,
                                                exclude_special=True))  # fmt: skip
        assert models == {"zero": True, "eos": False}
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert typed("th\nthe cat s", target, "--model", "zero") == ["", shown(expected)]
    finally:
        process.terminate()
        process.communicate(timeout=30)
