"""Typed results, converted from the protobuf messages in one place."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypedDict, TypeVar, Unpack

from lstmd.v1 import lstmd_pb2 as pb


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    vocab_size: int
    num_layers: int
    hidden_size: int
    state_bytes: int
    is_default: bool
    precision: str
    test_perplexity: float
    tokenizer: (
        str  # the tokenizer's kind: "words", "whitespace", "characters", "hf", "sentencepiece"; "" from older servers
    )
    starts_from_zeros: bool = False  # a new session has no prediction before its first token
    sessions: int = 0  # sessions of this version held now (with Redis: by all replicas)
    serving: bool = True  # new sessions of this model go to this version
    draining: bool = False  # no longer served: kept for its sessions until they end or ``unload_at``
    unload_at: datetime | None = None  # a draining version's deadline (aware, UTC); None: none
    vocabulary_sha256: str = ""  # equal for two versions whose token ids mean the same; "" from older servers

    @classmethod
    def from_pb(cls, m: pb.ModelInfo) -> ModelInfo:
        unload_at = m.unload_at.ToDatetime(UTC) if m.HasField("unload_at") else None
        return cls(m.name, m.version, m.vocab_size, m.num_layers, m.hidden_size, m.state_bytes, m.is_default,
                   m.precision, m.test_perplexity, m.tokenizer, m.starts_from_zeros, m.sessions, m.serving,
                   m.draining, unload_at, m.vocabulary_sha256)  # fmt: skip


@dataclass(frozen=True)
class Reload:
    """What ``reload_models`` did: every loaded version after it, and the versions it loaded and set
    draining ("name/version")."""

    models: list[ModelInfo]
    loaded: list[str]
    draining: list[str]

    @classmethod
    def from_pb(cls, r: pb.ReloadModelsResponse) -> Reload:
        return cls([ModelInfo.from_pb(m) for m in r.models], list(r.loaded), list(r.draining))


@dataclass(frozen=True)
class SessionInfo:
    session_id: str
    model: str
    model_version: str
    position: int
    top_k: int
    vocabulary_sha256: str = ""  # of the session's model version (see ModelInfo); "" from older servers
    expires: datetime | None = None  # when the server's maximum lifetime ends it (aware, UTC); None: no limit

    @classmethod
    def from_pb(cls, s: pb.Session) -> SessionInfo:
        expires = s.expires.ToDatetime(UTC) if s.HasField("expires") else None
        return cls(s.session_id, s.model, s.model_version, s.position, s.top_k, s.vocabulary_sha256, expires)


@dataclass(frozen=True)
class Token:
    id: int
    word: str
    unknown: bool


@dataclass(frozen=True)
class Tokenization:
    """Text as a model's tokens (``Client.tokenize``): the model, its tokenizer's kind, the tokens."""

    model: str
    tokenizer: str
    tokens: list[Token]

    @classmethod
    def from_pb(cls, t: pb.TokenizeResponse) -> Tokenization:
        return cls(t.model, t.tokenizer, [Token(x.id, x.word, x.unknown) for x in t.tokens])


@dataclass(frozen=True)
class Candidate:
    """A likely next word (``kind`` "word") or next token of the model ("token"; "" from servers
    before the field). ``text`` is what it adds to the session's text, spacing included (" sky"),
    for a completion the whole word; ``token_ids`` its tokens (a word's most likely spelling)."""

    word: str
    token_id: int
    probability: float
    kind: str = ""
    text: str = ""
    token_ids: tuple[int, ...] = ()

    @classmethod
    def from_pb(cls, c: pb.Candidate) -> Candidate:
        return cls(c.word, c.token_id, c.probability, _KINDS.get(c.kind, ""), c.text, tuple(c.token_ids))


_KINDS = {pb.CANDIDATE_KIND_WORD: "word", pb.CANDIDATE_KIND_TOKEN: "token"}  # UNSPECIFIED: ""


@dataclass(frozen=True)
class Prediction:
    session_id: str
    position: int
    tokens: list[Token]
    candidates: list[Candidate]
    token_logprobs: list[float]
    replayed: bool

    @classmethod
    def from_pb(cls, p: pb.Prediction) -> Prediction:
        return cls(
            p.session_id,
            p.position,
            [Token(t.id, t.word, t.unknown) for t in p.tokens],
            [Candidate.from_pb(c) for c in p.candidates],
            list(p.token_logprobs),
            p.replayed,
        )


@dataclass(frozen=True)
class GeneratedToken:
    session_id: str
    word: str
    token_id: int
    probability: float
    position: int
    finish_reason: str  # "", "max_tokens" or "stop_word"
    text: str  # what the token adds to the session's text, decoded by the server ("" from older servers)

    @classmethod
    def from_pb(cls, t: pb.GeneratedToken) -> GeneratedToken:
        reason = pb.FinishReason.Name(t.finish_reason).removeprefix("FINISH_REASON_").lower()
        return cls(t.session_id, t.word, t.token_id, t.probability, t.position,
                   "" if reason == "unspecified" else reason, t.text)  # fmt: skip


Input = str | list[int]  # text, or token ids of the session's model


class FeedOptions(TypedDict, total=False):
    """A feed's options. ``expected_position``: apply only at this position (None: wherever the
    session is), which also makes the feed safe to retry; ``top_k``: candidates to return (0: the
    session's default); ``token_logprobs``: the log-probability of each token fed; ``word_prefix``:
    the typed start of the next word, which the candidates then complete (it is not fed: with an
    empty input the feed applies nothing and only completes it); ``tokens``: the candidates are
    the model's tokens, not whole words (cheaper on subword and character models: no word search);
    ``exclude_special``: leave the unknown token, end-of-line and other special tokens out."""

    expected_position: int | None
    top_k: int
    token_logprobs: bool
    word_prefix: str
    tokens: bool
    exclude_special: bool


R = TypeVar("R", pb.FeedRequest, pb.StreamRequest)


def _with_options(request: R, data: Input, options: FeedOptions) -> R:
    """``request`` with the input and the options; an empty input with a ``word_prefix`` is no
    input at all (a prefix-only feed)."""
    request.top_k = options.get("top_k", 0)
    request.return_token_logprobs = options.get("token_logprobs", False)
    request.word_prefix = options.get("word_prefix", "")
    request.candidates = pb.CANDIDATE_KIND_TOKEN if options.get("tokens") else pb.CANDIDATE_KIND_UNSPECIFIED
    request.exclude_special = options.get("exclude_special", False)
    expected_position = options.get("expected_position")
    if expected_position is not None:
        request.expected_position = expected_position
    if data or not request.word_prefix:
        if isinstance(data, str):
            request.text = data
        else:
            request.tokens.ids.extend(data)
    return request


class SamplingOptions(TypedDict, total=False):
    """A generation's sampling: ``max_tokens`` (50), ``temperature`` (1.0), ``top_k`` (0: all
    words), ``top_p`` (0: off), ``seed`` (None: random), ``stop`` words (stop after any)."""

    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int | None
    stop: list[str] | None


class GenerateOptions(SamplingOptions, total=False):
    """A generation's sampling and where it runs: on ``session_id`` (at ``expected_position`` when
    given), or on a new temporary session of ``model`` (the server's default when empty)."""

    session_id: str
    model: str
    expected_position: int | None


def feed_request(session_id: str, data: Input, **options: Unpack[FeedOptions]) -> pb.FeedRequest:
    return _with_options(pb.FeedRequest(session_id=session_id), data, options)


FeedItem = tuple[str, Input] | tuple[str, Input, FeedOptions]  # (session id, input[, options]) of feed_many


def feed_many_request(items: Iterable[FeedItem]) -> pb.FeedManyRequest:
    return pb.FeedManyRequest(items=[feed_request(item[0], item[1], **(item[2] if len(item) > 2 else {}))
                                     for item in items])  # fmt: skip


def stream_request(
    data: Input, session_id: str = "", model: str = "", **options: Unpack[FeedOptions]
) -> pb.StreamRequest:
    """A stream message; ``session_id`` and ``model`` only count on a stream's first message."""
    return _with_options(pb.StreamRequest(session_id=session_id, model=model), data, options)


def generate_request(
    prompt: str = "", *, session_id: str = "", model: str = "", max_tokens: int = 50, temperature: float = 1.0,
    top_k: int = 0, top_p: float = 0.0, seed: int | None = None, stop: list[str] | None = None,
    expected_position: int | None = None,
) -> pb.GenerateRequest:  # fmt: skip
    return pb.GenerateRequest(
        session_id=session_id, model=model, prompt=prompt, max_tokens=max_tokens, temperature=temperature,
        top_k=top_k, top_p=top_p, seed=seed, stop=stop or [], expected_position=expected_position,
    )  # fmt: skip
