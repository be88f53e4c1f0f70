"""What ``lstmd-export onnx`` catches before the server would: a forward that does not follow the
interface, a graph the server refuses, a folder left behind by a failure or clobbered by a new
export; and the adapters and imports that let a user's own model export."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from lstmd.export.adapters import BatchFirstLogits, TimeMajorLogSoftmax
from lstmd.export.cli import main as export_main
from lstmd.export.interface import ModelInterfaceError, check_forward
from lstmd.export.onnx_export import load_torch_model, state_shape, write_model_dir
from lstmd.export.publish import PublishError, staged
from lstmd.model import graph
from lstmd.model.folder import read_model_dir
from lstmd.model.tokenizer import Vocab
from lstmd.server.registry import ModelError, load_models
from lstmd.server.settings import Settings
from tests import odd_models
from tests.user_model import UserLM
from tests.word_language_model import RNNModel

TESTS = Path(__file__).parent
WORDS = ["<unk>", "<eos>", "the", "cat", "dog", "sat", "on", "mat", "log", ".", "a", "saw", "ran", "to"]
TEXT = "the cat sat on the mat . the dog sat on the log . a cat saw a dog .\n" * 20


@pytest.fixture
def user_files(tmp_path: Path) -> Path:
    (tmp_path / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    (tmp_path / "text.txt").write_text(TEXT)
    return tmp_path


def _save(model: nn.Module, folder: Path) -> Path:
    path = folder / "weights.pt"
    torch.save(model.state_dict(), path)
    return path


def _onnx_args(files: Path, weights: Path, model_class: str, kwargs: dict[str, object], *extra: str) -> list[str]:
    return ["onnx", "--checkpoint", str(weights), "--vocab", str(files / "vocab.txt"), "--model-class", model_class,
            "--model-kwargs", json.dumps(kwargs), "--text", str(files / "text.txt"), "--out", str(files / "models"),
            "--name", "mine", *extra]  # fmt: skip


def _ort_against(folder: Path, own: list[tuple[np.ndarray, np.ndarray, np.ndarray]], tokens: np.ndarray) -> None:
    """ONNX Runtime on a batch of ``tokens`` from a zero state, against each sequence's last-step
    log-probabilities and (h, c) computed by the unadapted model: ``own[i]``."""
    card, _ = read_model_dir(folder)
    zero = np.zeros((card.num_layers, len(tokens), card.hidden_size), np.float32)
    out = graph.run(graph.load(folder / "model.onnx"), tokens, zero, zero, 3)
    for i, (logprobs, h, c) in enumerate(own):
        np.testing.assert_allclose(out.logprobs[i], logprobs, atol=1e-5)
        np.testing.assert_allclose(out.h[:, i], h, atol=1e-5)
        np.testing.assert_allclose(out.c[:, i], c, atol=1e-5)


# The interface check, before any export


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            odd_models.NoStateLM(14),
            r"NoStateLM.forward\(tokens \(2, 3\), \(h, c\) each \(2, 2, 12\)\) raised TypeError",
        ),
        (
            odd_models.FlatLogitsLM(14),
            r"returned \(tensor \(6, 14\), \(tensor \(2, 2, 12\), tensor \(2, 2, 12\)\)\): "
            r"the logits are flattened over batch and time",
        ),
        (odd_models.TimeMajorOutLM(14), r"the logits are time-major \(time, batch, vocab\)"),
        (
            odd_models.SplitStateLM(14),
            r"returned \(tensor \(2, 3, 14\), tensor \(2, 2, 12\), tensor \(2, 2, 12\)\): "
            r"the result is not a pair",
        ),
        (odd_models.StateFirstLM(14), r"StateFirstLM.forward\(.*\) raised"),
        (RNNModel(14, nhid=12), r"RNNModel.forward\(.*\) raised RuntimeError"),  # time-major: batch 3, state 2
    ],
)
def test_a_forward_off_the_interface_is_named_before_export(model: nn.Module, message: str) -> None:
    with pytest.raises(ModelInterfaceError, match=message) as caught:
        check_forward(model.eval(), 14, 2, 12)
    text = str(caught.value)
    assert "expected forward(tokens (batch, time) int64, (h, c) each (layers, batch, hidden))" in text
    assert "--adapter time-major-logsoftmax" in text and "--adapter batch-first-logits" in text


def test_logits_over_another_vocabulary_are_named_before_export() -> None:
    with pytest.raises(ModelInterfaceError, match="the logits have 20 entries per step and the vocabulary 14 words"):
        check_forward(UserLM(20).eval(), 14, 3, 20)


def test_a_model_without_a_state_size_is_named_before_export() -> None:
    with pytest.raises(ModelInterfaceError, match="Sequential: cannot find the state size"):
        state_shape(nn.Sequential(nn.Embedding(14, 4)))


def test_the_adapted_models_follow_the_interface() -> None:
    check_forward(TimeMajorLogSoftmax(RNNModel(14)).eval(), 14, 2, 14)
    check_forward(BatchFirstLogits(odd_models.StateFirstLM(14), "input_ids", "hidden").eval(), 14, 2, 12)
    check_forward(BatchFirstLogits(odd_models.SplitStateLM(14)).eval(), 14, 2, 12)
    check_forward(UserLM(14).eval(), 14, 3, 20)


def test_the_cli_says_what_is_wrong_and_leaves_no_folder(user_files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = _save(RNNModel(len(WORDS)), user_files)
    model_class = f"{TESTS / 'word_language_model.py'}:RNNModel"
    assert export_main(_onnx_args(user_files, weights, model_class, {"ntoken": len(WORDS)})) == 1
    assert "RNNModel.forward(tokens (2, 3)" in capsys.readouterr().err
    assert not (user_files / "models").exists()


# Adapters: export, verification and ONNX Runtime against the unadapted model


def test_word_language_models_rnnmodel_exports_through_its_adapter(user_files: Path) -> None:
    torch.manual_seed(0)
    lm = RNNModel(len(WORDS)).eval()
    weights = _save(lm, user_files)
    model_class = f"{TESTS / 'word_language_model.py'}:RNNModel"
    args = _onnx_args(user_files, weights, model_class, {"ntoken": len(WORDS)}, "--adapter", "time-major-logsoftmax")
    assert export_main(args) == 0
    folder = user_files / "models/mine/1"
    card, _ = read_model_dir(folder)
    assert (card.num_layers, card.hidden_size, card.vocab_size) == (2, 14, len(WORDS))
    tokens = np.array([[2, 3, 5, 6, 2, 7], [10, 4, 11, 10, 3, 9], [1, 2, 4, 12, 13, 2]], np.int64)
    own = []
    with torch.no_grad():
        for seq in tokens:  # one sequence at a time, time-major as the model wants: (time, 1)
            logprobs, (h, c) = lm(torch.from_numpy(seq)[:, None], lm.init_hidden(1))  # (time * 1, vocab)
            own.append((logprobs[-1].numpy(), h[:, 0].numpy(), c[:, 0].numpy()))
    _ort_against(folder, own, tokens)
    assert load_models(Settings(models_dir=str(user_files / "models"))).get("mine").vocab_size == len(WORDS)
    verify_args = [*args[1:11], "--adapter", "time-major-logsoftmax"]  # checkpoint, vocab, class, kwargs, text
    assert export_main(["verify", str(folder), *verify_args]) == 0


def test_a_batch_first_model_with_its_own_argument_names_exports_through_its_adapter(user_files: Path) -> None:
    torch.manual_seed(0)
    lm = odd_models.StateFirstLM(len(WORDS)).eval()
    weights = _save(lm, user_files)
    adapter = [
        "--adapter",
        "batch-first-logits",
        "--adapter-kwargs",
        '{"tokens_arg": "input_ids", "state_arg": "hidden"}',
    ]
    args = _onnx_args(
        user_files, weights, f"{TESTS / 'odd_models.py'}:StateFirstLM", {"vocab_size": len(WORDS)}, *adapter
    )
    assert export_main(args) == 0
    tokens = np.array([[2, 3, 5, 6], [10, 4, 11, 9]], np.int64)
    zero = torch.zeros(2, 1, 12)
    own = []
    with torch.no_grad():
        for seq in tokens:
            logits, (h, c) = lm((zero, zero), torch.from_numpy(seq)[None])  # (1, time, vocab)
            own.append((torch.log_softmax(logits[0, -1], -1).numpy(), h[:, 0].numpy(), c[:, 0].numpy()))
    _ort_against(user_files / "models/mine/1", own, tokens)


# The server's own check before success, and what a failure leaves


def test_a_graph_the_server_refuses_fails_the_export_and_leaves_no_folder(
    user_files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(0)
    weights = _save(odd_models.UnfixedVocab(len(WORDS)), user_files)
    args = _onnx_args(user_files, weights, f"{TESTS / 'odd_models.py'}:UnfixedVocab", {"ntoken": len(WORDS)})
    (user_files / "models/mine/1").mkdir(parents=True)  # an earlier version, kept as it was
    (user_files / "models/mine/1/model.onnx").write_bytes(b"earlier")
    assert export_main([*args, "--version", "2"]) == 1
    err = capsys.readouterr().err
    assert "lstmd-server would refuse this model: model.onnx logprobs has shape [None, None]" in err
    assert [p.name for p in (user_files / "models/mine").iterdir()] == ["1"]
    assert (user_files / "models/mine/1/model.onnx").read_bytes() == b"earlier"
    # the server itself refuses that graph, written without the check
    lm = load_torch_model(weights, f"{TESTS / 'odd_models.py'}:UnfixedVocab", {"ntoken": len(WORDS)})
    write_model_dir(lm, Vocab(WORDS), user_files / "unchecked/mine/1", "mine", "1")
    with pytest.raises(ModelError, match=r"logprobs has shape \[None, None\]"):
        load_models(Settings(models_dir=str(user_files / "unchecked")))
    capsys.readouterr()
    assert export_main(["verify", str(user_files / "unchecked/mine/1"), *args[1:11]]) == 1
    assert "lstmd-server would refuse this model: model.onnx logprobs has shape [None, None]" in capsys.readouterr().err


def test_an_existing_version_is_replaced_only_when_forced(user_files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    weights = _save(UserLM(len(WORDS)), user_files)
    args = _onnx_args(user_files, weights, f"{TESTS / 'user_model.py'}:UserLM", {"vocab_size": len(WORDS)})
    folder = user_files / "models/mine/1"
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"earlier")
    assert export_main(args) == 1
    assert "already exists: export to another --version, or give --force to replace it" in capsys.readouterr().err
    assert (folder / "model.onnx").read_bytes() == b"earlier"
    assert export_main([*args, "--force"]) == 0
    card, _ = read_model_dir(folder)
    assert card.name == "mine" and card.verification["tolerance"] == 1e-4
    assert [p.name for p in folder.parent.iterdir()] == ["1"]


def test_a_staged_folder_appears_only_on_success(tmp_path: Path) -> None:
    target = tmp_path / "models/mine/1"
    with pytest.raises(RuntimeError), staged(target) as work:
        (work / "model.onnx").write_bytes(b"half")
        raise RuntimeError("export failed")
    assert not (tmp_path / "models").exists()
    with staged(target) as work:
        assert work.parent == target.parent and not target.exists()
        (work / "model.onnx").write_bytes(b"whole")
    assert [p.name for p in target.parent.iterdir()] == ["1"] and (target / "model.onnx").read_bytes() == b"whole"
    with pytest.raises(PublishError, match="already exists"), staged(target):
        pass
    with staged(target, replace=True) as work:
        (work / "model.onnx").write_bytes(b"newer")
    assert [p.name for p in target.parent.iterdir()] == ["1"] and (target / "model.onnx").read_bytes() == b"newer"


# Importing the user's model class


def test_a_model_file_imports_the_module_beside_it(tmp_path: Path) -> None:
    project = tmp_path / "word_language_model"
    project.mkdir()
    shutil.copy(TESTS / "word_language_model.py", project / "wlm_parts.py")
    (project / "serving.py").write_text(
        "from wlm_parts import RNNModel\n\n\n"
        "class SmallRNN(RNNModel):\n"
        "    def __init__(self, ntoken: int) -> None:\n"
        "        super().__init__(ntoken, ninp=6, nhid=9, nlayers=2)\n"
    )
    torch.save(RNNModel(len(WORDS), ninp=6, nhid=9, nlayers=2).state_dict(), tmp_path / "weights.pt")
    path_before = list(sys.path)
    lm = load_torch_model(tmp_path / "weights.pt", f"{project / 'serving.py'}:SmallRNN", {"ntoken": len(WORDS)})
    assert type(lm).__name__ == "SmallRNN" and type(lm).__mro__[1].__module__ == "wlm_parts"
    assert sys.path == path_before


def test_ort_loads_what_the_adapter_exported(user_files: Path) -> None:
    """The adapted graph's vocabulary axis is fixed, as the server's check wants."""
    weights = _save(RNNModel(len(WORDS)), user_files)
    args = _onnx_args(user_files, weights, f"{TESTS / 'word_language_model.py'}:RNNModel", {"ntoken": len(WORDS)},
                      "--adapter", "time-major-logsoftmax")  # fmt: skip
    assert export_main(args) == 0
    session = ort.InferenceSession(str(user_files / "models/mine/1/model.onnx"))
    assert graph.shapes(session.get_outputs())["logprobs"] == [None, len(WORDS)]


def test_the_server_passes_over_the_hidden_folders_of_an_export_that_never_finished(
    models_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A killed export leaves its staging folder (``.<version>.partial-*``) behind: beside a version
    it is never served, and alone in a name folder it does not stop the server from starting."""
    root = tmp_path / "models"
    shutil.copytree(models_dir / "tiny", root / "tiny")
    (root / "tiny/.2.partial-killed").mkdir()  # a newer version being exported when it was killed
    (root / "mine/.1.partial-killed").mkdir(parents=True)  # a first export, killed
    (root / ".trash/1").mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="lstmd.server.registry"):
        registry = load_models(Settings(models_dir=str(root)))
    assert list(registry.models) == ["tiny"] and registry.models["tiny"].version == "1"
    assert f"{root / 'mine'} holds only hidden folders" in caplog.text
    (root / "mine/2").mkdir()  # a visible version folder must still be a model
    with pytest.raises(ModelError, match="cannot serve"):
        load_models(Settings(models_dir=str(root)))
