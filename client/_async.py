"""The asyncio client: the I/O of ``AsyncClient``, ``AsyncSession`` and ``AsyncStream``, the same
shape as ``Client`` with coroutines and async iterators; the rest is in ``_core``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from types import TracebackType
from typing import Any, Unpack

import grpc

from lstmd.client._coalesce import FeedCoalescer
from lstmd.client._core import (
    CHANNEL_OPTIONS,
    DEFAULT_TARGET,
    BaseClient,
    BaseSession,
    BaseStream,
    Flow,
    Sleep,
    Steps,
    T,
    completion,
    feed_many_results,
)
from lstmd.client._errors import LstmdError, NotFound, PositionMismatch, from_rpc_error
from lstmd.client._recovery import MAX_RECOVERIES
from lstmd.client._types import (
    FeedItem,
    FeedOptions,
    GeneratedToken,
    GenerateOptions,
    Input,
    ModelInfo,
    Prediction,
    Reload,
    SamplingOptions,
    SessionInfo,
    Tokenization,
    feed_many_request,
    generate_request,
    stream_request,
)
from lstmd.v1 import lstmd_pb2 as pb
from lstmd.v1 import lstmd_pb2_grpc


class AsyncClient(BaseClient):
    """Like ``Client`` (the same options, retries and session recovery), for asyncio programs:
    ``async with AsyncClient(target) as client``.

    With ``coalesce_feeds`` (the default), feeds awaited concurrently (many sessions' ``feed``, as
    a gateway serving many people awaits them) travel together as FeedMany messages on one stream
    (``_coalesce``) rather than as a Feed call each; every feed still gets its own answer or error,
    retries and recovery as before. Streams and ``feed_many`` are unaffected."""

    _channel: grpc.aio.Channel
    _stub: lstmd_pb2_grpc.LstmdAsyncStub

    def __init__(self, target: str = DEFAULT_TARGET, *, coalesce_feeds: bool = True, **options: Any):
        super().__init__(target, **options)
        self._coalescer = FeedCoalescer(self._stub, self.metadata, self._stub.Feed) if coalesce_feeds else None

    def _feed_method(self) -> Callable[..., Any]:
        return self._coalescer or self._stub.Feed

    def _connect(self, target: str, credentials: grpc.ChannelCredentials | None) -> None:
        self._channel = (
            grpc.aio.secure_channel(target, credentials, CHANNEL_OPTIONS)
            if credentials
            else grpc.aio.insecure_channel(target, CHANNEL_OPTIONS)
        )
        self._stub = lstmd_pb2_grpc.LstmdStub(self._channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._coalescer is not None:
            await self._coalescer.close()
        await self._channel.close()

    async def _run(self, flow: Flow[T]) -> T:
        """Do what ``flow`` asks, an awaited call or sleep at a time, and return its result."""
        steps = Steps(flow)
        for step in steps:
            try:
                if isinstance(step, Sleep):
                    await asyncio.sleep(step.seconds)
                    steps.reply(None)
                else:
                    steps.reply(await step.method(step.request, timeout=self.timeout, metadata=self.metadata))
            except grpc.RpcError as e:
                steps.fail(from_rpc_error(e))
        return steps.result

    async def health(self, service: str = "") -> str:
        return await self._run(self._health(service))

    async def list_models(self) -> list[ModelInfo]:
        return await self._run(self._list_models())

    async def reload_models(self, pins: dict[str, str] | None = None) -> Reload:
        """As ``Client.reload_models``."""
        return await self._run(self._reload(pins))

    async def tokenize(self, text: str, model: str = "") -> Tokenization:
        return await self._run(self._tokenize(text, model))

    async def create_session(self, model: str = "", top_k: int = 0) -> AsyncSession:
        return AsyncSession(self, await self._run(self._create(model, top_k)))

    async def get_session(self, session_id: str) -> AsyncSession:
        return AsyncSession(self, await self._run(self._get(session_id)))

    async def delete_session(self, session_id: str) -> None:
        await self._run(self._delete(session_id))

    async def fork_session(self, session_id: str) -> AsyncSession:
        return AsyncSession(self, await self._run(self._fork(session_id)))

    async def export_session(self, session_id: str, *, encrypt: bool = False, end_session: bool = False) -> bytes:
        """As ``Client.export_session``."""
        return await self._run(self._export(session_id, encrypt, end_session))

    async def import_session(self, blob: bytes, *, keep_id: bool = False) -> AsyncSession:
        """As ``Client.import_session``."""
        return AsyncSession(self, await self._run(self._import(blob, keep_id)))

    async def feed(self, session_id: str, data: Input, **options: Unpack[FeedOptions]) -> Prediction:
        return await self._run(self._feed(session_id, data, **options))

    async def feed_many(self, items: Iterable[FeedItem]) -> list[Prediction | LstmdError]:
        """As ``Client.feed_many``: one FeedMany message, an answer or error per item."""
        call = self._stub.FeedMany(iter([feed_many_request(items)]), timeout=self.timeout, metadata=self.metadata)
        try:
            return feed_many_results(await anext(aiter(call)))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    async def stream(self, inputs: Iterable[Input], *, session_id: str = "", model: str = "", top_k: int = 0,
                     token_logprobs: bool = False, tokens: bool = False,
                     exclude_special: bool = False) -> AsyncIterator[Prediction]:  # fmt: skip
        requests = (stream_request(data, session_id, model, top_k=top_k, token_logprobs=token_logprobs, tokens=tokens,
                                   exclude_special=exclude_special) for data in inputs)  # fmt: skip
        try:
            async for reply in self._stub.Stream(iter(requests), timeout=None, metadata=self.metadata):
                yield Prediction.from_pb(reply)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def open_stream(self, session_id: str = "", model: str = "", top_k: int = 0) -> AsyncStream:
        return AsyncStream(self, session_id, model, top_k)

    async def generate(self, prompt: str = "", **options: Unpack[GenerateOptions]) -> AsyncIterator[GeneratedToken]:
        request = generate_request(prompt, **options)
        try:
            async for reply in self._stub.Generate(request, timeout=None, metadata=self.metadata):
                yield GeneratedToken.from_pb(reply)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None


class AsyncStream(BaseStream):
    """One bidirectional stream fed one input at a time: ``await stream.feed(text)``."""

    def __init__(self, client: AsyncClient, session_id: str, model: str, top_k: int):
        super().__init__(session_id, model, top_k)
        self._call = client._stub.Stream(metadata=client.metadata)

    async def feed(self, data: Input, top_k: int = 0, token_logprobs: bool = False, *, word_prefix: str = "",
                   tokens: bool = False, exclude_special: bool = False) -> Prediction:  # fmt: skip
        """As ``Stream.feed``."""
        return await self._exchange(self._request(data, top_k=top_k, token_logprobs=token_logprobs,
                                                  word_prefix=word_prefix, tokens=tokens,
                                                  exclude_special=exclude_special))  # fmt: skip

    async def complete(self, prefix: str, top_k: int = 0, exclude_special: bool = True) -> Prediction:
        """As ``Stream.complete``: the most likely words that begin with ``prefix``; applies nothing."""
        return await self._exchange(self._request("", **completion(prefix, top_k, exclude_special)))

    async def _exchange(self, request: pb.StreamRequest) -> Prediction:
        try:
            await self._call.write(request)
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


class AsyncSession(BaseSession[AsyncClient]):
    """Like ``Session``: exactly-once feeds, recovery from a server that lost the session or went
    back to an older snapshot (``recoveries``, ``exact``), deleted on ``async with`` exit."""

    async def feed(self, data: Input, top_k: int = 0, token_logprobs: bool = False, *, word_prefix: str = "",
                   tokens: bool = False, exclude_special: bool = False) -> Prediction:  # fmt: skip
        """As ``Session.feed``."""
        return await self.client._run(self._feed(data, top_k=top_k, token_logprobs=token_logprobs,
                                                 word_prefix=word_prefix, tokens=tokens,
                                                 exclude_special=exclude_special))  # fmt: skip

    async def complete(self, prefix: str, top_k: int = 0, exclude_special: bool = True) -> Prediction:
        """As ``Session.complete``: a prefix-only feed that completes ``prefix``; the position stays."""
        return await self.client._run(self._feed("", **completion(prefix, top_k, exclude_special)))

    async def generate(self, prompt: str = "", **options: Unpack[SamplingOptions]) -> AsyncIterator[GeneratedToken]:
        """As ``Session.generate``: a prompt is fed first; a generation cut off is not resumed."""
        if prompt:
            await self.feed(prompt)
        for attempt in range(MAX_RECOVERIES + 1):
            started = False
            try:
                async for token in self.client.generate(session_id=self.id, expected_position=self.position,
                                                        **options):  # fmt: skip
                    started = True
                    self._fed([token.token_id], token.position)
                    yield token
                return
            except (NotFound, PositionMismatch) as error:
                if started or not await self.client._run(self._recover(error, attempt)):
                    raise
        raise AssertionError("unreachable")

    async def fork(self) -> AsyncSession:
        """A copy, which knows this session's tail (and so recovers as well as it would)."""
        return AsyncSession(self.client, *await self.client._run(self._fork()))

    async def refresh(self) -> SessionInfo:
        return await self.client._run(self._refresh())

    async def delete(self) -> None:
        await self.client._run(self._delete())

    async def export(self, *, encrypt: bool = False, end_session: bool = False) -> bytes:
        """As ``Session.export``."""
        return await self.client._run(self._export(encrypt, end_session))

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with contextlib.suppress(NotFound):
            await self.delete()
