"""The client commands of `sessiond`: look inside a running server and drive it by hand.

    sessiond sessions ls|show|rm      sessiond messages add
    sessiond commit SESSION [--watch] sessiond tasks ls|show|watch|cancel|retry
    sessiond memories ls|search|rm    sessiond recall QUERY
    sessiond info

They talk gRPC through the project's client library (`sessiond.client.connect`).
Connection settings come from flags, else the environment (SESSIOND_ADDRESS,
SESSIOND_API_KEY, SESSIOND_TOKEN, SESSIOND_CA_FILE, SESSIOND_ACCOUNT, ...), else a
small TOML file (`--config`, SESSIOND_CONFIG, default ~/.config/sessiond/client.toml),
else the defaults. `--output json` prints JSON (JSON lines for watches). Errors are
one line on stderr with the gRPC code and the ErrorInfo reason. Exit codes: EXIT_*.
"""

from __future__ import annotations

import argparse
import copy
import ipaddress
import json
import os
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message as ProtoMessage
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from rich.console import Console
from rich.live import Live
from rich.table import Table
from sessiond.client import Identity, WatchInterrupted, WatchTimeout, connect, watch_task
from sessiond.v1 import (
    memory_pb2,
    memory_pb2_grpc,
    server_pb2,
    server_pb2_grpc,
    session_pb2,
    session_pb2_grpc,
    task_pb2,
    task_pb2_grpc,
)

# Exit codes (documented in README.md, "Client CLI").
EXIT_OK = 0
EXIT_ERROR = 1  # any other server-side error (INTERNAL, UNKNOWN, ...)
EXIT_USAGE = 2  # bad flags, config file or arguments (argparse uses 2 as well)
EXIT_NOT_FOUND = 3  # NOT_FOUND
EXIT_REJECTED = 4  # INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE, ALREADY_EXISTS, ABORTED
EXIT_AUTH = 5  # UNAUTHENTICATED, PERMISSION_DENIED
EXIT_UNAVAILABLE = 6  # UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED: try again later
EXIT_TASK_FAILED = 7  # a watched task ended FAILED or CANCELLED

_EXIT_BY_CODE: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.NOT_FOUND: EXIT_NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT: EXIT_REJECTED,
    grpc.StatusCode.FAILED_PRECONDITION: EXIT_REJECTED,
    grpc.StatusCode.OUT_OF_RANGE: EXIT_REJECTED,
    grpc.StatusCode.ALREADY_EXISTS: EXIT_REJECTED,
    grpc.StatusCode.ABORTED: EXIT_REJECTED,
    grpc.StatusCode.UNAUTHENTICATED: EXIT_AUTH,
    grpc.StatusCode.PERMISSION_DENIED: EXIT_AUTH,
    grpc.StatusCode.UNAVAILABLE: EXIT_UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: EXIT_UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED: EXIT_UNAVAILABLE,
}

COMMANDS = ("sessions", "messages", "commit", "tasks", "memories", "recall", "info")
DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_CONFIG = Path("~/.config/sessiond/client.toml")
_MAX_ERROR_CHARS = 500
MAX_BATCH = 1000  # messages per AddMessages call (the server's limit)

_ROLES = {"user": session_pb2.ROLE_USER, "assistant": session_pb2.ROLE_ASSISTANT,
          "system": session_pb2.ROLE_SYSTEM, "tool": session_pb2.ROLE_TOOL}
_STATES = {"pending": task_pb2.TASK_STATE_PENDING, "running": task_pb2.TASK_STATE_RUNNING,
           "completed": task_pb2.TASK_STATE_COMPLETED, "failed": task_pb2.TASK_STATE_FAILED,
           "cancelled": task_pb2.TASK_STATE_CANCELLED}
_CATEGORIES = {name.removeprefix("MEMORY_CATEGORY_").lower(): value
               for name, value in memory_pb2.MemoryCategory.items()
               if value != memory_pb2.MEMORY_CATEGORY_UNSPECIFIED}
_KINDS = {name.removeprefix("RECALL_KIND_").lower(): value
          for name, value in memory_pb2.RecallKind.items()
          if value != memory_pb2.RECALL_KIND_UNSPECIFIED}


class UsageError(Exception):
    """Bad flags, environment or config file: exit EXIT_USAGE."""


# --- connection settings ----------------------------------------------------------------

@dataclass
class Connection:
    """Where and how to call: flags > environment > config file > defaults."""

    address: str = DEFAULT_ADDRESS
    api_key: str = ""
    token: str = ""
    tls: bool = False
    ca_file: str = ""
    client_cert: str = ""
    client_key: str = ""
    account: str = ""
    user: str = ""
    agent: str = ""
    timeout: float = 30.0
    output: str = "text"
    sources: dict[str, str] = field(default_factory=dict)  # setting -> where it came from


# setting -> environment variable
_ENV = {"address": "SESSIOND_ADDRESS", "api_key": "SESSIOND_API_KEY",
        "token": "SESSIOND_TOKEN", "tls": "SESSIOND_TLS", "ca_file": "SESSIOND_CA_FILE",
        "client_cert": "SESSIOND_CLIENT_CERT", "client_key": "SESSIOND_CLIENT_KEY",
        "account": "SESSIOND_ACCOUNT", "user": "SESSIOND_USER", "agent": "SESSIOND_AGENT",
        "timeout": "SESSIOND_TIMEOUT", "output": "SESSIOND_OUTPUT"}
# Secrets may come from a file named by these (flag, env or config), never logged.
_FILE_KEYS = {"api_key": "api_key_file", "token": "token_file"}


def _coerce(name: str, value: Any, where: str) -> Any:
    kind = type(getattr(Connection(), name))
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text not in ("1", "0", "true", "false", "yes", "no", "on", "off", ""):
                raise ValueError
            return text in ("1", "true", "yes", "on")
        if kind is float:
            number = float(value)
            if number <= 0:
                raise ValueError
            return number
        if not isinstance(value, str):
            raise ValueError
        return value
    except (TypeError, ValueError):
        raise UsageError(f"{where}: {name} {str(value)[:60]!r} is not valid") from None


def _read_secret(path: str, where: str) -> str:
    try:
        return Path(path).expanduser().read_text().strip()
    except OSError as exc:
        raise UsageError(f"{where}: cannot read {path}: {exc.strerror}") from None


def resolve_connection(ns: argparse.Namespace, environ: dict[str, str] | None = None
                       ) -> Connection:
    env = dict(os.environ if environ is None else environ)
    config_path = ns.config or env.get("SESSIOND_CONFIG", "")
    explicit = bool(config_path)
    path = Path(config_path or DEFAULT_CONFIG).expanduser()
    config: dict[str, Any] = {}
    if path.exists() or explicit:
        try:
            config = tomllib.loads(path.read_text())
        except OSError as exc:
            raise UsageError(f"config {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"config {path}: {exc}") from None
        known = set(_ENV) | set(_FILE_KEYS.values())
        unknown = sorted(set(config) - known)
        if unknown:
            raise UsageError(f"config {path}: unknown setting(s) {', '.join(unknown)[:200]}; "
                             f"known: {', '.join(sorted(known))}")
    conn = Connection()
    for name, var in _ENV.items():
        flag = getattr(ns, name, None)
        file_key = _FILE_KEYS.get(name)
        flag_file = getattr(ns, file_key, None) if file_key else None
        if flag not in (None, ""):
            value, where = flag, f"--{name.replace('_', '-')}"
        elif flag_file:
            value, where = _read_secret(flag_file, f"--{file_key}"), f"--{file_key}"
        elif env.get(var):
            value, where = env[var], var
        elif file_key and env.get(f"{var}_FILE"):
            value, where = _read_secret(env[f"{var}_FILE"], f"{var}_FILE"), f"{var}_FILE"
        elif name in config:
            value, where = config[name], f"config {path}"
        elif file_key and file_key in config:
            value = _read_secret(str(config[file_key]), f"config {path}")
            where = f"config {path}"
        else:
            continue
        setattr(conn, name, _coerce(name, value, where))
        conn.sources[name] = where
    if conn.output not in ("text", "json"):
        raise UsageError(f"{conn.sources.get('output', '--output')}: output must be "
                         "'text' or 'json'")
    if conn.api_key and conn.token:
        raise UsageError("give an API key or a token, not both")
    return conn


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def open_channel(conn: Connection) -> grpc.Channel:
    identity = None
    if conn.account or conn.user or conn.agent:
        try:
            identity = Identity(conn.account or "default", conn.user or "default",
                                conn.agent or "default")
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    secure = conn.tls or bool(conn.ca_file or conn.client_cert)
    credential = bool(conn.api_key or conn.token)
    try:
        return connect(conn.address, identity=identity, tls=secure,
                       root_certificates=conn.ca_file or None,
                       client_cert=conn.client_cert or None,
                       client_key=conn.client_key or None,
                       api_key=conn.api_key or None, token=conn.token or None,
                       plaintext_loopback=credential and not secure
                       and _is_loopback(conn.address))
    except (ValueError, OSError) as exc:
        raise UsageError(str(exc)) from None


# --- output ------------------------------------------------------------------------------

def to_dict(msg: ProtoMessage) -> dict[str, Any]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def _ts(t: Timestamp) -> str:
    if not t.seconds and not t.nanos:
        return ""
    return t.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")


def _enum(name: str, prefix: str) -> str:
    return name.removeprefix(prefix).lower()


class Out:
    """Writes results as rich text or JSON."""

    def __init__(self, output: str) -> None:
        self.json = output == "json"
        self.console = Console(soft_wrap=False, highlight=False)

    def emit(self, obj: Any) -> None:
        print(json.dumps(obj, ensure_ascii=False), flush=True)

    def table(self, title: str, columns: list[str], rows: list[list[str]]) -> None:
        t = Table(title=title, title_justify="left")
        for c in columns:
            t.add_column(c, overflow="fold")
        for r in rows:
            t.add_row(*r)
        self.console.print(t)

    def fields(self, pairs: list[tuple[str, str]]) -> None:
        t = Table(show_header=False, box=None)
        t.add_column(style="bold")
        t.add_column(overflow="fold")
        for k, v in pairs:
            t.add_row(k, v)
        self.console.print(t)


# --- commands ----------------------------------------------------------------------------

@dataclass
class Ctx:
    conn: Connection
    channel: grpc.Channel
    out: Out

    @property
    def sessions(self) -> session_pb2_grpc.SessionServiceStub:
        return session_pb2_grpc.SessionServiceStub(self.channel)

    @property
    def tasks(self) -> task_pb2_grpc.TaskServiceStub:
        return task_pb2_grpc.TaskServiceStub(self.channel)

    @property
    def memories(self) -> memory_pb2_grpc.MemoryServiceStub:
        return memory_pb2_grpc.MemoryServiceStub(self.channel)


def _pages(fetch: Callable[[str], tuple[list[Any], str]], limit: int) -> list[Any]:
    items: list[Any] = []
    token = ""
    while True:
        page, token = fetch(token)
        items.extend(page)
        if not token or (limit and len(items) >= limit):
            return items[:limit] if limit else items


def sessions_ls(c: Ctx, ns: argparse.Namespace) -> int:
    def fetch(token: str) -> tuple[list[Any], str]:
        r = c.sessions.ListSessions(session_pb2.ListSessionsRequest(
            page_size=100, page_token=token), timeout=c.conn.timeout)
        return list(r.sessions), r.next_page_token

    items: list[session_pb2.Session] = _pages(fetch, ns.limit)
    if c.out.json:
        c.out.emit({"sessions": [to_dict(s) for s in items]})
    else:
        c.out.table(f"{len(items)} session(s)",
                    ["session", "messages", "live", "archives", "commits", "memories",
                     "updated"],
                    [[s.session_id, str(s.message_count), str(s.live_message_count),
                      str(s.archive_count), str(s.commit_count),
                      str(s.memories_extracted.total), _ts(s.updated_at)] for s in items])
    return EXIT_OK


def sessions_show(c: Ctx, ns: argparse.Namespace) -> int:
    s = c.sessions.GetSession(session_pb2.GetSessionRequest(session_id=ns.session_id),
                              timeout=c.conn.timeout)
    ctx = c.sessions.GetSessionContext(session_pb2.GetSessionContextRequest(
        session_id=ns.session_id, max_messages=ns.messages), timeout=c.conn.timeout)
    if c.out.json:
        c.out.emit({"session": to_dict(s), "context": to_dict(ctx)})
        return EXIT_OK
    m = s.memories_extracted
    c.out.fields([
        ("session", s.session_id), ("created", _ts(s.created_at)),
        ("updated", _ts(s.updated_at)), ("messages", str(s.message_count)),
        ("live messages", str(s.live_message_count)), ("archives", str(s.archive_count)),
        ("commits", str(s.commit_count)), ("last commit", _ts(s.last_commit_at)),
        ("memories", f"{m.total} (profile {m.profile}, preferences {m.preferences}, "
                     f"entities {m.entities}, events {m.events}, cases {m.cases}, "
                     f"patterns {m.patterns}, tools {m.tools}, skills {m.skills})"),
        ("tokens", f"{s.llm_token_usage.total_tokens} "
                   f"(prompt {s.llm_token_usage.prompt_tokens}, "
                   f"completion {s.llm_token_usage.completion_tokens})"),
    ])
    if ctx.latest_archive_overview:
        c.out.console.print("\n[bold]latest overview[/bold]")
        c.out.console.print(ctx.latest_archive_overview, markup=False)
    if ctx.current_messages:
        c.out.table("live messages", ["seq", "role", "text"],
                    [[str(msg.seq), _enum(session_pb2.Role.Name(msg.role), "ROLE_"),
                      _message_text(msg)] for msg in ctx.current_messages])
    return EXIT_OK


def _message_text(msg: session_pb2.Message) -> str:
    texts = []
    for p in msg.parts:
        kind = p.WhichOneof("kind")
        if kind == "text":
            texts.append(p.text.text)
        elif kind is not None:
            texts.append(f"[{kind}]")
    return " ".join(texts)


def sessions_rm(c: Ctx, ns: argparse.Namespace) -> int:
    r = c.sessions.DeleteSession(session_pb2.DeleteSessionRequest(session_id=ns.session_id),
                                 timeout=c.conn.timeout)
    if c.out.json:
        c.out.emit({"deleted": r.session_id})
    else:
        c.out.console.print(f"deleted session {r.session_id}", markup=False)
    return EXIT_OK


def sessions_revert(c: Ctx, ns: argparse.Namespace) -> int:
    t = c.sessions.RevertArchive(session_pb2.RevertArchiveRequest(
        session_id=ns.session_id, index=ns.index, force=ns.force,
        request_id=ns.request_id or ""), timeout=c.conn.timeout)
    if c.out.json and not ns.watch:
        c.out.emit({"task": to_dict(t)})
    elif not c.out.json:
        c.out.console.print(f"revert of {t.archive_uri} queued: task {t.task_id}", markup=False)
    if ns.watch:
        return watch(c, t.task_id, ns.watch_timeout)
    return EXIT_OK


def sessions_usage(c: Ctx, ns: argparse.Namespace) -> int:
    def fetch(token: str) -> tuple[list[Any], str]:
        r = c.sessions.GetSessionUsage(session_pb2.GetSessionUsageRequest(
            session_id=ns.session_id, archive_index=ns.archive, page_size=100,
            page_token=token), timeout=c.conn.timeout)
        return list(r.uris), r.next_page_token

    items: list[session_pb2.UsedUri] = _pages(fetch, 0)
    if c.out.json:
        c.out.emit({"uris": [to_dict(u) for u in items]})
    else:
        c.out.table(f"{len(items)} uri(s)", ["uri", "active count"],
                    [[u.uri, str(u.active_count)] for u in items])
    return EXIT_OK


def messages_add(c: Ctx, ns: argparse.Namespace) -> int:
    if (ns.text is None) == (ns.file is None):
        raise UsageError("messages add: give the TEXT or --file FILE, not both")
    if ns.create:
        c.sessions.GetSession(session_pb2.GetSessionRequest(session_id=ns.session_id,
                                                            auto_create=True),
                              timeout=c.conn.timeout)
    if ns.file is not None:
        return _messages_add_batch(c, ns)
    text = sys.stdin.read() if ns.text == "-" else ns.text
    if not text.strip():
        raise UsageError("messages add: the text is empty")
    r = c.sessions.AddMessage(session_pb2.AddMessageRequest(
        session_id=ns.session_id, role=_ROLES[ns.role],
        parts=[session_pb2.Part(text=session_pb2.TextPart(text=text))],
        request_id=ns.request_id or ""), timeout=c.conn.timeout)
    if c.out.json:
        c.out.emit({"message": to_dict(r.message)})
    else:
        c.out.console.print(f"added {r.message.id} (seq {r.message.seq}) to {ns.session_id}",
                            markup=False)
    return EXIT_OK


def _role(value: Any, where: str) -> session_pb2.Role.ValueType:
    name = str(value or "user").lower().removeprefix("role_")
    if name not in _ROLES:
        raise UsageError(f"{where}: role {str(value)[:40]!r} is none of "
                         f"{', '.join(sorted(_ROLES))}")
    return _ROLES[name]


def parse_jsonl_messages(text: str, where: str, default_role: str = "user"
                         ) -> list[session_pb2.NewMessage]:
    """JSONL lines {"role", "text" | "parts" (proto JSON), "client_message_id"};
    UsageError naming the line of the first bad one (nothing is sent then)."""
    out: list[session_pb2.NewMessage] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        at = f"{where}:{n}"
        try:
            d = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{at}: not JSON ({exc.msg})") from None
        if not isinstance(d, dict):
            raise UsageError(f"{at}: not a JSON object")
        unknown = set(d) - {"role", "text", "parts", "client_message_id"}
        if unknown:
            raise UsageError(f"{at}: unknown field(s) {', '.join(sorted(unknown))}")
        if ("text" in d) == ("parts" in d):
            raise UsageError(f"{at}: give \"text\" or \"parts\"")
        msg = session_pb2.NewMessage(role=_role(d.get("role", default_role), at),
                                     client_message_id=str(d.get("client_message_id") or ""))
        if "text" in d:
            msg.parts.append(session_pb2.Part(text=session_pb2.TextPart(text=str(d["text"]))))
        else:
            try:
                for p in d["parts"]:
                    msg.parts.append(json_format.ParseDict(p, session_pb2.Part()))
            except (TypeError, json_format.ParseError) as exc:
                raise UsageError(f"{at}: bad parts ({str(exc)[:200]})") from None
        out.append(msg)
    return out


def _messages_add_batch(c: Ctx, ns: argparse.Namespace) -> int:
    if ns.file == "-":
        text, where = sys.stdin.read(), "stdin"
    else:
        try:
            text, where = Path(ns.file).read_text(encoding="utf-8"), ns.file
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"messages add: cannot read {ns.file}: {exc}") from None
    batch = parse_jsonl_messages(text, where, ns.role)
    if not batch:
        raise UsageError(f"messages add: {where} holds no message")
    results: list[session_pb2.AddedMessage] = []
    for n, start in enumerate(range(0, len(batch), MAX_BATCH)):
        rid = f"{ns.request_id}-{n}" if ns.request_id else ""
        r = c.sessions.AddMessages(session_pb2.AddMessagesRequest(
            session_id=ns.session_id, messages=batch[start:start + MAX_BATCH],
            request_id=rid), timeout=c.conn.timeout)
        results.extend(r.results)
    dup = sum(1 for r in results if r.duplicate)
    if c.out.json:
        c.out.emit({"results": [to_dict(r) for r in results], "added": len(results) - dup,
                    "duplicates": dup})
    else:
        c.out.console.print(f"added {len(results) - dup} message(s) to {ns.session_id} "
                            f"({dup} duplicate(s) of client message ids already stored)",
                            markup=False)
    return EXIT_OK


def commit(c: Ctx, ns: argparse.Namespace) -> int:
    reply = c.sessions.Commit(session_pb2.CommitRequest(
        session_id=ns.session_id, keep_recent_count=ns.keep_recent,
        reject_if_running=ns.reject_if_running, request_id=ns.request_id or ""),
        timeout=c.conn.timeout)
    if c.out.json:
        c.out.emit({"commit": to_dict(reply)})
    elif reply.archived:
        c.out.console.print(f"committed {reply.session_id}: {reply.archive_uri}, "
                            f"Phase 2 task {reply.task_id}", markup=False)
    else:
        c.out.console.print(f"nothing to commit in {reply.session_id}", markup=False)
    if ns.watch and reply.task_id:
        return watch(c, reply.task_id, ns.watch_timeout)
    return EXIT_OK


# --- the live Phase 2 view -------------------------------------------------------------------

@dataclass
class StageRow:
    stage: str
    status: str = "running"
    attempt: int = 0
    retries: int = 0
    reason: str = ""
    started: float = 0.0  # server time, seconds
    finished: float = 0.0


@dataclass
class Progress:
    """Phase 2 of one task as its events tell it: one row per stage."""

    task_id: str
    state: str = "pending"
    stage: str = ""
    attempt: int = 0  # the worker's attempt at the task (STARTED events)
    started: float = 0.0
    finished: float = 0.0
    error: str = ""
    rows: dict[str, StageRow] = field(default_factory=dict)

    def apply(self, ev: task_pb2.TaskEvent) -> None:
        t = ev.time.seconds + ev.time.nanos / 1e9
        self.state = _enum(task_pb2.TaskState.Name(ev.state), "TASK_STATE_")
        self.stage = ev.stage
        if not self.started:
            self.started = t
        kind = ev.kind
        if kind == task_pb2.TASK_EVENT_KIND_STARTED:
            self.attempt = ev.attempt or self.attempt
        elif kind == task_pb2.TASK_EVENT_KIND_STAGE_STARTED:
            row = self.rows.setdefault(ev.stage, StageRow(ev.stage, started=t))
            row.status, row.finished = "running", 0.0
            row.attempt = ev.attempt or self.attempt or row.attempt
        elif kind == task_pb2.TASK_EVENT_KIND_STAGE_COMPLETED:
            row = self.rows.setdefault(ev.stage, StageRow(ev.stage, started=t))
            row.status, row.finished = "done", t
        elif kind == task_pb2.TASK_EVENT_KIND_RETRYING:
            row = self.rows.setdefault(ev.stage, StageRow(ev.stage, started=t))
            row.retries += 1
            row.attempt = ev.attempt or row.attempt
            row.reason = ev.message.split(", after ", 1)[-1] if ", after " in ev.message \
                else ev.message
        elif kind in (task_pb2.TASK_EVENT_KIND_COMPLETED, task_pb2.TASK_EVENT_KIND_FAILED,
                      task_pb2.TASK_EVENT_KIND_CANCELLED):
            self.finished = t
            if ev.HasField("error"):
                self.error = _status_line(ev.error)
            for row in self.rows.values():
                if row.status == "running":
                    row.status = "failed" if kind == task_pb2.TASK_EVENT_KIND_FAILED \
                        else "cancelled" if kind == task_pb2.TASK_EVENT_KIND_CANCELLED \
                        else "done"
                    row.finished = t

    def render(self, now: float) -> Table:
        end = self.finished or now
        elapsed = f"{max(0.0, end - self.started):.1f}s" if self.started else "-"
        t = Table(title=f"task {self.task_id}  {self.state}  {elapsed}", title_justify="left")
        for col in ("stage", "status", "attempt", "retries", "last retry reason", "elapsed"):
            t.add_column(col, overflow="fold")
        for row in self.rows.values():
            stop = row.finished or end
            t.add_row(row.stage, row.status, str(row.attempt or ""), str(row.retries),
                      row.reason, f"{max(0.0, stop - row.started):.1f}s")
        if self.error:
            t.caption = self.error
        return t


def _status_line(st: Any) -> str:
    reason = ""
    for d in st.details:
        info = error_details_pb2.ErrorInfo()
        if d.Unpack(info):
            reason = info.reason
    code = next((c.name for c in grpc.StatusCode if c.value[0] == st.code), str(st.code))
    text = f"{code}{' ' + reason if reason else ''}: {st.message}"
    return text[:_MAX_ERROR_CHARS]


def _event_line(ev: task_pb2.TaskEvent) -> str:
    kind = _enum(task_pb2.TaskEventKind.Name(ev.kind), "TASK_EVENT_KIND_")
    parts = [_ts(ev.time), f"#{ev.seq}", kind]
    if ev.stage:
        parts.append(ev.stage)
    if ev.attempt:
        parts.append(f"attempt {ev.attempt}")
    if ev.message:
        parts.append(f"- {ev.message}")
    return " ".join(parts)


def _watch_items(c: Ctx, task_id: str, timeout: float | None, after_seq: int = 0
                 ) -> Iterator[task_pb2.TaskEvent | task_pb2.Task | task_pb2.Heartbeat]:
    yield from watch_task(c.channel, task_id, after_seq=after_seq, include_heartbeats=True,
                          include_snapshots=True, timeout=timeout)


def watch(c: Ctx, task_id: str, timeout: float | None, after_seq: int = 0) -> int:
    progress = Progress(task_id)
    last: task_pb2.TaskEvent | None = None
    try:
        if c.out.json:
            for item in _watch_items(c, task_id, timeout, after_seq):
                if isinstance(item, task_pb2.TaskEvent):
                    last = item
                    c.out.emit({"event": to_dict(item)})
        elif c.out.console.is_terminal:
            with Live(progress.render(time.time()), console=c.out.console,
                      refresh_per_second=8) as live:
                for item in _watch_items(c, task_id, timeout, after_seq):
                    if isinstance(item, task_pb2.TaskEvent):
                        last = item
                        progress.apply(item)
                    live.update(progress.render(time.time()))
        else:  # a pipe or a log: one line per event, then the summary table
            for item in _watch_items(c, task_id, timeout, after_seq):
                if isinstance(item, task_pb2.TaskEvent):
                    last = item
                    progress.apply(item)
                    c.out.console.print(_event_line(item), markup=False)
            c.out.console.print(progress.render(time.time()))
    except WatchTimeout:
        _error_line(c.out, "DEADLINE_EXCEEDED", "WATCH_TIMEOUT",
                    f"the task {task_id} did not end within --watch-timeout {timeout:g} s")
        return EXIT_UNAVAILABLE
    except WatchInterrupted as exc:
        _error_line(c.out, "UNAVAILABLE", "WATCH_INTERRUPTED",
                    f"the watch of {task_id} broke and could not resume: {exc}")
        return EXIT_UNAVAILABLE
    task = c.tasks.GetTask(task_pb2.GetTaskRequest(task_id=task_id), timeout=c.conn.timeout)
    if c.out.json:
        c.out.emit({"task": to_dict(task)})
    if last is not None and last.kind == task_pb2.TASK_EVENT_KIND_COMPLETED:
        return EXIT_OK
    return EXIT_TASK_FAILED if task.state in (task_pb2.TASK_STATE_FAILED,
                                              task_pb2.TASK_STATE_CANCELLED) else EXIT_OK


def _task_row(t: task_pb2.Task) -> list[str]:
    return [t.task_id, t.session_id, _enum(task_pb2.TaskState.Name(t.state), "TASK_STATE_"),
            t.stage, str(t.attempts), _ts(t.created_at), _ts(t.finished_at)]


def tasks_ls(c: Ctx, ns: argparse.Namespace) -> int:
    def fetch(token: str) -> tuple[list[Any], str]:
        r = c.tasks.ListTasks(task_pb2.ListTasksRequest(
            session_id=ns.session or "",
            state=_STATES[ns.state] if ns.state else task_pb2.TASK_STATE_UNSPECIFIED,
            page_size=100, page_token=token), timeout=c.conn.timeout)
        return list(r.tasks), r.next_page_token

    items: list[task_pb2.Task] = _pages(fetch, ns.limit)
    if c.out.json:
        c.out.emit({"tasks": [to_dict(t) for t in items]})
    else:
        c.out.table(f"{len(items)} task(s)",
                    ["task", "session", "state", "stage", "attempts", "created", "finished"],
                    [_task_row(t) for t in items])
    return EXIT_OK


def _show_task(c: Ctx, t: task_pb2.Task) -> None:
    if c.out.json:
        c.out.emit({"task": to_dict(t)})
        return
    pairs = [("task", t.task_id), ("type", t.task_type), ("session", t.session_id),
             ("archive", t.archive_uri),
             ("state", _enum(task_pb2.TaskState.Name(t.state), "TASK_STATE_")),
             ("stage", t.stage), ("attempts", str(t.attempts)),
             ("created", _ts(t.created_at)), ("started", _ts(t.started_at)),
             ("finished", _ts(t.finished_at)), ("events", str(t.last_seq))]
    if t.cancel_requested:
        pairs.append(("cancel requested", "yes"))
    if t.HasField("result"):
        r = t.result
        pairs.append(("memories", str(r.memories_extracted.total)))
        pairs.append(("tokens", str(r.token_usage.total_tokens)))
    if t.HasField("error"):
        pairs.append(("error", _status_line(t.error)))
    c.out.fields(pairs)


def tasks_show(c: Ctx, ns: argparse.Namespace) -> int:
    _show_task(c, c.tasks.GetTask(task_pb2.GetTaskRequest(task_id=ns.task_id),
                                  timeout=c.conn.timeout))
    return EXIT_OK


def tasks_watch(c: Ctx, ns: argparse.Namespace) -> int:
    return watch(c, ns.task_id, ns.watch_timeout, ns.after_seq)


def tasks_retry(c: Ctx, ns: argparse.Namespace) -> int:
    """RetryTask: a FAILED or CANCELLED task runs again from the stage it stopped at."""
    t = c.tasks.RetryTask(task_pb2.RetryTaskRequest(task_id=ns.task_id,
                                                    request_id=ns.request_id or ""),
                          timeout=c.conn.timeout)
    if not ns.watch:
        _show_task(c, t)
        return EXIT_OK
    if c.out.json:
        c.out.emit({"retry": to_dict(t)})
    else:
        c.out.console.print(f"retrying {t.task_id} (retry {t.retries}) from {t.stage}",
                            markup=False)
    # From the RETRIED event on: the journal's earlier terminal event is history.
    return watch(c, t.task_id, ns.watch_timeout, max(0, t.last_seq - 1))


def tasks_cancel(c: Ctx, ns: argparse.Namespace) -> int:
    _show_task(c, c.tasks.CancelTask(task_pb2.CancelTaskRequest(task_id=ns.task_id),
                                     timeout=c.conn.timeout))
    return EXIT_OK


def _memory_row(m: memory_pb2.Memory, score: float | None = None) -> list[str]:
    row = [m.memory_id, _enum(memory_pb2.MemoryCategory.Name(m.category), "MEMORY_CATEGORY_"),
           m.space, m.content, m.source_session_id]
    return [*row, f"{score:.3f}"] if score is not None else row


def _category(name: str | None) -> memory_pb2.MemoryCategory.ValueType:
    return _CATEGORIES[name] if name else memory_pb2.MEMORY_CATEGORY_UNSPECIFIED


def memories_ls(c: Ctx, ns: argparse.Namespace) -> int:
    def fetch(token: str) -> tuple[list[Any], str]:
        r = c.memories.ListMemories(memory_pb2.ListMemoriesRequest(
            category=_category(ns.category), page_size=100,
            page_token=token), timeout=c.conn.timeout)
        return list(r.memories), r.next_page_token

    items: list[memory_pb2.Memory] = _pages(fetch, ns.limit)
    if c.out.json:
        c.out.emit({"memories": [to_dict(m) for m in items]})
    else:
        c.out.table(f"{len(items)} memor{'y' if len(items) == 1 else 'ies'}",
                    ["memory", "category", "space", "content", "session"],
                    [_memory_row(m) for m in items])
    return EXIT_OK


def memories_search(c: Ctx, ns: argparse.Namespace) -> int:
    r = c.memories.SearchMemories(memory_pb2.SearchMemoriesRequest(
        query=ns.query, category=_category(ns.category),
        limit=ns.limit), timeout=c.conn.timeout)
    if c.out.json:
        c.out.emit(to_dict(r) or {"results": []})
    else:
        c.out.table(f"{len(r.results)} result(s)",
                    ["memory", "category", "space", "content", "session", "score"],
                    [_memory_row(s.memory, s.score) for s in r.results])
    return EXIT_OK


def memories_rm(c: Ctx, ns: argparse.Namespace) -> int:
    r = c.memories.DeleteMemory(memory_pb2.DeleteMemoryRequest(memory_id=ns.memory_id),
                                timeout=c.conn.timeout)
    if c.out.json:
        c.out.emit({"deleted": r.memory_id})
    else:
        c.out.console.print(f"deleted memory {r.memory_id}", markup=False)
    return EXIT_OK


def memories_history(c: Ctx, ns: argparse.Namespace) -> int:
    def fetch(token: str) -> tuple[list[Any], str]:
        r = c.memories.ListMemoryChanges(memory_pb2.ListMemoryChangesRequest(
            session_id=ns.session or "", archive_index=ns.archive, memory_id=ns.memory or "",
            page_size=100, page_token=token), timeout=c.conn.timeout)
        return list(r.changes), r.next_page_token

    items: list[memory_pb2.MemoryChange] = _pages(fetch, ns.limit)
    if c.out.json:
        c.out.emit({"changes": [to_dict(ch) for ch in items]})
    else:
        c.out.table(f"{len(items)} change(s)",
                    ["seq", "op", "memory", "category", "source", "before", "after"],
                    [[str(ch.seq), _enum(memory_pb2.MemoryChangeOp.Name(ch.op),
                                         "MEMORY_CHANGE_OP_"), ch.memory_id,
                      _enum(memory_pb2.MemoryCategory.Name(ch.category), "MEMORY_CATEGORY_"),
                      ch.archive_uri or "DeleteMemory",
                      ch.before.content if ch.HasField("before") else "-",
                      ch.after.content if ch.HasField("after") else "-"] for ch in items])
    return EXIT_OK


def recall(c: Ctx, ns: argparse.Namespace) -> int:
    r = c.memories.Recall(memory_pb2.RecallRequest(
        query=ns.query, session_id=ns.session or "", max_chars=ns.max_chars,
        max_items=ns.max_items, kinds=[_KINDS[k] for k in ns.kind or []]),
        timeout=c.conn.timeout)
    if c.out.json:
        c.out.emit(to_dict(r) or {"items": []})
    else:
        c.out.table(f"{len(r.items)} item(s)", ["kind", "score", "source", "text"],
                    [[_enum(memory_pb2.RecallKind.Name(i.kind), "RECALL_KIND_"),
                      f"{i.score:.3f}", i.archive_uri or i.session_id, i.text]
                     for i in r.items])
    return EXIT_OK


def info(c: Ctx, ns: argparse.Namespace) -> int:
    from sessiond.server.version import version

    r = server_pb2_grpc.ServerServiceStub(c.channel).GetServerInfo(
        server_pb2.GetServerInfoRequest(), timeout=c.conn.timeout)
    if c.out.json:
        c.out.emit({"client": {"version": version()}, "server": to_dict(r)})
    else:
        c.out.fields([("client", f"sessiond {version()}"), ("server", f"sessiond {r.version}"),
                      ("address", c.conn.address), ("api", r.api),
                      ("schema version", str(r.schema_version)), ("engine", r.engine),
                      ("store", r.store), ("process id", str(r.process_id))])
    return EXIT_OK


# --- parser ------------------------------------------------------------------------------

class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, except where there is none."""

    @staticmethod
    def _has_default(action: argparse.Action) -> bool:
        return bool(action.option_strings) and action.default not in (
            None, False, "", argparse.SUPPRESS)

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and self._has_default(action):
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if not self._has_default(action):
            return action.help
        return super()._get_help_string(action)


def _connection_flags() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection (flag > environment > config file > default)")
    g.add_argument("--address", help=f"server host:port [SESSIOND_ADDRESS] ({DEFAULT_ADDRESS})")
    g.add_argument("--api-key", help="API key [SESSIOND_API_KEY]; prefer --api-key-file")
    g.add_argument("--api-key-file", help="file holding the API key [SESSIOND_API_KEY_FILE]")
    g.add_argument("--token", help="JWT bearer token [SESSIOND_TOKEN]")
    g.add_argument("--token-file", help="file holding the token [SESSIOND_TOKEN_FILE]")
    g.add_argument("--tls", action="store_const", const=True, default=None,
                   help="TLS with the system roots [SESSIOND_TLS]")
    g.add_argument("--ca-file", help="PEM roots for TLS [SESSIOND_CA_FILE]")
    g.add_argument("--client-cert", help="PEM client certificate, mTLS [SESSIOND_CLIENT_CERT]")
    g.add_argument("--client-key", help="PEM client key, mTLS [SESSIOND_CLIENT_KEY]")
    g.add_argument("--account", help="identity account [SESSIOND_ACCOUNT] (default)")
    g.add_argument("--user", help="identity user [SESSIOND_USER] (default)")
    g.add_argument("--agent", help="identity agent [SESSIOND_AGENT] (default)")
    g.add_argument("--timeout", help="seconds per call [SESSIOND_TIMEOUT] (30)")
    g.add_argument("--config", help="TOML file of these settings [SESSIOND_CONFIG] "
                                    f"({DEFAULT_CONFIG})")
    g.add_argument("--output", "-o", choices=["text", "json"],
                   help="text (tables) or json [SESSIOND_OUTPUT] (text)")
    return p


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or more")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0")
    return value


def add_client_commands(sub: Any) -> None:
    """Register the client commands on the `sessiond` parser's subparsers."""
    conn = _connection_flags()

    def cmd(parent: Any, name: str, fn: Callable[[Ctx, argparse.Namespace], int],
            help_: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(
            name, parents=[conn], help=help_, description=help_,
            formatter_class=DefaultsFormatter)
        p.set_defaults(client_fn=fn)
        return p

    sessions = sub.add_parser("sessions",
                              help="list, show, delete sessions, revert an archive, usage")
    ssub = sessions.add_subparsers(dest="sessions_command", required=True)
    p = cmd(ssub, "ls", sessions_ls, "list sessions, newest first")
    p.add_argument("--limit", type=_positive, default=0, help="at most this many (0: all)")
    p = cmd(ssub, "show", sessions_show, "a session's metadata, overview and live messages")
    p.add_argument("session_id")
    p.add_argument("--messages", type=_positive, default=20,
                   help="the newest N live messages (0: all)")
    p = cmd(ssub, "rm", sessions_rm, "delete a session with its archives and tasks")
    p.add_argument("session_id")
    p = cmd(ssub, "revert", sessions_revert,
            "undo what one archive's Phase 2 did to long-term memory (a task)")
    p.add_argument("session_id")
    p.add_argument("index", type=int, help="the archive (1, 2, ...)")
    p.add_argument("--force", action="store_true",
                   help="revert even over later changes of the same memories")
    p.add_argument("--watch", action="store_true", help="follow the revert task live")
    p.add_argument("--watch-timeout", type=_seconds, default=None,
                   help="give up watching after this many seconds")
    p.add_argument("--request-id", help="idempotency key (a replay returns the first result)")
    p = cmd(ssub, "usage", sessions_usage, "the uris a session used, with active counts")
    p.add_argument("session_id")
    p.add_argument("--archive", type=_positive, default=0, help="only this archive's uris")

    messages = sub.add_parser("messages", help="append messages")
    msub = messages.add_subparsers(dest="messages_command", required=True)
    p = cmd(msub, "add", messages_add, "append a text message to a session, or a batch "
                                        "of messages from a JSONL file")
    p.add_argument("session_id")
    p.add_argument("text", nargs="?", help="the text, or - to read it from stdin")
    p.add_argument("--file", "-f", metavar="FILE",
                   help='JSONL, one message a line: {"role": "user", "text": "...", '
                        '"client_message_id": "..."} (or "parts" in proto JSON); - reads '
                        "stdin. Sent with AddMessages, 1000 a call; a client_message_id "
                        "already stored is not stored again")
    p.add_argument("--role", choices=sorted(_ROLES), default="user",
                   help="the role (of --file lines without one)")
    p.add_argument("--create", action="store_true", help="create the session if missing")
    p.add_argument("--request-id", help="idempotency key (a replay returns the first result)")

    p = cmd(sub, "commit", commit, "archive the live messages and start Phase 2")
    p.add_argument("session_id")
    p.add_argument("--watch", action="store_true",
                   help="follow Phase 2 live: stage, attempt, retries and their reason, "
                        "elapsed; exit 7 if it fails or is cancelled")
    p.add_argument("--watch-timeout", type=_seconds, default=None,
                   help="give up watching after this many seconds")
    p.add_argument("--keep-recent", type=_positive, default=0,
                   help="keep the newest N messages in the live buffer")
    p.add_argument("--reject-if-running", action="store_true",
                   help="fail (ABORTED) while an earlier Phase 2 of the session runs")
    p.add_argument("--request-id", help="idempotency key (a replay returns the first result)")

    tasks = sub.add_parser("tasks", help="list, show, watch, cancel or retry Phase 2 tasks")
    tsub = tasks.add_subparsers(dest="tasks_command", required=True)
    p = cmd(tsub, "ls", tasks_ls, "list tasks, newest first")
    p.add_argument("--session", help="only this session's tasks")
    p.add_argument("--state", choices=list(_STATES))
    p.add_argument("--limit", type=_positive, default=0, help="at most this many (0: all)")
    p = cmd(tsub, "show", tasks_show, "one task")
    p.add_argument("task_id")
    p = cmd(tsub, "watch", tasks_watch, "follow a task live until it ends")
    p.add_argument("task_id")
    p.add_argument("--watch-timeout", type=_seconds, default=None,
                   help="give up watching after this many seconds")
    p.add_argument("--after-seq", type=_positive, default=0,
                   help="only events after this seq (e.g. the RETRIED event of a retry)")
    p = cmd(tsub, "cancel", tasks_cancel, "ask a task to stop (at its next stage boundary)")
    p.add_argument("task_id")
    p = cmd(tsub, "retry", tasks_retry, "run a FAILED or CANCELLED task again from the "
                                        "stage it stopped at")
    p.add_argument("task_id")
    p.add_argument("--watch", action="store_true",
                   help="follow the retry live; exit 7 if it fails or is cancelled again")
    p.add_argument("--watch-timeout", type=_seconds, default=None,
                   help="give up watching after this many seconds")
    p.add_argument("--request-id", help="idempotency key (a replay returns the task)")

    memories = sub.add_parser("memories",
                              help="list, search or delete long-term memories, or their history")
    memsub = memories.add_subparsers(dest="memories_command", required=True)
    p = cmd(memsub, "ls", memories_ls, "list memories")
    p.add_argument("--category", choices=list(_CATEGORIES))
    p.add_argument("--limit", type=_positive, default=0, help="at most this many (0: all)")
    p = cmd(memsub, "search", memories_search, "search memories by text")
    p.add_argument("query")
    p.add_argument("--category", choices=list(_CATEGORIES))
    p.add_argument("--limit", type=_positive, default=10)
    p = cmd(memsub, "rm", memories_rm, "delete a memory")
    p.add_argument("memory_id")
    p = cmd(memsub, "history", memories_history,
            "memory changes, oldest first (Phase 2, deletes, reverts)")
    p.add_argument("--session", help="only this session's changes")
    p.add_argument("--archive", type=_positive, default=0, help="with --session: one archive")
    p.add_argument("--memory", help="only this memory's changes")
    p.add_argument("--limit", type=_positive, default=0, help="at most this many (0: all)")

    cmd(sub, "info", info, "the server's version, API, schema version, engine and store")

    p = cmd(sub, "recall", recall, "what the past holds about QUERY, within a budget")
    p.add_argument("query")
    p.add_argument("--session", help="rank this session first and add its overview")
    p.add_argument("--max-chars", type=_positive, default=0, help="text budget (0: 4000)")
    p.add_argument("--max-items", type=_positive, default=0, help="at most N items (0: 20)")
    p.add_argument("--kind", action="append", choices=list(_KINDS),
                   help="only these kinds (repeatable)")


# --- running -----------------------------------------------------------------------------

def _error_line(out: Out, code: str, reason: str, message: str) -> None:
    message = " ".join(message.split())[:_MAX_ERROR_CHARS]
    if out.json:
        print(json.dumps({"error": {"code": code, "reason": reason, "message": message}}),
              file=sys.stderr)
    else:
        print(f"sessiond: {code}{' ' + reason if reason else ''}: {message}", file=sys.stderr)


def _rpc_error(out: Out, err: grpc.RpcError) -> int:
    code: grpc.StatusCode = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
    message = err.details() if isinstance(err, grpc.Call) else str(err)
    reason = ""
    if isinstance(err, grpc.Call):
        try:
            st = rpc_status.from_call(err)
        except ValueError:
            st = None
        if st is not None:
            for d in st.details:
                info = error_details_pb2.ErrorInfo()
                if d.Unpack(info):
                    reason = info.reason
    _error_line(out, code.name, reason, message or "")
    return _EXIT_BY_CODE.get(code, EXIT_ERROR)


def run_client(ns: argparse.Namespace) -> int:
    """Run a parsed client command; returns the exit code."""
    out = Out(getattr(ns, "output", None) or os.environ.get("SESSIOND_OUTPUT", "text"))
    try:
        conn = resolve_connection(ns)
        out = Out(conn.output)
        channel = open_channel(conn)
    except UsageError as exc:
        _error_line(out, "USAGE", "", str(exc))
        return EXIT_USAGE
    try:
        fn: Callable[[Ctx, argparse.Namespace], int] = ns.client_fn
        return fn(Ctx(conn, channel, out), ns)
    except grpc.RpcError as err:
        return _rpc_error(out, err)
    except UsageError as exc:
        _error_line(out, "USAGE", "", str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    finally:
        channel.close()


__all__ = [
    "COMMANDS",
    "EXIT_AUTH",
    "EXIT_ERROR",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_REJECTED",
    "EXIT_TASK_FAILED",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "Connection",
    "Progress",
    "add_client_commands",
    "resolve_connection",
    "run_client",
]
