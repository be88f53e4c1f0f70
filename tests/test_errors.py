"""The two error trees: the server's and the client's classes carry the same names where they mean
the same status, and the server's status table maps a subclass like its base."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from lstmd import client
from lstmd.client._errors import from_rpc_error
from lstmd.server import errors


class _Fake(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "a message"):
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_a_subclass_defined_elsewhere_maps_like_its_base() -> None:
    class SessionExpired(errors.NotFound):
        pass

    class Draining(errors.Unavailable):
        pass

    assert errors.status_of(SessionExpired("gone")) == grpc.StatusCode.NOT_FOUND
    assert errors.status_of(Draining("later")) == grpc.StatusCode.UNAVAILABLE


def test_store_unavailable_is_the_server_s_unavailable() -> None:
    assert issubclass(errors.StoreUnavailable, errors.Unavailable)
    assert errors.status_of(errors.StoreUnavailable("redis is down")) == grpc.StatusCode.UNAVAILABLE


def test_an_error_outside_the_table_is_not_given_a_code() -> None:
    with pytest.raises(KeyError, match="LstmdError has no status code"):
        errors.status_of(errors.LstmdError("what is this"))


@pytest.mark.parametrize("server_class", list(errors.STATUS), ids=lambda cls: cls.__name__)
def test_each_server_error_arrives_as_the_client_class_of_the_same_name(server_class: type[errors.LstmdError]) -> None:
    code = errors.STATUS[server_class]
    arrived = from_rpc_error(_Fake(code))
    assert type(arrived) is getattr(client, server_class.__name__)
    assert arrived.code == code.name


def test_error_mapping_table() -> None:
    mismatch = "expected_position 0 does not match the session's position 7: ..."
    expected = {
        grpc.StatusCode.INVALID_ARGUMENT: client.InvalidInput,
        grpc.StatusCode.NOT_FOUND: client.NotFound,
        grpc.StatusCode.RESOURCE_EXHAUSTED: client.CapacityExceeded,
        grpc.StatusCode.FAILED_PRECONDITION: client.FailedPrecondition,
        grpc.StatusCode.PERMISSION_DENIED: client.PermissionDenied,
        grpc.StatusCode.ALREADY_EXISTS: client.AlreadyExists,
        grpc.StatusCode.UNAVAILABLE: client.Unavailable,
        grpc.StatusCode.DEADLINE_EXCEEDED: client.DeadlineExceeded,
        grpc.StatusCode.INTERNAL: client.LstmdError,
    }
    for code, cls in expected.items():
        error = from_rpc_error(_Fake(code))
        assert type(error) is cls and error.code == code.name
    moved = from_rpc_error(_Fake(grpc.StatusCode.FAILED_PRECONDITION, mismatch))
    assert isinstance(moved, client.PositionMismatch) and moved.actual_position == 7

    class WithMetadata(_Fake):
        def trailing_metadata(self) -> Any:
            return (("lstmd-position", "9"),)

    structured = from_rpc_error(WithMetadata(grpc.StatusCode.FAILED_PRECONDITION, mismatch))
    assert structured.actual_position == 9  # type: ignore[attr-defined]  # the metadata wins over the message
