"""Command-line parts for security: the TLS/auth flags of `sessiond serve` and
`sessiond keys create|list|revoke` (API keys, managed directly in the store)."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sessiond.server.auth.policy import MODES, REFLECTION
from sessiond.server.config import Settings
from sessiond.server.domain.errors import SessiondError
from sessiond.server.domain.rules import utcnow
from sessiond.server.domain.values import ApiKey


def add_security_flags(p: argparse.ArgumentParser, env: Settings) -> None:
    g = p.add_argument_group("security (see docs/security.md)")
    g.add_argument("--auth", default=env.auth.mode, choices=MODES,
                   help="how callers prove who they are (default none: loopback only)")
    g.add_argument("--allow-unauthenticated-remote", action="store_true",
                   help="with --auth none, listen on non-loopback addresses anyway")
    g.add_argument("--reflection", default=env.auth.reflection, choices=REFLECTION,
                   help="server reflection: on, off, or only for authenticated callers")
    g.add_argument("--key-cache-seconds", type=float, default=env.auth.key_cache_seconds,
                   help="how long a replica trusts a looked-up API key (revocation delay)")
    g.add_argument("--tls-cert", default=env.tls.cert, help="PEM certificate chain")
    g.add_argument("--tls-key", default=env.tls.key, help="PEM private key")
    g.add_argument("--tls-client-ca", default=env.tls.client_ca,
                   help="PEM CA bundle: require client certificates signed by it (mTLS)")
    g.add_argument("--tls-client-identity", action="store_true",
                   help="take account/user/agent from the client certificate's SAN URI")
    g.add_argument("--tls-identity-uri-prefix", default=env.tls.identity_uri_prefix)
    g.add_argument("--tls-reload-seconds", type=float, default=env.tls.reload_seconds,
                   help="how often the TLS files are checked for changes (also on SIGHUP)")
    j = env.auth.jwt
    g.add_argument("--jwt-secret-file", default=j.secret_file, help="HS256 secret")
    g.add_argument("--jwt-jwks-file", default=j.jwks_file, help="JWKS of RS256/ES256 keys")
    g.add_argument("--jwt-issuer", default=j.issuer)
    g.add_argument("--jwt-audience", default=j.audience)
    g.add_argument("--jwt-leeway", type=float, default=j.leeway_seconds,
                   help="seconds of clock skew allowed on exp/nbf")
    for claim in ("account", "user", "agent", "scopes"):
        g.add_argument(f"--jwt-{claim}-claim", default=getattr(j, f"{claim}_claim"))


def apply_security_flags(ns: argparse.Namespace, s: Settings) -> None:
    a, t, j = s.auth, s.tls, s.auth.jwt
    a.mode, a.allow_unauthenticated_remote = ns.auth, ns.allow_unauthenticated_remote
    a.reflection, a.key_cache_seconds = ns.reflection, ns.key_cache_seconds
    t.cert, t.key, t.client_ca = ns.tls_cert, ns.tls_key, ns.tls_client_ca
    t.client_identity, t.identity_uri_prefix = ns.tls_client_identity, ns.tls_identity_uri_prefix
    t.reload_seconds = ns.tls_reload_seconds
    j.secret_file, j.jwks_file = ns.jwt_secret_file, ns.jwt_jwks_file
    j.issuer, j.audience, j.leeway_seconds = ns.jwt_issuer, ns.jwt_audience, ns.jwt_leeway
    j.account_claim, j.user_claim = ns.jwt_account_claim, ns.jwt_user_claim
    j.agent_claim, j.scopes_claim = ns.jwt_agent_claim, ns.jwt_scopes_claim


def add_keys_command(sub: Any, env: Settings) -> None:
    keys = sub.add_parser("keys", help="manage API keys (--auth api-key)")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", default=env.store,
                        help="'sqlite' (with --data-dir) or a postgresql:// URL")
    common.add_argument("--data-dir", type=Path, default=env.data_dir)
    common.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_argument("--output", "-o", choices=["text", "json"], default="text",
                        help="json: the same as --json")
    create = ksub.add_parser("create", parents=[common], help="make a key (shown once)")
    create.add_argument("--account", required=True)
    create.add_argument("--user", help="bind the key to this user")
    create.add_argument("--agent", help="bind the key to this agent")
    create.add_argument("--scopes", default="read,write",
                        help="comma-separated: read, write, act-as, admin")
    create.add_argument("--name", default="", help="a label for the key")
    create.add_argument("--expires-in", help="lifetime like 90d, 12h, 30m, 3600s")
    lst = ksub.add_parser("list", parents=[common], help="list keys (never the secrets)")
    lst.add_argument("--account", help="only this account's keys")
    revoke = ksub.add_parser("revoke", parents=[common], help="revoke a key by id")
    revoke.add_argument("key_id")


_DURATION = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    m = _DURATION.fullmatch(text.strip())
    if not m or int(m.group(1)) == 0:
        raise ValueError(f"--expires-in {text!r}: use a positive number with s, m, h or d")
    return timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t is not None else None


def key_view(k: ApiKey) -> dict[str, Any]:
    return {"key_id": k.key_id, "name": k.name, "account": k.account, "user": k.user,
            "agent": k.agent, "scopes": list(k.scopes), "created_at": _iso(k.created_at),
            "expires_at": _iso(k.expires_at), "revoked_at": _iso(k.revoked_at)}


async def _keys(ns: argparse.Namespace) -> int:
    from sessiond.server.app import build_store
    from sessiond.server.auth.apikeys import new_key
    from sessiond.server.store.base import Store
    from sessiond.server.store.sqlite.store import SqliteStore

    settings = Settings.from_env()
    settings.store, settings.data_dir = ns.store, ns.data_dir
    # SQLite: the server holds the data directory's lock; key writes are short
    # transactions next to it (WAL, busy timeout), so no lock is taken here.
    store: Store = (SqliteStore(ns.data_dir, exclusive=False) if ns.store in ("", "sqlite")
                    else build_store(settings))
    await store.open()
    try:
        now = utcnow()
        if ns.keys_command == "create":
            expires = now + parse_duration(ns.expires_in) if ns.expires_in else None
            record, key = new_key(ns.account, ns.user, ns.agent, ns.scopes.split(","),
                                  ns.name, expires, now)
            await store.create_api_key(record)
            if ns.json:
                print(json.dumps({**key_view(record), "key": key}))
            else:
                print(f"key id {record.key_id}\n{key}\n"
                      "store the key now: it is not shown again and cannot be recovered")
            return 0
        if ns.keys_command == "list":
            items = await store.list_api_keys(ns.account)
            if ns.json:
                print(json.dumps([key_view(k) for k in items]))
            for k in items if not ns.json else ():
                state = ("revoked" if k.revoked_at else
                         "expired" if k.expires_at and k.expires_at <= now else "active")
                print(f"{k.key_id}  {state:7}  {k.account}/{k.user or '-'}/{k.agent or '-'}  "
                      f"{','.join(k.scopes)}  {k.name}")
            return 0
        if await store.revoke_api_key(ns.key_id, now):
            print(f"revoked {ns.key_id}")
            return 0
        print(f"sessiond keys: no active key {ns.key_id!r}", file=sys.stderr)
        return 1
    finally:
        await store.close()


def keys_main(ns: argparse.Namespace) -> int:
    try:
        return asyncio.run(_keys(ns))
    except ValueError as exc:
        print(f"sessiond keys: {exc}", file=sys.stderr)
        return 2
    except SessiondError as exc:
        print(f"sessiond keys: {exc.message} ({exc.reason})", file=sys.stderr)
        return 1
