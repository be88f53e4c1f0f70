"""lstmd's Python client: blocking (``Client``) and asyncio (``AsyncClient``) flavours with the
same shape, typed results, one small exception tree, and sessions that recover from a server
restart or crash (``Recovery``)."""

from lstmd.client._async import AsyncClient, AsyncSession, AsyncStream
from lstmd.client._errors import (
    CapacityExceeded,
    DeadlineExceeded,
    InvalidInput,
    LstmdError,
    NotFound,
    PositionMismatch,
    Unauthenticated,
    Unavailable,
)
from lstmd.client._recovery import Recovery
from lstmd.client._sync import Client, Session, Stream
from lstmd.client._types import Candidate, GeneratedToken, ModelInfo, Prediction, SessionInfo, Token, Tokenization

__all__ = [
    "AsyncClient",
    "AsyncSession",
    "AsyncStream",
    "Candidate",
    "CapacityExceeded",
    "Client",
    "DeadlineExceeded",
    "GeneratedToken",
    "InvalidInput",
    "LstmdError",
    "ModelInfo",
    "NotFound",
    "PositionMismatch",
    "Prediction",
    "Recovery",
    "Session",
    "SessionInfo",
    "Stream",
    "Token",
    "Tokenization",
    "Unauthenticated",
    "Unavailable",
]
