"""``lstmd-export onnx`` and ``verify`` check the text path on the user's own sample text: a cased
WikiText-style model exported with lstmd's default ``words`` tokenizer is warned about (and refused
with ``--strict-text``), the same model with ``--tokenizer whitespace`` passes, and ids the user's
own pipeline made are compared line by line.

Expected figures are counted by hand below, and expected ids come from ``str.split`` over the
vocabulary list, never from lstmd's tokenizers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import sentencepiece
import torch

from lstmd.export.cli import main as export_main
from lstmd.export.text_check import check_text
from lstmd.model.tokenizer import CharactersTokenizer, TokenizerSpec, WhitespaceTokenizer
from tests.test_tokenizers import SENTENCES
from tests.user_model import UserLM

USER_MODEL = f"{Path(__file__).parent / 'user_model.py'}:UserLM"
CASED = ["<unk>", "<eos>", "The", "the", "King", "'s", "ship", "@-@", "long", "cat", "sat", "on", "mat", ".", ",",
         "A", "a", "river", "="]  # fmt: skip
# what lstmd's words tokenizer can never emit: it lowercases, and splits "'s" and "@-@" into punctuation
UNREACHABLE_UNDER_WORDS = ["The", "King", "'s", "@-@", "A"]
SAMPLE = "The King 's long @-@ ship sat on the mat .\nA cat sat on the river , the King 's ship .\n"
# under words the sample is: the king ' s long @ - @ ship sat on the mat . <eos> (14 + 1 tokens, king ' s @ - @
# unknown) a cat sat on the river , the king ' s ship . <eos> (13 + 1, king ' s unknown)
WORDS_TOKENS, WORDS_UNKNOWN = 29, 9


def _ids(line: str) -> list[int]:
    return [CASED.index(t) for t in line.split()]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("text-check")
    (folder / "vocab.txt").write_text("\n".join(CASED) + "\n")
    (folder / "sample.txt").write_text(SAMPLE)
    torch.manual_seed(0)
    torch.save(UserLM(len(CASED)).state_dict(), folder / "weights.pt")
    return folder


def _source(files: Path) -> list[str]:
    return ["--checkpoint", str(files / "weights.pt"), "--vocab", str(files / "vocab.txt"),
            "--model-class", USER_MODEL, "--model-kwargs", json.dumps({"vocab_size": len(CASED)}),
            "--text", str(files / "sample.txt")]  # fmt: skip


def _export(files: Path, out: Path, *extra: str) -> int:
    return export_main(["onnx", *_source(files), "--out", str(out), "--name", "wiki", *extra])


def _text_check(out: Path) -> dict[str, Any]:
    card = json.loads((out / "wiki" / "1" / "model.json").read_text())
    figures: dict[str, Any] = card["verification"]["text_check"]
    return figures


def test_a_cased_model_under_the_words_tokenizer_is_warned_about(
    files: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _export(files, tmp_path / "models") == 0  # warned, not refused
    err = capsys.readouterr().err
    unknown = f"{WORDS_UNKNOWN / WORDS_TOKENS:.1%} of sample.txt's {WORDS_TOKENS} tokens became the unknown token"
    unreachable = f"{len(UNREACHABLE_UNDER_WORDS)} of the {len(CASED)} vocabulary entries"
    for figure, threshold in ((unknown, "(threshold 5.0%, --max-unknown)"),
                              (unreachable, "(threshold 1.0%, --max-unreachable)")):  # fmt: skip
        line = next(line for line in err.splitlines() if figure in line)
        assert line.startswith("WARNING: ") and threshold in line and "is --tokenizer/--lowercase right?" in line
    assert "'The', 'King', \"'s\", '@-@', 'A'" in err
    figures = _text_check(tmp_path / "models")
    assert figures["tokenizer"] == "words" and figures["sample"] == "sample.txt" and figures["sample_lines"] == 2
    assert (figures["tokens"], figures["unknown"]) == (WORDS_TOKENS, WORDS_UNKNOWN)
    assert (figures["vocabulary"], figures["unreachable"]) == (len(CASED), len(UNREACHABLE_UNDER_WORDS))
    assert figures["unreachable_examples"] == [repr(w) for w in UNREACHABLE_UNDER_WORDS]
    assert len(figures["warnings"]) == 2


def test_strict_text_refuses_it_and_leaves_no_folder(
    files: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _export(files, tmp_path / "models", "--strict-text") == 1
    err = capsys.readouterr().err
    assert err.startswith("lstmd-export onnx: refused (--strict-text): ")
    assert "--max-unknown" in err and "--max-unreachable" in err
    assert not (tmp_path / "models").exists()


def test_the_right_tokenizer_passes_and_reproduces_the_users_ids(
    files: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = SAMPLE.splitlines()
    (tmp_path / "ids.txt").write_text("".join(" ".join(map(str, _ids(line))) + "\n" for line in lines))
    args = ["--tokenizer", "whitespace", "--text-ids", str(tmp_path / "ids.txt"), "--strict-text"]
    assert _export(files, tmp_path / "models", *args) == 0
    out, err = capsys.readouterr()
    assert "WARNING" not in err
    assert "text check: 0 of 25 tokens of sample.txt unknown, 0 of 19 vocabulary entries unreachable" in out
    figures = _text_check(tmp_path / "models")
    assert (figures["tokenizer"], figures["tokens"], figures["unknown"], figures["unreachable"]) == (
        "whitespace",
        25,
        0,
        0,
    )
    assert figures["ids"] == {"source": "ids.txt", "lines": 2, "reproduced": 2, "share": 1.0, "first_difference": ""}
    assert figures["warnings"] == []


@pytest.mark.parametrize("shape", ["lines ending with <eos>", "one sequence"])
def test_ids_with_line_ends_or_as_one_sequence_are_reproduced(
    shape: str, files: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ended = [[*_ids(line), CASED.index("<eos>")] for line in SAMPLE.splitlines()]  # as word_language_model's data.py
    ids = [[i for line in ended for i in line]] if shape == "one sequence" else ended
    (tmp_path / "ids.txt").write_text("".join(" ".join(map(str, line)) + "\n" for line in ids))
    args = ["--tokenizer", "whitespace", "--text-ids", str(tmp_path / "ids.txt"), "--strict-text"]
    assert _export(files, tmp_path / "models", *args) == 0
    assert _text_check(tmp_path / "models")["ids"]["reproduced"] == len(ids)


def test_wrong_ids_are_reported_with_the_first_difference(
    files: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = (_ids(line) for line in SAMPLE.splitlines())
    second[4] = CASED.index("The")  # the user's pipeline wrote "the" (A cat sat on the) as "The"
    (tmp_path / "ids.txt").write_text(f"{' '.join(map(str, first))}\n{' '.join(map(str, second))}\n")
    args = ["--tokenizer", "whitespace", "--text-ids", str(tmp_path / "ids.txt")]
    assert _export(files, tmp_path / "models", *args) == 0
    err = capsys.readouterr().err
    warning = next(line for line in err.splitlines() if line.startswith("WARNING: "))
    assert "reproduces 1 of the 2 lines of ids.txt (threshold: all)" in warning
    assert "line 2, token 5: the model's tokenizer gives 'the'=3 'river'=17 ','=14 'the'=3 …" in warning
    assert "the ids given 'The'=2 'river'=17 ','=14 'the'=3 …" in warning
    figures = _text_check(tmp_path / "models")["ids"]
    assert (figures["lines"], figures["reproduced"], figures["share"]) == (2, 1, 0.5)
    assert figures["first_difference"].startswith("line 2, token 5:")
    assert export_main(["onnx", *_source(files), "--out", str(tmp_path / "strict"), "--name", "wiki", *args,
                        "--strict-text"]) == 1  # fmt: skip
    assert "reproduces 1 of the 2 lines" in capsys.readouterr().err and not (tmp_path / "strict").exists()


def test_verify_checks_the_text_path_of_an_existing_folder(
    files: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _export(files, tmp_path / "models") == 0
    folder = str(tmp_path / "models" / "wiki" / "1")
    capsys.readouterr()
    assert export_main(["verify", folder, *_source(files)]) == 0
    out, err = capsys.readouterr()
    assert f"text check: {WORDS_UNKNOWN} of {WORDS_TOKENS} tokens of sample.txt unknown" in out
    assert err.count("WARNING: ") == 2
    assert export_main(["verify", folder, *_source(files), "--strict-text"]) == 1
    assert "lstmd-export verify: refused (--strict-text)" in capsys.readouterr().err


def test_text_ids_of_another_line_count_are_refused(
    files: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "ids.txt").write_text("2 4\n3\n9\n")
    assert (
        _export(files, tmp_path / "models", "--tokenizer", "whitespace", "--text-ids", str(tmp_path / "ids.txt")) == 1
    )
    assert "ids.txt has 3 lines and the text 2: give one line of ids per line of text" in capsys.readouterr().err
    assert not (tmp_path / "models").exists()


# unreachable entries of the other kinds


def test_entries_the_vocabulary_kinds_never_emit_are_unreachable() -> None:
    words = ["<unk>", "<eos>", "New York", "York", "new"]
    assert check_text(WhitespaceTokenizer(TokenizerSpec("whitespace"), words)).unreachable_examples == ["'New York'"]
    lowered = check_text(WhitespaceTokenizer(TokenizerSpec("whitespace", lowercase=True), words))
    assert lowered.unreachable_examples == ["'New York'", "'York'"]
    characters = ["<unk>", "<eos>", "a", "th", " ", "T"]
    assert check_text(CharactersTokenizer(TokenizerSpec("characters"), characters)).unreachable_examples == ["'th'"]


def test_pieces_a_lowercased_sentencepiece_model_cuts_off_are_unreachable(tmp_path: Path) -> None:
    from lstmd.model.library_tokenizers import SentencePieceTokenizer

    (tmp_path / "text.txt").write_text("\n".join(SENTENCES * 4) + "\n")
    sentencepiece.SentencePieceTrainer.train(input=str(tmp_path / "text.txt"), model_prefix=str(tmp_path / "sp"),
                                             vocab_size=80, model_type="unigram", hard_vocab_limit=False)  # fmt: skip
    path = tmp_path / "sp.model"
    assert check_text(SentencePieceTokenizer(TokenizerSpec("sentencepiece"), path)).unreachable == 0
    library = sentencepiece.SentencePieceProcessor(model_file=str(path))
    cased = [  # pieces with a capital that the library produces from their own text
        repr(library.id_to_piece(i))
        for i in range(library.get_piece_size())
        if not library.is_control(i) and not library.is_unknown(i)
        and library.decode([i]) != library.decode([i]).lower() and i in library.encode(library.decode([i]))
    ]  # fmt: skip
    assert cased, "the sample has capitals"
    lowered = check_text(SentencePieceTokenizer(TokenizerSpec("sentencepiece", lowercase=True), path))
    assert lowered.unreachable == len(cased) and lowered.unreachable_examples == cased[:5]
