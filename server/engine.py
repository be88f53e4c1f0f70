"""The server's domain core: sessions, feeds and generation over batched model steps.

The gRPC servicer only converts messages and calls this; nothing here knows about protobuf.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np

from lstmd.server.batcher import Batcher, Sampling, StepResult
from lstmd.server.errors import InvalidInput, PositionMismatch, StoreUnavailable
from lstmd.server.registry import NO_TOKEN, Model, ModelRegistry
from lstmd.server.sessions import Session, SessionStore
from lstmd.server.settings import Settings

log = logging.getLogger(__name__)
MAX_CONFLICTS = 16  # a step whose compare-and-set other replicas win this often in a row is refused


# The types below are created for every token streamed: plain slotted dataclasses, which
# construct about twice as fast as frozen ones.
@dataclass(slots=True)
class Token:
    id: int
    word: str
    unknown: bool


@dataclass(slots=True)
class Candidate:
    word: str
    token_id: int
    probability: float


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


class Engine:
    """Sessions, feeds and generation over one SessionStore: this process's memory, or Redis for replicas.
    A step is computed on the store's Session and then ``commit``ted to the store."""

    def __init__(self, settings: Settings, registry: ModelRegistry, store: SessionStore):
        self.settings = settings
        self.registry = registry
        self.store = store
        self._executor = ThreadPoolExecutor(max_workers=len(registry.models), thread_name_prefix="onnxruntime")
        self._batchers = {
            name: Batcher(model, self._executor, settings.max_batch_size, settings.max_batch_wait_ms / 1000)
            for name, model in registry.models.items()
        }

    async def start(self) -> None:
        for batcher in self._batchers.values():
            batcher.start()
        await self.store.start()

    async def stop(self) -> None:
        for batcher in self._batchers.values():
            await batcher.stop()
        self._executor.shutdown(wait=True)
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
        return await self.store.fork(await self.store.get(session_id, owner))

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

    def tokenize(self, model_name: str, text: str) -> Tokenization:
        """The tokens ``text`` becomes on ``model_name``, checked as a feed's text; no session is stepped."""
        model = self.registry.get(model_name)
        return Tokenization(model.name, model.tokenizer.kind, self._tokens(model, text, None))

    # feeding

    async def feed(self, session: Session, args: FeedArgs) -> Prediction:
        """Apply a feed. The step is computed from ``session`` and committed only if the store still
        holds the position it was computed from; a lost commit (another replica stepped the session
        first) leaves ``session`` re-read and the feed is decided again. So a feed with
        ``expected_position`` gets exactly the answers it would get from one server: its own answer
        replayed if it was applied already (e.g. by another replica before a retry), else
        FAILED_PRECONDITION; a feed without one is applied on the newest state."""
        tokens = self._tokens(session.model, args.text, args.token_ids)
        top_k = self._top_k(session.model, args.top_k, session.top_k)
        ids = [t.id for t in tokens]
        key = (args.expected_position, tuple(ids), top_k, args.want_logprobs)  # server.exactly_once
        session.users += 1
        try:
            async with session.lock:
                for _ in range(MAX_CONFLICTS):
                    if args.expected_position is not None and args.expected_position != session.position:
                        await self.store.load(session)  # a copy may be stale: decide on the stored session
                        if args.expected_position != session.position:
                            if session.last_request is not None and session.last_request[0] == key:
                                answered: Prediction = session.last_request[1]
                                return replace(answered, replayed=True)
                            raise PositionMismatch(args.expected_position, session.position)
                    read = session.position
                    result, logprobs = await self._apply(session, ids, top_k, args.want_logprobs)
                    prediction = Prediction(session.id, session.position, tokens, _candidates(session.model, result),
                                            logprobs)  # fmt: skip
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

    async def _apply(
        self, session: Session, ids: list[int], top_k: int, want_logprobs: bool, sampling: Sampling | None = None
    ) -> tuple[StepResult, list[float]]:
        """Run ``ids`` through the model from the session's state and store the new state.

        Without log-probabilities: the prompt minus its last token in one call, then the last
        token as a single-token step (batched with other sessions), which also yields the state
        before the last token. With them: one step per token, starting by recomputing the
        distribution before the first token from the state before the session's last token. A
        session with no last token (NO_TOKEN: from zeros, nothing fed yet) has no distribution
        before its first token, so that token gets no log-probability: one fewer than ``ids``.
        """
        batcher = self._batchers[session.model.name]
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
            result = await batcher.run(ids[-1:], prev_state, top_k, sampling)
        session.prev_state, session.state = prev_state, result.state
        session.last_token = ids[-1]
        session.position += len(ids)
        return result, logprobs

    # generation

    async def generate(self, session: Session, args: GenerateArgs) -> AsyncIterator[GeneratedWord]:
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
        stop = {tokenizer.stop_key(w) for w in args.stop}
        prompt = self._tokens(model, args.prompt, None) if args.prompt else []
        batcher = self._batchers[model.name]
        session.users += 1
        try:
            async with session.lock:
                await self.store.load(session)
                if args.expected_position is not None and args.expected_position != session.position:
                    raise PositionMismatch(args.expected_position, session.position)
                # the text each token adds follows the session's last token and the prompt (the
                # stream keeps what it needs of them: see Tokenizer.text_stream)
                last = [] if session.last_token == NO_TOKEN else [session.last_token]
                text = tokenizer.text_stream([*last, *(t.id for t in prompt)])
                if prompt:
                    read = session.position
                    result, _ = await self._apply(session, [t.id for t in prompt], 1, False, sampling)
                    await self._commit_generated(session, read)
                elif session.last_token == NO_TOKEN:
                    raise InvalidInput(
                        f"give a prompt: {model.name} starts from a zero state, so a session has no next-word "
                        "distribution before its first token"
                    )
                else:
                    result = await batcher.run([session.last_token], session.prev_state, 1, sampling)
                for i in range(args.max_tokens):
                    word_id, probability = result.sampled, result.sampled_prob
                    read = session.position
                    result, _ = await self._apply(session, [word_id], 1, False, sampling)
                    await self._commit_generated(session, read)
                    self.store.touch(session)
                    word = tokenizer.pieces[word_id]
                    finish = "stop_word" if word in stop else "max_tokens" if i == args.max_tokens - 1 else ""
                    yield GeneratedWord(session.id, word, word_id, probability, session.position,
                                        text.add(word_id, last=bool(finish)), finish)  # fmt: skip
                    if finish:
                        return
        finally:
            session.users -= 1
            self.store.touch(session)

    async def _commit_generated(self, session: Session, read: int) -> None:
        """A generated word is committed like a fed one; if another replica fed the session meanwhile,
        the generation stops (its words so far stand) rather than write over that feed."""
        if not await self.store.commit(session, read, False):
            raise PositionMismatch(read, session.position)

    # validation

    def _tokens(self, model: Model, text: str | None, token_ids: list[int] | None) -> list[Token]:
        limit = self.settings.max_feed_tokens
        if text is not None:
            if len(text) > self.settings.max_text_chars:
                raise InvalidInput(f"text is {len(text)} characters, the limit is {self.settings.max_text_chars}")
            encoded = model.tokenizer.encode(text)
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
            raise InvalidInput("the input is empty: give text with at least one word or punctuation mark, or token ids")
        return tokens

    def _top_k(self, model: Model, asked: int, default: int) -> int:
        limit = min(self.settings.max_top_k, model.vocab_size)
        if asked < 0 or asked > limit:
            raise InvalidInput(f"top_k {asked} is out of range: 1 to {limit} (0: the default)")
        return asked or min(default, limit)


def _candidates(model: Model, result: StepResult) -> list[Candidate]:
    pieces = model.tokenizer.pieces
    return [
        Candidate(pieces[i], int(i), float(math.exp(lp)))
        for i, lp in zip(result.top_ids.tolist(), result.top_logprobs.tolist(), strict=True)
    ]
