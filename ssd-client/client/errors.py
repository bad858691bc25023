"""The SDK's one exception hierarchy, translated from gRPC status codes in one place."""

from __future__ import annotations

import grpc


class SSDError(Exception):
    """Base of every SDK error; `code` is the gRPC status, `details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str, request_id: str | None = None) -> None:
        self.code = code
        self.details = details
        self.request_id = request_id
        super().__init__(f"{code.name}: {details}" if details else code.name)


class InvalidArgument(SSDError):
    """The request was rejected (bad prompt, parameter out of range); retrying will not help."""


class ResourceExhausted(SSDError):
    """The server is at capacity or the request exceeds a limit."""


class Unavailable(SSDError):
    """No target could be reached (after retries); safe to retry later."""


class DeadlineExceeded(SSDError):
    """The call's deadline passed before the answer arrived."""


class Cancelled(SSDError):
    """The call was cancelled."""


class NotFound(SSDError):
    """An unknown request id (or other named resource)."""


class Internal(SSDError):
    """An unexpected server failure."""


_BY_CODE: dict[grpc.StatusCode, type[SSDError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.INTERNAL: Internal,
    grpc.StatusCode.UNKNOWN: Internal,
    grpc.StatusCode.DATA_LOSS: Internal,
}
_BY_NUMBER: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


def from_status(code: grpc.StatusCode | int, details: str, request_id: str | None = None) -> SSDError:
    """The SSDError subclass for a status code (enum or google.rpc.Code number)."""
    if not isinstance(code, grpc.StatusCode):
        code = _BY_NUMBER.get(int(code), grpc.StatusCode.UNKNOWN)
    return _BY_CODE.get(code, SSDError)(code, details, request_id)


def from_rpc_error(error: grpc.RpcError, request_id: str | None = None) -> SSDError:
    """Translate a grpc.RpcError (sync or aio) into the SDK hierarchy."""
    code_fn = getattr(error, "code", None)
    details_fn = getattr(error, "details", None)
    code = code_fn() if callable(code_fn) else None
    details = details_fn() if callable(details_fn) else None
    return from_status(code or grpc.StatusCode.UNKNOWN, details or str(error), request_id)
