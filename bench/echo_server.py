"""The transport ceiling: what Python grpc.aio alone costs per streamed message on this machine.

    python -m bench.echo_server --port 0

A bare ``grpc.aio`` server implementing just enough of ``lstmd.v1.Lstmd`` for the benchmark's
load generator (bench/loadgen) and ``lstmd bench``: ListModels, Stream, and FeedMany with
CreateSession and DeleteSession; no model, no sessions, no interceptors. Every Stream request is
answered with one pre-built Prediction of the same serialized size as the one lstmd-server
sends for a one-token feed with top_k=1, with the same fields filled; every FeedMany request with
one FeedResult holding that Prediction per item. Whatever a load generator measures against it
is the most any Python grpc.aio server can do here, before any real work.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import secrets
import signal
from collections.abc import AsyncIterator
from typing import Any

import grpc

from lstmd.v1 import lstmd_pb2 as pb
from lstmd.v1 import lstmd_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]

# lstmd-server with the bundled model (pd-english, 10,000 words) answers a one-token feed with
# top_k=1 in 58 to 66 bytes depending on the words' lengths: over 800 feeds of random ids, as
# lstmd bench sends them, the median and the mean were 63 bytes (59..65 covers 90%). This reply
# fills the same fields (32-hex session id, position, one Token, one Candidate) to 63 bytes.
REPLY_BYTES = 63
REPLY = pb.Prediction(
    session_id="0123456789abcdef0123456789abcdef",
    position=100,
    tokens=[pb.Token(id=1234, word="window")],
    candidates=[pb.Candidate(word="the", token_id=3, probability=0.25)],
)
assert REPLY.ByteSize() == REPLY_BYTES, REPLY.ByteSize()
MODELS = pb.ListModelsResponse(
    models=[pb.ModelInfo(name="echo", version="1", vocab_size=10_000, num_layers=2, hidden_size=256,
                         state_bytes=8192, is_default=True, precision="fp32")]
)  # fmt: skip


@functools.cache
def many_reply(items: int) -> pb.FeedManyResponse:
    """The FeedMany answer to a request of ``items`` items, built once per size."""
    return pb.FeedManyResponse(results=[pb.FeedResult(prediction=REPLY)] * items)


# The transport options lstmd-server uses (server/app.py), so the two are comparable.
OPTIONS = [("grpc.max_receive_message_length", 1 << 20), ("grpc.so_reuseport", 0)]


class EchoServicer(lstmd_pb2_grpc.LstmdServicer):
    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        return MODELS

    async def Stream(
        self, request_iterator: AsyncIterator[pb.StreamRequest], context: Context
    ) -> AsyncIterator[pb.Prediction]:
        async for _ in request_iterator:
            yield REPLY

    async def FeedMany(
        self, request_iterator: AsyncIterator[pb.FeedManyRequest], context: Context
    ) -> AsyncIterator[pb.FeedManyResponse]:
        async for request in request_iterator:
            yield many_reply(len(request.items))

    async def CreateSession(self, request: pb.CreateSessionRequest, context: Context) -> pb.Session:
        return pb.Session(session_id=secrets.token_hex(16), model="echo", model_version="1", top_k=request.top_k)

    async def DeleteSession(self, request: pb.DeleteSessionRequest, context: Context) -> pb.DeleteSessionResponse:
        return pb.DeleteSessionResponse()


async def serve(port: int) -> None:
    server = grpc.aio.server(options=OPTIONS)
    servicer = EchoServicer()  # type: ignore[abstract]  # the other RPCs answer UNIMPLEMENTED
    lstmd_pb2_grpc.add_LstmdServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    if bound == 0:
        raise OSError(f"cannot bind 127.0.0.1:{port}")
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await server.start()
    print(f"listening on 127.0.0.1:{bound}", flush=True)
    await stopping.wait()
    await server.stop(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=50061, help="port on 127.0.0.1 (0 picks a free one)")
    asyncio.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
