"""OpenAI-shaped errors: one exception type and the SDK-error -> HTTP status mapping."""

from __future__ import annotations

from client.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    SSDError,
    Unavailable,
)
from openai_gateway.schemas import ErrorInfo, ErrorResponse

# SDK error class -> (HTTP status, OpenAI error type, code).
_SDK_ERRORS: tuple[tuple[type[SSDError], int, str, str], ...] = (
    (InvalidArgument, 400, "invalid_request_error", "invalid_argument"),
    (NotFound, 404, "invalid_request_error", "not_found"),
    (ResourceExhausted, 429, "rate_limit_error", "resource_exhausted"),
    (Unavailable, 503, "service_unavailable_error", "unavailable"),
    (DeadlineExceeded, 504, "timeout_error", "deadline_exceeded"),
    (Cancelled, 499, "cancelled_error", "cancelled"),
)


class GatewayError(Exception):
    """An error answered as OpenAI's error JSON with `status`."""

    def __init__(
        self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
        code: str | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def body(self) -> dict[str, object]:
        """The JSON body of this error."""
        info = ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=info).model_dump()


def bad_request(message: str, param: str | None = None) -> GatewayError:
    """A 400 invalid_request_error about `param`."""
    return GatewayError(400, message, "invalid_request_error", param, None)


def model_not_found(model: str) -> GatewayError:
    """The 404 OpenAI answers for an unknown model."""
    message = f"The model `{model}` does not exist."
    return GatewayError(404, message, "invalid_request_error", "model", "model_not_found")


def from_sdk_error(error: SSDError) -> GatewayError:
    """Map a client.errors exception to its HTTP status and OpenAI error type."""
    message = error.details or error.code.name
    for cls, status, type_, code in _SDK_ERRORS:
        if isinstance(error, cls):
            return GatewayError(status, message, type_, None, code)
    return GatewayError(500, message, "server_error", None, error.code.name.lower())
