"""The cost of the quota checks in the store (issue 11): CreateSession with an
identity already holding N sessions, and AddMessage into a session with N live
messages, on SQLite, medians of 200 calls.

    python bench/quotas.py

The sessions-per-identity check reads one counter row (identity_usage), so the cost
stays flat as an identity's sessions grow; the live quotas are conditions of the one
UPDATE that numbers a message."""

from __future__ import annotations

import asyncio
import functools
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from sessiond.server.domain.values import Identity, Message, Role, TextPart
from sessiond.server.store import codec
from sessiond.server.store.sql.tx import Tx
from sessiond.server.store.sqlite.store import SqliteStore

ID = Identity("bench", "u", "a")


async def _fill_sessions(tx: Tx, start: int, n: int) -> None:
    rows = [(codec.session_key(ID, f"f{i:07d}"), ID.account, ID.user, ID.agent, f"f{i:07d}",
             0.0, 0.0) for i in range(start, n)]
    await tx.executemany("INSERT INTO sessions (skey, account, user_id, agent, session_id, "
                         "created_at, updated_at) VALUES (?,?,?,?,?,?,?)", rows)
    await tx.execute("UPDATE identity_usage SET sessions=sessions+? WHERE account=? AND "
                     "user_id=? AND agent=?", n - start, ID.account, ID.user, ID.agent)


async def main() -> None:
    store = SqliteStore(Path(tempfile.mkdtemp()), synchronous="NORMAL")
    await store.open()
    now = datetime.now(UTC)
    await store.create_session(ID, "seed", now)
    held = 1
    for n in (1_000, 10_000, 50_000, 99_000):
        await store._write(functools.partial(_fill_sessions, start=held, n=n))
        held = n
        times = []
        for i in range(200):
            t = time.perf_counter()
            await store.create_session(ID, f"z{n}_{i}", now)
            times.append(time.perf_counter() - t)
        held += 200
        print(f"CreateSession, identity holding {n:>6} sessions: "
              f"{statistics.median(times) * 1e3:.2f} ms median")
    await store.ensure_session(ID, "live", now)
    for n in (0, 1_000, 5_000):
        while (await store.get_session(ID, "live")).live_message_count < n:  # type: ignore[union-attr]
            await store.add_message(ID, "live", Message(f"m{time.perf_counter_ns()}", Role.USER,
                                                        (TextPart("x" * 100),), now))
        times = []
        for i in range(200):
            t = time.perf_counter()
            await store.add_message(ID, "live", Message(f"q{n}_{i}", Role.USER,
                                                        (TextPart("x" * 100),), now))
            times.append(time.perf_counter() - t)
        print(f"AddMessage, session holding {n:>5} live messages: "
              f"{statistics.median(times) * 1e3:.2f} ms median")
    await store.close()


if __name__ == "__main__":
    asyncio.run(main())
