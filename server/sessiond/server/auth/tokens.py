"""Bearer JWTs (`--auth jwt`), verified with PyJWT.

Keys: an HMAC secret file (HS256), or a JWKS file of RSA/EC public keys (RS256 /
ES256, chosen per key; the token's `kid` selects the key, a single-key set needs no
`kid`). The key file is re-read when it changes (checked at most once a second) and
on SIGHUP; a broken new file is logged and the previous keys stay.

Checked: signature, `exp` (required), `nbf` (when present), `iss` and `aud` (both
required and matched against the configuration), with `leeway_seconds` of clock skew.

Claims -> principal (names configurable): `sessiond_account` (required),
`sessiond_user`, `sessiond_agent` (optional bindings), `scope` (space-separated
string or list; names other than read/write/act-as/admin are ignored). `sub` names
the principal in logs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import jwt
from sessiond.server.auth.principal import NAME_RE, Principal, parse_scopes
from sessiond.server.domain.errors import Unauthenticated

log = logging.getLogger(__name__)
T = TypeVar("T")
MIN_SECRET_BYTES = 32
ASYMMETRIC = ("RS256", "ES256")


@dataclass
class JwtSettings:
    secret_file: str = ""
    jwks_file: str = ""
    issuer: str = ""
    audience: str = ""
    leeway_seconds: float = 30.0
    account_claim: str = "sessiond_account"
    user_claim: str = "sessiond_user"
    agent_claim: str = "sessiond_agent"
    scopes_claim: str = "scope"

    def validate(self) -> None:
        if bool(self.secret_file) == bool(self.jwks_file):
            raise ValueError("--auth jwt needs exactly one of --jwt-secret-file (HS256) "
                             "and --jwt-jwks-file (RS256/ES256)")
        if not self.issuer or not self.audience:
            raise ValueError("--auth jwt needs --jwt-issuer and --jwt-audience")


class WatchedFile(Generic[T]):
    """A file parsed by `load`, re-read when its stat signature changes."""

    def __init__(self, path: str, load: Callable[[bytes], T], interval: float = 1.0) -> None:
        self.path, self._load, self.interval = path, load, interval
        self._lock = threading.Lock()
        self._sig = self._signature()
        self.value = load(Path(path).read_bytes())
        self._checked = time.monotonic()
        self.version = 0

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def get(self) -> T:
        if time.monotonic() - self._checked >= self.interval:
            self.reload(force=False)
        return self.value

    def reload(self, force: bool = True) -> bool:
        with self._lock:
            self._checked = time.monotonic()
            sig = self._signature()
            if not force and sig == self._sig:
                return False
            self._sig = sig
            try:
                self.value = self._load(Path(self.path).read_bytes())
            except (OSError, ValueError) as exc:
                log.warning("%s not reloaded, the previous keys stay: %s", self.path, exc)
                return False
            self.version += 1
            log.info("reloaded %s", self.path)
            return True


def _load_secret(data: bytes) -> bytes:
    secret = data.strip()
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"the HS256 secret must be at least {MIN_SECRET_BYTES} bytes")
    return secret


def _load_jwks(data: bytes) -> jwt.PyJWKSet:
    try:
        jwks = jwt.PyJWKSet.from_dict(json.loads(data))
    except (ValueError, jwt.PyJWKSetError, jwt.PyJWKError) as exc:
        raise ValueError(f"not a usable JWKS: {exc}") from None
    for k in jwks.keys:
        if k.algorithm_name not in ASYMMETRIC:
            raise ValueError(f"JWKS key {k.key_id!r} uses {k.algorithm_name}; "
                             f"only {', '.join(ASYMMETRIC)} are accepted")
    return jwks


_REASONS: list[tuple[type[Exception], str, str]] = [
    (jwt.ExpiredSignatureError, "CREDENTIALS_EXPIRED", "the token has expired"),
    (jwt.ImmatureSignatureError, "TOKEN_NOT_YET_VALID", "the token is not valid yet (nbf)"),
    (jwt.InvalidAudienceError, "TOKEN_WRONG_AUDIENCE", "the token is not for this audience"),
    (jwt.InvalidIssuerError, "TOKEN_WRONG_ISSUER", "the token is from another issuer"),
    (jwt.InvalidSignatureError, "CREDENTIALS_INVALID", "the token signature does not verify"),
]


def _rejected(exc: jwt.InvalidTokenError) -> Unauthenticated:
    for cls, reason, message in _REASONS:
        if isinstance(exc, cls):
            return Unauthenticated(message, reason=reason)
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return Unauthenticated(f"the token lacks the {exc.claim!r} claim",
                               reason="CREDENTIALS_INVALID")
    return Unauthenticated("the token is not a valid JWT", reason="CREDENTIALS_INVALID")


class JwtAuthenticator:
    """Verifies bearer JWTs; verified tokens are remembered (by hash, until at most
    their expiry) so repeated calls with one token do not repeat the signature check."""

    CACHE_SIZE = 4096
    CACHE_SECONDS = 60.0

    def __init__(self, s: JwtSettings) -> None:
        s.validate()
        self.s = s
        self._secret = WatchedFile(s.secret_file, _load_secret) if s.secret_file else None
        self._jwks = WatchedFile(s.jwks_file, _load_jwks) if s.jwks_file else None
        self._cache: OrderedDict[bytes, tuple[float, int, Principal]] = OrderedDict()

    def reload(self) -> None:
        for f in (self._secret, self._jwks):
            if f is not None:
                f.reload()

    def _key_version(self) -> int:
        watched = self._secret or self._jwks
        assert watched is not None
        watched.get()
        return watched.version

    def _key(self, token: str) -> tuple[Any, list[str]]:
        if self._secret is not None:
            return self._secret.get(), ["HS256"]
        assert self._jwks is not None
        jwks = self._jwks.get()
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.InvalidTokenError as exc:
            raise _rejected(exc) from None
        if kid is None and len(jwks.keys) == 1:
            key = jwks.keys[0]
        else:
            match = [k for k in jwks.keys if k.key_id == kid]
            if not match:
                raise Unauthenticated("the token's key id is not in the JWKS",
                                      reason="CREDENTIALS_INVALID")
            key = match[0]
        return key.key, [key.algorithm_name]

    async def authenticate(self, token: str) -> Principal:
        digest = hashlib.sha256(token.encode()).digest()
        now = time.time()
        version = self._key_version()
        hit = self._cache.get(digest)
        if hit is not None and hit[0] > now and hit[1] == version:
            return hit[2]
        key, algorithms = self._key(token)
        try:
            claims = jwt.decode(token, key, algorithms=algorithms, audience=self.s.audience,
                                issuer=self.s.issuer, leeway=self.s.leeway_seconds,
                                options={"require": ["exp", "iss", "aud"]})
        except jwt.InvalidTokenError as exc:
            raise _rejected(exc) from None
        principal = self._principal(claims)
        until = min(float(claims["exp"]) + self.s.leeway_seconds, now + self.CACHE_SECONDS)
        self._cache[digest] = (until, version, principal)
        if len(self._cache) > self.CACHE_SIZE:
            self._cache.popitem(last=False)
        return principal

    def _principal(self, claims: dict[str, Any]) -> Principal:
        def name(claim: str, required: bool) -> str | None:
            value = claims.get(claim)
            if value is None and not required:
                return None
            if not isinstance(value, str) or not NAME_RE.fullmatch(value):
                raise Unauthenticated(f"the token's {claim!r} claim is missing or not a "
                                      "valid name", reason="CREDENTIALS_INVALID")
            return value

        raw = claims.get(self.s.scopes_claim, "")
        names = raw.split() if isinstance(raw, str) else (
            [v for v in raw if isinstance(v, str)] if isinstance(raw, list) else [])
        subject = claims.get("sub")
        return Principal("jwt", str(subject)[:256] if subject is not None else "",
                         name(self.s.account_claim, True), name(self.s.user_claim, False),
                         name(self.s.agent_claim, False),
                         parse_scopes(names, ignore_unknown=True))
