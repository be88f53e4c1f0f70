"""Every tokenizer kind served end to end: small real models whose folders carry a cased
pre-tokenized vocabulary, a character vocabulary, a BPE ``tokenizer.json`` trained here with
Hugging Face ``tokenizers``, and a SentencePiece model trained here with ``sentencepiece``.

Expected ids, pieces and text come from the tokenizer libraries (or, for the vocabulary kinds,
plain ``str.split`` / ``list`` over the vocabulary) called directly, never through lstmd; expected
log-probabilities come from ONNX Runtime run directly on those ids."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sentencepiece
import tokenizers
import torch
from tokenizers import decoders, models, pre_tokenizers, trainers

from lstmd.export.model import LSTMLanguageModel, ModelConfig
from lstmd.export.onnx_export import write_model_dir
from lstmd.model import graph
from lstmd.model.folder import ModelFormatError, read_model_dir
from lstmd.model.tokenizer import TokenizerSpec, Vocab, WordsTokenizer, tokenize
from lstmd.v1 import lstmd_pb2 as pb
from tests.conftest import HIDDEN, LAYERS, serve

SENTENCES = [
    "The cat sat on the mat.",
    "A dog ran to the river, and the cat saw it.",
    "The King's ship sailed the sea at night.",
    "Rain and snow fell on the old stone house.",
    "She said: the sun, the moon and the stars!",
]
WIKITEXT_WORDS = ["<unk>", "<eos>", "The", "the", "King", "'s", "ship", "@-@", "long", "cat", "sat", "on", "mat",
                  ".", ",", "A", "a", "river", "="]  # fmt: skip
CHARACTERS = ["<unk>", "<eos>", *sorted(set("".join(SENTENCES)) - {"!"})]  # "!" is left out: unknown


@dataclass
class Expected:
    """What the library, called directly, says of a model's tokenizer."""

    encode: Callable[[str], list[int]]  # text -> ids
    pieces: Callable[[str], list[str]]  # text -> its tokens as the tokenizer writes them
    piece: Callable[[int], str]  # id -> piece
    decode: Callable[[list[int]], str]  # ids -> text
    decode_pieces: Callable[[list[str]], str]  # pieces -> text
    initial: int  # the token a session starts after
    banned: list[int]  # unknown and end ids, never generated


def _lm(vocab_size: int, seed: int, scale: float = 8) -> LSTMLanguageModel:
    """A random model; its weights ``scale`` times the default init's, so distributions differ clearly."""
    torch.manual_seed(seed)
    lm = LSTMLanguageModel(ModelConfig(vocab_size, HIDDEN, HIDDEN, LAYERS, dropout=0.0))
    with torch.no_grad():
        for p in lm.parameters():
            p.mul_(scale)
    return lm.eval()


def _vocab_kind(words: list[str], split: Callable[[str], list[str]], join: str) -> Expected:
    ids = {w: i for i, w in enumerate(words)}
    return Expected(
        encode=lambda text: [ids.get(t, ids["<unk>"]) for t in split(text)],
        pieces=split,  # an unknown token keeps the text it stands for
        piece=lambda i: words[i],
        decode=lambda seq: join.join(words[i] for i in seq),
        decode_pieces=lambda pieces: join.join(pieces),
        initial=ids["<eos>"],
        banned=[ids["<unk>"], ids["<eos>"]],
    )


def _bpe(work: Path) -> tuple[Path, Expected]:
    library = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    library.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    library.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    library.train_from_iterator(SENTENCES, trainer)
    path = work / "tokenizer.json"
    library.save(str(path))
    unk, bos, eos = (library.token_to_id(t) for t in ("<unk>", "<s>", "</s>"))
    assert unk is not None and bos is not None and eos is not None
    decoder = library.decoder
    return path, Expected(
        encode=lambda text: library.encode(text, add_special_tokens=False).ids,
        pieces=lambda text: library.encode(text, add_special_tokens=False).tokens,
        piece=lambda i: str(library.id_to_token(i)),
        decode=lambda seq: library.decode(seq),
        decode_pieces=lambda pieces: decoder.decode(pieces),
        initial=bos,
        banned=[unk, eos],
    )


def _sentencepiece(work: Path) -> tuple[Path, Expected]:
    (work / "text.txt").write_text("\n".join(SENTENCES * 4) + "\n")
    sentencepiece.SentencePieceTrainer.train(input=str(work / "text.txt"), model_prefix=str(work / "sp"),
                                             vocab_size=80, model_type="unigram", hard_vocab_limit=False)  # fmt: skip
    path = work / "sp.model"
    library = sentencepiece.SentencePieceProcessor(model_file=str(path))
    return path, Expected(
        encode=lambda text: library.encode(text),
        pieces=lambda text: library.encode(text, out_type=str),
        piece=lambda i: library.id_to_piece(i),
        decode=lambda seq: library.decode(seq),
        decode_pieces=lambda pieces: library.decode_pieces(pieces),
        initial=library.bos_id(),
        banned=[library.unk_id(), library.eos_id()],
    )


USER_MODEL = f"{Path(__file__).parent / 'user_model.py'}:UserLM"
KINDS = ("wikitext", "chars", "bpe", "spm")
TEXTS = {
    "wikitext": "The King 's long @-@ ship sat on the mat .\nA cat Sat",  # "Sat": cased, unknown
    "chars": "The cat sat on the mat!\nA dog",
    "bpe": "The cat saw the King's ship at night.",
    "spm": "The cat saw the King's ship at night.",
}


@pytest.fixture(scope="module")
def tokenizer_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Expected]]:
    """A models folder with one model per kind, and what each kind's library expects."""
    root, work = tmp_path_factory.mktemp("tokenizer-models"), tmp_path_factory.mktemp("tokenizer-work")
    (work / "wikitext.txt").write_text("\n".join(WIKITEXT_WORDS) + "\n")
    (work / "chars.txt").write_text("\n".join(CHARACTERS) + "\n")
    bpe_file, bpe = _bpe(work)
    spm_file, spm = _sentencepiece(work)
    sources = {
        "wikitext": (work / "wikitext.txt", TokenizerSpec("whitespace"), _vocab_kind(WIKITEXT_WORDS, str.split, " ")),
        "chars": (work / "chars.txt", TokenizerSpec("characters"), _vocab_kind(CHARACTERS, list, "")),
        "bpe": (bpe_file, TokenizerSpec("hf", bos="<s>", eos="</s>"), bpe),
        "spm": (spm_file, TokenizerSpec("sentencepiece"), spm),
    }
    expected = {}
    for seed, (name, (file, spec, exp)) in enumerate(sources.items()):
        if spec.kind == "hf":
            size = tokenizers.Tokenizer.from_file(str(file)).get_vocab_size()
        elif spec.kind == "sentencepiece":
            size = sentencepiece.SentencePieceProcessor(model_file=str(file)).get_piece_size()
        else:
            size = len(file.read_text().split("\n")) - 1
        write_model_dir(_lm(size, seed), file, root / name / "1", name, "1", tokenizer=spec)
        expected[name] = exp
    return root, expected


@contextlib.asynccontextmanager
async def _serving(root: Path) -> AsyncIterator[Any]:
    async with serve(root, default_model="wikitext") as (_, stub):
        yield stub


def _reference_logprobs(folder: Path, ids: list[int]) -> np.ndarray:
    """ONNX Runtime on ``ids`` from the zero state: the next token's log-probabilities."""
    zero = np.zeros((LAYERS, 1, HIDDEN), np.float32)
    out = graph.run(graph.load(folder / "model.onnx"), np.array([ids], np.int64), zero, zero, 1)
    logprobs: np.ndarray = out.logprobs[0]
    return logprobs


@pytest.mark.parametrize("name", KINDS)
async def test_text_is_tokenized_by_the_models_own_tokenizer(
    name: str, tokenizer_models: tuple[Path, dict[str, Expected]]
) -> None:
    root, expected = tokenizer_models
    exp, text = expected[name], TEXTS[name]
    lines = text.split("\n")
    want: list[int] = []
    pieces: list[str] = []
    for i, line in enumerate(lines):  # the vocabulary kinds turn a newline into <eos>
        want += ([exp.initial] if i else []) + exp.encode(line)
        pieces += (["<eos>"] if i else []) + exp.pieces(line)
    async with _serving(root) as stub:
        session = await stub.CreateSession(pb.CreateSessionRequest(model=name, top_k=5))
        got = await stub.Feed(pb.FeedRequest(session_id=session.session_id, text=text, return_token_logprobs=True,
                                             candidates=pb.CANDIDATE_KIND_TOKEN))  # fmt: skip
    assert [t.id for t in got.tokens] == want
    assert [t.word for t in got.tokens] == pieces
    assert [t.unknown for t in got.tokens] == [i == exp.banned[0] for i in want]
    folder = root / name / "1"
    reference = _reference_logprobs(folder, [exp.initial, *want])
    for candidate in got.candidates:
        assert candidate.word == exp.piece(candidate.token_id)
        assert math.isclose(candidate.probability, math.exp(reference[candidate.token_id]), rel_tol=1e-4)
    assert [c.token_id for c in got.candidates] == np.argsort(-reference, kind="stable")[:5].tolist()
    for i, logprob in enumerate(got.token_logprobs):
        assert math.isclose(logprob, _reference_logprobs(folder, [exp.initial, *want[:i]])[want[i]], abs_tol=1e-4)


@pytest.mark.parametrize("name", KINDS)
async def test_lstmd_score_of_a_text_is_the_pytorch_models_perplexity_of_its_ids(
    name: str, tokenizer_models: tuple[Path, dict[str, Expected]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The whole text path against the PyTorch module itself: ``lstmd score`` of a file, through
    the model's tokenizer, ONNX Runtime and the server, equals PyTorch's perplexity of the ids the
    library gives for that text (each token after the one before it, from the session's start)."""
    from lstmd.client.cli import main as lstmd_main

    root, expected = tokenizer_models
    exp, text = expected[name], TEXTS[name]
    (tmp_path / "text.txt").write_text(text)
    ids = [exp.initial]
    for i, line in enumerate(text.split("\n")):  # a newline is <eos> (the initial token) in the vocabulary kinds
        ids += ([exp.initial] if i else []) + exp.encode(line)
    card, _ = read_model_dir(root / name / "1")
    lm = _lm(card.vocab_size, KINDS.index(name))  # the fixture's model: seeded by its place in KINDS
    zero = torch.zeros(LAYERS, 1, HIDDEN)
    with torch.no_grad():
        logits, _ = lm(torch.tensor([ids]), (zero, zero))
        logprobs = torch.log_softmax(logits[0], -1)
    nll = -sum(float(logprobs[i, token]) for i, token in enumerate(ids[1:]))
    async with serve(root, default_model="wikitext") as (running, _):
        target = f"127.0.0.1:{running.port}"
        args = ["score", str(tmp_path / "text.txt"), "--model", name, "--target", target, "--json"]
        assert await asyncio.to_thread(lstmd_main, args) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["tokens"] == len(ids) - 1
    assert math.isclose(scored["perplexity"], math.exp(nll / (len(ids) - 1)), rel_tol=1e-4)


@pytest.mark.parametrize("name", ["chars", "bpe", "spm"])
async def test_generated_pieces_decode_as_the_library_decodes(
    name: str, tokenizer_models: tuple[Path, dict[str, Expected]]
) -> None:
    root, expected = tokenizer_models
    exp, prompt = expected[name], "The cat"
    async with _serving(root) as stub:
        request = pb.GenerateRequest(model=name, prompt=prompt, max_tokens=10, top_k=1)
        generated = [t async for t in stub.Generate(request)]
    ids = [exp.initial, *exp.encode(prompt)]
    folder = root / name / "1"
    for token in generated:  # greedy, the unknown and end tokens banned
        logprobs = _reference_logprobs(folder, ids)
        logprobs[exp.banned] = -np.inf
        assert token.token_id == int(np.argmax(logprobs)) and token.word == exp.piece(token.token_id)
        ids.append(token.token_id)
    new = [t.token_id for t in generated]
    assert exp.decode_pieces([t.word for t in generated]) == exp.decode(new)
    _, tokenizer = read_model_dir(folder)
    assert tokenizer.decode(new) == exp.decode(new)


@pytest.mark.parametrize("name", ["chars", "bpe", "spm"])
async def test_generated_text_fields_add_up_to_the_librarys_decoding(
    name: str, tokenizer_models: tuple[Path, dict[str, Expected]]
) -> None:
    """Each token's ``text`` is what it adds to the session's text: after a prompt, the library's
    decoding of prompt and generation beyond that of the prompt; on a new session, the library's
    decoding of the generated ids."""
    root, expected = tokenizer_models
    exp, prompt = expected[name], "The cat"
    async with _serving(root) as stub:
        after_prompt = [t async for t in stub.Generate(pb.GenerateRequest(model=name, prompt=prompt, max_tokens=40,
                                                                           seed=3, temperature=1.5))]  # fmt: skip
        session = await stub.CreateSession(pb.CreateSessionRequest(model=name))
        request = pb.GenerateRequest(session_id=session.session_id, max_tokens=40, seed=4, temperature=1.5)
        fresh = [t async for t in stub.Generate(request)]
    prompt_ids = exp.encode(prompt)
    whole = exp.decode(prompt_ids + [t.token_id for t in after_prompt])
    assert whole.startswith(exp.decode(prompt_ids))
    assert "".join(t.text for t in after_prompt) == whole[len(exp.decode(prompt_ids)) :]
    assert "".join(t.text for t in fresh) == exp.decode([t.token_id for t in fresh])
    assert any(t.text.startswith(" ") for t in after_prompt + fresh) or name == "chars", "spacing comes from pieces"


def test_the_text_stream_holds_back_the_bytes_of_a_split_character(
    tokenizer_models: tuple[Path, dict[str, Expected]],
) -> None:
    """A byte-level BPE spells a character it has no merge for in several byte tokens: the stream
    gives no half character, and the texts still add up to the library's decoding."""
    root, expected = tokenizer_models
    exp = expected["bpe"]
    _, tokenizer = read_model_dir(root / "bpe" / "1")
    text = "The cat saw \u2603 and \U0001f408 at night, caf\u00e9 \u00e9t\u00e9 cat sat on the mat."
    ids = exp.encode(text)
    assert any("\ufffd" in exp.decode([i]) for i in ids), "some characters are split over byte tokens"
    for first in (0, 3):
        stream = tokenizer.text_stream(ids[:first])
        texts = [stream.add(i, last=n == len(ids) - 1) for n, i in enumerate(ids) if n >= first]
        assert "".join(texts) == exp.decode(ids)[len(exp.decode(ids[:first])) :]
        assert not any("\ufffd" in t for t in texts) and "" in texts, "bytes of a character were held back"


def test_a_card_without_a_tokenizer_section_loads_as_lstmds_words(models_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "old"
    shutil.copytree(models_dir / "tiny" / "1", folder)
    card = json.loads((folder / "model.json").read_text())
    del card["tokenizer"]  # as written before the section existed
    (folder / "model.json").write_text(json.dumps(card))
    _, tokenizer = read_model_dir(folder)
    vocab = Vocab.load(folder / "vocab.txt")
    assert isinstance(tokenizer, WordsTokenizer) and tokenizer.pieces == vocab.words
    text = "The cat sat on the Mat, near a xylophone.\nThe dog"
    encoded = tokenizer.encode(text)
    assert encoded.ids == vocab.encode(tokenize(text)) and encoded.pieces == tokenize(text)
    assert encoded.unknown == [w not in vocab.ids for w in tokenize(text)]
    assert tokenizer.initial_id == vocab.eos_id and tokenizer.unk_id == vocab.unk_id


def test_a_tokenizer_of_another_size_than_the_card_is_refused(
    tokenizer_models: tuple[Path, dict[str, Expected]], tmp_path: Path
) -> None:
    root, _ = tokenizer_models
    folder = tmp_path / "bpe"
    shutil.copytree(root / "bpe" / "1", folder)
    card = json.loads((folder / "model.json").read_text())
    card["tokenizer"]["file"] = "other.json"
    (folder / "model.json").write_text(json.dumps(card))
    smaller = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    smaller.train_from_iterator(SENTENCES, trainers.BpeTrainer(vocab_size=40, special_tokens=["<unk>", "<s>", "</s>"]))
    smaller.save(str(folder / "other.json"))
    size = smaller.get_vocab_size()
    with pytest.raises(ModelFormatError, match=f"other.json has {size} tokens, the card says {card['vocab_size']}"):
        read_model_dir(folder)


def test_a_card_naming_an_unknown_kind_or_option_is_refused(models_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    shutil.copytree(models_dir / "tiny" / "1", folder)
    card = json.loads((folder / "model.json").read_text())
    for section, message in (({"kind": "morphemes"}, "kind 'morphemes' is not one of"),
                             ({"kind": "whitespace", "casing": "upper"}, "unknown tokenizer option")):  # fmt: skip
        (folder / "model.json").write_text(json.dumps({**card, "tokenizer": section}))
        with pytest.raises(ModelFormatError, match=message):
            read_model_dir(folder)


def test_lstmd_export_onnx_records_the_tokenizer_and_copies_its_file(
    tokenizer_models: tuple[Path, dict[str, Expected]], tmp_path: Path
) -> None:
    from lstmd.export.cli import main as export_main
    from tests.user_model import UserLM

    root, _ = tokenizer_models
    model_file = root / "spm" / "1" / "tokenizer.model"
    library = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    size = library.get_piece_size()
    torch.manual_seed(0)
    torch.save(UserLM(size).state_dict(), tmp_path / "weights.pt")
    (tmp_path / "text.txt").write_text("\n".join(SENTENCES) + "\n")
    args = ["onnx", "--checkpoint", str(tmp_path / "weights.pt"), "--tokenizer", "sentencepiece",
            "--tokenizer-file", str(model_file), "--initial", "eos", "--lowercase",
            "--model-class", USER_MODEL,
            "--model-kwargs", json.dumps({"vocab_size": size}), "--out", str(tmp_path / "models"), "--name", "sp",
            "--text", str(tmp_path / "text.txt")]  # fmt: skip
    assert export_main(args) == 0
    folder = tmp_path / "models" / "sp" / "1"
    card = json.loads((folder / "model.json").read_text())
    assert card["tokenizer"] == {
        "kind": "sentencepiece",
        "file": "tokenizer.model",
        "lowercase": True,
        "initial": "eos",
    }
    assert (folder / "tokenizer.model").read_bytes() == model_file.read_bytes()
    assert card["vocab_size"] == size and card["verification"]["max_abs_difference"]["parity_real"] <= 1e-4
    _, tokenizer = read_model_dir(folder)
    assert tokenizer.initial_id == library.eos_id()
    assert tokenizer.encode_text("The Cat") == library.encode("the cat")


def test_lstmd_export_onnx_refuses_a_tokenizer_of_another_size_than_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lstmd.export.cli import main as export_main
    from tests.user_model import UserLM

    (tmp_path / "vocab.txt").write_text("\n".join(WIKITEXT_WORDS) + "\n")
    torch.save(UserLM(len(WIKITEXT_WORDS) + 1).state_dict(), tmp_path / "weights.pt")
    args = ["onnx", "--checkpoint", str(tmp_path / "weights.pt"), "--tokenizer", "whitespace",
            "--vocab", str(tmp_path / "vocab.txt"), "--model-class", USER_MODEL,
            "--model-kwargs", json.dumps({"vocab_size": len(WIKITEXT_WORDS) + 1}), "--out", str(tmp_path / "models"),
            "--name", "ws"]  # fmt: skip
    assert export_main(args) == 1
    assert "the logits have 20 entries per step and the vocabulary 19 words" in capsys.readouterr().err
    assert not (tmp_path / "models").exists(), "a refused export leaves no folder behind"
