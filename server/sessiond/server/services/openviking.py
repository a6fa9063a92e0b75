"""Reading an OpenViking data tree (what `sessiond import-openviking` imports).

The layout (OpenViking keeps sessions and memories as files; the store root is
`/local/<account>/` under its AGFS data directory):

    <account>/session/<session_id>/                 (or session/<user>/<session_id>/,
        messages.jsonl       live messages, one JSON object a line    or user/<user>/sessions/<id>/)
        .meta.json           session metadata (created_by_user_id, participant_agent_ids,
                             created_at, updated_at, memories_extracted, llm_token_usage,
                             last_commit_at)
        history/archive_NNN/
            messages.jsonl   the archived messages
            .overview.md     the summary; .abstract.md its one-line abstract
            .done            Phase 2 finished ({"starting_message_id", "ending_message_id"})
            .failed.json     Phase 2 failed ({"stage", "error", "failed_at"})
    <account>/user/<user>/memories/profile.md and memories/<category>/*.md
    <account>/agent/<agent>/memories/<category>/*.md   (or agent/<agent>/user/<user>/...)

A message line is {"id", "role", "parts": [{"type": "text"|"context"|"tool", ...}],
"created_at"} (or the older {"content": "..."}). This module only reads and
validates; `services/importer.py` writes. Whatever cannot be imported is reported
as a `Skip` with the file, the line and why.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sessiond.server.domain import rules
from sessiond.server.domain.errors import ErrorCode, InvalidArgument
from sessiond.server.domain.imports import ImportedState
from sessiond.server.domain.limits import Limits
from sessiond.server.domain.values import (
    ContextPart,
    ContextType,
    Identity,
    MemoryCategory,
    MemoryCounts,
    Message,
    Part,
    Role,
    TaskError,
    TextPart,
    TokenUsage,
    ToolPart,
    ToolStatus,
)
from sessiond.server.redact import redact_text

SCOPES = ("session", "user", "agent")
ARCHIVE_RE = re.compile(r"archive_(\d+)")
MEMORY_FIELDS_RE = re.compile(r"\s*<!--\s*MEMORY_FIELDS\s*\n.*?\n-->\s*$", re.DOTALL)
AGENT_HASH_RE = re.compile(r"[0-9a-f]{12}")
# Directory names of OpenViking memory types that are our categories under another name.
CATEGORY_ALIASES = {"preference": "preferences", "entity": "entities", "event": "events",
                    "case": "cases", "pattern": "patterns", "tool": "tools", "skill": "skills"}
ERROR_CHARS = 300


@dataclass(frozen=True, slots=True)
class Skip:
    """Something not imported: where (a path, `:line` for a JSONL line) and why."""

    path: str
    reason: str
    detail: str = ""


@dataclass
class OvArchive:
    index: int
    path: str
    state: ImportedState
    messages: list[Message]
    overview: str = ""
    abstract: str = ""
    created_at: datetime | None = None
    completed_at: datetime | None = None
    error: TaskError | None = None


@dataclass
class OvSession:
    identity: Identity
    session_id: str
    path: str
    created_at: datetime
    updated_at: datetime
    memories_extracted: MemoryCounts = field(default_factory=MemoryCounts)
    llm_token_usage: TokenUsage = field(default_factory=TokenUsage)
    last_commit_at: datetime | None = None
    live: list[Message] = field(default_factory=list)
    archives: list[OvArchive] = field(default_factory=list)


@dataclass
class OvMemory:
    identity: Identity  # the owner's identity (its space decides the owner, values.memory_owner)
    category: MemoryCategory
    key: str
    content: str
    path: str
    modified: datetime


@dataclass
class OvTree:
    sessions: list[OvSession] = field(default_factory=list)
    memories: list[OvMemory] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class IdentityChoice:
    """`--account/--user/--agent`: None takes the identity from the tree."""

    account: str | None = None
    user: str | None = None
    agent: str | None = None


def parse_time(value: Any) -> datetime | None:
    """An ISO-8601 time (`Z` allowed) or epoch seconds/milliseconds; None if neither."""
    try:
        if isinstance(value, bool):
            return None
        if isinstance(value, int | float):
            secs = float(value) / (1000.0 if value > 1e11 else 1.0)
            return datetime.fromtimestamp(secs, UTC)
        if isinstance(value, str) and value.strip():
            t = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
            return t if t.tzinfo else t.replace(tzinfo=UTC)
    except (ValueError, OverflowError, OSError):
        return None
    return None


def _mtime(path: Path) -> datetime:
    return datetime.fromtimestamp(path.stat().st_mtime, UTC)


def _text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _json_file(path: Path, tree: OvTree, rel: str) -> dict[str, Any] | None:
    raw = _text(path)
    if raw is None:
        return None
    try:
        value = json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError as exc:
        tree.skipped.append(Skip(rel, "malformed_json", f"{exc.msg} at line {exc.lineno}"))
        return None
    if not isinstance(value, dict):
        tree.skipped.append(Skip(rel, "malformed_json", "not a JSON object"))
        return None
    return value


def _str(v: Any) -> str:
    if v is None:
        return ""
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)


def _int(v: Any) -> int:
    try:
        return max(0, int(v or 0))
    except (TypeError, ValueError):
        return 0


def _part(d: Any) -> Part:
    """One OpenViking part; ValueError when it is not one."""
    if not isinstance(d, dict):
        raise ValueError("a part is not a JSON object")
    kind = d.get("type", "text")
    if kind == "text":
        return TextPart(text=_str(d.get("text", "")))
    if kind == "context":
        try:
            ctype = ContextType(d.get("context_type") or "memory")
        except ValueError:
            ctype = ContextType.RESOURCE
        return ContextPart(uri=_str(d.get("uri", "")), context_type=ctype,
                           abstract=_str(d.get("abstract", "")))
    if kind == "tool":
        try:
            status = ToolStatus(d.get("tool_status") or "pending")
        except ValueError:
            status = ToolStatus.PENDING
        return ToolPart(tool_id=_str(d.get("tool_id", "")), tool_name=_str(d.get("tool_name")),
                        tool_uri=_str(d.get("tool_uri")), skill_uri=_str(d.get("skill_uri")),
                        input=_str(d.get("tool_input")), output=_str(d.get("tool_output")),
                        status=status, duration_ms=_int(d.get("duration_ms")),
                        prompt_tokens=_int(d.get("prompt_tokens")),
                        completion_tokens=_int(d.get("completion_tokens")))
    raise ValueError(f"unknown part type {str(kind)[:40]!r}")


def _violations(exc: InvalidArgument) -> str:
    return "; ".join(f"{v.field}: {v.description}" for v in exc.violations) or exc.message


def read_messages(path: Path, rel: str, tree: OvTree, limits: Limits,
                  default_time: datetime) -> list[Message]:
    """The valid messages of a messages.jsonl; every other line becomes a Skip."""
    raw = _text(path)
    if raw is None:
        tree.skipped.append(Skip(rel, "unreadable"))
        return []
    out: list[Message] = []
    seen: set[str] = set()
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{rel}:{lineno}"
        try:
            d = json.loads(line)
        except json.JSONDecodeError as exc:
            tree.skipped.append(Skip(where, "malformed_json", exc.msg))
            continue
        if not isinstance(d, dict):
            tree.skipped.append(Skip(where, "malformed_json", "not a JSON object"))
            continue
        try:
            role = Role(str(d.get("role")))
        except ValueError:
            tree.skipped.append(Skip(where, "unknown_role", str(d.get("role"))[:40]))
            continue
        raw_parts = d.get("parts")
        if raw_parts is None and d.get("content") is not None:
            raw_parts = [{"type": "text", "text": d.get("content")}]
        try:
            if not isinstance(raw_parts, list):
                raise ValueError("no parts")
            parts = tuple(_part(p) for p in raw_parts)
        except ValueError as exc:
            tree.skipped.append(Skip(where, "malformed_message", str(exc)))
            continue
        try:
            rules.check_parts(parts, limits)
        except InvalidArgument as exc:
            big = any("bytes" in v.description or "parts (got" in v.description
                      for v in exc.violations)
            tree.skipped.append(Skip(where, "oversize" if big else "invalid_message",
                                     _violations(exc)))
            continue
        cid = _str(d.get("id")).strip()
        try:
            rules.check_client_message_id(cid)
        except InvalidArgument:
            cid = ""
        if not cid:  # stable across runs: the same line gets the same id
            cid = "ov_" + hashlib.sha256(f"{rel}\n{line}".encode()).hexdigest()[:32]
        if cid in seen:
            tree.skipped.append(Skip(where, "duplicate_message_id", cid[:64]))
            continue
        seen.add(cid)
        created = parse_time(d.get("created_at")) or default_time
        out.append(Message(id=rules.new_message_id(), role=role, parts=parts,
                           created_at=created, client_message_id=cid))
    return out


def _archive(adir: Path, rel: str, index: int, tree: OvTree, limits: Limits) -> OvArchive | None:
    mfile = adir / "messages.jsonl"
    if not mfile.is_file():
        tree.skipped.append(Skip(rel, "no_messages", "history archive without messages.jsonl"))
        return None
    messages = read_messages(mfile, f"{rel}/messages.jsonl", tree, limits, _mtime(mfile))
    if not messages:
        tree.skipped.append(Skip(rel, "no_messages", "no importable message"))
        return None
    done, failed = adir / ".done", adir / ".failed.json"
    arch = OvArchive(index=index, path=rel, state=ImportedState.PENDING, messages=messages,
                     created_at=messages[0].created_at)
    if done.is_file():
        arch.state, arch.completed_at = ImportedState.DONE, _mtime(done)
        arch.overview = (_text(adir / ".overview.md") or "").strip()
        arch.abstract = (_text(adir / ".abstract.md") or "").strip()
    elif failed.is_file():
        info = _json_file(failed, tree, f"{rel}/.failed.json") or {}
        stage, error = _str(info.get("stage")) or "unknown", _str(info.get("error"))
        text = redact_text(f"OpenViking Phase 2 failed at {stage[:40]}: {error}")
        arch.state = ImportedState.FAILED
        arch.error = TaskError(ErrorCode.INTERNAL, text[:ERROR_CHARS],
                               reason="IMPORTED_FAILED")
        arch.completed_at = parse_time(info.get("failed_at")) or _mtime(failed)
    return arch


def _is_session_dir(p: Path) -> bool:
    return any((p / n).exists() for n in ("messages.jsonl", ".meta.json", "history"))


def _session(sdir: Path, rel: str, account: str, user: str | None, choice: IdentityChoice,
             tree: OvTree, limits: Limits) -> OvSession | None:
    sid = sdir.name
    try:
        rules.check_session_id(sid)
    except InvalidArgument as exc:
        tree.skipped.append(Skip(rel, "invalid_session_id", _violations(exc)))
        return None
    meta: dict[str, Any] = {}
    if (sdir / ".meta.json").is_file():
        meta = _json_file(sdir / ".meta.json", tree, f"{rel}/.meta.json") or {}
    agents = meta.get("participant_agent_ids")
    agent = agents[0] if isinstance(agents, list) and agents and isinstance(agents[0], str) \
        else "default"
    owner = Identity(choice.account or account,
                     choice.user or user or _str(meta.get("created_by_user_id")) or "default",
                     choice.agent or agent)
    dir_time = _mtime(sdir)
    s = OvSession(identity=owner, session_id=sid, path=rel,
                  created_at=parse_time(meta.get("created_at")) or dir_time,
                  updated_at=parse_time(meta.get("updated_at")) or dir_time,
                  last_commit_at=parse_time(meta.get("last_commit_at")))
    if isinstance(meta.get("memories_extracted"), dict):
        s.memories_extracted = MemoryCounts.from_dict(
            {k: _int(v) for k, v in meta["memories_extracted"].items()})
    if isinstance(meta.get("llm_token_usage"), dict):
        u = meta["llm_token_usage"]
        s.llm_token_usage = TokenUsage(_int(u.get("prompt_tokens")),
                                       _int(u.get("completion_tokens")))
    history = sdir / "history"
    if history.is_dir():
        for adir in sorted(history.iterdir()):
            m = ARCHIVE_RE.fullmatch(adir.name)
            if not adir.is_dir() or m is None or int(m.group(1)) < 1:
                continue
            arch = _archive(adir, f"{rel}/history/{adir.name}", int(m.group(1)), tree, limits)
            if arch is not None:
                s.archives.append(arch)
        s.archives.sort(key=lambda a: a.index)
    if (sdir / "messages.jsonl").is_file():
        s.live = read_messages(sdir / "messages.jsonl", f"{rel}/messages.jsonl", tree,
                               limits, _mtime(sdir / "messages.jsonl"))
    return s


def _dirs(p: Path) -> Iterator[Path]:
    if p.is_dir():
        yield from (c for c in sorted(p.iterdir()) if c.is_dir() and not c.name.startswith("."))


def _category(name: str) -> MemoryCategory | None:
    try:
        return MemoryCategory(CATEGORY_ALIASES.get(name, name))
    except ValueError:
        return None


def _memories(mdir: Path, rel: str, identity: Identity, tree: OvTree, limits: Limits) -> None:
    files: list[tuple[Path, str, MemoryCategory | None]] = []
    for f in sorted(mdir.iterdir()):
        if f.name.startswith("."):
            continue  # directory summaries (.abstract.md, .overview.md), not memories
        if f.is_file() and f.suffix == ".md":
            files.append((f, f.name, _category(f.stem)))
        elif f.is_dir():
            cat = _category(f.name)
            for g in sorted(f.rglob("*.md")):
                if not any(part.startswith(".") for part in g.relative_to(f).parts):
                    files.append((g, g.relative_to(mdir).as_posix(), cat))
    for f, key, cat in files:
        where = f"{rel}/{key}"
        if cat is None:
            tree.skipped.append(Skip(where, "unknown_category",
                                     f"{key.split('/')[0][:40]!r} is none of "
                                     f"{', '.join(c.value for c in MemoryCategory)}"))
            continue
        raw = _text(f)
        content = MEMORY_FIELDS_RE.sub("", raw or "").strip()
        if not content:
            tree.skipped.append(Skip(where, "empty_memory"))
            continue
        size = len(content.encode("utf-8", "replace"))
        if size > limits.message_bytes:
            tree.skipped.append(Skip(where, "oversize", f"{size} bytes; at most "
                                     f"{limits.message_bytes} (limit message_bytes)"))
            continue
        tree.memories.append(OvMemory(identity=identity, category=cat,
                                      key=f"openviking:{key}", content=content,
                                      path=where, modified=_mtime(f)))


def _agent_space(name: str, known: dict[str, tuple[str, str]]) -> tuple[str | None, str]:
    """(user or None, agent) of an agent space name: OpenViking's hashed spaces are
    md5("user:agent")[:12]; they are resolved against the sessions' identities."""
    if AGENT_HASH_RE.fullmatch(name) and name in known:
        user, agent = known[name]
        return user, agent
    return None, name


def accounts(root: Path, choice: IdentityChoice) -> list[tuple[str, Path]]:
    """The account roots of the tree: `root` itself when it holds session/, user/ or
    agent/ (account `--account` or "default"), else each such child of `root` (or of
    `root/local`, an AGFS data directory), named by its directory."""
    if any((root / s).is_dir() for s in SCOPES):
        return [(choice.account or "default", root)]
    base = root / "local" if (root / "local").is_dir() else root
    return [(choice.account or c.name, c) for c in _dirs(base)
            if any((c / s).is_dir() for s in SCOPES)]


def read_tree(root: Path, limits: Limits, choice: IdentityChoice = IdentityChoice()) -> OvTree:
    """Everything importable under `root`, and what is not (with why)."""
    tree = OvTree()
    found = accounts(root, choice)
    if not found:
        tree.skipped.append(Skip(".", "not_openviking",
                                 "no session/, user/ or agent/ directory found"))
    for account, aroot in found:
        arel = aroot.relative_to(root).as_posix()
        prefix = "" if arel == "." else f"{arel}/"
        session_dirs: list[tuple[Path, str | None]] = []
        for c in _dirs(aroot / "session"):
            if _is_session_dir(c):
                session_dirs.append((c, None))
            else:  # session/<user_space>/<session_id>/
                session_dirs.extend((s, c.name) for s in _dirs(c) if _is_session_dir(s))
        for u in _dirs(aroot / "user"):
            session_dirs.extend((s, u.name) for s in _dirs(u / "sessions"))
        for sdir, user in session_dirs:
            s = _session(sdir, prefix + sdir.relative_to(aroot).as_posix(), account, user,
                         choice, tree, limits)
            if s is not None:
                tree.sessions.append(s)
        known = {hashlib.md5(f"{s.identity.user}:{s.identity.agent}".encode(),
                             usedforsecurity=False).hexdigest()[:12]:
                 (s.identity.user, s.identity.agent) for s in tree.sessions}
        for u in _dirs(aroot / "user"):
            ident = Identity(account, choice.user or u.name, choice.agent or "default")
            spaces = [(u / "memories", ident)]
            spaces += [(a / "memories", Identity(account, ident.user, choice.agent or a.name))
                       for a in _dirs(u / "agent")]
            for mdir, who in spaces:
                if mdir.is_dir():
                    _memories(mdir, prefix + mdir.relative_to(aroot).as_posix(), who,
                              tree, limits)
        for a in _dirs(aroot / "agent"):
            user, agent = _agent_space(a.name, known)
            spaces = [(a / "memories", Identity(account, choice.user or user or "default",
                                                choice.agent or agent))]
            spaces += [(x / "memories", Identity(account, choice.user or x.name,
                                                 choice.agent or agent))
                       for x in _dirs(a / "user")]
            for mdir, who in spaces:
                if mdir.is_dir():
                    _memories(mdir, prefix + mdir.relative_to(aroot).as_posix(), who,
                              tree, limits)
    return tree
