"""``lstmd-export train`` with each tokenizer kind, a given split and a given vocabulary, in seconds.

Expected counts come from the tests' own text through ``str.split``, ``len`` and ``collections.Counter``,
and expected subword tokens from the ``tokenizers`` library called directly, never through lstmd."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import tokenizers

from lstmd.export.cli import main as export_main
from lstmd.export.run_tokenizer import open_run_tokenizer, tokenizer_from_run
from lstmd.model.tokenizer import TokenizerSpec, Vocab

# Pre-tokenized, cased lines of 50 characters or more: loading a corpus would join them as one
# hard-wrapped paragraph, a split given as files must keep one line each.
LINES = [
    "The cat sat on the mat , and the dog sat on the old log .",
    "the dog ran to The cat , and the cat ran to the mat again .",
    "A cat saw a dog by the river , and the dog saw the cat too .",
    "The river ran past the old log , the mat and the quiet dog .",
]
RARE = ["Zanzibar", "quokka", "quokka", "ocelot", "ocelot", "ocelot"]  # seen 1, 2 and 3 times


def tiny(out: Path, *flags: str) -> list[str]:
    """``lstmd-export train`` arguments for a model that trains in about a second."""
    sizes = ["--embed-size", "16", "--hidden-size", "16", "--batch-size", "4", "--bptt", "8"]
    return ["train", "--out", str(out), *sizes, "--epochs", "1", "--threads", "1", *flags]


@pytest.fixture(scope="module")
def split_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("split")
    texts = {
        "train": "\n".join(LINES * 12 + [" ".join(RARE)]) + "\n",
        "valid": "\n".join(LINES[1:] * 2) + "\n",
        "test": "\n".join(LINES[:3] * 2),  # no newline at the end: one <eos> fewer
    }
    for name, text in texts.items():
        (root / f"{name}.txt").write_text(text)
    return {name: root / f"{name}.txt" for name in texts}


def _split(files: dict[str, Path]) -> list[str]:
    return ["--split", str(files["train"]), str(files["valid"]), str(files["test"])]


def _report(run: Path) -> dict[str, object]:
    report: dict[str, object] = json.loads((run / "report.json").read_text())
    return report


@pytest.fixture(scope="module")
def whitespace_run(split_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("whitespace")
    assert export_main(tiny(run, "--tokenizer", "whitespace", *_split(split_files))) == 0
    return run


def test_a_split_given_as_files_is_used_exactly(whitespace_run: Path, split_files: dict[str, Path]) -> None:
    report = _report(whitespace_run)
    for name, path in split_files.items():
        text = path.read_text()
        # whitespace tokens, and one <eos> per newline
        assert report["tokens"][name] == len(text.split()) + text.count("\n")  # type: ignore[index]
    for name in ("valid", "test"):
        assert report[name]["words"] == len(split_files[name].read_text().split())  # type: ignore[index]
    vocab = Vocab.load(whitespace_run / "vocab.txt")
    assert {"The", "the"} <= set(vocab.words), "the whitespace kind keeps case"


def test_per_word_perplexity_and_bits_per_character_divide_the_total(
    whitespace_run: Path, split_files: dict[str, Path]
) -> None:
    report = _report(whitespace_run)
    text = split_files["test"].read_text()
    words, characters = len(text.split()), len(text)
    for measures in (report["test"], report["baseline"]["test"]):  # type: ignore[index]
        nll = measures["nll"]  # type: ignore[index]
        assert math.isclose(measures["word_ppl"], math.exp(nll / words))  # type: ignore[index]
        assert math.isclose(measures["bpc"], nll / math.log(2) / characters)  # type: ignore[index]
        assert math.isclose(measures["ppl"], math.exp(nll / report["tokens"]["test"]))  # type: ignore[index]
    assert math.isclose(report["test_ppl"], report["test"]["ppl"])  # type: ignore[arg-type, index]


def test_the_baseline_command_uses_the_runs_tokenizer_and_split(whitespace_run: Path) -> None:
    before = _report(whitespace_run)["baseline"]
    assert export_main(["baseline", "--run", str(whitespace_run)]) == 0  # no --corpus: the files are recorded
    after = _report(whitespace_run)["baseline"]
    assert after["test"] == before["test"] and after["valid"] == before["valid"]  # type: ignore[index]


def test_a_given_vocabulary_is_used(split_files: dict[str, Path], tmp_path: Path) -> None:
    given = tmp_path / "given.txt"
    given.write_text("<unk>\n<eos>\nthe\ncat\ndog\nThe\n.\n,\n")
    run = tmp_path / "run"
    assert export_main(tiny(run, "--tokenizer", "whitespace", "--vocab", str(given), *_split(split_files))) == 0
    assert (run / "vocab.txt").read_text() == given.read_text()
    assert _report(run)["model"]["vocab_size"] == 8  # type: ignore[index]


def test_keep_case_keeps_the_and_the_apart(split_files: dict[str, Path], tmp_path: Path) -> None:
    assert export_main(tiny(tmp_path / "folded", *_split(split_files))) == 0
    assert export_main(tiny(tmp_path / "cased", "--keep-case", *_split(split_files))) == 0
    folded, cased = (set(Vocab.load(tmp_path / r / "vocab.txt").words) for r in ("folded", "cased"))
    assert "the" in folded and "The" not in folded
    assert {"the", "The"} <= cased
    spec, vocab = tokenizer_from_run(tmp_path / "cased")
    assert spec == TokenizerSpec("words", file="vocab.txt", keep_case=True)
    assert isinstance(vocab, Vocab) and "The" in vocab.ids
    served = open_run_tokenizer(tmp_path / "cased").encode("The cat saw the dog")  # as a model folder reads it
    assert served.pieces == ["The", "cat", "saw", "the", "dog"] and not any(served.unknown)


def test_min_count_merges_rare_tokens(split_files: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert export_main(tiny(run, "--tokenizer", "whitespace", "--min-count", "4", *_split(split_files))) == 0
    counts = Counter(split_files["train"].read_text().split())
    assert set(Vocab.load(run / "vocab.txt").words) == {"<unk>", "<eos>"} | {w for w, n in counts.items() if n >= 4}
    assert counts["ocelot"] == 3 and "ocelot" not in Vocab.load(run / "vocab.txt").ids


def test_a_character_model_reports_bits_per_character(split_files: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert export_main(tiny(run, "--tokenizer", "characters", *_split(split_files))) == 0
    report = _report(run)
    text = split_files["test"].read_text()
    assert report["tokens"]["test"] == len(text)  # type: ignore[index]  # each character, a newline as <eos>
    test = report["test"]
    assert math.isclose(test["bpc"], test["nll"] / math.log(2) / len(text))  # type: ignore[index]
    assert 0 < test["bpc"] < math.log2(len(Vocab.load(run / "vocab.txt")))  # type: ignore[index]
    characters = set(split_files["train"].read_text()) - {"\n"}  # a newline is <eos>
    assert set(Vocab.load(run / "vocab.txt").words) == {"<unk>", "<eos>"} | characters


def test_bpe_trains_a_tokenizer_json_the_library_loads(split_files: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    flags = ["--tokenizer", "bpe", "--subword-vocab-size", "300", *_split(split_files)]
    assert export_main(tiny(run, *flags)) == 0
    library = tokenizers.Tokenizer.from_file(str(run / "tokenizer.json"))
    report = _report(run)
    for name, path in split_files.items():
        lines = path.read_text().split("\n")
        for line in lines:
            assert library.decode(library.encode(line).ids) == line
        expected = sum(len(library.encode(line, add_special_tokens=False).ids) for line in lines) + len(lines) - 1
        assert report["tokens"][name] == expected  # type: ignore[index]  # lines joined by <eos>
    spec, file = tokenizer_from_run(run)
    assert spec.kind == "hf" and file == run / "tokenizer.json"
    assert report["model"]["vocab_size"] == library.get_vocab_size()  # type: ignore[index]
    # lstmd-export onnx --run takes the run's tokenizer when no tokenizer flag is given
    models = tmp_path / "models"
    args = ["onnx", "--checkpoint", str(run / "best.pt"), "--run", str(run), "--out", str(models), "--name", "bpe"]
    assert export_main(args) == 0
    card = json.loads((models / "bpe/1/model.json").read_text())
    assert card["tokenizer"]["kind"] == "hf"
    assert (models / "bpe/1" / card["tokenizer"]["file"]).read_bytes() == (run / "tokenizer.json").read_bytes()


def test_unigram_trains_a_tokenizer_json(split_files: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    flags = ["--tokenizer", "unigram", "--subword-vocab-size", "60", *_split(split_files)]
    assert export_main(tiny(run, *flags)) == 0
    library = tokenizers.Tokenizer.from_file(str(run / "tokenizer.json"))
    assert library.get_vocab_size() == _report(run)["model"]["vocab_size"]  # type: ignore[index]
    assert library.token_to_id("<eos>") is not None and library.token_to_id("<unk>") is not None
