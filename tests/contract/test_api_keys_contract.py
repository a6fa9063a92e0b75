"""Storage contract of API keys, on both backends: records round-trip, ids are
unique, listing is by account, revocation is once, and another handle on the same
database (another replica, or `sessiond keys` next to a SQLite server) sees writes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sessiond.server.auth.apikeys import hash_key, new_key
from sessiond.server.domain.errors import AlreadyExists
from sessiond.server.domain.values import ApiKey
from sessiond.server.store.base import Store
from sessiond.server.store.sqlite.store import SqliteStore

from tests.contract.conftest import Runner, StoreFactory

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


def record(key_id: str, account: str = "acme", **kw: object) -> ApiKey:
    base: dict[str, object] = dict(key_id=key_id, secret_hash=hash_key(key_id),
                                   account=account, user=None, agent=None,
                                   scopes=("read",), name="", created_at=T0)
    base.update(kw)
    return ApiKey(**base)  # type: ignore[arg-type]


def test_api_key_round_trip(store: Store, run: Runner) -> None:
    made, key = new_key("acme", "alice", "planner", ["write", "read", "act-as"], "ci bot",
                        T0 + timedelta(days=30), T0)
    assert key.startswith("sessiond_") and made.secret_hash == hash_key(key)
    assert made.scopes == ("read", "write", "act-as")
    run(store.create_api_key(made))
    assert run(store.get_api_key(made.key_id)) == made
    bare = record("0123456789abcdef")
    run(store.create_api_key(bare))
    got = run(store.get_api_key(bare.key_id))
    assert got == bare and got is not None and got.user is None and got.expires_at is None
    assert run(store.get_api_key("ffffffffffffffff")) is None
    with pytest.raises(AlreadyExists):
        run(store.create_api_key(record(bare.key_id, account="other")))
    assert run(store.get_api_key(bare.key_id)) == bare  # the first record stays


def test_list_and_revoke(store: Store, run: Runner) -> None:
    for i, acct in enumerate(("globex", "acme", "acme")):
        run(store.create_api_key(record(f"k{i}", acct, created_at=T0 + timedelta(seconds=i))))
    assert [k.key_id for k in run(store.list_api_keys())] == ["k1", "k2", "k0"]
    assert [k.key_id for k in run(store.list_api_keys("acme"))] == ["k1", "k2"]
    assert run(store.list_api_keys("nobody")) == []
    at = T0 + timedelta(hours=1)
    assert run(store.revoke_api_key("k1", at)) is True
    assert run(store.revoke_api_key("k1", at + timedelta(hours=1))) is False
    assert run(store.revoke_api_key("missing", at)) is False
    revoked = run(store.get_api_key("k1"))
    assert revoked is not None and revoked.revoked_at == at
    other = run(store.get_api_key("k2"))
    assert other is not None and other.revoked_at is None


def test_another_handle_sees_key_writes(store: Store, make_store: StoreFactory,
                                        run: Runner) -> None:
    if isinstance(store, SqliteStore):
        second: Store = SqliteStore(store.data_dir, exclusive=False)  # beside the server
        run(second.open())
    else:
        second = make_store()  # another replica on the same database
    try:
        run(second.create_api_key(record("aaaa000011112222")))
        assert run(store.get_api_key("aaaa000011112222")) is not None
        assert run(second.revoke_api_key("aaaa000011112222", T0)) is True
        seen = run(store.get_api_key("aaaa000011112222"))
        assert seen is not None and seen.revoked_at == T0
    finally:
        if isinstance(second, SqliteStore):
            run(second.close())
