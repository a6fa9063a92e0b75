"""What the worker logs when it may no longer write for a task it runs: a task that a
DeleteSession cancelled is not "owned by another worker"."""

from __future__ import annotations

import logging
import time

import pytest
from sessiond.v1 import session_pb2

from tests.api.helpers import GatedEngine, add
from tests.conftest import ServerFactory

PIPELINE_LOG = "sessiond.server.phase2.pipeline"


def _wait_for(caplog: pytest.LogCaptureFixture, text: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(text in r.getMessage() for r in caplog.records if r.name == PIPELINE_LOG):
            return
        time.sleep(0.02)
    raise AssertionError(f"no log line with {text!r}: "
                         f"{[r.getMessage() for r in caplog.records if r.name == PIPELINE_LOG]}")


def test_delete_session_while_running_is_logged_as_cancelled(
        server_factory: ServerFactory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=PIPELINE_LOG)
    engine = GatedEngine()
    r = server_factory(engine=engine)
    r.sessions.CreateSession(session_pb2.CreateSessionRequest(session_id="gone"))
    add(r.sessions, "gone", "hello")
    r.sessions.Commit(session_pb2.CommitRequest(session_id="gone"))
    assert engine.entered.wait(10)
    r.sessions.DeleteSession(session_pb2.DeleteSessionRequest(session_id="gone"))
    engine.release()  # whether or not the stage was interrupted, it may not write now
    _wait_for(caplog, "ended cancelled meanwhile (session deleted)")
    lines = [rec.getMessage() for rec in caplog.records if rec.name == PIPELINE_LOG]
    assert not [ln for ln in lines if "another worker" in ln or "owns it now" in ln], lines
    stopped = [rec for rec in caplog.records if "ended cancelled" in rec.getMessage()]
    assert stopped[0].levelno == logging.INFO
