"""Recall latency against the number of indexed items per user, beside the floor.

    .venv/bin/python bench/recall_latency.py --items 1000 10000 [--store URL]

For each size: a fresh server, one user whose sessions hold that many archived
messages (synthetic Zipf-distributed text, a commit every 500 messages, Phase 2
waited for), then --queries Recall calls (5 words each, default budget) interleaved
with as many no-op unary calls on the floor server (bench/floor_server.py, same
server options). Prints p50/p99 of both and their ratio.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import grpc
from sessiond.v1 import (
    memory_pb2,
    memory_pb2_grpc,
    session_pb2,
    session_pb2_grpc,
    task_pb2,
    task_pb2_grpc,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.harness import BENCH_DIR, percentile, python_exe, sessiond_cmd, start_server

MD = (("x-sessiond-user", "latency"),)


def vocabulary(n: int, rnd: random.Random) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rnd.choice(letters) for _ in range(rnd.randint(3, 9))) for _ in range(n)]


def fill(channel: grpc.Channel, items: int, rnd: random.Random, words: list[str]) -> None:
    ss = session_pb2_grpc.SessionServiceStub(channel)
    ts = task_pb2_grpc.TaskServiceStub(channel)
    weights = [1.0 / (i + 1) for i in range(len(words))]
    done = 0
    while done < items:
        sid = f"s{done // 2000}"
        ss.GetSession(session_pb2.GetSessionRequest(session_id=sid, auto_create=True),
                      metadata=MD)
        batch = min(500, items - done)
        for _ in range(batch):
            text = " ".join(rnd.choices(words, weights, k=rnd.randint(8, 30)))
            ss.AddMessage(session_pb2.AddMessageRequest(
                session_id=sid, role=session_pb2.ROLE_USER,
                parts=[session_pb2.Part(text=session_pb2.TextPart(text=text))]), metadata=MD)
        reply = ss.Commit(session_pb2.CommitRequest(session_id=sid), metadata=MD)
        for resp in ts.WatchTask(task_pb2.WatchTaskRequest(task_id=reply.task_id),
                                 metadata=MD, timeout=1800):
            if resp.HasField("event") and resp.event.state in (
                    task_pb2.TASK_STATE_COMPLETED, task_pb2.TASK_STATE_FAILED):
                break
        done += batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--store", default="")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--embedder", default="none", choices=["none", "local"],
                    help="local: the query is embedded too and the dense ranking fused")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sessiond-recall-lat-"))
    floor = start_server("floor", [python_exe(), str(BENCH_DIR / "floor_server.py"),
                                   "--address", "127.0.0.1:0"], tmp / "floor.log")
    fch = grpc.insecure_channel(floor.target)
    fstub = session_pb2_grpc.SessionServiceStub(fch)
    print(f"{'items':>8}{'recall p50':>12}{'p99':>9}{'floor p50':>11}{'p99':>9}{'ratio p50':>11}")
    try:
        for n in args.items:
            rnd = random.Random(args.seed)
            words = vocabulary(5000, rnd)
            cmd = [*sessiond_cmd(), "serve", "--address", "127.0.0.1:0",
                   "--data-dir", str(tmp / f"d{n}")]
            if args.store:
                cmd += ["--store", args.store]
            cmd += ["--embedder", args.embedder]
            srv = start_server(f"sessiond-{n}", cmd, tmp / f"server{n}.log")
            try:
                ch = grpc.insecure_channel(srv.target)
                fill(ch, n, rnd, words)
                mem = memory_pb2_grpc.MemoryServiceStub(ch)
                rec, flo = [], []
                for _ in range(args.queries):
                    q = " ".join(rnd.choices(words[:2000], k=5))
                    t = time.perf_counter()
                    mem.Recall(memory_pb2.RecallRequest(query=q), metadata=MD)
                    rec.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    fstub.GetSession(session_pb2.GetSessionRequest(session_id="x"))
                    flo.append(time.perf_counter() - t)
                ch.close()
            finally:
                srv.stop()
            r50, r99 = 1000 * percentile(rec, 50), 1000 * percentile(rec, 99)
            f50, f99 = 1000 * percentile(flo, 50), 1000 * percentile(flo, 99)
            print(f"{n:>8}{r50:>10.2f}ms{r99:>7.2f}ms{f50:>9.2f}ms{f99:>7.2f}ms"
                  f"{r50 / f50:>10.1f}x", flush=True)
    finally:
        fch.close()
        floor.stop()


if __name__ == "__main__":
    main()
