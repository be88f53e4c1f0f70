"""The asyncio client: the same shape as ``Client``, with coroutines and async iterators."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from types import TracebackType
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lstmd.client._errors import LstmdError, NotFound, PositionMismatch, from_rpc_error
from lstmd.client._recovery import (
    DEFAULT_TAIL,
    DEFAULT_WAIT_FOR_RESTART_S,
    MAX_RECOVERIES,
    Backoff,
    Plan,
    Recovery,
    Tail,
    report,
)
from lstmd.client._sync import CHANNEL_OPTIONS, DEFAULT_TARGET, Metadata, call_metadata, make_credentials
from lstmd.client._types import (
    GeneratedToken,
    Input,
    ModelInfo,
    Prediction,
    SessionInfo,
    feed_request,
    generate_request,
    stream_request,
)
from lstmd.v1 import lstmd_pb2 as pb
from lstmd.v1 import lstmd_pb2_grpc

T = TypeVar("T")


class AsyncClient:
    """Like ``Client`` (the same options, retries and session recovery), for asyncio programs:
    ``async with AsyncClient(target) as client``."""

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
        wait_for_restart_s: float = DEFAULT_WAIT_FOR_RESTART_S,
        recovery_tail: int = DEFAULT_TAIL,
    ):
        credentials = make_credentials(tls, root_certificates, certificate_chain, private_key)
        self._channel = (
            grpc.aio.secure_channel(target, credentials, CHANNEL_OPTIONS)
            if credentials
            else grpc.aio.insecure_channel(target, CHANNEL_OPTIONS)
        )
        self._stub = lstmd_pb2_grpc.LstmdStub(self._channel)
        self.target, self.timeout, self.retries = target, timeout, retries
        self.wait_for_restart_s, self.recovery_tail = wait_for_restart_s, recovery_tail
        self.metadata = call_metadata(metadata, api_key)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: Callable[..., Awaitable[T]], request: Any, retry: bool = True) -> T:
        backoff = Backoff(self.retries, self.wait_for_restart_s)
        while True:
            try:
                return await method(request, timeout=self.timeout, metadata=self.metadata)
            except grpc.RpcError as e:
                error = from_rpc_error(e)
                delay = backoff.delay(error) if retry else None
                if delay is None:
                    raise error from None
                await asyncio.sleep(delay)

    async def health(self, service: str = "") -> str:
        stub = health_pb2_grpc.HealthStub(self._channel)
        reply = await self._call(stub.Check, health_pb2.HealthCheckRequest(service=service))
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    async def list_models(self) -> list[ModelInfo]:
        reply = await self._call(self._stub.ListModels, pb.ListModelsRequest())
        return [ModelInfo.from_pb(m) for m in reply.models]

    async def create_session(self, model: str = "", top_k: int = 0) -> AsyncSession:
        return AsyncSession(self, await self._create(model, top_k))

    async def _create(self, model: str, top_k: int) -> SessionInfo:
        request = pb.CreateSessionRequest(model=model, top_k=top_k)
        return SessionInfo.from_pb(await self._call(self._stub.CreateSession, request, retry=False))

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
        code, details = await self._call.code(), await self._call.details()
        return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), await self._call.trailing_metadata(), details)

    async def close(self) -> None:
        await self._call.done_writing()
        self._call.cancel()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncSession:
    """Like ``Session``: exactly-once feeds, recovery from a server that lost the session or went
    back to an older snapshot (``recoveries``, ``exact``), deleted on ``async with`` exit."""

    def __init__(self, client: AsyncClient, info: SessionInfo, tail: Tail | None = None):
        self.client = client
        self.info = info
        self.id = info.session_id
        self.position = info.position
        self.recoveries: list[Recovery] = []
        self._tail = tail or Tail(client.recovery_tail, info.position)
        self._deleted = False

    @property
    def exact(self) -> bool:
        """False once a recovery had to be approximate (the tail was shorter than what was lost)."""
        return all(r.exact for r in self.recoveries)

    async def feed(self, data: Input, top_k: int = 0, token_logprobs: bool = False) -> Prediction:
        for recovered in range(MAX_RECOVERIES + 1):
            try:
                prediction = await self.client.feed(self.id, data, expected_position=self.position, top_k=top_k,
                                                    token_logprobs=token_logprobs)  # fmt: skip
            except (NotFound, PositionMismatch) as error:
                if recovered == MAX_RECOVERIES or not await self._recover(error):
                    raise
                continue
            self._fed([t.id for t in prediction.tokens], prediction.position)
            return prediction
        raise AssertionError("unreachable")

    async def generate(self, prompt: str = "", **options: Any) -> AsyncIterator[GeneratedToken]:
        """As ``Session.generate``: a prompt is fed first; a generation cut off is not resumed."""
        if prompt:
            await self.feed(prompt)
        for recovered in range(MAX_RECOVERIES + 1):
            started = False
            try:
                async for token in self.client.generate(session_id=self.id, expected_position=self.position,
                                                        **options):  # fmt: skip
                    started = True
                    self._fed([token.token_id], token.position)
                    yield token
                return
            except (NotFound, PositionMismatch) as error:
                if started or recovered == MAX_RECOVERIES or not await self._recover(error):
                    raise
        raise AssertionError("unreachable")

    def _fed(self, ids: list[int], position: int) -> None:
        self._tail.add(ids, position)
        self.position = position

    async def _recover(self, error: LstmdError) -> bool:
        plan = None if self._deleted else self._tail.plan(error, self.position)
        if plan is None:
            return False
        old = self.id
        if plan.recreate:
            info = await self.client._create(self.info.model, self.info.top_k)
            if info.model_version != self.info.model_version:  # token ids may mean other words now
                await self.client.delete_session(info.session_id)
                return False
            self.info, self.id = info, info.session_id
        position = plan.start
        for chunk in plan.chunks:
            position = (await self.client.feed(self.id, chunk, expected_position=position, top_k=1)).position
        self._recovered(plan, old, position)
        return True

    def _recovered(self, plan: Plan, old_id: str, position: int) -> None:
        recovery = Recovery(plan.reason, old_id, self.id, plan.start, position, sum(map(len, plan.chunks)),
                            plan.exact)  # fmt: skip
        self.recoveries.append(recovery)
        self._tail.end = self.position = position
        report(recovery)

    async def fork(self) -> AsyncSession:
        """A copy, which knows this session's tail (and so recovers as well as it would)."""
        twin = await self.client.fork_session(self.id)
        if twin.position == self.position:
            twin._tail = self._tail.copy()
        return twin

    async def refresh(self) -> SessionInfo:
        self.info = (await self.client.get_session(self.id)).info
        if self.info.position != self.position:
            self._tail.reset(self.info.position)
        self.position = self.info.position
        return self.info

    async def delete(self) -> None:
        self._deleted = True
        await self.client.delete_session(self.id)

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with contextlib.suppress(NotFound):
            await self.delete()
