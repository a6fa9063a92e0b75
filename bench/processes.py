"""`sessiond serve --processes N` on PostgreSQL: AddMessage c16 throughput and
commits/s at N = 1 and N = 2, side by side.

    .venv/bin/python bench/processes.py [--trials 3] [--seconds 4] [--rounds 8]
                                        [--client-procs 2] [--channels 8]

Both servers run for the whole benchmark, each on its own fresh database, with the
product defaults. Trials alternate (N=1, N=2, N=1, ...) so that other load on the
machine hits both alike; the figures are medians over trials, and the ratio N=2/N=1.

- AddMessage c16: a closed loop of 16 workers from --client-procs loadgen processes
  (bench/loadgen.py), each with --channels connections (a connection stays with the
  process that accepted it; the kernel spreads connections over the processes).
- Commits/s: 16 sessions, each commits 10 messages and waits on WatchTask for the
  task's terminal event before the next commit, --rounds times; the sessions are
  spread over 8 connections. Completed commits per second of the whole trial.

Server CPU is the sum over the parent and its children, PostgreSQL CPU the sum over
every postgres process, machine CPU all cores' busy time (each in % of one core): on a
small machine the clients and PostgreSQL share the cores with the servers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (python bench/x.py): make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import harness as h
from bench import workloads as w
from bench.run import pg_create_db, pg_drop_db

PIDS = re.compile(r"processes: pids ([\d, ]+)\)")
CONC = 16
PER_COMMIT = 10


class Server:
    def __init__(self, n: int, proc: h.ServerProc) -> None:
        self.n, self.proc = n, proc
        m = PIDS.search(proc.log_path.read_text(errors="replace"))
        self.children = [int(p) for p in m.group(1).split(", ")] if m else []

    @property
    def pids(self) -> dict[str, int]:
        return {"parent": self.proc.pid, **{f"c{i}": p for i, p in enumerate(self.children)}}


def start(n: int, url: str, workdir: Path) -> Server:
    cmd = [*h.sessiond_cmd(), "serve", "--address", "127.0.0.1:0", "--store", url,
           "--data-dir", str(workdir / f"n{n}-data"), "--shutdown-grace", "2"]
    if n > 1:
        cmd += ["--processes", str(n)]
    return Server(n, h.start_server(f"n{n}", cmd, workdir / f"n{n}.log", timeout=120))


def server_cpu(meter: h.CpuMeter, pids: dict[str, int]) -> float:
    got = meter.read()
    return round(sum(got[k] for k in pids), 1)


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all cores from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + vals[4]
    return float(sum(vals) - idle), float(sum(vals))


def postgres_seconds() -> float:
    """CPU seconds of every postgres process (the server's backends included)."""
    total = 0.0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if (d / "comm").read_text().strip() == "postgres":
                total += h.cpu_seconds(int(d.name))
        except OSError:
            continue
    return total


class Machine:
    """Whole-machine and PostgreSQL CPU over a window, % of one core."""

    def __init__(self) -> None:
        self.t0, self.b0, self.pg0 = time.monotonic(), machine_busy(), postgres_seconds()

    def read(self) -> dict[str, float]:
        dt = time.monotonic() - self.t0
        b1, pg1 = machine_busy(), postgres_seconds()
        cores = os.cpu_count() or 1
        busy = (b1[0] - self.b0[0]) / max(1.0, b1[1] - self.b0[1])
        return {"machine": round(100 * cores * busy, 1),
                "postgres": round(100 * (pg1 - self.pg0) / dt, 1)}


async def add_trial(srv: Server, sessions: list[str], args: argparse.Namespace,
                    log: Path) -> dict[str, Any]:
    start_at = time.time() + 2.0
    per = CONC // args.client_procs
    meter: h.CpuMeter | None = None
    procs = []
    with log.open("ab") as err:
        for k in range(args.client_procs):
            mine = sessions[k * per:(k + 1) * per]  # no two workers share a session
            procs.append(await asyncio.create_subprocess_exec(
                h.python_exe(), str(h.BENCH_DIR / "loadgen.py"), "--target", srv.proc.target,
                "--concurrency", str(per), "--duration", str(args.seconds), "--warmup", "0.5",
                "--start-at", str(start_at), "--sessions", ",".join(mine),
                "--channels", str(args.channels), stdout=asyncio.subprocess.PIPE, stderr=err))
        await asyncio.sleep(max(0.0, start_at + 0.5 - time.time()))
        meter = h.CpuMeter(srv.pids)
        mach = Machine()
        results = []
        for p in procs:
            assert p.stdout is not None
            out = await asyncio.wait_for(p.stdout.read(), 60 + args.seconds)
            await p.wait()
            results += [json.loads(line[7:]) for line in out.decode().splitlines()
                        if line.startswith("RESULT ")]
    cpu = server_cpu(meter, srv.pids)
    m = mach.read()
    lat = [x for r in results for x in r["latencies"]]
    dur = max(r["elapsed"] for r in results)
    return {"rps": sum(r["count"] for r in results) / dur, "p50_ms": 1000 * h.percentile(lat, 50),
            "errors": sum(r["errors"] for r in results), "cpu": cpu, **m}


async def commit_trial(srv: Server, stubs: list[w.Stubs], rounds: int) -> dict[str, Any]:
    sids = [f"c-{uuid.uuid4().hex[:8]}-{i}" for i in range(CONC)]
    groups = [sids[k::len(stubs)] for k in range(len(stubs))]
    for s, g in zip(stubs, groups, strict=True):
        await w.create_sessions(s, g)
        await w.populate(s, g, rounds * PER_COMMIT, concurrency=len(g))
    meter = h.CpuMeter(srv.pids)
    mach = Machine()
    t0 = time.perf_counter()
    outs = await asyncio.gather(*(w.concurrent_commits(s, g, rounds, PER_COMMIT)
                                  for s, g in zip(stubs, groups, strict=True)))
    dt = time.perf_counter() - t0
    cpu = server_cpu(meter, srv.pids)
    m = mach.read()
    done = sum(o.completed for o in outs)
    return {"commits_per_s": done / dt, "completed": done, **m,
            "failed": sum(o.failed for o in outs), "cpu": cpu,
            "phase1_p50_ms": 1000 * h.percentile([x for o in outs for x in o.phase1], 50),
            "e2e_p50_ms": 1000 * h.percentile([x for o in outs for x in o.e2e], 50)}


async def main_async(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="sessiond-procs-"))
    dbs = [await pg_create_db() for _ in (1, 2)]
    servers: list[Server] = []
    try:
        servers = [start(n, url, workdir) for n, (_, url) in zip((1, 2), dbs, strict=True)]
        stubs = {s.n: [w.Stubs.connect(s.proc.target, own_connection=True) for _ in range(8)]
                 for s in servers}
        for ss in stubs.values():
            for st in ss:
                await st.ready()
        add_ids = [f"add-{i}" for i in range(CONC)]
        for s in servers:
            await w.create_sessions(stubs[s.n][0], add_ids)
        res: dict[int, dict[str, list[Any]]] = {s.n: {"add": [], "commit": []} for s in servers}
        for t in range(args.trials):
            for s in servers:
                r = await add_trial(s, add_ids, args, workdir / "loadgen.log")
                res[s.n]["add"].append(r)
                print(f"trial {t} N={s.n} AddMessage c16 {r['rps']:.0f}/s p50 "
                      f"{r['p50_ms']:.2f} ms cpu {r['cpu']:.0f}% (postgres {r['postgres']:.0f}%, "
                      f"machine {r['machine']:.0f}%) errors {r['errors']}", flush=True)
            for s in servers:
                r = await commit_trial(s, stubs[s.n], args.rounds)
                res[s.n]["commit"].append(r)
                print(f"trial {t} N={s.n} commits {r['commits_per_s']:.1f}/s "
                      f"({r['completed']} done, {r['failed']} failed) cpu {r['cpu']:.0f}% "
                      f"(postgres {r['postgres']:.0f}%, machine {r['machine']:.0f}%) "
                      f"phase1 p50 {r['phase1_p50_ms']:.1f} ms e2e p50 {r['e2e_p50_ms']:.1f} ms",
                      flush=True)
        for ss in stubs.values():
            for st in ss:
                await st.close()
        med = {n: {"rps": h.median([x["rps"] for x in r["add"]]),
                   "add_p50": h.median([x["p50_ms"] for x in r["add"]]),
                   "add_cpu": h.median([x["cpu"] for x in r["add"]]),
                   "add_pg": h.median([x["postgres"] for x in r["add"]]),
                   "add_machine": h.median([x["machine"] for x in r["add"]]),
                   "commit_pg": h.median([x["postgres"] for x in r["commit"]]),
                   "commit_machine": h.median([x["machine"] for x in r["commit"]]),
                   "cps": h.median([x["commits_per_s"] for x in r["commit"]]),
                   "commit_cpu": h.median([x["cpu"] for x in r["commit"]]),
                   "e2e": h.median([x["e2e_p50_ms"] for x in r["commit"]])}
               for n, r in res.items()}
        a, b = med[1], med[2]
        print(f"\n| figure (PostgreSQL, {args.trials} trials, medians) | N=1 | N=2 | N=2/N=1 |")
        print("|---|---|---|---|")
        for label, key, fmt in (("AddMessage c16 throughput", "rps", "{:,.0f}/s"),
                                ("AddMessage c16 p50", "add_p50", "{:.2f} ms"),
                                ("server CPU during AddMessage", "add_cpu", "{:.0f}%"),
                                ("PostgreSQL CPU during AddMessage", "add_pg", "{:.0f}%"),
                                ("machine CPU during AddMessage", "add_machine", "{:.0f}%"),
                                ("Commits completed/s, 16 sessions", "cps", "{:.1f}"),
                                ("server CPU during commits", "commit_cpu", "{:.0f}%"),
                                ("PostgreSQL CPU during commits", "commit_pg", "{:.0f}%"),
                                ("machine CPU during commits", "commit_machine", "{:.0f}%"),
                                ("Phase 2 e2e p50 under that load", "e2e", "{:.1f} ms")):
            print(f"| {label} | {fmt.format(a[key])} | {fmt.format(b[key])} | "
                  f"{b[key] / a[key]:.2f}x |")
    finally:
        for s in servers:
            s.proc.stop()
        for name, _ in dbs:
            await pg_drop_db(name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--client-procs", type=int, default=2)
    ap.add_argument("--channels", type=int, default=8)
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
