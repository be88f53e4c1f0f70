"""The server's domain core: sessions, feeds and generation over batched model steps.

The gRPC servicer only converts messages and calls this; nothing here knows about protobuf.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from lstmd.model.tokenizer import Encoding, TextTooLong, Tokenizer
from lstmd.server.batcher import Batcher, Sampling, StepResult
from lstmd.server.errors import (
    FailedPrecondition,
    InvalidInput,
    LstmdError,
    NotFound,
    PositionMismatch,
    SessionEnded,
    StoreUnavailable,
    echo,
    rfc3339,
)
from lstmd.server.registry import NO_TOKEN, Model, ModelRegistry
from lstmd.server.sessions import Session, SessionStore
from lstmd.server.settings import Settings
from lstmd.server.words import search

if TYPE_CHECKING:  # given by the app: server.session_blob imports server.exactly_once, which imports this module
    from lstmd.server.session_blob import SessionBlobs

log = logging.getLogger(__name__)
MAX_CONFLICTS = 16  # a step whose compare-and-set other replicas win this often in a row is refused
MAX_WORD_PREFIX = 64  # characters of a typed word prefix
MAX_STOP_WORDS = 32  # stop words of one Generate
MAX_STOP_CHARS = 64  # characters of one stop word, also once normalised: it is compared with one token
# Texts tokenized on the event loop, where that costs less than the hop to a thread and back:
# ASCII up to INLINE_CHARS, other text up to INLINE_OTHER_CHARS (NFKC spells some characters out
# in up to 18). Longer ones go to a worker thread, so that a long text holds up no other call.
INLINE_CHARS = 2048
INLINE_OTHER_CHARS = 128


# The types below are created for every token streamed: plain slotted dataclasses, which
# construct about twice as fast as frozen ones.
@dataclass(slots=True)
class Token:
    id: int
    word: str
    unknown: bool


@dataclass(slots=True)
class Candidate:
    word: str  # a whole word, or a token as the vocabulary spells it
    token_id: int  # the token, or a word's first token
    probability: float
    kind: str  # "word" or "token"
    text: str  # what it adds to the session's text, decoded by the model's tokenizer
    token_ids: list[int]  # the token, or the word's most likely spelling


@dataclass(slots=True)
class Prediction:
    session_id: str
    position: int
    tokens: list[Token]
    candidates: list[Candidate]
    token_logprobs: list[float]
    replayed: bool = False


@dataclass(slots=True)
class Tokenization:
    """Text as a model's tokens, as a feed of it would apply them."""

    model: str
    tokenizer: str  # the tokenizer's kind
    tokens: list[Token]


@dataclass(slots=True)
class FeedArgs:
    text: str | None = None
    token_ids: list[int] | None = None
    expected_position: int | None = None
    top_k: int = 0  # 0: the session's default
    want_logprobs: bool = False
    word_prefix: str = ""  # the typed start of the next word: candidates begin with it; never applied
    token_candidates: bool = False  # the model's tokens instead of whole words
    exclude_special: bool = False


@dataclass(frozen=True, slots=True)
class _Wanted:
    """The candidates a feed asks for, checked against its model."""

    k: int
    graph_k: int  # asked of the graph's top-k: k, and room for the special tokens left out
    prefix: str  # as the tokenizer spells words
    search: bool  # whole words of a subword or character model: the beam search
    exclude_special: bool
    token_kind: bool  # candidates are tokens (not words)

    @property
    def full(self) -> bool:
        """Whether the whole distribution is needed (the graph's top-k will not do)."""
        return self.search or bool(self.prefix)


@dataclass(frozen=True)
class GenerateArgs:
    prompt: str = ""
    max_tokens: int = 0
    temperature: float = 0.0  # 0: 1.0
    top_k: int = 0
    top_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    expected_position: int | None = None
    allow_eos: bool = False


@dataclass(slots=True)
class GeneratedWord:
    session_id: str
    word: str
    token_id: int
    probability: float
    position: int
    text: str  # what this token adds to the session's text, decoded by the model's tokenizer
    finish: str = ""  # on the last word: "max_tokens" or "stop_word"


class FeedOrder:
    """The order of one FeedMany stream's items per session: a session's items wait for its items of
    earlier messages, which may still be running (the stream works on several messages at a time).
    A message claims its sessions' turns before anything of it runs."""

    def __init__(self) -> None:
        self._last: dict[str, asyncio.Future[None]] = {}  # session id: done when its latest items are

    def claim(self, session_id: str) -> tuple[asyncio.Future[None] | None, asyncio.Future[None]]:
        """(the turn to wait for, or None: the session has nothing running; this turn, to ``release``)."""
        before = self._last.get(session_id)
        self._last[session_id] = turn = asyncio.get_running_loop().create_future()
        return before, turn

    def release(self, session_id: str, turn: asyncio.Future[None]) -> None:
        turn.set_result(None)
        if self._last.get(session_id) is turn:
            del self._last[session_id]


@dataclass(slots=True)
class _Quick:
    """An item of FeedMany stepped with others in one batcher request: one token, the graph's top-k."""

    index: int
    session: Session
    args: FeedArgs
    wanted: _Wanted
    token: Token
    turn: asyncio.Future[None] | None  # this session's turn in its FeedOrder, released after the step (or None)


class Engine:
    """Sessions, feeds and generation over one SessionStore: this process's memory, or Redis for replicas.
    A step is computed on the store's Session and then ``commit``ted to the store."""

    def __init__(self, settings: Settings, registry: ModelRegistry, store: SessionStore,
                 blobs: SessionBlobs | None = None):  # fmt: skip
        self.settings = settings
        self.registry = registry
        self.store = store
        self.blobs = blobs  # the session keys' sealer (ExportSession, ImportSession); None: no keys configured
        # a thread per model name, and one more per name for a version loaded beside it (server.versions)
        self._executor = ThreadPoolExecutor(max_workers=2 * len(registry.models), thread_name_prefix="onnxruntime")
        # one thread: tokenizing is Python, serialised by the GIL anyway, and one thread bounds what
        # long texts being tokenized hold at once; ONNX Runtime's threads never wait behind it
        self._tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        self._batchers: dict[Model, Batcher] = {}  # per loaded version
        self._unloaded: dict[tuple[str, str], float] = {}  # (name, version) of an unloaded version: when
        self._started = False
        for model in registry.loaded():
            self._add_batcher(model)

    def _add_batcher(self, model: Model) -> Batcher:
        batcher = Batcher(model, self._executor, self.settings.max_batch_size, self.settings.max_batch_wait_ms / 1000)
        self._batchers[model] = batcher
        return batcher

    async def start(self) -> None:
        self._started = True
        for batcher in self._batchers.values():
            batcher.start()
        await self.store.start()

    def add_model(self, model: Model) -> None:
        """Serve steps of a newly loaded version (its batcher runs from now, or from ``start``)."""
        if model not in self._batchers:
            batcher = self._add_batcher(model)
            if self._started:
                batcher.start()

    async def remove_model(self, model: Model) -> None:
        """Stop the batcher of an unloaded version; with it goes the last reference to its ONNX Runtime session.
        A call still stepping a session of it (one that held the session across the unload) fails "unloaded"."""
        batcher = self._batchers.pop(model, None)
        if batcher is not None:
            self._unloaded[(model.name, model.version)] = time.time()
            await batcher.stop(self._unloaded_error(model))

    def _batcher(self, model: Model) -> Batcher:
        batcher = self._batchers.get(model)
        if batcher is None:  # a call that held the session across the unload
            raise self._unloaded_error(model)
        return batcher

    def _unloaded_error(self, model: Model) -> SessionEnded:
        when = self._unloaded.get((model.name, model.version), time.time())
        return SessionEnded(
            f"the session's model {model.name} version {model.version} was unloaded after its drain "
            f"(LSTMD_VERSION_DRAIN_S) at {rfc3339(when)}, while this call ran; create a new session: it goes to the "
            "version served now",
            "unloaded",
            when,
        )

    async def stop(self) -> None:
        for batcher in self._batchers.values():
            await batcher.stop()
        self._executor.shutdown(wait=True)
        self._tokenizer_thread.shutdown(wait=True)
        await self.store.close()

    # sessions: ``owner`` is the caller's API key id ("" when keys are off); a caller sees only its own

    async def create_session(self, model_name: str, top_k: int, owner: str) -> Session:
        model = self.registry.get(model_name)
        return await self.store.create(model, self._top_k(model, top_k, self.settings.default_top_k), owner)

    async def get_session(self, session_id: str, owner: str) -> Session:
        return await self.store.get(session_id, owner)

    async def delete_session(self, session_id: str, owner: str) -> None:
        await self.store.delete(session_id, owner)

    async def fork_session(self, session_id: str, owner: str) -> Session:
        """A copy of the session. The source is in use while it is copied, so making room for the copy
        at the session limit never evicts the session being copied."""
        source = await self.store.get(session_id, owner)
        source.users += 1
        try:
            return await self.store.fork(source)
        finally:
            source.users -= 1

    # portable session state (server.session_blob)

    async def export_session(self, session_id: str, owner: str, encrypt: bool, end: bool) -> tuple[bytes, Session]:
        """The session's blob, and the session as exported. Under the session's lock, so a feed or a
        generation in flight here finishes first and the blob holds a state some call left (a shared
        store: the newest stored state). With ``end`` the session is removed once sealed, and only at
        the position sealed (a feed through another replica meanwhile: sealed again), so the blob is
        its only copy and holds its every feed."""
        blobs = self._blobs()
        session = await self.store.get(session_id, owner)
        session.users += 1
        try:
            async with session.lock:
                for _ in range(MAX_CONFLICTS):
                    await self.store.load(session)  # a shared store's newest state, not this replica's copy
                    blob = blobs.seal(session, encrypt)
                    # ended only at the position sealed: a feed through another replica meanwhile means sealing again
                    if not end or await self.store.end(session, "exported", at_position=session.position):
                        return blob, session
        finally:
            session.users -= 1
            self.store.touch(session)
        raise StoreUnavailable(
            f"session {session_id} was advanced by other calls {MAX_CONFLICTS} times while it was exported; it was "
            "not ended: retry"
        )

    async def import_session(self, blob: bytes, keep_id: bool, owner: str) -> Session:
        """A session made from an exported blob: the caller's own (its API key exported it), on the
        model version it was exported from, with its id when ``keep_id``."""
        new_id = None if keep_id else lambda: self.store.ids.new(owner)
        session = self._blobs().open(blob, owner, self._loaded_version, new_id)
        await self.store.insert(session)
        return session

    def _blobs(self) -> SessionBlobs:
        if self.blobs is None:
            raise FailedPrecondition(
                "this server has no session key, so it cannot export or import sessions: its operator sets "
                "LSTMD_SESSION_KEYS (or --session-keys-file), the same on every server a session may move between"
            )
        return self.blobs

    def _loaded_version(self, name: str, version: str) -> Model:
        """The loaded model ``name`` at ``version``, for an imported session; FailedPrecondition otherwise,
        also for a version past its drain deadline (it unloads at the next check, ending the session)."""
        now = time.time()
        usable = [m for m in self.registry.loaded() if m.name == name and (self.registry.draining.get(m) or now) >= now]
        model = next((m for m in usable if m.version == version), None)
        if model is None:
            versions = ", ".join(repr(m.version) for m in usable)
            loaded = f"has versions {versions} loaded" if versions else f"serves no model {name!r}"
            raise FailedPrecondition(
                f"the blob's session is on model {name!r} version {version!r}, and this server {loaded}: import it "
                "on a server that has that version loaded (a session never moves to another version)"
            )
        return model

    @contextlib.asynccontextmanager
    async def stream_session(self, session_id: str, model_name: str, owner: str) -> AsyncIterator[Session]:
        """The session a stream works on: an existing one, or an ephemeral one freed at the end."""
        if session_id:
            session = await self.get_session(session_id, owner)
        else:
            session = await self.create_session(model_name, 0, owner)
        session.users += 1
        try:
            yield session
        finally:
            session.users -= 1
            if not session_id:
                await self.store.discard(session)

    # tokenizing

    async def tokenize(self, model_name: str, text: str) -> Tokenization:
        """The tokens ``text`` becomes on ``model_name``, checked as a feed's text; no session is stepped."""
        model = self.registry.get(model_name)
        return Tokenization(model.name, model.tokenizer.kind, await self._tokens(model, text, None))

    # feeding

    async def feed(self, session: Session, args: FeedArgs) -> Prediction:
        """Apply a feed. The step is computed from ``session`` and committed only if the store still
        holds the position it was computed from; a lost commit (another replica stepped the session
        first) leaves ``session`` re-read and the feed is decided again. So a feed with
        ``expected_position`` gets exactly the answers it would get from one server: its own answer
        replayed if it was applied already (e.g. by another replica before a retry), else
        FAILED_PRECONDITION; a feed without one is applied on the newest state. A feed of only a
        word prefix applies nothing (``_complete``)."""
        wanted = self._wanted(session.model, args, session.top_k)
        if args.word_prefix and args.text in (None, "") and not args.token_ids:
            return await self._complete(session, args, wanted)
        session.users += 1
        try:
            async with session.lock:  # tokenized under the lock, so feeds are applied in arrival order
                tokens = await self._tokens(session.model, args.text, args.token_ids)
                ids = [t.id for t in tokens]
                key = _request_key(args, ids, wanted)
                for _ in range(MAX_CONFLICTS):
                    if args.expected_position is not None and args.expected_position != session.position:
                        await self.store.load(session)  # a copy may be stale: decide on the stored session
                        if args.expected_position != session.position:
                            if session.last_request is not None and session.last_request[0] == key:
                                answered: Prediction = session.last_request[1]
                                return replace(answered, replayed=True)
                            raise PositionMismatch(args.expected_position, session.position)
                    read = session.position
                    result, logprobs = await self._apply(session, ids, wanted.graph_k, args.want_logprobs,
                                                         full=wanted.full)  # fmt: skip
                    candidates = await self._candidates(session, result, wanted)
                    prediction = Prediction(session.id, session.position, tokens, candidates, logprobs)
                    if args.expected_position is not None:
                        session.last_request = (key, prediction)
                    if await self.store.commit(session, read, args.expected_position is not None):
                        return prediction
        finally:
            session.users -= 1
            self.store.touch(session)
        raise StoreUnavailable(
            f"session {session.id} was advanced by other calls {MAX_CONFLICTS} times while this feed ran; it was "
            "not applied: retry"
        )

    async def feed_many(
        self, items: list[tuple[str, FeedArgs]], owner: str, order: FeedOrder
    ) -> list[Prediction | Exception]:
        """Feeds of many sessions (one FeedMany message), each answered alone: its Prediction, or the
        error it met. Items of one session run one after another, after that session's items of
        earlier messages of the same stream (``order``); different sessions run concurrently.

        The first item of each session with nothing running is, when it is a plain one-token feed
        (``_quick``), stepped with the others in one batcher request per model (``_step_together``):
        one future and a few numpy calls for all of them instead of a coroutine and a request each.
        The rest go through ``feed`` one by one, behind it (the quick item holds the session's lock)."""
        answers: list[Prediction | Exception] = [InvalidInput("not run")] * len(items)
        by_session: dict[str, list[int]] = {}
        for i, (session_id, _) in enumerate(items):
            by_session.setdefault(session_id, []).append(i)
        together: dict[Model, list[_Quick]] = {}  # by model version
        one_by_one = []
        # Nothing below suspends until the gather (the quick check's store and tokenizer calls never do),
        # so every session's turn is claimed, and every quick item's lock taken, before any item runs.
        for session_id, indices in by_session.items():
            before, turn = order.claim(session_id)
            # a quick item releases the turn itself only when no item of its session follows it
            last = turn if len(indices) == 1 else None
            quick = None if before is not None else await self._quick(indices[0], items[indices[0]][1], session_id,
                                                                       owner, last)  # fmt: skip
            if quick is not None:
                together.setdefault(quick.session.model, []).append(quick)
                indices = indices[1:]
            if indices:
                one_by_one.append(self._in_turn(session_id, indices, items, owner, answers, order, before, turn))
        size = self.settings.max_batch_size
        steps = [self._step_together(quick[i : i + size], answers, order)
                 for quick in together.values() for i in range(0, len(quick), size)]  # fmt: skip
        await asyncio.gather(*steps, *one_by_one)
        return answers

    async def _in_turn(
        self,
        session_id: str,
        indices: list[int],
        items: list[tuple[str, FeedArgs]],
        owner: str,
        answers: list[Prediction | Exception],
        order: FeedOrder,
        before: asyncio.Future[None] | None,
        turn: asyncio.Future[None],
    ) -> None:
        """A session's items of a FeedMany message, one by one, once its earlier ones are done."""
        try:
            if before is not None:
                await asyncio.shield(before)  # never fails: every turn is released
            for i in indices:
                try:
                    answers[i] = await self.feed(await self.get_session(session_id, owner), items[i][1])
                except LstmdError as e:
                    answers[i] = e
                except Exception as e:  # a bug: logged, and this item alone fails INTERNAL
                    log.exception("internal error in an item of FeedMany", exc_info=e)
                    answers[i] = e
        finally:
            order.release(session_id, turn)

    async def _quick(
        self, index: int, args: FeedArgs, session_id: str, owner: str, turn: asyncio.Future[None] | None
    ) -> _Quick | None:
        """The item, locked, if it can be stepped with others: a store whose sessions live in this
        process, a free session at the expected position, one token, candidates from the graph's
        top-k. None otherwise, or when it is bad in any way: ``feed`` then decides it and says why."""
        if not self.store.in_process or args.want_logprobs or args.word_prefix:
            return None
        if args.token_ids is not None and len(args.token_ids) != 1:
            return None
        if args.text is not None and (len(args.text) > INLINE_CHARS or not args.text.isascii()):
            return None
        try:
            session = await self.store.get(session_id, owner)
            wanted = self._wanted(session.model, args, session.top_k)
            # busy: a call holds it or waits for it (the lock's acquire below would then suspend, and that
            # waiter move the session first)
            if wanted.search or session.busy() or args.expected_position not in (None, session.position):
                return None
            tokens = await self._tokens(session.model, args.text, args.token_ids)
        except LstmdError:
            return None
        if len(tokens) != 1:
            return None
        await session.lock.acquire()  # free: taken at once
        session.users += 1
        return _Quick(index, session, args, wanted, tokens[0], turn)

    async def _step_together(
        self, items: list[_Quick], answers: list[Prediction | Exception], order: FeedOrder
    ) -> None:
        """One-token feeds of distinct sessions of one model in one batcher request, each then stored
        like ``feed`` stores it (its exactly-once record included). Releases their locks and turns."""
        try:
            batcher = self._batcher(items[0].session.model)
            tokens = np.fromiter((q.token.id for q in items), np.int64, len(items))
            k = max(q.wanted.graph_k for q in items)
            rows = await batcher.run_rows(tokens, [q.session.state for q in items], k)
            for j, q in enumerate(items):
                session, args, wanted = q.session, q.args, q.wanted
                read = session.position
                session.prev_state, session.state = session.state, rows.states[j]
                session.last_token = q.token.id
                session.position += 1
                top = self._top_candidates(session, rows.top_ids[j, : wanted.graph_k],
                                           rows.top_logprobs[j, : wanted.graph_k], wanted)  # fmt: skip
                prediction = Prediction(session.id, session.position, [q.token], top, [])
                if args.expected_position is not None:
                    session.last_request = (_request_key(args, [q.token.id], wanted), prediction)
                try:
                    await self.store.commit(session, read, args.expected_position is not None)
                    answers[q.index] = prediction
                except LstmdError as e:  # deleted or expired while the step ran
                    answers[q.index] = e
        except Exception as e:  # the step failed: nothing of it was applied
            log.exception("internal error in a batched step of FeedMany", exc_info=e)
            for q in items:
                answers[q.index] = e
        finally:
            for q in items:
                q.session.lock.release()
                q.session.users -= 1
                self.store.touch(q.session)
                if q.turn is not None:
                    order.release(q.session.id, q.turn)

    async def _complete(self, session: Session, args: FeedArgs, wanted: _Wanted) -> Prediction:
        """A feed of only a word prefix: the words that begin with it after the session's text. It
        reads the session and changes nothing, so there is nothing to commit or replay."""
        session.users += 1
        try:
            async with session.lock:
                await self.store.load(session)
                if args.expected_position is not None and args.expected_position != session.position:
                    raise PositionMismatch(args.expected_position, session.position)
                result = await self._next(session, wanted.graph_k, "feed some text first", logprobs=wanted.full)
                return Prediction(session.id, session.position, [], await self._candidates(session, result, wanted),
                                  [])  # fmt: skip
        finally:
            session.users -= 1
            self.store.touch(session)

    async def _next(
        self, session: Session, top_k: int, remedy: str, sampling: Sampling | None = None, logprobs: bool = False
    ) -> StepResult:
        """The distribution of the session's next token, recomputed from the state before its last
        token. A session of a model that starts from zeros with nothing fed has none: InvalidInput,
        whose message begins with ``remedy``."""
        if session.last_token == NO_TOKEN:
            raise InvalidInput(f"{remedy}: {session.model.name} starts from a zero state, so a session has no "
                               "next-word distribution before its first token")  # fmt: skip
        batcher = self._batcher(session.model)
        return await batcher.run([session.last_token], session.prev_state, top_k, sampling, logprobs=logprobs)

    async def _candidates(self, session: Session, result: StepResult, wanted: _Wanted) -> list[Candidate]:
        """The candidates after the session's last token, whose distribution is ``result``."""
        model, table = session.model, session.model.words
        kind = "token" if wanted.token_kind else "word"
        if wanted.search:
            words = await search(table, functools.partial(self._steps, self._batcher(model)), result.logprobs,
                                 session.state, session.last_token, wanted.prefix, wanted.k,
                                 self.settings.word_beam, self.settings.word_max_tokens)  # fmt: skip
            found = [(w.word, w.ids, w.probability) for w in words]
        elif wanted.prefix:
            top = table.completions(result.logprobs, wanted.prefix, wanted.k, wanted.exclude_special)
            found = [(model.tokenizer.pieces[i], [i], math.exp(lp)) for i, lp in top]
        else:
            return self._top_candidates(session, result.top_ids, result.top_logprobs, wanted)
        context = [] if session.last_token == NO_TOKEN else [session.last_token]
        return [Candidate(word, ids[0], probability, kind, _text_after(model.tokenizer, context, ids), ids)
                for word, ids, probability in found]  # fmt: skip

    @staticmethod
    def _top_candidates(session: Session, top_ids: np.ndarray, top_logprobs: np.ndarray, wanted: _Wanted
                        ) -> list[Candidate]:  # fmt: skip
        """The graph's top-k tokens after the session's last token, as candidates of ``wanted``'s kind."""
        model, last = session.model, session.last_token
        pieces, special = model.tokenizer.pieces, model.words.special
        pairs = zip(top_ids.tolist(), top_logprobs.tolist(), strict=True)
        top = [(i, lp) for i, lp in pairs if not (wanted.exclude_special and special[i])][: wanted.k]
        kind = "token" if wanted.token_kind else "word"
        return [Candidate(pieces[i], i, math.exp(lp), kind, model.text_after(last, i), [i]) for i, lp in top]

    @staticmethod
    async def _steps(batcher: Batcher, ids: list[int], states: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Single-token steps of a word search, queued together so that one batch takes them all."""
        results = await asyncio.gather(
            *(batcher.run([i], s, 1, logprobs=True) for i, s in zip(ids, states, strict=True))
        )
        return [(r.logprobs, r.state) for r in results]

    async def _apply(
        self,
        session: Session,
        ids: list[int],
        top_k: int,
        want_logprobs: bool,
        sampling: Sampling | None = None,
        full: bool = False,
    ) -> tuple[StepResult, list[float]]:
        """Run ``ids`` through the model from the session's state and store the new state.

        Without log-probabilities: the prompt minus its last token in one call, then the last
        token as a single-token step (batched with other sessions), which also yields the state
        before the last token. With them: one step per token, starting by recomputing the
        distribution before the first token from the state before the session's last token. A
        session with no last token (NO_TOKEN: from zeros, nothing fed yet) has no distribution
        before its first token, so that token gets no log-probability: one fewer than ``ids``.
        With ``full`` the result carries the whole distribution after the last token.
        """
        batcher = self._batcher(session.model)
        prev_state = session.state
        logprobs: list[float] = []
        if want_logprobs:
            before: StepResult | None = None  # the distribution before the next token
            if session.last_token != NO_TOKEN:
                before = await batcher.run([session.last_token], session.prev_state, 1, logprobs=True)
            state = session.state
            for token in ids:
                if before is not None:
                    logprobs.append(float(before.logprobs[token]))
                prev_state = state
                before = result = await batcher.run([token], state, top_k, sampling, logprobs=True)
                state = result.state
        else:
            if len(ids) > 1:
                prev_state = (await batcher.run(ids[:-1], session.state, 1)).state
            result = await batcher.run(ids[-1:], prev_state, top_k, sampling, logprobs=full)
        session.prev_state, session.state = prev_state, result.state
        session.last_token = ids[-1]
        session.position += len(ids)
        return result, logprobs

    # generation

    async def generate(self, session: Session, args: GenerateArgs) -> AsyncGenerator[GeneratedWord, None]:
        """Sample words after the session's text (and ``args.prompt``), all or nothing like a feed.

        The words are computed on a copy of the session and stored only when the caller has taken
        the last one and asks for the next (the iteration ends): until then every other call sees
        the session as it was before, and a generation that ends any other way (an error, the
        caller closing the iterator early: a cancelled call, a client that stopped reading) leaves
        it exactly as it was, prompt included, so the same seed gives the same words again. After
        each word the store is asked whether it still holds the session at its starting position:
        deleted (NotFound) or, in a shared store, stepped by another replica (PositionMismatch),
        the generation ends there."""
        model = session.model
        if not 1 <= args.max_tokens <= self.settings.max_generate_tokens:
            raise InvalidInput(f"max_tokens must be between 1 and {self.settings.max_generate_tokens}")
        if not (args.temperature >= 0 and math.isfinite(args.temperature)):
            raise InvalidInput("temperature must be a finite number >= 0 (0 means 1.0)")
        if not 0 <= args.top_p <= 1:
            raise InvalidInput("top_p must be between 0 and 1 (0 or 1: no nucleus limit)")
        if args.top_k > model.vocab_size:
            raise InvalidInput(f"top_k must be at most the vocabulary size, {model.vocab_size}")
        tokenizer = model.tokenizer
        banned = [i for i in (tokenizer.unk_id, None if args.allow_eos else tokenizer.eos_id) if i is not None]
        sampling = Sampling(
            args.temperature or 1.0, args.top_k, args.top_p, tuple(banned), np.random.default_rng(args.seed)
        )
        stop = self._stop_keys(tokenizer, args.stop)
        session.users += 1
        try:
            async with session.lock:
                prompt = await self._tokens(model, args.prompt, None) if args.prompt else []
                await self.store.load(session)
                if args.expected_position is not None and args.expected_position != session.position:
                    raise PositionMismatch(args.expected_position, session.position)
                start, work = session.position, session.copy()
                # the text each token adds follows the session's last token and the prompt (the
                # stream keeps what it needs of them: see Tokenizer.text_stream)
                last = [] if session.last_token == NO_TOKEN else [session.last_token]
                text = tokenizer.text_stream([*last, *(t.id for t in prompt)])
                if prompt:
                    result, _ = await self._apply(work, [t.id for t in prompt], 1, False, sampling)
                else:
                    result = await self._next(session, 1, "give a prompt", sampling)
                for i in range(args.max_tokens):
                    word_id, probability = result.sampled, result.sampled_prob
                    result, _ = await self._apply(work, [word_id], 1, False, sampling)
                    await self._still_at(session, start)
                    self.store.touch(session)
                    word = tokenizer.pieces[word_id]
                    finish = "stop_word" if word in stop else "max_tokens" if i == args.max_tokens - 1 else ""
                    yield GeneratedWord(session.id, word, word_id, probability, work.position,
                                        text.add(word_id, last=bool(finish)), finish)  # fmt: skip
                    if finish:
                        break
                await self._still_at(session, start)
                session.take(work)
                if not await self.store.commit(session, start, False):
                    raise PositionMismatch(start, session.position)
        finally:
            session.users -= 1
            self.store.touch(session)

    async def _still_at(self, session: Session, start: int) -> None:
        """Whether the store still holds the session a generation started from, where it started."""
        position = await self.store.position(session)
        if position is None:
            try:
                await self.store.load(session)  # raises the NOT_FOUND that says why, when the store knows
            except SessionEnded as e:
                raise SessionEnded(f"{e} (it ended during the generation: nothing of the generation was applied)",
                                   e.reason, e.when) from None  # fmt: skip
            except NotFound:
                pass
            raise NotFound(
                f"session {session.id} was deleted during the generation (or, in a shared store, "
                "expired); nothing of the generation was applied"
            )
        if position != start:  # another replica fed it: the generation would write over that feed
            raise PositionMismatch(start, position)

    # validation

    async def _tokens(self, model: Model, text: str | None, token_ids: list[int] | None) -> list[Token]:
        limit = self.settings.max_feed_tokens
        if text is not None:
            if len(text) > self.settings.max_text_chars:
                raise InvalidInput(f"text is {len(text)} characters, the limit is {self.settings.max_text_chars}")
            if len(text) <= (INLINE_CHARS if text.isascii() else INLINE_OTHER_CHARS):
                encoded = self._encode(model, text)
            else:
                loop = asyncio.get_running_loop()
                encoded = await loop.run_in_executor(self._tokenizer_thread, self._encode, model, text)
            if len(encoded.ids) > limit:
                raise InvalidInput(f"text is {len(encoded.ids)} tokens, the limit per feed is {limit}; split it")
            tokens = list(map(Token, encoded.ids, encoded.pieces, encoded.unknown))
        else:
            token_ids = token_ids or []
            if len(token_ids) > limit:
                raise InvalidInput(f"{len(token_ids)} token ids, the limit per feed is {limit}; split them")
            bad = next((i for i in token_ids if not 0 <= i < model.vocab_size), None)
            if bad is not None:
                raise InvalidInput(
                    f"token id {bad} is outside the vocabulary of {model.name} (0..{model.vocab_size - 1})"
                )
            pieces = model.tokenizer.pieces
            tokens = [Token(i, pieces[i], False) for i in token_ids]
        if not tokens:
            raise InvalidInput(
                "the input is empty: give text with at least one word or punctuation mark, or token ids "
                "(a feed with no input needs a word_prefix)"
            )
        return tokens

    def _encode(self, model: Model, text: str) -> Encoding:
        """``text`` as ``model``'s tokens, refused if longer than the limit once normalised. Blocking."""
        try:
            return model.tokenizer.encode(text, self.settings.max_text_chars)
        except TextTooLong as e:
            raise InvalidInput(
                f"text is {'more than ' if e.at_least else ''}{e.length} characters after Unicode normalisation "
                f"(NFKC writes ligatures and other compatibility characters out in full), the limit is {e.limit}; "
                "split it"
            ) from None

    @staticmethod
    def _stop_keys(tokenizer: Tokenizer, words: tuple[str, ...]) -> set[str]:
        """The stop words as the tokenizer compares them, checked against the limits."""
        if len(words) > MAX_STOP_WORDS:
            raise InvalidInput(f"{len(words):,} stop words, the limit is {MAX_STOP_WORDS}")
        keys = set()
        for word in words:
            if len(word) > MAX_STOP_CHARS:
                raise InvalidInput(f"stop word {echo(word)} is over {MAX_STOP_CHARS} characters: a stop word is "
                                   "compared with one token")  # fmt: skip
            try:
                keys.add(tokenizer.stop_key(word, MAX_STOP_CHARS))
            except TextTooLong:
                raise InvalidInput(f"stop word {echo(word)} is over {MAX_STOP_CHARS} characters after Unicode "
                                   "normalisation (NFKC writes some characters out in full)") from None  # fmt: skip
        return keys

    def _wanted(self, model: Model, args: FeedArgs, default_top_k: int) -> _Wanted:
        table = model.words
        search = not (table.word_level or args.token_candidates)
        k = self._top_k(model, args.top_k, default_top_k, words=search)
        prefix = args.word_prefix
        if prefix:
            if len(prefix) > MAX_WORD_PREFIX or any(ch.isspace() for ch in prefix):
                raise InvalidInput(f"word_prefix {echo(prefix)} is not the start of one word: at most "
                                   f"{MAX_WORD_PREFIX} characters, no whitespace")  # fmt: skip
            if args.token_candidates and not table.word_level:
                raise InvalidInput(f"word_prefix completes words, and {model.name}'s tokens are pieces of words "
                                   f"({model.tokenizer.kind} tokenizer): ask for word candidates")  # fmt: skip
            prefix = model.tokenizer.stop_key(prefix)
        graph_k = 1 if search else min(k + table.special_count, model.vocab_size) if args.exclude_special else k
        return _Wanted(k, graph_k, prefix, search, args.exclude_special, args.token_candidates)

    def _top_k(self, model: Model, asked: int, default: int, words: bool = False) -> int:
        """``asked``, or ``default`` for 0; at most the vocabulary's size, except for ``words`` of a search."""
        limit = self.settings.max_top_k if words else min(self.settings.max_top_k, model.vocab_size)
        if asked < 0 or asked > limit:
            raise InvalidInput(f"top_k {asked} is out of range: 1 to {limit} (0: the default)")
        return asked or min(default, limit)


def _request_key(args: FeedArgs, ids: list[int], wanted: _Wanted) -> tuple[object, ...]:
    """What a retried feed must repeat to be replayed (server.exactly_once stores it)."""
    return (args.expected_position, tuple(ids), wanted.k, args.want_logprobs, wanted.prefix, wanted.token_kind,
            wanted.exclude_special)  # fmt: skip


def _text_after(tokenizer: Tokenizer, context: list[int], ids: list[int]) -> str:
    """The text ``ids`` add after ``context``, as the tokenizer decodes them."""
    stream = tokenizer.text_stream(context)
    return "".join(stream.add(i, last=n == len(ids) - 1) for n, i in enumerate(ids))
