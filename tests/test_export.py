"""The model pipeline end to end, in seconds: train, export, verify, load; and what the
server must refuse."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pexpect
import pytest
import torch

from lstmd.export.cli import main as export_main
from lstmd.export.onnx_export import load_torch_model
from lstmd.export.verify import VerificationError, verify
from lstmd.model import graph
from lstmd.model.folder import ModelFormatError, read_model_dir
from lstmd.model.graph import check_shapes, shapes
from lstmd.model.tokenizer import Vocab

USER_MODEL = f"{Path(__file__).parent / 'user_model.py'}:UserLM"
TEXT = (
    "the cat sat on the mat . the dog sat on the log . a cat saw a dog .\n"
    "the dog ran to the cat . the cat ran to the mat . a dog saw the log .\n"
)


def tiny_train(corpus: Path, out: Path) -> list[str]:
    """``lstmd-export train`` arguments for a model that trains in about a second."""
    sizes = ["--vocab-size", "50", "--embed-size", "16", "--hidden-size", "16", "--batch-size", "4", "--bptt", "8"]
    return ["train", "--corpus", str(corpus), "--out", str(out), *sizes, "--epochs", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for i in range(9):
        (root / f"doc{i}.txt").write_text(TEXT * (20 + i))
    return root


@pytest.fixture(scope="module")
def trained(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("run")
    assert export_main(tiny_train(corpus, run)) == 0
    return run


@pytest.fixture(scope="module")
def model_dir(trained: Path, corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    models = tmp_path_factory.mktemp("models")
    args = ["onnx", "--checkpoint", str(trained / "best.pt"), "--vocab", str(trained / "vocab.txt"),
            "--out", str(models), "--name", "tiny", "--run", str(trained), "--text", str(corpus)]  # fmt: skip
    assert export_main(args) == 0
    return models / "tiny" / "1"


def test_training_reports_perplexities_and_baseline(trained: Path) -> None:
    report = json.loads((trained / "report.json").read_text())
    vocab_size = len(Vocab.load(trained / "vocab.txt"))
    assert 1 < report["test_ppl"] < vocab_size, "one epoch on repetitive text beats a uniform guess"
    assert 1 < report["baseline"]["test_ppl"] < vocab_size
    split = json.loads((trained / "split.json").read_text())
    assert split["test"] and split["valid"] and not set(split["test"]) & set(split["train"])


def test_training_is_seeded_and_reproducible(trained: Path, corpus: Path, tmp_path: Path) -> None:
    export_main(tiny_train(corpus, tmp_path))
    first = torch.load(trained / "best.pt")["model"]
    second = torch.load(tmp_path / "best.pt")["model"]
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_training_resumes_from_its_checkpoint(trained: Path, corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    export_main([*tiny_train(corpus, run), "--epochs", "2", "--resume"])
    history = json.loads((run / "report.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2]


def test_a_time_budget_stops_training_between_batches(corpus: Path, tmp_path: Path) -> None:
    # A budget of a few nanoseconds is spent by the first batch, whatever the machine's speed.
    assert export_main([*tiny_train(corpus, tmp_path), "--epochs", "3", "--max-minutes", "1e-9"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    stop = report["stopped_mid_epoch"]
    assert stop["epoch"] == 1 and stop["batches"] == 1 < stop["of"]
    assert [(h["epoch"], h["batches"], h["of"]) for h in report["history"]] == [(1, 1, stop["of"])]
    lm = load_torch_model(tmp_path / "best.pt")  # the partial epoch was validated and kept
    assert lm.config.to_dict() == report["model"]  # type: ignore[operator, union-attr]


def test_progress_off_a_terminal_is_a_few_plain_lines(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert export_main(tiny_train(corpus, tmp_path)) == 0
    err = capsys.readouterr().err  # captured: not a terminal
    assert "\r" not in err and "\x1b" not in err
    lines = err.splitlines()
    assert len(lines) == 10, "one line at each tenth of the epoch"
    batches = int(lines[-1].split("/")[1].split()[0])
    assert batches > 10 and lines[-1].startswith(f"epoch 1: batch {batches}/{batches} (100%), loss ")
    assert all(line.startswith("epoch 1: batch ") and line.endswith(" tokens/s") for line in lines)


def test_progress_on_a_terminal_is_a_bar(corpus: Path, tmp_path: Path) -> None:
    args = tiny_train(corpus, tmp_path)
    child = pexpect.spawn(sys.executable, ["-m", "lstmd.export", *args], encoding="utf-8", timeout=120)
    try:
        child.expect(r"epoch 1: +\d+%\|")  # tqdm's bar, redrawn in place
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_exported_folder_matches_the_format_and_card(model_dir: Path) -> None:
    card, vocab = read_model_dir(model_dir)
    assert card.name == "tiny" and card.vocab_size == len(vocab) and card.state_bytes == 2 * 2 * 16 * 4
    assert card.perplexity["test"] > 1 and card.perplexity["baseline_test"] > 1
    assert card.verification["max_abs_difference"]["parity_random"] <= 1e-4
    session = ort.InferenceSession(str(model_dir / "model.onnx"))
    check_shapes(shapes(session.get_inputs()), shapes(session.get_outputs()), card)
    assert "test perplexity / baseline" in (model_dir / "MODEL_CARD.md").read_text()


def test_onnx_agrees_with_pytorch_and_streams(model_dir: Path, trained: Path) -> None:
    lm = load_torch_model(trained / "best.pt")
    report = verify(lm, model_dir, len(Vocab.load(trained / "vocab.txt")))
    assert set(report) >= {"parity_random", "parity_real", "streaming_onnx", "streaming_torch", "batch_independence"}


def test_verification_catches_a_model_that_differs(model_dir: Path, trained: Path) -> None:
    lm = load_torch_model(trained / "best.pt")
    with torch.no_grad():
        lm.decoder.bias[3] += 0.01  # type: ignore[index, operator, union-attr]
    with pytest.raises(VerificationError, match="parity"):
        verify(lm, model_dir, len(Vocab.load(trained / "vocab.txt")))


def test_a_users_own_lstm_lm_exports_verifies_and_runs(tmp_path: Path, corpus: Path) -> None:
    from tests.user_model import UserLM

    words = ["<unk>", "<eos>", "the", "cat", "dog", "sat", "on", "mat", "log", ".", "a", "saw", "ran", "to"]
    (tmp_path / "my_vocab.txt").write_text("\n".join(words) + "\n")
    torch.manual_seed(0)
    torch.save(UserLM(len(words)).state_dict(), tmp_path / "weights.pt")
    args = ["onnx", "--checkpoint", str(tmp_path / "weights.pt"), "--vocab", str(tmp_path / "my_vocab.txt"),
            "--model-class", USER_MODEL, "--model-kwargs", json.dumps({"vocab_size": len(words)}),
            "--out", str(tmp_path / "models"), "--name", "mine", "--text", str(corpus)]  # fmt: skip
    assert export_main(args) == 0
    folder = tmp_path / "models/mine/1"
    card, vocab = read_model_dir(folder)
    assert (card.num_layers, card.hidden_size, card.vocab_size) == (3, 20, len(words))
    session = ort.InferenceSession(str(folder / "model.onnx"))
    tokens = np.array([vocab.encode_text("the cat sat on the mat .")], dtype=np.int64)
    zeros = np.zeros((3, 1, 20), np.float32)
    out = graph.run(session, tokens, zeros, zeros, 3)
    assert out.logprobs.shape == (1, len(words)) and np.isclose(np.exp(out.logprobs).sum(), 1, atol=1e-5)
    assert out.top_ids.shape == (1, 3) and out.h.shape == (3, 1, 20)
    source = args[1:5] + args[5:9] + ["--text", str(corpus)]  # checkpoint, vocab, class, kwargs
    assert export_main(["verify", str(folder), *source]) == 0


def _broken_copy(model_dir: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "broken"
    shutil.copytree(model_dir, folder)
    return folder


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda f: (f / "vocab.txt").unlink(), "missing vocab.txt"),
        (lambda f: (f / "model.json").write_text("{not json"), "not a valid model card"),
        (lambda f: (f / "vocab.txt").write_text("<unk>\n<eos>\nonly\n"), "vocab.txt has 3 tokens, the card says"),
        (lambda f: (f / "model.onnx").write_bytes((f / "model.onnx").read_bytes() + b"x"), "checksum"),
    ],
)
def test_broken_folders_are_rejected_with_a_clear_message(
    model_dir: Path, tmp_path: Path, breakage: Callable[[Path], object], message: str
) -> None:
    folder = _broken_copy(model_dir, tmp_path)
    breakage(folder)
    with pytest.raises(ModelFormatError, match=message):
        read_model_dir(folder)


def test_wrong_graph_names_and_vocabulary_size_are_rejected(model_dir: Path) -> None:
    card, _ = read_model_dir(model_dir)
    session = ort.InferenceSession(str(model_dir / "model.onnx"))
    inputs, outputs = shapes(session.get_inputs()), shapes(session.get_outputs())
    renamed = {("input_ids" if k == "tokens" else k): v for k, v in inputs.items()}
    with pytest.raises(ModelFormatError, match="inputs are"):
        check_shapes(renamed, outputs, card)
    card.vocab_size += 1
    with pytest.raises(ModelFormatError, match="logprobs has shape"):
        check_shapes(inputs, outputs, card)
