"""Recall latency against the number of indexed items per user, both backends, with and
without an embedder, beside the floor.

    .venv/bin/python bench/recall_latency.py [--items 1000 10000 100000]
        [--stores sqlite,postgres] [--embedder none|local|both] [--queries 300]

For each store and size: a fresh store (data directory, or a new PostgreSQL
database), one user whose sessions hold that many archived messages (synthetic
Zipf-distributed text, 2,000 per session, appended with AddMessages and committed 500
at a time, Phase 2 waited for), then --queries Recall calls (5 words each, default
budget) interleaved with as many no-op unary calls on the floor server
(bench/floor_server.py, same server options).

With the embedder (`local`, all-MiniLM-L6-v2): the server is stopped, every entry of
the index gets a vector written straight into `recall_vectors` (random unit vectors
of the model's 384 dimensions under the model's name: embedding 100,000 texts with the
model would take most of an hour on 2 cores, and a query's cost does not depend on
the stored values), and the server is started again with `--embedder local`. The
first Recall after the start is reported on its own (it loads the user's vectors
into the cache), then the same query mix runs: each query is embedded by the model
and fused with the lexical ranking.

Prints one line per (store, size, embedder): items indexed, Recall p50/p99, the
floor's p50/p99, the p50 ratio.

--base REV (no embedder only): after the fill, this code ("new") and REV ("old",
exported with `git archive`, first on PYTHONPATH; it must know the schema version) each
serve the same data (SQLite: a copy of the data directory; PostgreSQL: the same
database), and the queries alternate old, new, floor: the two revisions side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from sessiond.v1 import (
    memory_pb2,
    memory_pb2_grpc,
    session_pb2,
    session_pb2_grpc,
    task_pb2,
    task_pb2_grpc,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.harness import (
    BENCH_DIR,
    REPO_DIR,
    percentile,
    python_exe,
    sessiond_cmd,
    start_server,
)
from bench.run import pg_create_db, pg_drop_db

MD = (("x-sessiond-user", "latency"),)
PER_SESSION = 2000
PER_COMMIT = 500
DIMS = 384


def vocabulary(n: int, rnd: random.Random) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rnd.choice(letters) for _ in range(rnd.randint(3, 9))) for _ in range(n)]


def fill(channel: grpc.Channel, items: int, rnd: random.Random, words: list[str]) -> None:
    ss = session_pb2_grpc.SessionServiceStub(channel)
    ts = task_pb2_grpc.TaskServiceStub(channel)
    weights = [1.0 / (i + 1) for i in range(len(words))]
    done = 0
    while done < items:
        sid = f"s{done // PER_SESSION}"
        ss.GetSession(session_pb2.GetSessionRequest(session_id=sid, auto_create=True),
                      metadata=MD)
        batch = min(PER_COMMIT, items - done)
        msgs = [session_pb2.NewMessage(role=session_pb2.ROLE_USER, parts=[session_pb2.Part(
            text=session_pb2.TextPart(text=" ".join(rnd.choices(words, weights,
                                                                k=rnd.randint(8, 30)))))])
            for _ in range(batch)]
        ss.AddMessages(session_pb2.AddMessagesRequest(session_id=sid, messages=msgs),
                       metadata=MD, timeout=120)
        reply = ss.Commit(session_pb2.CommitRequest(session_id=sid), metadata=MD)
        for resp in ts.WatchTask(task_pb2.WatchTaskRequest(task_id=reply.task_id),
                                 metadata=MD, timeout=1800):
            if resp.HasField("event") and resp.event.state in (
                    task_pb2.TASK_STATE_COMPLETED, task_pb2.TASK_STATE_FAILED):
                break
        done += batch


def local_model_name() -> str:
    """The name the local embedder stores its vectors under (embedders/local.py)."""
    from sessiond.server.config import EmbedderSettings
    from sessiond.server.embedders.local import model_dir

    path = model_dir(EmbedderSettings())
    return f"local:{path.name if path.name != 'model' else path.parent.name}"


def unit_vectors(n: int, rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal((n, DIMS)).astype("<f4")
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


COPY = ("SELECT entry_id, account, user_id, agent, kind, time FROM recall_entries "
        "ORDER BY entry_id")


def write_vectors_sqlite(data_dir: Path, model: str) -> int:
    conn = sqlite3.connect(str(data_dir / "sessiond.sqlite3"))
    try:
        rows = conn.execute(COPY).fetchall()
        vecs = unit_vectors(len(rows), np.random.default_rng(1))
        conn.executemany("INSERT INTO recall_vectors (entry_id, model, account, user_id, "
                         "agent, kind, time, vector) VALUES (?,?,?,?,?,?,?,?)",
                         [(r[0], model, r[1], r[2], r[3], r[4], r[5], vecs[i].tobytes())
                          for i, r in enumerate(rows)])
        conn.commit()
        return len(rows)
    finally:
        conn.close()


async def write_vectors_pg(url: str, model: str) -> int:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(COPY)
        vecs = unit_vectors(len(rows), np.random.default_rng(1))
        await conn.executemany(
            "INSERT INTO recall_vectors (entry_id, model, account, user_id, agent, kind, "
            "time, vector) VALUES ($1,$2,$3,$4,$5,$6,$7,$8)",
            [(r[0], model, r[1], r[2], r[3], r[4], r[5], vecs[i].tobytes())
             for i, r in enumerate(rows)])
        await conn.execute("ANALYZE")
        return len(rows)
    finally:
        await conn.close()


def entries(store: str, data_dir: Path, url: str) -> int:
    if store == "sqlite":
        conn = sqlite3.connect(str(data_dir / "sessiond.sqlite3"))
        try:
            return int(conn.execute("SELECT COUNT(*) FROM recall_entries").fetchone()[0])
        finally:
            conn.close()

    async def count() -> int:
        import asyncpg

        conn = await asyncpg.connect(url)
        try:
            return int(await conn.fetchval("SELECT COUNT(*) FROM recall_entries"))
        finally:
            await conn.close()

    return asyncio.run(count())


def queries(ch: grpc.Channel, fstub: Any, n: int, rnd: random.Random,
            words: list[str]) -> tuple[list[float], list[float]]:
    mem = memory_pb2_grpc.MemoryServiceStub(ch)
    rec, flo = [], []
    for _ in range(n):
        q = " ".join(rnd.choices(words[:2000], k=5))
        t = time.perf_counter()
        mem.Recall(memory_pb2.RecallRequest(query=q), metadata=MD, timeout=60)
        rec.append(time.perf_counter() - t)
        t = time.perf_counter()
        fstub.GetSession(session_pb2.GetSessionRequest(session_id="x"))
        flo.append(time.perf_counter() - t)
    return rec, flo


def export(rev: str, into: Path) -> str:
    """`git archive REV server clients` into `into`; the PYTHONPATH that runs it."""
    into.mkdir(parents=True, exist_ok=True)
    tar = subprocess.run(["git", "-C", str(REPO_DIR), "archive", rev, "server", "clients"],
                         capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=tar, check=True)
    return f"{into / 'server'}{os.pathsep}{into / 'clients'}"


def side_by_side(store: str, n: int, items: int, url: str, data: Path, args: argparse.Namespace,
                 tmp: Path, fstub: Any, rnd: random.Random, words: list[str]) -> None:
    """Old and new revision on the same data, queries alternating."""
    old_data = tmp / f"{store}-{n}-old"
    if store == "sqlite":
        shutil.copytree(data, old_data)
    env = {"PYTHONPATH": export(args.base, tmp / "old-src")}
    procs = []
    try:
        for name, d, e in (("old", old_data, env), ("new", data, None)):
            cmd = [python_exe(), "-m", "sessiond.server.cli", "serve", "--address",
                   "127.0.0.1:0", "--data-dir", str(d), "--store", url, "--shutdown-grace",
                   "2", "--embedder", "none"]
            procs.append(start_server(f"{store}-{n}-{name}", cmd,
                                      tmp / f"{store}-{n}-{name}.log", env=e, timeout=120))
        chans = [grpc.insecure_channel(p.target) for p in procs]
        mems = [memory_pb2_grpc.MemoryServiceStub(c) for c in chans]
        got: list[list[float]] = [[], []]
        flo: list[float] = []
        for _ in range(args.queries):
            q = " ".join(rnd.choices(words[:2000], k=5))
            for i, mem in enumerate(mems):
                t = time.perf_counter()
                mem.Recall(memory_pb2.RecallRequest(query=q), metadata=MD, timeout=60)
                got[i].append(time.perf_counter() - t)
            t = time.perf_counter()
            fstub.GetSession(session_pb2.GetSessionRequest(session_id="x"))
            flo.append(time.perf_counter() - t)
        for c in chans:
            c.close()
        for name, rec in zip(("old " + args.base, "new"), got, strict=True):
            line(store, n, items, f"none, {name}", rec, flo)
        o50, n50 = percentile(got[0], 50), percentile(got[1], 50)
        o99, n99 = percentile(got[0], 99), percentile(got[1], 99)
        print(f"  old/new p50 {o50 / n50:.2f}x, p99 {o99 / n99:.2f}x", flush=True)
    finally:
        for p in procs:
            p.stop()


def line(store: str, n: int, items: int, emb: str, rec: list[float], flo: list[float],
         first: float | None = None) -> None:
    r50, r99 = 1000 * percentile(rec, 50), 1000 * percentile(rec, 99)
    f50, f99 = 1000 * percentile(flo, 50), 1000 * percentile(flo, 99)
    extra = f"  first query {1000 * first:.0f} ms" if first is not None else ""
    print(f"| {store} | {n:,} | {items:,} | {emb} | {r50:.2f} / {r99:.2f} ms | "
          f"{f50:.2f} / {f99:.2f} ms | {r50 / f50:.1f}x |{extra}", flush=True)


def run_one(store: str, n: int, args: argparse.Namespace, tmp: Path, fstub: Any) -> None:
    rnd = random.Random(args.seed)
    words = vocabulary(5000, rnd)
    data = tmp / f"{store}-{n}"
    db, url = "", "sqlite"
    if store == "postgres":
        db, url = asyncio.run(pg_create_db())
    try:
        base = [*sessiond_cmd(), "serve", "--address", "127.0.0.1:0", "--data-dir",
                str(data), "--store", url, "--shutdown-grace", "2"]
        srv = start_server(f"{store}-{n}", [*base, "--embedder", "none"],
                           tmp / f"{store}-{n}.log", timeout=120)
        try:
            ch = grpc.insecure_channel(srv.target)
            t0 = time.perf_counter()
            fill(ch, n, rnd, words)
            filled = time.perf_counter() - t0
            items = entries(store, data, url)
            if args.embedder in ("none", "both"):
                rec, flo = queries(ch, fstub, args.queries, rnd, words)
                line(store, n, items, "none", rec, flo)
            ch.close()
        finally:
            srv.stop()
        print(f"  (filled in {filled:.0f} s)", flush=True)
        if args.base:
            side_by_side(store, n, items, url, data, args, tmp, fstub, rnd, words)
        if args.embedder in ("local", "both"):
            model = local_model_name()
            wrote = (write_vectors_sqlite(data, model) if store == "sqlite"
                     else asyncio.run(write_vectors_pg(url, model)))
            srv = start_server(f"{store}-{n}-emb", [*base, "--embedder", "local"],
                               tmp / f"{store}-{n}-emb.log", timeout=300)
            try:
                ch = grpc.insecure_channel(srv.target)
                mem = memory_pb2_grpc.MemoryServiceStub(ch)
                t = time.perf_counter()
                mem.Recall(memory_pb2.RecallRequest(query=" ".join(words[:5])), metadata=MD,
                           timeout=120)
                first = time.perf_counter() - t
                rec, flo = queries(ch, fstub, args.queries, rnd, words)
                line(store, n, wrote, "local", rec, flo, first)
                ch.close()
            finally:
                srv.stop()
    finally:
        if db:
            asyncio.run(pg_drop_db(db))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--stores", default="sqlite,postgres")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--embedder", default="both", choices=["none", "local", "both"])
    ap.add_argument("--base", default="", help="also run REV beside this code (see above)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sessiond-recall-lat-"))
    floor = start_server("floor", [python_exe(), str(BENCH_DIR / "floor_server.py"),
                                   "--address", "127.0.0.1:0"], tmp / "floor.log")
    fch = grpc.insecure_channel(floor.target)
    fstub = session_pb2_grpc.SessionServiceStub(fch)
    print("| store | messages | entries indexed | embedder | Recall p50 / p99 | "
          "floor p50 / p99 | ratio p50 |\n|---|---|---|---|---|---|---|", flush=True)
    try:
        for n in args.items:
            for store in args.stores.split(","):
                run_one(store, n, args, tmp, fstub)
    finally:
        fch.close()
        floor.stop()


if __name__ == "__main__":
    main()
