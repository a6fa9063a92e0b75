"""Authentication and authorization of every call, in one server interceptor.

Per call, in this order:

1. identity and `authorization` headers sent more than once: INVALID_ARGUMENT
   (DUPLICATE_METADATA), in every mode;
2. the principal from the credential and/or client certificate (`auth/policy.py`):
   UNAUTHENTICATED with an ErrorInfo reason when missing, invalid, expired, revoked;
3. the scope the method needs (`SCOPES`): PERMISSION_DENIED (SCOPE_MISSING);
4. the identity the call acts for (`auth/principal.select_identity`):
   PERMISSION_DENIED (IDENTITY_NOT_ALLOWED) when the headers ask for more than the
   principal allows;
5. the caller's rate limits (`services/limits.py`, per principal, or per identity
   with `--auth none`): RESOURCE_EXHAUSTED (RATE_LIMITED) with RetryInfo and
   QuotaFailure.

Health is open. Reflection is open (`on`), absent (`off`) or needs any valid
credential (`authenticated`). A method missing from `SCOPES` needs `admin`, so a new
RPC is closed until it is classified here.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from sessiond.server.api.errors import abort, abort_internal
from sessiond.server.api.identity import (
    AUTHORIZATION_KEY,
    CURRENT,
    CallAuth,
    requested_identity,
    single_values,
)
from sessiond.server.auth.policy import AuthPolicy, Presented
from sessiond.server.auth.principal import Scope, select_identity
from sessiond.server.domain.errors import PermissionDenied, SessiondError, Unauthenticated
from sessiond.server.services.limits import RateClass, RateLimiter, caller_key

log = logging.getLogger(__name__)
Ctx = grpc.aio.ServicerContext[Any, Any]
Req = TypeVar("Req")
Resp = TypeVar("Resp")

HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIX = "/grpc.reflection."
_R, _W = Scope.READ, Scope.WRITE

#: Scope each RPC needs (admin satisfies every scope).
SCOPES: dict[str, Scope] = {
    "/sessiond.v1.SessionService/CreateSession": _W,
    "/sessiond.v1.SessionService/GetSession": _R,  # write when auto_create is set
    "/sessiond.v1.SessionService/ListSessions": _R,
    "/sessiond.v1.SessionService/DeleteSession": _W,
    "/sessiond.v1.SessionService/AddMessage": _W,
    "/sessiond.v1.SessionService/AddMessages": _W,
    "/sessiond.v1.SessionService/UpdateToolPart": _W,
    "/sessiond.v1.SessionService/RecordUsage": _W,
    "/sessiond.v1.SessionService/Commit": _W,
    "/sessiond.v1.SessionService/GetSessionContext": _R,
    "/sessiond.v1.SessionService/ListArchives": _R,
    "/sessiond.v1.SessionService/GetArchive": _R,
    "/sessiond.v1.SessionService/UpdateSessionConfig": _W,
    "/sessiond.v1.SessionService/WatchSession": _R,
    "/sessiond.v1.TaskService/GetTask": _R,
    "/sessiond.v1.TaskService/ListTasks": _R,
    "/sessiond.v1.TaskService/WatchTask": _R,
    "/sessiond.v1.TaskService/CancelTask": _W,
    "/sessiond.v1.TaskService/RetryTask": _W,
    "/sessiond.v1.MemoryService/ListMemories": _R,
    "/sessiond.v1.MemoryService/GetMemory": _R,
    "/sessiond.v1.MemoryService/SearchMemories": _R,
    "/sessiond.v1.MemoryService/Recall": _R,
    "/sessiond.v1.MemoryService/DeleteMemory": _W,
    "/sessiond.v1.MemoryService/ListMemoryChanges": _R,
    "/sessiond.v1.SessionService/RevertArchive": _W,
    "/sessiond.v1.SessionService/GetSessionUsage": _R,
    "/sessiond.v1.ServerService/GetServerInfo": _R,
}


# (handler attribute, handler factory, streaming request, streaming response)
_KINDS: tuple[tuple[str, Any, bool, bool], ...] = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler, False, False),
    ("unary_stream", grpc.unary_stream_rpc_method_handler, False, True),
    ("stream_unary", grpc.stream_unary_rpc_method_handler, True, False),
    ("stream_stream", grpc.stream_stream_rpc_method_handler, True, True),
)


def required_scope(method: str, request: Any) -> Scope:
    if method == "/sessiond.v1.SessionService/GetSession" and getattr(
            request, "auto_create", False):
        return Scope.WRITE
    return SCOPES.get(method, Scope.ADMIN)


COMMIT_METHOD = "/sessiond.v1.SessionService/Commit"


def rate_classes(method: str, scope: Scope) -> tuple[RateClass, ...]:
    """The rate-limit classes a call counts in: reads or writes by its scope, and a
    Commit (a Phase 2 submission) also as a commit."""
    if method == COMMIT_METHOD:
        return (RateClass.WRITE, RateClass.COMMIT)
    return (RateClass.READ,) if scope is Scope.READ else (RateClass.WRITE,)


def _peer_uris(context: Ctx) -> list[str]:
    """The SAN URIs of the client certificate the TLS handshake verified."""
    props = context.auth_context() or {}
    return [v.decode(errors="replace") for v in props.get("peer_uri", ())]


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, policy: AuthPolicy, reflection: str = "authenticated",
                 limiter: RateLimiter | None = None) -> None:
        self.policy = policy
        self.reflection = reflection
        self.limiter = limiter
        # method -> (the server's handler, its guarded copy): wrapped once, not per call
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    async def _authorize(self, method: str, request: Any, context: Ctx, acts: bool) -> None:
        headers = single_values(context.invocation_metadata() or ())
        uris = _peer_uris(context) if self.policy.cert_identity else []
        principal = await self.policy.principal(
            Presented(headers.get(AUTHORIZATION_KEY), uris))
        identity = None
        if acts:
            scope = required_scope(method, request)
            if not principal.allows(scope):
                raise PermissionDenied(f"this call needs the {scope.value!r} scope",
                                       reason="SCOPE_MISSING",
                                       metadata={"required_scope": scope.value})
            identity = select_identity(principal, requested_identity(headers))
            if self.limiter is not None:  # 5. the caller's rate limits: RESOURCE_EXHAUSTED
                self.limiter.acquire(caller_key(principal, identity),
                                     rate_classes(method, scope))
        CURRENT.set(CallAuth(principal, identity))

    async def _guard(self, method: str, request: Any, context: Ctx, acts: bool) -> None:
        """Authorize the call or abort it (context.abort raises)."""
        try:
            await self._authorize(method, request, context, acts)
        except SessiondError as exc:
            if isinstance(exc, Unauthenticated | PermissionDenied):
                log.debug("%s refused: %s (%s)", method, exc.reason, context.peer())
            await abort(context, exc)
        except Exception as exc:
            await abort_internal(context, exc)

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler[Req, Resp] | None]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Req, Resp] | None:
        handler = await continuation(details)
        method = details.method
        if handler is None or method.startswith(HEALTH_PREFIX):
            return handler
        reflection = method.startswith(REFLECTION_PREFIX)
        if reflection and (self.reflection == "on" or self.policy.open):
            return handler
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            wrapped: grpc.RpcMethodHandler[Req, Resp] = cached[1]
            return wrapped
        wrapped = self._wrap(handler, method, acts=not reflection)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler[Req, Resp], method: str, acts: bool
              ) -> grpc.RpcMethodHandler[Req, Resp]:
        """The same handler with the guard run first (with the request, when there is
        exactly one, for request-dependent scopes)."""
        # grpc.aio handlers are coroutines / async generators; the stubs type the sync API.
        h: Any = handler
        guard = self._guard
        for attr, factory, stream_in, stream_out in _KINDS:
            inner = getattr(h, attr)
            if inner is None:
                continue
            if stream_out:
                async def gen(arg: Any, context: Ctx, inner: Any = inner,
                              stream_in: bool = stream_in) -> AsyncIterator[Any]:
                    await guard(method, None if stream_in else arg, context, acts)
                    async for item in inner(arg, context):
                        yield item

                wrapped: grpc.RpcMethodHandler[Req, Resp] = factory(
                    gen, h.request_deserializer, h.response_serializer)
                return wrapped

            async def call(arg: Any, context: Ctx, inner: Any = inner,
                           stream_in: bool = stream_in) -> Any:
                await guard(method, None if stream_in else arg, context, acts)
                return await inner(arg, context)

            wrapped = factory(call, h.request_deserializer, h.response_serializer)
            return wrapped
        return handler
