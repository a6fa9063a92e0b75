"""Migration 7 (tasks.trace_context) on a store made by the previous release (schema
version 3): the server upgrades it at start, keeps its tasks, and new tasks store
their trace context."""

from __future__ import annotations

import itertools
import sqlite3
from pathlib import Path

from sessiond.server.domain.values import Identity, TextPart
from sessiond.server.store.codec import encode_parts, session_key
from sessiond.server.store.sql.schema import MIGRATIONS, SCHEMA_VERSION, pending, statements
from sessiond.server.store.sqlite.schema import EXTRA, TYPES
from sessiond.v1 import session_pb2, task_pb2

from tests.api.helpers import add, wait_task
from tests.conftest import ServerFactory
from tests.observability.spans import recording


def _version_3_store(data: Path) -> None:
    data.mkdir(parents=True)
    conn = sqlite3.connect(str(data / "sessiond.sqlite3"), isolation_level=None)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for m in MIGRATIONS:
        if m.version <= 3:
            for stmt in statements(m.render(TYPES, EXTRA)):
                conn.execute(stmt)
    conn.execute("INSERT INTO schema_version(version) VALUES (3)")
    conn.close()


def test_versions_apply_in_order_from_any_version() -> None:
    versions = [m.version for m in MIGRATIONS]
    assert SCHEMA_VERSION == versions[-1] and versions == sorted(set(versions))
    assert [m.version for m in pending(0)] == versions
    assert [m.version for m in pending(3)] == [v for v in versions if v > 3]
    assert pending(SCHEMA_VERSION) == ()


def test_a_version_3_store_is_upgraded_and_keeps_working(server_factory: ServerFactory,
                                                         tmp_path: Path) -> None:
    data = tmp_path / "old"
    _version_3_store(data)
    with recording():
        srv = server_factory(data_dir=data)
        srv.sessions.GetSession(session_pb2.GetSessionRequest(session_id="u", auto_create=True))
        add(srv.sessions, "u", "hello")
        reply = srv.sessions.Commit(session_pb2.CommitRequest(session_id="u"))
        assert wait_task(srv.tasks, reply.task_id).state == task_pb2.TASK_STATE_COMPLETED
        stored = srv.loop.run(srv.app.store.get_task(reply.task_id))
    assert stored is not None and stored.trace_context.startswith('{"traceparent":"00-')
    conn = sqlite3.connect(str(data / "sessiond.sqlite3"))
    try:
        assert conn.execute("SELECT version FROM schema_version").fetchone() == (SCHEMA_VERSION,)
        cols = {row[1] for row in conn.execute("PRAGMA table_info(tasks)")}
        assert {"trace_context", "retries"} <= cols
    finally:
        conn.close()


def _version_8_store_with_interleaved_messages(data: Path, sids: list[str],
                                               per_session: int) -> None:
    """A store as sessiond made it before migration 11: messages of `sids` appended
    in turns (one of each, then the next of each, ...), so a rowid table interleaves
    them."""
    data.mkdir(parents=True)
    conn = sqlite3.connect(str(data / "sessiond.sqlite3"), isolation_level=None)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for m in MIGRATIONS:
        if m.version <= 8:
            for stmt in statements(m.render(TYPES, EXTRA)):
                conn.execute(stmt)
    conn.execute("INSERT INTO schema_version(version) VALUES (8)")
    who = Identity("default", "default", "default")
    conn.execute("INSERT INTO identity_usage (account, user_id, agent, sessions) "
                 "VALUES ('default', 'default', 'default', ?)", (len(sids),))
    parts = [TextPart(text=f"old message {k}") for k in range(per_session)]
    for sid in sids:
        conn.execute("INSERT INTO sessions (skey, account, user_id, agent, session_id, "
                     "created_at, updated_at, message_count, live_count, next_seq, "
                     "live_bytes) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                     (session_key(who, sid), "default", "default", "default", sid, 1.0, 1.0,
                      per_session, per_session, per_session + 1, 0))
    for k in range(per_session):
        for sid in sids:
            raw = encode_parts([parts[k]])
            conn.execute("INSERT INTO messages (skey, seq, message_id, role, parts, "
                         "created_at, size, client_message_id) VALUES (?,?,?,?,?,?,?,?)",
                         (session_key(who, sid), k + 1, f"msg_{sid}_{k}", "user", raw,
                          2.0 + k, len(raw), f"c{k}" if k % 2 else None))
    conn.execute("UPDATE sessions SET live_bytes = (SELECT SUM(size) FROM messages m "
                 "WHERE m.skey = sessions.skey)")
    conn.close()


def test_migration_11_clusters_messages_by_session_and_keeps_them(
        server_factory: ServerFactory, tmp_path: Path) -> None:
    data, sids = tmp_path / "v8", ["a", "b", "c"]
    _version_8_store_with_interleaved_messages(data, sids, 40)
    srv = server_factory(data_dir=data)
    conn = sqlite3.connect(str(data / "sessiond.sqlite3"))
    try:
        sql = conn.execute("SELECT sql FROM sqlite_master WHERE name='messages'").fetchone()[0]
        assert "WITHOUT ROWID" in sql
        assert {r[1] for r in conn.execute("PRAGMA index_list(messages)")} >= {
            "messages_id", "messages_archive", "messages_client_id"}
        # Stored in (skey, seq) order: a scan meets each session's messages together
        # (a rowid table returns them in the interleaved order they were appended).
        order = [r[0] for r in conn.execute("SELECT skey FROM messages")]
        assert [k for k, _ in itertools.groupby(order)] == [session_key(
            Identity("default", "default", "default"), s) for s in sids]
    finally:
        conn.close()
    # Everything the old store held is still there and keeps working.
    for sid in sids:
        meta = srv.sessions.GetSession(session_pb2.GetSessionRequest(session_id=sid))
        assert meta.live_message_count == 40 and meta.message_count == 40
    add(srv.sessions, "b", "a new message")
    reply = srv.sessions.Commit(session_pb2.CommitRequest(session_id="b", keep_recent_count=1))
    assert reply.archived
    assert wait_task(srv.tasks, reply.task_id).state == task_pb2.TASK_STATE_COMPLETED
    archived = srv.sessions.GetArchive(session_pb2.GetArchiveRequest(session_id="b", index=1))
    assert [m.id for m in archived.messages] == [f"msg_b_{k}" for k in range(40)]
    assert [m.parts[0].text.text for m in archived.messages] == [
        f"old message {k}" for k in range(40)]
    live = srv.sessions.GetSessionContext(session_pb2.GetSessionContextRequest(session_id="b"))
    assert [m.parts[0].text.text for m in live.current_messages] == ["a new message"]
    again = srv.sessions.AddMessages(session_pb2.AddMessagesRequest(
        session_id="a", messages=[session_pb2.NewMessage(
            role=session_pb2.ROLE_USER, client_message_id="c3",
            parts=[session_pb2.Part(text=session_pb2.TextPart(text="resent"))])]))
    assert again.results[0].duplicate and again.results[0].message.id == "msg_a_3"
