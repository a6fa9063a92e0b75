"""Phase 2 on a grown store, for several source trees side by side.

    python bench/phase2_grown.py OLD_TREE NEW_TREE [--store sqlite|postgres]
                                 [--rounds 3] [--commits 30] [--rounds-per-session 6]

bench/run.py measures Phase 2 after it has filled the store (10,000 sessions, then
archives of 10, 100 and 1,000 of its 500-byte pseudo-English messages, one identity):
that is what makes a commit's Phase 2 expensive (memories and index postings of a
large store). This script builds that store once per tree, with that tree's own code
(`sessiond serve` from TREE/server through PYTHONPATH), and then measures each tree
on a fresh copy of its own grown store (SQLite: a copy of the data directory;
PostgreSQL: `CREATE DATABASE ... TEMPLATE`, after an ANALYZE), trees in turn,
`--rounds` times:

- one at a time: `--commits` sessions of 10 messages each commit and wait on
  WatchTask for the terminal event: Phase 2 e2e p50 (reply -> COMPLETED), Commit p50,
  and the CPU per commit of the server process (and of the PostgreSQL backends
  serving its database);
- 16 sessions committing at once, 10 messages per commit, `--rounds-per-session`
  commits each (bench/run.py's commits/s): the steady rate and the CPU per commit.

Medians of the rounds are printed. CPU per commit is the steadier figure on a shared
machine (waiting for a core does not count in it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import harness as h
from bench import workloads as w

PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
SESSIONS = 10_000
GROW = ((24, 10), (16, 100), (8, 1000))  # (sessions, messages): run.py's quick mode
INTERLEAVE = 8


@dataclass
class Figures:
    e2e_p50_ms: list[float] = field(default_factory=list)
    commit_p50_ms: list[float] = field(default_factory=list)
    cpu_ms_seq: list[float] = field(default_factory=list)
    pg_cpu_ms_seq: list[float] = field(default_factory=list)
    commits_per_s: list[float] = field(default_factory=list)
    cpu_ms_conc: list[float] = field(default_factory=list)
    pg_cpu_ms_conc: list[float] = field(default_factory=list)


def tree_env(tree: str) -> dict[str, str]:
    return {"PYTHONPATH": f"{tree}/server:{tree}/clients"}


def serve(tree: str, store: str, data: Path, log: Path) -> h.ServerProc:
    return h.start_server("sessiond", [sys.executable, "-m", "sessiond.server.cli", "serve",
                                       "--address", "127.0.0.1:0", "--data-dir", str(data),
                                       "--store", store, "--shutdown-grace", "2"],
                          log, data_dir=data, env=tree_env(tree), timeout=180)


async def pg_admin(sql: str) -> None:
    import asyncpg
    conn = await asyncpg.connect(PG_ADMIN_URL, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def pg_admin_db(db: str, sql: str) -> None:
    import asyncpg
    conn = await asyncpg.connect(pg_url(db), timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def pg_url(db: str) -> str:
    return f"postgresql://postgres@127.0.0.1:5432/{db}"


def pg_backends(db: str) -> list[int]:
    out = subprocess.run(["psql", "-At", "-h", "127.0.0.1", "-U", "postgres", "-d", db, "-c",
                          "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                          "AND pid <> pg_backend_pid()"], capture_output=True, text=True,
                         timeout=30)
    return [int(x) for x in out.stdout.split()]


class Cpu:
    """CPU seconds of the server and of the PostgreSQL backends of its database."""

    def __init__(self, srv: h.ServerProc, db: str) -> None:
        self.srv, self.db = srv, db
        self.pids = pg_backends(db) if db else []
        self.s0 = srv.cpu_seconds()
        self.p0 = self._pg()

    def _pg(self) -> dict[int, float]:
        out: dict[int, float] = {}
        for p in self.pids:
            try:
                out[p] = h.cpu_seconds(p)
            except (OSError, ValueError):
                pass
        return out

    def read(self) -> tuple[float, float]:
        pg = sum(v - self.p0.get(k, v) for k, v in self._pg().items())
        return self.srv.cpu_seconds() - self.s0, pg


async def grow(target: str) -> None:
    st = w.Stubs.connect(target)
    await st.ready()
    await w.create_sessions(st, [f"s{i:05d}-{uuid.uuid4().hex[:6]}" for i in range(SESSIONS)],
                            32)
    for n_sessions, n in GROW:
        sids = [f"grow{n}-{j}" for j in range(n_sessions)]
        await w.create_sessions(st, sids)
        for g in range(0, n_sessions, INTERLEAVE):
            await w.populate(st, sids[g:g + INTERLEAVE], n, concurrency=INTERLEAVE, seed=n + g)
        s = await w.sequential_commits(st, sids, time_budget=600)
        if s.failed:
            raise RuntimeError(f"growing: {s.failed} commits failed ({s.kinds})")
    await st.close()


async def measure(srv: h.ServerProc, db: str, commits: int, rounds: int, f: Figures) -> None:
    st = w.Stubs.connect(srv.target)
    await st.ready()
    sids = [f"seq-{j}" for j in range(commits)]
    await w.create_sessions(st, sids)
    await w.populate(st, sids, 10, concurrency=16, seed=77)
    cpu = Cpu(srv, db)
    s = await w.sequential_commits(st, sids, time_budget=300)
    server_s, pg_s = cpu.read()
    n = max(1, s.completed)
    f.e2e_p50_ms.append(1e3 * h.percentile(s.e2e, 50))
    f.commit_p50_ms.append(1e3 * h.percentile(s.phase1, 50))
    f.cpu_ms_seq.append(1e3 * server_s / n)
    f.pg_cpu_ms_seq.append(1e3 * pg_s / n)
    sids = [f"conc-{j}" for j in range(16)]
    await w.create_sessions(st, sids)
    await w.populate(st, sids, rounds * 10, concurrency=16, seed=99)
    cpu = Cpu(srv, db)
    s = await w.concurrent_commits(st, sids, rounds, 10, time_budget=300)
    server_s, pg_s = cpu.read()
    n = max(1, s.completed)
    f.commits_per_s.append(s.steady_rate)
    f.cpu_ms_conc.append(1e3 * server_s / n)
    f.pg_cpu_ms_conc.append(1e3 * pg_s / n)
    await st.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trees", nargs="+")
    ap.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--commits", type=int, default=30)
    ap.add_argument("--rounds-per-session", type=int, default=6)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sessiond-grown-"))
    tag = f"sessiond_bench_grown_{os.getpid()}"
    grown: dict[str, str] = {}  # tree -> snapshot dir or template database
    figs = {t: Figures() for t in args.trees}
    try:
        for i, tree in enumerate(args.trees):
            data = work / f"grown-{i}"
            store = "sqlite"
            if args.store == "postgres":
                grown[tree] = f"{tag}_t{i}"
                asyncio.run(pg_admin(f'CREATE DATABASE "{grown[tree]}"'))
                store = pg_url(grown[tree])
                subprocess.run([sys.executable, "-m", "sessiond.server.cli", "migrate",
                                "--store", store], check=True, capture_output=True,
                               env={**os.environ, **tree_env(tree)}, timeout=300)
            else:
                grown[tree] = str(data)
            print(f"growing a store with {tree} ...", flush=True)
            srv = serve(tree, store, data, work / f"grow-{i}.log")
            try:
                asyncio.run(grow(srv.target))
            finally:
                srv.stop()
            if args.store == "postgres":
                # What autovacuum would have done by now (it may be off on a test
                # server): without statistics the planner scans an identity's
                # memories for a lookup by key. The copies inherit them.
                asyncio.run(pg_admin_db(grown[tree], "ANALYZE"))
        for r in range(args.rounds):
            for i, tree in enumerate(args.trees):
                data, db, store = work / f"run-{i}-{r}", "", "sqlite"
                if args.store == "postgres":
                    db = f"{tag}_r{i}_{r}"
                    asyncio.run(pg_admin(f'CREATE DATABASE "{db}" TEMPLATE "{grown[tree]}"'))
                    store = pg_url(db)
                else:
                    shutil.copytree(grown[tree], data)
                srv = serve(tree, store, data, work / f"run-{i}-{r}.log")
                try:
                    asyncio.run(measure(srv, db, args.commits, args.rounds_per_session,
                                        figs[tree]))
                finally:
                    srv.stop()
                    shutil.rmtree(data, ignore_errors=True)
                    if db:
                        asyncio.run(pg_admin(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
                f = figs[tree]
                print(f"round {r + 1} {tree}: e2e p50 {f.e2e_p50_ms[-1]:.1f} ms, "
                      f"{f.commits_per_s[-1]:.1f} commits/s", flush=True)
    finally:
        for db in grown.values():
            if args.store == "postgres":
                asyncio.run(pg_admin(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
        shutil.rmtree(work, ignore_errors=True)
    med = statistics.median
    print(f"\n{args.store}, medians of {args.rounds} rounds (CPU: ms per commit, server"
          + (" + PostgreSQL backends" if args.store == "postgres" else "") + ")")
    print("| tree | Phase 2 e2e p50 | Commit p50 | CPU/commit, one at a time | "
          "commits/s, 16 sessions | CPU/commit, 16 sessions |")
    print("|---|---|---|---|---|---|")
    for tree, f in figs.items():
        pg = args.store == "postgres"
        seq_cpu = f"{med(f.cpu_ms_seq):.1f}" + (f" + {med(f.pg_cpu_ms_seq):.1f}" if pg else "")
        conc_cpu = f"{med(f.cpu_ms_conc):.1f}" + (f" + {med(f.pg_cpu_ms_conc):.1f}" if pg
                                                  else "")
        print(f"| {tree} | {med(f.e2e_p50_ms):.1f} ms | {med(f.commit_p50_ms):.2f} ms | "
              f"{seq_cpu} | {med(f.commits_per_s):.1f} | {conc_cpu} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
