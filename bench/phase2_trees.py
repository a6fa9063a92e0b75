"""Phase 2 end to end, one commit at a time, for several source trees side by side.

    python bench/phase2_trees.py /path/to/old/tree /work/main [--commits 40]

For each tree: start `sessiond serve` from that tree (PYTHONPATH), then for each of
`--commits` sessions add 10 messages, Commit, and wait on WatchTask for COMPLETED;
print the p50 of Commit -> COMPLETED (the first 5 are warm-up). Trees are run one after
the other on the same machine, so a change's cost shows against its parent.
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
import time

import grpc
from sessiond.v1 import session_pb2, session_pb2_grpc, task_pb2, task_pb2_grpc


def run(tree: str, commits: int) -> float:
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
        ch = grpc.insecure_channel(f"127.0.0.1:{port}")
        ss = session_pb2_grpc.SessionServiceStub(ch)
        ts = task_pb2_grpc.TaskServiceStub(ch)
        lat: list[float] = []
        for i in range(commits):
            sid = f"s{i}"
            ss.GetSession(session_pb2.GetSessionRequest(session_id=sid, auto_create=True))
            for j in range(10):
                ss.AddMessage(session_pb2.AddMessageRequest(
                    session_id=sid, role=session_pb2.ROLE_USER, parts=[session_pb2.Part(
                        text=session_pb2.TextPart(text=f"message {j} about project Atlas"))]))
            t = time.perf_counter()
            reply = ss.Commit(session_pb2.CommitRequest(session_id=sid))
            for item in ts.WatchTask(task_pb2.WatchTaskRequest(task_id=reply.task_id),
                                     timeout=60):
                if item.HasField("event") and item.event.state == task_pb2.TASK_STATE_COMPLETED:
                    break
            lat.append(time.perf_counter() - t)
        ch.close()
        return 1000 * statistics.median(lat[5:])
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trees", nargs="+")
    ap.add_argument("--commits", type=int, default=40)
    args = ap.parse_args()
    for tree in args.trees:
        print(f"{tree}: Phase 2 e2e p50 {run(tree, args.commits):.1f} ms", flush=True)


if __name__ == "__main__":
    main()
