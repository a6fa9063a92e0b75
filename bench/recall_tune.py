"""Fusion settings measured side by side on one replay (no server restarts).

    python bench/recall.py --keep /tmp/rk          # replay once, keep the data
    python bench/recall_tune.py /tmp/rk            # vectors by the local embedder,
                                                   # then each setting's two measures

Reads the store a `bench/recall.py --keep` run left, gives every entry a vector of
the local embedder (`sessiond reindex`'s code), then asks every question through
`RecallService` in-process once per fusion setting (dense weight, dense
candidates), scoring exactly as bench/recall.py does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sessiond.server.config import EmbedderSettings
from sessiond.server.domain import recall as rules
from sessiond.server.domain.values import Identity
from sessiond.server.embedders.local import LocalEmbedder
from sessiond.server.services.recall import RecallService
from sessiond.server.services.reindex import Reindexer
from sessiond.server.store.sqlite.store import SqliteStore

from bench.recall import answer_hit


class Cached:
    """The local embedder with each query embedded once across settings."""

    def __init__(self, inner: LocalEmbedder) -> None:
        self.inner = inner
        self.cache: dict[str, list[float]] = {}

    @property
    def model(self) -> str:
        return self.inner.model

    async def embed(self, texts: Any) -> list[list[float]]:
        missing = [t for t in texts if t not in self.cache]
        if missing:
            for t, v in zip(missing, await self.inner.embed(missing), strict=True):
                self.cache[t] = v
        return [self.cache[t] for t in texts]

    async def aclose(self) -> None:
        return None


async def main(args: argparse.Namespace) -> None:
    keep = Path(args.dir)
    replay = json.loads((keep / "replay.json").read_text())
    store = SqliteStore(keep / "d")
    await store.open()
    emb = Cached(LocalEmbedder(EmbedderSettings(kind="local")))
    t0 = time.perf_counter()
    rep = await Reindexer(store, emb.inner).run()
    print(f"vectors: {rep.vectors} new in {time.perf_counter() - t0:.1f} s", flush=True)
    if args.dense_messages_only:
        rules.DENSE_KINDS = (rules.RecallKind.MESSAGE,)
    rules.RRF_K = args.k
    rules.CONVEX_ALPHA = args.alpha
    settings = ([] if args.no_baseline else [(None, 0)]) + [
        (w, c) for w in args.weights for c in args.candidates]
    for weight, cands in settings:
        svc = RecallService(store, emb if weight is not None else None)
        rules.DENSE_WEIGHT = weight or 0.0
        rules.DENSE_CANDIDATES = cands
        n = ans = ev = 0
        for conv in replay:
            md = dict(conv["metadata"])
            ident = Identity(md["x-sessiond-account"], md["x-sessiond-user"],
                             md.get("x-sessiond-agent", "default"))
            for q in conv["questions"]:
                res = await svc.recall(ident, q["question"], session_id=conv["sid"],
                                       max_chars=args.max_chars)
                text = "\n".join([res.latest_archive_overview,
                                  *(i.text for i in res.items)])[: args.max_chars]
                sources = {m for i in res.items[:10] for m in i.message_ids}
                want = {conv["ids"][e] for e in q["evidence"] if e in conv["ids"]}
                ans += answer_hit(str(q["answer"]), text)
                ev += bool(want & sources)
                n += 1
        label = "lexical only" if weight is None else f"dense w={weight} c={cands}"
        print(f"{label:24} answer {ans / n:.3f}  evidence@10 {ev / n:.3f}  ({n} q)",
              flush=True)
    await store.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir")
    ap.add_argument("--max-chars", type=int, default=4000)
    ap.add_argument("--weights", type=float, nargs="*", default=[1.0, 0.5, 0.3])
    ap.add_argument("--candidates", type=int, nargs="*", default=[60, 20])
    ap.add_argument("--k", type=int, default=60, help="reciprocal rank fusion constant")
    ap.add_argument("--dense-messages-only", action="store_true")
    ap.add_argument("--alpha", type=float, default=0.0,
                    help="convex combination with this lexical weight instead of RRF")
    ap.add_argument("--no-baseline", action="store_true")
    asyncio.run(main(ap.parse_args()))
