"""The domain operations behind SessionService (Phase 1, the commit itself, is in
`services/commit.py`). No gRPC here: the
API layer converts protobuf to these calls and domain errors to status codes."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sessiond.server.domain import rules
from sessiond.server.domain.autocommit import AutoCommitPolicy
from sessiond.server.domain.commands import AddedMessage, NewMessage, RequestKey
from sessiond.server.domain.errors import FieldViolation, InvalidArgument, NotFound
from sessiond.server.domain.limits import DEFAULT_LIMITS, Limits
from sessiond.server.domain.pages import Page, index_cursor
from sessiond.server.domain.recall import clip
from sessiond.server.domain.values import (
    Archive,
    Identity,
    Message,
    Part,
    Role,
    SessionMeta,
    SkillUse,
    ToolStatus,
    UsageRecord,
)
from sessiond.server.store.base import Store


@dataclass(frozen=True, slots=True)
class SessionContextView:
    session_id: str
    latest_archive_overview: str
    latest_archive_uri: str
    current_messages: list[Message]


def request_key(identity: Identity, method: str, request_id: str,
                 fingerprint: bytes, limits: Limits = DEFAULT_LIMITS) -> RequestKey | None:
    if not request_id:
        return None
    rules.check_request_id(request_id, limits)
    return RequestKey(identity, method, request_id, RequestKey.fingerprint_of(fingerprint))


def _not_found(session_id: str) -> NotFound:
    return NotFound(f"session {session_id!r} not found", reason="SESSION_NOT_FOUND",
                    metadata={"session_id": session_id})


class SessionManager:
    def __init__(self, store: Store, limits: Limits = DEFAULT_LIMITS) -> None:
        self.store = store
        self.limits = limits

    def _effective(self, meta: SessionMeta) -> SessionMeta:
        """`meta` with the auto-commit policy in force (the server's when it has none)."""
        if meta.auto_commit is not None:
            return meta
        return dataclasses.replace(meta, auto_commit=self.store.auto_commit_default,
                                   auto_commit_inherited=True)

    async def update_config(self, identity: Identity, session_id: str,
                            policy: AutoCommitPolicy | None) -> SessionMeta:
        """Set the session's own auto-commit policy, or (None) go back to the server's."""
        rules.check_session_id(session_id)
        if policy is not None:
            policy.validate()
        return self._effective(await self.store.update_session_config(
            identity, session_id, policy, rules.utcnow()))

    async def create(self, identity: Identity, session_id: str, request_id: str = "",
                     fingerprint: bytes = b"") -> SessionMeta:
        if session_id:
            rules.check_session_id(session_id)
        req = request_key(identity, "CreateSession", request_id, fingerprint, self.limits)
        if not session_id:
            session_id = rules.new_session_id()
            if req is not None:
                # Server-chosen id: derive it from the request id so a replay that
                # races the first call cannot create a second session.
                seed = "\x1f".join((identity.account, identity.user, identity.agent, request_id))
                session_id = f"ses_{RequestKey.fingerprint_of(seed.encode())[:32]}"
        return self._effective(await self.store.create_session(identity, session_id,
                                                               rules.utcnow(), req))

    async def get(self, identity: Identity, session_id: str, auto_create: bool = False
                  ) -> SessionMeta:
        rules.check_session_id(session_id)
        if auto_create:
            return self._effective(await self.store.ensure_session(identity, session_id,
                                                                   rules.utcnow()))
        meta = await self.store.get_session(identity, session_id)
        if meta is None:
            raise _not_found(session_id)
        return self._effective(meta)

    async def list_sessions(self, identity: Identity, page_size: int,
                            page_token: str) -> Page[SessionMeta]:
        page = await self.store.list_sessions(identity, rules.page_size(page_size, self.limits),
                                              page_token)
        return Page([self._effective(m) for m in page.items], page.next_token)

    async def delete(self, identity: Identity, session_id: str) -> None:
        rules.check_session_id(session_id)
        if not await self.store.delete_session(identity, session_id, rules.utcnow()):
            raise _not_found(session_id)

    async def add_message(self, identity: Identity, session_id: str, role: Role,
                          parts: Sequence[Part], request_id: str = "",
                          fingerprint: bytes = b"", client_message_id: str = "",
                          created_at: datetime | None = None) -> AddedMessage:
        rules.check_session_id(session_id)
        rules.check_parts(parts, self.limits)
        rules.check_client_message_id(client_message_id)
        now = rules.utcnow()
        rules.check_created_at(created_at, now)
        req = request_key(identity, "AddMessage", request_id, fingerprint, self.limits)
        msg = Message(id=rules.new_message_id(), role=role, parts=tuple(parts),
                      created_at=created_at or now, client_message_id=client_message_id)
        if client_message_id:
            return (await self.store.add_messages(identity, session_id, [msg], req, now))[0]
        return AddedMessage(await self.store.add_message(identity, session_id, msg, req, now))

    async def add_messages(self, identity: Identity, session_id: str,
                           batch: Sequence[NewMessage], request_id: str = "",
                           fingerprint: bytes = b"") -> list[AddedMessage]:
        """All or nothing; an invalid message is INVALID_ARGUMENT naming its index."""
        rules.check_session_id(session_id)
        if not batch:
            raise InvalidArgument("messages must not be empty", violations=[
                FieldViolation("messages", "give at least one message")])
        if len(batch) > rules.MAX_BATCH_MESSAGES:
            raise InvalidArgument("too many messages", violations=[
                FieldViolation("messages", f"at most {rules.MAX_BATCH_MESSAGES} per call")])
        now = rules.utcnow()
        previous: datetime | None = None
        for i, m in enumerate(batch):
            try:
                rules.check_parts(m.parts, self.limits)
                rules.check_client_message_id(m.client_message_id)
                rules.check_created_at(m.created_at, now, previous)
            except InvalidArgument as exc:
                raise rules.at_index(f"messages[{i}]", exc) from None
            previous = m.created_at or now
        req = request_key(identity, "AddMessages", request_id, fingerprint, self.limits)
        msgs = [Message(id=rules.new_message_id(), role=m.role, parts=tuple(m.parts),
                        created_at=m.created_at or now, client_message_id=m.client_message_id)
                for m in batch]
        return await self.store.add_messages(identity, session_id, msgs, req, now)

    async def update_tool_part(self, identity: Identity, session_id: str, message_id: str,
                               tool_id: str, output: str, status: ToolStatus) -> Message:
        rules.check_session_id(session_id)
        violations = []
        if not message_id:
            violations.append(FieldViolation("message_id", "must not be empty"))
        if not tool_id:
            violations.append(FieldViolation("tool_id", "must not be empty"))
        if violations:
            raise InvalidArgument("message_id and tool_id are required", violations=violations)
        if len(output) > self.limits.message_bytes:  # cheap bound before the exact one
            raise InvalidArgument("output is too large", violations=[
                rules.size_violation(len(output), self.limits, "output")])
        return await self.store.update_tool_part(identity, session_id, message_id, tool_id,
                                                 output, status, rules.utcnow(),
                                                 self.limits.message_bytes)

    async def record_usage(self, identity: Identity, session_id: str,
                           context_uris: Sequence[str], skill: SkillUse | None,
                           request_id: str = "", fingerprint: bytes = b"") -> int:
        rules.check_session_id(session_id)
        uris = list(context_uris)
        rules.check_usage(uris, skill, self.limits)
        if not uris and skill is None:
            raise InvalidArgument("nothing to record", violations=[
                FieldViolation("context_uris", "give at least one context uri or a skill")])
        req = request_key(identity, "RecordUsage", request_id, fingerprint, self.limits)
        rec = UsageRecord(context_uris=tuple(uris), skill=skill, created_at=rules.utcnow())
        return await self.store.record_usage(identity, session_id, rec, req)

    async def context(self, identity: Identity, session_id: str, max_messages: int,
                      max_chars: int = 0) -> SessionContextView:
        rules.check_session_id(session_id)
        if max_messages < 0:
            raise InvalidArgument("max_messages must not be negative", violations=[
                FieldViolation("max_messages", "must be >= 0")])
        if max_chars < 0:
            raise InvalidArgument("max_chars must not be negative", violations=[
                FieldViolation("max_chars", "must be >= 0 (0: no budget)")])
        messages = await self.store.list_live_messages(identity, session_id, max_messages)
        latest = await self.store.latest_done_archive(identity, session_id)
        overview = latest.overview if latest else ""
        if max_chars:
            overview = clip(overview, max_chars // 2 if messages else max_chars)
            left, kept = max_chars - len(overview), []
            for m in reversed(messages):  # the newest that fit whole
                size = len(m.text())
                if size > left:
                    break
                left -= size
                kept.append(m)
            messages = kept[::-1]
        messages = self._newest_that_fit(messages)
        return SessionContextView(
            session_id=session_id,
            latest_archive_overview=overview,
            latest_archive_uri=latest.uri if latest else "",
            current_messages=messages)

    def _newest_that_fit(self, messages: list[Message]) -> list[Message]:
        """The newest messages whose reply size stays within archive_page_bytes (at
        least one): a context reply never exceeds the gRPC message size."""
        used, start = 0, len(messages)
        for m in reversed(messages):
            size = rules.wire_bytes(m.parts)
            if start < len(messages) and used + size > self.limits.archive_page_bytes:
                break
            used, start = used + size, start - 1
        return messages[start:]

    async def list_archives(self, identity: Identity, session_id: str, page_size: int,
                            page_token: str) -> Page[Archive]:
        rules.check_session_id(session_id)
        return await self.store.list_archives(identity, session_id,
                                              rules.page_size(page_size, self.limits),
                                              page_token)

    async def get_archive(self, identity: Identity, session_id: str, index: int,
                          page_size: int = 0, page_token: str = ""
                          ) -> tuple[Archive, list[Message], str]:
        """The archive, one page of its messages and the token of the next page ("" on
        the last): at most `page_size` messages (0: any number) and never more than
        `Limits.archive_page_bytes` of them, but always at least one."""
        rules.check_session_id(session_id)
        if index <= 0:
            raise InvalidArgument("index must be >= 1", violations=[
                FieldViolation("index", "archives are numbered from 1")])
        if page_size < 0:
            raise InvalidArgument("page_size must not be negative", violations=[
                FieldViolation("page_size", "must be >= 0 (0: as many as fit)")])
        after_seq = index_cursor(page_token)
        arch = await self.store.get_archive(identity, session_id, index)
        if arch is None:
            if await self.store.get_session(identity, session_id) is None:
                raise _not_found(session_id)
            raise NotFound(f"archive {index} of session {session_id!r} not found",
                           reason="ARCHIVE_NOT_FOUND")
        budget = self.limits.archive_page_bytes
        limit = min(page_size, self.limits.max_page_size) if page_size else 0
        messages, more = await self.store.archive_message_page(
            identity, session_id, index, after_seq, limit, budget)
        # The store bounds characters; the reply is bounded in bytes (UTF-8 may be 4
        # per character): keep what fits, the rest comes with the next page.
        kept, used = 0, 0
        for m in messages:
            size = rules.wire_bytes(m.parts)
            if kept and used + size > budget:
                break
            kept, used = kept + 1, used + size
        more = more or kept < len(messages)
        messages = messages[:kept]
        token = str(messages[-1].seq) if more and messages else ""
        return arch, messages, token
