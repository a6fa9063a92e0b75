"""`sessiond import-openviking DIR`: bring an OpenViking data tree into the store."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from sessiond.server.cli_recall import add_embedder_flags, apply_embedder_flags
from sessiond.server.config import Settings
from sessiond.server.domain.errors import SessiondError
from sessiond.server.redact import redact_text

SHOWN_SKIPS = 20


def add_import_command(sub: Any, env: Settings) -> None:
    r = sub.add_parser(
        "import-openviking",
        help="import an OpenViking data tree: sessions, archives, memories",
        description="Reads DIR (an OpenViking account directory holding session/, user/, "
                    "agent/; a directory of such accounts; or an AGFS data directory "
                    "with local/<account>/) and writes its sessions with their metadata, "
                    "live messages, archives in their state (.done: COMPLETED, "
                    ".failed.json: FAILED, neither: PENDING, run by the next server) and "
                    "memories, then indexes them for Recall. Idempotent: a second run "
                    "imports nothing. On SQLite, stop the server first.")
    r.add_argument("dir", type=Path, metavar="DIR")
    r.add_argument("--store", default=env.store,
                   help="'sqlite' (with --data-dir) or a postgresql:// URL")
    r.add_argument("--data-dir", type=Path, default=env.data_dir)
    r.add_argument("--account", default=None,
                   help="import everything into this account (default: the account "
                        "directory's name, or 'default' when DIR is one account)")
    r.add_argument("--user", default=None,
                   help="import everything for this user (default: from the tree)")
    r.add_argument("--agent", default=None,
                   help="import everything for this agent (default: from the tree)")
    r.add_argument("--dry-run", action="store_true",
                   help="read the tree and the store, write nothing, report what would be "
                        "imported")
    r.add_argument("--json", action="store_true", help="print the report as JSON")
    r.add_argument("--output", "-o", choices=["text", "json"], default="text",
                   help="json: the same as --json")
    add_embedder_flags(r, env)


class _Bars:
    """A rich progress bar per pass (sessions, memories, index ...) on stderr."""

    def __init__(self, enabled: bool) -> None:
        self.progress = Progress(TextColumn("{task.description:>18}"), BarColumn(),
                                 MofNCompleteColumn(), console=Console(stderr=True),
                                 disable=not enabled, transient=False)
        self.tasks: dict[str, TaskID] = {}

    def __call__(self, what: str, done: int, total: int) -> None:
        if what not in self.tasks:
            self.tasks[what] = self.progress.add_task(what, total=total or None)
        self.progress.update(self.tasks[what], completed=done, total=total or None)


async def _import(ns: argparse.Namespace) -> dict[str, Any]:
    from sessiond.server.app import build_store
    from sessiond.server.embedders import build_embedder
    from sessiond.server.services.importer import OpenVikingImporter
    from sessiond.server.services.openviking import IdentityChoice, read_tree

    s = Settings.from_env()
    s.store, s.data_dir = ns.store, ns.data_dir
    apply_embedder_flags(ns, s)
    if not ns.dir.is_dir():
        raise ValueError(f"{ns.dir} is not a directory")
    choice = IdentityChoice(ns.account, ns.user, ns.agent)
    tree = await asyncio.to_thread(read_tree, ns.dir, s.limits, choice)
    embedder = None if ns.dry_run else build_embedder(s.embedder)[0]
    store = build_store(s)
    store.limits = s.limits
    await store.open()
    bars = _Bars(enabled=not ns.json)
    try:
        with bars.progress:
            report = await OpenVikingImporter(store, embedder, s.embedder.batch_size).run(
                tree, bars, dry_run=ns.dry_run)
    finally:
        if embedder is not None:
            await embedder.aclose()
        await store.close()
    return report.as_dict()


def _summary(out: dict[str, Any]) -> str:
    a, m, mem, ix = out["archives"], out["messages"], out["memories"], out["index"]
    verb = "would import" if out["dry_run"] else "imported"
    lines = [
        f"{verb}: {out['sessions']['imported']} session(s) "
        f"({out['sessions']['present']} already present), "
        f"{a['done'] + a['failed'] + a['pending']} archive(s) (done {a['done']}, failed "
        f"{a['failed']}, pending {a['pending']}; {a['present']} already present), "
        f"{m['live']} live and {m['archived']} archived message(s) ({m['duplicates']} "
        f"already present), {mem['imported']} memories ({mem['present']} already present)"]
    if not out["dry_run"]:
        lines.append(f"indexed: {ix['archives']} archive(s) ({ix['entries']} entries), "
                     f"{ix['memories']} memory entries, {ix['vectors']} vectors")
    skipped = out["skipped"]
    if skipped:
        by = ", ".join(f"{k} {v}" for k, v in out["skipped_by_reason"].items())
        lines.append(f"skipped {len(skipped)}: {by}")
        lines += [f"  {s['path']}: {s['reason']}" + (f" ({s['detail']})" if s["detail"] else "")
                  for s in skipped[:SHOWN_SKIPS]]
        if len(skipped) > SHOWN_SKIPS:
            lines.append(f"  ... and {len(skipped) - SHOWN_SKIPS} more (--json lists all)")
    else:
        lines.append("skipped nothing")
    return "\n".join(lines)


def import_main(ns: argparse.Namespace) -> int:
    try:
        out = asyncio.run(_import(ns))
    except (OSError, ValueError) as exc:
        print(f"sessiond import-openviking: {redact_text(str(exc))}", file=sys.stderr)
        return 2
    except SessiondError as exc:
        print(f"sessiond import-openviking: {redact_text(exc.message)} ({exc.reason})",
              file=sys.stderr)
        return 1
    print(json.dumps(out) if ns.json else _summary(out))
    return 0
