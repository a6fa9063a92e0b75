"""Auto-commit with two `sessiond serve` replicas on one PostgreSQL database: each
condition commits exactly once, whichever replica sees it first.

By message count: writers append to the same sessions through both replicas at once
(AddMessage with and without request ids: the one-statement path and the full
transaction), with a policy of 5 messages; 100 messages per session must give exactly
20 archives of exactly 5 messages and nothing left live (a double commit would leave
a smaller archive or an extra task, a missed one live messages).

By idle time: both replicas run with `--auto-commit-idle 1` (the server default) and
scan for due sessions; every session with messages gets exactly one IDLE commit.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from pathlib import Path

import pytest
from sessiond.v1 import session_pb2, task_pb2

from tests.pg import temporary_database
from tests.replicas.helpers import (
    FailoverClient,
    closing_all,
    migrate,
    sql,
    start_replicas,
    text_part,
    wait_until,
)

pytestmark = pytest.mark.postgres

S, K = session_pb2, task_pb2
SESSIONS = 4
WRITERS = 4
PER_WRITER = 25  # per session
POLICY = 5


def test_count_trigger_commits_exactly_once_across_replicas(tmp_path: Path) -> None:
    with temporary_database("sessiond_ac_count") as url:
        migrate(url)
        servers = start_replicas(tmp_path, url, 2)
        with closing_all(servers):
            stubs = [s.stubs() for s in servers]
            client = FailoverClient(stubs)
            sids = [f"s{i}" for i in range(SESSIONS)]
            for i, sid in enumerate(sids):
                stubs[i % 2].sessions.CreateSession(S.CreateSessionRequest(session_id=sid))
                meta = stubs[(i + 1) % 2].sessions.UpdateSessionConfig(
                    S.UpdateSessionConfigRequest(session_id=sid, auto_commit=S.AutoCommitPolicy(
                        max_messages=POLICY)))
                assert meta.auto_commit.max_messages == POLICY
            errors: list[BaseException] = []

            def writer(w: int) -> None:
                rng = random.Random(w)
                try:
                    for n in range(PER_WRITER):
                        for sid in sids:
                            req = S.AddMessageRequest(
                                session_id=sid, role=S.ROLE_USER,
                                parts=[text_part(f"writer {w} message {n}")],
                                request_id=uuid.uuid4().hex if n % 2 else "")
                            client.call(rng, "AddMessage", req)
                except BaseException as exc:  # reported in the test's thread
                    errors.append(exc)

            threads = [threading.Thread(target=writer, args=(w,)) for w in range(WRITERS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert not errors, errors[0]
            total = WRITERS * PER_WRITER
            for sid in sids:
                archives = sql(url, "SELECT idx, message_count FROM archives WHERE "
                                    "session_id=$1 ORDER BY idx", sid)
                assert [a["message_count"] for a in archives] == [POLICY] * (total // POLICY)
                assert [a["idx"] for a in archives] == list(range(1, total // POLICY + 1))
                tasks = sql(url, "SELECT commit_trigger FROM tasks WHERE session_id=$1", sid)
                assert [t["commit_trigger"] for t in tasks] == ["messages"] * (total // POLICY)
                live = stubs[0].sessions.GetSession(S.GetSessionRequest(session_id=sid))
                assert live.live_message_count == 0 and live.message_count == total
            counts = sql(url, "SELECT COUNT(*) AS n FROM messages WHERE archive_index IS NULL")
            assert counts[0]["n"] == 0
            # Phase 2 of every auto-commit ran to the end, once
            wait_until(lambda: sql(url, "SELECT COUNT(*) AS n FROM tasks WHERE state<>"
                                        "'completed'")[0]["n"] == 0, 120, "Phase 2 done")
            done = sql(url, "SELECT COUNT(*) AS n FROM archives WHERE state='done'")[0]["n"]
            assert done == SESSIONS * total // POLICY
            for s in stubs:
                s.close()


def test_idle_trigger_commits_exactly_once_across_replicas(tmp_path: Path) -> None:
    with temporary_database("sessiond_ac_idle") as url:
        migrate(url)
        servers = start_replicas(tmp_path, url, 2, extra=["--auto-commit-idle", "1"])
        with closing_all(servers):
            stubs = [s.stubs() for s in servers]
            sids = [f"idle{i}" for i in range(12)]
            for i, sid in enumerate(sids):
                meta = stubs[i % 2].sessions.CreateSession(S.CreateSessionRequest(session_id=sid))
                assert meta.auto_commit_inherited and meta.auto_commit.idle_seconds == 1
                for n in range(3):
                    stubs[(i + n) % 2].sessions.AddMessage(S.AddMessageRequest(
                        session_id=sid, role=S.ROLE_USER, parts=[text_part(f"m{n}")]))
            wait_until(lambda: sql(url, "SELECT COUNT(*) AS n FROM tasks")[0]["n"] >= len(sids),
                       30, "idle commits")
            time.sleep(3.0)  # both replicas scanned several more times
            rows = sql(url, "SELECT session_id, commit_trigger FROM tasks ORDER BY session_id")
            assert sorted(r["session_id"] for r in rows) == sorted(sids)
            assert {r["commit_trigger"] for r in rows} == {"idle"}
            for sid in sids:
                (arch,) = stubs[1].sessions.ListArchives(
                    S.ListArchivesRequest(session_id=sid)).archives
                assert arch.message_count == 3
                (task,) = stubs[0].tasks.ListTasks(K.ListTasksRequest(session_id=sid)).tasks
                assert task.commit_trigger == K.COMMIT_TRIGGER_IDLE
            for s in stubs:
                s.close()
