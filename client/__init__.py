"""lstmd's Python client: blocking (``Client``) and asyncio (``AsyncClient``) flavours with the
same shape, typed results, one small exception tree, and sessions that recover from a server
restart or crash (``Recovery``)."""

from lstmd.client._async import AsyncClient, AsyncSession, AsyncStream
from lstmd.client._errors import (
    AlreadyExists,
    CapacityExceeded,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidInput,
    LstmdError,
    NotFound,
    PermissionDenied,
    PositionMismatch,
    Unauthenticated,
    Unavailable,
)
from lstmd.client._recovery import Recovery
from lstmd.client._sync import Client, Session, Stream
from lstmd.client._types import (
    Candidate,
    GeneratedToken,
    ModelInfo,
    Prediction,
    Reload,
    SessionInfo,
    Token,
    Tokenization,
)

__all__ = [
    "AlreadyExists",
    "AsyncClient",
    "AsyncSession",
    "AsyncStream",
    "Candidate",
    "CapacityExceeded",
    "Client",
    "DeadlineExceeded",
    "FailedPrecondition",
    "GeneratedToken",
    "InvalidInput",
    "LstmdError",
    "ModelInfo",
    "NotFound",
    "PermissionDenied",
    "PositionMismatch",
    "Prediction",
    "Recovery",
    "Reload",
    "Session",
    "SessionInfo",
    "Stream",
    "Token",
    "Tokenization",
    "Unauthenticated",
    "Unavailable",
]
