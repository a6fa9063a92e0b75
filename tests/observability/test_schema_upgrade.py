"""Migration 7 (tasks.trace_context) on a store made by the previous release (schema
version 3): the server upgrades it at start, keeps its tasks, and new tasks store
their trace context."""

from __future__ import annotations

import sqlite3
from pathlib import Path

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
