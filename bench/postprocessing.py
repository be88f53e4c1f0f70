"""Where should log-softmax and top-k run: in the ONNX graph or in NumPy on the server?

    python bench/postprocessing.py [--vocab 10000] [--k 5]

Times, for batches of 1, 64 and 256 rows of ``vocab`` logits: (a) an ONNX graph doing
LogSoftmax + TopK in ONNX Runtime, (b) the same in NumPy (log-softmax, argpartition, sort of
the k best). Medians of 200 runs, in milliseconds.

Then whether ONNX Runtime skips work for outputs nobody asked for: a graph with two
independent branches, the log-softmax of every step of a 200-step prompt and the log-softmax
of its last step alone, timed when asked for both outputs and when asked only for the last
step.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper


def graph(vocab: int) -> ort.InferenceSession:
    nodes = [
        helper.make_node("LogSoftmax", ["logits"], ["logprobs"], axis=-1),
        helper.make_node("TopK", ["logprobs", "k"], ["top_logprobs", "top_ids"], axis=-1),
    ]
    model = helper.make_model(
        helper.make_graph(
            nodes,
            "postprocessing",
            [
                helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", vocab]),
                helper.make_tensor_value_info("k", TensorProto.INT64, [1]),
            ],
            [
                helper.make_tensor_value_info("logprobs", TensorProto.FLOAT, ["batch", vocab]),
                helper.make_tensor_value_info("top_logprobs", TensorProto.FLOAT, ["batch", None]),
                helper.make_tensor_value_info("top_ids", TensorProto.INT64, ["batch", None]),
            ],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    onnx.checker.check_model(model)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def per_step_graph(vocab: int) -> ort.InferenceSession:
    nodes = [  # two independent branches: every step's log-softmax, and the last step's alone
        helper.make_node("LogSoftmax", ["logits"], ["all_steps"], axis=-1),
        helper.make_node("Gather", ["logits", "last"], ["last_logits"], axis=1),
        helper.make_node("LogSoftmax", ["last_logits"], ["last_step"], axis=-1),
    ]
    last = helper.make_tensor("last", TensorProto.INT64, [], [-1])
    model = helper.make_model(
        helper.make_graph(
            nodes,
            "per_step",
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "time", vocab])],
            [
                helper.make_tensor_value_info("all_steps", TensorProto.FLOAT, [1, "time", vocab]),
                helper.make_tensor_value_info("last_step", TensorProto.FLOAT, [1, vocab]),
            ],
            initializer=[last],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def numpy_topk(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    shifted = logits - logits.max(axis=1, keepdims=True)
    logprobs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    part = np.argpartition(-logprobs, k, axis=1)[:, :k]
    values = np.take_along_axis(logprobs, part, axis=1)
    order = np.argsort(-values, axis=1)
    return np.take_along_axis(values, order, axis=1), np.take_along_axis(part, order, axis=1)


def median_ms(func: Callable[[], object], repeats: int = 200) -> float:
    func()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        func()
        times.append(time.perf_counter() - started)
    return 1000 * float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=10000)
    parser.add_argument("--k", type=int, default=5)
    args = parser.parse_args()
    session = graph(args.vocab)
    k = np.array([args.k], np.int64)
    print(f"{'batch':>6}{'ONNX Runtime ms':>18}{'NumPy ms':>12}{'NumPy / ORT':>14}")
    for batch in (1, 64, 256):
        logits = np.random.default_rng(0).standard_normal((batch, args.vocab)).astype(np.float32)
        in_graph = median_ms(functools.partial(session.run, None, {"logits": logits, "k": k}))
        in_numpy = median_ms(functools.partial(numpy_topk, logits, args.k))
        print(f"{batch:>6}{in_graph:>18.3f}{in_numpy:>12.3f}{in_numpy / in_graph:>14.1f}")
    steps = per_step_graph(args.vocab)
    logits = np.random.default_rng(0).standard_normal((1, 200, args.vocab)).astype(np.float32)
    everything = median_ms(functools.partial(steps.run, None, {"logits": logits}), repeats=50)
    last_only = median_ms(functools.partial(steps.run, ["last_step"], {"logits": logits}), repeats=50)
    print(f"200-step log-softmax: all outputs {everything:.3f} ms, only the last step asked for {last_only:.3f} ms")


if __name__ == "__main__":
    main()
