"""The one place where domain errors become gRPC status codes (AIP-193 details)."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from sessiond.server.domain import errors as e

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
    (e.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
]


def code_of(exc: e.SessiondError) -> grpc.StatusCode:
    for cls, code in CODES:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def to_status(exc: e.SessiondError) -> grpc.Status:
    code = code_of(exc)
    info = error_details_pb2.ErrorInfo(reason=exc.reason, domain=DOMAIN, metadata=exc.metadata)
    details: list[Message] = [info]
    if isinstance(exc, e.InvalidArgument) and exc.violations:
        details.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in exc.violations]))
    if isinstance(exc, e.ResourceExhausted):
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(max(1, math.ceil(exc.retry_after * 1e9)))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
        details.append(error_details_pb2.QuotaFailure(violations=[
            error_details_pb2.QuotaFailure.Violation(subject=exc.subject,
                                                     description=exc.description)]))
    packed = []
    for d in details:
        a = any_pb2.Any()
        a.Pack(d)
        packed.append(a)
    st = status_pb2.Status(code=getattr(code_pb2, code.name), message=exc.message,
                           details=packed)
    return rpc_status.to_status(st)


async def abort(context: grpc.aio.ServicerContext[Any, Any], exc: e.SessiondError) -> None:
    st = to_status(exc)
    await context.abort(st.code, st.details, st.trailing_metadata)


async def abort_internal(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> None:
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
