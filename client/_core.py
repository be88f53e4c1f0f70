"""What the blocking and the asyncio client share, written once: options, credentials, call
metadata, the requests and results of each call, retries, and the recovery of a session.

The logic of each unary call is a *flow*: a generator that yields what it needs done (a
``Call`` to make, a ``Sleep`` between retries), gets the reply sent back or the error thrown in,
and returns the result. ``Client`` and ``AsyncClient`` differ in how they run a flow (``_run``:
blocking, or awaited) and in the streaming calls, which they write out each: the I/O only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, Unpack

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lstmd.client._errors import LstmdError, NotFound, PositionMismatch, from_feed_error
from lstmd.client._recovery import (
    DEFAULT_TAIL,
    DEFAULT_WAIT_FOR_RESTART_S,
    MAX_RECOVERIES,
    Backoff,
    Plan,
    Recovery,
    Tail,
    log,
    report,
)
from lstmd.client._types import (
    FeedOptions,
    Input,
    ModelInfo,
    Prediction,
    Reload,
    SessionInfo,
    Tokenization,
    feed_request,
    stream_request,
)
from lstmd.v1 import lstmd_pb2 as pb
from lstmd.v1 import lstmd_pb2_grpc

T = TypeVar("T")
Metadata = Sequence[tuple[str, str]]
DEFAULT_TARGET = "localhost:50051"
# Reconnect to a restarted server within a second or two, not after gRPC's default back-off (up to 2 min).
CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2000)]


def make_credentials(
    tls: bool, root_certificates: bytes | None, certificate_chain: bytes | None, private_key: bytes | None
) -> grpc.ChannelCredentials | None:
    """TLS credentials when any TLS option is given (a client certificate and key: mutual TLS)."""
    if bool(certificate_chain) != bool(private_key):
        raise ValueError("certificate_chain and private_key go together (mutual TLS): give both or neither")
    if not (tls or root_certificates or certificate_chain):
        return None
    return grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)


def call_metadata(metadata: Metadata, api_key: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata sent with every call: ``metadata``, and the API key as a bearer token."""
    return (*metadata, *((("authorization", f"Bearer {api_key}"),) if api_key else ()))


@dataclass(frozen=True)
class Call:
    """One attempt at a unary call: ``method`` (a stub's) with ``request``; the reply is sent back."""

    method: Callable[..., Any]
    request: Any


@dataclass(frozen=True)
class Sleep:
    """A pause of ``seconds`` before the next attempt."""

    seconds: float


Flow = Generator[Call | Sleep, Any, T]


class Steps(Generic[T]):
    """Runs a flow for a driver: iterate for what to do, report each outcome with ``reply`` or
    ``fail``; when the iteration ends, ``result`` holds what the flow returned. An error the flow
    does not handle comes out of the iteration."""

    result: T

    def __init__(self, flow: Flow[T]):
        self._flow = flow
        self._resume: Callable[[], Call | Sleep] = flow.__next__

    def __iter__(self) -> Steps[T]:
        return self

    def __next__(self) -> Call | Sleep:
        try:
            return self._resume()
        except StopIteration as done:
            self.result = done.value
            raise StopIteration from None

    def reply(self, value: Any) -> None:
        self._resume = functools.partial(self._flow.send, value)

    def fail(self, error: LstmdError) -> None:
        self._resume = functools.partial(self._flow.throw, error)


class BaseClient:
    """The options and the unary calls of ``Client`` and ``AsyncClient`` (see ``Client``)."""

    _channel: grpc.Channel | grpc.aio.Channel
    _stub: lstmd_pb2_grpc.LstmdStub | lstmd_pb2_grpc.LstmdAsyncStub

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
        self._connect(target, make_credentials(tls, root_certificates, certificate_chain, private_key))
        self._health_stub = health_pb2_grpc.HealthStub(self._channel)
        self.target, self.timeout, self.retries = target, timeout, retries
        self.wait_for_restart_s, self.recovery_tail = wait_for_restart_s, recovery_tail
        self.metadata = call_metadata(metadata, api_key)

    def _connect(self, target: str, credentials: grpc.ChannelCredentials | None) -> None:
        """Open ``_channel`` (TLS with ``credentials``, plaintext without) and its ``_stub``."""
        raise NotImplementedError

    def _unary(self, method: Callable[..., Any], request: Any, retry: bool = True) -> Flow[Any]:
        """A call, retried as ``Backoff`` says (``retry=False``: never, for calls unsafe to repeat)."""
        backoff = Backoff(self.retries, self.wait_for_restart_s)
        while True:
            try:
                return (yield Call(method, request))
            except LstmdError as error:
                delay = backoff.delay(error) if retry else None
                if delay is None:
                    raise
            yield Sleep(delay)

    def _health(self, service: str) -> Flow[str]:
        reply = yield from self._unary(self._health_stub.Check, health_pb2.HealthCheckRequest(service=service))
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    def _list_models(self) -> Flow[list[ModelInfo]]:
        reply = yield from self._unary(self._stub.ListModels, pb.ListModelsRequest())
        return [ModelInfo.from_pb(m) for m in reply.models]

    def _reload(self, pins: dict[str, str] | None) -> Flow[Reload]:
        """Not retried: the retry of a reload that took effect would report nothing loaded."""
        request = pb.ReloadModelsRequest(pins=pins or {})
        return Reload.from_pb((yield from self._unary(self._stub.ReloadModels, request, retry=False)))

    def _tokenize(self, text: str, model: str) -> Flow[Tokenization]:
        """Retried: it changes nothing on the server."""
        request = pb.TokenizeRequest(model=model, text=text)
        return Tokenization.from_pb((yield from self._unary(self._stub.Tokenize, request)))

    def _create(self, model: str, top_k: int) -> Flow[SessionInfo]:
        """Not retried: a retry could leave an orphan session behind."""
        request = pb.CreateSessionRequest(model=model, top_k=top_k)
        return SessionInfo.from_pb((yield from self._unary(self._stub.CreateSession, request, retry=False)))

    def _get(self, session_id: str) -> Flow[SessionInfo]:
        request = pb.GetSessionRequest(session_id=session_id)
        return SessionInfo.from_pb((yield from self._unary(self._stub.GetSession, request)))

    def _delete(self, session_id: str) -> Flow[None]:
        yield from self._unary(self._stub.DeleteSession, pb.DeleteSessionRequest(session_id=session_id), retry=False)

    def _fork(self, session_id: str) -> Flow[SessionInfo]:
        request = pb.ForkSessionRequest(session_id=session_id)
        return SessionInfo.from_pb((yield from self._unary(self._stub.ForkSession, request, retry=False)))

    def _export(self, session_id: str, encrypt: bool, end_session: bool) -> Flow[bytes]:
        """Retried only without ``end_session``: the retry of an export that ended the session would find
        it gone, and the blob of the first attempt lost with its reply."""
        request = pb.ExportSessionRequest(session_id=session_id, encrypt=encrypt, end_session=end_session)
        reply = yield from self._unary(self._stub.ExportSession, request, retry=not end_session)
        return bytes(reply.blob)

    def _import(self, blob: bytes, keep_id: bool) -> Flow[SessionInfo]:
        """Not retried: a retry could leave an orphan session behind (with ``keep_id``: find its own id taken)."""
        request = pb.ImportSessionRequest(blob=blob, keep_id=keep_id)
        return SessionInfo.from_pb((yield from self._unary(self._stub.ImportSession, request, retry=False)))

    def _feed(self, session_id: str, data: Input, **options: Unpack[FeedOptions]) -> Flow[Prediction]:
        """Retried only with ``expected_position``, which makes a retry unable to apply twice."""
        request = feed_request(session_id, data, **options)
        retry = options.get("expected_position") is not None
        return Prediction.from_pb((yield from self._unary(self._feed_method(), request, retry=retry)))

    def _feed_method(self) -> Callable[..., Any]:
        """What a feed is sent with: the Feed call (``AsyncClient``: FeedMany messages shared with
        concurrent feeds)."""
        return self._stub.Feed


C = TypeVar("C", bound=BaseClient)


def feed_many_results(response: pb.FeedManyResponse) -> list[Prediction | LstmdError]:
    """Each item's Prediction, or the error a Feed of it would have raised (returned, not raised)."""
    return [Prediction.from_pb(r.prediction) if r.HasField("prediction") else from_feed_error(r.error)
            for r in response.results]  # fmt: skip


def completion(prefix: str, top_k: int, exclude_special: bool) -> FeedOptions:
    """The options of ``complete(prefix)``: a prefix-only feed, which completes ``prefix``."""
    if not prefix:
        raise ValueError("complete() takes the typed start of a word; feed() gives the next words")
    return FeedOptions(top_k=top_k, word_prefix=prefix, exclude_special=exclude_special)


class BaseStream:
    """What ``Stream`` and ``AsyncStream`` send: the session and model go with the first message only."""

    def __init__(self, session_id: str, model: str, top_k: int):
        self._session_id, self._model, self._top_k = session_id, model, top_k

    def _request(self, data: Input, **options: Unpack[FeedOptions]) -> pb.StreamRequest:
        options["top_k"] = options.get("top_k") or self._top_k
        request = stream_request(data, self._session_id, self._model, **options)
        self._session_id = self._model = ""  # the server reads them from the first message only
        return request


class BaseSession(Generic[C]):
    """The state and the recovery of ``Session`` and ``AsyncSession`` (see ``Session``)."""

    def __init__(self, client: C, info: SessionInfo, tail: Tail | None = None):
        self.client = client
        self.info = info
        self.id = info.session_id
        self.position = info.position
        self.recoveries: list[Recovery] = []
        self._tail = tail or Tail(client.recovery_tail, info.position)
        self._deleted = False
        self._moved = False  # exported with end_session: its id may be an imported copy's now, never deleted here

    @property
    def exact(self) -> bool:
        """False once a recovery had to be approximate (the tail was shorter than what was lost)."""
        return all(r.exact for r in self.recoveries)

    def _feed(self, data: Input, **options: Unpack[FeedOptions]) -> Flow[Prediction]:
        """A feed at the session's position, recovering the session as often as it must. A
        prefix-only feed (no input, a ``word_prefix``) applies nothing, so the tail records nothing;
        it carries ``expected_position`` all the same, so a lost session is recovered before it."""
        prefix_only = not data and bool(options.get("word_prefix"))
        for attempt in range(MAX_RECOVERIES + 1):
            options["expected_position"] = self.position
            try:
                prediction = yield from self.client._feed(self.id, data, **options)
            except (NotFound, PositionMismatch) as error:
                if not (yield from self._recover(error, attempt)):
                    raise
                continue
            if not prefix_only:
                self._fed([t.id for t in prediction.tokens], prediction.position)
            return prediction
        raise AssertionError("unreachable")

    def _fed(self, ids: list[int], position: int) -> None:
        self._tail.add(ids, position)
        self.position = position

    def _recover(self, error: LstmdError, attempt: int) -> Flow[bool]:
        """Recover from ``error`` on the ``attempt``-th recovery of a call; False when it cannot."""
        plan = None if self._deleted or attempt >= MAX_RECOVERIES else self._tail.plan(error, self.position)
        if plan is None:
            return False
        old = self.id
        if plan.recreate:
            info = yield from self.client._create(self.info.model, self.info.top_k)
            if not _same_meaning(self.info, info, plan.reason):  # token ids may mean other words now
                yield from self.client._delete(info.session_id)
                log.warning("session %s, on version %s, not recreated: a new one goes to version %s, where its "
                            "tail's token ids may mean other words", self.id, self.info.model_version,
                            info.model_version)  # fmt: skip
                return False
            self.info, self.id = info, info.session_id
        position = plan.start
        for chunk in plan.chunks:
            # token candidates: a re-feed wants no prediction, and no word search for one
            position = (yield from self.client._feed(self.id, chunk, expected_position=position, top_k=1,
                                                     tokens=True)).position  # fmt: skip
        self._recovered(plan, old, position)
        return True

    def _recovered(self, plan: Plan, old_id: str, position: int) -> None:
        recovery = Recovery(plan.reason, old_id, self.id, plan.start, position, sum(map(len, plan.chunks)),
                            plan.exact, plan.ended)  # fmt: skip
        self.recoveries.append(recovery)
        self._tail.end = self.position = position
        report(recovery)

    def _fork(self) -> Flow[tuple[SessionInfo, Tail | None]]:
        """The copy's info, and this session's tail for it when the copy is at the same position."""
        info = yield from self.client._fork(self.id)
        return info, (self._tail.copy() if info.position == self.position else None)

    def _refresh(self) -> Flow[SessionInfo]:
        self.info = yield from self.client._get(self.id)
        if self.info.position != self.position:
            self._tail.reset(self.info.position)
        self.position = self.info.position
        return self.info

    def _delete(self) -> Flow[None]:
        self._deleted = True
        if not self._moved:
            yield from self.client._delete(self.id)

    def _export(self, encrypt: bool, end_session: bool) -> Flow[bytes]:
        blob = yield from self.client._export(self.id, encrypt, end_session)
        if end_session:  # moved into the blob: nothing here to recover, or to delete
            self._deleted = self._moved = True
        return blob


def _same_meaning(old: SessionInfo, new: SessionInfo, reason: str) -> bool:
    """Whether the tail's token ids mean on ``new`` what they meant on ``old``: the same version, or,
    for a session whose version was unloaded, a version with the same vocabulary."""
    if new.model_version == old.model_version:
        return True
    return reason == "unloaded" and bool(old.vocabulary_sha256) and new.vocabulary_sha256 == old.vocabulary_sha256
