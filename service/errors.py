"""Every way a request can fail, mapped to its HTTP status and failure-metric reason in one place.

The request steps raise what they know (the pipeline's ``inference.errors``, the batcher's ``QueueFull`` and
``BackendError``, a passed deadline, a label image too large for its file format); ``service_error`` turns
each into a ``ServiceError``, and the service answers it as JSON ``{"error": ...}``.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from inference.errors import CorruptImage, ImageTooLarge, InputError, UnsupportedImage, UnusableInput
from service.batcher import BackendError, QueueFull
from service.render import LabelOverflow

# HTTP status of each kind of refused input.
INPUT_STATUS: dict[type[InputError], int] = {
    UnsupportedImage: 415,
    ImageTooLarge: 413,
    CorruptImage: 400,
    UnusableInput: 422,
}


class ServiceError(Exception):
    """A request that ends with an error status; ``reason`` labels the failure metric."""

    def __init__(self, status: int, message: str, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.reason, self.headers = status, message, reason, headers


class DeadlinePassed(Exception):
    """The request's deadline passed; the message says where it was."""


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def service_error(error: Exception, retry_after_s: int) -> ServiceError | None:
    """The answer to ``error``, or None for an exception no request step raises on purpose (a bug: 500)."""
    if isinstance(error, ServiceError):
        return error
    if isinstance(error, InputError):
        return ServiceError(INPUT_STATUS.get(type(error), 422), str(error), "bad_input")
    if isinstance(error, LabelOverflow):
        return ServiceError(422, str(error), "bad_input")
    if isinstance(error, QueueFull):
        return ServiceError(503, str(error), "rejected", {"Retry-After": str(retry_after_s)})
    if isinstance(error, DeadlinePassed):
        return ServiceError(504, str(error), "timeout")
    if isinstance(error, BackendError):
        return ServiceError(500, f"inference failed: {error}", "backend")
    return None
