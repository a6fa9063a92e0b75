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
durable, next not started). Archive reverts: revert.before (claimed, nothing read),
revert.embedded (before-images read and embedded, nothing written), revert.after
(the revert committed). RetryTask: retry.before_write (in the RPC, nothing written),
retry.after_write (the task is PENDING again, the reply not sent).
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
# Points of archive reverts and RetryTask (reached only when a client asks for one;
# tools/crashtest.py runs them as episodes of their own, tests/faults/historyrun.py).
HISTORY_POINTS: tuple[str, ...] = (
    "revert.before",
    "revert.embedded",
    "revert.after",
    "retry.before_write",
    "retry.after_write",
)
KNOWN_POINTS: tuple[str, ...] = (*ALL_POINTS, *HISTORY_POINTS)


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
