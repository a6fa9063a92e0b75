"""Request decoding owned by the server, for every RPC.

grpc.aio turns an exception raised by a request deserializer into UNKNOWN
("Unexpected <class 'DecodeError'>") and logs a full traceback per call. This
interceptor gives each handler a deserializer that never raises: bytes that are not a
valid request become an `Undecodable` marker, and the handler answers it with
INVALID_ARGUMENT (reason MALFORMED_REQUEST) before any servicer code sees it (for a
request stream, such as server reflection, when the bad request is read). Each
failure is logged as one short line, and at most one line per second (with the count
of those not logged)."""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from sessiond.server.api.errors import abort
from sessiond.server.domain.errors import InvalidArgument

log = logging.getLogger(__name__)
Ctx = grpc.aio.ServicerContext[Any, Any]
Req = TypeVar("Req")
Resp = TypeVar("Resp")

_LOG_INTERVAL = 1.0
_DETAIL_CHARS = 120


class Undecodable:
    """What the safe deserializer returns for bytes it could not decode."""

    __slots__ = ("error", "size")

    def __init__(self, error: str, size: int) -> None:
        self.error = error
        self.size = size


def safe_deserializer(inner: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        if inner is None:
            return data
        try:
            return inner(data)
        except Exception as exc:  # protobuf raises DecodeError; anything else is as bad
            return Undecodable(f"{type(exc).__name__}: {str(exc)[:_DETAIL_CHARS]}", len(data))

    return decode


class DecodeGuard(grpc.aio.ServerInterceptor):
    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[Any, Any]] = {}
        self._last_log = 0.0
        self._suppressed = 0

    def _refuse(self, method: str, bad: Undecodable, context: Ctx) -> Awaitable[None]:
        now = time.monotonic()
        if now - self._last_log >= _LOG_INTERVAL:
            more = f" ({self._suppressed} more not logged)" if self._suppressed else ""
            log.warning("undecodable request to %s from %s: %d bytes, %s%s", method[:120],
                        str(context.peer())[:80], bad.size, bad.error, more)
            self._last_log, self._suppressed = now, 0
        else:
            self._suppressed += 1
        name = method.rsplit("/", 1)[-1][:80]
        return abort(context, InvalidArgument(
            f"the request bytes are not a valid {name} request message",
            reason="MALFORMED_REQUEST"))

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler[Req, Resp] | None]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Req, Resp] | None:
        handler = await continuation(details)
        h: Any = handler
        if h is None:
            return handler
        method = details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            done: grpc.RpcMethodHandler[Req, Resp] = cached[1]
            return done
        wrapped: grpc.RpcMethodHandler[Req, Resp] = self._wrap(h, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, h: Any, method: str) -> Any:
        refuse = self._refuse
        decode = safe_deserializer(h.request_deserializer)
        if h.request_streaming:
            return self._wrap_streaming_request(h, method, decode)
        if h.response_streaming:
            inner_stream = h.unary_stream
            if not inspect.isasyncgenfunction(inner_stream):
                # A streaming handler may also be a coroutine that writes with
                # context.write (grpc's health Watch does).
                async def writer(request: Any, context: Ctx) -> None:
                    if isinstance(request, Undecodable):
                        await refuse(method, request, context)
                        return
                    await inner_stream(request, context)

                return grpc.unary_stream_rpc_method_handler(writer, decode,
                                                            h.response_serializer)

            async def gen(request: Any, context: Ctx) -> AsyncIterator[Any]:
                if isinstance(request, Undecodable):
                    await refuse(method, request, context)
                    return
                async for item in inner_stream(request, context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(gen, decode, h.response_serializer)
        inner = h.unary_unary

        async def call(request: Any, context: Ctx) -> Any:
            if isinstance(request, Undecodable):
                await refuse(method, request, context)
                return None
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(call, decode, h.response_serializer)

    def _wrap_streaming_request(self, h: Any, method: str, decode: Callable[[bytes], Any]
                                ) -> Any:
        """Request streams (server reflection): each request is checked as it is read;
        the first undecodable one ends the call with INVALID_ARGUMENT."""
        refuse = self._refuse

        async def checked(requests: AsyncIterator[Any], context: Ctx) -> AsyncIterator[Any]:
            async for request in requests:
                if isinstance(request, Undecodable):
                    await refuse(method, request, context)
                    return
                yield request

        if h.response_streaming:
            inner = h.stream_stream
            if not inspect.isasyncgenfunction(inner):
                async def writer(requests: AsyncIterator[Any], context: Ctx) -> None:
                    await inner(checked(requests, context), context)

                return grpc.stream_stream_rpc_method_handler(writer, decode,
                                                             h.response_serializer)

            async def gen(requests: AsyncIterator[Any], context: Ctx) -> AsyncIterator[Any]:
                async for item in inner(checked(requests, context), context):
                    yield item

            return grpc.stream_stream_rpc_method_handler(gen, decode, h.response_serializer)
        inner_unary = h.stream_unary

        async def call(requests: AsyncIterator[Any], context: Ctx) -> Any:
            return await inner_unary(checked(requests, context), context)

        return grpc.stream_unary_rpc_method_handler(call, decode, h.response_serializer)
