"""Who proved to be calling (the principal) and which identity a call may act for.

A principal comes from a credential: an API key, a JWT, a client certificate, or
nothing at all (`--auth none`, the anonymous principal). It fixes an account and
optionally a user and an agent; scopes say what it may do.

`select_identity` applies the identity headers a call sent to the principal:

* the account is always the principal's (a different account header is refused);
* a bound user/agent is used when the header is absent; an unbound one means
  `default`;
* a header that differs from that value is allowed only with the `act-as` scope (a
  service acting for the users and agents of its account), else PERMISSION_DENIED;
* the anonymous principal (auth none) accepts any identity, as before authentication
  existed.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass

from sessiond.server.domain.errors import InvalidArgument, PermissionDenied
from sessiond.server.domain.values import Identity

DEFAULT = "default"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}")
NAME_RULE = "1-128 characters of letters, digits and ._@:- (starting with a letter or digit)"


class Scope(enum.StrEnum):
    READ = "read"
    WRITE = "write"
    ACT_AS = "act-as"
    ADMIN = "admin"


ALL_SCOPES = frozenset(Scope)


def parse_scopes(values: Iterable[str], *, ignore_unknown: bool = False) -> frozenset[Scope]:
    """Scope names -> Scopes. Unknown names raise InvalidArgument unless
    `ignore_unknown` (a token may carry scopes meant for other services)."""
    out: set[Scope] = set()
    for raw in values:
        name = raw.strip()
        if not name:
            continue
        try:
            out.add(Scope(name))
        except ValueError:
            if not ignore_unknown:
                raise InvalidArgument(
                    f"unknown scope {name[:40]!r}; use read, write, act-as, admin",
                    reason="BAD_SCOPE") from None
    return frozenset(out)


def check_name(kind: str, value: str) -> str:
    if not NAME_RE.fullmatch(value):
        raise InvalidArgument(f"{kind} {value[:40]!r} is not valid: {NAME_RULE}",
                              reason="BAD_IDENTITY")
    return value


@dataclass(frozen=True, slots=True)
class Principal:
    """`kind` is anonymous | api-key | jwt | client-cert; `subject` names the credential
    (key id, token subject, certificate URI) for logs and per-caller limits, never a
    secret. `account` None means unrestricted (the anonymous principal only)."""

    kind: str
    subject: str
    account: str | None
    user: str | None = None
    agent: str | None = None
    scopes: frozenset[Scope] = ALL_SCOPES

    def allows(self, scope: Scope) -> bool:
        return Scope.ADMIN in self.scopes or scope in self.scopes


ANONYMOUS = Principal("anonymous", "", None)


@dataclass(frozen=True, slots=True)
class RequestedIdentity:
    """The identity headers of one call (None: header absent)."""

    account: str | None = None
    user: str | None = None
    agent: str | None = None


def _pick(principal: Principal, what: str, bound: str | None, requested: str | None) -> str:
    value = bound or DEFAULT
    if requested is None or requested == value:
        return value
    if principal.allows(Scope.ACT_AS):
        return requested
    binding = f"bound to {what} {value!r}" if bound else f"not bound to a {what}"
    raise PermissionDenied(
        f"this {principal.kind} credential is {binding}; acting for another {what} "
        "needs the act-as scope", reason="IDENTITY_NOT_ALLOWED", metadata={"header": what})


def select_identity(principal: Principal, requested: RequestedIdentity) -> Identity:
    """The identity a call acts for, or PermissionDenied."""
    if principal.account is None:
        return Identity(requested.account or DEFAULT, requested.user or DEFAULT,
                        requested.agent or DEFAULT)
    if requested.account is not None and requested.account != principal.account:
        raise PermissionDenied(
            f"this {principal.kind} credential is for account {principal.account!r} only",
            reason="IDENTITY_NOT_ALLOWED", metadata={"header": "account"})
    return Identity(principal.account, _pick(principal, "user", principal.user, requested.user),
                    _pick(principal, "agent", principal.agent, requested.agent))
