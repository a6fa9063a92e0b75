"""Why SQLite's Commit Phase 1 of a large archive cost what it did: the messages
table's layout, measured at the SQL level (no server).

    .venv/bin/python bench/sqlite_layout.py [--rounds 3]

Builds the schema twice in a scratch file: as of migration 8 (a rowid table: rows in
insertion order) and with migration 11 (WITHOUT ROWID: rows in (skey, seq) order).
Fills 8 sessions x 1,000 ~500-byte messages appended in turns (as 8 concurrent
clients do; one transaction per message), then runs Phase 1's statements for each
session (read the live rows, set archive_index, update the session; COMMIT with
synchronous=FULL, checkpoints off) and reports per layout: Phase 1 p50, WAL bytes
written per commit, reading one archive back, 200 lookups by message id, and the
append p50.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from sessiond.server.store.sql.schema import MIGRATIONS, statements
from sessiond.server.store.sqlite.schema import EXTRA, TYPES

N, K = 1000, 8
PAYLOAD = '[{"text": "' + "x" * 480 + '"}]'


def run(path: Path, clustered: bool, rounds: int) -> dict[str, float]:
    c = sqlite3.connect(str(path), isolation_level=None)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("PRAGMA foreign_keys=ON")
    for m in MIGRATIONS:
        if m.version <= 8 or (clustered and m.version == 11):
            for stmt in statements(m.render(TYPES, EXTRA)):
                c.execute(stmt)
    c.execute("PRAGMA synchronous=NORMAL")
    appends: list[float] = []
    for r in range(rounds):
        for j in range(K):
            c.execute("INSERT INTO sessions (skey, account, user_id, agent, session_id, "
                      "created_at, updated_at) VALUES (?,?,?,?,?,0,0)",
                      (f"r{r}-{j}", "a", "u", "g", f"r{r}-{j}"))
        for i in range(N):
            for j in range(K):
                t = time.perf_counter()
                c.execute("BEGIN")
                c.execute("INSERT INTO messages (skey, seq, message_id, role, parts, "
                          "created_at, size) VALUES (?,?,?,?,?,0,?)",
                          (f"r{r}-{j}", i + 1, f"m{r}-{j}-{i}", "user", PAYLOAD, len(PAYLOAD)))
                c.execute("COMMIT")
                appends.append(time.perf_counter() - t)
    c.execute("PRAGMA synchronous=FULL")
    c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    c.execute("PRAGMA wal_autocheckpoint=0")
    phase1, reads, lookups = [], [], []
    for r in range(rounds):
        for j in range(K):
            skey = f"r{r}-{j}"
            t = time.perf_counter()
            c.execute("BEGIN IMMEDIATE")
            live = c.execute("SELECT seq, message_id FROM messages WHERE skey=? AND "
                             "archive_index IS NULL ORDER BY seq", (skey,)).fetchall()
            c.execute("UPDATE messages SET archive_index=1 WHERE skey=? AND archive_index "
                      "IS NULL AND seq<=?", (skey, live[-1][0]))
            c.execute("UPDATE sessions SET archive_count=1, live_count=live_count-?, "
                      "live_bytes=(SELECT COALESCE(SUM(size), 0) FROM messages WHERE skey=? "
                      "AND archive_index IS NULL) WHERE skey=?", (len(live), skey, skey))
            c.execute("COMMIT")
            phase1.append(time.perf_counter() - t)
            t = time.perf_counter()
            c.execute("SELECT * FROM messages WHERE skey=? AND archive_index=1 ORDER BY seq",
                      (skey,)).fetchall()
            reads.append(time.perf_counter() - t)
            t = time.perf_counter()
            for k in range(200):
                c.execute("SELECT * FROM messages WHERE skey=? AND message_id=?",
                          (skey, f"m{r}-{j}-{k * 3}")).fetchone()
            lookups.append(time.perf_counter() - t)
    wal = os.path.getsize(str(path) + "-wal")
    c.close()
    ms = 1000.0
    return {"phase1_p50_ms": ms * statistics.median(phase1),
            "wal_kb_per_commit": wal / 1024 / len(phase1),
            "read_archive_p50_ms": ms * statistics.median(reads),
            "lookups_200_p50_ms": ms * statistics.median(lookups),
            "append_p50_ms": ms * statistics.median(appends)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sessiond-layout-"))
    res = {name: run(tmp / f"{name}.sqlite3", clustered, args.rounds)
           for name, clustered in (("rowid (migration 8)", False),
                                   ("WITHOUT ROWID (migration 11)", True))}
    keys = list(next(iter(res.values())))
    print("| layout | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for name, r in res.items():
        print(f"| {name} | " + " | ".join(f"{r[k]:.2f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
