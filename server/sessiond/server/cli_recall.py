"""Retrieval settings of `sessiond serve` (the embedder) and `sessiond reindex`."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from sessiond.server.config import Settings
from sessiond.server.domain.errors import SessiondError
from sessiond.server.embedders import KINDS


def add_embedder_flags(p: argparse.ArgumentParser, env: Settings) -> None:
    e = env.embedder
    g = p.add_argument_group("retrieval embedder (dense ranking fused with BM25)")
    g.add_argument("--embedder", default=e.kind, choices=KINDS,
                   help="none: lexical only (default); openai: an OpenAI-compatible "
                        "/v1/embeddings; local: a sentence-transformers model directory")
    g.add_argument("--embedder-model", default=e.model,
                   help="openai: model name; local: model directory (default: the "
                        "bundled all-MiniLM-L6-v2 of the `local` extra)")
    g.add_argument("--embedder-base-url", default=e.base_url)
    g.add_argument("--embedder-api-key-env", default=e.api_key_env,
                   help="environment variable holding the embedder's API key")
    g.add_argument("--embedder-api-key-file", default=e.api_key_file,
                   help="file holding the embedder's API key (wins over the variable)")
    g.add_argument("--embedder-dimensions", type=int, default=e.dimensions,
                   help="openai: dimensions to ask for (0: the model's own)")
    g.add_argument("--embedder-timeout", type=float, default=e.timeout_seconds)
    g.add_argument("--embedder-max-retries", type=int, default=e.max_retries)
    g.add_argument("--embedder-batch-size", type=int, default=e.batch_size)
    g.add_argument("--embedder-threads", type=int, default=e.threads,
                   help="local: CPU threads torch may use")
    g.add_argument("--embedder-cache-mb", type=int, default=e.cache_mb,
                   help="memory for the in-process vector cache (exact scan)")


def apply_embedder_flags(ns: argparse.Namespace, s: Settings) -> None:
    e = s.embedder
    e.kind, e.model, e.base_url = ns.embedder, ns.embedder_model, ns.embedder_base_url
    e.api_key_env, e.api_key_file = ns.embedder_api_key_env, ns.embedder_api_key_file
    e.dimensions, e.timeout_seconds = ns.embedder_dimensions, ns.embedder_timeout
    e.max_retries, e.batch_size = ns.embedder_max_retries, ns.embedder_batch_size
    e.cache_mb, e.threads = ns.embedder_cache_mb, ns.embedder_threads


def add_reindex_command(sub: Any, env: Settings) -> None:
    r = sub.add_parser(
        "reindex", help="(re)build the retrieval index: entries of archives and memories "
                        "that have none, and vectors for the configured embedder",
        description="Resumable and idempotent: it only writes what is missing, so it can "
                    "be interrupted and run again. Safe beside running servers on "
                    "PostgreSQL; on SQLite, stop the server first.")
    r.add_argument("--store", default=env.store,
                   help="'sqlite' (with --data-dir) or a postgresql:// URL")
    r.add_argument("--data-dir", type=Path, default=env.data_dir)
    r.add_argument("--prune", action="store_true",
                   help="remove the vectors of other embedder models afterwards")
    r.add_argument("--json", action="store_true", help="print the report as JSON")
    r.add_argument("--output", "-o", choices=["text", "json"], default="text",
                   help="json: the same as --json")
    add_embedder_flags(r, env)


async def _reindex(ns: argparse.Namespace) -> dict[str, int]:
    from sessiond.server.app import build_store
    from sessiond.server.embedders import build_embedder
    from sessiond.server.services.reindex import Reindexer

    s = Settings.from_env()
    s.store, s.data_dir = ns.store, ns.data_dir
    apply_embedder_flags(ns, s)
    embedder, _ = build_embedder(s.embedder)
    store = build_store(s)
    await store.open()
    last: dict[str, tuple[int, int]] = {}

    def progress(what: str, done: int, total: int) -> None:
        if ns.json or last.get(what) == (done, total):
            return
        last[what] = (done, total)
        share = f"/{total} ({100 * done // total}%)" if total else ""
        end = "\n" if total == 0 or done >= total else ""
        print(f"\rreindex {what}: {done}{share}", end=end, file=sys.stderr, flush=True)

    try:
        report = await Reindexer(store, embedder, s.embedder.batch_size).run(
            progress, prune=ns.prune)
    finally:
        if embedder is not None:
            await embedder.aclose()
        await store.close()
    return {"archives": report.archives, "entries": report.entries,
            "memories": report.memories, "vectors": report.vectors, "pruned": report.pruned}


def reindex_main(ns: argparse.Namespace) -> int:
    try:
        out = asyncio.run(_reindex(ns))
    except (OSError, ValueError) as exc:
        print(f"sessiond reindex: {exc}", file=sys.stderr)
        return 2
    except SessiondError as exc:
        print(f"sessiond reindex: {exc.message} ({exc.reason})", file=sys.stderr)
        return 1
    if ns.json:
        print(json.dumps(out))
    else:
        print("reindexed: {archives} archive(s) ({entries} entries), {memories} memory "
              "entries, {vectors} vectors; {pruned} old vectors pruned".format(**out))
    return 0
