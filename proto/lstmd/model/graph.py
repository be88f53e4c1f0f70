"""The graph contract of ``model.onnx``, and the one function that runs it.

Inputs: ``tokens`` (batch, time) int64, ``h0`` / ``c0`` (layers, batch, hidden) float32 and
``top_k`` () int64. Outputs: ``logprobs`` (batch, vocab): log-softmax after the last step,
``top_logprobs`` / ``top_ids`` (batch, top_k): its ``top_k`` best entries, most likely first,
and ``h1`` / ``c1``: the state after the last step. Batch and time are dynamic.

The server, export's verification and the benchmarks all run a graph through ``run``, so a
model is checked exactly as it is served. Needs numpy and onnxruntime (never torch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from lstmd.model.folder import ModelCard, ModelFormatError

INPUTS = ("tokens", "h0", "c0", "top_k")
OUTPUTS = ("logprobs", "top_logprobs", "top_ids", "h1", "c1")
OPTIMIZATION = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


@dataclass
class Outputs:
    logprobs: np.ndarray  # (batch, vocab); (batch, 0) when not asked for
    top_logprobs: np.ndarray  # (batch, k)
    top_ids: np.ndarray  # (batch, k)
    h: np.ndarray  # (layers, batch, hidden)
    c: np.ndarray  # (layers, batch, hidden)


def load(
    path: str | Path,
    threads: int = 0,
    spinning: bool = True,
    optimization: str = "all",
    providers: Sequence[str] = ("cpu",),
    memory_pattern: bool = False,
) -> ort.InferenceSession:
    """An ONNX Runtime session for ``path``: ``threads`` intra-op threads (0: one per core),
    spinning or not while idle, an optimization level of ``OPTIMIZATION`` and providers of
    ``PROVIDERS``. Raises ValueError for a provider this onnxruntime lacks.

    ONNX Runtime's memory pattern (one pre-planned block for a run's intermediate tensors) is off
    by default: batch size and prompt length change from call to call here, and with it on a
    step of the bundled model took up to 1.24 times as long at batch 64 and 256 (docs/runtime.md)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.enable_mem_pattern = memory_pattern
    options.graph_optimization_level = OPTIMIZATION[optimization]
    wanted = [PROVIDERS[p] for p in providers]
    available = ort.get_available_providers()
    missing = sorted(set(wanted) - set(available))
    if missing:
        raise ValueError(f"execution provider(s) {', '.join(missing)} asked for, but this onnxruntime has only "
                         f"{', '.join(available)}")  # fmt: skip
    return ort.InferenceSession(str(path), options, providers=wanted)


def run(
    session: ort.InferenceSession, tokens: np.ndarray, h: np.ndarray, c: np.ndarray, k: int, with_logprobs: bool = True
) -> Outputs:
    """One ONNX Runtime call: ``tokens`` (batch, time), ``h``/``c`` (layers, batch, hidden). Blocking.

    Without ``with_logprobs`` the (batch, vocab) log-probabilities are not copied out (the graph
    still computes them for top-k); ``Outputs.logprobs`` is then empty."""
    feeds = {"tokens": tokens, "h0": h, "c0": c, "top_k": np.array(k, np.int64)}
    names = list(OUTPUTS if with_logprobs else OUTPUTS[1:])
    values = dict(zip(names, session.run(names, feeds), strict=True))
    logprobs = values.get("logprobs", np.empty((tokens.shape[0], 0), np.float32))
    return Outputs(logprobs, values["top_logprobs"], values["top_ids"], values["h1"], values["c1"])


def shapes(args: list[Any]) -> dict[str, list[int | None]]:
    """ONNX Runtime's inputs or outputs as names to shapes, with None for dynamic dimensions."""
    return {a.name: [d if isinstance(d, int) else None for d in a.shape] for a in args}


def check(session: ort.InferenceSession, card: ModelCard) -> None:
    """Check a loaded graph against the contract and the card. Raises ModelFormatError."""
    check_shapes(shapes(session.get_inputs()), shapes(session.get_outputs()), card)


def check_shapes(inputs: dict[str, list[Any]], outputs: dict[str, list[Any]], card: ModelCard) -> None:
    """Check input and output names and fixed dimensions against the card. ``inputs`` / ``outputs``
    map names to shapes: ints for fixed dimensions, strings or None for dynamic ones."""
    for kind, expected, actual in (("inputs", INPUTS, inputs), ("outputs", OUTPUTS, outputs)):
        if sorted(actual) != sorted(expected):
            raise ModelFormatError(f"model.onnx {kind} are {sorted(actual)}, expected {sorted(expected)}")
    state = [card.num_layers, None, card.hidden_size]
    expected_shapes = {"h0": state, "c0": state, "h1": state, "c1": state, "logprobs": [None, card.vocab_size]}
    all_shapes = {**inputs, **outputs}
    for name, want in expected_shapes.items():
        got = all_shapes[name]
        fixed_ok = len(got) == len(want) and all(w is None or g == w for g, w in zip(got, want, strict=True))
        if not fixed_ok:
            raise ModelFormatError(f"model.onnx {name} has shape {got}, the card implies {want} (None: any)")
