"""Channel and call credentials for sessiond's TLS and authentication modes.

`connect` / `aio_connect` build these from their keyword arguments; use
`channel_credentials(...)` yourself to make a channel another way.

* Transport: TLS with the system roots (`tls=True`) or your own roots
  (`root_certificates=`), plus a client certificate and key for mTLS.
* Caller: an API key (`api_key=`) or a JWT (`token=`: a string, or a callable
  returning the current token; it is called before every RPC, so make it cheap:
  `RefreshingToken` caches a token until shortly before it expires). Both travel as
  `authorization: Bearer ...` through gRPC call credentials, which gRPC sends only
  over secure channels.
* A credential over plaintext is refused, except to a loopback server with
  `plaintext_loopback=True` (gRPC's local credentials, which check that the peer is
  on this machine).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import grpc

__all__ = ["RefreshingToken", "TokenSource", "channel_credentials"]

TokenSource = str | Callable[[], str]


class RefreshingToken:
    """A token provider that calls `fetch` (returning `(token, expires_at)`, a Unix
    time) only when the cached token is within `margin` seconds of expiring."""

    def __init__(self, fetch: Callable[[], tuple[str, float]], margin: float = 30.0) -> None:
        self._fetch, self.margin = fetch, margin
        self._lock = threading.Lock()
        self._token, self._expires = "", 0.0

    def __call__(self) -> str:
        with self._lock:
            if not self._token or time.time() >= self._expires - self.margin:
                self._token, self._expires = self._fetch()
            return self._token


class _BearerPlugin(grpc.AuthMetadataPlugin):
    def __init__(self, source: Callable[[], str]) -> None:
        self.source = source

    def __call__(self, context: grpc.AuthMetadataContext,
                 callback: grpc.AuthMetadataPluginCallback) -> None:
        try:
            value = self.source()
        except Exception as exc:  # reported as the call's failure
            callback((), exc)
            return
        callback((("authorization", f"Bearer {value}"),), None)


def _read(value: bytes | str | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    with open(value, "rb") as f:
        return f.read()


def channel_credentials(
    *, api_key: str | None = None, token: TokenSource | None = None, tls: bool = False,
    root_certificates: bytes | str | None = None, client_cert: bytes | str | None = None,
    client_key: bytes | str | None = None, plaintext_loopback: bool = False,
    credentials: grpc.ChannelCredentials | None = None,
) -> grpc.ChannelCredentials | None:
    """The channel credentials for these settings, or None for a plaintext channel.

    Certificates and keys are PEM bytes or file paths. ValueError on contradictions."""
    if api_key is not None and token is not None:
        raise ValueError("give api_key or token, not both")
    if (client_cert is None) != (client_key is None):
        raise ValueError("client_cert and client_key go together")
    secret: TokenSource | None = api_key if api_key is not None else token
    wants_tls = tls or any(v is not None for v in (root_certificates, client_cert))
    channel: grpc.ChannelCredentials | None = credentials
    if channel is None and wants_tls:
        channel = grpc.ssl_channel_credentials(
            _read(root_certificates), _read(client_key), _read(client_cert))
    if secret is None:
        return channel
    if channel is None:
        if not plaintext_loopback:
            raise ValueError("an API key or token needs TLS (tls=True or root_certificates=); "
                             "for a server on this machine pass plaintext_loopback=True")
        channel = grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP)
    # A fixed string is attached by gRPC core; only a provider needs a Python callback.
    call = (grpc.metadata_call_credentials(_BearerPlugin(secret), name="sessiond-bearer")
            if callable(secret) else grpc.access_token_call_credentials(secret))
    return grpc.composite_channel_credentials(channel, call)
