"""Which principal a call is: the authentication mode put together (no gRPC here).

Modes (`--auth`):

* `none`: no credential is asked for. The principal is the anonymous one (any
  identity, all scopes), or, with `--tls-client-identity`, the client certificate's.
* `api-key` / `jwt`: `authorization: Bearer <credential>` is required and names the
  principal. With `--tls-client-identity` as well, the certificate must name the
  same account as the credential (a stolen key is useless without the certificate).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from sessiond.server.auth.certs import cert_principal
from sessiond.server.auth.principal import ANONYMOUS, Principal
from sessiond.server.auth.tokens import JwtSettings
from sessiond.server.domain.errors import Unauthenticated

MODES = ("none", "api-key", "jwt")
REFLECTION = ("on", "off", "authenticated")


class Authenticator(Protocol):
    async def authenticate(self, credential: str) -> Principal: ...

    def reload(self) -> None: ...


@dataclass
class AuthSettings:
    mode: str = "none"
    allow_unauthenticated_remote: bool = False
    reflection: str = "authenticated"  # on | off | authenticated
    key_cache_seconds: float = 2.0  # how long a replica trusts a looked-up API key
    jwt: JwtSettings = field(default_factory=JwtSettings)

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown --auth {self.mode!r}: use {', '.join(MODES)}")
        if self.reflection not in REFLECTION:
            raise ValueError(f"unknown --reflection {self.reflection!r}: use "
                             f"{', '.join(REFLECTION)}")
        if self.mode == "jwt":
            self.jwt.validate()


@dataclass(frozen=True)
class Presented:
    """What a call brought: its `authorization` header, and the verified client
    certificate's SAN URIs (mTLS)."""

    authorization: str | None = None
    cert_uris: Sequence[str] = ()


def is_loopback(address: str) -> bool:
    """True for addresses only this machine can reach (loopback IPs, localhost, unix
    sockets)."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    host = address.rsplit(":", 1)[0].strip("[]") if ":" in address else address
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class AuthPolicy:
    def __init__(self, mode: str, authenticator: Authenticator | None = None, *,
                 cert_identity: bool = False, uri_prefix: str = "sessiond://") -> None:
        if (mode == "none") != (authenticator is None):
            raise ValueError("an authenticator goes with --auth api-key or jwt only")
        self.mode = mode
        self.authenticator = authenticator
        self.cert_identity = cert_identity
        self.uri_prefix = uri_prefix

    @property
    def open(self) -> bool:
        """True when any caller gets the anonymous principal."""
        return self.mode == "none" and not self.cert_identity

    def describe(self) -> str:
        if self.open:
            return "auth none: calls are NOT authenticated; any caller may act as any identity"
        parts = [] if self.mode == "none" else [f"auth {self.mode}"]
        if self.cert_identity:
            parts.append("client certificate identity (mTLS)")
        return " + ".join(parts)

    def reload(self) -> None:
        if self.authenticator is not None:
            self.authenticator.reload()

    def _bearer(self, presented: Presented) -> str:
        if not presented.authorization:
            raise Unauthenticated(f"this server requires {self.mode} credentials: send "
                                  "'authorization: Bearer <credential>'",
                                  reason="CREDENTIALS_MISSING")
        scheme, _, credential = presented.authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            raise Unauthenticated("the authorization header must be 'Bearer <credential>'",
                                  reason="CREDENTIALS_INVALID")
        return credential.strip()

    async def principal(self, presented: Presented) -> Principal:
        """The caller; without an authenticator (auth none) the authorization header
        is not looked at (a proxy in front may use it for itself)."""
        from_cert = (cert_principal(presented.cert_uris, self.uri_prefix)
                     if self.cert_identity else None)
        if self.authenticator is None:
            return from_cert or ANONYMOUS
        principal = await self.authenticator.authenticate(self._bearer(presented))
        if from_cert is not None and from_cert.account != principal.account:
            raise Unauthenticated("the credential and the client certificate name different "
                                  "accounts", reason="CLIENT_CERT_MISMATCH")
        return principal
