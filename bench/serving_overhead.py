"""How close the server comes to ONNX Runtime alone, on one model.

    python bench/serving_overhead.py [--models-dir server/models] [--model NAME]

Measures, on this machine:
- in-process ONNX Runtime stepping one sequence token by token (carrying the state): median
  milliseconds per token, and 64 sequences stepped together: tokens/s;
- lstmd-server (started here on a free port) driven by ``lstmd bench``: one stream feeding
  one token at a time (median and p99 per-token latency) and 64 streams (tokens/s).
Prints a table and the raw figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.models import load_models
from server.settings import Settings
from tests.conftest import start_process


def onnxruntime_alone(models_dir: str, name: str, batch: int, steps: int) -> list[float]:
    """Seconds per step of ``batch`` sequences, state carried from step to step."""
    model = load_models(Settings(models_dir=models_dir)).get(name)
    state = model.zero_state(batch)
    h, c = state[0], state[1]
    rng = np.random.default_rng(0)
    times = []
    for _ in range(steps):
        tokens = rng.integers(2, model.vocab_size, size=(batch, 1))
        started = time.perf_counter()
        out = model.run(tokens, h, c, 5)
        times.append(time.perf_counter() - started)
        h, c = out.h, out.c
    return times[10:]


def lstmd_bench(target: str, streams: int, tokens: int) -> dict[str, object]:
    command = [sys.executable, "-m", "client", "bench", "--target", target, "--streams", str(streams), "--tokens",
               str(tokens), "--json", "--quiet"]  # fmt: skip
    return dict(json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", default="server/models")
    parser.add_argument("--model", default="", help="default: the server's default model")
    args = parser.parse_args()

    one = onnxruntime_alone(args.models_dir, args.model, 1, 510)
    many = onnxruntime_alone(args.models_dir, args.model, 64, 210)
    process, port = start_process(Path(args.models_dir))
    try:
        target = f"127.0.0.1:{port}"
        lstmd_bench(target, 8, 20)  # warm-up
        served_one = lstmd_bench(target, 1, 500)
        served_many = lstmd_bench(target, 64, 200)
    finally:
        process.terminate()
        process.communicate(timeout=30)
    figures = {
        "onnxruntime_1_stream_ms_per_token_median": 1000 * float(np.median(one)),
        "onnxruntime_64_streams_tokens_per_s": 64 / float(np.median(many)),
        "lstmd_1_stream_ms_per_token": served_one["latency_ms"],
        "lstmd_64_streams_tokens_per_s": served_many["tokens_per_s"],
        "lstmd_64_streams_ms_per_token": served_many["latency_ms"],
        "lstmd_bench_client_cpu_percent": served_many["client_cpu_percent"],
    }
    ort1, lst1 = figures["onnxruntime_1_stream_ms_per_token_median"], served_one["latency_ms"]["p50"]  # type: ignore[index]
    ort64, lst64 = figures["onnxruntime_64_streams_tokens_per_s"], served_many["tokens_per_s"]
    print(f"{'':34}{'ONNX Runtime alone':>20}{'lstmd-server':>16}{'ratio':>8}")
    print(f"{'1 stream, ms per token (median)':34}{ort1:>20.3f}{lst1:>16.3f}{lst1 / ort1:>8.1f}")
    print(f"{'64 streams, tokens/s':34}{ort64:>20,.0f}{lst64:>16,.0f}{lst64 / ort64:>8.2f}")  # type: ignore[operator]
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
