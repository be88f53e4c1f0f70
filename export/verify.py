"""Check an exported model against PyTorch, and measure it in ONNX Runtime.

- parity: ONNX Runtime and PyTorch agree on log-probabilities and state, on random tokens with
  a random state and on real text, within ``tolerance`` (max absolute difference);
- streaming equivalence: feeding a sequence one token at a time, carrying (h, c), gives the
  same result as feeding it whole, in PyTorch and in ONNX Runtime;
- batch independence: a sequence gives the same result alone and inside a batch of others,
  which the server relies on when it batches sessions together.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from lstmd.export.errors import ExportError
from lstmd.export.onnx_export import state_shape
from lstmd.model import graph
from lstmd.model.folder import ONNX_FILE
from lstmd.model.graph import Outputs


class VerificationError(ExportError):
    """ONNX Runtime and PyTorch disagree; the message names the check."""


@torch.no_grad()
def run_torch(lm: nn.Module, tokens: np.ndarray, h: np.ndarray, c: np.ndarray) -> Outputs:
    logits, (h1, c1) = lm(torch.from_numpy(tokens), (torch.from_numpy(h), torch.from_numpy(c)))
    none = np.empty((tokens.shape[0], 0))
    return Outputs(torch.log_softmax(logits[:, -1], -1).numpy(), none, none, h1.numpy(), c1.numpy())


def run_stepwise(run: Any, tokens: np.ndarray, h: np.ndarray, c: np.ndarray) -> Outputs:
    """Feed ``tokens`` one step at a time, carrying the state."""
    for t in range(tokens.shape[1]):
        out: Outputs = run(tokens[:, t : t + 1], h, c)
        h, c = out.h, out.c
    return out


def max_diff(a: Outputs, b: Outputs) -> float:
    return max(float(np.abs(x - y).max()) for x, y in ((a.logprobs, b.logprobs), (a.h, b.h), (a.c, b.c)))


def verify(
    lm: nn.Module, model_dir: Path, vocab_size: int, real_ids: list[int] | None = None, tolerance: float = 1e-4
) -> dict[str, float]:
    """Run every check; raise VerificationError naming the first that fails. Returns the differences."""
    lm = lm.eval()
    session = graph.load(model_dir / ONNX_FILE)
    layers, hidden = state_shape(lm)
    rng = np.random.default_rng(0)

    def state(batch: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
        shape = (layers, batch, hidden)
        return (rng.standard_normal(shape) * scale).astype(np.float32), (rng.standard_normal(shape) * scale).astype(
            np.float32
        )

    random_tokens = rng.integers(0, vocab_size, size=(3, 17), dtype=np.int64)
    h, c = state(3, 0.5)
    real = np.array((real_ids or [])[:64] or rng.integers(0, vocab_size, 64).tolist(), dtype=np.int64)[None, :]
    h0, c0 = state(1, 0.0)

    def ort_run(t: np.ndarray, hh: np.ndarray, cc: np.ndarray) -> Outputs:
        return graph.run(session, t, hh, cc, 5)

    def torch_run(t: np.ndarray, hh: np.ndarray, cc: np.ndarray) -> Outputs:
        return run_torch(lm, t, hh, cc)

    whole_ort = ort_run(random_tokens, h, c)
    report = {
        "parity_random": max_diff(whole_ort, torch_run(random_tokens, h, c)),
        "parity_real": max_diff(ort_run(real, h0, c0), torch_run(real, h0, c0)),
        "streaming_onnx": max_diff(run_stepwise(ort_run, random_tokens, h, c), whole_ort),
        "streaming_torch": max_diff(run_stepwise(torch_run, random_tokens, h, c), torch_run(random_tokens, h, c)),
        "batch_independence": max(
            max_diff(
                ort_run(random_tokens[i : i + 1], h[:, i : i + 1], c[:, i : i + 1]),
                Outputs(
                    whole_ort.logprobs[i : i + 1],
                    whole_ort.top_logprobs[i : i + 1],
                    whole_ort.top_ids[i : i + 1],
                    whole_ort.h[:, i : i + 1],
                    whole_ort.c[:, i : i + 1],
                ),
            )
            for i in range(3)
        ),
    }
    top = whole_ort.top_ids
    expected_top = np.argsort(-whole_ort.logprobs, axis=1, kind="stable")[:, : top.shape[1]]
    if not np.array_equal(np.sort(top, 1), np.sort(expected_top, 1)):
        raise VerificationError("top_ids are not the most likely words of logprobs")
    failed = {k: v for k, v in report.items() if not v <= tolerance}
    if failed:
        raise VerificationError(f"differences above {tolerance}: {failed}")
    return report


def ort_perplexity(session: ort.InferenceSession, ids: list[int], layers: int, hidden: int, streams: int = 64) -> float:
    """Perplexity of ``ids`` under an ONNX model, stepping ``streams`` parallel streams token by token,
    as the server does."""
    steps = len(ids) // streams
    data = np.array(ids[: steps * streams], dtype=np.int64).reshape(streams, steps)
    h = np.zeros((layers, streams, hidden), np.float32)
    c = h.copy()
    total = 0.0
    for t in range(steps - 1):
        out = graph.run(session, data[:, t : t + 1], h, c, 1)
        h, c = out.h, out.c
        total -= float(out.logprobs[np.arange(streams), data[:, t + 1]].sum())
    return math.exp(total / (streams * (steps - 1)))


def ort_speed(session: ort.InferenceSession, layers: int, hidden: int, batch: int, repeats: int = 50) -> float:
    """Median milliseconds of one single-token step of ``batch`` sessions."""
    tokens = np.ones((batch, 1), np.int64)
    h = np.zeros((layers, batch, hidden), np.float32)
    times = []
    for _ in range(repeats + 5):
        started = time.perf_counter()
        graph.run(session, tokens, h, h, 5)
        times.append(time.perf_counter() - started)
    return float(np.median(times[5:]) * 1000)
