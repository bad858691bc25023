"""The target's one error map: domain exceptions -> gRPC status codes (only the unexpected is INTERNAL)."""

from __future__ import annotations

import functools
import inspect
import logging
import secrets
from collections.abc import Callable
from typing import Any

import grpc

from ssd_core.errors import IncompatibleModels, InvalidParameter

log = logging.getLogger(__name__)


class Refused(Exception):
    """A request refused with an explicit status code (auth, precondition, loading...)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class AdmissionRejected(Refused):
    """The scheduler is full (max concurrent sequences and max queued requests reached)."""

    def __init__(self, message: str) -> None:
        super().__init__(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


class ShuttingDown(Refused):
    def __init__(self) -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, "target is shutting down")


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message for an exception."""
    if isinstance(exc, Refused):
        return exc.code, str(exc)
    if isinstance(exc, IncompatibleModels):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, InvalidParameter):  # only validation is the caller's fault
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    # anything else is ours: logged in full here, reported without internal text (an id to grep)
    incident = secrets.token_hex(4)
    log.error("unexpected error (incident %s): %r", incident, exc, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (incident {incident}; see the target's log)"


def mapped(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a servicer method (unary or generator) so raised exceptions become status codes.

    Methods raise domain errors and never call context.abort themselves."""
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            try:
                yield from method(self, request, context)
            except Exception as exc:  # noqa: BLE001 - the one place errors become statuses
                code, message = status_of(exc)
                context.abort(code, message)

        return stream

    @functools.wraps(method)
    def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001
            code, message = status_of(exc)
            context.abort(code, message)

    return unary

