"""The one place where domain exceptions become gRPC status codes (and difflens_errors_total is counted).

    InvalidArgument   -> INVALID_ARGUMENT   "<request field path>: <what is allowed>"
    ResourceExhausted -> RESOURCE_EXHAUSTED  message with the retry hint; trailing metadata `retry-after-s`
    NotReady, BackendUnavailable (the UNet's Triton server) -> UNAVAILABLE
    JobNotFound       -> NOT_FOUND
    Unauthenticated   -> UNAUTHENTICATED with its fixed message (api/auth.py raises it)
    FailedPrecondition -> FAILED_PRECONDITION (deleting a job that has not ended)
    Cancelled / DeadlineExceeded -> CANCELLED / DEADLINE_EXCEEDED
    a queue backend (Redis) that cannot be reached -> UNAVAILABLE; one out of memory -> RESOURCE_EXHAUSTED
    anything else     -> INTERNAL with a fixed message; the details go to the log only
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from difflens import metrics
from difflens.api.convert import pb_field
from difflens.errors import (
    BackendUnavailable,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ModelLoadError,
    NotReady,
    ResourceExhausted,
    Unauthenticated,
)
from difflens.queue.base import JobNotFound
from difflens.queue.common import QUEUE_FULL_RETRY_S, STORAGE_FULL_MESSAGE, storage_full

log = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error (details are in the server's log)"
RETRY_AFTER_KEY = "retry-after-s"
# A status message travels in a header, and gRPC drops a call whose headers pass 8-16 KiB (percent-encoding can
# triple a message's bytes): one that repeats a long input (a job id, every bad value of a list) is cut here.
MAX_MESSAGE_BYTES = 1024


def shortened(message: str) -> str:
    raw = message.encode()
    if len(raw) <= MAX_MESSAGE_BYTES:
        return message
    kept = raw[:MAX_MESSAGE_BYTES - 40].decode("utf-8", "ignore")
    return f"{kept}... ({len(raw) - len(kept.encode())} more bytes)"


def _backend_down(err: BaseException) -> bool:
    try:
        import redis
    except ImportError:  # no Redis client: the in-process queue cannot be "down"
        return False
    return isinstance(err, redis.ConnectionError | redis.TimeoutError)


def status_of(err: BaseException) -> tuple[grpc.StatusCode, str, str, tuple[tuple[str, str], ...]]:
    """(status, message, error type label, trailing metadata) for an exception raised by a handler; the message
    at most MAX_MESSAGE_BYTES."""
    code, message, label, meta = _status_of(err)
    return code, shortened(message), label, meta


def _status_of(err: BaseException) -> tuple[grpc.StatusCode, str, str, tuple[tuple[str, str], ...]]:
    if isinstance(err, InvalidArgument):
        return grpc.StatusCode.INVALID_ARGUMENT, f"{pb_field(err.field)}: {err.message}", "invalid_argument", ()
    if isinstance(err, ResourceExhausted):
        meta = ((RETRY_AFTER_KEY, f"{err.retry_after_s:g}"),) if err.retry_after_s is not None else ()
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(err), "resource_exhausted", meta
    if isinstance(err, NotReady):
        return grpc.StatusCode.UNAVAILABLE, str(err), "unavailable", ()
    if isinstance(err, BackendUnavailable):
        return grpc.StatusCode.UNAVAILABLE, str(err), "unet_backend", ()
    if isinstance(err, JobNotFound):
        return grpc.StatusCode.NOT_FOUND, str(err), "not_found", ()
    if isinstance(err, Unauthenticated):
        return grpc.StatusCode.UNAUTHENTICATED, str(err), "unauthenticated", ()
    if isinstance(err, FailedPrecondition):
        return grpc.StatusCode.FAILED_PRECONDITION, str(err), "failed_precondition", ()
    if isinstance(err, Cancelled):
        return grpc.StatusCode.CANCELLED, str(err), "cancelled", ()
    if isinstance(err, DeadlineExceeded):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(err), "deadline_exceeded", ()
    if isinstance(err, ModelLoadError):
        return grpc.StatusCode.UNAVAILABLE, f"model cannot be loaded: {err}", "model_load", ()
    if _backend_down(err):
        return grpc.StatusCode.UNAVAILABLE, "the job queue cannot be reached; retry later", "queue", ()
    if storage_full(err):
        return (grpc.StatusCode.RESOURCE_EXHAUSTED, STORAGE_FULL_MESSAGE, "queue",
                ((RETRY_AFTER_KEY, f"{QUEUE_FULL_RETRY_S:g}"),))
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE, "internal", ()


async def abort(context: grpc.aio.ServicerContext, method: str, err: Exception) -> None:
    """End the call with err's status (status_of), counted in difflens_errors_total and logged."""
    code, message, label, meta = status_of(err)
    metrics.ERRORS.labels(label).inc()
    if code == grpc.StatusCode.INTERNAL:
        log.error("%s failed", method, exc_info=err)
    else:
        log.info("%s: %s: %s", method, code.name, message)
    if meta:
        context.set_trailing_metadata(meta)
    await context.abort(code, message)


class _Undecodable:
    """What a request that does not parse becomes, so that the handler answers INVALID_ARGUMENT (raised in the
    deserializer, the error became UNKNOWN "Unexpected <class 'google.protobuf.message.DecodeError'>")."""

    def __init__(self, err: Exception) -> None:
        self.err = err


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as e:  # DecodeError; a string field that is not UTF-8 is one too
            return _Undecodable(e)

    return parse


def _check_decoded(method: str, request: Any) -> None:
    if isinstance(request, _Undecodable):
        raise InvalidArgument("request", f"not a valid message for {method} ({request.err}); a string field must be "
                                         "UTF-8")


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Wraps the handlers of the services under `prefix` (ours). Health and reflection pass through untouched:
    they raise nothing of ours, and their streaming handlers write to the context instead of yielding."""

    def __init__(self, prefix: str = "/difflens.") -> None:
        self.prefix = prefix

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        method = details.method
        if handler is None or not method.startswith(self.prefix):
            return handler
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    _check_decoded(method, request)
                    return await inner(request, context)
                except grpc.aio.AbortError:
                    raise
                except Exception as e:
                    await abort(context, method, e)

            return grpc.unary_unary_rpc_method_handler(unary, request_deserializer=_tolerant(
                handler.request_deserializer), response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                try:
                    _check_decoded(method, request)
                    async for item in inner_stream(request, context):
                        yield item
                except grpc.aio.AbortError:
                    raise
                except Exception as e:
                    await abort(context, method, e)

            return grpc.unary_stream_rpc_method_handler(stream, request_deserializer=_tolerant(
                handler.request_deserializer), response_serializer=handler.response_serializer)
        return handler
