"""The Prometheus endpoint: ``GET /metrics`` over HTTP/1.1, served by one event loop in one thread.

prometheus_client's own server (``start_http_server``) binds every interface, answers every path
with the metrics and starts a thread per connection, so half-open connections multiply threads.
This one binds the address it is given, answers ``/metrics`` only (404 elsewhere, 405 for methods
other than GET and HEAD), starts no thread per connection (one asyncio loop serves them all),
closes a connection whose request head has not arrived within ``HEAD_TIMEOUT_S`` or is over
``HEAD_LIMIT`` bytes, and holds at most
``MAX_WAITING`` connections that have not sent their request yet: a new one closes the oldest of
them, so idle sockets can neither exhaust the process's file descriptors nor lock a scraper out.
One request per connection (``Connection: close``)."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections import OrderedDict
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import choose_encoder

PATH = "/metrics"
HEAD_TIMEOUT_S = 5.0  # from connecting to the end of the request head
WRITE_TIMEOUT_S = 10.0  # to send the answer
HEAD_LIMIT = 16 * 1024  # bytes of request line and headers
MAX_WAITING = 128  # connections still to send their request head


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``, as gRPC reads an address: ``[::]`` (or ``::``) is every
    interface, IPv6 and IPv4, falling back to IPv4 alone where the host has no IPv6."""
    host = host.strip("[]")
    if host in ("", "::"):
        try:
            return _listen(socket.socket(socket.AF_INET6, socket.SOCK_STREAM), ("::", port), dual_stack=True)
        except OSError:  # no IPv6 here (a container without it, say): every IPv4 interface
            host = "0.0.0.0"
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    return _listen(socket.socket(family, kind, proto), address)


def _listen(sock: socket.socket, address: Any, dual_stack: bool = False) -> socket.socket:
    """``sock`` listening on ``address`` (of its family), or closed and OSError."""
    try:
        if dual_stack:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class MetricsServer:
    """The endpoint, running on its own event loop in one thread (``lstmd-metrics``): a scrape never
    waits for the gRPC event loop, and code on that loop may scrape it with a blocking call.
    ``start`` runs it, ``close`` stops it."""

    def __init__(self, sock: socket.socket, registry: CollectorRegistry):
        self.registry = registry
        self.loop = asyncio.new_event_loop()
        self.waiting: OrderedDict[asyncio.StreamWriter, None] = OrderedDict()  # connected, no request head yet
        self.open: set[asyncio.StreamWriter] = set()
        self.thread = threading.Thread(target=self.loop.run_forever, name="lstmd-metrics", daemon=True)
        self.thread.start()
        started = asyncio.run_coroutine_threadsafe(asyncio.start_server(self.handle, sock=sock, limit=HEAD_LIMIT),
                                                   self.loop)  # fmt: skip
        self.server = started.result()
        self.host, self.port = sock.getsockname()[:2]

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            for writer in self.open:
                writer.transport.abort()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(WRITE_TIMEOUT_S)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WRITE_TIMEOUT_S)
        self.loop.close()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self.waiting) >= MAX_WAITING:
            oldest, _ = self.waiting.popitem(last=False)
            oldest.transport.abort()
        self.waiting[writer] = None
        self.open.add(writer)
        answered = False
        try:
            async with asyncio.timeout(HEAD_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
            self.waiting.pop(writer, None)
            status, headers, body = answer(head, self.registry)
            response = [f"HTTP/1.1 {status}", *headers, f"Content-Length: {len(body)}", "Connection: close", "", ""]
            writer.write("\r\n".join(response).encode("latin-1"))
            if not head.startswith(b"HEAD "):
                writer.write(body)
            async with asyncio.timeout(WRITE_TIMEOUT_S):
                await writer.drain()
            answered = True
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # a client that is too slow, sends too much or goes away: drop it
        finally:
            self.waiting.pop(writer, None)
            self.open.discard(writer)
            if answered:
                writer.close()  # everything is sent: a clean close
            else:
                writer.transport.abort()  # never waits on a peer that does not read


def start(host: str, port: int, registry: CollectorRegistry = REGISTRY) -> MetricsServer:
    """Serve ``registry`` on ``host``:``port`` (0 picks a free port); raises OSError if it cannot bind."""
    return MetricsServer(bind(host, port), registry)


def answer(head: bytes, registry: CollectorRegistry) -> tuple[str, list[str], bytes]:
    """Status line, headers and body for a request ``head`` (request line and headers)."""
    lines = head.decode("latin-1").split("\r\n")
    method, target, *_ = [*lines[0].split(" "), "", ""]
    if method not in ("GET", "HEAD"):
        return "405 Method Not Allowed", ["Allow: GET, HEAD", "Content-Type: text/plain"], b"use GET\n"
    if target.split("?", 1)[0] != PATH:
        return "404 Not Found", ["Content-Type: text/plain"], f"not found: the metrics are at {PATH}\n".encode()
    accept = next((line.split(":", 1)[1].strip() for line in lines[1:] if line.lower().startswith("accept:")), "")
    encoder, content_type = choose_encoder(accept)
    return "200 OK", [f"Content-Type: {content_type}"], encoder(registry)
