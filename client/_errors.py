"""The client's exception tree: callers handle these, never ``grpc.RpcError``."""

from __future__ import annotations

import re
from typing import Any

import grpc


class LstmdError(Exception):
    """Base class. ``code`` is the gRPC status code name, ``details`` the server's message."""

    def __init__(self, code: str, details: str):
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


class InvalidInput(LstmdError):
    """The request was malformed (INVALID_ARGUMENT); the message says what to change."""


class NotFound(LstmdError):
    """Unknown model or session; a session may have expired or been evicted (NOT_FOUND)."""


class CapacityExceeded(LstmdError):
    """The server is at its session limit, or the message was too large (RESOURCE_EXHAUSTED)."""


class PositionMismatch(LstmdError):
    """``expected_position`` did not match (FAILED_PRECONDITION). ``actual_position`` is the
    session's real position, when the server said it: from the trailing metadata
    ``lstmd-position``, or, from older servers, the message."""

    def __init__(self, code: str, details: str, actual_position: int | None = None):
        super().__init__(code, details)
        if actual_position is None:
            match = re.search(r"session's position (\d+)", details)
            actual_position = int(match.group(1)) if match else None
        self.actual_position = actual_position


class Unavailable(LstmdError):
    """The server cannot be reached or is shutting down (UNAVAILABLE)."""


class DeadlineExceeded(LstmdError):
    """The call took longer than its deadline, or a generation was left unread for longer than the
    server's write timeout (DEADLINE_EXCEEDED)."""


class Unauthenticated(LstmdError):
    """The server wants an API key and got none, or a wrong one (UNAUTHENTICATED)."""


_BY_CODE: dict[grpc.StatusCode, type[LstmdError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInput,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: CapacityExceeded,
    grpc.StatusCode.FAILED_PRECONDITION: PositionMismatch,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}


POSITION_KEY = "lstmd-position"  # the server's trailing metadata on FAILED_PRECONDITION


def from_feed_error(error: Any) -> LstmdError:
    """A FeedMany item's error (a ``pb.FeedError``) as the error a Feed of it would raise."""
    code = next((c for c in grpc.StatusCode if c.value[0] == error.code), grpc.StatusCode.UNKNOWN)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return PositionMismatch(code.name, error.message, error.position if error.HasField("position") else None)
    return _BY_CODE.get(code, LstmdError)(code.name, error.message)


def from_rpc_error(error: grpc.RpcError) -> LstmdError:
    code = error.code()
    details = error.details() or ""
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        trailing: Any = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
        position = next((value for key, value in trailing or () if key == POSITION_KEY), None)  # (key, value) pairs
        return PositionMismatch(code.name, details, int(position) if isinstance(position, str) else None)
    return _BY_CODE.get(code, LstmdError)(code.name, details)
