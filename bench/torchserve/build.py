"""Builds the TorchServe peer of the benchmark: weights, model archive (.mar) and config.properties.

    python -m bench.torchserve.build [--batch-size 256] [--max-batch-delay-ms 2] [--workers 1]

Runs in the project's venv (it needs onnx and onnxruntime; the TorchServe worker needs neither):
rebuilds ``export.model.LSTMLanguageModel`` from the bundled model's ONNX initializers, checks that
it reproduces the ONNX model (printing the max abs difference of the log-probabilities), saves its
state dict, then archives it with bench/torchserve/handler.py using the archiver of
``.venv-torchserve`` (bench/torchserve/setup.sh). Everything goes to ``runs/torchserve/``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lstmd.export.model import LSTMLanguageModel, ModelConfig

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = Path("server/models/pd-english/1")
WORK_DIR = Path("runs/torchserve")
TS_VENV = Path(".venv-torchserve")
MODEL_NAME = "lstm"


@dataclass
class ServeConfig:
    """What TorchServe is tuned with; the sequence-batching settings live in the archive's model-config.yaml."""

    batch_size: int = 256  # most sequences whose steps go into one forward
    max_batch_delay_ms: int = 2  # how long the aggregator waits to fill a batch
    workers: int = 1  # Python worker processes
    threads: int = 1  # torch intra-op threads per worker (0: cores / workers); 2 was far worse here
    max_num_sequence: int = 1024  # open sequences TorchServe accepts at once
    sequence_max_idle_ms: int = 3000  # a sequence with no request for this long is dropped
    sequence_job_queue: int = 4  # requests queued per sequence

    def torch_threads(self) -> int:
        return self.threads or max(1, (os.cpu_count() or 1) // self.workers)


def load_from_onnx(onnx_path: Path) -> LSTMLanguageModel:
    """The PyTorch model with the ONNX file's weights (its initializers are the exporter's state dict
    under ``lm.``; the tied decoder weight is the embedding)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    state = {i.name.removeprefix("lm."): torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer}
    vocab, embed = state["embedding.weight"].shape
    hidden = state["lstm.weight_hh_l0"].shape[1]
    layers = sum(1 for k in state if k.startswith("lstm.weight_hh_l"))
    lm = LSTMLanguageModel(ModelConfig(vocab_size=vocab, embed_size=embed, hidden_size=hidden, num_layers=layers))
    missing, unexpected = lm.load_state_dict(state, strict=False)
    if missing != ["decoder.weight"] or unexpected:
        raise ValueError(f"{onnx_path}: unexpected weights (missing {missing}, unexpected {unexpected})")
    return lm.eval()


def parity(lm: LSTMLanguageModel, onnx_path: Path, batch: int = 8, steps: int = 5, seed: int = 0) -> float:
    """Max abs difference of the last step's log-probabilities and of (h, c), PyTorch against ONNX
    Runtime, on random tokens and a random start state."""
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    cfg = lm.config
    tokens = rng.integers(2, cfg.vocab_size, size=(batch, steps))
    h0, c0 = (rng.standard_normal((cfg.num_layers, batch, cfg.hidden_size)).astype(np.float32) * 0.5 for _ in "hc")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feeds = {"tokens": tokens, "h0": h0, "c0": c0, "top_k": np.array(1, dtype=np.int64)}
    logprobs, _, _, h1, c1 = session.run(None, feeds)
    with torch.inference_mode():
        logits, (th, tc) = lm(torch.from_numpy(tokens), (torch.from_numpy(h0), torch.from_numpy(c0)))
        tlogprobs = torch.log_softmax(logits[:, -1], dim=-1)
    return max(float(np.abs(a - b.numpy()).max()) for a, b in ((logprobs, tlogprobs), (h1, th), (c1, tc)))


def model_config_yaml(cfg: ServeConfig) -> str:
    """The archive's model-config.yaml: TorchServe's sequence batching (stateful inference)."""
    return "\n".join([
        f"minWorkers: {cfg.workers}",
        f"maxWorkers: {cfg.workers}",
        f"batchSize: {cfg.batch_size}",
        f"maxBatchDelay: {cfg.max_batch_delay_ms}",
        "sequenceBatching: true",
        f"maxNumSequence: {cfg.max_num_sequence}",
        f"sequenceMaxIdleMSec: {cfg.sequence_max_idle_ms}",
        f"maxSequenceJobQueueSize: {cfg.sequence_job_queue}",
        "responseTimeout: 120",
        "handler:",
        f"  threads: {cfg.torch_threads()}",
        f"  capacity: {cfg.max_num_sequence}",
        "",
    ])  # fmt: skip


def config_properties(work: Path, ports: dict[str, int]) -> str:
    """TorchServe's config.properties: loopback only, no token auth, the model loaded at start."""
    return "\n".join([
        f"inference_address=http://127.0.0.1:{ports['http']}",
        f"management_address=http://127.0.0.1:{ports['management']}",
        f"metrics_address=http://127.0.0.1:{ports['metrics']}",
        "grpc_inference_address=127.0.0.1",
        f"grpc_inference_port={ports['grpc']}",
        "grpc_management_address=127.0.0.1",
        f"grpc_management_port={ports['grpc_management']}",
        "disable_token_authorization=true",
        "enable_model_api=false",
        f"model_store={(work / 'model-store').resolve()}",
        f"load_models={MODEL_NAME}.mar",
        "job_queue_size=4096",
        "async_logging=true",
        "disable_system_metrics=true",
        "",
    ])  # fmt: skip


QUIET_LOG4J2 = """<?xml version="1.0" encoding="UTF-8"?>
<!-- TorchServe's logging for the benchmark: warnings and errors only. Its default logs several
     DEBUG/INFO lines per request (to a file and to stdout), which costs the frontend CPU. -->
<Configuration>
  <Appenders>
    <File name="ts_log" fileName="${env:LOG_LOCATION:-logs}/ts_log.log">
      <PatternLayout pattern="%d{ISO8601} [%-5p] %t %c - %m%n"/>
    </File>
    <File name="model_log" fileName="${env:LOG_LOCATION:-logs}/model_log.log">
      <PatternLayout pattern="%d{ISO8601} [%-5p] %t %c - %m%n"/>
    </File>
  </Appenders>
  <Loggers>
    <Logger name="ACCESS_LOG" level="off"/>
    <Logger name="TS_METRICS" level="off"/>
    <Logger name="MODEL_METRICS" level="off"/>
    <Logger name="io.netty" level="error"/>
    <Logger name="org.apache" level="off"/>
    <Logger name="MODEL_LOG" level="warn" additivity="false">
      <AppenderRef ref="model_log"/>
    </Logger>
    <Root level="warn">
      <AppenderRef ref="ts_log"/>
    </Root>
  </Loggers>
</Configuration>
"""


def build(cfg: ServeConfig, work: Path = WORK_DIR, check: bool = True) -> Path:
    """Write the weights, model-config.yaml and the .mar under ``work``; return the model store."""
    work = (ROOT / work).resolve()
    archiver = ROOT / TS_VENV / "bin" / "torch-model-archiver"
    if not archiver.exists():
        raise SystemExit(f"{archiver.relative_to(ROOT)} is missing: run bash bench/torchserve/setup.sh")
    onnx_path = ROOT / MODEL_DIR / "model.onnx"
    lm = load_from_onnx(onnx_path)
    if check:
        diff = parity(lm, onnx_path)
        print(f"parity PyTorch vs ONNX Runtime: max abs diff {diff:.2e} (logprobs, h, c)", file=sys.stderr)
        if diff > 1e-4:
            raise SystemExit("the PyTorch model does not reproduce the ONNX model")
    src = work / "archive"
    src.mkdir(parents=True, exist_ok=True)
    torch.save({"config": lm.config.to_dict(), "state_dict": lm.state_dict()}, src / "weights.pt")
    (src / "model-config.yaml").write_text(model_config_yaml(cfg))
    store = work / "model-store"
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir(parents=True)
    here = Path(__file__).resolve().parent
    subprocess.run(
        [str(archiver), "--model-name", MODEL_NAME, "--version", "1", "--export-path", str(store),
         "--serialized-file", str(src / "weights.pt"), "--model-file", str(ROOT / "export" / "model.py"),
         "--handler", str(here / "handler.py"), "--config-file", str(src / "model-config.yaml")],
        check=True,
        stdout=sys.stderr,  # keep stdout for run.py's --json
    )  # fmt: skip
    (work / "log4j2-quiet.xml").write_text(QUIET_LOG4J2)
    (work / "serve-config.json").write_text(json.dumps(cfg.__dict__, indent=1))
    return store


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=ServeConfig.batch_size)
    p.add_argument("--max-batch-delay-ms", type=int, default=ServeConfig.max_batch_delay_ms)
    p.add_argument("--workers", type=int, default=ServeConfig.workers)
    p.add_argument("--threads", type=int, default=ServeConfig.threads, help="torch threads a worker (0: cores/workers)")
    a = p.parse_args()
    store = build(ServeConfig(a.batch_size, a.max_batch_delay_ms, a.workers, a.threads))
    ports = {"http": 8080, "management": 8081, "metrics": 8082, "grpc": 7070, "grpc_management": 7071}
    config = store.parent / "config.properties"  # TorchServe's default ports, for trying it by hand
    config.write_text(config_properties(store.parent, ports))
    print(f"model archive in {store.relative_to(ROOT)}; to serve it by hand:")
    print(f"  {TS_VENV}/bin/torchserve --start --ncs --ts-config {config.relative_to(ROOT)} --models {MODEL_NAME}.mar")


if __name__ == "__main__":
    main()
