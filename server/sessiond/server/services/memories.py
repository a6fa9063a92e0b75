"""The domain operations behind MemoryService."""

from __future__ import annotations

from sessiond.server.domain import rules
from sessiond.server.domain.errors import FieldViolation, InvalidArgument, NotFound
from sessiond.server.domain.limits import DEFAULT_LIMITS, Limits, clip_echo
from sessiond.server.domain.pages import Page
from sessiond.server.domain.values import Identity, Memory, MemoryCategory
from sessiond.server.store.base import Store


class MemoryManager:
    def __init__(self, store: Store, limits: Limits = DEFAULT_LIMITS) -> None:
        self.store = store
        self.limits = limits

    def _not_found(self, memory_id: str) -> NotFound:
        return NotFound(f"memory {clip_echo(memory_id)!r} not found",
                        reason="MEMORY_NOT_FOUND")

    async def list_memories(self, identity: Identity, category: MemoryCategory | None,
                            page_size: int, page_token: str) -> Page[Memory]:
        return await self.store.list_memories(identity, category,
                                              rules.page_size(page_size, self.limits),
                                              page_token)

    async def get(self, identity: Identity, memory_id: str) -> Memory:
        mem = await self.store.get_memory(identity, memory_id) if memory_id else None
        if mem is None:
            raise self._not_found(memory_id)
        return mem

    async def search(self, identity: Identity, query: str, category: MemoryCategory | None,
                     limit: int) -> list[tuple[Memory, float]]:
        if not query.strip():
            raise InvalidArgument("query must not be empty", violations=[
                FieldViolation("query", "give at least one word")])
        if len(query) > self.limits.query_chars:
            raise InvalidArgument("query is too long", violations=[
                FieldViolation("query", f"at most {self.limits.query_chars} characters")])
        return await self.store.search_memories(identity, query, category,
                                                min(rules.page_size(limit, self.limits), 100))

    async def delete(self, identity: Identity, memory_id: str) -> None:
        if not memory_id or not await self.store.delete_memory(identity, memory_id):
            raise self._not_found(memory_id)
