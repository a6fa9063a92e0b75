"""Every size and quota the server enforces, in one place.

`Limits` is configuration (serve flags and `SESSIOND_LIMIT_*` environment variables,
see docs/api.md); the services receive one instance and pass it to the checks in
`domain/rules.py`. Malformed sizes (a message too large, too many parts, a request
id too long) are INVALID_ARGUMENT; quotas (live messages or bytes of a session,
sessions of an identity, open watch streams) are RESOURCE_EXHAUSTED with a
`google.rpc.QuotaFailure` naming the limit.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from sessiond.server.domain.errors import QuotaExceeded

MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Limits:
    # A message: the UTF-8 bytes of every string field of every part (text, uris,
    # abstracts, tool ids, names, uris, input, output), and the number of parts.
    message_bytes: int = 4 * MiB
    message_parts: int = 256
    # Quotas of one session's live buffer (what the next commit archives).
    live_messages_per_session: int = 10_000
    live_bytes_per_session: int = 256 * MiB
    # RecordUsage records waiting for a session's next commit.
    usage_records_per_session: int = 10_000
    # Sessions one identity (account, user, agent) may hold.
    sessions_per_identity: int = 100_000
    # AIP-155 request ids.
    request_id_chars: int = 128
    # List RPCs: page_size 0 means the default; larger sizes are clipped to the max.
    default_page_size: int = 100
    max_page_size: int = 1000
    # WatchTask streams one identity may hold open on one server process.
    watch_streams_per_identity: int = 64
    # Recall and SearchMemories queries.
    query_chars: int = 4096
    # GetArchive: the messages of one reply stay under this many bytes (the rest
    # follow with next_page_token); the gRPC maximum message size is 16 MiB.
    archive_page_bytes: int = 8 * MiB

    def validate(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"limit {f.name} must be a positive integer, not {value!r}")
        if self.default_page_size > self.max_page_size:
            raise ValueError("limit default_page_size must not exceed max_page_size")
        if self.archive_page_bytes > 15 * MiB:
            raise ValueError("limit archive_page_bytes must stay under the 16 MiB reply size")
        if self.message_bytes > self.live_bytes_per_session:
            raise ValueError("limit message_bytes must not exceed live_bytes_per_session")
        if self.message_bytes > self.archive_page_bytes:
            raise ValueError("limit message_bytes must not exceed archive_page_bytes "
                             "(every archived message must fit in one GetArchive reply)")


DEFAULT_LIMITS = Limits()


def live_messages_exceeded(session_id: str, limits: Limits) -> QuotaExceeded:
    n = limits.live_messages_per_session
    return QuotaExceeded(
        f"session {clip_echo(session_id)!r} holds {n} live messages, its quota; "
        "commit it first", subject=f"session:{clip_echo(session_id)}",
        limit=f"live_messages_per_session={n}", reason="LIVE_MESSAGES_QUOTA")


def live_bytes_exceeded(session_id: str, limits: Limits) -> QuotaExceeded:
    n = limits.live_bytes_per_session
    return QuotaExceeded(
        f"session {clip_echo(session_id)!r} would hold more than {n} bytes of live "
        "messages, its quota; commit it first",
        subject=f"session:{clip_echo(session_id)}",
        limit=f"live_bytes_per_session={n}", reason="LIVE_BYTES_QUOTA")


def usage_exceeded(session_id: str, limits: Limits) -> QuotaExceeded:
    n = limits.usage_records_per_session
    return QuotaExceeded(
        f"session {clip_echo(session_id)!r} holds {n} usage records waiting for a commit, "
        "its quota; commit it first", subject=f"session:{clip_echo(session_id)}",
        limit=f"usage_records_per_session={n}", reason="USAGE_QUOTA")


def sessions_exceeded(limits: Limits) -> QuotaExceeded:
    n = limits.sessions_per_identity
    return QuotaExceeded(f"this identity holds {n} sessions, its quota; delete some first",
                         subject="identity", limit=f"sessions_per_identity={n}",
                         reason="SESSIONS_QUOTA")


def watches_exceeded(limits: Limits) -> QuotaExceeded:
    n = limits.watch_streams_per_identity
    return QuotaExceeded(f"this identity has {n} watch streams (WatchTask, WatchSession) open "
                         "on this server, its "
                         "quota; close one first", subject="identity",
                         limit=f"watch_streams_per_identity={n}", reason="WATCH_STREAMS_QUOTA")


# Not limits of what a client may send but of how errors quote it: a page token the
# server made is never longer; an id echoed in an error message is clipped (the error
# mapper bounds every detail too, see api/errors.py).
PAGE_TOKEN_CHARS = 1024
ECHO_CHARS = 64


def clip_echo(value: str) -> str:
    """`value` as echoed in an error message: at most ECHO_CHARS characters, with an
    ellipsis and the full length when clipped."""
    n = ECHO_CHARS
    if len(value) <= n:
        return value
    return f"{value[:n]}…({len(value)} chars)"
