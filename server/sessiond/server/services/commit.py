"""Phase 1 of a commit: in the RPC, one store transaction moves the live messages into
a new numbered archive and creates the durable Phase 2 task (see phase2/ for the rest).
"""

from __future__ import annotations

from sessiond.server import failpoints
from sessiond.server.domain import rules
from sessiond.server.domain.commands import CommitOutcome, CommitPlan
from sessiond.server.domain.errors import FieldViolation, InvalidArgument
from sessiond.server.domain.limits import DEFAULT_LIMITS, Limits
from sessiond.server.domain.values import Identity
from sessiond.server.observability import tracing
from sessiond.server.services.sessions import request_key
from sessiond.server.store.base import Store


class CommitService:
    def __init__(self, store: Store, limits: Limits = DEFAULT_LIMITS) -> None:
        self.store = store
        self.limits = limits

    async def commit(self, identity: Identity, session_id: str, keep_recent_count: int,
                     reject_if_running: bool, request_id: str = "",
                     fingerprint: bytes = b"") -> CommitOutcome:
        rules.check_session_id(session_id)
        if keep_recent_count < 0:
            raise InvalidArgument("keep_recent_count must not be negative", violations=[
                FieldViolation("keep_recent_count", "must be >= 0")])
        req = request_key(identity, "Commit", request_id, fingerprint, self.limits)
        plan = CommitPlan(identity=identity, session_id=session_id,
                          keep_recent_count=keep_recent_count,
                          reject_if_running=reject_if_running, task_id=rules.new_task_id(),
                          now=rules.utcnow(), trace_context=tracing.carrier())
        failpoints.hit("commit.before_write")
        outcome = await self.store.commit(plan, req)
        failpoints.hit("commit.after_write")
        return outcome
