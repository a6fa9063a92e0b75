"""--auth api-key over a real server, keys made with the `sessiond keys` command
against the store the server is using (SQLite here; PostgreSQL replicas in
test_apikeys_pg.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import grpc
from sessiond.client import connect
from sessiond.server.auth.policy import AuthSettings
from sessiond.v1 import session_pb2

from tests.conftest import Running, ServerFactory
from tests.security.helpers import bearer, error_info, fails, get_session, stubs

UNAUTH = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED


def keys(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([sys.executable, "-m", "sessiond.server.cli", "keys", *args],
                         capture_output=True, text=True, timeout=60, check=False)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def create_key(store_args: list[str], *args: str) -> dict[str, Any]:
    made: dict[str, Any] = json.loads(keys("create", *store_args, "--json", *args).stdout)
    return made


def tamper(key: str) -> str:
    """The key with its last secret character changed."""
    return key[:-1] + ("A" if key[-1] != "A" else "B")


def key_server(server_factory: ServerFactory, tmp_path: Path) -> tuple[Running, list[str]]:
    data = tmp_path / "data"
    srv = server_factory(data, auth=AuthSettings(mode="api-key", key_cache_seconds=0.5))
    return srv, ["--data-dir", str(data)]


def test_keys_authenticate_and_bind(server_factory: ServerFactory, tmp_path: Path) -> None:
    srv, where = key_server(server_factory, tmp_path)
    s = stubs(srv.channel)
    fails(lambda: get_session(s), UNAUTH, "CREDENTIALS_MISSING")
    alice = create_key(where, "--account", "acme", "--user", "alice", "--name", "alice")
    assert alice["key"].startswith("sessiond_") and alice["scopes"] == ["read", "write"]
    md = bearer(alice["key"])
    assert get_session(s, "a", md).session_id == "a"
    fails(lambda: get_session(s, "a", (*md, ("x-sessiond-user", "bob"))), DENIED,
          "IDENTITY_NOT_ALLOWED")
    # the same key through the client's call credentials
    with connect(srv.target, api_key=alice["key"], plaintext_loopback=True) as ch:
        listed = stubs(ch).sessions.ListSessions(session_pb2.ListSessionsRequest())
        assert [x.session_id for x in listed.sessions] == ["a"]
    # a service key with act-as reaches alice's session; a reader cannot write
    svc = create_key(where, "--account", "acme", "--scopes", "read,write,act-as")
    assert get_session(s, "a", (*bearer(svc["key"]), ("x-sessiond-user", "alice")),
                       auto_create=False).session_id == "a"
    reader = create_key(where, "--account", "acme", "--user", "alice", "--scopes", "read")
    err = fails(lambda: get_session(s, "new", bearer(reader["key"])), DENIED, "SCOPE_MISSING")
    assert error_info(err).metadata["required_scope"] == "write"
    # another account's key sees nothing
    other = create_key(where, "--account", "globex", "--user", "alice")
    fails(lambda: get_session(s, "a", bearer(other["key"]), auto_create=False),
          grpc.StatusCode.NOT_FOUND)


def test_bad_expired_and_revoked_keys(server_factory: ServerFactory, tmp_path: Path) -> None:
    srv, where = key_server(server_factory, tmp_path)
    s = stubs(srv.channel)
    good = create_key(where, "--account", "acme")
    forged = tamper(good["key"])
    for bad in (forged, "sessiond_" + "0" * 16 + "_" + "x" * 43, "hello", good["key"] + "x"):
        fails(partial(get_session, s, "x", bearer(bad)), UNAUTH, "CREDENTIALS_INVALID")
    short = create_key(where, "--account", "acme", "--expires-in", "1s")
    assert short["expires_at"]
    time.sleep(1.2)
    fails(lambda: get_session(s, "x", bearer(short["key"])), UNAUTH, "CREDENTIALS_EXPIRED")
    md = bearer(good["key"])
    get_session(s, "x", md)
    assert keys("revoke", *where, good["key_id"]).stdout.strip() == f"revoked {good['key_id']}"
    deadline = time.monotonic() + 5
    while True:
        try:
            get_session(s, "x", md, auto_create=False)
        except grpc.RpcError as err:
            assert err.code() == UNAUTH
            assert "REVOKED" in str(error_info(err).reason)
            break
        assert time.monotonic() < deadline, "revocation not seen within 5 s"
        time.sleep(0.1)
    again = keys("revoke", *where, good["key_id"], check=False)
    assert again.returncode == 1 and "no active key" in again.stderr


def test_keys_are_stored_hashed_and_listed_without_secrets(server_factory: ServerFactory,
                                                           tmp_path: Path) -> None:
    srv, where = key_server(server_factory, tmp_path)
    made = create_key(where, "--account", "acme", "--agent", "planner", "--scopes",
                      "admin", "--name", "ops", "--expires-in", "30d")
    secret = made["key"].split("_", 2)[2]  # the secret itself may contain "_"
    stored = b"".join(p.read_bytes() for p in (tmp_path / "data").iterdir() if p.is_file())
    assert secret.encode() not in stored and made["key"].encode() not in stored
    listed = json.loads(keys("list", *where, "--json").stdout)
    assert [k["key_id"] for k in listed] == [made["key_id"]]
    assert "key" not in listed[0] and not any(secret in str(v) for v in listed[0].values())
    assert listed[0]["agent"] == "planner" and listed[0]["scopes"] == ["admin"]
    assert listed[0]["user"] is None and listed[0]["revoked_at"] is None
    text = keys("list", *where).stdout
    assert made["key_id"] in text and "active" in text and secret not in text
    assert json.loads(keys("list", *where, "--account", "other", "--json").stdout) == []
    bad = keys("create", *where, "--account", "acme", "--scopes", "root", check=False)
    assert bad.returncode == 1 and "unknown scope" in bad.stderr
    bad = keys("create", *where, "--account", "a b", check=False)
    assert bad.returncode == 1 and "not valid" in bad.stderr
    bad = keys("create", *where, "--account", "acme", "--expires-in", "soon", check=False)
    assert bad.returncode == 2
    # an admin key may do everything within its account
    assert get_session(stubs(srv.channel), "z", bearer(made["key"])).session_id == "z"
