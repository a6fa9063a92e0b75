"""One exception hierarchy for the domain; the API layer maps it to gRPC codes once."""

from __future__ import annotations

import enum
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FieldViolation:
    field: str
    description: str


class SessiondError(Exception):
    """Base of every error the domain raises on purpose.

    `reason` is a stable UPPER_SNAKE identifier (AIP-193 ErrorInfo.reason).
    """

    reason: str = "INTERNAL"

    def __init__(self, message: str, *, reason: str | None = None,
                 metadata: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})


class NotFound(SessiondError):
    reason = "NOT_FOUND"


class AlreadyExists(SessiondError):
    reason = "ALREADY_EXISTS"


class InvalidArgument(SessiondError):
    reason = "INVALID_ARGUMENT"

    def __init__(self, message: str, *, violations: list[FieldViolation] | None = None,
                 reason: str | None = None) -> None:
        super().__init__(message, reason=reason)
        self.violations: list[FieldViolation] = list(violations or [])


class QuotaExceeded(SessiondError):
    """A quota of `Limits` is used up (RESOURCE_EXHAUSTED with a QuotaFailure naming
    `subject` and the limit). Reasons: LIVE_MESSAGES_QUOTA, LIVE_BYTES_QUOTA,
    USAGE_QUOTA, SESSIONS_QUOTA, WATCH_STREAMS_QUOTA."""

    reason = "QUOTA_EXCEEDED"

    def __init__(self, message: str, *, subject: str, limit: str, reason: str | None = None,
                 metadata: dict[str, str] | None = None) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.subject = subject
        self.limit = limit


class FailedPrecondition(SessiondError):
    reason = "FAILED_PRECONDITION"


class RevertConflict(FailedPrecondition):
    """A revert would undo later changes: FAILED_PRECONDITION with a
    PreconditionFailure listing them (`conflicts`: (change id, what), at most
    a bounded number; `more` counts the rest)."""

    reason = "REVERT_CONFLICT"

    def __init__(self, message: str, *, conflicts: list[tuple[str, str]], more: int = 0,
                 metadata: dict[str, str] | None = None) -> None:
        super().__init__(message, metadata=metadata)
        self.conflicts = list(conflicts)
        self.more = more


class Aborted(SessiondError):
    reason = "ABORTED"


class OutOfRange(SessiondError):
    reason = "OUT_OF_RANGE"


class Unavailable(SessiondError):
    """The store or another dependency cannot be reached right now; retry later."""

    reason = "UNAVAILABLE"


class RequestIdConflict(SessiondError):
    """A request_id was reused with a different request (AIP-155)."""

    reason = "REQUEST_ID_REUSED"


class LeaseLost(SessiondError):
    """The worker no longer owns the task it tried to write for."""

    reason = "LEASE_LOST"


class Phase2Error(SessiondError):
    """A Phase 2 stage failed; the message is already safe to show a user."""

    reason = "PHASE2_FAILED"


class Unauthenticated(SessiondError):
    """The call carries no valid credential (missing, malformed, expired, revoked).

    Reasons: CREDENTIALS_MISSING, CREDENTIALS_INVALID, CREDENTIALS_EXPIRED,
    CREDENTIALS_REVOKED, TOKEN_NOT_YET_VALID, TOKEN_WRONG_AUDIENCE, TOKEN_WRONG_ISSUER,
    CLIENT_CERT_NO_IDENTITY, CLIENT_CERT_MISMATCH."""

    reason = "CREDENTIALS_INVALID"


class PermissionDenied(SessiondError):
    """The caller is known but its credential does not allow this call.

    Reasons: SCOPE_MISSING (metadata `required_scope`), IDENTITY_NOT_ALLOWED."""

    reason = "PERMISSION_DENIED"


class ResourceExhausted(SessiondError):
    """A quota or rate limit refused the call; `retry_after` seconds until a retry can
    succeed, `subject` the caller the quota is counted for (never a secret)."""

    reason = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, *, retry_after: float, subject: str,
                 description: str, reason: str | None = None,
                 metadata: dict[str, str] | None = None) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.retry_after = retry_after
        self.subject = subject
        self.description = description


class ErrorCode(enum.StrEnum):
    """The kind of failure a task ended with (the names of google.rpc.Code; the API
    layer turns them into numbers). The one list of codes a task error may carry."""

    CANCELLED = "CANCELLED"
    NOT_FOUND = "NOT_FOUND"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"
