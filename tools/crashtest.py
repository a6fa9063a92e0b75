#!/usr/bin/env python3
"""Crash test for sessiond: "nothing lost, nothing twice".

Each round runs one episode with a SIGKILL at a random moment (or more, see
--random-per-round), one with a graceful SIGTERM at a random moment (every other round
followed by a SIGKILL during the graceful shutdown), one killed under load and again
while it recovers, and one episode per failpoint (the
server armed through SESSIOND_FAILPOINTS kills itself there). After every episode the
server is restarted without failpoints, unacknowledged calls are retried with the same
request_id, Phase 2 settles, and the invariants are checked through the API and, after
a graceful stop, in the SQLite file. See tests/faults/crashrun.py.

    python tools/crashtest.py --rounds 5 --seed 1234 --clients 6

The seed is printed first; the same seed replays the same choices (the timing of the
kills still varies from run to run).
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sessiond.server.failpoints import HISTORY_POINTS, KNOWN_POINTS  # noqa: E402

from tests.faults.crashrun import CrashRun  # noqa: E402
from tests.faults.harness import FAST_ARGS  # noqa: E402
from tests.faults.historyrun import HistoryCrashRun  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    p.add_argument("--clients", type=int, default=4,
                   help="concurrent client threads (half own sessions, half only add "
                        "messages), plus one watcher")
    p.add_argument("--random-per-round", type=int, default=1,
                   help="random-SIGKILL episodes per round")
    p.add_argument("--term-per-round", type=int, default=1,
                   help="graceful-SIGTERM episodes per round (alternately clean, and "
                        "SIGKILLed during the graceful shutdown)")
    p.add_argument("--recovery-kills-per-round", type=int, default=1,
                   help="episodes that SIGKILL under load and again during the recovery")
    p.add_argument("--heavy", type=float, default=0.03,
                   help="share of messages with long text (slow Phase 2, so kills land "
                        "inside stages)")
    p.add_argument("--sqlite-synchronous", choices=["NORMAL", "FULL"], default="NORMAL",
                   help="server's SQLite synchronous mode (FULL is the production default; "
                        "NORMAL is faster and equally safe against a killed process)")
    p.add_argument("--engine", choices=["offline", "openai"], default="offline",
                   help="Phase 2 engine; 'openai' talks to a fake OpenAI-compatible server "
                        "run by this tool, so token usage is counted too")
    p.add_argument("--workers", type=int, default=4, help="server's Phase 2 workers")
    p.add_argument("--failpoints", default=",".join(KNOWN_POINTS),
                   help="comma-separated failpoints, one episode each per round ('' for none)")
    p.add_argument("--max-kill-delay", type=float, default=2.0,
                   help="random kills happen within this many seconds of the start")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="data dir and server log go here (default: a temporary dir)")
    p.add_argument("--keep", action="store_true", help="keep the temporary work dir")
    ns = p.parse_args(argv)
    seed = ns.seed if ns.seed is not None else random.SystemRandom().randrange(2**31)
    replay = [a for a in (argv if argv is not None else sys.argv[1:])]
    if ns.seed is None:
        replay += ["--seed", str(seed)]
    print(f"crashtest seed={seed} (replay: python tools/crashtest.py {' '.join(replay)})",
          flush=True)
    points = [x.strip() for x in ns.failpoints.split(",") if x.strip()]
    unknown = [x for x in points if x not in KNOWN_POINTS]
    if unknown:
        p.error(f"unknown failpoints {unknown}; known: {', '.join(KNOWN_POINTS)}")
    # Revert and RetryTask points run as episodes of their own (HistoryCrashRun).
    history = [x for x in points if x in HISTORY_POINTS]
    points = [x for x in points if x not in HISTORY_POINTS]
    server_args = [*FAST_ARGS, "--workers", str(ns.workers)]
    server_args[server_args.index("--sqlite-synchronous") + 1] = ns.sqlite_synchronous
    tmp = None
    work = ns.work_dir
    if work is None:
        tmp = tempfile.mkdtemp(prefix="sessiond-crash-")
        work = Path(tmp)
    work.mkdir(parents=True, exist_ok=True)
    hrun = HistoryCrashRun(work, seed=seed, server_args=server_args,
                           log=lambda m: print(m, flush=True))
    run = CrashRun(work, seed=seed, clients=ns.clients, max_kill_delay=ns.max_kill_delay,
                   heavy=ns.heavy, server_args=server_args, engine=ns.engine,
                   log=lambda m: print(m, flush=True))
    episodes = run.episodes_for(ns.rounds, points, ns.random_per_round, ns.term_per_round,
                                ns.recovery_kills_per_round)
    t0 = time.monotonic()
    hstats = None
    try:
        stats = run.run(episodes)
        hstats = hrun.run(history * ns.rounds) if history else None
        run.violations += hrun.violations
    except BaseException:
        print(f"crashtest aborted; seed={seed}; work dir {work}", flush=True)
        print(run.srv.log_tail(3000), flush=True)
        tmp = None  # keep it for the post-mortem
        raise
    finally:
        run.close()
        hrun.close()
        if tmp is not None and not ns.keep and not run.violations:
            shutil.rmtree(tmp, ignore_errors=True)
    summary = stats.summary() + (f" {hstats.summary()}" if hstats is not None else "")
    print(f"crashtest seed={seed} rounds={ns.rounds} {summary} "
          f"violations={len(run.violations)} "
          f"time={time.monotonic() - t0:.1f}s", flush=True)
    if hstats is not None and hstats.failpoints_not_reached:
        print(f"history failpoints not reached: {hstats.failpoints_not_reached}", flush=True)
    if stats.failpoints_not_reached:
        print(f"failpoints not reached (killed after 8 s instead): "
              f"{stats.failpoints_not_reached}", flush=True)
    if run.violations:
        print(f"{len(run.violations)} INVARIANT VIOLATION(S); seed={seed}; work dir {work}:",
              flush=True)
        for v in run.violations:
            print(f"  - {v}", flush=True)
        return 1
    print("OK: nothing lost, nothing twice", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
