"""Auto-commit: a session's own policy (UpdateSessionConfig) and the idle trigger.

The count triggers run inside the append's transaction (`messages.after_append`).
The idle trigger is armed by every append (`sessions.idle_due_ms` = append time +
idle seconds) and fired by a periodic scan on every replica; `idle_commit` claims a
session by clearing `idle_due_ms` under the session row lock, in the transaction
of the commit itself, so however many replicas see it due, one commits, once.
"""

from __future__ import annotations

from datetime import datetime

from sessiond.server import failpoints
from sessiond.server.domain.autocommit import AutoCommitPolicy, CommitTrigger
from sessiond.server.domain.commands import CommitOutcome
from sessiond.server.domain.values import Identity, SessionMeta
from sessiond.server.store import codec
from sessiond.server.store.sql import commit, session_events, sessions
from sessiond.server.store.sql.messages import epoch_ms
from sessiond.server.store.sql.rows import own_policy
from sessiond.server.store.sql.tx import Tx


async def idle_due(tx: Tx, now: datetime, limit: int) -> list[tuple[Identity, str]]:
    """Sessions whose idle trigger is due at `now`, longest due first."""
    rows = await tx.fetch("SELECT account, user_id, agent, session_id FROM sessions "
                          "WHERE idle_due_ms<=? ORDER BY idle_due_ms LIMIT ?",
                          epoch_ms(now), limit)
    return [(Identity(r["account"], r["user_id"], r["agent"]), str(r["session_id"]))
            for r in rows]


async def idle_commit(tx: Tx, identity: Identity, session_id: str, now: datetime,
                      default: AutoCommitPolicy) -> CommitOutcome | None:
    """Commit the session when its idle trigger is (still) due; None when it is not
    (another replica fired it, or a newer append re-armed it) or nothing is live
    beyond `keep_recent_count`. The trigger is disarmed either way."""
    srow = await sessions.row(tx, identity, session_id, lock=True)
    if srow is None or srow["idle_due_ms"] is None or int(srow["idle_due_ms"]) > epoch_ms(now):
        return None
    await tx.execute("UPDATE sessions SET idle_due_ms=NULL WHERE skey=?",
                     codec.session_key(identity, session_id))
    policy = own_policy(srow) or default
    if int(srow["live_count"]) <= policy.keep_recent_count:
        return None
    failpoints.hit("autocommit.idle.write")
    return await commit.auto_commit(tx, identity, session_id, policy, CommitTrigger.IDLE, now)


async def update_config(tx: Tx, identity: Identity, session_id: str,
                        policy: AutoCommitPolicy | None, now: datetime,
                        default: AutoCommitPolicy) -> SessionMeta:
    """Set the session's own policy (None: back to the server default), re-arm the
    idle trigger from the last append, record CONFIG_CHANGED, and commit at once when
    the live buffer already passes a count trigger of the new policy."""
    skey = codec.session_key(identity, session_id)
    srow = await sessions.require(tx, identity, session_id, lock=True)
    effective = policy or default
    due = None
    if effective.idle_seconds and srow["last_append_ms"] is not None \
            and int(srow["live_count"]) > 0:
        due = int(srow["last_append_ms"]) + effective.idle_seconds * 1000
    values = ((policy.max_messages, policy.max_tokens, policy.idle_seconds,
               policy.keep_recent_count) if policy is not None else (None, None, None, None))
    await tx.execute("UPDATE sessions SET ac_messages=?, ac_tokens=?, ac_idle=?, ac_keep=?, "
                     "idle_due_ms=?, updated_at=? WHERE skey=?", *values, due, tx.d.ts(now),
                     skey)
    await session_events.append(tx, skey, [session_events.config_item(
        effective, policy is None, now)])
    trigger = effective.due(int(srow["live_count"]), int(srow["live_bytes"]))
    if trigger is not None:
        await commit.auto_commit(tx, identity, session_id, effective, trigger, now)
    return tx.d.rows.meta(await sessions.require(tx, identity, session_id))
