"""Nothing lost, nothing twice: a short crash run (3 random SIGKILLs, one of them followed
by a second SIGKILL during the recovery, a graceful SIGTERM under load, a SIGKILL during a
graceful shutdown, and one kill at every failpoint).
Longer runs: `python tools/crashtest.py --rounds N --seed S`."""

from __future__ import annotations

import os
import random
from pathlib import Path

from sessiond.server.failpoints import ALL_POINTS, HISTORY_POINTS

from tests.faults.crashrun import RANDOM, RECOVERY_KILL, TERM, TERM_KILL, CrashRun
from tests.faults.historyrun import HistoryCrashRun


def test_crash_random_kills_and_every_failpoint(tmp_path: Path) -> None:
    seed = int(os.environ.get("SESSIOND_CRASH_SEED") or random.SystemRandom().randrange(2**31))
    lines: list[str] = []
    run = CrashRun(tmp_path, seed=seed, clients=4, max_kill_delay=1.5, log=lines.append)
    episodes = [RANDOM] * 2 + [RECOVERY_KILL, TERM, TERM_KILL] + list(ALL_POINTS)
    try:
        stats = run.run(episodes)
    finally:
        run.close()
    print(f"crash seed={seed} (replay: SESSIOND_CRASH_SEED={seed}) {stats.summary()}")
    report = "\n".join(lines[-40:])
    assert not run.violations, (
        f"seed={seed}: {len(run.violations)} invariant violation(s):\n"
        + "\n".join(run.violations[:30]) + f"\n--- log ---\n{report}")
    assert stats.random_kills == 3 and stats.recovery_kills == 1
    # A failpoint may, rarely, not be reached within its window; most must be.
    assert stats.failpoint_kills + len(stats.failpoints_not_reached) == len(ALL_POINTS)
    assert stats.failpoint_kills >= len(ALL_POINTS) - 2, stats.failpoints_not_reached
    assert stats.acked["add"] > 0 and stats.acked["commit"] > 0
    assert stats.tasks_completed > 0 and stats.tasks_failed == 0


def test_crash_with_llm_engine_counts_tokens_once(tmp_path: Path) -> None:
    """Same invariants with the OpenAI engine against a fake model, so every stage has
    token usage: a task counts one summary and one extraction reply, never a reply of
    an attempt that died, never one twice."""
    seed = int(os.environ.get("SESSIOND_CRASH_SEED") or random.SystemRandom().randrange(2**31))
    lines: list[str] = []
    run = CrashRun(tmp_path, seed=seed, clients=4, max_kill_delay=1.5, engine="openai",
                   log=lines.append)
    episodes = [RANDOM, TERM_KILL, "phase2.summarize.before", "phase2.summarize.after",
                "phase2.extract.before", "phase2.extract.after", "phase2.finalize.before"]
    try:
        stats = run.run(episodes)
    finally:
        run.close()
    print(f"crash/openai seed={seed} (replay: SESSIOND_CRASH_SEED={seed}) {stats.summary()}")
    assert not run.violations, (
        f"seed={seed}: {len(run.violations)} invariant violation(s):\n"
        + "\n".join(run.violations[:30]) + "\n--- log ---\n" + "\n".join(lines[-40:]))
    assert stats.failpoint_kills >= 3, stats.failpoints_not_reached
    assert stats.tasks_completed > 0 and stats.tasks_failed == 0


def test_crash_in_revert_and_retry_task(tmp_path: Path) -> None:
    """A kill at every revert and RetryTask failpoint: after the restart and the
    client's retry with the same request id, the revert (or retry) happened exactly
    once (tests/faults/historyrun.py)."""
    seed = int(os.environ.get("SESSIOND_CRASH_SEED") or random.SystemRandom().randrange(2**31))
    lines: list[str] = []
    run = HistoryCrashRun(tmp_path, seed=seed, log=lines.append)
    try:
        stats = run.run(HISTORY_POINTS)
    finally:
        run.close()
    print(f"crash/history seed={seed} {stats.summary()}")
    assert not run.violations, "\n".join(run.violations[:30] + lines[-20:])
    assert stats.failpoint_kills == len(HISTORY_POINTS), stats.failpoints_not_reached
    assert stats.reverts_completed == 3 and stats.retries_completed == 2
