"""Domain values from table rows, shared by every backend.

Both schemas use the same column names; only timestamps differ (epoch seconds in
SQLite, TIMESTAMPTZ in PostgreSQL), so each adapter builds one `RowMapper` with its
timestamp decoder.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sessiond.server.domain.autocommit import AutoCommitPolicy, CommitTrigger
from sessiond.server.domain.values import (
    ApiKey,
    Archive,
    ArchiveState,
    EventKind,
    Identity,
    Memory,
    MemoryCategory,
    Message,
    Role,
    SessionMeta,
    Stage,
    Task,
    TaskEvent,
    TaskState,
    TokenUsage,
    UsageRecord,
)
from sessiond.server.store import codec
from sessiond.server.store.sql.tx import Row


def own_policy(row: Row) -> AutoCommitPolicy | None:
    """The session row's own auto-commit policy (None: the server default applies)."""
    if row["ac_messages"] is None:
        return None
    return AutoCommitPolicy(int(row["ac_messages"]), int(row["ac_tokens"]),
                            int(row["ac_idle"]), int(row["ac_keep"]))


class RowMapper:
    def __init__(self, timestamp: Callable[[Any], datetime | None]) -> None:
        self._ts = timestamp

    def _req(self, value: Any) -> datetime:
        dt = self._ts(value)
        if dt is None:
            raise ValueError("a required timestamp column is NULL")
        return dt

    def ts(self, value: Any) -> datetime:
        """A required timestamp column's value as a datetime."""
        return self._req(value)

    def meta(self, row: Row) -> SessionMeta:
        return SessionMeta(
            identity=Identity(row["account"], row["user_id"], row["agent"]),
            session_id=row["session_id"],
            created_at=self._req(row["created_at"]), updated_at=self._req(row["updated_at"]),
            message_count=row["message_count"], live_message_count=row["live_count"],
            archive_count=row["archive_count"], commit_count=row["commit_count"],
            memories_extracted=codec.decode_counts(row["memory_counts"]),
            last_commit_at=self._ts(row["last_commit_at"]),
            llm_token_usage=TokenUsage(row["prompt_tokens"], row["completion_tokens"]),
            auto_commit=own_policy(row), auto_commit_inherited=row["ac_messages"] is None,
            last_event_seq=int(row["event_seq"]))

    def message(self, row: Row) -> Message:
        return Message(id=row["message_id"], role=Role(row["role"]),
                       parts=codec.decode_parts(row["parts"]),
                       created_at=self._req(row["created_at"]), seq=row["seq"],
                       client_message_id=row["client_message_id"] or "")

    def archive(self, row: Row) -> Archive:
        return Archive(session_id=row["session_id"], index=row["idx"],
                       state=ArchiveState(row["state"]), task_id=row["task_id"],
                       message_count=row["message_count"],
                       created_at=self._req(row["created_at"]),
                       overview=row["overview"], abstract=row["abstract"],
                       first_message_id=row["first_message_id"],
                       last_message_id=row["last_message_id"],
                       completed_at=self._ts(row["completed_at"]))

    def task(self, row: Row) -> Task:
        return Task(
            task_id=row["task_id"],
            identity=Identity(row["account"], row["user_id"], row["agent"]),
            session_id=row["session_id"], archive_index=row["archive_index"],
            state=TaskState(row["state"]), stage=Stage(row["stage"]),
            created_at=self._req(row["created_at"]), updated_at=self._req(row["updated_at"]),
            task_type=row["task_type"],
            started_at=self._ts(row["started_at"]), finished_at=self._ts(row["finished_at"]),
            result=codec.decode_result(row["result"]),
            error=codec.decode_error(row["error"]),
            attempts=row["attempts"], last_seq=row["last_seq"], first_seq=row["first_seq"],
            cancel_requested=bool(row["cancel_requested"]),
            done_stage=Stage(row["done_stage"]),
            token_usage=TokenUsage(row["prompt_tokens"], row["completion_tokens"]),
            lease_owner=row["lease_owner"],
            lease_expires_at=self._ts(row["lease_expires_at"]),
            memory_counts=codec.decode_counts(row["memory_counts"]),
            active_count_updated=row["active_count_updated"],
            trace_context=row["trace_context"], retries=row["retries"],
            revert_force=bool(row["revert_force"]),
            trigger=CommitTrigger(row["commit_trigger"]))

    def event(self, row: Row) -> TaskEvent:
        return TaskEvent(task_id=row["task_id"], seq=row["seq"], kind=EventKind(row["kind"]),
                         time=self._req(row["time"]), state=TaskState(row["state"]),
                         stage=Stage(row["stage"]), message=row["message"],
                         attempt=row["attempt"], result=codec.decode_result(row["result"]),
                         error=codec.decode_error(row["error"]))

    def memory(self, row: Row) -> Memory:
        return Memory(memory_id=row["memory_id"],
                      identity=Identity(row["account"], row["user_id"], row["agent"]),
                      category=MemoryCategory(row["category"]), content=row["content"],
                      source_session_id=row["source_session_id"],
                      source_archive_uri=row["source_archive_uri"],
                      source_message_ids=tuple(json.loads(row["source_message_ids"])),
                      created_at=self._req(row["created_at"]),
                      updated_at=self._req(row["updated_at"]))

    def usage(self, row: Row) -> UsageRecord:
        return codec.decode_usage(row["context_uris"], row["skill"], self._req(row["created_at"]))

    def api_key(self, row: Row) -> ApiKey:
        return ApiKey(key_id=row["key_id"], secret_hash=row["secret_hash"],
                      account=row["account"], user=row["user_id"], agent=row["agent"],
                      scopes=tuple(s for s in row["scopes"].split(",") if s),
                      name=row["name"], created_at=self._req(row["created_at"]),
                      expires_at=self._ts(row["expires_at"]),
                      revoked_at=self._ts(row["revoked_at"]))
