"""Concurrent feeds of many sessions as FeedMany messages, for ``AsyncClient``.

A gateway that serves many people awaits many ``session.feed()`` calls at once. Sent as unary
Feed calls, each costs a gRPC call on both sides; ``FeedCoalescer`` instead queues the feeds
issued while the previous message is on its way and sends them as one FeedManyRequest on one
FeedMany stream (at most ``IN_FLIGHT`` messages unanswered), then hands each caller its own
item's answer. It has a unary stub method's signature and raises ``grpc.aio.AioRpcError`` for an
item's error (with the trailing metadata a Feed's would carry: ``lstmd-position``,
``lstmd-session-end``, ``lstmd-session-ended-at``), so the client's retries and session recovery
work on it unchanged. A server without FeedMany (UNIMPLEMENTED) is
fed with Feed from then on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from datetime import UTC
from typing import Any

import grpc

from lstmd.client._errors import END_KEY, ENDED_AT_KEY, POSITION_KEY, end_reason
from lstmd.v1 import lstmd_pb2 as pb

IN_FLIGHT = 2  # FeedMany messages unanswered at once: one being answered while the next is sent
MAX_ITEMS = 1024  # items per message: the server's default limit (LSTMD_MAX_FEED_ITEMS)
_CODES = {code.value[0]: code for code in grpc.StatusCode}


class _Unimplemented(Exception):
    """The server has no FeedMany: the feed goes as a Feed call."""


class FeedCoalescer:
    def __init__(self, stub: Any, metadata: tuple[tuple[str, str], ...], feed: Callable[..., Any]):
        self._stub, self._metadata, self._feed = stub, metadata, feed
        self._queue: list[tuple[pb.FeedRequest, asyncio.Future[pb.Prediction]]] = []
        self._sent: deque[list[asyncio.Future[pb.Prediction]]] = deque()  # per message in flight, in order
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._unimplemented = False

    async def __call__(
        self, request: pb.FeedRequest, timeout: float | None = None, metadata: Any = None
    ) -> pb.Prediction:
        if self._unimplemented:
            return await self._feed(request, timeout=timeout, metadata=metadata)  # type: ignore[no-any-return]
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._send_forever())]
        future: asyncio.Future[pb.Prediction] = asyncio.get_running_loop().create_future()
        self._queue.append((request, future))
        self._wake.set()
        try:
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            raise grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                       f"no answer within the client's timeout of {timeout} s") from None  # fmt: skip
        except _Unimplemented:
            return await self._feed(request, timeout=timeout, metadata=metadata)  # type: ignore[no-any-return]

    async def _send_forever(self) -> None:
        """Opens the stream, then sends what is queued whenever fewer than IN_FLIGHT messages wait."""
        while True:
            while not self._queue:
                await self._wake.wait()
                self._wake.clear()
            call = self._stub.FeedMany(metadata=self._metadata)
            reader = asyncio.create_task(self._read(call))
            try:
                while not reader.done():  # send first: the feeds that made this stream may be all there is
                    while self._queue and len(self._sent) < IN_FLIGHT and not reader.done():
                        batch, self._queue = self._queue[:MAX_ITEMS], self._queue[MAX_ITEMS:]
                        self._sent.append([future for _, future in batch])
                        await call.write(pb.FeedManyRequest(items=[request for request, _ in batch]))
                    await self._wake.wait()
                    self._wake.clear()
            except grpc.RpcError:
                pass  # the reader sees the same end of the stream and fails what was sent
            except asyncio.CancelledError:  # the client is closing
                call.cancel()
                reader.cancel()
                raise
            await asyncio.gather(reader, return_exceptions=True)
            if self._unimplemented:
                for _, future in self._queue:
                    future.set_exception(_Unimplemented())
                self._queue.clear()
                return

    async def _read(self, call: Any) -> None:
        try:
            async for response in call:
                futures = self._sent.popleft()
                for future, result in zip(futures, response.results, strict=True):
                    if not future.done():
                        if result.HasField("prediction"):
                            future.set_result(result.prediction)
                        else:
                            future.set_exception(_item_error(result.error))
                self._wake.set()  # room for the next message
        except grpc.RpcError as e:
            # the call's own status: a write that raced the server's end of the stream may have made
            # this error INTERNAL ("Internal error from Core") where the server said UNIMPLEMENTED
            self._unimplemented = grpc.StatusCode.UNIMPLEMENTED in (e.code(), await call.code())
            error: Exception = _Unimplemented() if self._unimplemented else e
        except Exception as e:  # a response this client cannot read: fail what waits, never leave it hanging
            call.cancel()
            error = grpc.aio.AioRpcError(grpc.StatusCode.INTERNAL, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                         f"the client could not read a FeedMany response: {e!r}")  # fmt: skip
        else:
            error = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                         "the server ended the FeedMany stream")  # fmt: skip
        while self._sent:  # sent but unanswered: maybe applied, which expected_position makes safe to retry
            for future in self._sent.popleft():
                if not future.done():
                    future.set_exception(error)
        self._wake.set()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []


def _item_error(error: pb.FeedError) -> grpc.aio.AioRpcError:
    """An item's error as the AioRpcError a Feed call with it would have raised."""
    pairs = [(POSITION_KEY, str(error.position))] if error.HasField("position") else []
    reason = end_reason(error)
    if reason:  # the metadata of a Feed's NOT_FOUND for a session that ended
        pairs.append((END_KEY, reason))
    if error.HasField("ended_at"):
        pairs.append((ENDED_AT_KEY, error.ended_at.ToDatetime(UTC).isoformat()))
    trailing = grpc.aio.Metadata(*pairs)
    code = _CODES.get(error.code, grpc.StatusCode.UNKNOWN)
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, error.message)
