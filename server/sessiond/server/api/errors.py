"""The one place where domain errors become gRPC status codes (AIP-193 details)."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from sessiond.server.domain import errors as e
from sessiond.server.redact import redact_text

log = logging.getLogger(__name__)
DOMAIN = "sessiond.v1"

CODES: list[tuple[type[e.SessiondError], grpc.StatusCode]] = [
    (e.NotFound, grpc.StatusCode.NOT_FOUND),
    (e.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (e.RequestIdConflict, grpc.StatusCode.ALREADY_EXISTS),
    (e.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (e.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (e.Aborted, grpc.StatusCode.ABORTED),
    (e.OutOfRange, grpc.StatusCode.OUT_OF_RANGE),
    (e.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (e.LeaseLost, grpc.StatusCode.ABORTED),
    (e.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (e.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (e.QuotaExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (e.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
]


def code_of(exc: e.SessiondError) -> grpc.StatusCode:
    for cls, code in CODES:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


# Error details stay far below the 16 KiB trailer limit whatever the request held
# (about 8 KiB at most once base64-encoded): every text clipped in UTF-8 bytes, at
# most MAX_VIOLATIONS violations within VIOLATION_BYTES, then one "and N more".
MAX_VIOLATIONS = 20
VIOLATION_BYTES = 3072
MESSAGE_BYTES = 512
DETAIL_BYTES = 160
KEY_BYTES = 64
MAX_METADATA = 8


def clip_bytes(text: str, limit: int) -> str:
    """`text` within `limit` UTF-8 bytes (plus a short "…(N chars)" when clipped)."""
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text
    return f"{data[:limit].decode('utf-8', 'ignore')}…({len(text)} chars)"


def bounded_violations(violations: list[e.FieldViolation]
                       ) -> list[error_details_pb2.BadRequest.FieldViolation]:
    shown: list[error_details_pb2.BadRequest.FieldViolation] = []
    used = 0
    for v in violations[:MAX_VIOLATIONS]:
        fv = error_details_pb2.BadRequest.FieldViolation(
            field=clip_bytes(v.field, KEY_BYTES),
            description=clip_bytes(redact_text(v.description), DETAIL_BYTES))
        used += fv.ByteSize()
        if used > VIOLATION_BYTES:
            break
        shown.append(fv)
    if len(violations) > len(shown):
        shown.append(error_details_pb2.BadRequest.FieldViolation(
            field="*", description=f"and {len(violations) - len(shown)} more violations"))
    return shown


def to_status(exc: e.SessiondError) -> grpc.Status:
    code = code_of(exc)
    metadata = {clip_bytes(k, KEY_BYTES): clip_bytes(redact_text(v), DETAIL_BYTES)
                for k, v in list(exc.metadata.items())[:MAX_METADATA]}
    info = error_details_pb2.ErrorInfo(reason=clip_bytes(exc.reason, KEY_BYTES),
                                       domain=DOMAIN, metadata=metadata)
    details: list[Any] = [info]
    if isinstance(exc, e.InvalidArgument) and exc.violations:
        details.append(error_details_pb2.BadRequest(
            field_violations=bounded_violations(exc.violations)))
    if isinstance(exc, e.RevertConflict):
        violations = [error_details_pb2.PreconditionFailure.Violation(
            type="MEMORY_CHANGED_LATER", subject=clip_bytes(change_id, KEY_BYTES),
            description=clip_bytes(redact_text(what), DETAIL_BYTES))
            for change_id, what in exc.conflicts[:MAX_VIOLATIONS]]
        more = exc.more + max(0, len(exc.conflicts) - MAX_VIOLATIONS)
        if more:
            violations.append(error_details_pb2.PreconditionFailure.Violation(
                type="*", subject="*", description=f"and {more} more conflicting changes"))
        details.append(error_details_pb2.PreconditionFailure(violations=violations))
    if isinstance(exc, e.QuotaExceeded):
        details.append(error_details_pb2.QuotaFailure(violations=[
            error_details_pb2.QuotaFailure.Violation(
                subject=clip_bytes(exc.subject, DETAIL_BYTES),
                description=clip_bytes(exc.limit, DETAIL_BYTES))]))
    if isinstance(exc, e.ResourceExhausted):
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(max(1, math.ceil(exc.retry_after * 1e9)))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
        details.append(error_details_pb2.QuotaFailure(violations=[
            error_details_pb2.QuotaFailure.Violation(
                subject=clip_bytes(exc.subject, DETAIL_BYTES),
                description=clip_bytes(exc.description, DETAIL_BYTES))]))
    packed = []
    for d in details:
        a = any_pb2.Any()
        a.Pack(d)
        packed.append(a)
    message = clip_bytes(redact_text(exc.message), MESSAGE_BYTES)
    st = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=packed)
    return rpc_status.to_status(st)


async def abort(context: grpc.aio.ServicerContext[Any, Any], exc: e.SessiondError) -> None:
    st = to_status(exc)
    await context.abort(st.code, st.details, st.trailing_metadata)


async def abort_internal(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> None:
    if context.done():
        # The call is over (the client went away, or the server closed it): there is
        # nobody to answer, and nothing went wrong in sessiond (e.g. grpc's
        # ExecuteBatchError when a status cannot be sent any more).
        log.debug("call ended before its answer could be sent: %s", type(exc).__name__)
        return
    log.exception("unhandled error", exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")


Req = TypeVar("Req")
Resp = TypeVar("Resp")


def unary(fn: Callable[[Any, Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[Resp]]
          ) -> Callable[[Any, Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[Resp]]:
    @functools.wraps(fn)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext[Any, Any]) -> Resp:
        try:
            return await fn(self, request, context)
        except e.SessiondError as exc:
            await abort(context, exc)
        except (grpc.aio.AbortError, grpc.RpcError):
            raise
        except Exception as exc:
            await abort_internal(context, exc)
            raise  # reached only when the call was over already
        raise AssertionError("unreachable")

    return wrapper


def stream(fn: Callable[[Any, Req, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Resp]]
           ) -> Callable[[Any, Req, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Resp]]:
    @functools.wraps(fn)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext[Any, Any]
                      ) -> AsyncIterator[Resp]:
        try:
            async for item in fn(self, request, context):
                yield item
        except e.SessiondError as exc:
            await abort(context, exc)
        except (grpc.aio.AbortError, grpc.RpcError):
            raise
        except Exception as exc:
            await abort_internal(context, exc)

    return wrapper
