"""Phase 2 end to end and commit throughput, for several source trees side by side.

    python bench/phase2_trees.py /path/to/old/tree /work/main [--commits 40]
                                 [--concurrent 16 --commit-rounds 10] [--rounds 3]

For each tree, a fresh `sessiond serve` (SQLite, product defaults) is started from that
tree (PYTHONPATH) and measured:
- one at a time: `--commits` sessions each add 10 messages, Commit, and wait on
  WatchTask for COMPLETED; the p50 of Commit -> COMPLETED (the first 5 are warm-up)
  and the server's CPU time per commit cycle (AddMessage x10 + Commit + Phase 2 +
  the watch);
- with `--concurrent N`: N sessions, filled beforehand, each committing 10 messages
  `--commit-rounds` times (bench/run.py's commits/s workload); commits completed per
  second and server CPU ms per commit (Commit + Phase 2 + the watch).
Trees are measured in turn, `--rounds` times (A B A B ...), and the median of the
rounds is printed, so drift on a shared machine hits every tree alike. CPU time per
commit is the steadier figure on a loaded machine: waiting for the CPU does not count.
(`git worktree add --detach DIR REV` makes an old tree.)
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from sessiond.v1 import session_pb2, session_pb2_grpc, task_pb2, task_pb2_grpc

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import cpu_seconds


@dataclass
class Figures:
    e2e_p50_ms: list[float] = field(default_factory=list)
    cpu_ms_per_commit: list[float] = field(default_factory=list)
    commits_per_s: list[float] = field(default_factory=list)
    cpu_ms_per_commit_conc: list[float] = field(default_factory=list)


def _cycle(ss: session_pb2_grpc.SessionServiceStub, ts: task_pb2_grpc.TaskServiceStub,
           sid: str) -> float:
    """Add 10 messages, Commit, watch to COMPLETED; seconds from Commit to COMPLETED."""
    for j in range(10):
        ss.AddMessage(session_pb2.AddMessageRequest(
            session_id=sid, role=session_pb2.ROLE_USER, parts=[session_pb2.Part(
                text=session_pb2.TextPart(text=f"message {j} about project Atlas"))]))
    t = time.perf_counter()
    reply = ss.Commit(session_pb2.CommitRequest(session_id=sid))
    for item in ts.WatchTask(task_pb2.WatchTaskRequest(task_id=reply.task_id), timeout=60):
        if item.HasField("event") and item.event.state in (
                task_pb2.TASK_STATE_COMPLETED, task_pb2.TASK_STATE_FAILED):
            break
    return time.perf_counter() - t


def run(tree: str, commits: int, concurrent: int, rounds: int, out: Figures) -> None:
    env = dict(os.environ, PYTHONPATH=f"{tree}/server:{tree}/clients")
    data = tempfile.mkdtemp(prefix="sessiond-p2-")
    proc = subprocess.Popen([sys.executable, "-m", "sessiond.server.cli", "serve",
                             "--address", "127.0.0.1:0", "--data-dir", data],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        port = 0
        assert proc.stdout is not None
        for line in proc.stdout:
            if m := re.search(r"serving on [\d.]+:(\d+)", line):
                port = int(m.group(1))
                break
        threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep it drained
        ch = grpc.insecure_channel(f"127.0.0.1:{port}")
        ss = session_pb2_grpc.SessionServiceStub(ch)
        ts = task_pb2_grpc.TaskServiceStub(ch)
        lat: list[float] = []
        cpu0 = 0.0
        for i in range(commits):
            if i == 5:
                cpu0 = cpu_seconds(proc.pid)
            sid = f"s{i}"
            ss.GetSession(session_pb2.GetSessionRequest(session_id=sid, auto_create=True))
            lat.append(_cycle(ss, ts, sid))
        out.e2e_p50_ms.append(1000 * statistics.median(lat[5:]))
        out.cpu_ms_per_commit.append(1000 * (cpu_seconds(proc.pid) - cpu0) / (commits - 5))
        if concurrent:
            # As bench/run.py's commits/s: each session is filled first (not measured),
            # then commits `rounds` times, 10 messages each (keep_recent_count leaves
            # the rest live), waiting for each commit's COMPLETED before the next.
            sids = [f"c{k}" for k in range(concurrent)]
            for sid in sids:
                ss.GetSession(session_pb2.GetSessionRequest(session_id=sid, auto_create=True))
                for j in range(rounds * 10):
                    ss.AddMessage(session_pb2.AddMessageRequest(
                        session_id=sid, role=session_pb2.ROLE_USER, parts=[session_pb2.Part(
                            text=session_pb2.TextPart(text=f"message {j} about project Atlas"))]))

            def worker(sid: str) -> None:
                for r in range(rounds):
                    reply = ss.Commit(session_pb2.CommitRequest(
                        session_id=sid, keep_recent_count=(rounds - r - 1) * 10))
                    for item in ts.WatchTask(task_pb2.WatchTaskRequest(task_id=reply.task_id),
                                             timeout=60):
                        if item.HasField("event") and item.event.state in (
                                task_pb2.TASK_STATE_COMPLETED, task_pb2.TASK_STATE_FAILED):
                            break

            c0, t0 = cpu_seconds(proc.pid), time.monotonic()
            threads = [threading.Thread(target=worker, args=(sid,)) for sid in sids]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            elapsed, n = time.monotonic() - t0, concurrent * rounds
            out.commits_per_s.append(n / elapsed)
            out.cpu_ms_per_commit_conc.append(1000 * (cpu_seconds(proc.pid) - c0) / n)
        ch.close()
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trees", nargs="+")
    ap.add_argument("--commits", type=int, default=40)
    ap.add_argument("--concurrent", type=int, default=0, metavar="N",
                    help="also N sessions committing at once (0: skip)")
    ap.add_argument("--commit-rounds", type=int, default=10,
                    help="commits per session with --concurrent")
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    figs = {t: Figures() for t in args.trees}
    for _ in range(args.rounds):
        for tree in args.trees:
            run(tree, args.commits, args.concurrent, args.commit_rounds, figs[tree])
    med = statistics.median
    for tree, f in figs.items():
        line = (f"{tree}: Phase 2 e2e p50 {med(f.e2e_p50_ms):.1f} ms, server CPU "
                f"{med(f.cpu_ms_per_commit):.1f} ms/commit (one at a time)")
        if f.commits_per_s:
            line += (f"; c{args.concurrent}: {med(f.commits_per_s):.1f} commits/s, server CPU "
                     f"{med(f.cpu_ms_per_commit_conc):.1f} ms/commit")
        print(line + f"  [{args.rounds} round(s)]", flush=True)


if __name__ == "__main__":
    main()
