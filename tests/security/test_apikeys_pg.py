"""API keys on PostgreSQL: two `sessiond serve` replicas share the key table; a key
revoked with `sessiond keys revoke` stops working on the other replica within the
key cache time."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from tests.faults.harness import Stubs
from tests.pg import temporary_database
from tests.replicas.helpers import migrate, start_replicas, wait_until
from tests.security.helpers import bearer, get_session, reason
from tests.security.test_apikeys import create_key, keys

pytestmark = [pytest.mark.postgres, pytest.mark.slow]
CACHE_SECONDS = 1.0


def _rejected(stubs: Stubs, md: tuple[tuple[str, str], ...]) -> str:
    try:
        get_session(stubs, "shared", md, auto_create=False)
        return ""
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err
        return reason(err)


def test_revocation_reaches_every_replica(tmp_path: Path) -> None:
    with temporary_database("sessiond_keys") as url:
        migrate(url)
        servers = start_replicas(tmp_path, url, 2, extra=[
            "--auth", "api-key", "--key-cache-seconds", str(CACHE_SECONDS)])
        try:
            a, b = (s.stubs() for s in servers)
            made = create_key(["--store", url], "--account", "acme", "--user", "alice")
            md = bearer(made["key"])
            get_session(a, "shared", md)
            # b has the key cached (just used) when it is revoked through the store
            assert get_session(b, "shared", md, auto_create=False).session_id == "shared"
            keys("revoke", "--store", url, made["key_id"])
            t0 = time.monotonic()
            took = wait_until(lambda: _rejected(b, md) == "CREDENTIALS_REVOKED",
                              CACHE_SECONDS + 3.0, "revocation on replica b", 0.05)
            assert took <= CACHE_SECONDS + 3.0
            assert _rejected(a, md) == "CREDENTIALS_REVOKED"
            assert time.monotonic() - t0 < CACHE_SECONDS + 5.0
            # a key made after the replicas started works on both at once
            fresh = bearer(create_key(["--store", url], "--account", "acme")["key"])
            get_session(a, "f", fresh)
            get_session(b, "f", fresh, auto_create=False)
            a.close()
            b.close()
        finally:
            for s in servers:
                s.close()
