"""The embedded default store: one SQLite file in WAL mode, group-committed writes."""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import uuid
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from sessiond.server.domain.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    LeaseLost,
    NotFound,
    RequestIdConflict,
)
from sessiond.server.domain.values import (
    Archive,
    ArchiveState,
    CommitResult,
    EventKind,
    Identity,
    Memory,
    MemoryCategory,
    MemoryCounts,
    Message,
    NewEvent,
    SessionMeta,
    Stage,
    Task,
    TaskError,
    TaskEvent,
    TaskState,
    ToolPart,
    ToolStatus,
    UsageRecord,
    memory_owner,
    next_stage_after,
)
from sessiond.server.store import codec
from sessiond.server.store.base import (
    ActiveCountsOutput,
    CommitOutcome,
    CommitPlan,
    ExtractionOutput,
    RelationsOutput,
    RequestKey,
    StageOutput,
    Store,
    SummaryOutput,
    SweepResult,
    TaskPage,
)
from sessiond.server.store.rows import RowMapper
from sessiond.server.store.sqlite.db import SqliteDatabase, WriteContext
from sessiond.server.store.sqlite.schema import migrate

Conn = sqlite3.Connection
Row = sqlite3.Row
OPEN_STATES = (TaskState.PENDING.value, TaskState.RUNNING.value)
STAGE_ORDER = {s: i for i, s in enumerate(Stage)}


def _ts(dt: datetime | None) -> float | None:
    return codec.to_epoch(dt)


_ROWS = RowMapper(codec.from_epoch)  # timestamps are epoch seconds


class SqliteStore(Store):
    def __init__(self, data_dir: Path, *, synchronous: str = "FULL",
                 journal_cap: int = 10_000) -> None:
        super().__init__()
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / "sessiond.sqlite3"
        self.journal_cap = journal_cap
        self._db = SqliteDatabase(self.path, synchronous=synchronous)
        self._lock_fd: int | None = None

    @property
    def single_process(self) -> bool:
        return True

    async def open(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock_data_dir()
        self._db.init_sync(migrate)
        self._db.start(self._after_commit)

    def _lock_data_dir(self) -> None:
        """One process per data directory: a second one would release the first
        one's Phase 2 leases at start. The lock dies with the process."""
        fd = os.open(self.data_dir / "sessiond.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise FailedPrecondition(
                f"data directory {self.data_dir} is in use by another sessiond process; "
                "use PostgreSQL to run several processes", reason="DATA_DIR_LOCKED") from exc
        self._lock_fd = fd

    async def close(self) -> None:
        self._db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def ping(self) -> None:
        await self._db.read(lambda c: c.execute("SELECT 1").fetchone())

    def _after_commit(self, ctx: WriteContext) -> None:
        self._emit_events(ctx.events)
        if ctx.work:
            self._emit_work()

    # ------------------------------------------------------------------ helpers
    _meta = staticmethod(_ROWS.meta)
    _message = staticmethod(_ROWS.message)
    _archive = staticmethod(_ROWS.archive)
    _task = staticmethod(_ROWS.task)
    _event = staticmethod(_ROWS.event)
    _memory = staticmethod(_ROWS.memory)

    @staticmethod
    def _session_row(c: Conn, identity: Identity, session_id: str) -> Row | None:
        row: Row | None = c.execute("SELECT * FROM sessions WHERE skey=?",
                                    (codec.session_key(identity, session_id),)).fetchone()
        return row

    def _require_session(self, c: Conn, identity: Identity, session_id: str) -> Row:
        row = self._session_row(c, identity, session_id)
        if row is None:
            raise NotFound(f"session {session_id!r} not found", reason="SESSION_NOT_FOUND",
                           metadata={"session_id": session_id})
        return row

    @staticmethod
    def _replay(c: Conn, request: RequestKey | None) -> Any | None:
        """The stored response of a replayed request, or None for a new one."""
        if request is None:
            return None
        ident = request.identity
        row = c.execute(
            "SELECT fingerprint, response FROM request_ids WHERE account=? AND user_id=? "
            "AND agent=? AND method=? AND request_id=?",
            (ident.account, ident.user, ident.agent, request.method, request.request_id),
        ).fetchone()
        if row is None:
            return None
        if row["fingerprint"] != request.fingerprint:
            raise RequestIdConflict(
                f"request_id {request.request_id!r} was already used for a different "
                f"{request.method} request", metadata={"request_id": request.request_id})
        return json.loads(row["response"])

    @staticmethod
    def _remember(c: Conn, request: RequestKey | None, response: Any, now: datetime) -> None:
        if request is None:
            return
        ident = request.identity
        c.execute("INSERT INTO request_ids VALUES (?,?,?,?,?,?,?,?)",
                  (ident.account, ident.user, ident.agent, request.method, request.request_id,
                   request.fingerprint, codec.dumps(response), _ts(now)))

    def _append_event(self, c: Conn, ctx: WriteContext, task_row: Row, kind: EventKind,
                      state: TaskState, stage: Stage, now: datetime, message: str = "",
                      attempt: int = 0, result: CommitResult | None = None,
                      error: TaskError | None = None,
                      extra_sets: str = "", extra_args: Sequence[Any] = ()) -> TaskEvent:
        seq = task_row["last_seq"] + 1
        task_id = task_row["task_id"]
        c.execute("INSERT INTO task_events VALUES (?,?,?,?,?,?,?,?,?,?)",
                  (task_id, seq, kind.value, _ts(now), state.value, stage.value, message,
                   attempt, codec.encode_result(result), codec.encode_error(error)))
        first_seq = task_row["first_seq"]
        if seq - first_seq + 1 > self.journal_cap:
            first_seq = seq - self.journal_cap + 1
            c.execute("DELETE FROM task_events WHERE task_id=? AND seq<?", (task_id, first_seq))
        sets = "last_seq=?, first_seq=?, state=?, stage=?, updated_at=?"
        c.execute(f"UPDATE tasks SET {sets}{extra_sets} WHERE task_id=?",
                  (seq, first_seq, state.value, stage.value, _ts(now), *extra_args, task_id))
        ev = TaskEvent(task_id=task_id, seq=seq, kind=kind, time=now, state=state, stage=stage,
                       message=message, attempt=attempt, result=result, error=error)
        ctx.events.append(ev)
        return ev

    @staticmethod
    def _task_row(c: Conn, task_id: str) -> Row:
        row: Row | None = c.execute("SELECT * FROM tasks WHERE task_id=?", (task_id,)).fetchone()
        if row is None:
            raise NotFound(f"task {task_id!r} not found", reason="TASK_NOT_FOUND")
        return row

    def _leased_task(self, c: Conn, task_id: str, worker_id: str) -> Row:
        row = self._task_row(c, task_id)
        if row["lease_owner"] != worker_id or row["state"] != TaskState.RUNNING.value:
            raise LeaseLost(f"worker {worker_id} no longer holds task {task_id}")
        return row

    # ------------------------------------------------------------------ sessions
    async def create_session(self, identity: Identity, session_id: str, now: datetime,
                             request: RequestKey | None = None) -> SessionMeta:
        def op(c: Conn, ctx: WriteContext) -> SessionMeta:
            replay = self._replay(c, request)
            if replay is not None:
                row = self._session_row(c, identity, replay["session_id"])
                if row is None:
                    raise NotFound(f"session {replay['session_id']!r} was deleted",
                                   reason="SESSION_NOT_FOUND")
                return self._meta(row)
            if self._session_row(c, identity, session_id) is not None:
                raise AlreadyExists(f"session {session_id!r} already exists",
                                    reason="SESSION_EXISTS", metadata={"session_id": session_id})
            self._insert_session(c, identity, session_id, now)
            self._remember(c, request, {"session_id": session_id}, now)
            return self._meta(self._require_session(c, identity, session_id))

        return await self._db.write(op)

    @staticmethod
    def _insert_session(c: Conn, identity: Identity, session_id: str, now: datetime) -> None:
        c.execute("INSERT INTO sessions(skey, account, user_id, agent, session_id, created_at, "
                  "updated_at) VALUES (?,?,?,?,?,?,?)",
                  (codec.session_key(identity, session_id), identity.account, identity.user,
                   identity.agent, session_id, _ts(now), _ts(now)))

    async def get_session(self, identity: Identity, session_id: str) -> SessionMeta | None:
        def op(c: Conn) -> SessionMeta | None:
            row = self._session_row(c, identity, session_id)
            return None if row is None else self._meta(row)

        return await self._db.read(op)

    async def ensure_session(self, identity: Identity, session_id: str,
                             now: datetime) -> SessionMeta:
        def op(c: Conn, ctx: WriteContext) -> SessionMeta:
            if self._session_row(c, identity, session_id) is None:
                self._insert_session(c, identity, session_id, now)
            return self._meta(self._require_session(c, identity, session_id))

        return await self._db.write(op)

    async def list_sessions(self, identity: Identity, page_size: int,
                            after_session_id: str) -> list[SessionMeta]:
        def op(c: Conn) -> list[SessionMeta]:
            rows = c.execute(
                "SELECT * FROM sessions WHERE account=? AND user_id=? AND agent=? AND "
                "session_id>? ORDER BY session_id LIMIT ?",
                (identity.account, identity.user, identity.agent, after_session_id, page_size),
            ).fetchall()
            return [self._meta(r) for r in rows]

        return await self._db.read(op)

    async def delete_session(self, identity: Identity, session_id: str, now: datetime) -> bool:
        def op(c: Conn, ctx: WriteContext) -> bool:
            skey = codec.session_key(identity, session_id)
            if self._session_row(c, identity, session_id) is None:
                return False
            for row in c.execute("SELECT * FROM tasks WHERE skey=? AND state IN (?,?)",
                                 (skey, *OPEN_STATES)).fetchall():
                err = TaskError(code=1, message="session deleted", reason="SESSION_DELETED")
                self._append_event(c, ctx, row, EventKind.CANCELLED, TaskState.CANCELLED,
                                   Stage(row["stage"]), now, message="session deleted",
                                   error=err, extra_sets=", finished_at=?, error=?, "
                                   "lease_owner='', lease_expires_at=NULL",
                                   extra_args=(_ts(now), codec.encode_error(err)))
            c.execute("DELETE FROM sessions WHERE skey=?", (skey,))
            ctx.work = True
            return True

        return await self._db.write(op)

    # ------------------------------------------------------------------ messages
    async def add_message(self, identity: Identity, session_id: str, message: Message,
                          request: RequestKey | None = None) -> Message:
        def op(c: Conn, ctx: WriteContext) -> Message:
            skey = codec.session_key(identity, session_id)
            replay = self._replay(c, request)
            if replay is not None:
                row = c.execute("SELECT * FROM messages WHERE skey=? AND message_id=?",
                                (skey, replay["message_id"])).fetchone()
                if row is None:
                    raise NotFound("the message of this request_id no longer exists",
                                   reason="MESSAGE_NOT_FOUND")
                return self._message(row)
            bumped = c.execute(
                "UPDATE sessions SET next_seq=next_seq+1, message_count=message_count+1, "
                "live_count=live_count+1, updated_at=? WHERE skey=? RETURNING next_seq",
                (_ts(message.created_at), skey)).fetchone()
            if bumped is None:
                self._require_session(c, identity, session_id)  # raises NotFound
            seq = int(bumped[0]) - 1
            c.execute("INSERT INTO messages VALUES (?,?,?,?,?,?,NULL)",
                      (skey, seq, message.id, message.role.value,
                       codec.encode_parts(message.parts), _ts(message.created_at)))
            self._remember(c, request, {"message_id": message.id}, message.created_at)
            return Message(id=message.id, role=message.role, parts=message.parts,
                           created_at=message.created_at, seq=seq)

        return await self._db.write(op)

    async def update_tool_part(self, identity: Identity, session_id: str, message_id: str,
                               tool_id: str, output: str, status: ToolStatus,
                               now: datetime) -> Message:
        def op(c: Conn, ctx: WriteContext) -> Message:
            skey = codec.session_key(identity, session_id)
            self._require_session(c, identity, session_id)
            row = c.execute("SELECT * FROM messages WHERE skey=? AND message_id=?",
                            (skey, message_id)).fetchone()
            if row is None:
                raise NotFound(f"message {message_id!r} not found in session {session_id!r}",
                               reason="MESSAGE_NOT_FOUND")
            if row["archive_index"] is not None:
                raise FailedPrecondition(
                    f"message {message_id!r} was archived by commit {row['archive_index']}; "
                    "archived messages are immutable", reason="MESSAGE_ARCHIVED")
            msg = self._message(row)
            parts = list(msg.parts)
            for i, p in enumerate(parts):
                if isinstance(p, ToolPart) and p.tool_id == tool_id:
                    parts[i] = ToolPart(**{**_tool_fields(p), "output": output, "status": status})
                    break
            else:
                raise NotFound(f"tool part {tool_id!r} not found in message {message_id!r}",
                               reason="TOOL_PART_NOT_FOUND")
            c.execute("UPDATE messages SET parts=? WHERE skey=? AND message_id=?",
                      (codec.encode_parts(parts), skey, message_id))
            c.execute("UPDATE sessions SET updated_at=? WHERE skey=?", (_ts(now), skey))
            return Message(id=msg.id, role=msg.role, parts=tuple(parts),
                           created_at=msg.created_at, seq=msg.seq)

        return await self._db.write(op)

    async def list_live_messages(self, identity: Identity, session_id: str,
                                 newest: int = 0) -> list[Message]:
        def op(c: Conn) -> list[Message]:
            self._require_session(c, identity, session_id)
            skey = codec.session_key(identity, session_id)
            if newest > 0:
                rows = c.execute("SELECT * FROM messages WHERE skey=? AND archive_index IS NULL "
                                 "ORDER BY seq DESC LIMIT ?", (skey, newest)).fetchall()
                rows.reverse()
            else:
                rows = c.execute("SELECT * FROM messages WHERE skey=? AND archive_index IS NULL "
                                 "ORDER BY seq", (skey,)).fetchall()
            return [self._message(r) for r in rows]

        return await self._db.read(op)

    async def record_usage(self, identity: Identity, session_id: str, usage: UsageRecord,
                           request: RequestKey | None = None) -> int:
        def op(c: Conn, ctx: WriteContext) -> int:
            skey = codec.session_key(identity, session_id)
            replay = self._replay(c, request)
            if replay is None:
                self._require_session(c, identity, session_id)
                contexts, skill = codec.encode_usage(usage)
                c.execute("INSERT INTO usage(skey, context_uris, skill, created_at) "
                          "VALUES (?,?,?,?)", (skey, contexts, skill, _ts(usage.created_at)))
                c.execute("UPDATE sessions SET updated_at=? WHERE skey=?",
                          (_ts(usage.created_at), skey))
                self._remember(c, request, {}, usage.created_at)
            row = c.execute("SELECT COUNT(*) FROM usage WHERE skey=? AND archive_index IS NULL",
                            (skey,)).fetchone()
            return int(row[0])

        return await self._db.write(op)

    # ------------------------------------------------------------------ commit
    async def commit(self, plan: CommitPlan, request: RequestKey | None = None) -> CommitOutcome:
        def op(c: Conn, ctx: WriteContext) -> CommitOutcome:
            identity, sid, now = plan.identity, plan.session_id, plan.now
            skey = codec.session_key(identity, sid)
            replay = self._replay(c, request)
            if replay is not None:
                if not replay["archived"]:
                    return CommitOutcome(archived=False)
                task = self._task_row(c, replay["task_id"])
                arow = c.execute("SELECT * FROM archives WHERE skey=? AND idx=?",
                                 (skey, task["archive_index"])).fetchone()
                if arow is None:
                    raise NotFound("the archive of this request_id no longer exists",
                                   reason="ARCHIVE_NOT_FOUND")
                return CommitOutcome(True, self._archive(arow), self._task(task))
            srow = self._require_session(c, identity, sid)
            if plan.reject_if_running:
                busy = c.execute("SELECT task_id FROM tasks WHERE skey=? AND state IN (?,?) "
                                 "ORDER BY archive_index LIMIT 1", (skey, *OPEN_STATES)).fetchone()
                if busy is not None:
                    raise Aborted(f"Phase 2 of an earlier commit of session {sid!r} is still "
                                  f"running (task {busy['task_id']})", reason="COMMIT_IN_PROGRESS",
                                  metadata={"task_id": busy["task_id"]})
            live = c.execute("SELECT seq, message_id FROM messages WHERE skey=? AND "
                             "archive_index IS NULL ORDER BY seq", (skey,)).fetchall()
            keep = max(0, plan.keep_recent_count)
            to_archive = live[: max(0, len(live) - keep)]
            if not to_archive:
                self._remember(c, request, {"archived": False}, now)
                return CommitOutcome(archived=False)
            index = srow["archive_count"] + 1
            last_seq = to_archive[-1]["seq"]
            c.execute("UPDATE messages SET archive_index=? WHERE skey=? AND archive_index IS NULL "
                      "AND seq<=?", (index, skey, last_seq))
            c.execute("UPDATE usage SET archive_index=? WHERE skey=? AND archive_index IS NULL",
                      (index, skey))
            c.execute("INSERT INTO archives(skey, idx, session_id, task_id, state, message_count, "
                      "first_message_id, last_message_id, created_at) VALUES (?,?,?,?,?,?,?,?,?)",
                      (skey, index, sid, plan.task_id, ArchiveState.PENDING.value,
                       len(to_archive), to_archive[0]["message_id"],
                       to_archive[-1]["message_id"], _ts(now)))
            c.execute("UPDATE sessions SET archive_count=?, live_count=live_count-?, updated_at=? "
                      "WHERE skey=?", (index, len(to_archive), _ts(now), skey))
            c.execute("INSERT INTO tasks(task_id, skey, account, user_id, agent, session_id, "
                      "archive_index, task_type, state, stage, done_stage, created_at, "
                      "updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                      (plan.task_id, skey, identity.account, identity.user, identity.agent, sid,
                       index, "session_commit", TaskState.PENDING.value, Stage.QUEUED.value,
                       Stage.QUEUED.value, _ts(now), _ts(now)))
            trow = self._task_row(c, plan.task_id)
            self._append_event(c, ctx, trow, EventKind.CREATED, TaskState.PENDING, Stage.QUEUED,
                               now, message=f"archive {index} of {len(to_archive)} messages")
            self._remember(c, request, {"archived": True, "task_id": plan.task_id}, now)
            ctx.work = True
            arow = c.execute("SELECT * FROM archives WHERE skey=? AND idx=?",
                             (skey, index)).fetchone()
            return CommitOutcome(True, self._archive(arow),
                                 self._task(self._task_row(c, plan.task_id)))

        return await self._db.write(op)

    # ------------------------------------------------------------------ archives
    async def list_archives(self, identity: Identity, session_id: str, page_size: int,
                            after_index: int) -> list[Archive]:
        def op(c: Conn) -> list[Archive]:
            self._require_session(c, identity, session_id)
            rows = c.execute("SELECT * FROM archives WHERE skey=? AND idx>? ORDER BY idx LIMIT ?",
                             (codec.session_key(identity, session_id), after_index,
                              page_size)).fetchall()
            return [self._archive(r) for r in rows]

        return await self._db.read(op)

    async def get_archive(self, identity: Identity, session_id: str,
                          index: int) -> Archive | None:
        def op(c: Conn) -> Archive | None:
            row = c.execute("SELECT * FROM archives WHERE skey=? AND idx=?",
                            (codec.session_key(identity, session_id), index)).fetchone()
            return None if row is None else self._archive(row)

        return await self._db.read(op)


    async def archive_messages(self, identity: Identity, session_id: str,
                               index: int) -> list[Message]:
        def op(c: Conn) -> list[Message]:
            rows = c.execute("SELECT * FROM messages WHERE skey=? AND archive_index=? ORDER BY seq",
                             (codec.session_key(identity, session_id), index)).fetchall()
            return [self._message(r) for r in rows]

        return await self._db.read(op)

    async def archive_usage(self, identity: Identity, session_id: str,
                            index: int) -> list[UsageRecord]:
        def op(c: Conn) -> list[UsageRecord]:
            rows = c.execute("SELECT * FROM usage WHERE skey=? AND archive_index=? ORDER BY id",
                             (codec.session_key(identity, session_id), index)).fetchall()
            return [codec.decode_usage(r["context_uris"], r["skill"],
                                       codec.from_epoch_req(r["created_at"])) for r in rows]

        return await self._db.read(op)

    async def latest_done_archive(self, identity: Identity, session_id: str,
                                  before_index: int | None = None) -> Archive | None:
        def op(c: Conn) -> Archive | None:
            bound = before_index if before_index is not None else 2**62
            row = c.execute("SELECT * FROM archives WHERE skey=? AND state=? AND idx<? "
                            "ORDER BY idx DESC LIMIT 1",
                            (codec.session_key(identity, session_id), ArchiveState.DONE.value,
                             bound)).fetchone()
            return None if row is None else self._archive(row)

        return await self._db.read(op)

    # ------------------------------------------------------------------ tasks: reading
    async def get_task(self, task_id: str) -> Task | None:
        def op(c: Conn) -> Task | None:
            row = c.execute("SELECT * FROM tasks WHERE task_id=?", (task_id,)).fetchone()
            return None if row is None else self._task(row)

        return await self._db.read(op)

    async def list_tasks(self, identity: Identity, session_id: str, state: TaskState | None,
                         task_type: str, page_size: int, page_token: str) -> TaskPage:
        def op(c: Conn) -> TaskPage:
            where = ["account=?", "user_id=?", "agent=?"]
            args: list[Any] = [identity.account, identity.user, identity.agent]
            if session_id:
                where.append("session_id=?")
                args.append(session_id)
            if state is not None:
                where.append("state=?")
                args.append(state.value)
            if task_type:
                where.append("task_type=?")
                args.append(task_type)
            if page_token:
                created, tid = codec.decode_task_token(page_token)
                where.append("(created_at<? OR (created_at=? AND task_id<?))")
                args += [created, created, tid]
            rows = c.execute(f"SELECT * FROM tasks WHERE {' AND '.join(where)} "
                             "ORDER BY created_at DESC, task_id DESC LIMIT ?",
                             (*args, page_size + 1)).fetchall()
            tasks = [self._task(r) for r in rows[:page_size]]
            token = ""
            if len(rows) > page_size:
                last = rows[page_size - 1]
                token = codec.encode_task_token(last["created_at"], last["task_id"])
            return TaskPage(tasks, token)

        return await self._db.read(op)

    async def list_events(self, task_id: str, after_seq: int, limit: int = 1000) -> list[TaskEvent]:
        def op(c: Conn) -> list[TaskEvent]:
            rows = c.execute("SELECT * FROM task_events WHERE task_id=? AND seq>? ORDER BY seq "
                             "LIMIT ?", (task_id, after_seq, limit)).fetchall()
            return [self._event(r) for r in rows]

        return await self._db.read(op)

    # ------------------------------------------------------------------ tasks: control
    async def request_cancel(self, task_id: str, now: datetime) -> Task:
        def op(c: Conn, ctx: WriteContext) -> Task:
            row = self._task_row(c, task_id)
            state = TaskState(row["state"])
            if state is TaskState.PENDING:
                err = TaskError(code=1, message="cancelled before Phase 2 started",
                                reason="CANCELLED")
                self._append_event(c, ctx, row, EventKind.CANCELLED, TaskState.CANCELLED,
                                   Stage(row["stage"]), now, message="cancelled by request",
                                   error=err,
                                   extra_sets=", finished_at=?, error=?, cancel_requested=1",
                                   extra_args=(_ts(now), codec.encode_error(err)))
                ctx.work = True
            elif state is TaskState.RUNNING and not row["cancel_requested"]:
                self._append_event(c, ctx, row, EventKind.CANCEL_REQUESTED, TaskState.RUNNING,
                                   Stage(row["stage"]), now,
                                   message="cancel requested; stopping at the next stage boundary",
                                   extra_sets=", cancel_requested=1")
            return self._task(self._task_row(c, task_id))

        return await self._db.write(op)

    # ------------------------------------------------------------------ tasks: worker side
    async def claim_task(self, worker_id: str, now: datetime, lease_until: datetime,
                         announce: bool = False) -> Task | None:
        def op(c: Conn, ctx: WriteContext) -> Task | None:
            row = c.execute(
                "SELECT t.* FROM tasks t WHERE t.state IN (?,?) "
                "AND (t.lease_expires_at IS NULL OR t.lease_expires_at<?) "
                "AND NOT EXISTS (SELECT 1 FROM tasks p WHERE p.skey=t.skey "
                "  AND p.archive_index<t.archive_index AND p.state IN (?,?)) "
                "ORDER BY t.created_at, t.task_id LIMIT 1",
                (*OPEN_STATES, _ts(now), *OPEN_STATES)).fetchone()
            if row is None:
                return None
            attempt = row["attempts"] + 1
            resumed = row["done_stage"] != Stage.QUEUED.value or row["attempts"] > 0
            msg = (f"resumed after {row['done_stage']} (attempt {attempt})" if resumed
                   else "Phase 2 started")
            self._append_event(c, ctx, row, EventKind.STARTED, TaskState.RUNNING,
                               Stage(row["stage"]), now, message=msg, attempt=attempt,
                               extra_sets=", attempts=?, lease_owner=?, lease_expires_at=?, "
                               "started_at=COALESCE(started_at, ?)",
                               extra_args=(attempt, worker_id, _ts(lease_until), _ts(now)))
            after = self._task_row(c, row["task_id"])
            if announce and not row["cancel_requested"]:
                first = next_stage_after(Stage(row["done_stage"]))
                self._append_event(c, ctx, after, EventKind.STAGE_STARTED, TaskState.RUNNING,
                                   first, now, message=f"{first.value} started")
                after = self._task_row(c, row["task_id"])
            return self._task(after)

        return await self._db.write(op)

    async def renew_lease(self, task_id: str, worker_id: str, lease_until: datetime) -> bool:
        def op(c: Conn, ctx: WriteContext) -> bool:
            cur = c.execute("UPDATE tasks SET lease_expires_at=? WHERE task_id=? AND lease_owner=? "
                            "AND state=?", (_ts(lease_until), task_id, worker_id,
                                           TaskState.RUNNING.value))
            return cur.rowcount == 1

        return await self._db.write(op)

    async def release_all_leases(self) -> int:
        def op(c: Conn, ctx: WriteContext) -> int:
            cur = c.execute("UPDATE tasks SET lease_owner='', lease_expires_at=NULL "
                            "WHERE state IN (?,?) AND lease_owner!=''", OPEN_STATES)
            ctx.work = cur.rowcount > 0
            return cur.rowcount

        return await self._db.write(op)

    async def append_event(self, task_id: str, worker_id: str, event: NewEvent, stage: Stage,
                           now: datetime) -> TaskEvent:
        def op(c: Conn, ctx: WriteContext) -> TaskEvent:
            row = self._leased_task(c, task_id, worker_id)
            return self._append_event(c, ctx, row, event.kind, TaskState.RUNNING, stage, now,
                                      message=event.message, attempt=event.attempt)

        return await self._db.write(op)

    def _last_event(self, c: Conn, task_id: str) -> TaskEvent:
        row = c.execute("SELECT * FROM task_events WHERE task_id=? ORDER BY seq DESC LIMIT 1",
                        (task_id,)).fetchone()
        return self._event(row)

    async def complete_stage(self, task_id: str, worker_id: str, stage: Stage,
                             output: StageOutput, now: datetime,
                             next_stage: Stage | None = None) -> TaskEvent:
        def op(c: Conn, ctx: WriteContext) -> TaskEvent:
            row = self._leased_task(c, task_id, worker_id)
            if STAGE_ORDER[Stage(row["done_stage"])] >= STAGE_ORDER[stage]:
                return self._last_event(c, task_id)
            task = self._task(row)
            skey = row["skey"]
            extra = ", done_stage=?"
            args: list[Any] = [stage.value]
            detail = ""
            if isinstance(output, SummaryOutput):
                c.execute("UPDATE archives SET overview=?, abstract=? WHERE skey=? AND idx=?",
                          (output.overview, output.abstract, skey, task.archive_index))
                extra += ", prompt_tokens=prompt_tokens+?, completion_tokens=completion_tokens+?"
                args += [output.usage.prompt_tokens, output.usage.completion_tokens]
                detail = f"overview of {len(output.overview)} chars"
            elif isinstance(output, ExtractionOutput):
                counts = self._store_memories(c, task, output, now)
                extra += (", memory_counts=?, prompt_tokens=prompt_tokens+?, "
                          "completion_tokens=completion_tokens+?")
                args += [codec.encode_counts(counts), output.usage.prompt_tokens,
                         output.usage.completion_tokens]
                detail = f"{counts.total} memories"
            elif isinstance(output, RelationsOutput):
                for uri in dict.fromkeys(output.uris):
                    c.execute("INSERT OR IGNORE INTO relations VALUES (?,?,?)",
                              (skey, uri, _ts(now)))
                detail = f"{len(set(output.uris))} relations"
            elif isinstance(output, ActiveCountsOutput):
                uris = list(dict.fromkeys(output.uris))
                for uri in uris:
                    c.execute("INSERT INTO active_counts VALUES (?,1,?) ON CONFLICT(uri) DO "
                              "UPDATE SET active_count=active_count+1, "
                              "updated_at=excluded.updated_at",
                              (uri, _ts(now)))
                extra += ", active_count_updated=?"
                args.append(len(uris))
                detail = f"{len(uris)} active counts updated"
            done = self._append_event(c, ctx, row, EventKind.STAGE_COMPLETED, TaskState.RUNNING,
                                      stage, now, message=f"{stage.value} done: {detail}",
                                      extra_sets=extra, extra_args=args)
            if next_stage is None:
                return done
            after = self._task_row(c, task_id)
            if row["cancel_requested"]:
                err = TaskError(code=1, message=f"cancelled by request after {stage.value}",
                                reason="CANCELLED")
                ctx.work = True
                return self._append_event(
                    c, ctx, after, EventKind.CANCELLED, TaskState.CANCELLED, stage, now,
                    message=err.message, error=err,
                    extra_sets=", error=?, finished_at=?, lease_owner='', lease_expires_at=NULL",
                    extra_args=(codec.encode_error(err), _ts(now)))
            return self._append_event(c, ctx, after, EventKind.STAGE_STARTED, TaskState.RUNNING,
                                      next_stage, now, message=f"{next_stage.value} started")

        return await self._db.write(op)

    def _store_memories(self, c: Conn, task: Task, output: ExtractionOutput,
                        now: datetime) -> MemoryCounts:
        seen: set[tuple[MemoryCategory, str]] = set()
        per: dict[str, int] = {}
        for cand in output.candidates:
            if (cand.category, cand.key) in seen:
                continue
            seen.add((cand.category, cand.key))
            owner = memory_owner(task.identity, cand.category)
            row = c.execute("SELECT * FROM memories WHERE account=? AND user_id=? AND agent=? "
                            "AND category=? AND mkey=?",
                            (owner.account, owner.user, owner.agent, cand.category.value,
                             cand.key)).fetchone()
            if row is None:
                memory_id = f"mem_{uuid.uuid4().hex}"
                c.execute("INSERT INTO memories VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                          (memory_id, owner.account, owner.user, owner.agent, cand.category.value,
                           cand.key, cand.content, task.session_id, task.archive_uri,
                           codec.dumps(list(cand.source_message_ids)), _ts(now), _ts(now)))
                c.execute("INSERT INTO memories_fts(content, memory_id) VALUES (?,?)",
                          (cand.content, memory_id))
            else:
                memory_id = row["memory_id"]
                content = codec.merge_content(cand.category, row["content"], cand.content)
                ids = list(dict.fromkeys([*json.loads(row["source_message_ids"]),
                                          *cand.source_message_ids]))
                c.execute("UPDATE memories SET content=?, source_session_id=?, "
                          "source_archive_uri=?, source_message_ids=?, updated_at=? "
                          "WHERE memory_id=?",
                          (content, task.session_id, task.archive_uri, codec.dumps(ids), _ts(now),
                           memory_id))
                c.execute("DELETE FROM memories_fts WHERE memory_id=?", (memory_id,))
                c.execute("INSERT INTO memories_fts(content, memory_id) VALUES (?,?)",
                          (content, memory_id))
            per[cand.category.value] = per.get(cand.category.value, 0) + 1
        return MemoryCounts.from_dict(per)

    async def finalize_task(self, task_id: str, worker_id: str, now: datetime) -> TaskEvent:
        def op(c: Conn, ctx: WriteContext) -> TaskEvent:
            row = self._leased_task(c, task_id, worker_id)
            task = self._task(row)
            skey = row["skey"]
            cur = c.execute("UPDATE archives SET state=?, completed_at=? WHERE skey=? AND idx=? "
                            "AND state=?", (ArchiveState.DONE.value, _ts(now), skey,
                                            task.archive_index, ArchiveState.PENDING.value))
            if cur.rowcount != 1:
                raise FailedPrecondition(f"archive {task.archive_uri} is missing or already done",
                                         reason="ARCHIVE_NOT_PENDING")
            counts = codec.decode_counts(row["memory_counts"])
            srow = c.execute("SELECT memory_counts FROM sessions WHERE skey=?", (skey,)).fetchone()
            if srow is not None:
                total = codec.decode_counts(srow["memory_counts"]) + counts
                c.execute("UPDATE sessions SET commit_count=commit_count+1, last_commit_at=?, "
                          "memory_counts=?, prompt_tokens=prompt_tokens+?, "
                          "completion_tokens=completion_tokens+?, updated_at=? WHERE skey=?",
                          (_ts(now), codec.encode_counts(total), task.token_usage.prompt_tokens,
                           task.token_usage.completion_tokens, _ts(now), skey))
            result = CommitResult(archive_uri=task.archive_uri, memories_extracted=counts,
                                  active_count_updated=row["active_count_updated"],
                                  token_usage=task.token_usage)
            ctx.work = True
            return self._append_event(
                c, ctx, row, EventKind.COMPLETED, TaskState.COMPLETED, Stage.FINALIZE, now,
                message="Phase 2 completed", result=result,
                extra_sets=", done_stage=?, result=?, finished_at=?, lease_owner='', "
                "lease_expires_at=NULL",
                extra_args=(Stage.FINALIZE.value, codec.encode_result(result), _ts(now)))

        return await self._db.write(op)

    async def fail_task(self, task_id: str, worker_id: str | None, error: TaskError,
                        now: datetime) -> TaskEvent:
        def op(c: Conn, ctx: WriteContext) -> TaskEvent:
            row = (self._leased_task(c, task_id, worker_id) if worker_id is not None
                   else self._task_row(c, task_id))
            if TaskState(row["state"]).terminal:
                return self._last_event(c, task_id)
            ctx.work = True
            return self._append_event(
                c, ctx, row, EventKind.FAILED, TaskState.FAILED, Stage(row["stage"]), now,
                message=error.message, error=error,
                extra_sets=", error=?, finished_at=?, lease_owner='', lease_expires_at=NULL",
                extra_args=(codec.encode_error(error), _ts(now)))

        return await self._db.write(op)

    async def cancel_task(self, task_id: str, worker_id: str, now: datetime) -> TaskEvent:
        def op(c: Conn, ctx: WriteContext) -> TaskEvent:
            row = self._leased_task(c, task_id, worker_id)
            err = TaskError(code=1, message=f"cancelled by request after {row['done_stage']}",
                            reason="CANCELLED")
            ctx.work = True
            return self._append_event(
                c, ctx, row, EventKind.CANCELLED, TaskState.CANCELLED, Stage(row["stage"]), now,
                message=err.message, error=err,
                extra_sets=", error=?, finished_at=?, lease_owner='', lease_expires_at=NULL",
                extra_args=(codec.encode_error(err), _ts(now)))

        return await self._db.write(op)

    # ------------------------------------------------------------------ Phase 2 reads
    async def task_memory_counts(self, task_id: str) -> MemoryCounts:
        def op(c: Conn) -> MemoryCounts:
            return codec.decode_counts(self._task_row(c, task_id)["memory_counts"])

        return await self._db.read(op)

    async def active_count(self, uri: str) -> int:
        def op(c: Conn) -> int:
            row = c.execute("SELECT active_count FROM active_counts WHERE uri=?",
                            (uri,)).fetchone()
            return 0 if row is None else int(row[0])

        return await self._db.read(op)

    async def session_relations(self, identity: Identity, session_id: str) -> list[str]:
        def op(c: Conn) -> list[str]:
            rows = c.execute("SELECT uri FROM relations WHERE skey=? ORDER BY uri",
                             (codec.session_key(identity, session_id),)).fetchall()
            return [str(r[0]) for r in rows]

        return await self._db.read(op)

    # ------------------------------------------------------------------ memories
    _VISIBLE = "account=? AND user_id=? AND (agent='' OR agent=?)"

    async def list_memories(self, identity: Identity, category: MemoryCategory | None,
                            page_size: int, after_memory_id: str) -> list[Memory]:
        def op(c: Conn) -> list[Memory]:
            sql = f"SELECT * FROM memories WHERE {self._VISIBLE} AND memory_id>?"
            args: list[Any] = [identity.account, identity.user, identity.agent, after_memory_id]
            if category is not None:
                sql += " AND category=?"
                args.append(category.value)
            rows = c.execute(sql + " ORDER BY memory_id LIMIT ?", (*args, page_size)).fetchall()
            return [self._memory(r) for r in rows]

        return await self._db.read(op)

    async def get_memory(self, identity: Identity, memory_id: str) -> Memory | None:
        def op(c: Conn) -> Memory | None:
            row = c.execute(f"SELECT * FROM memories WHERE {self._VISIBLE} AND memory_id=?",
                            (identity.account, identity.user, identity.agent,
                             memory_id)).fetchone()
            return None if row is None else self._memory(row)

        return await self._db.read(op)

    async def search_memories(self, identity: Identity, query: str,
                              category: MemoryCategory | None,
                              limit: int) -> list[tuple[Memory, float]]:
        terms = codec.search_terms(query)
        if not terms:
            return []
        match = " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)

        def op(c: Conn) -> list[tuple[Memory, float]]:
            sql = ("SELECT m.*, bm25(memories_fts) AS rank FROM memories_fts "
                   "JOIN memories m ON m.memory_id = memories_fts.memory_id "
                   "WHERE memories_fts MATCH ? AND m.account=? AND m.user_id=? "
                   "AND (m.agent='' OR m.agent=?)")
            args: list[Any] = [match, identity.account, identity.user, identity.agent]
            if category is not None:
                sql += " AND m.category=?"
                args.append(category.value)
            rows = c.execute(sql + " ORDER BY rank, m.memory_id LIMIT ?",
                             (*args, limit)).fetchall()
            return [(self._memory(r), float(-r["rank"])) for r in rows]

        return await self._db.read(op)

    async def delete_memory(self, identity: Identity, memory_id: str) -> bool:
        def op(c: Conn, ctx: WriteContext) -> bool:
            cur = c.execute(f"DELETE FROM memories WHERE {self._VISIBLE} AND memory_id=?",
                            (identity.account, identity.user, identity.agent, memory_id))
            if cur.rowcount:
                c.execute("DELETE FROM memories_fts WHERE memory_id=?", (memory_id,))
            return cur.rowcount == 1

        return await self._db.write(op)

    # ------------------------------------------------------------------ retention
    async def sweep(self, now: datetime, completed_before: datetime, failed_before: datetime,
                    max_tasks: int, request_ids_before: datetime) -> SweepResult:
        def op(c: Conn, ctx: WriteContext) -> SweepResult:
            removed = c.execute(
                "DELETE FROM tasks WHERE (state IN (?,?) AND finished_at<?) OR "
                "(state=? AND finished_at<?)",
                (TaskState.COMPLETED.value, TaskState.CANCELLED.value, _ts(completed_before),
                 TaskState.FAILED.value, _ts(failed_before))).rowcount
            total = c.execute("SELECT COUNT(*) FROM tasks").fetchone()[0]
            if total > max_tasks:
                removed += c.execute(
                    "DELETE FROM tasks WHERE task_id IN (SELECT task_id FROM tasks "
                    "WHERE state IN (?,?,?) ORDER BY finished_at LIMIT ?)",
                    (TaskState.COMPLETED.value, TaskState.CANCELLED.value,
                     TaskState.FAILED.value, total - max_tasks)).rowcount
            rids = c.execute("DELETE FROM request_ids WHERE created_at<?",
                             (_ts(request_ids_before),)).rowcount
            return SweepResult(tasks_removed=removed, request_ids_removed=rids)

        return await self._db.write(op)


def _tool_fields(p: ToolPart) -> dict[str, Any]:
    return {f: getattr(p, f) for f in ToolPart.__dataclass_fields__}
