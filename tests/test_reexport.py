"""lstmd-export reexport: a model folder's graph rebuilt from its own weights and exported again
runs as the old one did, and a graph of someone else's model is refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from lstmd.export.reexport import ReexportError, model_from_onnx, reexport_model_dir
from lstmd.model import graph
from lstmd.model.folder import ONNX_FILE, read_model_dir
from tests.conftest import HIDDEN, LAYERS


def test_a_reexported_folder_answers_as_before(models_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "tiny" / "1"
    shutil.copytree(models_dir / "tiny" / "1", folder)
    old = graph.load(folder / ONNX_FILE)
    report = reexport_model_dir(folder, [2, 3, 4, 5])
    assert max(report.values()) < 1e-4
    new = graph.load(folder / ONNX_FILE)
    assert "If" not in {n.op_type for n in onnx.load(str(folder / ONNX_FILE)).graph.node}
    card, _ = read_model_dir(folder)  # the card's checksum is the new graph's
    assert card.verification["max_abs_difference"] == report
    rng = np.random.default_rng(0)
    vocab = card.vocab_size
    for batch, steps in ((1, 1), (8, 1), (3, 5)):
        tokens = rng.integers(0, vocab, (batch, steps))
        h, c = rng.standard_normal((2, LAYERS, batch, HIDDEN)).astype(np.float32)
        a, b = graph.run(old, tokens, h, c, 3), graph.run(new, tokens, h, c, 3)
        np.testing.assert_allclose(b.logprobs, a.logprobs, atol=1e-5)
        assert (b.top_ids == a.top_ids).all()
        np.testing.assert_allclose(np.stack([b.h, b.c]), np.stack([a.h, a.c]), atol=1e-6)


def test_a_graph_of_another_model_is_refused(tmp_path: Path) -> None:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    other = onnx.helper.make_model(onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])],
                                                          "other", [x], [y]))  # fmt: skip
    onnx.save(other, str(tmp_path / "model.onnx"))
    with pytest.raises(ReexportError, match="not an export of lstmd's LSTMLanguageModel"):
        model_from_onnx(tmp_path / "model.onnx")
