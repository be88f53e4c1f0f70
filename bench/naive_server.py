"""The naive baseline: the bundled model served the way a quick tutorial serves it.

    python -m bench.naive_server --port 0 [--model-dir server/models/pd-english/1]

A synchronous ``grpc.server`` on a thread pool, a plain dict of session id -> (h, c), and one
batch-1 ``onnxruntime`` call per request with that session's state: no batching across
sessions, no queue. It implements ListModels, CreateSession and Stream (token ids only), enough
for the benchmark's load generator, so lstmd-server's batching can be compared with doing without it.
"""

from __future__ import annotations

import argparse
import math
import signal
import threading
import uuid
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort

from lstmd.v1 import lstmd_pb2 as pb
from lstmd.v1 import lstmd_pb2_grpc

Context = grpc.ServicerContext


class NaiveServicer(lstmd_pb2_grpc.LstmdServicer):
    def __init__(self, model_dir: Path, threads: int):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.ort = ort.InferenceSession(str(model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])
        self.words = (model_dir / "vocab.txt").read_text(encoding="utf-8").split("\n")[:-1]
        self.layers, _, self.hidden = self.ort.get_inputs()[1].shape  # h0: (layers, batch, hidden)
        self.sessions: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}  # id -> (h, c, position)
        zero = np.zeros((self.layers, 1, self.hidden), np.float32)  # a new session starts after "<eos>"
        self.initial = self.run(np.array([[self.words.index("<eos>")]], np.int64), zero, zero, 1)[2:]

    def run(self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray, k: int) -> list[Any]:
        """[top_logprobs, top_ids, h1, c1] after ``tokens`` (1, time)."""
        feeds = {"tokens": tokens, "h0": h, "c0": c, "top_k": np.array(k, np.int64)}
        return list(self.ort.run(["top_logprobs", "top_ids", "h1", "c1"], feeds))

    def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        state_bytes = 2 * self.layers * self.hidden * 4
        info = pb.ModelInfo(name="naive", version="1", vocab_size=len(self.words), num_layers=self.layers,
                            hidden_size=self.hidden, state_bytes=state_bytes, is_default=True)  # fmt: skip
        return pb.ListModelsResponse(models=[info])

    def CreateSession(self, request: pb.CreateSessionRequest, context: Context) -> pb.Session:
        session_id = uuid.uuid4().hex
        self.sessions[session_id] = (*self.initial, 0)
        return pb.Session(session_id=session_id, model="naive", model_version="1", top_k=request.top_k or 5)

    def Stream(self, request_iterator: Iterator[pb.StreamRequest], context: Context) -> Iterator[pb.Prediction]:
        session_id, ephemeral = "", False
        try:
            for request in request_iterator:
                if not session_id:  # the first message names the session, or none for an ephemeral one
                    session_id, ephemeral = request.session_id or uuid.uuid4().hex, not request.session_id
                    if ephemeral:
                        self.sessions[session_id] = (*self.initial, 0)
                if session_id not in self.sessions:
                    context.abort(grpc.StatusCode.NOT_FOUND, f"no session {session_id}")
                ids = list(request.tokens.ids)
                if not ids or not all(0 <= i < len(self.words) for i in ids):
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "give token ids of the vocabulary")
                h, c, position = self.sessions[session_id]
                top_logprobs, top_ids, h, c = self.run(np.array([ids], np.int64), h, c, request.top_k or 5)
                self.sessions[session_id] = (h, c, position + len(ids))
                yield pb.Prediction(
                    session_id=session_id,
                    position=position + len(ids),
                    tokens=[pb.Token(id=i, word=self.words[i]) for i in ids],
                    candidates=[pb.Candidate(word=self.words[i], token_id=i, probability=math.exp(lp))
                                for i, lp in zip(top_ids[0].tolist(), top_logprobs[0].tolist(), strict=True)],
                )  # fmt: skip
        finally:
            if ephemeral:
                self.sessions.pop(session_id, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=50062, help="port on 127.0.0.1 (0 picks a free one)")
    parser.add_argument("--model-dir", type=Path, default=Path("server/models/pd-english/1"))
    parser.add_argument("--workers", type=int, default=264, help="threads: one per concurrent stream, plus a few")
    parser.add_argument("--intra-op-threads", type=int, default=1, help="ONNX Runtime threads per call (0: per core)")
    args = parser.parse_args()
    # The transport options lstmd-server uses (server/app.py), so the two are comparable.
    options = [("grpc.max_receive_message_length", 1 << 20), ("grpc.so_reuseport", 0)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.workers), options=options)
    servicer = NaiveServicer(args.model_dir, args.intra_op_threads)  # type: ignore[abstract]  # other RPCs: UNIMPLEMENTED
    lstmd_pb2_grpc.add_LstmdServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    if port == 0:
        raise OSError(f"cannot bind 127.0.0.1:{args.port}")
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    stopping.wait()
    server.stop(1.0).wait()


if __name__ == "__main__":
    main()
