"""Client interceptors that attach the identity metadata and fill request ids.

`connect`/`aio_connect` install them; build your own channel with
`grpc.intercept_channel(channel, SessiondInterceptor(...))` or
`grpc.aio.insecure_channel(target, interceptors=aio_interceptors(...))`.

Per call:
* identity keys (x-sessiond-account/user/agent) missing from the call's metadata are
  added from the configured Identity; keys the call sets itself win;
* on CreateSession, AddMessage(s), Commit, RecordUsage, RetryTask and RevertArchive an empty
  `request_id` is filled on a copy of the request (see `sessiond.client.idempotency`),
  so gRPC's built-in retries of that call replay the same id.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

import grpc
from sessiond.client.idempotency import REQUEST_ID_METHODS, filled_request_id
from sessiond.client.identity import Identity

if TYPE_CHECKING:
    from grpc import _CallFuture, _CallIterator  # type_check_only helpers of the stubs

__all__ = [
    "AioUnaryStreamInterceptor",
    "AioUnaryUnaryInterceptor",
    "SessiondInterceptor",
    "aio_interceptors",
]

Req = TypeVar("Req")
Resp = TypeVar("Resp")

_Md = tuple[tuple[str, str | bytes], ...]


def _method_name(method: str | bytes) -> str:
    return method.decode() if isinstance(method, bytes) else method


def _merged(metadata: Sequence[tuple[str, str | bytes]] | None,
            identity: Identity | None) -> _Md:
    items = tuple(metadata or ())
    if identity is None:
        return items
    present = {k.lower() for k, _ in items}
    return items + tuple((k, v) for k, v in identity.metadata() if k not in present)


class _Rewriter:
    def __init__(self, identity: Identity | None, fill_request_ids: bool) -> None:
        self.identity = identity
        self.fill_request_ids = fill_request_ids

    def request(self, method: str | bytes, request: Req) -> Req:
        if self.fill_request_ids and _method_name(method) in REQUEST_ID_METHODS:
            return filled_request_id(request)
        return request


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, base: grpc.ClientCallDetails, metadata: _Md) -> None:
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)


class SessiondInterceptor(_Rewriter, grpc.UnaryUnaryClientInterceptor,
                          grpc.UnaryStreamClientInterceptor):
    """Sync interceptor: identity metadata plus request ids (unary and server streaming)."""

    def __init__(self, identity: Identity | None = None, *,
                 fill_request_ids: bool = True) -> None:
        super().__init__(identity, fill_request_ids)

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(details, _merged(details.metadata, self.identity))

    def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Req], _CallFuture[Resp]],
        client_call_details: grpc.ClientCallDetails,
        request: Req,
    ) -> _CallFuture[Resp]:
        details = self._details(client_call_details)
        return continuation(details, self.request(details.method, request))

    def intercept_unary_stream(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Req], _CallIterator[Resp]],
        client_call_details: grpc.ClientCallDetails,
        request: Req,
    ) -> _CallIterator[Resp]:
        details = self._details(client_call_details)
        return continuation(details, self.request(details.method, request))


class _AioRewriter(_Rewriter):
    def __init__(self, identity: Identity | None = None, *,
                 fill_request_ids: bool = True) -> None:
        super().__init__(identity, fill_request_ids)

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata.from_tuple(_merged(
            tuple(details.metadata) if details.metadata is not None else None, self.identity))
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata,
                                          details.credentials, details.wait_for_ready)


class AioUnaryUnaryInterceptor(_AioRewriter, grpc.aio.UnaryUnaryClientInterceptor):
    """grpc.aio, unary calls: identity metadata plus request ids."""

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Req],
                               Awaitable[grpc.aio.UnaryUnaryCall[Req, Resp]]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Req,
    ) -> Resp | grpc.aio.UnaryUnaryCall[Req, Resp]:
        details = self._details(client_call_details)
        return await continuation(details, self.request(details.method, request))


class AioUnaryStreamInterceptor(_AioRewriter, grpc.aio.UnaryStreamClientInterceptor):
    """grpc.aio, server-streaming calls (WatchTask): identity metadata."""

    async def intercept_unary_stream(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Req],
                               Awaitable[grpc.aio.UnaryStreamCall[Req, Resp]]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Req,
    ) -> AsyncIterator[Resp] | grpc.aio.UnaryStreamCall[Req, Resp]:
        details = self._details(client_call_details)
        return await continuation(details, self.request(details.method, request))


def aio_interceptors(identity: Identity | None = None, *, fill_request_ids: bool = True
                     ) -> list[grpc.aio.ClientInterceptor]:
    """The interceptors for `grpc.aio.*_channel(..., interceptors=...)`.

    Two objects, because a grpc.aio channel files each interceptor under the first
    interceptor kind it is an instance of (unary-unary before unary-stream), so one
    object implementing both would never see streaming calls."""
    return [AioUnaryUnaryInterceptor(identity, fill_request_ids=fill_request_ids),
            AioUnaryStreamInterceptor(identity, fill_request_ids=fill_request_ids)]
