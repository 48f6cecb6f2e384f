"""Every exception -> one gRPC status code, in one place. No exception leaves as UNKNOWN:
anything unexpected is logged with the request id and answered INTERNAL naming that id."""
from __future__ import annotations

import logging
import math

import grpc

from manager.cache import CacheFullError
from manager.errors import (AlreadyExistsError, CorruptAdapterError, FailedPreconditionError, InvalidArgumentError,
                            NotFoundError, PermissionDeniedError, UnauthenticatedError)
from scheduler.engine import (DeadlineExceededError, EngineStoppedError, RequestCancelledError, RequestFailedError)
from scheduler.policy import QueueFullError
from vbert.adapters import AdapterError
from vbert.model import InputError

from .admission import SlotLimitError

log = logging.getLogger("vbert.dispatcher")

RETRY_AFTER_KEY = "retry-after-ms"
MIN_RETRY_AFTER_MS = 10   # the smallest hint sent: rounded up, never 0 ("retry at once")


class RateLimitedError(RuntimeError):
    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DrainingError(RuntimeError):
    """The server is shutting down: new RPCs are refused."""


class UnavailableError(RuntimeError):
    """No replica could answer (one died with the request on it, none is running yet): retry after the hint."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


# checked in order: the first matching class wins (subclasses before their bases)
STATUS_OF: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (InputError, grpc.StatusCode.INVALID_ARGUMENT),
    (FailedPreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (AdapterError, grpc.StatusCode.FAILED_PRECONDITION),
    (CorruptAdapterError, grpc.StatusCode.DATA_LOSS),
    (RateLimitedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (SlotLimitError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (CacheFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (RequestCancelledError, grpc.StatusCode.CANCELLED),
    (EngineStoppedError, grpc.StatusCode.UNAVAILABLE),
    (DrainingError, grpc.StatusCode.UNAVAILABLE),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (NotImplementedError, grpc.StatusCode.UNIMPLEMENTED),
)
QUEUE_RETRY_AFTER_S = 0.2


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str, float | None]:
    """(code, message, retry-after seconds or None) for an exception."""
    if isinstance(exc, RequestFailedError) and exc.__cause__ is not None:
        code, _, retry = status_of(exc.__cause__)
        if code is not grpc.StatusCode.INTERNAL:
            return code, str(exc), retry
    for cls, code in STATUS_OF:
        if isinstance(exc, cls):
            retry = exc.retry_after_s if isinstance(exc, (RateLimitedError, SlotLimitError, UnavailableError)) else (
                QUEUE_RETRY_AFTER_S if code is grpc.StatusCode.RESOURCE_EXHAUSTED else None)
            return code, str(exc), retry
    return grpc.StatusCode.INTERNAL, "", None


async def abort(context: grpc.aio.ServicerContext, exc: BaseException, request_id: str) -> None:
    """Answer the RPC with the status of `exc` (raises grpc's AbortError, ending the handler)."""
    code, message, retry = status_of(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.error("internal error", exc_info=exc, extra={"request_id": request_id})
        message = f"internal error (request id {request_id})"
    trailing = [("x-request-id", request_id)]
    if retry is not None:
        trailing.append((RETRY_AFTER_KEY, str(max(MIN_RETRY_AFTER_MS, math.ceil(retry * 1000)))))  # never "0"
    context.set_trailing_metadata(trailing)
    await context.abort(code, message or code.name.lower())
