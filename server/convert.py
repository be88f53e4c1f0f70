"""protobuf <-> domain conversion, in one place: nothing else in the server touches messages
except the servicer, and the domain code never imports the generated stubs."""

from __future__ import annotations

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from lstmd.server.engine import FeedArgs, GenerateArgs, GeneratedWord, Prediction, Tokenization
from lstmd.server.errors import LstmdError, PositionMismatch, SessionEnded, status_of
from lstmd.server.sessions import Session
from lstmd.server.versions import VersionInfo
from lstmd.v1 import lstmd_pb2 as pb

_FINISH = {
    "": pb.FINISH_REASON_UNSPECIFIED,
    "max_tokens": pb.FINISH_REASON_MAX_TOKENS,
    "stop_word": pb.FINISH_REASON_STOP_WORD,
}

_KIND = {"word": pb.CANDIDATE_KIND_WORD, "token": pb.CANDIDATE_KIND_TOKEN}


def model_info(v: VersionInfo) -> pb.ModelInfo:
    card = v.model.card
    message = pb.ModelInfo(
        name=card.name,
        version=card.version,
        vocab_size=card.vocab_size,
        num_layers=card.num_layers,
        hidden_size=card.hidden_size,
        state_bytes=2 * card.state_bytes,  # the state after and before the last token
        is_default=v.is_default,
        precision=card.precision,
        test_perplexity=card.perplexity.get("test", 0.0),
        tokenizer=card.tokenizer_spec.kind,
        starts_from_zeros=card.tokenizer_spec.initial == "zeros",
        sessions=v.sessions,
        serving=v.serving,
        draining=not v.serving,
        vocabulary_sha256=v.model.vocabulary_sha256,
    )
    if v.unload_at is not None:
        message.unload_at.CopyFrom(_timestamp(v.unload_at))
    return message


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def session(s: Session, lifetime_s: float = 0.0) -> pb.Session:
    """``lifetime_s``: the server's maximum session lifetime (0: none), which sets ``expires``."""
    message = pb.Session(
        session_id=s.id,
        model=s.model.name,
        model_version=s.model.version,
        position=s.position,
        top_k=s.top_k,
        created=_timestamp(s.created),
        last_used=_timestamp(s.last_used),
        vocabulary_sha256=s.model.vocabulary_sha256,
    )
    if lifetime_s > 0:
        message.expires.CopyFrom(_timestamp(s.created + lifetime_s))
    return message


def feed_args(request: pb.FeedRequest | pb.StreamRequest) -> FeedArgs:
    which = request.WhichOneof("input")
    return FeedArgs(
        text=request.text if which == "text" else None,
        token_ids=list(request.tokens.ids) if which == "tokens" else None,
        expected_position=request.expected_position if request.HasField("expected_position") else None,
        top_k=request.top_k,
        want_logprobs=request.return_token_logprobs,
        word_prefix=request.word_prefix,
        token_candidates=request.candidates == pb.CANDIDATE_KIND_TOKEN,
        exclude_special=request.exclude_special,
    )


def prediction(p: Prediction, message: pb.Prediction | None = None) -> pb.Prediction:
    """``p`` as a message, or written into ``message`` (a FeedResult's, in place)."""
    # Sent once per token while streaming: fields are filled with add() and only when set, which
    # builds the message about twice as fast as nested constructors with every field.
    if message is None:
        message = pb.Prediction()
    message.session_id, message.position = p.session_id, p.position
    for t in p.tokens:
        message.tokens.add(id=t.id, word=t.word, unknown=t.unknown)
    for c in p.candidates:
        message.candidates.add(word=c.word, token_id=c.token_id, probability=c.probability, kind=_KIND[c.kind],
                               text=c.text, token_ids=c.token_ids)  # fmt: skip
    if p.token_logprobs:
        message.token_logprobs.extend(p.token_logprobs)
    if p.replayed:
        message.replayed = True
    return message


def feed_many_response(answers: list[Prediction | Exception]) -> pb.FeedManyResponse:
    """One FeedResult per item: its prediction, or its error as the status a Feed would end with."""
    message = pb.FeedManyResponse()
    for answer in answers:
        result = message.results.add()
        if isinstance(answer, Prediction):
            prediction(answer, result.prediction)
        elif isinstance(answer, LstmdError):
            result.error.code, result.error.message = status_of(answer).value[0], str(answer)
            if isinstance(answer, PositionMismatch):
                result.error.position = answer.actual
            if isinstance(answer, SessionEnded):
                result.error.session_end = pb.SessionEnd.Value("SESSION_END_" + answer.reason.upper())
                result.error.ended_at.FromMilliseconds(round(answer.when * 1000))  # as the metadata: to the ms
        else:  # a bug, logged with its traceback where it happened
            result.error.code = grpc.StatusCode.INTERNAL.value[0]
            result.error.message = "internal error in this item of FeedMany; the server log has the details"
    return message


def tokenization(t: Tokenization) -> pb.TokenizeResponse:
    message = pb.TokenizeResponse(model=t.model, tokenizer=t.tokenizer)
    for token in t.tokens:
        message.tokens.add(id=token.id, word=token.word, unknown=token.unknown)
    return message


def generate_args(request: pb.GenerateRequest) -> GenerateArgs:
    return GenerateArgs(
        prompt=request.prompt,
        max_tokens=request.max_tokens,
        temperature=request.temperature,
        top_k=request.top_k,
        top_p=request.top_p,
        seed=request.seed if request.HasField("seed") else None,
        stop=tuple(request.stop),
        expected_position=request.expected_position if request.HasField("expected_position") else None,
        allow_eos=request.allow_eos,
    )


def generated(w: GeneratedWord) -> pb.GeneratedToken:
    return pb.GeneratedToken(
        session_id=w.session_id,
        word=w.word,
        token_id=w.token_id,
        probability=w.probability,
        position=w.position,
        finish_reason=_FINISH[w.finish],
        text=w.text,
    )
