"""The server's error tree. Domain code raises these; one table maps them to gRPC codes."""

from __future__ import annotations

import grpc

POSITION_KEY = "lstmd-position"  # trailing metadata of FAILED_PRECONDITION: the session's actual position
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


class PositionMismatch(LstmdError):
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
    PositionMismatch: grpc.StatusCode.FAILED_PRECONDITION,
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
