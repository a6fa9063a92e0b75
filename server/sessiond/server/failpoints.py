"""Named crash points for fault tests (as etcd's gofail, much simpler).

Set SESSIOND_FAILPOINTS to a comma-separated list of names; when the code reaches a
listed point the process exits at once with status 137 (no cleanup, no flush), as a
SIGKILL would. `name@N` fires on the N-th hit only. Unset, a check is one frozenset
lookup.

Points: commit.before_write, commit.after_write (Phase 1 in the RPC);
autocommit.count (in an append's transaction, the live buffer past a count trigger,
before its archive is written), autocommit.idle.before_write, autocommit.idle.write
(in the idle commit's transaction, the claim made, before the archive is written),
autocommit.idle.after_write (idle commit durable); and for each
Phase 2 stage S in summarize, extract, relations, active_counts, index, finalize:
phase2.S.before (stage started, nothing written) and phase2.S.after (stage
durable, next not started).
"""

from __future__ import annotations

import os
import sys
import threading

ENV = "SESSIOND_FAILPOINTS"

ALL_POINTS: tuple[str, ...] = (
    "commit.before_write",
    "commit.after_write",
    "autocommit.count",
    "autocommit.idle.before_write",
    "autocommit.idle.write",
    "autocommit.idle.after_write",
    *(f"phase2.{s}.{w}" for s in ("summarize", "extract", "relations", "active_counts", "index",
                                  "finalize") for w in ("before", "after")),
)


def _parse(raw: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        name, _, nth = item.partition("@")
        out[name] = int(nth) if nth else 1
    return out


_ARMED: dict[str, int] = _parse(os.environ.get(ENV, ""))
_NAMES = frozenset(_ARMED)
_hits: dict[str, int] = {}
_lock = threading.Lock()


def hit(name: str) -> None:
    """Exit the process now if `name` is armed (and this is its N-th hit)."""
    if name not in _NAMES:
        return
    with _lock:
        _hits[name] = _hits.get(name, 0) + 1
        if _hits[name] != _ARMED[name]:
            return
    sys.stderr.write(f"sessiond: failpoint {name} hit, exiting\n")
    sys.stderr.flush()
    os._exit(137)
