"""Commit Phase 1 latency by archive size, two source revisions side by side, on SQLite
and PostgreSQL.

    .venv/bin/python bench/commit_phase1.py [--base REV] [--sizes 1000] [--trials 3]
                                            [--stores sqlite,postgres]

Servers: this worktree's code ("new") and --base ("old", default main; exported with
`git archive` into a temporary directory and put first on PYTHONPATH), one per store,
all running at once (fresh data directory / database each). Each trial, for each
server in turn: 8 sessions are filled with SIZE ~500-byte messages at once
(concurrency 8, so their rows interleave as with concurrent clients, as in
bench/run.py), then committed one after another; the Commit RPC latency is Phase 1.
Prints p50 per server over all trials, old/new, and SQLite/PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python bench/x.py): make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import harness as h
from bench import workloads as w
from bench.run import pg_create_db, pg_drop_db

INTERLEAVE = 8


def export(rev: str, into: Path) -> str:
    """`git archive REV server clients` into `into`; the PYTHONPATH that runs it."""
    into.mkdir(parents=True)
    tar = subprocess.run(["git", "-C", str(h.REPO_DIR), "archive", rev, "server", "clients"],
                         capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=tar, check=True)
    return f"{into / 'server'}{os.pathsep}{into / 'clients'}"


async def main_async(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="sessiond-phase1-"))
    old_path = export(args.base, work / "old-src")
    stores = args.stores.split(",")
    dbs: list[str] = []
    servers: dict[tuple[str, str], h.ServerProc] = {}
    try:
        for store in stores:
            for rev in ("old", "new"):
                arg = "sqlite"
                if store == "postgres":
                    name, arg = await pg_create_db()
                    dbs.append(name)
                env = {"PYTHONPATH": old_path} if rev == "old" else {}
                cmd = [h.python_exe(), "-m", "sessiond.server.cli", "serve", "--address",
                       "127.0.0.1:0", "--store", arg, "--data-dir",
                       str(work / f"{store}-{rev}"), "--shutdown-grace", "2"]
                servers[(store, rev)] = h.start_server(f"{store}-{rev}", cmd,
                                                       work / f"{store}-{rev}.log", env=env,
                                                       timeout=120)
        stubs = {k: w.Stubs.connect(s.target) for k, s in servers.items()}
        for st in stubs.values():
            await st.ready()
        samples: dict[tuple[str, str, int], list[float]] = {}
        for t in range(args.trials):
            for n in args.sizes:
                for key, st in stubs.items():
                    sids = [f"p{n}-{t}-{j}-{uuid.uuid4().hex[:6]}" for j in range(INTERLEAVE)]
                    await w.create_sessions(st, sids)
                    await w.populate(st, sids, n, concurrency=INTERLEAVE, seed=n + t)
                    got = await w.sequential_commits(st, sids, time_budget=240)
                    samples.setdefault((*key, n), []).extend(got.phase1)
                    print(f"trial {t} {key[0]:8} {key[1]} {n:5} msgs: Phase 1 p50 "
                          f"{1000 * h.percentile(got.phase1, 50):7.2f} ms", flush=True)
        for st in stubs.values():
            await st.close()
        print(f"\n| Commit Phase 1, p50 ({args.trials} x {INTERLEAVE} commits, base "
              f"{args.base}) | store | old | new | old/new |")
        print("|---|---|---|---|---|")
        p50 = {k: 1000 * h.percentile(v, 50) for k, v in samples.items()}
        for n in args.sizes:
            for store in stores:
                a, b = p50[(store, "old", n)], p50[(store, "new", n)]
                print(f"| {n:,} msgs | {store} | {a:.2f} ms | {b:.2f} ms | {a / b:.2f}x |")
            if len(stores) == 2:
                for rev in ("old", "new"):
                    a, b = p50[("sqlite", rev, n)], p50[("postgres", rev, n)]
                    print(f"| {n:,} msgs, SQLite/PostgreSQL | {rev} | {a:.2f} ms | "
                          f"{b:.2f} ms | {a / b:.2f}x |")
    finally:
        for s in servers.values():
            s.stop()
        for name in dbs:
            await pg_drop_db(name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="main")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--stores", default="sqlite,postgres")
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
