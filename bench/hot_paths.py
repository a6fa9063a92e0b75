"""The request hot paths of two source revisions side by side, against the floor.

    .venv/bin/python bench/hot_paths.py [--base REV] [--stores sqlite,postgres]
                                        [--rounds 3] [--seconds 3] [--figures add,commit,fanout]

Servers: this worktree's code ("new"), --base ("old", default main; exported with
`git archive` into a temporary directory and put first on PYTHONPATH) and the no-op
floor (bench/floor_server.py), per store, all running at once (fresh data directory
or database each). Each round measures, in turn floor / old / new (the order of old
and new alternates from round to round):

- add: AddMessage at c1 and c16 (bench/run.py's workload: 500-byte text parts, worker
  i appends to session add-i), throughput, p50 and the server's CPU per call;
- commit: Commit Phase 1 of 100 messages (8 sessions filled 8 at a time, so their
  rows interleave as in bench/run.py; committed one after another, each after the
  previous Phase 2 ended); the floor's unary p50 at c1 is the baseline;
- fanout: WatchTask delivery to 1,000 watchers (bench/run.py's fan-out: a server
  with `--workers 0` holds a pending task, CancelTask writes its terminal event).

Prints per figure the median over rounds for each revision, and its ratio to the
floor measured in the same rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python bench/x.py): make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import harness as h
from bench import workloads as w
from bench.commit_phase1 import export
from bench.fanout import fanout_round
from bench.run import (
    FANOUT_WATCHERS,
    INTERLEAVE,
    cancel_trigger,
    new_pending_task,
    pg_create_db,
    pg_drop_db,
    start_floor,
)

REVS = ("old", "new")


@dataclass
class Figure:
    """Per revision (and "floor"): one value per round."""

    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, rev: str, value: float) -> None:
        self.values.setdefault(rev, []).append(value)

    def med(self, rev: str) -> float:
        return h.median(self.values.get(rev, []))


def serve_cmd(store_arg: str, data: Path, extra: list[str]) -> list[str]:
    return [h.python_exe(), "-m", "sessiond.server.cli", "serve", "--address", "127.0.0.1:0",
            "--store", store_arg, "--data-dir", str(data), "--shutdown-grace", "2",
            "--limit-watch-streams-per-identity", "5000", *extra]


async def add_trial(stubs: w.Stubs, pid: int, sessions: list[str], conc: int,
                    seconds: float) -> tuple[float, float, float]:
    """(calls/s, p50 ms, server CPU µs per call) of one closed-loop AddMessage trial."""
    c0 = h.cpu_seconds(pid)
    r = await w.closed_loop(w.add_message_caller(stubs, sessions), conc, seconds, 0.3)
    cpu = h.cpu_seconds(pid) - c0
    calls = max(r.count, 1)
    return r.throughput, 1000 * h.percentile(r.latencies, 50), 1e6 * cpu / calls


async def commit_trial(stubs: w.Stubs, n: int, tag: str) -> list[float]:
    sids = [f"c{n}-{tag}-{j}-{uuid.uuid4().hex[:6]}" for j in range(INTERLEAVE)]
    await w.create_sessions(stubs, sids)
    await w.populate(stubs, sids, n, concurrency=INTERLEAVE, seed=n)
    got = await w.sequential_commits(stubs, sids, time_budget=120)
    return got.phase1


async def bench_store(store: str, args: argparse.Namespace, old_path: str, work: Path,
                      figs: dict[str, Figure]) -> None:
    dbs: list[str] = []
    servers: dict[str, h.ServerProc] = {}
    stubs: dict[str, w.Stubs] = {}
    try:
        servers["floor"] = start_floor(work / f"{store}-floor")
        for rev in REVS:
            arg = "sqlite"
            if store == "postgres":
                name, arg = await pg_create_db()
                dbs.append(name)
            env = {"PYTHONPATH": old_path} if rev == "old" else {}
            servers[rev] = h.start_server(
                f"{store}-{rev}", serve_cmd(arg, work / f"{store}-{rev}", []),
                work / f"{store}-{rev}.log", env=env, timeout=120)
            if "fanout" in args.figures:
                if store == "postgres":  # a database of its own: no worker may claim its task
                    name, arg = await pg_create_db()
                    dbs.append(name)
                servers[f"{rev}-fan"] = h.start_server(
                    f"{store}-{rev}-fan",
                    serve_cmd(arg, work / f"{store}-{rev}-fan", ["--workers", "0"]),
                    work / f"{store}-{rev}-fan.log", env=env, timeout=120)
        for k, s in servers.items():
            stubs[k] = w.Stubs.connect(s.target)
            await stubs[k].ready()
        add_ids = [f"add-{i}" for i in range(16)]
        for k in ("old", "new"):
            await w.create_sessions(stubs[k], add_ids)
        for r in range(args.rounds):
            order = ["floor", *(REVS if r % 2 == 0 else REVS[::-1])]
            if "add" in args.figures:
                for conc in (1, 16):
                    for k in order:
                        rps, p50, cpu = await add_trial(stubs[k], servers[k].pid, add_ids,
                                                        conc, args.seconds)
                        figs.setdefault(f"{store} AddMessage c{conc} calls/s",
                                        Figure()).add(k, rps)
                        figs.setdefault(f"{store} AddMessage c{conc} p50 ms",
                                        Figure()).add(k, p50)
                        figs.setdefault(f"{store} AddMessage c{conc} server CPU us/call",
                                        Figure()).add(k, cpu)
            if "commit" in args.figures:
                _, p50, _ = await add_trial(stubs["floor"], servers["floor"].pid, add_ids, 1,
                                            1.0)
                figs.setdefault(f"{store} Commit Phase 1 100 msgs p50 ms",
                                Figure()).add("floor", p50)
                for k in order[1:]:
                    lat = await commit_trial(stubs[k], 100, f"{r}{k}")
                    figs.setdefault(f"{store} Commit Phase 1 100 msgs p50 ms",
                                    Figure()).add(k, 1000 * h.percentile(lat, 50))
            if "fanout" in args.figures:
                log = work / f"{store}-watchers.log"
                for k in order:
                    if k == "floor":
                        tid = f"hold-{r}-{uuid.uuid4().hex[:8]}"
                        fr = await fanout_round(servers[k].target, tid, FANOUT_WATCHERS, 1, 0,
                                                cancel_trigger(stubs[k], tid), servers[k].pid,
                                                log, settle=0.3)
                    else:
                        fk = f"{k}-fan"
                        tid = await new_pending_task(stubs[fk], f"fan-{r}-{uuid.uuid4().hex[:6]}")
                        fr = await fanout_round(servers[fk].target, tid, FANOUT_WATCHERS, 1, 1,
                                                cancel_trigger(stubs[fk], tid),
                                                servers[fk].pid, log, settle=0.3)
                    figs.setdefault(f"{store} WatchTask 1,000 watchers p99 ms",
                                    Figure()).add(k, 1000 * h.percentile(fr.delays, 99))
            print(f"[{time.strftime('%H:%M:%S')}] {store}: round {r + 1} done, load "
                  f"{h.loadavg()[0]:.1f}", flush=True)
    finally:
        for st in stubs.values():
            with contextlib.suppress(Exception):
                await st.close()
        for s in servers.values():
            s.stop()
        for name in dbs:
            await pg_drop_db(name)


def report(figs: dict[str, Figure], base: str, rounds: int) -> str:
    lines = [f"| figure (median of {rounds} rounds; base {base}) | floor | old | new | "
             "old/floor | new/floor | per-round old -> new |", "|---|---|---|---|---|---|---|"]
    for name, f in figs.items():
        fl, old, new = f.med("floor"), f.med("old"), f.med("new")
        pairs = ", ".join(f"{a:.4g}->{b:.4g}" for a, b in zip(f.values.get("old", []),
                                                              f.values.get("new", []),
                                                              strict=False))
        lines.append(f"| {name} | {fl:.4g} | {old:.4g} | {new:.4g} | {h.ratio(old, fl):.2f}x "
                     f"| {h.ratio(new, fl):.2f}x | {pairs} |")
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="sessiond-hot-"))
    old_path = export(args.base, work / "old-src")
    figs: dict[str, Figure] = {}
    for store in args.stores.split(","):
        await bench_store(store, args, old_path, work, figs)
    print()
    print(report(figs, args.base, args.rounds))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="main")
    ap.add_argument("--stores", default="sqlite,postgres")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--figures", default="add,commit,fanout",
                    help="comma-separated subset of add, commit, fanout")
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
