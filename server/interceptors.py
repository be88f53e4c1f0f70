"""The server's interceptors, for every service on the server (lstmd, health, reflection): per-RPC
Prometheus metrics with the grpc-ecosystem names, admission control (a limit on calls in flight),
API-key checks, and INVALID_ARGUMENT for request bytes that do not decode."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc
from google.protobuf import descriptor_pool

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


class Throttled:
    """A WARNING line for a kind of event at most once per ``interval`` seconds, with the number of
    such events since the last line and the latest one's detail: a flood of bad calls costs a line
    per interval, not a line per call. The first event is logged at once; the rest of an interval's
    events are logged when it ends. Call from the event loop."""

    def __init__(self, what: str, interval: float = 10.0):
        self.what, self.interval = what, interval
        self.count, self.latest, self.last, self.due = 0, "", -interval, False

    def note(self, detail: str) -> None:
        self.count += 1
        self.latest = detail
        if self.due:
            return
        self.due = True
        wait = self.last + self.interval - time.monotonic()
        if wait <= 0:
            self._flush()
        else:
            asyncio.get_running_loop().call_later(wait, self._flush)

    def _flush(self) -> None:
        log.warning("%s: %d since the last such line (one line per %g s at most); latest: %s",
                    self.what, self.count, self.interval, self.latest)  # fmt: skip
        self.count, self.due, self.last = 0, False, time.monotonic()


DRAIN_S = 1.0  # how long a stream about to be refused may take to finish sending


async def _drain(requests: AsyncIterator[Any]) -> None:
    """Read the rest of a stream about to be refused, until its client stops sending (half-closes), for
    ``DRAIN_S`` at most. Refused while a message or the half-close is still on its way, the client's
    own write fails, and gRPC's Python client then reports INTERNAL ("Internal error from Core")
    instead of the status the server sent. A stream that sends its requests and half-closes is
    answered as soon as it has; one that waits for an answer first (an interactive one), after
    ``DRAIN_S``."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(DRAIN_S):
            async for _ in requests:
                pass


@dataclass(frozen=True, slots=True)
class Malformed:
    """What the request deserializer gives for bytes that are not a valid message of the method's type."""

    message: str


@functools.cache
def _request_type(method: str) -> str:
    """The full name of the request message of ``method`` (``/package.Service/Method``)."""
    service, _, name = method.lstrip("/").rpartition("/")
    try:
        return str(descriptor_pool.Default().FindServiceByName(service).FindMethodByName(name).input_type.full_name)
    except KeyError:
        return f"{method} request"


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Request bytes that do not decode (corrupt wire format, invalid UTF-8 in a string field) end the
    call INVALID_ARGUMENT with the reason, on every method of every service, a message of a stream
    included, instead of gRPC's UNKNOWN (INTERNAL on a stream) and a traceback per call: the
    deserializer returns ``Malformed`` instead of raising, and the handler refuses it before it runs.
    Refusals are logged by ``Throttled`` and counted by the metrics interceptor like any other call."""

    def __init__(self) -> None:
        self.refused = Throttled("malformed requests refused with INVALID_ARGUMENT")

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        decode, name, method = handler.request_deserializer, _request_type(details.method), details.method

        def tolerant(data: bytes) -> Any:
            try:
                return decode(data)
            except Exception as e:  # a deserializer fails only on its input: DecodeError, for protobuf
                reason = str(e).removeprefix(f"Error parsing message with type '{name}': ")
                return Malformed(f"the request is not a valid {name} message: {reason[:1].lower()}{reason[1:]} "
                                 f"(send a serialized {name}; string fields must be valid UTF-8)")  # fmt: skip

        async def refuse(request: Malformed, context: Context) -> None:
            self.refused.note(f"{method} from {context.peer()}: {request.message}")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)

        async def checked(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
            async for request in requests:
                if isinstance(request, Malformed):
                    await _drain(requests)
                    await refuse(request, context)
                yield request

        @contextlib.asynccontextmanager
        async def check(request: Any, context: Context) -> AsyncIterator[Any]:
            if handler.request_streaming:
                yield checked(request, context)
                return
            if isinstance(request, Malformed):
                await refuse(request, context)
            yield request

        return _wrap(handler, check, request_deserializer=tolerant)


RETRY_AFTER_MS = 250  # the hint a call refused by admission control carries
RETRY_AFTER_KEY = "lstmd-retry-after-ms"  # trailing metadata: milliseconds to wait before retrying
PUSHBACK_KEY = "grpc-retry-pushback-ms"  # the same for gRPC's own retry policies (gRFC A6)


class AdmissionInterceptor(grpc.aio.ServerInterceptor):
    """At most ``limit`` calls and streams in flight (``--max-concurrent-calls``); the next one is refused
    at once with RESOURCE_EXHAUSTED, a message and a retry hint in its trailing metadata
    (``lstmd-retry-after-ms``, ``grpc-retry-pushback-ms``). A refusal costs the event loop next to
    nothing, so the loop keeps taking calls from gRPC core as fast as they come and core never sheds
    them itself (which clients see as CANCELLED, or INTERNAL on streams). Calls to the ``exempt``
    services (health) are neither counted nor refused. A call counts from when its handler starts
    until the call is over, however it ends; ``lstmd_calls_in_flight`` and ``lstmd_calls_refused_total``
    export both."""

    def __init__(self, limit: int, exempt: Collection[str]):
        self.limit, self.exempt, self.in_flight = limit, frozenset(exempt), 0
        self.message = (f"the server is at its limit of {limit} concurrent calls and streams "
                        f"(--max-concurrent-calls); retry in {RETRY_AFTER_MS} ms")  # fmt: skip
        self.hint = ((RETRY_AFTER_KEY, str(RETRY_AFTER_MS)), (PUSHBACK_KEY, str(RETRY_AFTER_MS)))
        self.refused = Throttled(f"calls refused with RESOURCE_EXHAUSTED at --max-concurrent-calls {limit}")

    def _release(self, context: Context) -> None:
        self.in_flight -= 1
        metrics.calls_in_flight.dec()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.lstrip("/").rpartition("/")[0] in self.exempt:
            return handler

        @contextlib.asynccontextmanager
        async def admitted(request: Any, context: Context) -> AsyncIterator[Any]:
            if self.in_flight >= self.limit:
                metrics.calls_refused.inc()
                self.refused.note(f"{details.method} from {context.peer()}")
                if handler.request_streaming:
                    await _drain(request)
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self.message, trailing_metadata=self.hint)
            self.in_flight += 1
            metrics.calls_in_flight.inc()
            # runs when the call is over, however it ends (the type stubs want a callback class)
            context.add_done_callback(self._release)  # type: ignore[arg-type]
            yield request

        return _wrap(handler, admitted)


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
