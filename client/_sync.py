"""The blocking client: the I/O of ``Client``, ``Session`` and ``Stream``; the rest is in ``_core``."""

from __future__ import annotations

import contextlib
import queue
import time
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Unpack

import grpc

from lstmd.client._core import (
    CHANNEL_OPTIONS,
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


class Client(BaseClient):
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

    _channel: grpc.Channel
    _stub: lstmd_pb2_grpc.LstmdStub

    def _connect(self, target: str, credentials: grpc.ChannelCredentials | None) -> None:
        self._channel = (
            grpc.secure_channel(target, credentials, CHANNEL_OPTIONS)
            if credentials
            else grpc.insecure_channel(target, CHANNEL_OPTIONS)
        )
        self._stub = lstmd_pb2_grpc.LstmdStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _run(self, flow: Flow[T]) -> T:
        """Do what ``flow`` asks, a blocking call or sleep at a time, and return its result."""
        steps = Steps(flow)
        for step in steps:
            try:
                if isinstance(step, Sleep):
                    time.sleep(step.seconds)
                    steps.reply(None)
                else:
                    steps.reply(step.method(step.request, timeout=self.timeout, metadata=self.metadata))
            except grpc.RpcError as e:
                steps.fail(from_rpc_error(e))
        return steps.result

    def health(self, service: str = "") -> str:
        """The server's health status name, e.g. "SERVING"."""
        return self._run(self._health(service))

    def list_models(self) -> list[ModelInfo]:
        return self._run(self._list_models())

    def reload_models(self, pins: dict[str, str] | None = None) -> Reload:
        """Load the new version folders in the server's models folder and serve each model's newest
        version, or the one ``pins`` names ({"tiny": "1"}; "" unpins); the versions no longer served
        drain; with sessions in Redis every replica follows. Pins last until the server restarts
        (LSTMD_MODEL_VERSIONS sets them at start). An admin call: PermissionDenied for an API key not
        in the server's LSTMD_ADMIN_KEYS; InvalidInput for a pin of a model or version the models
        folder lacks; FailedPrecondition, with nothing changed, when a folder cannot be served. The
        server loads a version before it answers: the client's ``timeout`` must allow for that."""
        return self._run(self._reload(pins))

    def tokenize(self, text: str, model: str = "") -> Tokenization:
        """The tokens ``text`` becomes on ``model`` (the server's default when empty), as a feed of
        it would apply them; no session is made or stepped."""
        return self._run(self._tokenize(text, model))

    def create_session(self, model: str = "", top_k: int = 0) -> Session:
        """A new session (not retried: a retry could leave an orphan session behind)."""
        return Session(self, self._run(self._create(model, top_k)))

    def get_session(self, session_id: str) -> Session:
        return Session(self, self._run(self._get(session_id)))

    def delete_session(self, session_id: str) -> None:
        self._run(self._delete(session_id))

    def fork_session(self, session_id: str) -> Session:
        return Session(self, self._run(self._fork(session_id)))

    def export_session(self, session_id: str, *, encrypt: bool = False, end_session: bool = False) -> bytes:
        """The session as a blob (portable session state), for ``import_session`` on this server or any
        other with the same session key (LSTMD_SESSION_KEYS) and model version. ``encrypt``: its holder
        cannot read it (else it is signed only); ``end_session``: the session ends here once exported,
        a move (not retried then: a retry would find it gone)."""
        return self._run(self._export(session_id, encrypt, end_session))

    def import_session(self, blob: bytes, *, keep_id: bool = False) -> Session:
        """The session an ``export_session`` blob holds, answering exactly as it would have, under a new id
        (``keep_id``: its own; AlreadyExists when taken). Its recovery tail starts empty: the client knows
        nothing of its history, so a recovery of it is approximate (keep the blob to start over from it)."""
        return Session(self, self._run(self._import(blob, keep_id)))

    def feed(self, session_id: str, data: Input, **options: Unpack[FeedOptions]) -> Prediction:
        """Append text (or token ids) to a session; the prediction after its last token: the most
        likely next words, or tokens, or completions of a ``word_prefix`` (with an empty input, a
        prefix-only feed, which applies nothing). Retried only with ``expected_position``, which
        makes a retry unable to apply twice (``FeedOptions``)."""
        return self._run(self._feed(session_id, data, **options))

    def feed_many(self, items: Iterable[FeedItem]) -> list[Prediction | LstmdError]:
        """Feeds of many sessions in one FeedMany message, each ``(session_id, input)`` or
        ``(session_id, input, FeedOptions)``: per item, its Prediction or the error a Feed of it
        would raise (returned, not raised: one bad item fails alone). Items of one session apply
        in order. Not retried: give items ``expected_position`` and send them again after an error."""
        try:
            [response] = self._stub.FeedMany(iter([feed_many_request(items)]), timeout=self.timeout,
                                             metadata=self.metadata)  # fmt: skip
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return feed_many_results(response)

    def stream(self, inputs: Iterable[Input], *, session_id: str = "", model: str = "", top_k: int = 0,
               token_logprobs: bool = False, tokens: bool = False,
               exclude_special: bool = False) -> Iterator[Prediction]:  # fmt: skip
        """Feed each input in turn on one stream; yields one prediction per input (its candidates
        the model's tokens with ``tokens``, leaving special tokens out with ``exclude_special``).
        Without a ``session_id`` the stream uses an ephemeral session, freed when it ends."""
        requests = (stream_request(data, session_id, model, top_k=top_k, token_logprobs=token_logprobs, tokens=tokens,
                                   exclude_special=exclude_special) for data in inputs)  # fmt: skip
        try:
            for reply in self._stub.Stream(requests, timeout=None, metadata=self.metadata):
                yield Prediction.from_pb(reply)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def open_stream(self, session_id: str = "", model: str = "", top_k: int = 0) -> Stream:
        """A stream to feed interactively: ``stream.feed(text)`` returns each prediction."""
        return Stream(self, session_id, model, top_k)

    def generate(self, prompt: str = "", **options: Unpack[GenerateOptions]) -> Iterator[GeneratedToken]:
        """Sample words after ``prompt`` (and the session's text), yielding each as it comes
        (``GenerateOptions``)."""
        request = generate_request(prompt, **options)
        try:
            for reply in self._stub.Generate(request, timeout=None, metadata=self.metadata):
                yield GeneratedToken.from_pb(reply)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None


class Stream(BaseStream):
    """One bidirectional stream fed one input at a time. Close it (or use ``with``) when done."""

    def __init__(self, client: Client, session_id: str, model: str, top_k: int):
        super().__init__(session_id, model, top_k)
        self._requests: queue.Queue[pb.StreamRequest | None] = queue.Queue()
        self._replies = client._stub.Stream(iter(self._requests.get, None), metadata=client.metadata)

    def feed(self, data: Input, top_k: int = 0, token_logprobs: bool = False, *, word_prefix: str = "",
             tokens: bool = False, exclude_special: bool = False) -> Prediction:  # fmt: skip
        """Append ``data`` to the stream's session; as ``Session.feed``."""
        return self._exchange(self._request(data, top_k=top_k, token_logprobs=token_logprobs, word_prefix=word_prefix,
                                            tokens=tokens, exclude_special=exclude_special))  # fmt: skip

    def complete(self, prefix: str, top_k: int = 0, exclude_special: bool = True) -> Prediction:
        """The most likely words that begin with ``prefix``; as ``Session.complete``."""
        return self._exchange(self._request("", **completion(prefix, top_k, exclude_special)))

    def _exchange(self, request: pb.StreamRequest) -> Prediction:
        self._requests.put(request)
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


class Session(BaseSession[Client]):
    """A server session. Feeds carry ``expected_position``, so they are exactly-once and safely
    retried. As a context manager it deletes itself on exit.

    It keeps the tail of what it was fed (``Client(recovery_tail=...)``) and recovers from a
    server that lost it or went back to an older snapshot (see ``Client``): ``id`` then changes
    when the session was recreated, and ``position`` follows the server (after an approximate
    recovery it is where the re-fed tail ends). ``recoveries`` lists every recovery; ``exact``
    stays True while every recovery was exact."""

    def feed(self, data: Input, top_k: int = 0, token_logprobs: bool = False, *, word_prefix: str = "",
             tokens: bool = False, exclude_special: bool = False) -> Prediction:  # fmt: skip
        """Append text (or token ids) to the session; the prediction after its last token: its
        ``top_k`` candidates (0: the session's default), whole next words, or the model's tokens
        with ``tokens``, without the special tokens with ``exclude_special``; the log-probability of
        each token fed with ``token_logprobs``. With ``word_prefix`` (the typed start of the word
        after ``data``, not fed) the candidates are the most likely words that begin with it."""
        return self.client._run(self._feed(data, top_k=top_k, token_logprobs=token_logprobs, word_prefix=word_prefix,
                                           tokens=tokens, exclude_special=exclude_special))  # fmt: skip

    def complete(self, prefix: str, top_k: int = 0, exclude_special: bool = True) -> Prediction:
        """The most likely words that begin with ``prefix``, the typed start of the next word
        after the session's text (a new word, after whitespace unless the text already ends with
        whitespace or punctuation), special tokens left out unless ``exclude_special=False``: a
        prefix-only feed, which applies nothing, so ``position`` stays where it is. Feed the word
        when it is finished, with the whitespace before it (" clouds"), not the whitespace alone."""
        return self.client._run(self._feed("", **completion(prefix, top_k, exclude_special)))

    def generate(self, prompt: str = "", **options: Unpack[SamplingOptions]) -> Iterator[GeneratedToken]:
        """Sample words after the session's text (after ``prompt``, fed first as an ordinary feed,
        so the recovery tail knows its tokens). A generation cut off by a failure is not resumed."""
        if prompt:
            self.feed(prompt)
        for attempt in range(MAX_RECOVERIES + 1):
            started = False
            try:
                for token in self.client.generate(session_id=self.id, expected_position=self.position, **options):
                    started = True
                    self._fed([token.token_id], token.position)
                    yield token
                return
            except (NotFound, PositionMismatch) as error:
                if started or not self.client._run(self._recover(error, attempt)):
                    raise
        raise AssertionError("unreachable")

    def fork(self) -> Session:
        """A copy, which knows this session's tail (and so recovers as well as it would)."""
        return Session(self.client, *self.client._run(self._fork()))

    def refresh(self) -> SessionInfo:
        return self.client._run(self._refresh())

    def delete(self) -> None:
        self.client._run(self._delete())

    def export(self, *, encrypt: bool = False, end_session: bool = False) -> bytes:
        """This session as a blob (``Client.export_session``); with ``end_session`` it ends here."""
        return self.client._run(self._export(encrypt, end_session))

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with contextlib.suppress(NotFound):
            self.delete()
