"""API keys (`--auth api-key`): made, checked and revoked.

A key reads `sessiond_<key id>_<secret>`: 16 hex characters of public key id (the
lookup handle, shown by `sessiond keys list`) and 32 random bytes of secret (URL-safe
base64). It is shown once, at creation. The store keeps only SHA-256 of the whole
key: with 256 random bits a fast hash cannot be brute-forced, and a leaked database
yields no usable key. Verification compares hashes in constant time.

Replicas cache a looked-up key for `ttl` seconds (2 by default), so a revocation or
expiry takes effect everywhere within that time without a store read per call.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import datetime

from sessiond.server.auth.principal import Principal, Scope, check_name, parse_scopes
from sessiond.server.domain.errors import InvalidArgument, Unauthenticated
from sessiond.server.domain.rules import utcnow
from sessiond.server.domain.values import ApiKey

PREFIX = "sessiond_"
_ID_LEN = 16
_SECRET_LEN = 43  # secrets.token_urlsafe(32)

Lookup = Callable[[str], Awaitable[ApiKey | None]]


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_id_of(key: str) -> str:
    """The key id of a well-formed key, else Unauthenticated (CREDENTIALS_INVALID)."""
    body = key[len(PREFIX):]
    if (not key.startswith(PREFIX) or len(body) != _ID_LEN + 1 + _SECRET_LEN
            or body[_ID_LEN] != "_"):
        raise Unauthenticated("the credential is not a sessiond API key",
                              reason="CREDENTIALS_INVALID")
    return body[:_ID_LEN]


def new_key(account: str, user: str | None, agent: str | None, scopes: list[str], name: str,
            expires_at: datetime | None, now: datetime) -> tuple[ApiKey, str]:
    """A new key record and the key itself (to show once)."""
    check_name("account", account)
    for kind, value in (("user", user), ("agent", agent)):
        if value is not None:
            check_name(kind, value)
    parsed = parse_scopes(scopes)
    if not parsed:
        raise InvalidArgument("give at least one scope: read, write, act-as, admin",
                              reason="BAD_SCOPE")
    if expires_at is not None and expires_at <= now:
        raise InvalidArgument("the expiry is in the past", reason="BAD_EXPIRY")
    if len(name) > 200:
        raise InvalidArgument("the key name is longer than 200 characters")
    key_id = secrets.token_hex(_ID_LEN // 2)
    key = f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    order = list(Scope)
    record = ApiKey(key_id, hash_key(key), account, user, agent,
                    tuple(sorted((s.value for s in parsed), key=lambda v: order.index(Scope(v)))),
                    name, now, expires_at)
    return record, key


def principal_of(record: ApiKey) -> Principal:
    return Principal("api-key", record.key_id, record.account, record.user, record.agent,
                     parse_scopes(record.scopes, ignore_unknown=True))


class ApiKeyAuthenticator:
    """Checks bearer API keys against the store, through a short-lived cache."""

    CACHE_SIZE = 10_000

    def __init__(self, lookup: Lookup, ttl: float = 2.0,
                 now: Callable[[], datetime] = utcnow) -> None:
        self._lookup, self.ttl, self._now = lookup, ttl, now
        self._cache: OrderedDict[str, tuple[float, ApiKey | None]] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[ApiKey | None]] = {}

    def reload(self) -> None:
        self._cache.clear()

    async def _record(self, key_id: str) -> ApiKey | None:
        hit = self._cache.get(key_id)
        if hit is not None and time.monotonic() - hit[0] < self.ttl:
            return hit[1]
        pending = self._inflight.get(key_id)
        if pending is not None:  # one store read for concurrent calls with one key
            try:
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not pending.cancelled() or (task is not None and task.cancelling()):
                    raise
                # the call that was reading was cancelled: read it here instead
        fut: asyncio.Future[ApiKey | None] = asyncio.get_running_loop().create_future()
        self._inflight[key_id] = fut
        try:
            record = await self._lookup(key_id)
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except Exception as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: waiters get it, no "never retrieved" warning
            raise
        finally:
            self._inflight.pop(key_id, None)
        fut.set_result(record)
        self._cache[key_id] = (time.monotonic(), record)
        self._cache.move_to_end(key_id)
        if len(self._cache) > self.CACHE_SIZE:
            self._cache.popitem(last=False)
        return record

    async def authenticate(self, credential: str) -> Principal:
        record = await self._record(key_id_of(credential))
        if record is None or not hmac.compare_digest(record.secret_hash, hash_key(credential)):
            raise Unauthenticated("unknown API key", reason="CREDENTIALS_INVALID")
        if record.revoked_at is not None:
            raise Unauthenticated("the API key has been revoked", reason="CREDENTIALS_REVOKED")
        if record.expires_at is not None and self._now() >= record.expires_at:
            raise Unauthenticated("the API key has expired", reason="CREDENTIALS_EXPIRED")
        return principal_of(record)
