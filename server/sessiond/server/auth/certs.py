"""Principals from client certificates (mTLS with `--tls-client-identity`).

The certificate carries the identity in a subject-alternative-name URI:

    <prefix><account>[/<user>[/<agent>]][?scopes=read,write,act-as]

with the prefix `sessiond://` unless configured (for example
`spiffe://example.org/sessiond/` under a SPIFFE-issuing mesh). Without a `scopes`
query the certificate grants `read` and `write`. The CA that signs client
certificates decides who may call as whom, so keep it dedicated to sessiond clients.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import parse_qs, unquote

from sessiond.server.auth.principal import Principal, Scope, check_name, parse_scopes
from sessiond.server.domain.errors import InvalidArgument, Unauthenticated

DEFAULT_SCOPES = frozenset({Scope.READ, Scope.WRITE})


def _no_identity(message: str) -> Unauthenticated:
    return Unauthenticated(message, reason="CLIENT_CERT_NO_IDENTITY")


def parse_identity_uri(uri: str, prefix: str) -> Principal:
    rest = uri[len(prefix):]
    path, _, query = rest.partition("?")
    parts = [unquote(p) for p in path.split("/")]
    if not 1 <= len(parts) <= 3 or not all(parts):
        raise _no_identity(f"certificate URI {uri[:200]!r} is not "
                           f"{prefix}<account>[/<user>[/<agent>]]")
    try:
        for kind, value in zip(("account", "user", "agent"), parts, strict=False):
            check_name(kind, value)
        scopes = DEFAULT_SCOPES
        if query:
            raw = parse_qs(query).get("scopes", [])
            scopes = parse_scopes(",".join(raw).split(","))
    except InvalidArgument as exc:
        raise _no_identity(f"certificate URI {uri[:200]!r}: {exc.message}") from None
    return Principal("client-cert", uri[:256], parts[0],
                     parts[1] if len(parts) > 1 else None,
                     parts[2] if len(parts) > 2 else None, scopes)


def cert_principal(uris: Sequence[str], prefix: str) -> Principal:
    """The principal named by the one SAN URI starting with `prefix` (the TLS
    handshake already required and verified the certificate)."""
    matching = [u for u in uris if u.startswith(prefix)]
    if len(matching) != 1:
        raise _no_identity(
            f"the client certificate must carry exactly one SAN URI starting with "
            f"{prefix!r}; it has {len(matching)}")
    return parse_identity_uri(matching[0], prefix)
