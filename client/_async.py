"""The asyncio client: the same shape as ``Client``, with coroutines and async iterators."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from types import TracebackType
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lstmd.v1 import lstmd_pb2 as pb
from lstmd.v1 import lstmd_pb2_grpc

from client._errors import RETRYABLE, NotFound, from_rpc_error
from client._sync import DEFAULT_TARGET, Metadata, call_metadata, make_credentials
from client._types import (
    GeneratedToken,
    Input,
    ModelInfo,
    Prediction,
    SessionInfo,
    feed_request,
    generate_request,
    stream_request,
)

T = TypeVar("T")


class AsyncClient:
    """Like ``Client``, for asyncio programs: ``async with AsyncClient(target) as client``."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        tls: bool = False,
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
        api_key: str | None = None,
        metadata: Metadata = (),
        timeout: float | None = 10.0,
        retries: int = 3,
    ):
        credentials = make_credentials(tls, root_certificates, certificate_chain, private_key)
        self._channel = (
            grpc.aio.secure_channel(target, credentials) if credentials else grpc.aio.insecure_channel(target)
        )
        self._stub = lstmd_pb2_grpc.LstmdStub(self._channel)
        self.target, self.timeout, self.retries = target, timeout, retries
        self.metadata = call_metadata(metadata, api_key)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: Callable[..., Awaitable[T]], request: Any, retry: bool = True) -> T:
        attempts = self.retries + 1 if retry else 1
        for attempt in range(attempts):
            try:
                return await method(request, timeout=self.timeout, metadata=self.metadata)
            except grpc.RpcError as e:
                error = from_rpc_error(e)
                if not isinstance(error, RETRYABLE) or attempt == attempts - 1:
                    raise error from None
                await asyncio.sleep(0.05 * 2**attempt)
        raise AssertionError("unreachable")

    async def health(self, service: str = "") -> str:
        stub = health_pb2_grpc.HealthStub(self._channel)
        reply = await self._call(stub.Check, health_pb2.HealthCheckRequest(service=service))
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    async def list_models(self) -> list[ModelInfo]:
        reply = await self._call(self._stub.ListModels, pb.ListModelsRequest())
        return [ModelInfo.from_pb(m) for m in reply.models]

    async def create_session(self, model: str = "", top_k: int = 0) -> AsyncSession:
        request = pb.CreateSessionRequest(model=model, top_k=top_k)
        return AsyncSession(self, SessionInfo.from_pb(await self._call(self._stub.CreateSession, request, retry=False)))

    async def get_session(self, session_id: str) -> AsyncSession:
        reply = await self._call(self._stub.GetSession, pb.GetSessionRequest(session_id=session_id))
        return AsyncSession(self, SessionInfo.from_pb(reply))

    async def delete_session(self, session_id: str) -> None:
        await self._call(self._stub.DeleteSession, pb.DeleteSessionRequest(session_id=session_id), retry=False)

    async def fork_session(self, session_id: str) -> AsyncSession:
        reply = await self._call(self._stub.ForkSession, pb.ForkSessionRequest(session_id=session_id), retry=False)
        return AsyncSession(self, SessionInfo.from_pb(reply))

    async def feed(
        self,
        session_id: str,
        data: Input,
        *,
        expected_position: int | None = None,
        top_k: int = 0,
        token_logprobs: bool = False,
    ) -> Prediction:
        request = feed_request(session_id, data, expected_position, top_k, token_logprobs)
        return Prediction.from_pb(await self._call(self._stub.Feed, request, retry=expected_position is not None))

    async def stream(self, inputs: Iterable[Input], *, session_id: str = "", model: str = "", top_k: int = 0,
                     token_logprobs: bool = False) -> AsyncIterator[Prediction]:  # fmt: skip
        requests = (stream_request(data, top_k, token_logprobs, session_id, model) for data in inputs)
        try:
            async for reply in self._stub.Stream(iter(requests), timeout=None, metadata=self.metadata):
                yield Prediction.from_pb(reply)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def open_stream(self, session_id: str = "", model: str = "", top_k: int = 0) -> AsyncStream:
        return AsyncStream(self, session_id, model, top_k)

    async def generate(
        self,
        prompt: str = "",
        *,
        session_id: str = "",
        model: str = "",
        max_tokens: int = 50,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 0.0,
        seed: int | None = None,
        stop: list[str] | None = None,
        expected_position: int | None = None,
    ) -> AsyncIterator[GeneratedToken]:
        request = generate_request(session_id, prompt, max_tokens, temperature, top_k, top_p, seed, stop, model,
                                   expected_position)  # fmt: skip
        try:
            async for reply in self._stub.Generate(request, timeout=None, metadata=self.metadata):
                yield GeneratedToken.from_pb(reply)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None


class AsyncStream:
    """One bidirectional stream fed one input at a time: ``await stream.feed(text)``."""

    def __init__(self, client: AsyncClient, session_id: str, model: str, top_k: int):
        self._call = client._stub.Stream(metadata=client.metadata)
        self._session_id, self._model, self._top_k = session_id, model, top_k

    async def feed(self, data: Input, top_k: int = 0, token_logprobs: bool = False) -> Prediction:
        try:
            request = stream_request(data, top_k or self._top_k, token_logprobs, self._session_id, self._model)
            await self._call.write(request)
            self._session_id = self._model = ""  # the server reads them from the first message only
            reply = await self._call.read()
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        if not isinstance(reply, pb.Prediction):  # the server ended the stream
            raise from_rpc_error(await self._error())
        return Prediction.from_pb(reply)

    async def _error(self) -> grpc.aio.AioRpcError:
        code = await self._call.code()
        return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), await self._call.details())

    async def close(self) -> None:
        await self._call.done_writing()
        self._call.cancel()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncSession:
    """Like ``Session``: exactly-once feeds, deleted on ``async with`` exit."""

    def __init__(self, client: AsyncClient, info: SessionInfo):
        self.client = client
        self.info = info
        self.id = info.session_id
        self.position = info.position

    async def feed(self, data: Input, top_k: int = 0, token_logprobs: bool = False) -> Prediction:
        prediction = await self.client.feed(self.id, data, expected_position=self.position, top_k=top_k,
                                            token_logprobs=token_logprobs)  # fmt: skip
        self.position = prediction.position
        return prediction

    async def generate(self, prompt: str = "", **options: Any) -> AsyncIterator[GeneratedToken]:
        async for token in self.client.generate(prompt, session_id=self.id, expected_position=self.position, **options):
            self.position = token.position
            yield token

    async def fork(self) -> AsyncSession:
        return await self.client.fork_session(self.id)

    async def refresh(self) -> SessionInfo:
        self.info = (await self.client.get_session(self.id)).info
        self.position = self.info.position
        return self.info

    async def delete(self) -> None:
        await self.client.delete_session(self.id)

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with contextlib.suppress(NotFound):
            await self.delete()
