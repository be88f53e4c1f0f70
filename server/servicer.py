"""The lstmd.v1.Lstmd service: a thin adapter from gRPC to the Engine.

Each method converts the request, calls the engine, converts the answer. Domain errors become
status codes through one table (server.errors.STATUS); anything else is logged with its
traceback and becomes INTERNAL, without touching other calls or sessions. The caller's API key
id (``security.caller``, set by the AuthInterceptor; "" when keys are off) goes with every
session call, so the engine shows each caller its own sessions only.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc

from lstmd.server import convert
from lstmd.server.engine import Engine, FeedOrder
from lstmd.server.errors import DeadlineExceeded, InvalidInput, LstmdError, echo, status_of
from lstmd.server.security import caller
from lstmd.server.sessions import Session
from lstmd.server.versions import Versions
from lstmd.v1 import lstmd_pb2 as pb
from lstmd.v1 import lstmd_pb2_grpc

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])
Context = grpc.aio.ServicerContext[Any, Any]
FEED_MANY_AHEAD = 4  # FeedMany messages of one stream that run at once


async def _abort(context: Context, error: Exception, method: str) -> None:
    if isinstance(error, LstmdError):
        log.info("%s: %s: %s", method, status_of(error).name, error)
        await context.abort(status_of(error), str(error), trailing_metadata=error.metadata)
    log.exception("internal error in %s", method, exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; the server log has the details")


def unary(method: F) -> F:
    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: Context) -> Any:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            await _abort(context, e, method.__name__)

    return wrapper  # type: ignore[return-value]


def streaming(method: F) -> F:
    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: Context) -> AsyncIterator[Any]:
        try:
            async for item in method(self, request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            await _abort(context, e, method.__name__)

    return wrapper  # type: ignore[return-value]


class LstmdServicer(lstmd_pb2_grpc.LstmdServicer):
    def __init__(self, engine: Engine, versions: Versions):
        self.engine = engine
        self.versions = versions

    def _session(self, session: Session) -> pb.Session:
        return convert.session(session, self.engine.settings.session_max_lifetime_s)

    @unary
    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[convert.model_info(v) for v in await self.versions.infos()])

    @unary
    async def ReloadModels(self, request: pb.ReloadModelsRequest, context: Context) -> pb.ReloadModelsResponse:
        self.versions.allow(caller.get())
        done = await self.versions.admin_reload(dict(request.pins))
        return pb.ReloadModelsResponse(models=[convert.model_info(v) for v in await self.versions.infos()],
                                       loaded=done.loaded, draining=done.draining)  # fmt: skip

    @unary
    async def CreateSession(self, request: pb.CreateSessionRequest, context: Context) -> pb.Session:
        return self._session(await self.engine.create_session(request.model, request.top_k, caller.get()))

    @unary
    async def GetSession(self, request: pb.GetSessionRequest, context: Context) -> pb.Session:
        return self._session(await self.engine.get_session(request.session_id, caller.get()))

    @unary
    async def DeleteSession(self, request: pb.DeleteSessionRequest, context: Context) -> pb.DeleteSessionResponse:
        await self.engine.delete_session(request.session_id, caller.get())
        return pb.DeleteSessionResponse()

    @unary
    async def ForkSession(self, request: pb.ForkSessionRequest, context: Context) -> pb.Session:
        return self._session(await self.engine.fork_session(request.session_id, caller.get()))

    @unary
    async def Feed(self, request: pb.FeedRequest, context: Context) -> pb.Prediction:
        session = await self.engine.get_session(request.session_id, caller.get())
        return convert.prediction(await self.engine.feed(session, convert.feed_args(request)))

    @streaming
    async def Stream(
        self, request_iterator: AsyncIterator[pb.StreamRequest], context: Context
    ) -> AsyncIterator[pb.Prediction]:
        first = await anext(aiter(request_iterator), None)
        if first is None:
            return
        async with self.engine.stream_session(first.session_id, first.model, caller.get()) as session:
            request: pb.StreamRequest | None = first
            while request is not None:
                if request is not first:
                    _check_later(request, first)
                yield convert.prediction(await self.engine.feed(session, convert.feed_args(request)))
                request = await anext(aiter(request_iterator), None)

    @streaming
    async def FeedMany(
        self, request_iterator: AsyncIterator[pb.FeedManyRequest], context: Context
    ) -> AsyncIterator[pb.FeedManyResponse]:
        """Reads ahead: up to FEED_MANY_AHEAD messages run while the oldest one's answer is awaited
        and sent, so a client that sends before it is answered keeps the batches full."""
        owner, order = caller.get(), FeedOrder()
        running: asyncio.Queue[asyncio.Task[pb.FeedManyResponse] | None] = asyncio.Queue()
        ahead = asyncio.Semaphore(FEED_MANY_AHEAD)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await ahead.acquire()
                    running.put_nowait(asyncio.create_task(self._feed_many(request, owner, order)))
            finally:
                running.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (task := await running.get()) is not None:
                yield await task
                ahead.release()
            await reader  # a malformed message ends the stream with its status
        finally:
            reader.cancel()
            while not running.empty():
                if (task := running.get_nowait()) is not None:
                    task.cancel()

    async def _feed_many(self, request: pb.FeedManyRequest, owner: str, order: FeedOrder) -> pb.FeedManyResponse:
        limit = self.engine.settings.max_feed_items
        if len(request.items) > limit:
            error = InvalidInput(f"the message carries {len(request.items):,} feeds, the limit per FeedMany message "
                                 f"is {limit:,} (LSTMD_MAX_FEED_ITEMS): split it")  # fmt: skip
            return convert.feed_many_response([error] * len(request.items))
        items = [(item.session_id, convert.feed_args(item)) for item in request.items]
        return convert.feed_many_response(await self.engine.feed_many(items, owner, order))

    @unary
    async def Generate(self, request: pb.GenerateRequest, context: Context) -> None:  # type: ignore[override]
        """Writes each token itself (``context.write``, so the method returns None rather than yield),
        so that a client that stops reading cannot hold the session: see ``_write``. Closing the
        engine's generation early applies none of it."""
        async with (
            self.engine.stream_session(request.session_id, request.model, caller.get()) as session,
            contextlib.aclosing(self.engine.generate(session, convert.generate_args(request))) as words,
        ):
            async for word in words:
                await self._write(context, convert.generated(word))

    async def _write(self, context: Context, message: Any) -> None:
        """Write one message of a stream, waiting at most ``generate_write_timeout_s`` for the client's
        flow-control window to take it."""
        timeout = self.engine.settings.generate_write_timeout_s
        try:
            async with asyncio.timeout(timeout):
                await context.write(message)
        except TimeoutError:
            raise DeadlineExceeded(
                f"the client read nothing for {timeout:g} s (the server's generate write timeout): the generation "
                "was stopped and none of it was applied; read the stream as it comes"
            ) from None

    @unary
    async def Tokenize(self, request: pb.TokenizeRequest, context: Context) -> pb.TokenizeResponse:
        return convert.tokenization(await self.engine.tokenize(request.model, request.text))

    @unary
    async def ExportSession(self, request: pb.ExportSessionRequest, context: Context) -> pb.ExportSessionResponse:
        blob, session = await self.engine.export_session(request.session_id, caller.get(), request.encrypt,
                                                         request.end_session)  # fmt: skip
        return pb.ExportSessionResponse(blob=blob, session=self._session(session))

    @unary
    async def ImportSession(self, request: pb.ImportSessionRequest, context: Context) -> pb.Session:
        return self._session(await self.engine.import_session(request.blob, request.keep_id, caller.get()))


def _check_later(request: pb.StreamRequest, first: pb.StreamRequest) -> None:
    """A stream's session and model come from its first message; a later one may only repeat them."""
    for field in ("session_id", "model"):
        value = getattr(request, field)
        if value and value != getattr(first, field):
            raise InvalidInput(f"{field} is read from a stream's first message only; a later message leaves "
                               f"it empty (this one has {echo(value)}): open a stream per session")  # fmt: skip
