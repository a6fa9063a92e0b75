"""Crash test engine: "nothing lost, nothing twice".

An *episode* starts the server (optionally armed with one failpoint), lets concurrent
clients create sessions, add messages, record usage, commit and watch tasks, and ends
the server: SIGKILL at a random moment (RANDOM), the armed failpoint (`os._exit(137)`),
a graceful SIGTERM under load (TERM, exit 0 expected), a SIGKILL in the middle of a
graceful shutdown (TERM_KILL), or a SIGKILL followed by a second one while the new
process resumes Phase 2 and the clients retry (RECOVERY_KILL). The server is then
restarted without failpoints, every call that was not acknowledged is retried with the
SAME request_id, a sample of acknowledged calls is replayed too, all Phase 2 tasks are
left to settle, and the invariants are checked through the API; finally the server is
stopped gracefully (exit 0 expected) and the SQLite file is checked read-only (usage
rows, active counts, relations, one task per archive).

Every call is stamped from one counter when first sent and when acknowledged, so "A was
acknowledged before B was sent" is also a fact about the server's order; usage and
message placement across archives is checked against it. With engine="openai" Phase 2
talks to a fake model (tests/faults/fake_llm.py) and token usage is traced to replies.

Auto-commit: the first new session of every episode gets its own auto-commit policy
(UpdateSessionConfig: commit at M messages, after 1 s idle) and is never committed by
hand; clients leave it quiet for 1.6 s now and then, so idle commits happen under load
too. Its invariants replace the commit ones: every archive's task says MESSAGES (then
exactly M messages) or IDLE (fewer), the live buffer drains by itself after the
restart, and every acknowledged message is in exactly one place.

Used by `tools/crashtest.py` (long runs, replayable by seed) and
`tests/faults/test_crash.py` (a short run).
"""

from __future__ import annotations

import collections
import itertools
import queue
import random
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from sessiond.server.domain.values import Identity, TextPart, archive_uri
from sessiond.server.failpoints import ALL_POINTS
from sessiond.server.store import codec
from sessiond.v1 import session_pb2, task_pb2

from tests.faults.fake_llm import FakeLLM
from tests.faults.harness import FAST_ARGS, ServerProcess, Stubs, heavy_text

RANDOM = "random"  # SIGKILL at a random moment
TERM = "term"  # graceful SIGTERM at a random moment: exit 0 expected
TERM_KILL = "term-kill"  # SIGTERM, then SIGKILL in the middle of the graceful shutdown
# SIGKILL under load, then SIGKILL again while the restarted server resumes Phase 2 and
# the clients retry (a crash during crash recovery).
RECOVERY_KILL = "recovery-kill"
EPISODE_KINDS = (RANDOM, TERM, TERM_KILL, RECOVERY_KILL, *ALL_POINTS)
CALL_TIMEOUT = 10.0
AUTO_IDLE_SECONDS = 1
AUTO_QUIET_SECONDS = 1.6
LLM_KEY_ENV = "SESSIOND_CRASH_LLM_KEY"
GRACE_LIMIT = 3.0 + 2.0  # the harness' --shutdown-grace plus process teardown
TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                       grpc.StatusCode.CANCELLED})
TERMINAL_KINDS = frozenset({task_pb2.TASK_EVENT_KIND_COMPLETED, task_pb2.TASK_EVENT_KIND_FAILED,
                            task_pb2.TASK_EVENT_KIND_CANCELLED})
TERMINAL_STATES = frozenset({task_pb2.TASK_STATE_COMPLETED, task_pb2.TASK_STATE_FAILED,
                             task_pb2.TASK_STATE_CANCELLED})
DEFAULT_IDENTITY = Identity("default", "default", "default")
PIPELINE_STAGES = ("summarize", "extract", "relations", "active_counts", "index")
MEMORY_FIELDS = ("profile", "preferences", "entities", "events", "cases", "patterns", "tools",
                 "skills", "total")
STAGES_AT_LEAST_RELATIONS = frozenset({"relations", "active_counts", "index", "finalize"})
STAGES_AT_LEAST_ACTIVE = frozenset({"active_counts", "index", "finalize"})

CONTEXT_URIS = tuple(f"ctx://docs/{i}" for i in range(6))
SKILL_URIS = tuple(f"skill://tools/{i}" for i in range(3))
SENTENCES = (
    "My name is Alice Smith.", "I prefer green tea in the morning.",
    "I work at Acme Corp.", "The project named Zeta failed yesterday with an error.",
    "Please always answer in English.", "I live in Berlin.", "What is the next step?",
    "The deadline is tomorrow.", "I don't like long meetings.", "The service named Orion "
    "crashed again.", "Sure, here is the plan.", "Let me check that for you.",
)


# ---------------------------------------------------------------------- the model
# Every call gets a tick from one global counter when it is first sent and when it is
# acknowledged; "A acked before B sent" is then a fact about the server's order too.
@dataclass
class MsgAck:
    session_id: str
    client: str
    request_id: str
    message_id: str
    seq: int
    parts: tuple[bytes, ...]
    request: session_pb2.AddMessageRequest
    sent: int
    acked: int


@dataclass
class UsageAck:
    request_id: str
    context_uris: tuple[str, ...]
    skill_uri: str
    request: session_pb2.RecordUsageRequest
    sent: int
    acked: int

    @property
    def uris(self) -> list[str]:
        return [*self.context_uris, *([self.skill_uri] if self.skill_uri else [])]


@dataclass
class CommitAck:
    request_id: str
    archived: bool
    task_id: str
    archive_uri: str
    request: session_pb2.CommitRequest
    sent: int
    acked: int

    @property
    def index(self) -> int:
        return int(self.archive_uri.rsplit("/", 1)[1]) if self.archived else 0


@dataclass
class SessionModel:
    session_id: str
    created: bool = False
    create_request_id: str = ""
    msgs_by_client: dict[str, list[MsgAck]] = field(default_factory=dict)
    usage: list[UsageAck] = field(default_factory=list)
    commits: list[CommitAck] = field(default_factory=list)
    # Auto-commit sessions: the policy's max_messages (0: a session committed by hand),
    # whether the policy was acknowledged, and until when clients leave it quiet.
    auto_max: int = 0
    configured: bool = False
    quiet_until: float = 0.0


@dataclass
class WatchRecord:
    task_id: str
    seqs: list[int] = field(default_factory=list)
    kinds: list[int] = field(default_factory=list)
    done: bool = False
    resumes: int = 0

    @property
    def last(self) -> int:
        return self.seqs[-1] if self.seqs else 0


@dataclass
class Op:
    """One call, kept until it is acknowledged (the request is reused on retry)."""

    kind: str  # create | config | add | usage | commit
    session_id: str
    client: str
    request: Any
    sent: int = -1


@dataclass
class Stats:
    episodes: int = 0
    random_kills: int = 0
    term_kills: int = 0
    recovery_kills: int = 0
    failpoint_kills: int = 0
    failpoints_not_reached: list[str] = field(default_factory=list)
    acked: collections.Counter[str] = field(default_factory=collections.Counter)
    retried: collections.Counter[str] = field(default_factory=collections.Counter)
    retried_already_applied: collections.Counter[str] = field(
        default_factory=collections.Counter)
    replayed: int = 0
    watch_resumes: int = 0
    tasks_completed: int = 0
    tasks_failed: int = 0
    graceful_stops: int = 0

    def summary(self) -> str:
        return (f"episodes={self.episodes} random_kills={self.random_kills} "
                f"term_then_kill={self.term_kills} recovery_kills={self.recovery_kills} "
                f"failpoint_kills={self.failpoint_kills} "
                f"failpoints_not_reached={len(self.failpoints_not_reached)} "
                f"graceful_stops={self.graceful_stops} acked={dict(self.acked)} "
                f"retried={dict(self.retried)} "
                f"retried_already_applied={dict(self.retried_already_applied)} "
                f"replayed_acked={self.replayed} watch_resumes={self.watch_resumes} "
                f"tasks_completed={self.tasks_completed} tasks_failed={self.tasks_failed}")


class Model:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._ticks = itertools.count(1)
        self.sessions: dict[str, SessionModel] = {}
        self.watches: dict[str, WatchRecord] = {}
        # (session_id, archive index) -> uris its messages reference (filled by verify_api)
        self.archive_msg_uris: dict[tuple[str, int], frozenset[str]] = {}

    def tick(self) -> int:
        with self.lock:
            return next(self._ticks)

    def created_sessions(self, among: Iterable[str]) -> list[str]:
        """Sessions clients may write to now (created; auto ones configured, not quiet)."""
        now = time.monotonic()
        with self.lock:
            return [s for s in among if s in self.sessions and self._ready(self.sessions[s], now)]

    @staticmethod
    def _ready(sm: SessionModel, now: float) -> bool:
        return sm.created and (not sm.auto_max or (sm.configured and sm.quiet_until <= now))

    def all_msgs(self, session_id: str) -> list[MsgAck]:
        sm = self.sessions[session_id]
        return [m for lst in sm.msgs_by_client.values() for m in lst]


# ---------------------------------------------------------------------- requests
def _parts(rng: random.Random, heavy: float = 0.0) -> list[session_pb2.Part]:
    if rng.random() < heavy:
        text = heavy_text(rng, 150)  # makes this archive's Phase 2 take a while
    else:
        text = " ".join(rng.choice(SENTENCES) for _ in range(rng.randint(1, 3)))
    parts = [session_pb2.Part(text=session_pb2.TextPart(text=text))]
    if rng.random() < 0.3:
        parts.append(session_pb2.Part(context=session_pb2.ContextPart(
            uri=rng.choice(CONTEXT_URIS), context_type=session_pb2.CONTEXT_TYPE_RESOURCE,
            abstract="a document")))
    if rng.random() < 0.15:
        parts.append(session_pb2.Part(tool=session_pb2.ToolPart(
            tool_id=f"call-{rng.randrange(10**6)}", tool_name=rng.choice(("search", "grep")),
            skill_uri=rng.choice(SKILL_URIS), input='{"q": 1}', output="ok",
            status=session_pb2.TOOL_STATUS_COMPLETED, duration_ms=rng.randint(1, 50))))
    return parts


def part_uris(parts: Iterable[session_pb2.Part]) -> list[str]:
    out: list[str] = []
    for p in parts:
        kind = p.WhichOneof("kind")
        if kind == "context" and p.context.uri:
            out.append(p.context.uri)
        elif kind == "tool" and p.tool.skill_uri:
            out.append(p.tool.skill_uri)
    return out


def _session_key(r: Any) -> tuple[Any, ...]:
    return (r.session_id,)


def _message_key(r: Any) -> tuple[Any, ...]:
    return (r.message.id, r.message.seq)


def _commit_key(r: Any) -> tuple[Any, ...]:
    return (r.archived, r.task_id, r.archive_uri)


def _no_key(r: Any) -> tuple[Any, ...]:
    return ()


def one_line(msg: Any, limit: int = 300) -> str:
    return " ".join(str(msg).split())[:limit]


def _rid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def new_add(rng: random.Random, session_id: str, client: str, heavy: float = 0.0) -> Op:
    role = rng.choice((session_pb2.ROLE_USER, session_pb2.ROLE_ASSISTANT))
    req = session_pb2.AddMessageRequest(session_id=session_id, role=role,
                                        parts=_parts(rng, heavy), request_id=_rid("add"))
    return Op("add", session_id, client, req)


def new_usage(rng: random.Random, session_id: str, client: str) -> Op:
    # The skill's input carries the request id: it identifies the usage row in the file.
    rid = _rid("usage")
    req = session_pb2.RecordUsageRequest(
        session_id=session_id, context_uris=rng.sample(CONTEXT_URIS, rng.randint(0, 2)),
        request_id=rid, skill=session_pb2.SkillUsage(
            uri=rng.choice(SKILL_URIS), input=rid, output="out", success=rng.random() < 0.8))
    return Op("usage", session_id, client, req)


def new_commit(rng: random.Random, session_id: str, client: str) -> Op:
    req = session_pb2.CommitRequest(session_id=session_id, keep_recent_count=rng.choice((0, 0, 1,
                                                                                          2)),
                                    request_id=_rid("commit"))
    return Op("commit", session_id, client, req)


def new_config(session_id: str, client: str, max_messages: int) -> Op:
    return Op("config", session_id, client, session_pb2.UpdateSessionConfigRequest(
        session_id=session_id, auto_commit=session_pb2.AutoCommitPolicy(
            max_messages=max_messages, idle_seconds=AUTO_IDLE_SECONDS)))


def new_create(session_id: str, client: str) -> Op:
    return Op("create", session_id, client,
              session_pb2.CreateSessionRequest(session_id=session_id, request_id=_rid("create")))


def send(stubs: Stubs, op: Op) -> Any:
    svc = stubs.sessions
    if op.kind == "create":
        return svc.CreateSession(op.request, timeout=CALL_TIMEOUT)
    if op.kind == "config":  # idempotent: the same policy again changes nothing
        return svc.UpdateSessionConfig(op.request, timeout=CALL_TIMEOUT)
    if op.kind == "add":
        return svc.AddMessage(op.request, timeout=CALL_TIMEOUT)
    if op.kind == "usage":
        return svc.RecordUsage(op.request, timeout=CALL_TIMEOUT)
    if op.kind == "commit":
        return svc.Commit(op.request, timeout=CALL_TIMEOUT)
    raise ValueError(op.kind)


# ---------------------------------------------------------------------- the run
class CrashRun:
    def __init__(self, work_dir: Path, *, seed: int, clients: int = 4,
                 max_kill_delay: float = 2.0, heavy: float = 0.03,
                 server_args: Sequence[str] = FAST_ARGS, engine: str = "offline",
                 log: Callable[[str], None] = print) -> None:
        self.work_dir = Path(work_dir)
        self.seed = seed
        self.rng = random.Random(seed)
        self.clients = max(2, clients)
        self.max_kill_delay = max_kill_delay
        self.heavy = heavy
        self.log = log
        # With engine="openai" Phase 2 talks to a fake OpenAI-compatible server in this
        # process: real token usage to count (the offline engine reports none).
        self.llm: FakeLLM | None = None
        env: dict[str, str] = {}
        if engine == "openai":
            self.llm = FakeLLM().start()
            server_args = [*server_args, "--engine", "openai", "--llm-base-url",
                           self.llm.base_url, "--llm-model", "fake-model", "--llm-api-key-env",
                           LLM_KEY_ENV, "--llm-timeout", "10", "--llm-max-retries", "2"]
            env[LLM_KEY_ENV] = "crash-test-key"
        elif engine != "offline":
            raise ValueError(f"engine {engine!r}")
        self.srv = ServerProcess(self.work_dir / "data", extra_args=server_args, env=env)
        self.model = Model()
        self.stats = Stats()
        self.violations: list[str] = []
        self._vlock = threading.Lock()
        self._session_counter = 0
        self._touched: set[str] = set()
        self._task_states: dict[str, int] = {}

    # --------------------------------------------------------------- helpers
    def violation(self, msg: str) -> None:
        with self._vlock:
            self.violations.append(msg)
        self.log(f"VIOLATION: {msg}")

    def close(self) -> None:
        self.srv.close()
        if self.llm is not None:
            self.llm.stop()
            self.llm = None

    def _next_session_id(self) -> str:
        with self._vlock:
            self._session_counter += 1
            return f"crash-{self.seed}-{self._session_counter:04d}"

    @staticmethod
    def episodes_for(rounds: int, failpoints: Sequence[str] = ALL_POINTS,
                     random_per_round: int = 1, term_per_round: int = 1,
                     recovery_kills_per_round: int = 1) -> list[str]:
        """Per round: random SIGKILLs, graceful stops (alternately clean and SIGKILLed
        halfway), kills during recovery, then one episode per failpoint."""
        out: list[str] = []
        for r in range(rounds):
            terms = [TERM if (r + i) % 2 == 0 else TERM_KILL for i in range(term_per_round)]
            out += ([RANDOM] * random_per_round + terms
                    + [RECOVERY_KILL] * recovery_kills_per_round + list(failpoints))
        return out

    def run(self, episodes: Sequence[str]) -> Stats:
        try:
            for i, kind in enumerate(episodes, 1):
                t0 = time.monotonic()
                self.episode(kind)
                self.log(f"episode {i}/{len(episodes)} {kind}: "
                         f"{time.monotonic() - t0:.1f}s, violations so far "
                         f"{len(self.violations)}")
            self.final_check()
        finally:
            self.close()
        return self.stats

    # --------------------------------------------------------------- one episode
    def episode(self, kind: str) -> None:
        """Start (armed), run the clients until the server dies, then recover and check."""
        rng = self.rng
        self.stats.episodes += 1
        armed = ""
        if kind not in (RANDOM, TERM, TERM_KILL, RECOVERY_KILL):
            nth = (rng.randint(1, 8) if kind.startswith("commit.")
                   # an idle commit needs a quiet second and a scan: the first one
                   # within the episode's window, also on a loaded machine
                   else 1 if kind.startswith("autocommit.idle")
                   else rng.randint(1, 3) if kind.startswith("autocommit.")
                   else rng.randint(1, 5))
            armed = f"{kind}@{nth}"
        self.srv.start(armed)
        n_new = (self.clients + 1) // 2
        new_ids = [self._next_session_id() for _ in range(n_new)]
        older = sorted(s for s in self.model.sessions if self.model.sessions[s].created)
        sessions = older[-self.clients:] + new_ids
        with self.model.lock:
            for sid in new_ids:
                self.model.sessions[sid] = SessionModel(sid)
            self.model.sessions[new_ids[0]].auto_max = rng.randint(3, 6)
        self._touched = set(sessions)
        stop = threading.Event()
        pending: list[Op] = []
        plock = threading.Lock()
        task_q: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        threads = [threading.Thread(
            target=self._client, name=f"client-{i}",
            args=(f"c{self.stats.episodes}.{i}", new_ids[i:i + 1], sessions,
                  random.Random(rng.random()), stop, pending, plock, task_q))
            for i in range(self.clients)]
        threads.append(threading.Thread(target=self._watcher, name="watcher", args=(task_q,)))
        for t in threads:
            t.start()
        try:
            if kind in (RANDOM, RECOVERY_KILL):
                time.sleep(rng.uniform(0.2, self.max_kill_delay))
                self.srv.kill()
                self.stats.random_kills += 1
            elif kind == TERM:
                time.sleep(rng.uniform(0.2, self.max_kill_delay))
                t0 = time.monotonic()
                rc = self.srv.terminate()
                self.stats.graceful_stops += 1
                if rc != 0:
                    self.violation(f"SIGTERM under load: exit {rc}:\n{self.srv.log_tail(1500)}")
                if time.monotonic() - t0 > GRACE_LIMIT:
                    self.violation(f"SIGTERM under load took {time.monotonic() - t0:.1f}s")
            elif kind == TERM_KILL:
                time.sleep(rng.uniform(0.2, self.max_kill_delay))
                self.srv.signal_term()
                time.sleep(rng.uniform(0.0, 0.3))
                self.srv.kill()
                self.stats.term_kills += 1
            else:
                status = self.srv.wait_exit(8.0)
                if status is None:
                    self.srv.kill()
                    self.stats.failpoints_not_reached.append(armed)
                    self.log(f"failpoint {armed} not reached; killed")
                elif status != 137:
                    self.violation(f"{armed}: server exited with {status}, expected 137:\n"
                                   f"{self.srv.log_tail(1500)}")
                else:
                    self.stats.failpoint_kills += 1
        finally:
            stop.set()
            task_q.put(None)
            for t in threads:
                t.join(60)
                if t.is_alive():
                    self.violation(f"client thread {t.name} hung after the kill")
        if kind == RECOVERY_KILL:
            pending = self._crash_during_recovery(pending)
        self.recover(pending)

    def _crash_during_recovery(self, pending: list[Op]) -> list[Op]:
        """Restart, start retrying, and SIGKILL again within 0.3 s (Phase 2 is being
        resumed then). Returns the calls still not acknowledged."""
        self.srv.start()
        killer = threading.Timer(self.rng.uniform(0.0, 0.3), self.srv.kill)
        killer.start()
        still: list[Op] = []
        lock = threading.Lock()
        try:
            with Stubs(self.srv.target) as stubs:
                for i, op in enumerate(pending):
                    self.stats.retried[op.kind] += 1
                    if self._call(stubs, op, still, lock) is None:
                        still += pending[i + 1:]
                        break
        finally:
            killer.join()
        self.srv.kill()  # (no-op when the timer already did it)
        self.stats.recovery_kills += 1
        return still

    # --------------------------------------------------------------- clients
    def _call(self, stubs: Stubs, op: Op, pending: list[Op] | None = None,
              plock: threading.Lock | None = None) -> Any | None:
        """Send; on success record the ack. On a transport error keep the op for retry
        and return None (the caller stops: the server is gone)."""
        if op.sent < 0:
            op.sent = self.model.tick()
        try:
            resp = send(stubs, op)
        except grpc.RpcError as exc:
            code = exc.code()
            if code not in TRANSIENT or pending is None or plock is None:
                self.violation(f"{op.kind} {op.request.request_id} on {op.session_id} failed "
                               f"with {code.name}: {exc.details()}")
            if pending is not None and plock is not None:
                with plock:
                    pending.append(op)
            return None
        self.ack(op, resp)
        return resp

    def ack(self, op: Op, resp: Any) -> None:
        m = self.model
        acked = m.tick()
        with m.lock:
            sm = m.sessions[op.session_id]
            self.stats.acked[op.kind] += 1
            req = op.request
            if op.kind == "create":
                if resp.session_id != op.session_id:
                    self.violation(f"CreateSession returned {resp.session_id}")
                sm.created = True
                sm.create_request_id = req.request_id
            elif op.kind == "config":
                if (resp.auto_commit.max_messages, resp.auto_commit_inherited) != \
                        (sm.auto_max, False):
                    self.violation(f"UpdateSessionConfig of {op.session_id} returned "
                                   f"{one_line(resp.auto_commit)}")
                sm.configured = True
            elif op.kind == "add":
                msg = resp.message
                sm.msgs_by_client.setdefault(op.client, []).append(MsgAck(
                    op.session_id, op.client, req.request_id, msg.id, msg.seq,
                    tuple(p.SerializeToString(deterministic=True) for p in req.parts), req,
                    op.sent, acked))
            elif op.kind == "usage":
                sm.usage.append(UsageAck(req.request_id, tuple(req.context_uris),
                                         req.skill.uri, req, op.sent, acked))
            elif op.kind == "commit":
                if resp.archived and not (resp.task_id and resp.archive_uri):
                    self.violation(f"archived commit without task/archive: {resp}")
                elif not resp.archived and (resp.task_id or resp.archive_uri):
                    self.violation(f"commit not archived but has task {resp.task_id}")
                sm.commits.append(CommitAck(req.request_id, resp.archived, resp.task_id,
                                            resp.archive_uri, req, op.sent, acked))

    def _client(self, client: str, create: list[str], sessions: list[str],
                rng: random.Random, stop: threading.Event, pending: list[Op],
                plock: threading.Lock, task_q: queue.SimpleQueue[str | None]) -> None:
        with Stubs(self.srv.target) as stubs:
            for sid in create:
                if stop.is_set() or self._call(stubs, new_create(sid, client), pending,
                                               plock) is None:
                    return
                auto_max = self.model.sessions[sid].auto_max
                if auto_max and self._call(stubs, new_config(sid, client, auto_max), pending,
                                           plock) is None:
                    return
            while not stop.is_set():
                ready = self.model.created_sessions(sessions)
                if not ready:
                    time.sleep(0.01)
                    continue
                sid = rng.choice(ready)
                auto = self.model.sessions[sid].auto_max > 0
                r = rng.random()
                if r < 0.80 or (auto and 0.92 <= r < 0.99):  # auto sessions: no Commit
                    op = new_add(rng, sid, client, self.heavy)
                    if auto and rng.random() < 0.25:  # let its idle trigger fire
                        with self.model.lock:
                            self.model.sessions[sid].quiet_until = (time.monotonic()
                                                                    + AUTO_QUIET_SECONDS)
                elif r < 0.92:
                    op = new_usage(rng, sid, client)
                elif r < 0.99:
                    op = new_commit(rng, sid, client)
                else:  # now and then a new session, so CreateSession gets killed too
                    sid = self._next_session_id()
                    with self.model.lock:
                        self.model.sessions[sid] = SessionModel(sid)
                    op = new_create(sid, client)
                resp = self._call(stubs, op, pending, plock)
                if op.kind == "create":
                    sessions.append(sid)  # in the model even if unacknowledged (retried)
                    self._touched.add(sid)
                if resp is None:
                    return
                if op.kind == "commit" and resp.task_id:
                    task_q.put(resp.task_id)
                time.sleep(rng.uniform(0.002, 0.012))

    def _watcher(self, task_q: queue.SimpleQueue[str | None]) -> None:
        with Stubs(self.srv.target) as stubs:
            while True:
                task_id = task_q.get()
                if task_id is None:
                    break
                with self.model.lock:
                    rec = self.model.watches.setdefault(task_id, WatchRecord(task_id))
                if not self.watch(stubs, rec):
                    break
        # Tasks queued but not (fully) watched are followed after the restart.
        while True:
            try:
                task_id = task_q.get_nowait()
            except queue.Empty:
                return
            if task_id is not None:
                with self.model.lock:
                    self.model.watches.setdefault(task_id, WatchRecord(task_id))

    def watch(self, stubs: Stubs, rec: WatchRecord, timeout: float = 60.0) -> bool:
        """Follow `rec.task_id` from `rec.last`; True once the terminal event arrived,
        False when the stream broke (resume later)."""
        if rec.done:
            return True
        if rec.seqs:
            rec.resumes += 1
            self.stats.watch_resumes += 1
        req = task_pb2.WatchTaskRequest(task_id=rec.task_id, after_seq=rec.last)
        first = True
        try:
            for item in stubs.tasks.WatchTask(req, timeout=timeout):
                kind = item.WhichOneof("kind")
                if first:
                    first = False
                    if kind != "snapshot":
                        self.violation(f"watch {rec.task_id}: first item is {kind}")
                    elif item.snapshot.last_seq < rec.last:
                        self.violation(f"watch {rec.task_id}: snapshot last_seq "
                                       f"{item.snapshot.last_seq} < resumed {rec.last}")
                    continue
                if kind != "event":
                    continue
                ev = item.event
                if ev.seq != rec.last + 1:
                    self.violation(f"watch {rec.task_id}: got seq {ev.seq} after {rec.last}")
                rec.seqs.append(ev.seq)
                rec.kinds.append(ev.kind)
                if ev.kind in TERMINAL_KINDS:
                    rec.done = True
            if not rec.done:
                self.violation(f"watch {rec.task_id}: stream ended OK without a terminal "
                               f"event (last {rec.last})")
            return True
        except grpc.RpcError as exc:
            if exc.code() not in TRANSIENT:
                self.violation(f"watch {rec.task_id} failed: {exc.code().name} {exc.details()}")
                return True
            return False

    # --------------------------------------------------------------- recovery
    def recover(self, pending: list[Op]) -> None:
        self.srv.start()
        restart_at = time.time()
        with Stubs(self.srv.target) as stubs:
            # Retry what was not acknowledged with the same request_id.
            for op in pending:
                self.stats.retried[op.kind] += 1
                resp = self._call(stubs, op)
                if resp is None:
                    continue
                if self._applied_before(stubs, op, resp, restart_at):
                    self.stats.retried_already_applied[op.kind] += 1
                if op.kind == "commit" and resp.task_id:
                    with self.model.lock:
                        self.model.watches.setdefault(resp.task_id, WatchRecord(resp.task_id))
            self._replay_sample(stubs)
            self.drain_auto(stubs, self._touched)
            self.settle(stubs, self._touched)
            with self.model.lock:
                recs = [r for r in self.model.watches.values() if not r.done]
            for rec in recs:
                if not self.watch(stubs, rec, timeout=30):
                    self.violation(f"watch of {rec.task_id} broke after the restart")
            self.verify_api(stubs, sorted(self._touched))
        rc = self.srv.terminate()
        self.stats.graceful_stops += 1
        if rc != 0:
            self.violation(f"graceful stop exited {rc}:\n{self.srv.log_tail(1500)}")
        self.verify_db()

    @staticmethod
    def _applied_before(stubs: Stubs, op: Op, resp: Any, restart_at: float) -> bool:
        """Whether a retried call had in fact been applied before the kill."""
        if op.kind == "add":
            return bool(resp.message.created_at.ToDatetime().timestamp() < restart_at)
        if op.kind == "create":
            return bool(resp.created_at.ToDatetime().timestamp() < restart_at)
        if op.kind == "commit" and resp.task_id:
            t = stubs.tasks.GetTask(task_pb2.GetTaskRequest(task_id=resp.task_id),
                                    timeout=CALL_TIMEOUT)
            return bool(t.created_at.ToDatetime().timestamp() < restart_at)
        return False

    def _replay_sample(self, stubs: Stubs) -> None:
        """Acknowledged calls sent again after the restart must return the same result
        and change nothing (the counts are checked afterwards)."""
        rng = self.rng
        with self.model.lock:
            sessions = [self.model.sessions[s] for s in sorted(self._touched)
                        if self.model.sessions[s].created]
        for sm in sessions:
            create = session_pb2.CreateSessionRequest(session_id=sm.session_id,
                                                      request_id=sm.create_request_id)
            self._replay_one(stubs, "create", create, _session_key, (sm.session_id,))
            with self.model.lock:
                msgs = self.model.all_msgs(sm.session_id)
                commits = list(sm.commits)
                usage = list(sm.usage)
            for m in rng.sample(msgs, min(3, len(msgs))):
                self._replay_one(stubs, "add", m.request, _message_key, (m.message_id, m.seq))
            for u in rng.sample(usage, min(2, len(usage))):
                self._replay_one(stubs, "usage", u.request, _no_key, ())
            for c in rng.sample(commits, min(2, len(commits))):
                self._replay_one(stubs, "commit", c.request, _commit_key,
                                 (c.archived, c.task_id, c.archive_uri))

    def _replay_one(self, stubs: Stubs, kind: str, req: Any,
                    key: Callable[[Any], tuple[Any, ...]], expected: tuple[Any, ...]) -> None:
        try:
            resp = send(stubs, Op(kind, req.session_id, "replay", req))
        except grpc.RpcError as exc:
            self.violation(f"replay of acked {kind} {req.request_id}: {exc.code().name} "
                           f"{exc.details()}")
            return
        self.stats.replayed += 1
        if key(resp) != expected:
            self.violation(f"replay of acked {kind} {req.request_id} returned a different "
                           f"result: {one_line(resp)}")

    def drain_auto(self, stubs: Stubs, sessions: Iterable[str], timeout: float = 20.0) -> None:
        """Auto-commit sessions empty their live buffers by themselves (idle trigger)."""
        with self.model.lock:
            auto = [s for s in sessions if self.model.sessions[s].auto_max
                    and self.model.sessions[s].created]
        deadline = time.monotonic() + timeout
        for sid in auto:
            while True:
                meta = stubs.sessions.GetSession(session_pb2.GetSessionRequest(session_id=sid),
                                                 timeout=CALL_TIMEOUT)
                if meta.live_message_count == 0:
                    break
                if time.monotonic() > deadline:
                    self.violation(f"{sid}: {meta.live_message_count} live message(s) not "
                                   f"auto-committed {AUTO_IDLE_SECONDS} s after the last append")
                    break
                time.sleep(0.1)

    def settle(self, stubs: Stubs, sessions: Iterable[str], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        sessions = list(sessions)
        while True:
            open_tasks = [t for sid in sessions for t in self.list_tasks(stubs, sid)
                          if t.state not in TERMINAL_STATES]
            if not open_tasks:
                return
            if time.monotonic() > deadline:
                self.violation(f"{len(open_tasks)} task(s) did not settle in {timeout}s: "
                               f"{[(t.task_id, t.state, t.stage) for t in open_tasks[:5]]}")
                return
            time.sleep(0.1)

    @staticmethod
    def list_tasks(stubs: Stubs, session_id: str) -> list[task_pb2.Task]:
        out: list[task_pb2.Task] = []
        token = ""
        while True:
            page = stubs.tasks.ListTasks(task_pb2.ListTasksRequest(
                session_id=session_id, page_size=1000, page_token=token), timeout=CALL_TIMEOUT)
            out += list(page.tasks)
            token = page.next_page_token
            if not token:
                return out

    # --------------------------------------------------------------- invariants (API)
    def verify_api(self, stubs: Stubs, session_ids: Sequence[str]) -> None:
        for sid in session_ids:
            with self.model.lock:
                sm = self.model.sessions[sid]
                created = sm.created
            if created:
                self._verify_session(stubs, sm)

    def _verify_session(self, stubs: Stubs, sm: SessionModel) -> None:
        sid = sm.session_id
        v = self.violation
        s = stubs.sessions
        meta = s.GetSession(session_pb2.GetSessionRequest(session_id=sid), timeout=CALL_TIMEOUT)
        archives: list[session_pb2.Archive] = []
        token = ""
        while True:
            page = s.ListArchives(session_pb2.ListArchivesRequest(
                session_id=sid, page_size=1000, page_token=token), timeout=CALL_TIMEOUT)
            archives += list(page.archives)
            token = page.next_page_token
            if not token:
                break
        context = s.GetSessionContext(session_pb2.GetSessionContextRequest(session_id=sid),
                                      timeout=CALL_TIMEOUT)
        live = list(context.current_messages)
        # Archives 1..n, consecutive, each with its messages; messages in exactly one place.
        if [a.index for a in archives] != list(range(1, len(archives) + 1)):
            v(f"{sid}: archive indices {[a.index for a in archives]} not 1..n")
        stored: list[tuple[int, session_pb2.Message]] = []  # (archive index or 0, message)
        arch_ids: dict[int, set[str]] = {}
        for a in archives:
            full = s.GetArchive(session_pb2.GetArchiveRequest(session_id=sid, index=a.index),
                                timeout=CALL_TIMEOUT)
            msgs = list(full.messages)
            if not msgs or full.message_count != len(msgs):
                v(f"{sid}: archive {a.index} has {len(msgs)} messages, message_count "
                  f"{full.message_count}")
            elif (full.first_message_id, full.last_message_id) != (msgs[0].id, msgs[-1].id):
                v(f"{sid}: archive {a.index} first/last ids do not match its messages")
            if a.archive_uri != archive_uri(sid, a.index):
                v(f"{sid}: archive {a.index} uri {a.archive_uri}")
            with self.model.lock:
                self.model.archive_msg_uris[(sid, a.index)] = frozenset(
                    part_uris(p for m in msgs for p in m.parts))
            stored += [(a.index, m) for m in msgs]
            arch_ids[a.index] = {m.id for m in msgs}
        stored += [(0, m) for m in live]
        seqs = [m.seq for _, m in stored]
        if any(b <= a for a, b in itertools.pairwise(seqs)):
            v(f"{sid}: seq not strictly increasing across archives + live buffer: {seqs[:50]}")
        ids = [m.id for _, m in stored]
        if len(ids) != len(set(ids)):
            dup = [i for i, n in collections.Counter(ids).items() if n > 1]
            v(f"{sid}: messages stored more than once: {dup[:5]}")
        where = {m.id: (idx, m) for idx, m in stored}
        with self.model.lock:
            acked = self.model.all_msgs(sid)
            by_client = {c: list(lst) for c, lst in sm.msgs_by_client.items()}
            commits = list(sm.commits)
        acked_ids = {m.message_id for m in acked}
        if len(acked_ids) != len(acked):
            v(f"{sid}: two acknowledged AddMessage calls got the same message id")
        lost = [m for m in acked if m.message_id not in where]
        if lost:
            v(f"{sid}: {len(lost)} acknowledged message(s) lost, e.g. {lost[0].message_id}")
        phantom = [i for i in ids if i not in acked_ids]
        if phantom:
            v(f"{sid}: {len(phantom)} stored message(s) nobody was acknowledged for: "
              f"{phantom[:3]}")
        for m in acked:
            got = where.get(m.message_id)
            if got is None:
                continue
            if got[1].seq != m.seq:
                v(f"{sid}: message {m.message_id} acked with seq {m.seq}, stored {got[1].seq}")
            parts = tuple(p.SerializeToString(deterministic=True) for p in got[1].parts)
            if parts != m.parts:
                v(f"{sid}: message {m.message_id} content differs from what was sent")
        for client, lst in by_client.items():
            cs = [where[m.message_id][1].seq for m in lst if m.message_id in where]
            if any(b <= a for a, b in itertools.pairwise(cs)):
                v(f"{sid}: order of client {client} not preserved: {cs}")
        # A message sent after a commit was acknowledged is not in that commit's archive
        # (or an earlier one); one acknowledged before a keep-nothing commit was sent is.
        archived = [c for c in commits if c.archived]
        for c in archived:
            for m in acked:
                got = where.get(m.message_id)
                if got is None:
                    continue
                idx = got[0]
                if m.sent > c.acked and 0 < idx <= c.index:
                    v(f"{sid}: message {m.message_id} sent after commit {c.index} was acked "
                      f"is in archive {idx}")
                if (m.acked < c.sent and c.request.keep_recent_count == 0
                        and not 0 < idx <= c.index):
                    v(f"{sid}: message {m.message_id} acked before commit {c.index} "
                      f"(keep 0) was sent is {'live' if idx == 0 else f'in archive {idx}'}")
        tasks = {t.task_id: t for t in self.list_tasks(stubs, sid)}
        if sm.auto_max:
            self._verify_auto(sm, archives, tasks, live)
        # Commits <-> archives <-> tasks.
        elif len(archived) != len(archives):
            v(f"{sid}: {len(archived)} archived commits acknowledged but {len(archives)} "
              f"archives stored")
        by_uri = {a.archive_uri: a for a in archives}
        for c in archived:
            found = by_uri.get(c.archive_uri)
            if found is None:
                v(f"{sid}: archive {c.archive_uri} of commit {c.request_id} missing")
            elif found.task_id != c.task_id:
                v(f"{sid}: archive {found.index} has task {found.task_id}, commit said "
                  f"{c.task_id}")
        if len({c.archive_uri for c in archived}) != len(archived):
            v(f"{sid}: two acknowledged commits got the same archive")
        if set(tasks) != {a.task_id for a in archives}:
            v(f"{sid}: tasks {sorted(tasks)} != archive tasks {[a.task_id for a in archives]}")
        done = 0
        mem_sum: collections.Counter[str] = collections.Counter()
        tok = [0, 0]
        for a in archives:
            t = tasks.get(a.task_id)
            if a.state == session_pb2.ARCHIVE_STATE_DONE:
                done += 1
            if t is None:
                continue
            if t.state == task_pb2.TASK_STATE_COMPLETED:
                if a.state != session_pb2.ARCHIVE_STATE_DONE:
                    v(f"{sid}: task {t.task_id} COMPLETED but archive {a.index} not DONE")
                if t.result.archive_uri != a.archive_uri:
                    v(f"{sid}: task {t.task_id} result for {t.result.archive_uri}")
                for f in MEMORY_FIELDS:
                    mem_sum[f] += getattr(t.result.memories_extracted, f)
                used = (t.result.token_usage.prompt_tokens,
                        t.result.token_usage.completion_tokens)
                tok[0] += used[0]
                tok[1] += used[1]
                self._check_tokens(sid, a.index, t.task_id, used, arch_ids.get(a.index, set()))
            elif a.state == session_pb2.ARCHIVE_STATE_DONE:
                v(f"{sid}: archive {a.index} DONE but its task is "
                  f"{task_pb2.TaskState.Name(t.state)}")
            if t.state == task_pb2.TASK_STATE_FAILED:
                if not (t.error.message and t.error.code):
                    v(f"{sid}: task {t.task_id} FAILED without a reason: {t.error}")
                else:
                    self.log(f"note: task {t.task_id} FAILED: {t.error.message}")
            elif t.state not in (task_pb2.TASK_STATE_COMPLETED, task_pb2.TASK_STATE_FAILED):
                v(f"{sid}: task {t.task_id} ended {task_pb2.TaskState.Name(t.state)}")
            self._verify_journal(stubs, t)
        self._task_states.update({tid: t.state for tid, t in tasks.items()})
        done_archives = [a for a in archives if a.state == session_pb2.ARCHIVE_STATE_DONE]
        if done_archives:
            newest = done_archives[-1]
            if (context.latest_archive_uri != newest.archive_uri
                    or context.latest_archive_overview != newest.overview):
                v(f"{sid}: context shows {context.latest_archive_uri}, newest DONE archive is "
                  f"{newest.archive_uri}")
            empty = [a.index for a in done_archives if not (a.overview and a.abstract)]
            if empty:
                v(f"{sid}: DONE archives {empty} without overview/abstract")
        elif context.latest_archive_uri:
            v(f"{sid}: context shows {context.latest_archive_uri} but no archive is DONE")
        # Session counters.
        if meta.commit_count != done:
            v(f"{sid}: commit_count {meta.commit_count} != DONE archives {done}")
        if meta.archive_count != len(archives):
            v(f"{sid}: archive_count {meta.archive_count} != {len(archives)}")
        if meta.message_count != len(acked):
            v(f"{sid}: message_count {meta.message_count} != acknowledged {len(acked)}")
        if meta.live_message_count != len(live):
            v(f"{sid}: live_message_count {meta.live_message_count} != {len(live)}")
        got_mem = {f: getattr(meta.memories_extracted, f) for f in MEMORY_FIELDS}
        want_mem = {f: mem_sum[f] for f in MEMORY_FIELDS}
        if got_mem != want_mem:
            v(f"{sid}: memories_extracted {got_mem} != sum over completed tasks {want_mem}")
        u = meta.llm_token_usage
        if (u.prompt_tokens, u.completion_tokens) != tuple(tok) or u.total_tokens != sum(tok):
            v(f"{sid}: llm_token_usage {u} != sum over completed tasks {tok}")

    def _verify_auto(self, sm: SessionModel, archives: Sequence[session_pb2.Archive],
                     tasks: dict[str, task_pb2.Task], live: Sequence[session_pb2.Message]
                     ) -> None:
        """An auto-commit session: each archive came from exactly one trigger firing once
        (MESSAGES: exactly max_messages messages; IDLE: fewer), and nothing stays live."""
        sid, v = sm.session_id, self.violation
        for a in archives:
            t = tasks.get(a.task_id)
            if t is None:
                continue
            if t.commit_trigger == task_pb2.COMMIT_TRIGGER_MESSAGES:
                if a.message_count != sm.auto_max:
                    v(f"{sid}: archive {a.index} (MESSAGES) has {a.message_count} messages, "
                      f"policy {sm.auto_max}")
            elif t.commit_trigger == task_pb2.COMMIT_TRIGGER_IDLE:
                if not 0 < a.message_count < sm.auto_max:
                    v(f"{sid}: archive {a.index} (IDLE) has {a.message_count} messages, "
                      f"policy {sm.auto_max}")
            else:
                v(f"{sid}: archive {a.index} of an auto-commit session has trigger "
                  f"{task_pb2.CommitTrigger.Name(t.commit_trigger)}")
        if live:
            v(f"{sid}: {len(live)} message(s) still live in an auto-commit session")

    def _check_tokens(self, sid: str, index: int, task_id: str, used: tuple[int, int],
                      message_ids: set[str]) -> None:
        """A completed task counts exactly one summary reply and one extraction reply
        of its archive (a retried stage's wasted reply is not counted, none twice)."""
        if self.llm is None:
            if used != (0, 0):
                self.violation(f"{sid}: task {task_id} used {used} tokens offline")
            return
        got = self.llm.for_archive(message_ids)
        pairs = {(s[0] + e[0], s[1] + e[1]) for s in got["summary"] for e in got["extract"]}
        if used not in pairs:
            self.violation(f"{sid}: task {task_id} of archive {index} counted {used} tokens; "
                           f"its replies were summary {got['summary']}, extract "
                           f"{got['extract']}")

    def _verify_journal(self, stubs: Stubs, t: task_pb2.Task) -> None:
        """The journal is 1..last_seq with one CREATED first and one terminal event last,
        and every watcher of the task saw exactly it."""
        items = list(stubs.tasks.WatchTask(task_pb2.WatchTaskRequest(task_id=t.task_id),
                                           timeout=CALL_TIMEOUT))
        events = [i.event for i in items if i.WhichOneof("kind") == "event"]
        seqs = [e.seq for e in events]
        if seqs != list(range(1, len(seqs) + 1)) or (seqs and seqs[-1] != t.last_seq):
            self.violation(f"journal of {t.task_id} is {seqs}, last_seq {t.last_seq}")
        terminal = [e for e in events if e.kind in TERMINAL_KINDS]
        if len(terminal) != 1 or not events or events[-1].kind not in TERMINAL_KINDS:
            self.violation(f"journal of {t.task_id} has {len(terminal)} terminal events")
        if not events or events[0].kind != task_pb2.TASK_EVENT_KIND_CREATED or sum(
                1 for e in events if e.kind == task_pb2.TASK_EVENT_KIND_CREATED) != 1:
            self.violation(f"journal of {t.task_id} does not start with its one CREATED")
        starts = sum(1 for e in events if e.kind == task_pb2.TASK_EVENT_KIND_STARTED)
        if starts != t.attempts:
            self.violation(f"journal of {t.task_id} has {starts} STARTED events, attempts "
                           f"{t.attempts}")
        if t.state == task_pb2.TASK_STATE_COMPLETED:
            done = [e.stage for e in events
                    if e.kind == task_pb2.TASK_EVENT_KIND_STAGE_COMPLETED]
            if done != list(PIPELINE_STAGES):
                self.violation(f"{t.task_id}: stages completed {done}, each exactly once "
                               f"expected")
        with self.model.lock:
            rec = self.model.watches.get(t.task_id)
        if rec is not None and (rec.seqs != seqs or rec.kinds != [e.kind for e in events]):
            self.violation(f"watcher of {t.task_id} saw {rec.seqs} (resumed {rec.resumes}x), "
                           f"journal is {seqs}")

    # --------------------------------------------------------------- invariants (file)
    def verify_db(self) -> None:
        """With the server stopped, read the SQLite file: usage rows, active counts,
        relations, one task per archive."""
        conn = sqlite3.connect(f"file:{self.srv.db_path}?mode=ro", uri=True)
        conn.row_factory = sqlite3.Row
        try:
            self._verify_db(conn)
        finally:
            conn.close()

    def _verify_db(self, conn: sqlite3.Connection) -> None:
        v = self.violation
        with self.model.lock:
            sessions = {sid: sm for sid, sm in self.model.sessions.items() if sm.created}
            msg_uris = dict(self.model.archive_msg_uris)
        tasks: dict[tuple[str, int], sqlite3.Row] = {}
        for r in conn.execute("SELECT session_id, archive_index, done_stage, state, "
                              "active_count_updated, task_id FROM tasks"):
            key = (r["session_id"], r["archive_index"])
            if key in tasks:
                v(f"{key}: two tasks for one archive")
            tasks[key] = r
        # Usage: each acknowledged RecordUsage is exactly one row, in an archive that
        # fits the order of the calls.
        archive_uris: dict[tuple[str, int], set[str]] = {
            k: set(u) for k, u in msg_uris.items()}
        for sid, sm in sessions.items():
            skey = codec.session_key(DEFAULT_IDENTITY, sid)
            rows: dict[str, list[int]] = collections.defaultdict(list)
            for r in conn.execute("SELECT context_uris, skill, created_at, archive_index "
                                  "FROM usage WHERE skey=? ORDER BY id", (skey,)):
                rec = codec.decode_usage(r["context_uris"], r["skill"],
                                         datetime.fromtimestamp(r["created_at"], UTC))
                rid = rec.skill.input if rec.skill is not None else ""
                rows[rid].append(int(r["archive_index"] or 0))
                if r["archive_index"]:
                    archive_uris.setdefault((sid, int(r["archive_index"])), set()).update(
                        rec.used_uris())
            with self.model.lock:
                usage = list(sm.usage)
                archived = [c for c in sm.commits if c.archived]
            acked = {u.request_id: u for u in usage}
            for rid, idxs in rows.items():
                if rid not in acked:
                    v(f"{sid}: usage row {rid!r} nobody was acknowledged for")
                elif len(idxs) != 1:
                    v(f"{sid}: usage {rid} stored {len(idxs)} times")
            for u in usage:
                if u.request_id not in rows:
                    v(f"{sid}: acknowledged usage {u.request_id} lost")
                    continue
                idx = rows[u.request_id][0]
                for c in archived:
                    if u.acked < c.sent and not 0 < idx <= c.index:
                        v(f"{sid}: usage acked before commit {c.index} was sent is in "
                          f"{idx or 'no archive'}")
                    if u.sent > c.acked and 0 < idx <= c.index:
                        v(f"{sid}: usage sent after commit {c.index} was acked is in "
                          f"archive {idx}")
        # Active counts: +1 per archive whose active_counts stage is done, per used uri.
        expected_active: collections.Counter[str] = collections.Counter()
        expected_rel: dict[str, set[str]] = collections.defaultdict(set)
        for (sid, idx), uris in archive_uris.items():
            if sid not in sessions:
                continue
            t = tasks.get((sid, idx))
            if t is None:
                v(f"{sid}: no task row for archive {idx}")
                continue
            if t["done_stage"] in STAGES_AT_LEAST_ACTIVE:
                expected_active.update(uris)
                if t["active_count_updated"] != len(uris):
                    v(f"{sid}: task {t['task_id']} active_count_updated "
                      f"{t['active_count_updated']} != {len(uris)} uris used")
            if t["done_stage"] in STAGES_AT_LEAST_RELATIONS:
                expected_rel[sid] |= uris
        got_active = {r["uri"]: r["active_count"]
                      for r in conn.execute("SELECT uri, active_count FROM active_counts")}
        for uri in sorted(set(got_active) | set(expected_active)):
            if got_active.get(uri, 0) != expected_active.get(uri, 0):
                v(f"active_count({uri}) = {got_active.get(uri, 0)}, expected "
                  f"{expected_active.get(uri, 0)} (once per archive that used it)")
        for sid in sessions:
            skey = codec.session_key(DEFAULT_IDENTITY, sid)
            rel = {r[0] for r in conn.execute("SELECT uri FROM relations WHERE skey=?",
                                              (skey,))}
            if rel != expected_rel.get(sid, set()):
                v(f"{sid}: relations {sorted(rel)} != {sorted(expected_rel.get(sid, set()))}")
        # Retrieval index: an archive past its index stage has one episode per message
        # with text and at most one overview entry; an archive before it has none.
        for (sid, idx), t in tasks.items():
            if sid not in sessions:
                continue
            skey = codec.session_key(DEFAULT_IDENTITY, sid)
            texts = sum(1 for r in conn.execute(
                "SELECT parts FROM messages WHERE skey=? AND archive_index=?", (skey, idx))
                if any(isinstance(p, TextPart) and p.text.strip()
                       for p in codec.decode_parts(r[0])))
            got = dict(conn.execute(
                "SELECT kind, COUNT(*) FROM recall_entries WHERE skey=? AND archive_index=? "
                "GROUP BY kind", (skey, idx)).fetchall())
            indexed = t["done_stage"] in ("index", "finalize")
            want_messages = texts if indexed else 0
            if got.get("message", 0) != want_messages or got.get("overview", 0) > int(indexed):
                v(f"{sid}: archive {idx} (done {t['done_stage']}) has index entries {got}, "
                  f"expected {want_messages} episodes")

    def final_check(self) -> None:
        """Everything, all sessions, on a fresh start."""
        self.srv.start()
        with Stubs(self.srv.target) as stubs:
            self.drain_auto(stubs, sorted(self.model.sessions))
            self.settle(stubs, sorted(self.model.sessions))
            self.verify_api(stubs, sorted(self.model.sessions))
        rc = self.srv.terminate()
        if rc != 0:
            self.violation(f"graceful stop exited {rc}")
        self.verify_db()
        states = collections.Counter(self._task_states.values())
        self.stats.tasks_completed = states[task_pb2.TASK_STATE_COMPLETED]
        self.stats.tasks_failed = states[task_pb2.TASK_STATE_FAILED]
