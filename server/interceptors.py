"""Per-RPC Prometheus metrics with the grpc-ecosystem names, for every service on the server
(lstmd, health, reflection)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from server import metrics


def _code(context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None) -> str:
    if isinstance(error, asyncio.CancelledError):
        return "CANCELLED"
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    return "UNKNOWN" if error is not None and not isinstance(error, grpc.aio.AbortError) else "OK"


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
        kind = {
            (False, False): "unary",
            (True, False): "client_stream",
            (False, True): "server_stream",
            (True, True): "bidi_stream",
        }[(handler.request_streaming, handler.response_streaming)]
        labels = (kind, service, method)

        def begin() -> float:
            metrics.rpc_started.labels(*labels).inc()
            return time.perf_counter()

        def end(started: float, context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None) -> None:
            metrics.rpc_seconds.labels(*labels).observe(time.perf_counter() - started)
            metrics.rpc_handled.labels(*labels, _code(context, error)).inc()

        if handler.response_streaming:
            inner_stream: Any = handler.unary_stream or handler.stream_stream

            async def stream_behavior(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
                started, error = begin(), None
                try:
                    async for item in inner_stream(request, context):
                        yield item
                except BaseException as e:
                    error = e
                    raise
                finally:
                    end(started, context, error)

            behavior: Any = stream_behavior
        else:
            inner: Any = handler.unary_unary or handler.stream_unary

            async def unary_behavior(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                started, error = begin(), None
                try:
                    return await inner(request, context)
                except BaseException as e:
                    error = e
                    raise
                finally:
                    end(started, context, error)

            behavior = unary_behavior
        factory = {
            "unary": grpc.unary_unary_rpc_method_handler,
            "client_stream": grpc.stream_unary_rpc_method_handler,
            "server_stream": grpc.unary_stream_rpc_method_handler,
            "bidi_stream": grpc.stream_stream_rpc_method_handler,
        }[kind]
        return factory(
            behavior,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
