"""The serving graph's runtime: the bundled model's graph without If gives what its former graph
gave, the re-export that made it, and bench/runtime.py's measured paths (docs/runtime.md)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from bench.runtime import BoundStep
from lstmd.export.cli import main as export_main
from lstmd.export.model import LSTMLanguageModel, State
from lstmd.export.onnx_export import export_onnx
from lstmd.export.reexport import ReexportError, model_from_onnx
from lstmd.model import graph
from lstmd.model.folder import ONNX_FILE, read_model_dir, sha256_file
from lstmd.server.settings import BUNDLED_MODELS

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = BUNDLED_MODELS / "pd-english" / "1"
FORMER_SHA256 = "ae19f50aa493210b058c3e3b4a0bbf969ef90fd8c33e32e7e10d4fc543357823"  # the model.onnx bundled before


class FormerHead(LSTMLanguageModel):
    """LSTMLanguageModel as it exported before: the logits squeezed (exported behind an If)."""

    def forward_last(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        out, state = self._lstm(tokens, state)
        return self.decoder(self.drop(out[:, -1:])).squeeze(1), state


@pytest.fixture(scope="module")
def former_graph(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled model's former graph, rebuilt from the weights of the present one."""
    lm = model_from_onnx(BUNDLED / ONNX_FILE)
    former = FormerHead(lm.config)
    former.load_state_dict(lm.state_dict())
    path = tmp_path_factory.mktemp("former") / ONNX_FILE
    export_onnx(former.eval(), lm.config.vocab_size, path)
    return path


def test_the_former_graph_is_rebuilt_exactly(former_graph: Path) -> None:
    assert sha256_file(former_graph) == FORMER_SHA256, "so the comparisons below are against the graph served before"
    assert "If" in {n.op_type for n in onnx.load(str(former_graph)).graph.node}
    assert "If" not in {n.op_type for n in onnx.load(str(BUNDLED / ONNX_FILE)).graph.node}


def test_the_bundled_graph_gives_what_the_former_graph_gave(former_graph: Path) -> None:
    """Same top_ids and h/c, top_logprobs and logprobs within 1e-5, over carried steps of one
    token and of several, at several batch sizes and top_k."""
    now, before = graph.load(BUNDLED / ONNX_FILE, 1, False), graph.load(former_graph, 1, False)
    for batch in (1, 3, 64, 256):
        rng = np.random.default_rng(batch)
        h = c = (rng.standard_normal((2, batch, 256)) * 0.5).astype(np.float32)
        h_before, c_before = h, c
        for step, (time, k) in enumerate([(1, 1), (1, 5), (4, 100), (1, 5), (1, 1)]):
            tokens = rng.integers(0, 10_000, (batch, time))
            a = graph.run(now, tokens, h, c, k, with_logprobs=step % 2 == 0)
            b = graph.run(before, tokens, h_before, c_before, k, with_logprobs=step % 2 == 0)
            assert np.array_equal(a.top_ids, b.top_ids)
            assert np.abs(a.top_logprobs - b.top_logprobs).max() <= 1e-5
            assert a.logprobs.shape == b.logprobs.shape and np.abs(a.logprobs - b.logprobs).max(initial=0) <= 1e-5
            assert np.array_equal(a.h, b.h) and np.array_equal(a.c, b.c)
            h, c, h_before, c_before = a.h, a.c, b.h, b.c


def test_reexport_rewrites_a_model_folder_from_its_own_weights(former_graph: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pd-english" / "1"
    shutil.copytree(BUNDLED, folder)
    shutil.copyfile(former_graph, folder / ONNX_FILE)
    card = json.loads((folder / "model.json").read_text())
    card["sha256"] = FORMER_SHA256
    (folder / "model.json").write_text(json.dumps(card))
    assert export_main(["reexport", str(folder)]) == 0
    new_card, _ = read_model_dir(folder)  # the card's checksum is the new graph's
    assert (folder / ONNX_FILE).read_bytes() == (BUNDLED / ONNX_FILE).read_bytes(), "the export is deterministic"
    assert new_card.verification["max_abs_difference"]["parity_real"] <= 1e-4
    assert new_card.perplexity == card["perplexity"] and new_card.training == card["training"]
    assert sorted(p.name for p in folder.parent.iterdir()) == ["1"], "nothing left beside it"


def test_reexport_refuses_a_graph_of_another_model(tmp_path: Path) -> None:
    node = helper.make_node("Identity", ["x"], ["y"])
    x, y = (helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in "xy")
    onnx.save(helper.make_model(helper.make_graph([node], "other", [x], [y])), tmp_path / ONNX_FILE)
    with pytest.raises(ReexportError, match="not an export of lstmd's LSTMLanguageModel"):
        model_from_onnx(tmp_path / ONNX_FILE)


def test_the_benchmarks_iobinding_step_equals_graph_run() -> None:
    """bench/runtime.py's IOBinding path computes what graph.run does, bit for bit, over carried steps."""
    session = graph.load(BUNDLED / ONNX_FILE, 1, False)
    bound = BoundStep(session)
    for batch in (1, 8, 64, 256):
        rng = np.random.default_rng(batch)
        h = c = np.zeros((2, batch, 256), np.float32)
        h_bound, c_bound = h, c
        for k in (1, 5, 1, 100):
            tokens = rng.integers(0, 10_000, (batch, 1))
            a, b = graph.run(session, tokens, h, c, k, with_logprobs=False), bound(tokens, h_bound, c_bound, k)
            for name in ("top_logprobs", "top_ids", "h", "c"):
                x, y = getattr(a, name), getattr(b, name)
                assert x.dtype == y.dtype and np.array_equal(x, y), (batch, k, name)
            h, c, h_bound, c_bound = a.h, a.c, b.h, b.c  # the bound step's outputs fed straight back


def test_bench_runtime_runs_end_to_end(former_graph: Path, tmp_path: Path) -> None:
    """The whole sweep, CI-sized, on the former graph: the graph without If checks out as the same."""
    done = subprocess.run([sys.executable, "-m", "bench.runtime", "--seconds", "0.02", "--batches", "1,8",
                           "--model", str(former_graph), "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert not results["errors"]
    for batch in ("1", "8"):
        checks = results["checks"][batch]
        assert all(check["same"] for check in checks.values())
        assert set(results["steps"][batch]) == set(checks)
    assert "| server now: graph without If, no memory pattern |" in done.stdout
