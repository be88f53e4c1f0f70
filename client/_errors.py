"""The client's exception tree: callers handle these, never ``grpc.RpcError``."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import grpc

_POSITION_IN_MESSAGE = re.compile(r"session's position (\d+)")  # servers before the metadata said it only there


class LstmdError(Exception):
    """Base class. ``code`` is the gRPC status code name, ``details`` the server's message."""

    def __init__(self, code: str, details: str):
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


class InvalidInput(LstmdError):
    """The request was malformed (INVALID_ARGUMENT); the message says what to change."""


class NotFound(LstmdError):
    """Unknown model or session (NOT_FOUND). For a session of the caller's that ended, ``reason``
    says why ("expired", "evicted", "deleted", "lifetime", "restart", "unloaded", "exported": the
    server's ``lstmd-session-end`` metadata) and ``ended_at`` when (an aware UTC datetime); both
    are None when the server did not say."""

    def __init__(self, code: str, details: str, reason: str | None = None, ended_at: datetime | None = None):
        super().__init__(code, details)
        self.reason = reason
        self.ended_at = ended_at


class CapacityExceeded(LstmdError):
    """The server is at its session limit, or the message was too large (RESOURCE_EXHAUSTED)."""


class FailedPrecondition(LstmdError):
    """The server is not set up for the call, e.g. ExportSession without a session key
    (FAILED_PRECONDITION); ``PositionMismatch`` is the case of a session at another position."""


class PositionMismatch(FailedPrecondition):
    """``expected_position`` did not match (FAILED_PRECONDITION). ``actual_position`` is the
    session's real position, when the server said it: from the trailing metadata
    ``lstmd-position``, or, from older servers, the message."""

    def __init__(self, code: str, details: str, actual_position: int | None = None):
        super().__init__(code, details)
        if actual_position is None:
            match = _POSITION_IN_MESSAGE.search(details)
            actual_position = int(match.group(1)) if match else None
        self.actual_position = actual_position


class Unavailable(LstmdError):
    """The server cannot be reached, is shutting down, or cannot serve the session right now: its
    shared session store is unreachable, or this replica has yet to load the session's model version
    (UNAVAILABLE). Retried by the library where that is safe."""


class DeadlineExceeded(LstmdError):
    """The call took longer than its deadline, or a generation was left unread for longer than the
    server's write timeout (DEADLINE_EXCEEDED)."""


class Unauthenticated(LstmdError):
    """The server wants an API key and got none, or a wrong one (UNAUTHENTICATED)."""


class PermissionDenied(LstmdError):
    """The API key may not do this: an admin call, or importing another key's session (PERMISSION_DENIED)."""


class AlreadyExists(LstmdError):
    """ImportSession with keep_id of an id already in use (ALREADY_EXISTS)."""


_BY_CODE: dict[grpc.StatusCode, type[LstmdError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInput,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: CapacityExceeded,
    grpc.StatusCode.FAILED_PRECONDITION: PositionMismatch,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
}


POSITION_KEY = "lstmd-position"  # the server's trailing metadata on FAILED_PRECONDITION
END_KEY, ENDED_AT_KEY = "lstmd-session-end", "lstmd-session-ended-at"  # on NOT_FOUND of a session that ended


def _error(code: grpc.StatusCode, details: str, position: int | None, end: str | None, ended_at: datetime | None
           ) -> LstmdError:  # fmt: skip
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        match = _POSITION_IN_MESSAGE.search(details)
        if position is None and match is None:
            return FailedPrecondition(code.name, details)
        return PositionMismatch(code.name, details, position)
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(code.name, details, end, ended_at)
    return _BY_CODE.get(code, LstmdError)(code.name, details)


def end_reason(error: Any) -> str | None:
    """A ``pb.FeedError``'s session_end as the metadata names it ("expired"), or None: unset, or a value
    newer than this client (the enum grows; an old client must not fail on a new reason)."""
    value = error.DESCRIPTOR.fields_by_name["session_end"].enum_type.values_by_number.get(error.session_end)
    return value.name.removeprefix("SESSION_END_").lower() if error.session_end and value else None


def from_feed_error(error: Any) -> LstmdError:
    """A FeedMany item's error (a ``pb.FeedError``) as the error a Feed of it would raise."""
    code = next((c for c in grpc.StatusCode if c.value[0] == error.code), grpc.StatusCode.UNKNOWN)
    ended_at = error.ended_at.ToDatetime(UTC) if error.HasField("ended_at") else None
    position = error.position if error.HasField("position") else None
    return _error(code, error.message, position, end_reason(error), ended_at)


def from_rpc_error(error: grpc.RpcError) -> LstmdError:
    trailing: Any = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    metadata = {key: value for key, value in trailing or () if isinstance(value, str)}  # (key, value) pairs
    position, ended_at = metadata.get(POSITION_KEY, ""), metadata.get(ENDED_AT_KEY, "")
    return _error(error.code(), error.details() or "", int(position) if position.isdigit() else None,
                  metadata.get(END_KEY), _datetime(ended_at))  # fmt: skip


def _datetime(text: str) -> datetime | None:
    """RFC 3339 metadata as an aware datetime; None when absent or not a time (the message still says it)."""
    try:
        return datetime.fromisoformat(text) if text else None
    except ValueError:
        return None
