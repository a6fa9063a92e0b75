"""Sessions: create, read, list, delete (open tasks of a deleted session end CANCELLED)."""

from __future__ import annotations

from datetime import datetime

from sessiond.server.domain import transitions
from sessiond.server.domain.commands import RequestKey
from sessiond.server.domain.errors import AlreadyExists, NotFound
from sessiond.server.domain.limits import DEFAULT_LIMITS, Limits, sessions_exceeded
from sessiond.server.domain.pages import Page, page_of
from sessiond.server.domain.values import Identity, SessionMeta, TaskState
from sessiond.server.store import codec
from sessiond.server.store.sql import requests, tasks
from sessiond.server.store.sql.tx import Row, Tx

OPEN = (TaskState.PENDING.value, TaskState.RUNNING.value)


def not_found(session_id: str) -> NotFound:
    return NotFound(f"session {session_id!r} not found", reason="SESSION_NOT_FOUND",
                    metadata={"session_id": session_id})


async def row(tx: Tx, identity: Identity, session_id: str, *, lock: bool = False) -> Row | None:
    return await tx.fetchrow("SELECT * FROM sessions WHERE skey=?" + (tx.d.lock if lock else ""),
                             codec.session_key(identity, session_id))


async def require(tx: Tx, identity: Identity, session_id: str, *, lock: bool = False) -> Row:
    found = await row(tx, identity, session_id, lock=lock)
    if found is None:
        raise not_found(session_id)
    return found


async def insert(tx: Tx, identity: Identity, session_id: str, now: datetime,
                  limits: Limits) -> Row | None:
    """The new row, or None when the identity has that session already;
    `QuotaExceeded` (the transaction rolls back) when it may hold no more. The count
    is one row per identity, so the check costs the same at any number of sessions
    and concurrent creates of one identity are serialized on it."""
    new = await tx.fetchrow(
        "INSERT INTO sessions (skey, account, user_id, agent, session_id, created_at, "
        "updated_at) VALUES (?,?,?,?,?,?,?) ON CONFLICT DO NOTHING RETURNING *",
        codec.session_key(identity, session_id), identity.account, identity.user,
        identity.agent, session_id, tx.d.ts(now), tx.d.ts(now))
    if new is None:
        return None
    held = await tx.fetchval(
        "INSERT INTO identity_usage (account, user_id, agent, sessions) VALUES (?,?,?,1) "
        "ON CONFLICT (account, user_id, agent) DO UPDATE SET "
        "sessions=identity_usage.sessions+1 WHERE identity_usage.sessions<? "
        "RETURNING sessions", identity.account, identity.user, identity.agent,
        limits.sessions_per_identity)
    if held is None or int(held) > limits.sessions_per_identity:
        raise sessions_exceeded(limits)
    return new


async def create(tx: Tx, identity: Identity, session_id: str, now: datetime,
                 request: RequestKey | None, limits: Limits = DEFAULT_LIMITS) -> SessionMeta:
    async def replayed(response: dict[str, str]) -> SessionMeta:
        found = await row(tx, identity, response["session_id"])
        if found is None:
            raise NotFound(f"session {response['session_id']!r} was deleted",
                           reason="SESSION_NOT_FOUND")
        return tx.d.rows.meta(found)

    previous = await requests.replay(tx, request)
    if previous is not None:
        return await replayed(previous)
    new = await insert(tx, identity, session_id, now, limits)
    if new is None:
        # Taken; possibly by a concurrent call with this very request_id.
        previous = await requests.replay(tx, request)
        if previous is not None:
            return await replayed(previous)
        raise AlreadyExists(f"session {session_id!r} already exists", reason="SESSION_EXISTS",
                            metadata={"session_id": session_id})
    await requests.remember(tx, request, {"session_id": session_id}, now)
    return tx.d.rows.meta(new)


async def get(tx: Tx, identity: Identity, session_id: str) -> SessionMeta | None:
    found = await row(tx, identity, session_id)
    return None if found is None else tx.d.rows.meta(found)


async def ensure(tx: Tx, identity: Identity, session_id: str, now: datetime,
                 limits: Limits = DEFAULT_LIMITS) -> SessionMeta:
    found = await row(tx, identity, session_id)
    if found is not None:
        return tx.d.rows.meta(found)
    new = await insert(tx, identity, session_id, now, limits)
    return tx.d.rows.meta(new if new is not None else await require(tx, identity, session_id))


async def list_page(tx: Tx, identity: Identity, page_size: int,
                    page_token: str) -> Page[SessionMeta]:
    rows = await tx.fetch(
        "SELECT * FROM sessions WHERE account=? AND user_id=? AND agent=? AND session_id>? "
        "ORDER BY session_id LIMIT ?",
        identity.account, identity.user, identity.agent, page_token, page_size + 1)
    return page_of(rows, page_size, lambda r: str(r["session_id"]), tx.d.rows.meta)


async def delete(tx: Tx, identity: Identity, session_id: str, now: datetime) -> bool:
    skey = codec.session_key(identity, session_id)
    open_sql = ("SELECT * FROM tasks WHERE skey=? AND state IN (?,?) ORDER BY task_id"
                + tx.d.lock)
    # Lock order: task rows, then the session row (like the worker's finalize).
    await tx.fetch(open_sql, skey, *OPEN)
    if await row(tx, identity, session_id, lock=True) is None:
        return False
    for task_row in await tx.fetch(open_sql, skey, *OPEN):
        task = tx.d.rows.task(task_row)
        await tasks.apply(tx, task, transitions.session_deleted(task, now), now)
    await tx.execute("DELETE FROM sessions WHERE skey=?", skey)
    await tx.execute("UPDATE identity_usage SET sessions=sessions-1 WHERE account=? "
                     "AND user_id=? AND agent=? AND sessions>0", identity.account,
                     identity.user, identity.agent)
    tx.announce.work = True
    return True
