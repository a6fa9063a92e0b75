"""Idempotency keys (AIP-155): the stored response of a replayed request."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sessiond.server.domain.commands import RequestKey
from sessiond.server.domain.errors import RequestIdConflict
from sessiond.server.store import codec
from sessiond.server.store.sql.tx import Tx


async def replay(tx: Tx, request: RequestKey | None) -> Any | None:
    """The stored response of a replayed request, or None for a new one."""
    if request is None:
        return None
    ident = request.identity
    row = await tx.fetchrow(
        "SELECT fingerprint, response FROM request_ids WHERE account=? AND user_id=? "
        "AND agent=? AND method=? AND request_id=?",
        ident.account, ident.user, ident.agent, request.method, request.request_id)
    if row is None:
        return None
    if row["fingerprint"] != request.fingerprint:
        raise RequestIdConflict(
            f"request_id {request.request_id!r} was already used for a different "
            f"{request.method} request", metadata={"request_id": request.request_id})
    return json.loads(row["response"])


async def remember(tx: Tx, request: RequestKey | None, response: Any, now: datetime) -> None:
    if request is None:
        return
    ident = request.identity
    await tx.execute(
        "INSERT INTO request_ids (account, user_id, agent, method, request_id, fingerprint, "
        "response, created_at) VALUES (?,?,?,?,?,?,?,?)",
        ident.account, ident.user, ident.agent, request.method, request.request_id,
        request.fingerprint, codec.dumps(response), tx.d.ts(now))
