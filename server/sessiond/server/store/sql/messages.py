"""The live buffer: append messages, update tool parts, list, record usage."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import datetime

from sessiond.server import failpoints
from sessiond.server.domain import rules
from sessiond.server.domain.autocommit import OFF, AutoCommitPolicy
from sessiond.server.domain.commands import AddedMessage, RequestKey
from sessiond.server.domain.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    SessiondError,
)
from sessiond.server.domain.limits import (
    DEFAULT_LIMITS,
    Limits,
    clip_echo,
    live_bytes_exceeded,
    live_messages_exceeded,
    usage_exceeded,
)
from sessiond.server.domain.values import Identity, Message, ToolPart, ToolStatus, UsageRecord
from sessiond.server.store import codec
from sessiond.server.store.sql import commit, requests, session_events, sessions
from sessiond.server.store.sql.rows import own_policy
from sessiond.server.store.sql.tx import Row, Tx

# Appends within the live quotas. Also numbers the feed events, stamps the append time
# and arms the idle trigger (the session's own idle seconds, else the server's). Args:
# `bump_args`.
_BUMP = ("UPDATE sessions SET next_seq=next_seq+?, message_count=message_count+?, "
         "live_count=live_count+?, live_bytes=live_bytes+?, updated_at=?, "
         "event_seq=event_seq+?, last_append_ms=?, "
         "idle_due_ms=CASE WHEN COALESCE(ac_idle, ?)>0 THEN ?+COALESCE(ac_idle, ?)*1000 END "
         "WHERE skey=? AND live_count+?<=? AND live_bytes+?<=? "
         "RETURNING next_seq-? AS seq, event_seq-?+1 AS event_first, live_count, live_bytes, "
         "ac_messages, ac_tokens, ac_idle, ac_keep")


def bump_args(tx: Tx, skey: str, count: int, size: int, now: datetime,
              auto: AutoCommitPolicy, limits: Limits) -> tuple[object, ...]:
    ms = epoch_ms(now)
    return (count, count, count, size, tx.d.ts(now), count, ms, auto.idle_seconds, ms,
            auto.idle_seconds, skey, count, limits.live_messages_per_session, size,
            limits.live_bytes_per_session, count, count)


def epoch_ms(now: datetime) -> int:
    return int(now.timestamp() * 1000)


async def after_append(tx: Tx, identity: Identity, session_id: str, skey: str, srow: Row,
                       stored: Sequence[Message], auto: AutoCommitPolicy,
                       now: datetime) -> None:
    """The feed events of the stored messages, then the count-triggered auto-commit
    when the live buffer now passes the session's policy (same transaction: the
    append and its commit are durable together, and exactly once)."""
    await session_events.insert(tx, skey, int(srow["event_first"]),
                                [session_events.message_item(m, now) for m in stored])
    policy = own_policy(srow) or auto
    trigger = policy.due(int(srow["live_count"]), int(srow["live_bytes"]))
    if trigger is not None:
        failpoints.hit("autocommit.count")
        await commit.auto_commit(tx, identity, session_id, policy, trigger, now)


async def quota_refusal(tx: Tx, identity: Identity, session_id: str,
                        limits: Limits) -> SessiondError:
    """Why an append within the quotas changed no session row."""
    found = await sessions.row(tx, identity, session_id)
    if found is None:
        return sessions.not_found(session_id)
    if int(found["live_count"]) >= limits.live_messages_per_session:
        return live_messages_exceeded(session_id, limits)
    return live_bytes_exceeded(session_id, limits)


async def add(tx: Tx, identity: Identity, session_id: str, message: Message,
              request: RequestKey | None, limits: Limits = DEFAULT_LIMITS,
              auto: AutoCommitPolicy = OFF, now: datetime | None = None) -> Message:
    """Append one message. `now` (default: the message's created_at) is the time of
    the append: updated_at, the idle trigger, the feed event."""
    skey = codec.session_key(identity, session_id)
    previous = await requests.replay(tx, request)
    if previous is not None:
        row = await tx.fetchrow("SELECT * FROM messages WHERE skey=? AND message_id=?",
                                skey, previous["message_id"])
        if row is None:
            raise NotFound("the message of this request_id no longer exists",
                           reason="MESSAGE_NOT_FOUND")
        return tx.d.rows.message(row)
    size = rules.message_bytes(message.parts)
    now = now or message.created_at
    srow = await tx.fetchrow(_BUMP, *bump_args(tx, skey, 1, size, now, auto, limits))
    if srow is None:
        raise await quota_refusal(tx, identity, session_id, limits)
    stored = dataclasses.replace(message, seq=int(srow["seq"]))
    await tx.execute(
        "INSERT INTO messages (skey, seq, message_id, role, parts, created_at, size) "
        "VALUES (?,?,?,?,?,?,?)", skey, stored.seq, message.id, message.role.value,
        codec.encode_parts(message.parts), tx.d.ts(message.created_at), size)
    await requests.remember(tx, request, {"message_id": message.id}, now)
    await after_append(tx, identity, session_id, skey, srow, [stored], auto, now)
    return stored


async def add_batch(tx: Tx, identity: Identity, session_id: str,
                    batch: Sequence[Message], request: RequestKey | None,
                    limits: Limits = DEFAULT_LIMITS, auto: AutoCommitPolicy = OFF,
                    now: datetime | None = None) -> list[AddedMessage]:
    """Append `batch` in order, all or nothing. A message whose client id is already
    stored in the session (or earlier in the batch) is not stored again: its result
    is the stored message, marked duplicate. The live quotas count every message
    stored: when they would be exceeded nothing is stored (`QuotaExceeded`)."""
    skey = codec.session_key(identity, session_id)
    previous = await requests.replay(tx, request)
    if previous is not None:
        return await _replayed(tx, skey, previous)
    # The session row lock serializes appends that check client ids across replicas.
    await sessions.require(tx, identity, session_id, lock=True)
    now = now or batch[-1].created_at
    cids = list(dict.fromkeys(m.client_message_id for m in batch if m.client_message_id))
    known: dict[str, Message] = {}
    for chunk in range(0, len(cids), 500):
        part = cids[chunk:chunk + 500]
        rows = await tx.fetch(
            f"SELECT * FROM messages WHERE skey=? AND client_message_id IN "
            f"({','.join('?' * len(part))})", skey, *part)
        known.update((r["client_message_id"], tx.d.rows.message(r)) for r in rows)
    # Each item is either an earlier stored message or the index of a fresh one.
    plan: list[Message | int] = []
    fresh: list[Message] = []
    first_of: dict[str, int] = {}  # client id -> index in fresh
    for m in batch:
        cid = m.client_message_id
        if cid and cid in known:
            plan.append(known[cid])
        elif cid and cid in first_of:
            plan.append(first_of[cid])
        else:
            if cid:
                first_of[cid] = len(fresh)
            plan.append(len(fresh))
            fresh.append(m)
    stored: list[Message] = []
    if fresh:
        sizes = [rules.message_bytes(m.parts) for m in fresh]
        total, n = sum(sizes), len(fresh)
        srow = await tx.fetchrow(_BUMP, *bump_args(tx, skey, n, total, now, auto, limits))
        if srow is None:
            raise await batch_quota_refusal(tx, identity, session_id, n, limits)
        first = int(srow["seq"])
        stored = [dataclasses.replace(m, seq=first + i) for i, m in enumerate(fresh)]
        await tx.executemany(
            "INSERT INTO messages (skey, seq, message_id, role, parts, created_at, size, "
            "client_message_id) VALUES (?,?,?,?,?,?,?,?)",
            [(skey, m.seq, m.id, m.role.value, codec.encode_parts(m.parts),
              tx.d.ts(m.created_at), size, m.client_message_id or None)
             for m, size in zip(stored, sizes, strict=True)])
        await after_append(tx, identity, session_id, skey, srow, stored, auto, now)
    results: list[AddedMessage] = []
    seen: set[int] = set()
    for item in plan:
        if isinstance(item, Message):
            results.append(AddedMessage(item, duplicate=True))
        else:
            results.append(AddedMessage(stored[item], duplicate=item in seen))
            seen.add(item)
    await requests.remember(tx, request, {"message_ids": [r.message.id for r in results],
                                          "duplicates": [r.duplicate for r in results]},
                            now)
    return results


async def batch_quota_refusal(tx: Tx, identity: Identity, session_id: str, count: int,
                              limits: Limits) -> SessiondError:
    """Why appending `count` messages within the quotas changed no session row."""
    found = await sessions.row(tx, identity, session_id)
    if found is None:
        return sessions.not_found(session_id)
    if int(found["live_count"]) + count > limits.live_messages_per_session:
        return live_messages_exceeded(session_id, limits)
    return live_bytes_exceeded(session_id, limits)


async def _replayed(tx: Tx, skey: str, previous: dict[str, list[object]]
                    ) -> list[AddedMessage]:
    ids = [str(i) for i in previous["message_ids"]]
    found: dict[str, Message] = {}
    for chunk in range(0, len(ids), 500):
        part = ids[chunk:chunk + 500]
        rows = await tx.fetch(f"SELECT * FROM messages WHERE skey=? AND message_id IN "
                              f"({','.join('?' * len(part))})", skey, *part)
        found.update((r["message_id"], tx.d.rows.message(r)) for r in rows)
    if len(found) != len(set(ids)):
        raise NotFound("the messages of this request_id no longer exist",
                       reason="MESSAGE_NOT_FOUND")
    return [AddedMessage(found[i], bool(d)) for i, d in zip(ids, previous["duplicates"],
                                                             strict=True)]


async def update_tool_part(tx: Tx, identity: Identity, session_id: str, message_id: str,
                           tool_id: str, output: str, status: ToolStatus,
                           now: datetime, max_bytes: int = DEFAULT_LIMITS.message_bytes,
                           limits: Limits = DEFAULT_LIMITS) -> Message:
    skey = codec.session_key(identity, session_id)
    # The session row lock serializes this with commits and other tool updates.
    srow = await sessions.require(tx, identity, session_id, lock=True)
    row = await tx.fetchrow("SELECT * FROM messages WHERE skey=? AND message_id=?",
                            skey, message_id)
    if row is None:
        raise NotFound(f"message {clip_echo(message_id)!r} not found in session "
                       f"{session_id!r}",
                       reason="MESSAGE_NOT_FOUND")
    if row["archive_index"] is not None:
        raise FailedPrecondition(
            f"message {clip_echo(message_id)!r} was archived by commit {row['archive_index']}; "
            "archived messages are immutable", reason="MESSAGE_ARCHIVED")
    msg = tx.d.rows.message(row)
    parts = list(msg.parts)
    for i, p in enumerate(parts):
        if isinstance(p, ToolPart) and p.tool_id == tool_id:
            parts[i] = dataclasses.replace(p, output=output, status=status)
            break
    else:
        raise NotFound(f"tool part {clip_echo(tool_id)!r} not found in message "
                       f"{clip_echo(message_id)!r}", reason="TOOL_PART_NOT_FOUND")
    size = rules.message_bytes(parts)
    if size > max_bytes:
        raise InvalidArgument("output makes the message too large", violations=[
            FieldViolation("output", f"the message may hold at most {max_bytes} bytes in all "
                                     f"string fields (would be {size})")])
    grown = size - int(row["size"])
    if grown > 0 and int(srow["live_bytes"]) + grown > limits.live_bytes_per_session:
        raise live_bytes_exceeded(session_id, limits)
    await tx.execute("UPDATE messages SET parts=?, size=? WHERE skey=? AND message_id=?",
                     codec.encode_parts(parts), size, skey, message_id)
    await tx.execute("UPDATE sessions SET updated_at=?, live_bytes=live_bytes+? WHERE skey=?",
                     tx.d.ts(now), grown, skey)
    return dataclasses.replace(msg, parts=tuple(parts))


async def list_live(tx: Tx, identity: Identity, session_id: str, newest: int) -> list[Message]:
    skey = codec.session_key(identity, session_id)
    if newest > 0:
        rows = await tx.fetch(
            "SELECT * FROM (SELECT * FROM messages WHERE skey=? AND archive_index IS NULL "
            "ORDER BY seq DESC LIMIT ?) AS m ORDER BY seq", skey, newest)
    else:
        rows = await tx.fetch("SELECT * FROM messages WHERE skey=? AND archive_index IS NULL "
                              "ORDER BY seq", skey)
    if not rows:  # messages imply their session; only an empty answer asks
        await sessions.require(tx, identity, session_id)
    return [tx.d.rows.message(r) for r in rows]


async def record_usage(tx: Tx, identity: Identity, session_id: str, usage: UsageRecord,
                       request: RequestKey | None, limits: Limits = DEFAULT_LIMITS) -> int:
    skey = codec.session_key(identity, session_id)
    if await requests.replay(tx, request) is None:
        found = await tx.fetchval("UPDATE sessions SET updated_at=? WHERE skey=? RETURNING 1",
                                  tx.d.ts(usage.created_at), skey)
        if found is None:
            raise sessions.not_found(session_id)
        pending = await tx.fetchval("SELECT COUNT(*) FROM usage WHERE skey=? AND "
                                    "archive_index IS NULL", skey)
        if int(pending) >= limits.usage_records_per_session:
            raise usage_exceeded(session_id, limits)
        contexts, skill = codec.encode_usage(usage)
        await tx.execute("INSERT INTO usage (skey, context_uris, skill, created_at) "
                         "VALUES (?,?,?,?)", skey, contexts, skill, tx.d.ts(usage.created_at))
        await requests.remember(tx, request, {}, usage.created_at)
    count = await tx.fetchval("SELECT COUNT(*) FROM usage WHERE skey=? AND archive_index IS NULL",
                              skey)
    return int(count)
