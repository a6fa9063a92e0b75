"""The domain operations behind ListMemoryChanges, RevertArchive and GetSessionUsage."""

from __future__ import annotations

from dataclasses import dataclass

from sessiond.server.domain import rules
from sessiond.server.domain.errors import FieldViolation, InvalidArgument, NotFound
from sessiond.server.domain.history import MemoryChange
from sessiond.server.domain.limits import DEFAULT_LIMITS, Limits, clip_echo
from sessiond.server.domain.pages import Page
from sessiond.server.domain.values import Identity, Task
from sessiond.server.phase2.pipeline import used_uris
from sessiond.server.services.sessions import request_key
from sessiond.server.store.base import Store

MEMORY_ID_CHARS = 128


@dataclass(frozen=True, slots=True)
class UriUse:
    uri: str
    active_count: int


@dataclass(frozen=True, slots=True)
class SessionUsageView:
    session_id: str
    archive_index: int
    uris: list[UriUse]
    next_token: str = ""


# Archive indexes are stored as 32-bit integers.
MAX_INDEX = 2**31 - 1


def _index(value: int, field: str, minimum: int) -> None:
    if value > MAX_INDEX:
        raise InvalidArgument(f"{field} is out of range", violations=[
            FieldViolation(field, f"at most {MAX_INDEX}")])
    if value < minimum:
        raise InvalidArgument(f"{field} must be >= {minimum}", violations=[
            FieldViolation(field, "archives are numbered from 1"
                           + (" (0: not one archive)" if minimum == 0 else ""))])


class HistoryService:
    def __init__(self, store: Store, limits: Limits = DEFAULT_LIMITS) -> None:
        self.store = store
        self.limits = limits

    async def list_changes(self, identity: Identity, session_id: str, archive_index: int,
                           memory_id: str, page_size: int,
                           page_token: str) -> Page[MemoryChange]:
        if session_id:
            rules.check_session_id(session_id)
        _index(archive_index, "archive_index", 0)
        if archive_index and not session_id:
            raise InvalidArgument("archive_index needs session_id", violations=[
                FieldViolation("session_id", "name the session of archive_index")])
        if len(memory_id) > MEMORY_ID_CHARS:
            raise InvalidArgument("memory_id is too long", violations=[
                FieldViolation("memory_id", f"at most {MEMORY_ID_CHARS} characters")])
        return await self.store.list_memory_changes(
            identity, session_id, archive_index, memory_id,
            rules.page_size(page_size, self.limits), page_token)

    async def revert(self, identity: Identity, session_id: str, index: int, force: bool,
                     request_id: str = "", fingerprint: bytes = b"") -> Task:
        """Queue the revert of an archive (conflicts checked now; the task re-checks
        them under the memories' locks before it writes)."""
        rules.check_session_id(session_id)
        _index(index, "index", 1)
        req = request_key(identity, "RevertArchive", request_id, fingerprint, self.limits)
        return await self.store.request_revert(identity, session_id, index, force,
                                               rules.new_task_id(), rules.utcnow(), req)

    async def usage(self, identity: Identity, session_id: str, archive_index: int,
                    page_size: int, page_token: str) -> SessionUsageView:
        """The uris a session (or one of its archives) used, by uri, with their active
        counts. A session's: the relations its completed relations stages recorded; an
        archive's: what its messages and recorded usage name (what its relations and
        active_counts stages write)."""
        rules.check_session_id(session_id)
        _index(archive_index, "archive_index", 0)
        size = rules.page_size(page_size, self.limits)
        if await self.store.get_session(identity, session_id) is None:
            raise NotFound(f"session {clip_echo(session_id)!r} not found",
                           reason="SESSION_NOT_FOUND", metadata={"session_id": session_id})
        if archive_index:
            if await self.store.get_archive(identity, session_id, archive_index) is None:
                raise NotFound(f"archive {archive_index} of session {session_id!r} not found",
                               reason="ARCHIVE_NOT_FOUND")
            uris = sorted(used_uris(
                await self.store.archive_messages(identity, session_id, archive_index),
                await self.store.archive_usage(identity, session_id, archive_index)))
            uris = [u for u in uris if u > page_token][:size + 1]
            counts = await self.store.active_counts(uris)
            pairs = [(u, counts.get(u, 0)) for u in uris]
        else:
            pairs = await self.store.session_uris(identity, session_id, page_token, size + 1)
        shown = pairs[:size]
        token = shown[-1][0] if len(pairs) > size and shown else ""
        return SessionUsageView(session_id, archive_index,
                                [UriUse(u, n) for u, n in shown], token)
