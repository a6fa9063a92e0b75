"""The schema, once for every backend: versioned migrations written with a few
type names (`${key}`, `${ts}`, ...) that each backend's `SchemaTypes` fills in, and
`${extra}`, the backend's own DDL of that version (full-text index, indexes that
only pay off on that engine). Migrations only ever get appended.

Identifier columns that are paged or ordered on are `${key}`: `COLLATE "C"` on
PostgreSQL, so ordering is by code point there too, like SQLite's default.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from itertools import pairwise
from string import Template


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    description: str
    template: str

    def render(self, types: Mapping[str, str], extra: Mapping[int, str]) -> str:
        return Template(self.template).substitute(types, extra=extra.get(self.version, ""))


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial schema", """
    CREATE TABLE sessions (
        skey ${key} PRIMARY KEY,
        account ${key} NOT NULL, user_id ${key} NOT NULL, agent ${key} NOT NULL,
        session_id ${key} NOT NULL,
        created_at ${ts} NOT NULL, updated_at ${ts} NOT NULL,
        message_count ${int64} NOT NULL DEFAULT 0,
        live_count ${int64} NOT NULL DEFAULT 0,
        archive_count INTEGER NOT NULL DEFAULT 0,
        commit_count INTEGER NOT NULL DEFAULT 0,
        memory_counts TEXT NOT NULL DEFAULT '{}',
        last_commit_at ${ts},
        prompt_tokens ${int64} NOT NULL DEFAULT 0,
        completion_tokens ${int64} NOT NULL DEFAULT 0,
        next_seq ${int64} NOT NULL DEFAULT 1
    );
    CREATE UNIQUE INDEX sessions_owner ON sessions (account, user_id, agent, session_id);
    CREATE TABLE messages (
        skey ${key} NOT NULL REFERENCES sessions (skey) ON DELETE CASCADE,
        seq ${int64} NOT NULL,
        message_id ${key} NOT NULL,
        role TEXT NOT NULL,
        parts TEXT NOT NULL,
        created_at ${ts} NOT NULL,
        archive_index INTEGER,
        PRIMARY KEY (skey, seq)
    );
    CREATE UNIQUE INDEX messages_id ON messages (skey, message_id);
    CREATE INDEX messages_archive ON messages (skey, archive_index, seq);
    CREATE TABLE usage (
        id ${serial},
        skey ${key} NOT NULL REFERENCES sessions (skey) ON DELETE CASCADE,
        context_uris TEXT NOT NULL,
        skill TEXT,
        created_at ${ts} NOT NULL,
        archive_index INTEGER
    );
    CREATE INDEX usage_archive ON usage (skey, archive_index);
    CREATE TABLE archives (
        skey ${key} NOT NULL REFERENCES sessions (skey) ON DELETE CASCADE,
        idx INTEGER NOT NULL,
        session_id ${key} NOT NULL,
        task_id ${key} NOT NULL,
        state TEXT NOT NULL,
        overview TEXT NOT NULL DEFAULT '',
        abstract TEXT NOT NULL DEFAULT '',
        message_count INTEGER NOT NULL,
        first_message_id TEXT NOT NULL DEFAULT '',
        last_message_id TEXT NOT NULL DEFAULT '',
        created_at ${ts} NOT NULL,
        completed_at ${ts},
        PRIMARY KEY (skey, idx)
    );
    CREATE TABLE tasks (
        task_id ${key} PRIMARY KEY,
        skey ${key} NOT NULL,
        account ${key} NOT NULL, user_id ${key} NOT NULL, agent ${key} NOT NULL,
        session_id ${key} NOT NULL,
        archive_index INTEGER NOT NULL,
        task_type TEXT NOT NULL,
        state TEXT NOT NULL,
        stage TEXT NOT NULL,
        done_stage TEXT NOT NULL,
        created_at ${ts} NOT NULL,
        updated_at ${ts} NOT NULL,
        started_at ${ts},
        finished_at ${ts},
        result TEXT,
        error TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        last_seq ${int64} NOT NULL DEFAULT 0,
        first_seq ${int64} NOT NULL DEFAULT 1,
        cancel_requested ${bool} NOT NULL DEFAULT ${false},
        prompt_tokens ${int64} NOT NULL DEFAULT 0,
        completion_tokens ${int64} NOT NULL DEFAULT 0,
        memory_counts TEXT NOT NULL DEFAULT '{}',
        active_count_updated INTEGER NOT NULL DEFAULT 0,
        lease_owner TEXT NOT NULL DEFAULT '',
        lease_expires_at ${ts}
    );
    CREATE INDEX tasks_session ON tasks (skey, archive_index);
    CREATE INDEX tasks_owner ON tasks (account, user_id, agent, created_at);
    CREATE INDEX tasks_finished ON tasks (state, finished_at);
    CREATE TABLE task_events (
        task_id ${key} NOT NULL REFERENCES tasks (task_id) ON DELETE CASCADE,
        seq ${int64} NOT NULL,
        kind TEXT NOT NULL,
        time ${ts} NOT NULL,
        state TEXT NOT NULL,
        stage TEXT NOT NULL,
        message TEXT NOT NULL DEFAULT '',
        attempt INTEGER NOT NULL DEFAULT 0,
        result TEXT,
        error TEXT,
        PRIMARY KEY (task_id, seq)
    );
    CREATE TABLE memories (
        memory_id ${key} PRIMARY KEY,
        account ${key} NOT NULL, user_id ${key} NOT NULL, agent ${key} NOT NULL,
        category TEXT NOT NULL,
        mkey ${key} NOT NULL,
        content TEXT NOT NULL,
        source_session_id TEXT NOT NULL,
        source_archive_uri TEXT NOT NULL,
        source_message_ids TEXT NOT NULL,
        created_at ${ts} NOT NULL,
        updated_at ${ts} NOT NULL${memory_columns}
    );
    CREATE UNIQUE INDEX memories_key ON memories (account, user_id, agent, category, mkey);
    CREATE TABLE relations (
        skey ${key} NOT NULL REFERENCES sessions (skey) ON DELETE CASCADE,
        uri ${key} NOT NULL,
        created_at ${ts} NOT NULL,
        PRIMARY KEY (skey, uri)
    );
    CREATE TABLE active_counts (
        uri ${key} PRIMARY KEY,
        active_count ${int64} NOT NULL,
        updated_at ${ts} NOT NULL
    );
    CREATE TABLE request_ids (
        account ${key} NOT NULL, user_id ${key} NOT NULL, agent ${key} NOT NULL,
        method ${key} NOT NULL, request_id ${key} NOT NULL,
        fingerprint TEXT NOT NULL,
        response TEXT NOT NULL,
        created_at ${ts} NOT NULL,
        PRIMARY KEY (account, user_id, agent, method, request_id)
    );
    CREATE INDEX request_ids_age ON request_ids (created_at);
    ${extra}
    """),
    Migration(2, "API keys", """
    CREATE TABLE api_keys (
        key_id ${key} PRIMARY KEY,
        secret_hash TEXT NOT NULL,
        account ${key} NOT NULL, user_id ${key}, agent ${key},
        scopes TEXT NOT NULL,
        name TEXT NOT NULL DEFAULT '',
        created_at ${ts} NOT NULL,
        expires_at ${ts},
        revoked_at ${ts}
    );
    CREATE INDEX api_keys_account ON api_keys (account, created_at);
    ${extra}
    """),
    Migration(3, "retrieval index", """
    CREATE TABLE recall_entries (
        entry_id ${key} PRIMARY KEY,
        account ${key} NOT NULL, user_id ${key} NOT NULL, agent ${key} NOT NULL,
        kind TEXT NOT NULL,
        skey ${key} REFERENCES sessions (skey) ON DELETE CASCADE,
        session_id ${key} NOT NULL,
        archive_index INTEGER NOT NULL,
        position ${int64} NOT NULL,
        message_ids TEXT NOT NULL,
        memory_id ${key} NOT NULL,
        time ${ts} NOT NULL,
        text TEXT NOT NULL,
        length INTEGER NOT NULL
    );
    CREATE INDEX recall_entries_owner ON recall_entries (account, user_id, agent, length);
    CREATE INDEX recall_entries_archive ON recall_entries (skey, archive_index, position);
    CREATE INDEX recall_entries_memory ON recall_entries (memory_id);
    CREATE TABLE recall_terms (
        entry_id ${key} NOT NULL REFERENCES recall_entries (entry_id) ON DELETE CASCADE,
        account ${key} NOT NULL, user_id ${key} NOT NULL, agent ${key} NOT NULL,
        term TEXT NOT NULL,
        tf INTEGER NOT NULL,
        kind TEXT NOT NULL,
        length INTEGER NOT NULL,
        PRIMARY KEY (entry_id, term)
    );
    CREATE INDEX recall_terms_lookup ON recall_terms (term, account, user_id, agent, tf,
                                                      length, kind, entry_id);
    ${extra}
    """),
    Migration(4, "retrieval vectors", """
    CREATE TABLE recall_vectors (
        vseq ${serial},
        entry_id ${key} NOT NULL REFERENCES recall_entries (entry_id) ON DELETE CASCADE,
        model ${key} NOT NULL,
        account ${key} NOT NULL, user_id ${key} NOT NULL, agent ${key} NOT NULL,
        kind TEXT NOT NULL,
        time ${ts} NOT NULL,
        vector ${blob} NOT NULL
    );
    CREATE UNIQUE INDEX recall_vectors_entry ON recall_vectors (entry_id, model);
    CREATE INDEX recall_vectors_owner ON recall_vectors (model, account, user_id, agent,
                                                         vseq);
    ${extra}
    """),
    Migration(5, "quotas: live bytes, sessions per identity", """
    ALTER TABLE messages ADD COLUMN size ${int64} NOT NULL DEFAULT 0;
    ALTER TABLE sessions ADD COLUMN live_bytes ${int64} NOT NULL DEFAULT 0;
    UPDATE messages SET size = length(parts);
    UPDATE sessions SET live_bytes = (SELECT COALESCE(SUM(m.size), 0) FROM messages m
                                      WHERE m.skey = sessions.skey
                                      AND m.archive_index IS NULL);
    CREATE TABLE identity_usage (
        account ${key} NOT NULL, user_id ${key} NOT NULL, agent ${key} NOT NULL,
        sessions ${int64} NOT NULL DEFAULT 0,
        PRIMARY KEY (account, user_id, agent)
    );
    INSERT INTO identity_usage (account, user_id, agent, sessions)
        SELECT account, user_id, agent, COUNT(*) FROM sessions
        GROUP BY account, user_id, agent;
    ${extra}
    """),
    Migration(7, "trace context of tasks", """
    -- The W3C trace context of the Commit that made the task (JSON carrier, '' when
    -- tracing was off): Phase 2 spans join that trace on any replica, after restarts.
    ALTER TABLE tasks ADD COLUMN trace_context TEXT NOT NULL DEFAULT '';
    ${extra}
    """),
    Migration(8, "task retries, client message ids", """
    ALTER TABLE tasks ADD COLUMN retries INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE messages ADD COLUMN client_message_id ${key};
    CREATE UNIQUE INDEX messages_client_id ON messages (skey, client_message_id);
    ${extra}
    """),
    Migration(9, "memory change history", """
    -- One row per change of a memory, written in the transaction of the change:
    -- Phase 2 merges (created, updated), DeleteMemory (deleted), archive reverts
    -- (reverted). (account, user_id, agent) own the memory ('' agent: user space);
    -- actor_agent is the agent of the session or caller that made the change.
    -- before/after: JSON images of the memory ('' when it did not exist).
    CREATE TABLE memory_changes (
        seq ${serial},
        change_id ${key} NOT NULL,
        account ${key} NOT NULL, user_id ${key} NOT NULL, agent ${key} NOT NULL,
        actor_agent ${key} NOT NULL,
        memory_id ${key} NOT NULL,
        category TEXT NOT NULL,
        mkey ${key} NOT NULL,
        op TEXT NOT NULL,
        session_id ${key} NOT NULL DEFAULT '',
        archive_index INTEGER NOT NULL DEFAULT 0,
        task_id ${key} NOT NULL DEFAULT '',
        before_image TEXT NOT NULL DEFAULT '',
        after_image TEXT NOT NULL DEFAULT '',
        created_at ${ts} NOT NULL
    );
    CREATE UNIQUE INDEX memory_changes_id ON memory_changes (change_id);
    CREATE INDEX memory_changes_memory ON memory_changes (memory_id, seq);
    CREATE INDEX memory_changes_session ON memory_changes (account, user_id, actor_agent,
                                                          session_id, archive_index, seq);
    CREATE INDEX memory_changes_owner ON memory_changes (account, user_id, agent, seq);
    ALTER TABLE tasks ADD COLUMN revert_force ${bool} NOT NULL DEFAULT ${false};
    CREATE INDEX tasks_archive_type ON tasks (skey, archive_index, task_type);
    ${extra}
    """),
    Migration(10, "auto-commit policies, session event feed", """
    -- The session's own auto-commit policy; NULL columns: the server default applies.
    ALTER TABLE sessions ADD COLUMN ac_messages ${int64};
    ALTER TABLE sessions ADD COLUMN ac_tokens ${int64};
    ALTER TABLE sessions ADD COLUMN ac_idle ${int64};
    ALTER TABLE sessions ADD COLUMN ac_keep ${int64};
    -- Epoch milliseconds of the newest append, and when the idle trigger is due
    -- (NULL: not armed). The idle scanner claims a session by clearing idle_due_ms.
    ALTER TABLE sessions ADD COLUMN last_append_ms ${int64};
    ALTER TABLE sessions ADD COLUMN idle_due_ms ${int64};
    -- Newest number of the session's event feed.
    ALTER TABLE sessions ADD COLUMN event_seq ${int64} NOT NULL DEFAULT 0;
    CREATE INDEX sessions_idle_due ON sessions (idle_due_ms);
    ALTER TABLE tasks ADD COLUMN commit_trigger TEXT NOT NULL DEFAULT 'manual';
    CREATE TABLE session_events (
        skey ${key} NOT NULL REFERENCES sessions (skey) ON DELETE CASCADE,
        seq ${int64} NOT NULL,
        kind TEXT NOT NULL,
        time ${ts} NOT NULL,
        task_id ${key} NOT NULL DEFAULT '',
        ref_seq ${int64} NOT NULL DEFAULT 0,
        payload TEXT NOT NULL DEFAULT '{}',
        PRIMARY KEY (skey, seq)
    );
    ${extra}
    """),
    Migration(11, "messages clustered by session, recall statistics (SQLite)", """
    -- SQLite keeps the rows of a rowid table in insertion order: the messages of
    -- sessions appended at the same time share pages, and archiving one session's
    -- messages rewrote about one page per message. The SQLite part rebuilds the
    -- table WITHOUT ROWID, so its rows are stored in (skey, seq) order. It also
    -- keeps each identity's retrieval entry count and total length in recall_stats
    -- (triggers on recall_entries), which every Recall reads for BM25 instead of
    -- scanning all the identity's entries. Nothing changes on PostgreSQL.
    ${extra}
    """),
    Migration(12, "retrieval terms clustered by term (SQLite)", """
    -- SQLite: recall_terms was a rowid table with two more B-trees (its primary key and
    -- the lookup index), each insert writing three. It is rebuilt WITHOUT ROWID with
    -- the lookup order as its key (term, owner, entry), the row holding tf, kind and
    -- length (so lookups stay covered), and one index by entry for deletions: an
    -- archive's terms cost about a third to write. Nothing changes on PostgreSQL.
    ${extra}
    """),
    Migration(13, "Phase 2 cost: memories by source archive, postings appended by term", """
    -- The index stage reads the memories its archive's extraction wrote or merged into
    -- (source_archive_uri): by an index, not a scan of every memory of the identity.
    CREATE INDEX memories_archive ON memories (source_archive_uri);
    -- When a posting was written (a growing number: epoch microseconds). SQLite keys
    -- recall_terms by (term, owner, eseq, entry), so an archive's new postings of a
    -- term go to the end of that term's run of pages instead of one page each
    -- (a hash-like entry id scattered them over the whole B-tree); PostgreSQL's
    -- lookup index is rebuilt the same way (term, owner, eseq; the rest included, so
    -- lookups stay index-only). SQLite also finds a memory's full-text row by a key
    -- table instead of a scan of the FTS table.
    ALTER TABLE recall_terms ADD COLUMN eseq ${int64} NOT NULL DEFAULT 0;
    ${extra}
    """),
    Migration(14, "client message ids indexed only where given", """
    -- Most messages carry no client_message_id, yet the unique index held an entry
    -- (skey, NULL) for each of them: one more B-tree written by every append and by
    -- every message a commit archives (PostgreSQL: a new index entry per new row
    -- version). Lookups only ever ask for given ids, which the partial index serves.
    DROP INDEX messages_client_id;
    CREATE UNIQUE INDEX messages_client_id ON messages (skey, client_message_id)
        WHERE client_message_id IS NOT NULL;
    ${extra}
    """),
)

# Versions are numbered by the change that introduced them (not necessarily without
# gaps on a branch); a store at version N gets every migration numbered above N.
assert all(a.version < b.version for a, b in pairwise(MIGRATIONS))
SCHEMA_VERSION = MIGRATIONS[-1].version


def pending(found: int) -> tuple[Migration, ...]:
    """The migrations a store at version `found` still needs, in order."""
    return tuple(m for m in MIGRATIONS if m.version > found)


# The tables the migrations create (besides the version table).
TABLES: tuple[str, ...] = ("sessions", "messages", "usage", "archives", "tasks", "task_events",
                           "memories", "relations", "active_counts", "request_ids",
                           "api_keys", "recall_entries", "recall_terms",
                           "recall_vectors", "identity_usage", "memory_changes",
                           "session_events")


def statements(script: str) -> list[str]:
    """The statements of a rendered migration, one by one (comment lines dropped)."""
    out = []
    for chunk in script.split(";\n"):
        stmt = "\n".join(line for line in chunk.splitlines()
                         if not line.strip().startswith("--")).strip()
        if stmt:
            out.append(stmt)
    return out
