"""Make error text safe to store in a task and show to a watcher."""

from __future__ import annotations

import re

MAX_ERROR_CHARS = 512

_SECRETS = [
    re.compile(r"sk-[A-Za-z0-9_\-]{6,}"),
    re.compile(r"(?i)bearer\s+[A-Za-z0-9._~+/\-]+=*"),
    re.compile(r"(?i)(api[_-]?key|authorization|token|secret|password)(\s*[:=]\s*)\S+"),
    re.compile(r"(?i)(https?://)[^/\s:@]+:[^/\s@]+@"),
]


def sanitize(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Redact API keys, bearer tokens, credentials in URLs and any known secret;
    collapse whitespace; cut to MAX_ERROR_CHARS."""
    for s in secrets:
        if s:
            text = text.replace(s, "[REDACTED]")
    text = _SECRETS[0].sub("sk-[REDACTED]", text)
    text = _SECRETS[1].sub("Bearer [REDACTED]", text)
    text = _SECRETS[2].sub(lambda m: f"{m.group(1)}{m.group(2)}[REDACTED]", text)
    text = _SECRETS[3].sub(lambda m: f"{m.group(1)}[REDACTED]@", text)
    text = " ".join(text.split())
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 1] + "…"
    return text
