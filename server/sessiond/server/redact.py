"""Credentials never leave the process: the one helper that hides them wherever a
store URL (or any text that may quote one) is shown, in logs, errors, the startup
line and health messages."""

from __future__ import annotations

import logging
import re
from urllib.parse import urlsplit, urlunsplit

MASK = "***"
# scheme://user:password@ -> scheme://user:***@ (also inside longer text).
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://[^\s/:@]*:)[^\s/@]*@")
# ?password=... / &sslpassword=... / password=... in key=value connection strings.
_PASSWORD_PARAM = re.compile(r"(?i)\b((?:ssl)?password\s*=\s*)('[^']*'|[^\s&;'\"]+)")


def redact_url(url: str) -> str:
    """`url` with its password (and any password parameter) replaced by `***`:
    `postgresql://postgres:s3cret@host/db` -> `postgresql://postgres:***@host/db`."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact_text(url)
    if parts.password is not None:
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        try:
            port = f":{parts.port}" if parts.port is not None else ""
        except ValueError:
            return redact_text(url)
        user = parts.username or ""
        parts = parts._replace(netloc=f"{user}:{MASK}@{host}{port}")
    return redact_text(urlunsplit(parts))


def redact_text(text: str) -> str:
    """`text` with every URL password and password parameter replaced by `***`."""
    if "@" not in text and "password" not in text.lower():
        return text
    text = _USERINFO.sub(lambda m: f"{m.group(1)}{MASK}@", text)
    return _PASSWORD_PARAM.sub(lambda m: f"{m.group(1)}{MASK}", text)


class RedactingFilter(logging.Filter):
    """A logging filter (install it on handlers) that redacts credentials from the
    final message and from exception text of every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Add a `RedactingFilter` to every handler of `logger` (the root by default)."""
    target = logger or logging.getLogger()
    for handler in target.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
