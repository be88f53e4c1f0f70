"""The exactly-once record: what a session remembers of its last feed with ``expected_position``.

A retried feed (same ``expected_position``, token ids and options) that finds the session
already past that position gets the recorded answer again instead of FAILED_PRECONDITION. The
record is ``(key, answer)``: ``key`` is ``(expected_position, token ids as a tuple, top_k,
want_logprobs, word prefix, token candidates, exclude_special)`` as the engine builds it,
``answer`` the Prediction it returned. Records written before the last three options existed
(and before candidates had a kind, text and token ids) read as the defaults. The record travels
as JSON in the session snapshot and in the Redis store, through the two functions below.
"""

from __future__ import annotations

from typing import Any

from lstmd.server.engine import Candidate, Prediction, Token


def record_to_json(last_request: Any) -> object:
    """A session's ``last_request``, (request key, Prediction) or None, as JSON."""
    if last_request is None:
        return None
    (expected_position, token_ids, *options), p = last_request
    return {
        "key": [expected_position, list(token_ids), *options],
        "answer": {
            "position": p.position,
            "tokens": [[t.id, t.word, t.unknown] for t in p.tokens],
            "candidates": [[c.word, c.token_id, c.probability, c.kind, c.text, c.token_ids] for c in p.candidates],
            "token_logprobs": p.token_logprobs,
        },
    }


def record_from_json(value: Any, session_id: str) -> tuple[Any, Any] | None:
    """The inverse of ``record_to_json``; raises KeyError, TypeError or ValueError on a malformed record."""
    if value is None:
        return None
    expected_position, token_ids, top_k, want_logprobs, *options = value["key"]
    answer = value["answer"]
    prediction = Prediction(
        session_id,
        answer["position"],
        [Token(*t) for t in answer["tokens"]],
        [_candidate(*c) for c in answer["candidates"]],
        list(answer["token_logprobs"]),
    )
    prefix, token_candidates, exclude_special = options or OLD_OPTIONS
    key = (expected_position, tuple(token_ids), top_k, want_logprobs, prefix, token_candidates, exclude_special)
    return key, prediction


OLD_OPTIONS = ("", False, False)  # no prefix, word candidates, special tokens kept


def _candidate(
    word: str, token_id: int, probability: float, kind: str = "word", text: str = "", token_ids: Any = None
) -> Candidate:
    return Candidate(word, token_id, probability, kind, text, list(token_ids or [token_id]))
