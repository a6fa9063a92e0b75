"""The retrieval index: entries and their term postings, written by Phase 2's
`index` stage, removed with their session or memory, and ranked with Okapi BM25
over the caller's own entries, in SQL that is the same on every backend."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

from sessiond.server.domain import recall as recall_rules
from sessiond.server.domain.recall import (
    BM25_B,
    BM25_K1,
    EntryVector,
    RecallEntry,
    RecallHit,
    RecallKind,
    RecallQuery,
    bm25_idf,
    entry_id,
    fuse,
)
from sessiond.server.domain.values import Identity, MemoryCategory, Task
from sessiond.server.store import codec
from sessiond.server.store.sql import vectors as vectors_sql
from sessiond.server.store.sql.tx import Row, Tx

ENTRY_COLUMNS = ("entry_id", "account", "user_id", "agent", "kind", "skey", "session_id",
                 "archive_index", "position", "message_ids", "memory_id", "time", "text",
                 "length")
VISIBLE = "account=? AND user_id=? AND (agent='' OR agent=?)"
# Neighbouring turns are looked for this many message seqs away at most.
NEIGHBOUR_SPAN = 4


def _visible(identity: Identity) -> tuple[str, str, str]:
    return identity.account, identity.user, identity.agent


# Entries written per statement batch (bounded parameter lists on every backend).
BATCH = 200


async def insert_entries(tx: Tx, entries: Sequence[RecallEntry]) -> int:
    """Index entries not indexed yet (ids are deterministic: a redo writes nothing).
    Entries should carry their terms (`RecallEntry.with_terms`); those that do not
    get them here."""
    n = 0
    for start in range(0, len(entries), BATCH):
        chunk = [e if e.term_counts or not e.text.strip() else e.with_terms()
                 for e in entries[start:start + BATCH]]
        marks = ",".join("?" * len(chunk))
        have = {str(r[0]) for r in await tx.fetch(
            f"SELECT entry_id FROM recall_entries WHERE entry_id IN ({marks})",
            *(e.entry_id for e in chunk))}
        new = list({e.entry_id: e for e in chunk if e.entry_id not in have}.values())
        if not new:
            continue
        await tx.executemany(
            f"INSERT INTO recall_entries ({', '.join(ENTRY_COLUMNS)}) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            [(e.entry_id, e.owner.account, e.owner.user, e.owner.agent, e.kind.value,
              codec.session_key(e.owner, e.session_id) if e.kind is not RecallKind.MEMORY
              else None, e.session_id, e.archive_index, e.position,
              codec.dumps(list(e.message_ids)), e.memory_id, tx.d.ts(e.time),
              codec.clean_text(e.text), e.length) for e in new])
        # eseq grows with time, so on SQLite (keyed by term, owner, eseq, entry) a
        # term's new postings go to the end of its run of pages (migration 13).
        eseq = time.time_ns() // 1000
        await tx.executemany(
            "INSERT INTO recall_terms (entry_id, account, user_id, agent, term, tf, kind, "
            "length, eseq) VALUES (?,?,?,?,?,?,?,?,?)",
            [(e.entry_id, e.owner.account, e.owner.user, e.owner.agent, t, c, e.kind.value,
              e.length, eseq) for e in new for t, c in e.term_counts])
        n += len(new)
    return n


async def delete_entries(tx: Tx, entry_ids: Sequence[str]) -> None:
    """Entries with their postings and vectors, by id. (Ids, not a subquery: with
    `entry_id IN (SELECT ...)` PostgreSQL planned a hash join over every posting, a
    sequential scan of recall_terms per deleted memory.)"""
    ids = list(dict.fromkeys(entry_ids))
    for start in range(0, len(ids), BATCH):
        chunk = ids[start:start + BATCH]
        marks = ",".join("?" * len(chunk))
        for table in ("recall_terms", "recall_vectors", "recall_entries"):
            await tx.execute(f"DELETE FROM {table} WHERE entry_id IN ({marks})", *chunk)


async def _entry_ids(tx: Tx, column: str, values: Sequence[str]) -> list[str]:
    out: list[str] = []
    for start in range(0, len(values), BATCH):
        chunk = values[start:start + BATCH]
        out += [str(r[0]) for r in await tx.fetch(
            f"SELECT entry_id FROM recall_entries WHERE {column} IN "
            f"({','.join('?' * len(chunk))})", *chunk)]
    return out


async def delete_memory_entries(tx: Tx, memory_ids: Sequence[str]) -> None:
    wanted = [m for m in dict.fromkeys(memory_ids) if m]  # '': every episode's memory_id
    await delete_entries(tx, await _entry_ids(tx, "memory_id", wanted))


async def delete_session_entries(tx: Tx, skey: str) -> None:
    await delete_entries(tx, await _entry_ids(tx, "skey", [skey]))


async def archive_memory_entries(tx: Tx, task: Task) -> list[RecallEntry]:
    """The entries of the memories this archive's extraction wrote or merged into,
    as they read now."""
    return await _archive_memory_entries(tx, task)


async def _archive_memory_entries(tx: Tx, task: Task,
                                  memory_ids: Sequence[str] = ()) -> list[RecallEntry]:
    only = f" AND memory_id IN ({','.join('?' * len(memory_ids))})" if memory_ids else ""
    rows = await tx.fetch(
        "SELECT memory_id, account, user_id, agent, category, content, source_session_id, "
        "source_message_ids, updated_at FROM memories WHERE account=? AND user_id=? "
        f"AND (agent='' OR agent=?) AND source_archive_uri=?{only} ORDER BY memory_id",
        *_visible(task.identity), task.archive_uri, *memory_ids)
    return [_memory_entry(tx, r) for r in rows]


async def index_archive(tx: Tx, task: Task, entries: Sequence[RecallEntry],
                        vectors: Sequence[EntryVector] = (), model: str = "") -> int:
    """The `index` stage's writes: the archive's episodes and overview (given), the
    current text of every memory this archive's extraction wrote or merged into
    (its entry replaced), and the given vectors of `model`. Returns the number of
    entries written."""
    written = await insert_entries(tx, entries)
    written += await _replace_memory_entries(tx, await archive_memory_entries(tx, task))
    if vectors and model:
        await vectors_sql.insert(tx, model, vectors)
    return written


async def index_memory_entries(tx: Tx, task: Task, prepared: Sequence[RecallEntry]) -> int:
    """Ahead of the `index` stage's last transaction: `prepared` entries (read with
    `archive_memory_entries` and given their terms outside the transaction) replace
    their memories' entries, except those whose memory changed since they were read
    (the last transaction indexes those). Idempotent: a current entry is kept."""
    if not prepared:
        return 0
    ids = sorted({e.memory_id for e in prepared})
    fresh = {e.entry_id for e in await _archive_memory_entries(tx, task, ids)}
    return await _replace_memory_entries(tx, [e for e in prepared if e.entry_id in fresh])


async def _replace_memory_entries(tx: Tx, memory_entries: Sequence[RecallEntry]) -> int:
    current: dict[str, set[str]] = {}
    if memory_entries:
        for r in await tx.fetch(
                "SELECT memory_id, entry_id FROM recall_entries WHERE memory_id IN "
                f"({','.join('?' * len(memory_entries))})",
                *(e.memory_id for e in memory_entries)):
            current.setdefault(str(r[0]), set()).add(str(r[1]))
    # A memory whose entry is current keeps it (and its vector); others are replaced.
    stale = [e for e in memory_entries if current.get(e.memory_id) != {e.entry_id}]
    await delete_entries(tx, [i for e in stale for i in sorted(current.get(e.memory_id, ()))])
    return await insert_entries(tx, stale)


def _memory_entry(tx: Tx, row: Row) -> RecallEntry:
    category = MemoryCategory(row["category"])
    owner = Identity(row["account"], row["user_id"], row["agent"])  # the owner space
    updated = tx.d.rows.ts(row["updated_at"])
    return RecallEntry(
        entry_id(RecallKind.MEMORY, row["memory_id"], str(tx.d.epoch(row["updated_at"]))),
        owner, RecallKind.MEMORY, row["source_session_id"], 0, 0,
        tuple(json.loads(row["source_message_ids"])), row["memory_id"], updated,
        f"{category.value}: {row['content']}")


def _entry(tx: Tx, row: Row) -> RecallEntry:
    return RecallEntry(
        str(row["entry_id"]), Identity(row["account"], row["user_id"], row["agent"]),
        RecallKind(row["kind"]), str(row["session_id"]), int(row["archive_index"]),
        int(row["position"]), tuple(json.loads(row["message_ids"])), str(row["memory_id"]),
        tx.d.rows.ts(row["time"]), str(row["text"]))


def _cols(alias: str) -> str:
    return ", ".join(f"{alias}.{c}" for c in ENTRY_COLUMNS)


async def search(tx: Tx, identity: Identity, query: RecallQuery) -> list[RecallHit]:
    """The best `query.limit` entries by BM25, best first (ties: newest first)."""
    if not query.terms or not query.kinds:
        return []
    vis = _visible(identity)
    stats = await tx.fetchrow(tx.d.recall_stats(), *vis)
    n_docs = int(stats["n"]) if stats is not None else 0
    if n_docs == 0:
        return []
    avgdl = max(1.0, float(stats["total"]) / n_docs) if stats is not None else 1.0
    marks = ",".join("?" * len(query.terms))
    dfs = await tx.fetch(f"SELECT term, COUNT(*) AS df FROM recall_terms WHERE {VISIBLE} "
                         f"AND term IN ({marks}) GROUP BY term", *vis, *query.terms)
    weights = [(str(r["term"]), bm25_idf(n_docs, int(r["df"]))) for r in dfs]
    if not weights:
        return []
    values = ",".join("(CAST(? AS TEXT), CAST(? AS DOUBLE PRECISION))" for _ in weights)
    args: list[object] = [x for tw in weights for x in tw]
    # Scores come from the postings alone (an index-only scan: each posting carries its
    # entry's length and kind); entries are read for the best `limit` only, and only
    # joined before that when a time filter needs them.
    timed = query.since is not None or query.until is not None
    sql = (f"WITH q(term, idf) AS (VALUES {values}), "
           f"s AS (SELECT t.entry_id, SUM(q.idf * (t.tf * {BM25_K1 + 1}) / (t.tf + {BM25_K1} * "
           f"({1 - BM25_B} + {BM25_B} * t.length / CAST(? AS DOUBLE PRECISION)))) AS score "
           "FROM q JOIN recall_terms t ON t.term = q.term "
           + ("JOIN recall_entries f ON f.entry_id = t.entry_id " if timed else "")
           + "WHERE t.account=? AND t.user_id=? AND (t.agent='' OR t.agent=?)")
    args += [avgdl, *vis]
    if set(query.kinds) != set(RecallKind):
        sql += f" AND t.kind IN ({','.join('?' * len(query.kinds))})"
        args += [k.value for k in query.kinds]
    if query.since is not None:
        sql += " AND f.time >= ?"
        args.append(tx.d.ts(query.since))
    if query.until is not None:
        sql += " AND f.time < ?"
        args.append(tx.d.ts(query.until))
    sql += (" GROUP BY t.entry_id ORDER BY score DESC, t.entry_id LIMIT ?) "
            f"SELECT {_cols('e')}, s.score FROM s JOIN recall_entries e "
            "ON e.entry_id = s.entry_id ORDER BY s.score DESC, e.entry_id")
    rows = await tx.fetch(sql, *args, query.limit)
    return [RecallHit(_entry(tx, r), float(r["score"])) for r in rows]


async def neighbours(tx: Tx, hits: Sequence[RecallHit], span: int = 1) -> list[RecallHit]:
    """`hits`, each message hit with the episodes right before and after it in its
    archive; one statement for all of them."""
    wanted = [h.entry for h in hits if h.entry.kind is RecallKind.MESSAGE]
    if not wanted:
        return list(hits)
    ranges = " OR ".join("(r.skey=? AND r.archive_index=? AND r.position BETWEEN ? AND ?)"
                         for _ in wanted)
    args: list[object] = [RecallKind.MESSAGE.value]
    for e in wanted:
        args += [codec.session_key(e.owner, e.session_id), e.archive_index,
                 e.position - NEIGHBOUR_SPAN * span, e.position + NEIGHBOUR_SPAN * span]
    rows = await tx.fetch(f"SELECT {_cols('r')} FROM recall_entries r WHERE r.kind=? AND "
                          f"({ranges}) ORDER BY r.position", *args)
    found = [_entry(tx, r) for r in rows]
    out: list[RecallHit] = []
    for hit in hits:
        e = hit.entry
        if e.kind is not RecallKind.MESSAGE:
            out.append(hit)
            continue
        around = [x for x in found
                  if (x.owner, x.session_id, x.archive_index) == (e.owner, e.session_id,
                                                                   e.archive_index)
                  and abs(x.position - e.position) <= NEIGHBOUR_SPAN * span
                  and x.position != e.position]
        before = tuple(x for x in around if x.position < e.position)[-span:]
        after = tuple(x for x in around if x.position > e.position)[:span]
        out.append(RecallHit(e, hit.score, before, after))
    return out


async def entries(tx: Tx, entry_ids: Sequence[str]) -> dict[str, RecallEntry]:
    if not entry_ids:
        return {}
    rows = await tx.fetch(f"SELECT {_cols('e')} FROM recall_entries e WHERE e.entry_id IN "
                          f"({','.join('?' * len(entry_ids))})", *entry_ids)
    return {str(r["entry_id"]): _entry(tx, r) for r in rows}


async def dense(tx: Tx, index: vectors_sql.VectorIndex, identity: Identity,
                query: RecallQuery, limit: int,
                known: Sequence[RecallHit] = ()) -> list[RecallHit]:
    """The `limit` nearest entries to the query's vector (cosine), best first; the
    entries of `known` hits are not read again."""
    kinds = tuple(k for k in query.kinds
                  if not recall_rules.DENSE_KINDS or k in recall_rules.DENSE_KINDS)
    if not query.vector or not query.model or not kinds:
        return []
    top = await index.top(tx, identity, query.model, query.vector, kinds,
                          query.since, query.until, limit)
    found = {h.entry.entry_id: h.entry for h in known}
    found |= await entries(tx, [i for i, _ in top if i not in found])
    return [RecallHit(found[i], score) for i, score in top if i in found]


async def recall(tx: Tx, identity: Identity, query: RecallQuery, with_neighbours: int,
                 index: vectors_sql.VectorIndex | None = None) -> list[RecallHit]:
    """Lexical search, fused with the dense ranking when the query has a vector,
    then the neighbouring turns of the first `with_neighbours` hits."""
    hits = await search(tx, identity, query)
    if query.vector and index is not None:
        near = await dense(tx, index, identity, query,
                           min(query.limit, recall_rules.DENSE_CANDIDATES), hits)
        if recall_rules.CONVEX_ALPHA:
            hits = recall_rules.fuse_convex(hits, near, query.limit,
                                            recall_rules.CONVEX_ALPHA)
        else:
            hits = fuse([hits, near], query.limit, k=recall_rules.RRF_K,
                        weights=(1.0, recall_rules.DENSE_WEIGHT))
    return [*await neighbours(tx, hits[:with_neighbours]), *hits[with_neighbours:]]


async def entry_count(tx: Tx, identity: Identity, kind: RecallKind | None = None) -> int:
    sql, args = f"SELECT COUNT(*) FROM recall_entries WHERE {VISIBLE}", list(_visible(identity))
    if kind is not None:
        sql += " AND kind=?"
        args.append(kind.value)
    return int(await tx.fetchval(sql, *args))




# -- reindexing (`sessiond reindex`): what the index lacks, in stable order ---------------
async def unindexed_archives(tx: Tx, after: tuple[str, int], limit: int
                             ) -> list[tuple[str, Identity, str, int]]:
    """(skey, owner, session_id, index) of completed archives with no episode or
    overview entry (archived before the index existed), after `after` (skey, idx)."""
    rows = await tx.fetch(
        "SELECT a.skey, s.account, s.user_id, s.agent, a.session_id, a.idx FROM archives a "
        "JOIN sessions s ON s.skey = a.skey WHERE a.state='done' AND "
        "(a.skey > ? OR (a.skey = ? AND a.idx > ?)) AND NOT EXISTS (SELECT 1 FROM "
        "recall_entries e WHERE e.skey = a.skey AND e.archive_index = a.idx AND e.kind IN "
        "('message', 'overview')) ORDER BY a.skey, a.idx LIMIT ?",
        after[0], after[0], after[1], limit)
    return [(str(r[0]), Identity(r[1], r[2], r[3]), str(r[4]), int(r[5])) for r in rows]


async def unindexed_memories(tx: Tx, after: str, limit: int) -> list[RecallEntry]:
    """Entries for memories that have none, by memory id after `after`."""
    rows = await tx.fetch(
        "SELECT memory_id, account, user_id, agent, category, content, source_session_id, "
        "source_message_ids, updated_at FROM memories m WHERE m.memory_id > ? AND NOT EXISTS "
        "(SELECT 1 FROM recall_entries e WHERE e.memory_id = m.memory_id) "
        "ORDER BY m.memory_id LIMIT ?", after, limit)
    return [_memory_entry(tx, r) for r in rows]


async def missing_vectors(tx: Tx, model: str, after: str, limit: int) -> list[RecallEntry]:
    """Entries (every identity) with no vector of `model`, by entry id after `after`."""
    rows = await tx.fetch(
        f"SELECT {_cols('e')} FROM recall_entries e WHERE e.entry_id > ? AND NOT EXISTS "
        "(SELECT 1 FROM recall_vectors v WHERE v.entry_id = e.entry_id AND v.model = ?) "
        "ORDER BY e.entry_id LIMIT ?", after, model, limit)
    return [_entry(tx, r) for r in rows]
