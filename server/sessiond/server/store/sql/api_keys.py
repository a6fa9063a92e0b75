"""API keys: stored as the hash of the key (never the key), looked up by key id."""

from __future__ import annotations

from datetime import datetime

from sessiond.server.domain.errors import AlreadyExists
from sessiond.server.domain.values import ApiKey
from sessiond.server.store.sql.tx import Tx


async def create(tx: Tx, key: ApiKey) -> None:
    added = await tx.execute(
        "INSERT INTO api_keys (key_id, secret_hash, account, user_id, agent, scopes, name, "
        "created_at, expires_at, revoked_at) VALUES (?,?,?,?,?,?,?,?,?,?) "
        "ON CONFLICT DO NOTHING",
        key.key_id, key.secret_hash, key.account, key.user, key.agent, ",".join(key.scopes),
        key.name, tx.d.ts(key.created_at), tx.d.ts(key.expires_at), tx.d.ts(key.revoked_at))
    if not added:
        raise AlreadyExists(f"API key id {key.key_id!r} exists", reason="API_KEY_EXISTS")


async def get(tx: Tx, key_id: str) -> ApiKey | None:
    row = await tx.fetchrow("SELECT * FROM api_keys WHERE key_id=?", key_id)
    return None if row is None else tx.d.rows.api_key(row)


async def list_all(tx: Tx, account: str | None) -> list[ApiKey]:
    if account is None:
        rows = await tx.fetch("SELECT * FROM api_keys ORDER BY account, created_at, key_id")
    else:
        rows = await tx.fetch("SELECT * FROM api_keys WHERE account=? "
                              "ORDER BY account, created_at, key_id", account)
    return [tx.d.rows.api_key(r) for r in rows]


async def revoke(tx: Tx, key_id: str, now: datetime) -> bool:
    """True when the key existed and was not revoked yet."""
    changed = await tx.execute(
        "UPDATE api_keys SET revoked_at=? WHERE key_id=? AND revoked_at IS NULL",
        tx.d.ts(now), key_id)
    return changed > 0
