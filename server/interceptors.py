"""The server's interceptors: per-RPC Prometheus metrics with the grpc-ecosystem names, for every
service on the server (lstmd, health, reflection), and API-key checks."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any, TypeAlias

import grpc

from lstmd.server import metrics
from lstmd.server.errors import Unauthenticated, status_of
from lstmd.server.security import KeyRing, caller

log = logging.getLogger(__name__)
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # generic in the type stubs only
_FACTORY = {
    "unary": grpc.unary_unary_rpc_method_handler,
    "client_stream": grpc.stream_unary_rpc_method_handler,
    "server_stream": grpc.unary_stream_rpc_method_handler,
    "bidi_stream": grpc.stream_stream_rpc_method_handler,
}


def _kind(handler: Handler) -> str:
    return {
        (False, False): "unary",
        (True, False): "client_stream",
        (False, True): "server_stream",
        (True, True): "bidi_stream",
    }[(handler.request_streaming, handler.response_streaming)]


def _code(context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None) -> str:
    if isinstance(error, asyncio.CancelledError):
        return "CANCELLED"
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    return "UNKNOWN" if error is not None and not isinstance(error, grpc.aio.AbortError) else "OK"


Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Around: TypeAlias = Callable[[Any, Context], contextlib.AbstractAsyncContextManager[Any]]


def _wrap(handler: Handler, around: Around, request_deserializer: Callable[[bytes], Any] | None = None) -> Handler:
    """``handler`` with each call run inside ``around(request, context)``: an async context manager that
    may abort the call before the handler runs, sees how it ends, and gives the request (or request
    iterator) the handler gets. Handlers of every kind keep their kind, response streams written with
    ``context.write`` (health's Watch) included."""
    inner: Any = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream

    async def call(request: Any, context: Context) -> Any:
        async with around(request, context) as request:
            return await inner(request, context)

    async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
        async with around(request, context) as request:
            async for item in inner(request, context):
                yield item

    by_yield = handler.response_streaming and not inspect.iscoroutinefunction(inner)
    return _FACTORY[_kind(handler)](
        stream if by_yield else call,
        request_deserializer=request_deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(details)
        if handler is None:
            return handler
        service, _, method = details.method.lstrip("/").rpartition("/")
        labels = (_kind(handler), service, method)

        @contextlib.asynccontextmanager
        async def measured(request: Any, context: Context) -> AsyncIterator[Any]:
            metrics.rpc_started.labels(*labels).inc()
            started, error = time.perf_counter(), None
            try:
                yield request
            except BaseException as e:
                error = e
                raise
            finally:
                metrics.rpc_seconds.labels(*labels).observe(time.perf_counter() - started)
                metrics.rpc_handled.labels(*labels, _code(context, error)).inc()

        return _wrap(handler, measured)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through only with a valid API key (``authorization: Bearer <key>``), except
    calls to the ``keyless`` services; sets ``security.caller`` to the key's id for the handler.

    An interceptor rather than a check in the servicer: one place guards every service on the
    server, health and reflection included when they are not keyless, and a refused call never
    reaches any handler. A refused call ends UNAUTHENTICATED; the log line names the method, the
    peer and the reason, never the key."""

    def __init__(self, keys: KeyRing, keyless: Collection[str]):
        self.keys = keys
        self.keyless = frozenset(keyless)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        if details.method.lstrip("/").rpartition("/")[0] in self.keyless:
            return await continuation(details)
        try:
            caller.set(self.keys.identify(details.invocation_metadata or ()))
        except Unauthenticated as error:
            handler = await continuation(details)
            return None if handler is None else _refusal(handler, error, details.method)
        return await continuation(details)


def _refusal(handler: Handler, error: Unauthenticated, method: str) -> Handler:
    """A handler of the same kind as ``handler`` that ends the call with ``error``."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        log.info("%s refused for %s: %s", method, context.peer(), error)
        await context.abort(status_of(error), str(error))

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        await refuse(request, context)
        yield  # never reached: a response-streaming behavior is an async generator, as other interceptors expect

    return _FACTORY[_kind(handler)](
        refuse_stream if handler.response_streaming else refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
