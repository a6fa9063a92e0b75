"""The session event feed (WatchSession): numbered events per session, written in the
transaction of what they report (an append, a commit, a task journal event, a config
change), so the feed has exactly what happened, in commit order per session.

Numbers come from `sessions.event_seq`, bumped under the session row lock: a
session's events are numbered without gaps in the order their transactions commit,
so a watcher resuming after seq N misses nothing. Each session keeps its newest
`tx.journal_cap` events. Task journal events are referenced (task id, seq), not
copied: reading the feed joins them from the task's journal.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any

from sessiond.server.domain.autocommit import (
    AutoCommitPolicy,
    CommitTrigger,
    SessionEvent,
    SessionEventKind,
)
from sessiond.server.domain.values import Identity, Message, Role, TaskEvent
from sessiond.server.store import codec
from sessiond.server.store.sql.tx import Row, Tx

# How often (in events) a session's feed is trimmed to its cap.
PRUNE_EVERY = 64
POKE_PREFIX = "s:"


def poke_key(skey: str) -> str:
    """The wake-up key of a session's feed (EventHub subscription, NOTIFY payload)."""
    return POKE_PREFIX + skey


# (kind, time, task_id, ref_seq, payload)
Item = tuple[SessionEventKind, datetime, str, int, dict[str, Any]]


async def bump(tx: Tx, skey: str, count: int) -> int | None:
    """Reserve `count` numbers of the session's feed; the first, or None when the
    session is gone. Takes the session row lock (PostgreSQL)."""
    last = await tx.fetchval("UPDATE sessions SET event_seq=event_seq+? WHERE skey=? "
                             "RETURNING event_seq", count, skey)
    return None if last is None else int(last) - count + 1


async def insert(tx: Tx, skey: str, first: int, items: Sequence[Item]) -> None:
    """Write `items` as events first, first+1, ... (numbers from `bump`)."""
    if not items:
        return
    await tx.executemany(
        "INSERT INTO session_events (skey, seq, kind, time, task_id, ref_seq, payload) "
        "VALUES (?,?,?,?,?,?,?)",
        [(skey, first + i, kind.value, tx.d.ts(time), task_id, ref, codec.dumps(payload))
         for i, (kind, time, task_id, ref, payload) in enumerate(items)])
    last = first + len(items) - 1
    if last > tx.journal_cap and (last // PRUNE_EVERY) != ((first - 1) // PRUNE_EVERY):
        await tx.execute("DELETE FROM session_events WHERE skey=? AND seq<=?", skey,
                         last - tx.journal_cap)
    tx.announce.pokes.add(poke_key(skey))


async def append(tx: Tx, skey: str, items: Sequence[Item]) -> None:
    """Number and write `items`; nothing when the session is gone."""
    first = await bump(tx, skey, len(items)) if items else None
    if first is not None:
        await insert(tx, skey, first, items)


async def add(tx: Tx, skey: str, item: Item) -> None:
    """Append one item, or hold it for the end of the `batched` block it is in."""
    if tx.feed is not None:
        tx.feed.setdefault(skey, []).append(item)
    else:
        await append(tx, skey, [item])


@contextlib.asynccontextmanager
async def batched(tx: Tx) -> AsyncIterator[None]:
    """Items `add`ed inside are numbered and written at its end, one statement per
    session instead of two per item (a Phase 2 transaction appends a dozen journal
    events of one session). Same numbers and order as written one by one."""
    if tx.feed is not None:  # already batching: the outer block writes
        yield
        return
    tx.feed = {}
    try:
        yield
        held, tx.feed = tx.feed, None
        for skey, items in held.items():
            await append(tx, skey, items)
    finally:
        tx.feed = None


def message_item(m: Message, now: datetime) -> Item:
    return (SessionEventKind.MESSAGE_APPENDED, now, "", m.seq,
            {"message_id": m.id, "role": m.role.value, "client_message_id": m.client_message_id})


def commit_item(task_id: str, index: int, archived: int, trigger: CommitTrigger,
                now: datetime) -> Item:
    return (SessionEventKind.COMMIT_ACCEPTED, now, task_id, index,
            {"archived": archived, "trigger": trigger.value})


def task_item(ev: TaskEvent) -> Item:
    return (SessionEventKind.TASK_EVENT, ev.time, ev.task_id, ev.seq, {})


def config_item(policy: AutoCommitPolicy, inherited: bool, now: datetime) -> Item:
    return (SessionEventKind.CONFIG_CHANGED, now, "", 0,
            {"max_messages": policy.max_messages, "max_tokens": policy.max_tokens,
             "idle_seconds": policy.idle_seconds,
             "keep_recent_count": policy.keep_recent_count, "inherited": inherited})


def _event(tx: Tx, session_id: str, row: Row, task_events: dict[tuple[str, int], TaskEvent]
           ) -> SessionEvent:
    kind = SessionEventKind(row["kind"])
    p: dict[str, Any] = json.loads(row["payload"] or "{}")
    base: dict[str, Any] = {"session_id": session_id, "seq": int(row["seq"]), "kind": kind,
                            "time": tx.d.rows.ts(row["time"])}
    if kind is SessionEventKind.MESSAGE_APPENDED:
        return SessionEvent(**base, message_id=p["message_id"], message_seq=int(row["ref_seq"]),
                            role=Role(p["role"]), client_message_id=p["client_message_id"])
    if kind is SessionEventKind.COMMIT_ACCEPTED:
        return SessionEvent(**base, task_id=row["task_id"], archive_index=int(row["ref_seq"]),
                            archived_messages=int(p["archived"]),
                            trigger=CommitTrigger(p["trigger"]))
    if kind is SessionEventKind.TASK_EVENT:
        key = (str(row["task_id"]), int(row["ref_seq"]))
        return SessionEvent(**base, task_id=key[0], task_seq=key[1],
                            task_event=task_events.get(key))
    policy = AutoCommitPolicy(int(p["max_messages"]), int(p["max_tokens"]),
                              int(p["idle_seconds"]), int(p["keep_recent_count"]))
    return SessionEvent(**base, auto_commit=policy, auto_commit_inherited=bool(p["inherited"]))


async def list_after(tx: Tx, identity: Identity, session_id: str, after_seq: int,
                     limit: int) -> list[SessionEvent]:
    """The session's events with seq > after_seq, oldest first, at most `limit`."""
    rows = await tx.fetch("SELECT * FROM session_events WHERE skey=? AND seq>? ORDER BY seq "
                          "LIMIT ?", codec.session_key(identity, session_id), after_seq, limit)
    wanted: dict[str, list[int]] = {}
    for r in rows:
        if r["kind"] == SessionEventKind.TASK_EVENT.value:
            wanted.setdefault(str(r["task_id"]), []).append(int(r["ref_seq"]))
    found: dict[tuple[str, int], TaskEvent] = {}
    for task_id, seqs in wanted.items():
        for ev_row in await tx.fetch("SELECT * FROM task_events WHERE task_id=? AND seq>=? "
                                     "AND seq<=? ORDER BY seq", task_id, min(seqs), max(seqs)):
            ev = tx.d.rows.event(ev_row)
            found[(ev.task_id, ev.seq)] = ev
    return [_event(tx, session_id, r, found) for r in rows]


async def first_seq(tx: Tx, identity: Identity, session_id: str) -> int:
    """The oldest kept number of the session's feed (0 when it is empty)."""
    value = await tx.fetchval("SELECT MIN(seq) FROM session_events WHERE skey=?",
                              codec.session_key(identity, session_id))
    return int(value) if value is not None else 0
