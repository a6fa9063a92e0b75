"""Recall benchmark: replay long conversations into a real sessiond, ask their
questions, and score what an agent gets back against BM25 over the raw turns,
computed in the same run.

    .venv/bin/python bench/recall.py                     # dev split, SQLite, offline
    .venv/bin/python bench/recall.py --store postgresql://postgres@127.0.0.1:5432/db
    .venv/bin/python bench/recall.py --data DIR --json out.json

Dataset format and the two measures: ../shared/eval/locomo-dev/README.md.
- answer recall: share of questions where >= half of the gold answer's content
  words appear in the text returned (cut to --max-chars);
- evidence recall@10: share of questions where an evidence turn is among the
  source messages of the top 10 items.
sessiond's text is what `MemoryService.Recall` returns for the question with the
conversation's session named (its overview plus items); the baseline is Okapi BM25
(k1 1.5, b 0.75) over every raw turn of the sessions before the last one, top turns
until the budget.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

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
from bench.harness import REPO_DIR, sessiond_cmd, start_server

DEFAULT_DATA = REPO_DIR.parent / "shared" / "eval" / "locomo-dev"
STOP = frozenset("a an the of in on at to for and or is was were be been it its this that "
                 "with by from as his her their they he she i you we my our your".split())
_TOK = re.compile(r"[a-z0-9]+")


def toks(text: str) -> list[str]:
    return _TOK.findall(text.lower())


def content_words(text: str) -> set[str]:
    return {t for t in toks(text) if t not in STOP}


def answer_hit(answer: str, text: str) -> bool:
    want = content_words(answer)
    if not want:
        return False
    have = set(toks(text))
    return len(want & have) * 2 >= len(want)


class BM25:
    def __init__(self, docs: list[str], k1: float = 1.5, b: float = 0.75) -> None:
        self.docs = docs
        self.tfs = [Counter(toks(d)) for d in docs]
        self.lens = [sum(tf.values()) for tf in self.tfs]
        self.avgdl = sum(self.lens) / max(1, len(docs))
        df: Counter[str] = Counter()
        for tf in self.tfs:
            df.update(tf.keys())
        n = len(docs)
        self.idf = {t: math.log(1 + (n - f + 0.5) / (f + 0.5)) for t, f in df.items()}
        self.k1, self.b = k1, b

    def rank(self, query: str) -> list[int]:
        q = set(toks(query))
        scores = []
        for i, tf in enumerate(self.tfs):
            s = 0.0
            norm = self.k1 * (1 - self.b + self.b * self.lens[i] / self.avgdl)
            for t in q:
                f = tf.get(t)
                if f:
                    s += self.idf[t] * f * (self.k1 + 1) / (f + norm)
            if s > 0:
                scores.append((s, i))
        scores.sort(key=lambda x: (-x[0], x[1]))
        return [i for _, i in scores]


def sessions_of(conv: dict[str, Any]) -> list[tuple[int, str, list[dict[str, Any]]]]:
    out = []
    for key in conv:
        m = re.fullmatch(r"session_(\d+)", key)
        if m and isinstance(conv[key], list):
            n = int(m.group(1))
            out.append((n, str(conv.get(f"session_{n}_date_time", "")), conv[key]))
    return sorted(out)


def turn_text(turn: dict[str, Any], date: str) -> str:
    return f"{turn['speaker']} ({date}): {turn['text']}"


def replay(channel: grpc.Channel, name: str, conv: dict[str, Any]) -> tuple[
        list[tuple[str, str]], dict[str, str], Any]:
    """Every turn an AddMessage, a Commit after each session, Phase 2 waited for."""
    md = (("x-sessiond-account", "bench"), ("x-sessiond-user", f"conv-{name}"),
          ("x-sessiond-agent", "agent"))
    ss = session_pb2_grpc.SessionServiceStub(channel)
    ts = task_pb2_grpc.TaskServiceStub(channel)
    sid = f"locomo-{name}"
    ss.GetSession(session_pb2.GetSessionRequest(session_id=sid, auto_create=True), metadata=md)
    raw: list[tuple[str, str]] = []  # (dia_id, text) of sessions before the last
    ids: dict[str, str] = {}  # dia_id -> message id
    sessions = sessions_of(conv)
    for n, date, turns in sessions:
        for turn in turns:
            text = turn_text(turn, date)
            role = (session_pb2.ROLE_USER if turn["speaker"] == conv["speaker_a"]
                    else session_pb2.ROLE_ASSISTANT)
            msg = ss.AddMessage(session_pb2.AddMessageRequest(
                session_id=sid, role=role,
                parts=[session_pb2.Part(text=session_pb2.TextPart(text=text))]), metadata=md)
            ids[turn["dia_id"]] = msg.message.id
            if n != sessions[-1][0]:
                raw.append((turn["dia_id"], text))
        reply = ss.Commit(session_pb2.CommitRequest(session_id=sid), metadata=md)
        if reply.archived:
            for resp in ts.WatchTask(task_pb2.WatchTaskRequest(task_id=reply.task_id),
                                     metadata=md, timeout=120):
                state = (resp.snapshot.state if resp.HasField("snapshot") else
                         resp.event.state if resp.HasField("event") else 0)
                if state == task_pb2.TASK_STATE_COMPLETED:
                    break
                if state in (task_pb2.TASK_STATE_FAILED, task_pb2.TASK_STATE_CANCELLED):
                    raise SystemExit(f"Phase 2 did not complete for {name}: {resp}")
    return raw, ids, (sid, md, sessions[-1][0])


def questions(conv: dict[str, Any], last: int) -> list[dict[str, Any]]:
    out = []
    for q in conv.get("qa", []):
        if q.get("category") not in (1, 2, 3, 4) or "answer" not in q:
            continue
        # Evidence ids as the dataset spells them, a few irregular ones included
        # ("D8:6; D9:17", "D:11:26").
        ev = [f"D{m.group(1)}:{m.group(2)}" for e in q.get("evidence", [])
              for m in re.finditer(r"D:?(\d+):(\d+)", e)]
        if not ev or any(int(e[1:].split(":")[0]) >= last for e in ev):
            continue
        out.append({**q, "evidence": ev})
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    files = sorted(Path(args.data).glob("*.json"))
    if not files:
        raise SystemExit(f"no *.json conversations in {args.data}")
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="sessiond-recall-"))
    tmp.mkdir(parents=True, exist_ok=True)
    kept: list[dict[str, Any]] = []
    cmd = [*sessiond_cmd(), "serve", "--address", "127.0.0.1:0", "--data-dir", str(tmp / "d")]
    if args.store:
        cmd += ["--store", args.store]
    cmd += ["--embedder", args.embedder, *args.server_arg]
    srv = start_server("sessiond", cmd, tmp / "server.log")
    totals = {"questions": 0, "sd_answer": 0, "sd_evidence": 0, "bm_answer": 0,
              "bm_evidence": 0, "sd_chars": 0, "bm_chars": 0}
    latencies: list[float] = []
    kinds: Counter[str] = Counter()
    try:
        channel = grpc.insecure_channel(srv.target, options=[
            ("grpc.max_receive_message_length", 64 << 20)])
        mem = memory_pb2_grpc.MemoryServiceStub(channel)
        for f in files:
            conv = json.loads(f.read_text())
            body = conv.get("conversation", conv)
            body.setdefault("qa", conv.get("qa", []))
            t0 = time.perf_counter()
            raw, ids, (sid, md, last) = replay(channel, f.stem, body)
            replay_s = time.perf_counter() - t0
            bm = BM25([t for _, t in raw])
            qs = questions(body, last)
            kept.append({"name": f.stem, "sid": sid, "metadata": list(md), "ids": ids,
                         "raw": raw, "questions": qs})
            for q in qs:
                ev_ids = {ids[e] for e in q["evidence"] if e in ids}
                answer = str(q["answer"])
                # sessiond
                t1 = time.perf_counter()
                resp = mem.Recall(memory_pb2.RecallRequest(
                    query=q["question"], session_id="" if args.no_session else sid,
                    max_chars=args.max_chars),
                    metadata=md)
                latencies.append(time.perf_counter() - t1)
                text = "\n".join([resp.latest_archive_overview,
                                  *(i.text for i in resp.items)])[: args.max_chars]
                sources = {m for i in resp.items[:10] for m in i.message_ids}
                kinds.update(memory_pb2.RecallKind.Name(i.kind) for i in resp.items)
                totals["sd_answer"] += answer_hit(answer, text)
                totals["sd_evidence"] += bool(ev_ids & sources)
                totals["sd_chars"] += len(text)
                # baseline
                order = bm.rank(q["question"])
                picked, used = [], 0
                for i in order:
                    t = raw[i][1]
                    if used + len(t) + 1 > args.max_chars:
                        break
                    picked.append(i)
                    used += len(t) + 1
                btext = "\n".join(raw[i][1] for i in picked)[: args.max_chars]
                top10 = {raw[i][0] for i in order[:10]}
                totals["bm_answer"] += answer_hit(answer, btext)
                totals["bm_evidence"] += bool(set(q["evidence"]) & top10)
                totals["bm_chars"] += len(btext)
                totals["questions"] += 1
            print(f"{f.stem}: {len(raw)} earlier turns, {len(qs)} questions, "
                  f"replay {replay_s:.1f} s", flush=True)
    finally:
        srv.stop()
    if args.keep:
        (tmp / "replay.json").write_text(json.dumps(kept))
    n = max(1, totals["questions"])
    latencies.sort()
    return {
        "questions": totals["questions"],
        "sessiond": {"answer_recall": totals["sd_answer"] / n,
                     "evidence_recall_at_10": totals["sd_evidence"] / n,
                     "mean_chars": totals["sd_chars"] / n},
        "bm25_raw_turns": {"answer_recall": totals["bm_answer"] / n,
                           "evidence_recall_at_10": totals["bm_evidence"] / n,
                           "mean_chars": totals["bm_chars"] / n},
        "recall_latency_ms": {"p50": 1000 * latencies[len(latencies) // 2],
                              "p99": 1000 * latencies[int(len(latencies) * 0.99)]},
        "items_by_kind": dict(kinds),
        "max_chars": args.max_chars, "store": args.store or "sqlite",
        "server_args": args.server_arg, "embedder": args.embedder,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--store", default="", help="default: SQLite in a temporary directory")
    ap.add_argument("--max-chars", type=int, default=4000)
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra `sessiond serve` flag (repeatable), e.g. --server-arg=--workers=4")
    ap.add_argument("--embedder", default="none", choices=["none", "local", "openai"],
                    help="the server's embedder (local: needs the `local` extra; openai: "
                         "give its flags with --server-arg)")
    ap.add_argument("--no-session", action="store_true",
                    help="ask Recall without naming the session (no overview first)")
    ap.add_argument("--json", default="")
    ap.add_argument("--keep", default="", help="keep the server's data and the replay "
                                               "(ids, questions) in this directory")
    args = ap.parse_args()
    res = run(args)
    sd, bm = res["sessiond"], res["bm25_raw_turns"]
    print(f"\n{res['questions']} questions, budget {res['max_chars']} chars, "
          f"store {res['store']}, embedder {res['embedder']}")
    print(f"{'':24}{'answer recall':>15}{'evidence@10':>13}{'mean chars':>12}")
    for label, r in (("sessiond Recall", sd), ("BM25 over raw turns", bm)):
        print(f"{label:24}{r['answer_recall']:>15.3f}{r['evidence_recall_at_10']:>13.3f}"
              f"{r['mean_chars']:>12.0f}")
    print(f"{'difference (points)':24}{100 * (sd['answer_recall'] - bm['answer_recall']):>+15.1f}"
          f"{100 * (sd['evidence_recall_at_10'] - bm['evidence_recall_at_10']):>+13.1f}")
    print("items returned by kind:", ", ".join(f"{k} {v}" for k, v in
                                              sorted(res["items_by_kind"].items())))
    lat = res["recall_latency_ms"]
    print(f"Recall latency over the run: p50 {lat['p50']:.2f} ms, p99 {lat['p99']:.2f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
