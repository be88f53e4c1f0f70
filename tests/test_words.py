"""Whole-word candidates and completion of the word being typed, on every kind of tokenizer.

Tiny real models (random weights, exported like any other) with tiny vocabularies: characters,
a byte-level BPE and a SentencePiece unigram model trained here over the letters a, b and c,
and the word model of conftest. Expected words come from an exhaustive enumeration written here:
ONNX Runtime run directly on every token sequence up to a length, and each sequence's text
decoded by the tokenizer's library (or plain joining, for characters) and read by
``_reference_word``, a definition of the next word written from the contract's words, not from
the server's tables. With a beam wider than any level of that tree the server's search must find
exactly those words and probabilities.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import sentencepiece
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from lstmd.export.onnx_export import write_model_dir
from lstmd.model import graph
from lstmd.model.tokenizer import TokenizerSpec
from lstmd.server import metrics
from lstmd.v1 import lstmd_pb2 as pb
from lstmd.v1 import lstmd_pb2_grpc
from tests.conftest import HIDDEN, LAYERS, Reference, serve, start_process
from tests.test_client_words import shown, typed
from tests.test_tokenizers import _lm

LETTERS = "abc"
CHARACTERS = ["<unk>", "<eos>", "a", "b", "c", " ", ".", "'"]
DEPTH = {"chars": 5, "bpe": 4, "spm": 4}  # token sequences enumerated up to this length
WORD = pb.CANDIDATE_KIND_WORD
TOKEN = pb.CANDIDATE_KIND_TOKEN


def _text(seed: int) -> list[str]:
    """Sentences of short words over LETTERS, with apostrophes and full stops."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(LETTERS) for _ in range(rng.randint(1, 3))) for _ in range(400)]
    words += ["ab'c", "b'a", "abc.", "ca."]
    rng.shuffle(words)
    return [" ".join(words[i : i + 8]) for i in range(0, len(words), 8)]


@dataclass
class Kind:
    decode: Callable[[list[int]], str]  # the library's decoding (plain joining for characters)
    special: set[int]
    initial: int  # the token a new session starts after
    size: int


def _bpe(work: Path) -> tuple[Path, Kind]:
    library = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    library.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    library.decoder = decoders.ByteLevel()
    library.train_from_iterator(_text(1), trainers.BpeTrainer(vocab_size=16, special_tokens=["<unk>", "<s>", "</s>"]))
    path = work / "tokenizer.json"
    library.save(str(path))
    special = {library.token_to_id(t) for t in ("<unk>", "<s>", "</s>")}
    return path, Kind(library.decode, special, library.token_to_id("<s>"), library.get_vocab_size())  # type: ignore[arg-type]


def _sentencepiece(work: Path) -> tuple[Path, Kind]:
    (work / "text.txt").write_text("\n".join(_text(2)) + "\n")
    sentencepiece.SentencePieceTrainer.train(input=str(work / "text.txt"), model_prefix=str(work / "sp"),
                                             vocab_size=14, model_type="unigram", hard_vocab_limit=False)  # fmt: skip
    library = sentencepiece.SentencePieceProcessor(model_file=str(work / "sp.model"))
    special = {i for i in range(library.get_piece_size()) if library.is_control(i) or library.is_unknown(i)}
    return work / "sp.model", Kind(library.decode, special, library.bos_id(), library.get_piece_size())


@pytest.fixture(scope="module")
def word_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Kind]]:
    root, work = tmp_path_factory.mktemp("word-models"), tmp_path_factory.mktemp("word-work")
    (work / "chars.txt").write_text("\n".join(CHARACTERS) + "\n")
    chars = Kind(lambda ids: "".join("\n" if i == 1 else CHARACTERS[i] for i in ids), {0, 1}, 1, len(CHARACTERS))
    bpe_file, bpe = _bpe(work)
    spm_file, spm = _sentencepiece(work)
    sources = {
        "chars": (work / "chars.txt", TokenizerSpec("characters"), chars),
        "bpe": (bpe_file, TokenizerSpec("hf", bos="<s>", eos="</s>"), bpe),
        "spm": (spm_file, TokenizerSpec("sentencepiece"), spm),
    }
    for seed, (name, (file, spec, kind)) in enumerate(sources.items()):
        write_model_dir(_lm(kind.size, seed, scale=4), file, root / name / "1", name, "1", tokenizer=spec)
    return root, {name: kind for name, (_, _, kind) in sources.items()}


@contextlib.asynccontextmanager
async def _serving(root: Path, **overrides: Any) -> AsyncIterator[Any]:
    async with serve(root, default_model="chars", **overrides) as (_, stub):
        yield stub


def _reference_word(before: str, added: str, ended: bool) -> str | None:
    """The next word, if ``added`` (text after ``before``) has one that is finished: "" while it
    may still become one, None when it cannot. ``ended``: a special token came last. A word is a
    run of letters, digits, apostrophes and hyphens (less those at its ends) after whitespace, or
    right after ``before`` when that ends with neither a letter nor a digit nor ' or -."""
    if "\ufffd" in added:
        return None
    body = added.lstrip(" \t\n\r\v\f")  # the whitespace of these vocabularies
    run = ""
    for ch in body:
        if not (ch.isalnum() or ch in "'-"):
            break
        run += ch
    glued = before[-1:].isalnum() or before[-1:] in ("'", "-")
    if glued and body and len(body) == len(added):
        return None  # it would continue the word before, or is punctuation
    if len(run) == len(body) and not ended:
        return ""  # whitespace, then perhaps the start of a word
    word = run.strip("'-")
    return word or None


def _exhaustive(folder: Path, kind: Kind, context: list[int], prefix: str, depth: int) -> dict[str, float]:
    """Every word beginning with ``prefix`` that ``depth`` tokens or fewer after ``context`` can make,
    with its probability: the sum over the token sequences that end it."""
    session = graph.load(folder / "model.onnx")
    zero = np.zeros((LAYERS, 1, HIDDEN), np.float32)
    head = [kind.initial, *context]
    out = graph.run(session, np.array([head], np.int64), zero, zero, 1)
    before = kind.decode(head)
    frontier: list[tuple[list[int], float, np.ndarray, np.ndarray, np.ndarray]] = [
        ([], 0.0, out.logprobs[0], out.h, out.c)
    ]
    words: dict[str, float] = {}
    for length in range(1, depth + 1):
        open_: list[tuple[list[int], float, np.ndarray, np.ndarray]] = []
        for seq, logprob, dist, h, c in frontier:
            for token in range(kind.size):
                text = kind.decode([*head, *seq, token])
                word = _reference_word(before, text[len(before) :], token in kind.special) \
                    if text.startswith(before) else None  # fmt: skip
                lp = logprob + float(dist[token])
                if word:
                    if word.startswith(prefix):
                        words[word] = words.get(word, 0.0) + float(np.exp(lp))
                elif word == "" and length < depth:
                    open_.append(([*seq, token], lp, h, c))
        if not open_:
            break
        tokens = np.array([[s[-1]] for s, _, _, _ in open_], np.int64)
        h = np.concatenate([h for _, _, h, _ in open_], axis=1)
        c = np.concatenate([c for _, _, _, c in open_], axis=1)
        step = graph.run(session, tokens, h, c, 1)
        frontier = [(seq, lp, step.logprobs[n], step.h[:, n : n + 1], step.c[:, n : n + 1])
                    for n, (seq, lp, _, _) in enumerate(open_)]  # fmt: skip
    return words


def _encode(root: Path, name: str, text: str) -> list[int]:
    from lstmd.model.folder import read_model_dir

    return read_model_dir(root / name / "1")[1].encode_text(text) if text else []


CONTEXTS = ["ab c", "ab ", "b'", ""]  # "": a new session, nothing fed
PREFIXES = ["", "a", "ab", "c'"]


@pytest.mark.parametrize("name", ["chars", "bpe", "spm"])
async def test_word_candidates_and_completions_are_the_exhaustive_enumerations(
    word_models: tuple[Path, dict[str, Kind]], name: str
) -> None:
    root, kinds = word_models
    kind = kinds[name]
    async with _serving(root, word_beam=10**6, word_max_tokens=DEPTH[name], max_top_k=1000) as stub:
        for context in CONTEXTS:
            ids = _encode(root, name, context)
            for prefix in PREFIXES if ids else PREFIXES[1:]:  # a feed needs input or a prefix
                session = await stub.CreateSession(pb.CreateSessionRequest(model=name))
                request = pb.FeedRequest(session_id=session.session_id, top_k=1000, word_prefix=prefix)
                request.tokens.ids.extend(ids)
                got = await stub.Feed(request)
                expected = _exhaustive(root / name / "1", kind, ids, prefix, DEPTH[name])
                assert len(expected) < 1000
                where = f"{name} after {context!r}, prefix {prefix!r}"
                assert {c.word: pytest.approx(c.probability, rel=1e-4, abs=1e-7) for c in got.candidates} == \
                    expected, where  # fmt: skip
                probabilities = [c.probability for c in got.candidates]
                assert probabilities == sorted(probabilities, reverse=True), where
                before = kind.decode([kind.initial, *ids])
                for c in got.candidates:  # whole words: their text is the library's decoding of their tokens
                    assert c.kind == WORD and c.token_id == c.token_ids[0]
                    assert kind.decode([kind.initial, *ids, *c.token_ids]) == before + c.text, where
                    assert c.text.lstrip() == c.word, where
                assert got.position == session.position + len(ids), "the prefix is not applied"


async def test_the_beam_finds_the_likeliest_words_first(word_models: tuple[Path, dict[str, Kind]]) -> None:
    """With the default beam and its early stop, the top words are the enumeration's top words."""
    root, kinds = word_models
    async with _serving(root, word_max_tokens=DEPTH["chars"]) as stub:
        ids = _encode(root, "chars", "ab c")
        session = await stub.CreateSession(pb.CreateSessionRequest(model="chars"))
        got = await stub.Feed(pb.FeedRequest(session_id=session.session_id, tokens=pb.TokenIds(ids=ids), top_k=3))
    expected = _exhaustive(root / "chars" / "1", kinds["chars"], ids, "", DEPTH["chars"])
    assert [c.word for c in got.candidates] == sorted(expected, key=lambda w: -expected[w])[:3]


async def test_concurrent_sessions_share_beam_steps_and_get_the_same_words(
    word_models: tuple[Path, dict[str, Kind]],
) -> None:
    root, _ = word_models
    texts = ["ab c", "c", "b'a ", "abc ab", "a. b", "cc"]
    async with _serving(root, word_beam=4, max_batch_wait_ms=5.0) as stub:

        async def words(name: str, text: str, prefix: str) -> list[tuple[str, float]]:
            session = await stub.CreateSession(pb.CreateSessionRequest(model=name))
            got = await stub.Feed(pb.FeedRequest(session_id=session.session_id, text=text, word_prefix=prefix,
                                                 top_k=5))  # fmt: skip
            return [(c.word, c.probability) for c in got.candidates]

        for name in ("chars", "bpe", "spm"):
            cases = [(name, text, prefix) for text in texts for prefix in ("", "a")]
            alone = [await words(*case) for case in cases]
            steps = metrics.batch_size.labels(name, "1", "step")
            count, total = _count_and_sum(steps)
            together = await asyncio.gather(*(words(*case) for case in cases))
            count_after, total_after = _count_and_sum(steps)
            for a, t in zip(alone, together, strict=True):
                assert [w for w, _ in a] == [w for w, _ in t]
                assert [p for _, p in a] == pytest.approx([p for _, p in t], rel=1e-4)
            # one session's beam holds at most 4 hypotheses: larger batches mix sessions
            assert (total_after - total) / (count_after - count) > 4, name


def _count_and_sum(histogram: Any) -> tuple[float, float]:
    samples = {s.name: s.value for m in histogram.collect() for s in m.samples}
    return samples["lstmd_batch_size_count"], samples["lstmd_batch_size_sum"]


async def test_word_model_completions_are_the_likeliest_tokens_beginning_with_the_prefix(
    models_dir: Path, reference: Reference
) -> None:
    async with serve(models_dir) as (_, stub):
        session = await stub.CreateSession(pb.CreateSessionRequest())
        fed = await stub.Feed(pb.FeedRequest(session_id=session.session_id, text="the clouds are in the"))
        got = await stub.Feed(pb.FeedRequest(session_id=session.session_id, word_prefix="S", top_k=4))
        after = await stub.Feed(pb.FeedRequest(session_id=session.session_id, text="sky"))
        fresh = await stub.CreateSession(pb.CreateSessionRequest())
        direct = await stub.Feed(pb.FeedRequest(session_id=fresh.session_id, text="the clouds are in the sky"))
    logprobs = reference.logprobs(reference.ids("the clouds are in the"))
    words = reference.vocab.words
    expected = sorted((i for i, w in enumerate(words) if w.startswith("s")), key=lambda i: -logprobs[i])[:4]
    assert [c.token_id for c in got.candidates] == expected  # "S": compared as the tokenizer writes words
    assert [c.probability for c in got.candidates] == pytest.approx(np.exp(logprobs[expected]).tolist(), rel=1e-5)
    assert all(c.kind == WORD and c.text == " " + c.word for c in got.candidates)
    assert got.position == fed.position and not got.tokens, "a prefix-only feed applies nothing"
    assert [(c.word, c.probability) for c in after.candidates] == [(c.word, c.probability) for c in direct.candidates]


async def test_special_tokens_are_left_out_when_asked(
    word_models: tuple[Path, dict[str, Kind]], models_dir: Path
) -> None:
    special = {0, 1}  # <unk> and <eos> in both vocabularies
    for folder, name in ((word_models[0], "chars"), (models_dir, "tiny")):
        async with serve(folder, default_model=name, max_top_k=1000) as (_, stub):
            models = await stub.ListModels(pb.ListModelsRequest())
            size = next(m.vocab_size for m in models.models if m.name == name)
            session = await stub.CreateSession(pb.CreateSessionRequest())
            every = await stub.Feed(pb.FeedRequest(session_id=session.session_id, text="a", top_k=size,
                                                   candidates=TOKEN))  # fmt: skip
            assert special <= {c.token_id for c in every.candidates}
            kept = await stub.Feed(pb.FeedRequest(session_id=session.session_id, text="b", top_k=size - 2,
                                                  candidates=TOKEN, exclude_special=True))  # fmt: skip
            assert len(kept.candidates) == size - 2 and not special & {c.token_id for c in kept.candidates}
            assert all(c.kind == TOKEN and c.token_ids == [c.token_id] for c in kept.candidates)


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        ({"word_prefix": "a b"}, "not the start of one word"),
        ({"word_prefix": "a" * 65}, "at most 64 characters"),
        ({"word_prefix": "a", "candidates": TOKEN}, "ask for word candidates"),
        ({}, "the input is empty"),
    ],
)
async def test_bad_word_requests_are_invalid_argument(
    word_models: tuple[Path, dict[str, Kind]], request_fields: dict[str, Any], message: str
) -> None:
    root, _ = word_models
    async with _serving(root) as stub:
        session = await stub.CreateSession(pb.CreateSessionRequest(model="chars"))
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.Feed(pb.FeedRequest(session_id=session.session_id, **request_fields))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in (error.value.details() or "")
        still = await stub.GetSession(pb.GetSessionRequest(session_id=session.session_id))
        assert still.position == 0


async def test_a_prefix_only_feed_checks_the_expected_position_and_streams(
    word_models: tuple[Path, dict[str, Kind]],
) -> None:
    root, _ = word_models
    async with _serving(root) as stub:
        session = await stub.CreateSession(pb.CreateSessionRequest(model="bpe"))
        fed = await stub.Feed(pb.FeedRequest(session_id=session.session_id, text="ab c"))
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.Feed(pb.FeedRequest(session_id=session.session_id, word_prefix="a", expected_position=0))
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        call = stub.Stream()
        await call.write(pb.StreamRequest(session_id=session.session_id, word_prefix="a"))
        await call.write(pb.StreamRequest(text=" ab", word_prefix="c"))
        await call.done_writing()
        first, second = [p async for p in call]
        assert first.position == fed.position and first.candidates
        assert all(c.word.startswith("a") for c in first.candidates)
        assert second.position > fed.position and second.candidates
        assert all(c.word.startswith("c") for c in second.candidates)


@pytest.fixture(scope="module")
def word_models_target(word_models: tuple[Path, dict[str, Kind]]) -> Iterator[str]:
    process, port = start_process(word_models[0], "--default-model", "chars")
    yield f"127.0.0.1:{port}"
    process.terminate()
    process.communicate(timeout=30)


@pytest.mark.parametrize("name", ["chars", "bpe", "spm"])
def test_lstmd_type_completes_the_word_being_typed_from_the_server(word_models_target: str, name: str) -> None:
    """``printf 'ab c a' | lstmd type``: the words beginning with "a" after "ab c", as the server's
    own completion through the raw stubs (the word model's case is in tests/test_client_words.py)."""
    with grpc.insecure_channel(word_models_target) as channel:
        stub = lstmd_pb2_grpc.LstmdStub(channel)
        session = stub.CreateSession(pb.CreateSessionRequest(model=name))
        stub.Feed(pb.FeedRequest(session_id=session.session_id, text="ab c"))
        expected = stub.Feed(pb.FeedRequest(session_id=session.session_id, word_prefix="a", top_k=5,
                                            exclude_special=True))  # fmt: skip
    assert expected.candidates and all(c.word.startswith("a") for c in expected.candidates)
    assert typed("ab c a", word_models_target, "--model", name) == [shown(expected)]


@pytest.mark.timeout(300)
def test_bench_words_runs_end_to_end(
    word_models: tuple[Path, dict[str, Kind]], models_dir: Path, tmp_path: Path
) -> None:
    """``python -m bench.words``, CI-sized, so it cannot rot; its figures are measurements, not checked."""
    root = tmp_path / "models"
    root.mkdir()
    (root / "chars").symlink_to(word_models[0] / "chars")
    (root / "tiny").symlink_to(models_dir / "tiny")
    report_file = tmp_path / "words.json"
    done = subprocess.run([sys.executable, "-m", "bench.words", "--models", str(root), "--sample", "3", "--rounds",
                           "2", "--feeds", "3", "--seconds", "0.5", "--json", str(report_file)],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(report_file.read_text())
    assert sorted(report["models"]) == ["chars", "tiny"]
    for model in report["models"].values():
        assert model["cost"]["words_ms"] > 0 and model["cost"]["tokens_ms"] > 0
        assert 0 <= model["recall"]["next_word"]["recall_at_5"] <= 1
        assert [row["sessions"] for row in model["latency"]] == [1, 64]
    assert "| chars | characters |" in done.stdout
