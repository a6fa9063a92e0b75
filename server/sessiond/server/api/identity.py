"""Who a call acts for: identity headers, checked against the call's principal.

Keys: x-sessiond-account, x-sessiond-user, x-sessiond-agent. A missing key means
the principal's binding (or "default"), so a single-user deployment needs no
metadata at all. A key sent twice is INVALID_ARGUMENT: a proxy that checks only the
first value must not be bypassed by a second one.

The auth interceptor (`api/authz.py`) resolves the identity once per call and keeps
it in a context variable for the servicers (`identity_of`).
"""

from __future__ import annotations

from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import grpc
from sessiond.server.auth.principal import NAME_RE, NAME_RULE, Principal, RequestedIdentity
from sessiond.server.domain.errors import FieldViolation, InvalidArgument
from sessiond.server.domain.values import Identity

ACCOUNT_KEY = "x-sessiond-account"
USER_KEY = "x-sessiond-user"
AGENT_KEY = "x-sessiond-agent"
AUTHORIZATION_KEY = "authorization"
IDENTITY_KEYS = (ACCOUNT_KEY, USER_KEY, AGENT_KEY)
SINGLE_KEYS = (*IDENTITY_KEYS, AUTHORIZATION_KEY)


@dataclass(frozen=True, slots=True)
class CallAuth:
    principal: Principal
    identity: Identity | None  # None on calls that act for nobody (reflection)


CURRENT: ContextVar[CallAuth | None] = ContextVar("sessiond_call_auth", default=None)


def single_values(metadata: Iterable[tuple[str, Any]]) -> dict[str, str]:
    """The identity and authorization headers of a call (text values); each may
    appear at most once."""
    found: dict[str, str] = {}
    dup: list[FieldViolation] = []
    for key, value in metadata:
        if key not in SINGLE_KEYS:
            continue
        if key in found:
            dup.append(FieldViolation(key, "sent more than once; send it once"))
        found[key] = value if isinstance(value, str) else ""
    if dup:
        raise InvalidArgument("duplicate identity or authorization metadata",
                              violations=dup, reason="DUPLICATE_METADATA")
    return found


def requested_identity(headers: dict[str, str]) -> RequestedIdentity:
    bad = [FieldViolation(k, NAME_RULE) for k in IDENTITY_KEYS
           if k in headers and headers[k] and not NAME_RE.fullmatch(headers[k])]
    if bad:
        raise InvalidArgument("identity metadata is not valid", violations=bad)
    return RequestedIdentity(headers.get(ACCOUNT_KEY) or None, headers.get(USER_KEY) or None,
                             headers.get(AGENT_KEY) or None)


def identity_of(context: grpc.aio.ServicerContext[Any, Any]) -> Identity:
    """The identity the auth interceptor resolved for this call."""
    call = CURRENT.get()
    if call is None or call.identity is None:
        raise RuntimeError("no identity resolved: the auth interceptor is not installed")
    return call.identity


def current_principal() -> Principal | None:
    """The principal of the running call (for per-caller limits and logs)."""
    call = CURRENT.get()
    return call.principal if call is not None else None
