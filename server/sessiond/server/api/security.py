"""The listening port's security, put together from the settings: TLS credentials
(reloaded on change), the auth policy and its interceptor, and the refusal to serve
unauthenticated calls beyond loopback unless asked to."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
from sessiond.server.api.authz import AuthInterceptor
from sessiond.server.api.tls import CertReloader
from sessiond.server.auth.policy import Authenticator, AuthPolicy, is_loopback
from sessiond.server.config import Settings
from sessiond.server.services.limits import Rate, limiter_from

log = logging.getLogger(__name__)

def build_authenticator(settings: Settings, store: Any) -> Authenticator | None:
    mode = settings.auth.mode
    if mode == "jwt":
        from sessiond.server.auth.tokens import JwtAuthenticator

        return JwtAuthenticator(settings.auth.jwt)
    if mode == "api-key":
        from sessiond.server.auth.apikeys import ApiKeyAuthenticator

        return ApiKeyAuthenticator(store.get_api_key, settings.auth.key_cache_seconds)
    return None


class Security:
    def __init__(self, settings: Settings, store: Any) -> None:
        settings.auth.validate()
        settings.tls.validate()
        self.settings = settings
        self.tls = CertReloader(settings.tls) if settings.tls.enabled else None
        self.policy = AuthPolicy(settings.auth.mode, build_authenticator(settings, store),
                                 cert_identity=settings.tls.client_identity,
                                 uri_prefix=settings.tls.identity_uri_prefix)
        if (self.policy.open and not is_loopback(settings.address)
                and not settings.auth.allow_unauthenticated_remote):
            raise ValueError(
                f"refusing to listen on {settings.address} without authentication: use "
                "--auth api-key|jwt, mTLS with --tls-client-identity, or say "
                "--allow-unauthenticated-remote (trusted network or an authenticating "
                "proxy in front)")
        rl = settings.rate_limits
        self.limiter = limiter_from(Rate(rl.read, rl.read_burst), Rate(rl.write, rl.write_burst),
                                    Rate(rl.commit, rl.commit_burst))
        self.interceptor = AuthInterceptor(self.policy, settings.auth.reflection, self.limiter)

    @property
    def reflection(self) -> bool:
        return self.settings.auth.reflection != "off"

    def describe(self) -> str:
        transport = "plaintext"
        if self.tls is not None:
            transport = "mTLS" if self.settings.tls.client_ca else "TLS"
        text = f"{transport}, {self.policy.describe()}"
        if self.policy.open:
            text += ("; remote callers allowed (--allow-unauthenticated-remote)"
                     if self.settings.auth.allow_unauthenticated_remote
                     and not is_loopback(self.settings.address) else "; loopback only")
        return text

    def bind(self, server: grpc.aio.Server, address: str) -> int:
        if self.tls is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, self.tls.credentials())

    def reload(self) -> None:
        """SIGHUP: re-read certificates and token keys now."""
        if self.tls is not None:
            self.tls.check(force=True)
        self.policy.reload()

    def background(self) -> list[asyncio.Task[None]]:
        if self.tls is None:
            return []
        return [asyncio.create_task(self.tls.watch(), name="tls-reload")]
