"""The server's error tree. Domain code raises these; one table maps them to gRPC codes."""

from __future__ import annotations

import time

import grpc

POSITION_KEY = "lstmd-position"  # trailing metadata of FAILED_PRECONDITION: the session's actual position
END_KEY = "lstmd-session-end"  # trailing metadata of NOT_FOUND for a session that ended: why
ENDED_AT_KEY = "lstmd-session-ended-at"  # and when, RFC 3339 in UTC
# Why a session ended: the names of lstmd.v1.SessionEnd without their prefix, lowercased.
END_REASONS = ("deleted", "expired", "evicted", "lifetime", "restart", "unloaded", "exported")
ECHO_CHARS = 40  # characters of a request's value that an error message or a log line repeats


def echo(value: str) -> str:
    """A value from a request (a model name, session id, word prefix, stop word, ...) as an error
    message or a log line shows it: quoted, and past ``ECHO_CHARS`` characters cut, with its length.
    A request's strings are as long as its message allows (1 MiB): repeated whole, one would put
    that much into the log per call, and into the status message, whose size the client's
    metadata limit caps (the caller would see RESOURCE_EXHAUSTED instead of the error)."""
    if len(value) <= ECHO_CHARS:
        return repr(value)
    return f"{value[:ECHO_CHARS]!r}… ({len(value):,} characters)"


class LstmdError(Exception):
    """Base class: the message is shown to the client and must say what to change. ``metadata``
    goes back as the call's trailing metadata: facts a client program acts on, so it never has to
    parse the message."""

    metadata: tuple[tuple[str, str], ...] = ()


class InvalidInput(LstmdError):
    pass


class NotFound(LstmdError):
    pass


class SessionEnded(NotFound):
    """A session of the caller's that existed and ended: ``reason`` (one of END_REASONS) and ``when``
    (Unix seconds) go back as trailing metadata beside the message, which says them for a person."""

    def __init__(self, message: str, reason: str, when: float):
        if reason not in END_REASONS:
            raise ValueError(f"unknown session end reason {reason!r}")
        super().__init__(message)
        self.reason, self.when = reason, when
        self.metadata = ((END_KEY, reason), (ENDED_AT_KEY, rfc3339(when)))


def rfc3339(seconds: float) -> str:
    """Unix seconds as RFC 3339 in UTC, to the millisecond: 2026-12-02T06:00:00.123Z."""
    ms = round(seconds * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


class FailedPrecondition(LstmdError):
    """The server is not set up for the call, or not in the state it needs (FAILED_PRECONDITION)."""


class PermissionDenied(LstmdError):
    """The caller's API key may not do this (PERMISSION_DENIED)."""


class AlreadyExists(LstmdError):
    pass


class PositionMismatch(FailedPrecondition):
    def __init__(self, expected: int, actual: int):
        super().__init__(
            f"expected_position {expected} does not match the session's position {actual}: the session "
            "moved since (another feed, or this input applied with other options); re-read it and decide "
            "what to feed from there"
        )
        self.actual = actual
        self.metadata = ((POSITION_KEY, str(actual)),)


class CapacityExceeded(LstmdError):
    pass


class Unavailable(LstmdError):
    """The service cannot answer now; the call may be retried (UNAVAILABLE)."""


class StoreUnavailable(Unavailable):
    """The shared session store (Redis) cannot be reached: the call may be retried once it is back."""


class Unauthenticated(LstmdError):
    """No API key, or a wrong one. The message never holds the key."""


class DeadlineExceeded(LstmdError):
    """A deadline of the server's passed: a Generate's client left a token unread for longer than
    the write timeout (DEADLINE_EXCEEDED)."""


STATUS = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    CapacityExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_of(error: LstmdError) -> grpc.StatusCode:
    """The code of ``error``'s class, or of its nearest base in the table: a subclass maps like its base."""
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    raise KeyError(f"{type(error).__name__} has no status code: add it, or a base of it, to STATUS")
