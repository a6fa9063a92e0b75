"""Log lines: text (the default) or JSON (`--log-format json`), one object per line
with the task, session and trace ids of the work the line is about.

Phase 2 binds `task_id` and `session_id` for the run of a task (`bind`); the trace
and span ids come from the current OpenTelemetry span when tracing is on."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from sessiond.server.observability import tracing

__all__ = ["JsonFormatter", "bind", "configure", "current"]

_task_id: contextvars.ContextVar[str] = contextvars.ContextVar("sessiond_task_id", default="")
_session_id: contextvars.ContextVar[str] = contextvars.ContextVar("sessiond_session_id",
                                                                  default="")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextmanager
def bind(*, task_id: str = "", session_id: str = "") -> Iterator[None]:
    """Log lines inside carry these ids (this task and the tasks it starts)."""
    t1 = _task_id.set(task_id) if task_id else None
    t2 = _session_id.set(session_id) if session_id else None
    try:
        yield
    finally:
        if t2 is not None:
            _session_id.reset(t2)
        if t1 is not None:
            _task_id.reset(t1)


def current() -> dict[str, str]:
    """The ids bound here (only those that are set)."""
    trace_id, span_id = tracing.current_ids()
    ids = {"task_id": _task_id.get(), "session_id": _session_id.get(),
           "trace_id": trace_id, "span_id": span_id}
    return {k: v for k, v in ids.items() if v}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message,
    the bound ids, and the exception (type and text) if any."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname, "logger": record.name,
            "message": record.getMessage()}
        out.update(current())
        if record.exc_info and record.exc_info[0] is not None:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure(level: str, fmt: str) -> None:
    """The root logger of `sessiond serve`: stderr, text or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
