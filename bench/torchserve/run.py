"""The TorchServe peer of the benchmark: the same model and load as lstmd gets, served by TorchServe 0.12.

    bash bench/torchserve/setup.sh        # once: .venv-torchserve with TorchServe 0.12
    npm ci --prefix bench/loadgen         # once: the load generator's packages
    python -m bench.torchserve.run --streams 1,8,64,256 [--duration 8] [--json]

Builds the archive (bench/torchserve/build.py), starts TorchServe with sequence batching on
loopback ports, waits for the model, checks its replies against ONNX Runtime, warms up, then for
each concurrency runs the benchmark's load generator (bench/loadgen, ``--mode torchserve``): N
bidirectional ``StreamPredictions2`` streams, each its own sequence id, each sending a message of
one random token id and awaiting its reply before the next (the closed loop lstmd gets), for
``--warmup`` then ``--duration`` seconds. Reports the generator's fields plus TorchServe's CPU
seconds per 1k tokens over the measured window (frontend JVM and workers, from psutil) and its
RSS, then stops TorchServe. inference.proto comes from TorchServe's frontend jar at run time (the
check's Python stubs are generated from it). Logs: runs/torchserve/logs/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
import zipfile
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
from grpc_tools import protoc  # type: ignore[import-untyped]

from bench._process import loadgen
from bench.torchserve.build import MODEL_DIR, MODEL_NAME, ROOT, TS_VENV, WORK_DIR, ServeConfig, build, config_properties

VOCAB: int = json.loads((ROOT / MODEL_DIR / "model.json").read_text())["vocab_size"]


def free_ports(names: list[str]) -> dict[str, int]:
    """Distinct free loopback ports (held open together so none repeats)."""
    socks = [socket.socket() for _ in names]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = {n: s.getsockname()[1] for n, s in zip(names, socks, strict=True)}
    for s in socks:
        s.close()
    return ports


def load_stubs(stubs: Path) -> tuple[Any, Any]:
    """inference_pb2 and inference_pb2_grpc, generated from the protos in TorchServe's frontend jar."""
    jars = list((ROOT / TS_VENV).glob("lib/python*/site-packages/ts/frontend/model-server.jar"))
    if not jars:
        raise SystemExit("TorchServe's frontend jar is missing: run bash bench/torchserve/setup.sh")
    with zipfile.ZipFile(jars[0]) as jar:
        for name in ("proto/inference.proto", "google/rpc/status.proto"):
            out = stubs / name.removeprefix("proto/")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(jar.read(name))
    include = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{stubs}", f"-I{include}", f"--python_out={stubs}", f"--grpc_python_out={stubs}"]
    if protoc.main([*args, "inference.proto", "google/rpc/status.proto"]) != 0:
        raise SystemExit("protoc failed on TorchServe's inference.proto")
    sys.path.insert(0, str(stubs))
    return importlib.import_module("inference_pb2"), importlib.import_module("inference_pb2_grpc")


class TorchServe:
    """A TorchServe process tree started in the foreground, with its config and logs in runs/torchserve/."""

    def __init__(self, cfg: ServeConfig, quiet_logs: bool = True) -> None:
        self.work = ROOT / WORK_DIR
        self.logs = self.work / "logs"
        self.cfg = cfg
        self.quiet_logs = quiet_logs
        self.ports = free_ports(["http", "management", "metrics", "grpc", "grpc_management"])
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, tmp: Path, timeout: float = 180.0) -> None:
        """Start TorchServe and wait for its model. ``tmp`` becomes its temp dir: it keeps a pid file
        there that refuses a second TorchServe, and its workers' sockets (keep the path short)."""
        store = build(self.cfg)
        config = self.work / "config.properties"
        config.write_text(config_properties(self.work, self.ports))
        shutil.rmtree(self.logs, ignore_errors=True)
        self.logs.mkdir(parents=True)
        env = {**os.environ, "LOG_LOCATION": str(self.logs), "METRICS_LOCATION": str(self.logs),
               "TMPDIR": str(tmp), "TEMP": str(tmp)}  # fmt: skip
        cmd = [str(ROOT / TS_VENV / "bin" / "torchserve"), "--start", "--foreground", "--ncs",
               "--disable-token-auth", "--ts-config", str(config), "--model-store", str(store),
               "--models", f"{MODEL_NAME}={MODEL_NAME}.mar"]  # fmt: skip
        if self.quiet_logs:
            cmd += ["--log-config", str(self.work / "log4j2-quiet.xml")]
        with open(self.logs / "torchserve.out", "wb") as out:
            self.proc = subprocess.Popen(cmd, cwd=self.work, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.fail(f"TorchServe exited with status {self.proc.returncode}")
            if self.ready():
                return
            time.sleep(0.5)
        self.fail(f"TorchServe's model was not ready after {timeout:.0f} s")

    def ready(self) -> bool:
        """Whether all the model's workers are up (TorchServe's /ping says Healthy before they are)."""
        try:
            url = f"http://127.0.0.1:{self.ports['management']}/models/{MODEL_NAME}"
            with urllib.request.urlopen(url, timeout=2) as r:
                workers = json.loads(r.read())[0]["workers"]
        except (OSError, ValueError, LookupError):
            return False
        return len(workers) == self.cfg.workers and all(w["status"] == "READY" for w in workers)

    def fail(self, why: str) -> None:
        tail = ""
        for name in ("torchserve.out", "ts_log.log", "model_log.log"):
            path = self.logs / name
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()[-15:]
                tail += f"\n--- {path.relative_to(ROOT)} (last lines)\n" + "\n".join(lines)
        self.stop()
        raise SystemExit(f"{why}; logs in {self.logs.relative_to(ROOT)}/{tail}")

    def processes(self) -> list[psutil.Process]:
        """The frontend JVM and its Python workers (the launcher that waits on them is left out)."""
        if self.proc is None:
            return []
        try:
            children: list[psutil.Process] = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        return children

    def usage(self) -> dict[str, float]:
        """CPU seconds (user + system) of the frontend JVM and of the workers, and their RSS in MiB."""
        use = {"frontend_cpu_s": 0.0, "workers_cpu_s": 0.0, "rss_mib": 0.0}
        for p in self.processes():
            try:
                t = p.cpu_times()
                use["frontend_cpu_s" if p.name() == "java" else "workers_cpu_s"] += t.user + t.system
                use["rss_mib"] += p.memory_info().rss / 2**20
            except psutil.NoSuchProcess:
                pass
        return use

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        children = self.processes()
        for p in children:  # as torchserve --stop: SIGTERM to the JVM, which stops its workers; the launcher
            with contextlib.suppress(psutil.NoSuchProcess):  # then exits (it passes no SIGTERM on itself)
                if p.name() == "java":
                    p.terminate()
        _, alive = psutil.wait_procs(children, timeout=30)
        for p in alive:
            p.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def step(call: Any, pb: Any, sequence: str, token: int) -> dict[str, Any] | str:
    """Send one token on the stream and await the reply: {"id": next word id, "p": its probability},
    or what went wrong."""
    await call.write(pb.PredictionsRequest(model_name=MODEL_NAME, sequence_id=sequence, input={"data": b"%d" % token}))
    reply = await call.read()
    if reply is grpc.aio.EOF:
        return "EOF"
    if reply.HasField("status") and reply.status.code != 0:
        return f"status {reply.status.code}"
    prediction: dict[str, Any] = json.loads(reply.prediction)
    return prediction


async def close(call: Any) -> None:
    await call.done_writing()
    while await call.read() is not grpc.aio.EOF:
        pass


def expected_replies(sequences: list[list[int]]) -> list[list[tuple[int, float]]]:
    """Top-1 (id, probability) after each token of each sequence, from the bundled ONNX model in
    ONNX Runtime, one sequence at a time."""
    import onnxruntime as ort

    card = json.loads((ROOT / MODEL_DIR / "model.json").read_text())
    session = ort.InferenceSession(str(ROOT / MODEL_DIR / "model.onnx"), providers=["CPUExecutionProvider"])
    replies: list[list[tuple[int, float]]] = []
    for tokens in sequences:
        h = c = np.zeros((card["num_layers"], 1, card["hidden_size"]), dtype=np.float32)
        replies.append([])
        for token in tokens:
            feeds = {"tokens": np.array([[token]]), "h0": h, "c0": c, "top_k": np.array(1, dtype=np.int64)}
            _, top_logprobs, top_ids, h, c = session.run(None, feeds)
            replies[-1].append((int(top_ids[0, 0]), float(np.exp(top_logprobs[0, 0]))))
    return replies


async def verify(server: TorchServe, stubs: tuple[Any, Any], streams: int = 8, steps: int = 12) -> float:
    """Check that TorchServe keeps each sequence's (h, c) apart while it batches them: concurrent
    sequences must get the replies of each sequence run alone in ONNX Runtime. Returns the largest
    difference of a probability; raises if a predicted word differs."""
    pb, pb_grpc = stubs
    sequences = np.random.default_rng(12345).integers(2, VOCAB, size=(streams, steps)).tolist()

    async def one(stub: Any, tokens: list[int]) -> list[tuple[int, float]]:
        sequence, call, got = f"verify-{uuid.uuid4().hex}", stub.StreamPredictions2(), []
        for token in tokens:
            reply = await step(call, pb, sequence, token)
            if isinstance(reply, str):
                raise RuntimeError(f"verification request failed: {reply}")
            got.append((int(reply["id"]), float(reply["p"])))
        await close(call)
        return got

    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.ports['grpc']}") as channel:
        stub = pb_grpc.InferenceAPIsServiceStub(channel)
        served = await asyncio.gather(*(one(stub, tokens) for tokens in sequences))
    diff = 0.0
    for got, want in zip(served, expected_replies(sequences), strict=True):
        if [i for i, _ in got] != [i for i, _ in want]:
            raise RuntimeError(f"TorchServe's predictions differ from ONNX Runtime's: {got} != {want}")
        diff = max(diff, *(abs(p - q) for (_, p), (_, q) in zip(got, want, strict=True)))
    return diff


def load(server: TorchServe, proto_dir: Path, args: argparse.Namespace, streams: int, seed: int) -> dict[str, Any]:
    """One concurrency level from bench/loadgen: its report plus TorchServe's CPU over the measured
    window (frontend JVM and workers) and its RSS."""
    usage: dict[str, dict[str, float]] = {}

    def window(edge: str) -> None:
        usage[edge] = server.usage()

    flags = ["--mode", "torchserve", "--proto-dir", str(proto_dir), "--model-name", MODEL_NAME, "--vocab", str(VOCAB),
             "--streams", str(streams), "--duration", str(args.duration), "--warmup", str(args.warmup),
             "--seed", str(seed)]  # fmt: skip
    report = loadgen(f"127.0.0.1:{server.ports['grpc']}", flags, window)
    before, after = usage["measuring"], usage["stopped"]
    server_cpu = {k: after[k] - before[k] for k in ("frontend_cpu_s", "workers_cpu_s")}
    return {
        **report,
        "server_cpu_s": sum(server_cpu.values()),
        "server_cpu_s_per_1k_tokens": 1000 * sum(server_cpu.values()) / max(report["tokens"], 1),
        "server_cpu_split_s": {k: round(v, 3) for k, v in server_cpu.items()},
        "server_rss_mib": after["rss_mib"],
    }


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    cfg = ServeConfig(args.batch_size, args.max_batch_delay_ms, args.workers, args.threads,
                      sequence_max_idle_ms=args.sequence_idle_ms)  # fmt: skip
    levels = [int(n) for n in args.streams.split(",")]
    if max(levels) > cfg.batch_size:
        # TorchServe polls each open sequence on its own thread, from a pool of batchSize + 1.
        print(f"warning: {max(levels)} streams > batch size {cfg.batch_size}: sequences will wait", file=sys.stderr)
    server = TorchServe(cfg, quiet_logs=not args.default_logs)
    results = []
    with tempfile.TemporaryDirectory(prefix="ts-") as tmp:
        proto_dir = Path(tmp) / "stubs"
        stubs = load_stubs(proto_dir)
        (Path(tmp) / "serve").mkdir()
        server.start(Path(tmp) / "serve")
        try:
            try:
                diff = asyncio.run(verify(server, stubs))
            except RuntimeError as e:
                server.fail(str(e))
            print(f"TorchServe's replies match ONNX Runtime's (max probability difference {diff:.1e})", file=sys.stderr)
            if args.warmup_seconds:  # the JVM compiles its hot paths in the first seconds of load
                warm_up = argparse.Namespace(**{**vars(args), "duration": args.warmup_seconds, "warmup": 0})
                load(server, proto_dir, warm_up, 8, 10**3)
            for i, streams in enumerate(levels):
                if i or args.warmup_seconds:  # TorchServe keeps a polling thread on each finished sequence
                    time.sleep(cfg.sequence_max_idle_ms / 1000 + 1)  # until it has been idle sequenceMaxIdleMSec
                result = load(server, proto_dir, args, streams, args.seed * 100 + i)
                result["torchserve"] = {**cfg.__dict__, "threads": cfg.torch_threads()}
                results.append(result)
                if not args.json:
                    print(format_row(result), file=sys.stderr, flush=True)
        finally:
            server.stop()
    return results


def format_row(r: dict[str, Any]) -> str:
    lat = r["latency_ms"]
    errors = ",".join(f"{c}:{n}" for c, n in r["errors"].items()) or "-"
    jvm, py = (1000 * r["server_cpu_split_s"][k] / max(r["tokens"], 1) for k in ("frontend_cpu_s", "workers_cpu_s"))
    split = f"{f'{jvm:.2f}+{py:.2f}':>11}"
    return (f"{r['streams']:>7} {r['tokens_per_s']:>9,.0f} {lat['p50']:>8.2f} {lat['p90']:>8.2f} {lat['p99']:>8.2f} "
            f"{lat['max']:>8.2f} {r['server_cpu_s_per_1k_tokens']:>8.3f} {split} {r['server_rss_mib']:>7.0f} "
            f"{r['client_cpu_cores']:>6.2f} {errors}")  # fmt: skip


HEADER = (f"{'streams':>7} {'tokens/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} {'cpu s/1k':>8} "
          f"{'(jvm+py)':>11} {'RSS MiB':>7} {'client':>6} errors")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", default="1,8,64,256", help="comma-separated concurrencies")
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds per level")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds of each level's load before it")
    p.add_argument("--warmup-seconds", type=float, default=3.0, help="8 streams of unmeasured load after start-up")
    p.add_argument("--seed", type=int, default=0, help="seed of the random token ids")
    p.add_argument("--batch-size", type=int, default=ServeConfig.batch_size, help="TorchServe batchSize")
    p.add_argument("--max-batch-delay-ms", type=int, default=ServeConfig.max_batch_delay_ms, help="maxBatchDelay")
    p.add_argument("--workers", type=int, default=ServeConfig.workers, help="TorchServe Python workers")
    p.add_argument("--threads", type=int, default=ServeConfig.threads, help="torch threads a worker (0: cores/workers)")
    p.add_argument("--sequence-idle-ms", type=int, default=ServeConfig.sequence_max_idle_ms,
                   help="sequenceMaxIdleMSec")  # fmt: skip
    p.add_argument("--default-logs", action="store_true", help="TorchServe's own logging (DEBUG, per request)")
    p.add_argument("--json", action="store_true", help="print the results as a JSON list")
    args = p.parse_args()
    if not args.json:
        print(HEADER, file=sys.stderr)
    results = run(args)
    if args.json:
        print(json.dumps(results))
    else:
        print(HEADER)
        for r in results:
            print(format_row(r))


if __name__ == "__main__":
    main()
