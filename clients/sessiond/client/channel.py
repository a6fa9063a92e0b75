"""Channel factories with sessiond's service config, keepalive and interceptors.

`connect(...)` returns a `grpc.Channel`, `aio_connect(...)` a `grpc.aio.Channel`; use
them with the generated stubs (`session_pb2_grpc.SessionServiceStub(channel)`, ...).

Retries (gRPC's built-in retry, `grpc.enable_retries` = 1): UNAVAILABLE is retried up
to 5 attempts with exponential backoff (0.1 s, x2, at most 2 s, full jitter) on the
methods where repeating is safe:

* reads: every Get*/List* method, GetSessionContext, SearchMemories, GetServerInfo;
* CancelTask (asking twice is asking once);
* the mutating calls that carry a request id (CreateSession, AddMessage, Commit,
  RecordUsage): the interceptor fills an empty `request_id` before the first attempt,
  so every retry replays the same id and the server answers with the first result.

Not retried: DeleteSession, UpdateToolPart, DeleteMemory (no request id), and
WatchTask: a broken watch is resumed from its last event by `watch_task` /
`aio_watch_task` instead.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import grpc
from sessiond.client.auth import TokenSource, channel_credentials
from sessiond.client.identity import Identity
from sessiond.client.interceptors import SessiondInterceptor, aio_interceptors

__all__ = [
    "DEFAULT_OPTIONS",
    "MAX_MESSAGE_BYTES",
    "RETRYABLE_METHODS",
    "RETRY_POLICY",
    "SERVICE_CONFIG_JSON",
    "aio_connect",
    "channel_options",
    "connect",
    "service_config",
]

MAX_MESSAGE_BYTES = 16 * 1024 * 1024

# Methods whose UNAVAILABLE failures the channel retries, per service.
RETRYABLE_METHODS: dict[str, tuple[str, ...]] = {
    "sessiond.v1.SessionService": (
        "GetSession", "ListSessions", "GetSessionContext", "ListArchives", "GetArchive",
        "CreateSession", "AddMessage", "AddMessages", "Commit", "RecordUsage",
        "RevertArchive", "GetSessionUsage",
    ),
    "sessiond.v1.TaskService": ("GetTask", "ListTasks", "CancelTask", "RetryTask"),
    "sessiond.v1.MemoryService": ("ListMemories", "GetMemory", "SearchMemories",
                                  "ListMemoryChanges"),
    "sessiond.v1.ServerService": ("GetServerInfo",),
}

RETRY_POLICY: dict[str, Any] = {
    "maxAttempts": 5,
    "initialBackoff": "0.1s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}


def service_config() -> dict[str, Any]:
    """The gRPC service config the factories install (a fresh dict)."""
    names = [{"service": service, "method": method}
             for service, methods in RETRYABLE_METHODS.items() for method in methods]
    return {"methodConfig": [{"name": names, "retryPolicy": dict(RETRY_POLICY)}]}


SERVICE_CONFIG_JSON = json.dumps(service_config(), separators=(",", ":"))

DEFAULT_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.service_config", SERVICE_CONFIG_JSON),
    ("grpc.enable_retries", 1),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)


def channel_options(options: Sequence[tuple[str, Any]] = ()) -> list[tuple[str, Any]]:
    """DEFAULT_OPTIONS with `options` applied on top (same key: yours wins)."""
    merged = dict(DEFAULT_OPTIONS)
    merged.update(dict(options))
    return list(merged.items())


def _credentials(secure: bool, credentials: grpc.ChannelCredentials | None,
                 auth: dict[str, Any]) -> grpc.ChannelCredentials | None:
    tls = bool(secure or auth.pop("tls", False))
    return channel_credentials(tls=tls, credentials=credentials, **auth)


def connect(target: str, *, identity: Identity | None = None, secure: bool = False,
            credentials: grpc.ChannelCredentials | None = None,
            options: Sequence[tuple[str, Any]] = (),
            fill_request_ids: bool = True, api_key: str | None = None,
            token: TokenSource | None = None, tls: bool = False,
            root_certificates: bytes | str | None = None,
            client_cert: bytes | str | None = None, client_key: bytes | str | None = None,
            plaintext_loopback: bool = False) -> grpc.Channel:
    """A sync channel to sessiond at `target` ("host:port").

    `identity` is sent on every call (per-call metadata may override single keys).
    TLS when `tls`/`secure` (system roots), with `root_certificates` (PEM bytes or a
    path), with `client_cert` + `client_key` (mTLS), or with your own `credentials`.
    `api_key=` or `token=` (a string or a callable returning the current token)
    authenticate every call; they need TLS, or `plaintext_loopback=True` for a
    server on this machine (see `sessiond.client.auth`). `options` are gRPC channel
    arguments merged over DEFAULT_OPTIONS. `fill_request_ids=False` stops the
    interceptor from adding request ids (then do not rely on the retries of the
    mutating calls)."""
    creds = _credentials(secure, credentials, dict(
        api_key=api_key, token=token, tls=tls, root_certificates=root_certificates,
        client_cert=client_cert, client_key=client_key, plaintext_loopback=plaintext_loopback))
    opts = channel_options(options)
    raw = (grpc.secure_channel(target, creds, options=opts) if creds is not None
           else grpc.insecure_channel(target, options=opts))
    return grpc.intercept_channel(
        raw, SessiondInterceptor(identity, fill_request_ids=fill_request_ids))


def aio_connect(target: str, *, identity: Identity | None = None, secure: bool = False,
                credentials: grpc.ChannelCredentials | None = None,
                options: Sequence[tuple[str, Any]] = (),
                fill_request_ids: bool = True, api_key: str | None = None,
                token: TokenSource | None = None, tls: bool = False,
                root_certificates: bytes | str | None = None,
                client_cert: bytes | str | None = None, client_key: bytes | str | None = None,
                plaintext_loopback: bool = False) -> grpc.aio.Channel:
    """The grpc.aio twin of `connect`. Create, use and close it on one event loop.
    A token callable runs on a gRPC thread before each call, not on the event loop."""
    creds = _credentials(secure, credentials, dict(
        api_key=api_key, token=token, tls=tls, root_certificates=root_certificates,
        client_cert=client_cert, client_key=client_key, plaintext_loopback=plaintext_loopback))
    opts = channel_options(options)
    interceptors = aio_interceptors(identity, fill_request_ids=fill_request_ids)
    if creds is not None:
        return grpc.aio.secure_channel(target, creds, options=opts, interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options=opts, interceptors=interceptors)
