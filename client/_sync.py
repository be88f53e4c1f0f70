"""The blocking client."""

from __future__ import annotations

import contextlib
import queue
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
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


class Client:
    """A connection to an lstmd server.

    >>> with Client("localhost:50051") as client:
    ...     with client.create_session() as session:
    ...         print(session.feed("the clouds are in the").candidates[0].word)

    ``timeout`` is the default deadline of each call in seconds (streams and generation: of
    the whole call, None for no deadline). Calls that are safe to repeat (reads, and feeds
    that carry ``expected_position``) are retried ``retries`` times on UNAVAILABLE and
    DEADLINE_EXCEEDED, with exponential back-off, and on UNAVAILABLE for up to
    ``wait_for_restart_s`` seconds (a server restarting), then raise; ``retries=0`` retries
    nothing.

    Recovery: a ``Session`` keeps the last ``recovery_tail`` tokens it was fed (0: none, no
    recovery). When the server lost the session (NOT_FOUND: restarted without it, expired,
    evicted) or holds it at an older position (restored from an older periodic snapshot after a
    crash), the session is recreated or caught up by re-feeding that tail, with
    ``expected_position``, and the caller's feed goes on. Exact when the tail covers what was
    lost, approximate otherwise: see ``Session.recoveries`` and ``Session.exact``.

    Security: ``api_key`` is sent as ``authorization: Bearer <key>`` with every call (use TLS
    beyond localhost, or the key travels in clear). ``tls=True`` verifies the server against the
    system's CAs, ``root_certificates`` (PEM bytes) against those instead; ``certificate_chain``
    and ``private_key`` (PEM bytes) present a client certificate, for servers that require one.
    """

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
            grpc.secure_channel(target, credentials, CHANNEL_OPTIONS)
            if credentials
            else grpc.insecure_channel(target, CHANNEL_OPTIONS)
        )
        self._stub = lstmd_pb2_grpc.LstmdStub(self._channel)
        self.target, self.timeout, self.retries = target, timeout, retries
        self.wait_for_restart_s, self.recovery_tail = wait_for_restart_s, recovery_tail
        self.metadata = call_metadata(metadata, api_key)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Callable[..., T], request: Any, retry: bool = True) -> T:
        backoff = Backoff(self.retries, self.wait_for_restart_s)
        while True:
            try:
                return method(request, timeout=self.timeout, metadata=self.metadata)
            except grpc.RpcError as e:
                error = from_rpc_error(e)
                delay = backoff.delay(error) if retry else None
                if delay is None:
                    raise error from None
                time.sleep(delay)

    def health(self, service: str = "") -> str:
        """The server's health status name, e.g. "SERVING"."""
        reply = self._call(
            health_pb2_grpc.HealthStub(self._channel).Check, health_pb2.HealthCheckRequest(service=service)
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    def list_models(self) -> list[ModelInfo]:
        return [ModelInfo.from_pb(m) for m in self._call(self._stub.ListModels, pb.ListModelsRequest()).models]

    def create_session(self, model: str = "", top_k: int = 0) -> Session:
        """A new session (not retried: a retry could leave an orphan session behind)."""
        return Session(self, self._create(model, top_k))

    def _create(self, model: str, top_k: int) -> SessionInfo:
        info = self._call(self._stub.CreateSession, pb.CreateSessionRequest(model=model, top_k=top_k), retry=False)
        return SessionInfo.from_pb(info)

    def get_session(self, session_id: str) -> Session:
        return Session(
            self, SessionInfo.from_pb(self._call(self._stub.GetSession, pb.GetSessionRequest(session_id=session_id)))
        )

    def delete_session(self, session_id: str) -> None:
        self._call(self._stub.DeleteSession, pb.DeleteSessionRequest(session_id=session_id), retry=False)

    def fork_session(self, session_id: str) -> Session:
        info = self._call(self._stub.ForkSession, pb.ForkSessionRequest(session_id=session_id), retry=False)
        return Session(self, SessionInfo.from_pb(info))

    def feed(
        self,
        session_id: str,
        data: Input,
        *,
        expected_position: int | None = None,
        top_k: int = 0,
        token_logprobs: bool = False,
    ) -> Prediction:
        """Append text (or token ids) to a session; the prediction after its last token.
        Retried only with ``expected_position``, which makes a retry unable to apply twice."""
        request = feed_request(session_id, data, expected_position, top_k, token_logprobs)
        return Prediction.from_pb(self._call(self._stub.Feed, request, retry=expected_position is not None))

    def stream(self, inputs: Iterable[Input], *, session_id: str = "", model: str = "", top_k: int = 0,
               token_logprobs: bool = False) -> Iterator[Prediction]:  # fmt: skip
        """Feed each input in turn on one stream; yields one prediction per input. Without a
        ``session_id`` the stream uses an ephemeral session, freed when it ends."""
        requests = (stream_request(data, top_k, token_logprobs, session_id, model) for data in inputs)
        try:
            for reply in self._stub.Stream(requests, timeout=None, metadata=self.metadata):
                yield Prediction.from_pb(reply)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def open_stream(self, session_id: str = "", model: str = "", top_k: int = 0) -> Stream:
        """A stream to feed interactively: ``stream.feed(text)`` returns each prediction."""
        return Stream(self, session_id, model, top_k)

    def generate(
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
    ) -> Iterator[GeneratedToken]:
        """Sample words after ``prompt`` (and the session's text), yielding each as it comes."""
        request = generate_request(session_id, prompt, max_tokens, temperature, top_k, top_p, seed, stop, model,
                                   expected_position)  # fmt: skip
        try:
            for reply in self._stub.Generate(request, timeout=None, metadata=self.metadata):
                yield GeneratedToken.from_pb(reply)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None


class Stream:
    """One bidirectional stream fed one input at a time. Close it (or use ``with``) when done."""

    def __init__(self, client: Client, session_id: str, model: str, top_k: int):
        self._requests: queue.Queue[pb.StreamRequest | None] = queue.Queue()
        self._session_id, self._model, self._top_k = session_id, model, top_k
        self._replies = client._stub.Stream(iter(self._requests.get, None), metadata=client.metadata)

    def feed(self, data: Input, top_k: int = 0, token_logprobs: bool = False) -> Prediction:
        request = stream_request(data, top_k or self._top_k, token_logprobs, self._session_id, self._model)
        self._requests.put(request)
        self._session_id = self._model = ""  # the server reads them from the first message only
        try:
            return Prediction.from_pb(next(self._replies))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def close(self) -> None:
        self._requests.put(None)
        self._replies.cancel()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Session:
    """A server session. Feeds carry ``expected_position``, so they are exactly-once and safely
    retried. As a context manager it deletes itself on exit.

    It keeps the tail of what it was fed (``Client(recovery_tail=...)``) and recovers from a
    server that lost it or went back to an older snapshot (see ``Client``): ``id`` then changes
    when the session was recreated, and ``position`` follows the server (after an approximate
    recovery it is where the re-fed tail ends). ``recoveries`` lists every recovery; ``exact``
    stays True while every recovery was exact."""

    def __init__(self, client: Client, info: SessionInfo, tail: Tail | None = None):
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

    def feed(self, data: Input, top_k: int = 0, token_logprobs: bool = False) -> Prediction:
        for recovered in range(MAX_RECOVERIES + 1):
            try:
                prediction = self.client.feed(self.id, data, expected_position=self.position, top_k=top_k,
                                              token_logprobs=token_logprobs)  # fmt: skip
            except (NotFound, PositionMismatch) as error:
                if recovered == MAX_RECOVERIES or not self._recover(error):
                    raise
                continue
            self._fed([t.id for t in prediction.tokens], prediction.position)
            return prediction
        raise AssertionError("unreachable")

    def generate(self, prompt: str = "", **options: Any) -> Iterator[GeneratedToken]:
        """Sample words after the session's text (after ``prompt``, fed first as an ordinary feed,
        so the recovery tail knows its tokens). A generation cut off by a failure is not resumed."""
        if prompt:
            self.feed(prompt)
        for recovered in range(MAX_RECOVERIES + 1):
            started = False
            try:
                for token in self.client.generate(session_id=self.id, expected_position=self.position, **options):
                    started = True
                    self._fed([token.token_id], token.position)
                    yield token
                return
            except (NotFound, PositionMismatch) as error:
                if started or recovered == MAX_RECOVERIES or not self._recover(error):
                    raise
        raise AssertionError("unreachable")

    def _fed(self, ids: list[int], position: int) -> None:
        self._tail.add(ids, position)
        self.position = position

    def _recover(self, error: LstmdError) -> bool:
        plan = None if self._deleted else self._tail.plan(error, self.position)
        if plan is None:
            return False
        old = self.id
        if plan.recreate:
            info = self.client._create(self.info.model, self.info.top_k)
            if info.model_version != self.info.model_version:  # token ids may mean other words now
                self.client.delete_session(info.session_id)
                return False
            self.info, self.id = info, info.session_id
        position = plan.start
        for chunk in plan.chunks:
            position = self.client.feed(self.id, chunk, expected_position=position, top_k=1).position
        self._recovered(plan, old, position)
        return True

    def _recovered(self, plan: Plan, old_id: str, position: int) -> None:
        recovery = Recovery(plan.reason, old_id, self.id, plan.start, position, sum(map(len, plan.chunks)),
                            plan.exact)  # fmt: skip
        self.recoveries.append(recovery)
        self._tail.end = self.position = position
        report(recovery)

    def fork(self) -> Session:
        """A copy, which knows this session's tail (and so recovers as well as it would)."""
        twin = self.client.fork_session(self.id)
        if twin.position == self.position:
            twin._tail = self._tail.copy()
        return twin

    def refresh(self) -> SessionInfo:
        self.info = self.client.get_session(self.id).info
        if self.info.position != self.position:
            self._tail.reset(self.info.position)
        self.position = self.info.position
        return self.info

    def delete(self) -> None:
        self._deleted = True
        self.client.delete_session(self.id)

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with contextlib.suppress(NotFound):
            self.delete()
