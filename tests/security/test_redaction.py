"""Store credentials never appear in the startup line, logs or errors (issue 11)."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from sessiond.server.redact import RedactingFilter, redact_text, redact_url

from tests.faults.harness import FAST_ARGS, ServerProcess
from tests.pg import temporary_database

SECRET = "s3cretpw"


def with_password(url: str) -> str:
    """The test DSN with a password in it (trust auth ignores it)."""
    scheme, rest = url.split("://", 1)
    userinfo, host = rest.split("@", 1)
    return f"{scheme}://{userinfo.split(':', 1)[0]}:{SECRET}@{host}"


def test_redact_url_and_text() -> None:
    assert (redact_url("postgresql://postgres:s3cretpw@127.0.0.1:5432/db")
            == "postgresql://postgres:***@127.0.0.1:5432/db")
    assert redact_url("postgresql://u@h/db") == "postgresql://u@h/db"
    assert redact_url("sqlite") == "sqlite"
    assert SECRET not in redact_url(f"postgresql://h/db?user=u&password={SECRET}")
    assert SECRET not in redact_text(f"failed: dsn='postgres://u:{SECRET}@h:1/x' and more")
    assert SECRET not in redact_text(f"host=h password={SECRET} dbname=x")


def test_log_filter_redacts_messages_and_tracebacks() -> None:
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    handler = Keep()
    handler.addFilter(RedactingFilter())
    log = logging.getLogger("tests.redaction")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("connecting to %s", f"postgresql://postgres:{SECRET}@db:5432/x")
        try:
            raise ValueError(f"bad dsn postgresql://postgres:{SECRET}@db/x")
        except ValueError:
            log.exception("store failed")
    finally:
        log.removeHandler(handler)
    assert len(records) == 2
    assert all(SECRET not in r for r in records)
    assert "postgres:***@db:5432" in records[0] and "Traceback" in records[1]


def test_startup_line_and_logs_hide_the_password(tmp_path: Path) -> None:
    with temporary_database() as url:
        proc = ServerProcess(tmp_path / "data",
                             extra_args=[*FAST_ARGS, "--store", with_password(url),
                                         "--log-level", "DEBUG"])
        try:
            proc.start()
            proc.terminate()
        finally:
            proc.close()
        out = proc.log_path.read_text()
    assert "sessiond serving on" in out
    assert "postgres:***@" in out
    assert SECRET not in out


def test_unreachable_store_error_hides_the_password(tmp_path: Path) -> None:
    url = f"postgresql://postgres:{SECRET}@127.0.0.1:1/nowhere"
    run = subprocess.run([sys.executable, "-m", "sessiond.server.cli", "serve",
                          "--address", "127.0.0.1:0", "--data-dir", str(tmp_path),
                          "--store", url, "--log-level", "DEBUG"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert "postgresql" in run.stderr + run.stdout
    assert SECRET not in run.stderr + run.stdout
    bad = subprocess.run([sys.executable, "-m", "sessiond.server.cli", "serve",
                          "--address", "127.0.0.1:0", "--data-dir", str(tmp_path),
                          "--store", f"mysql://root:{SECRET}@db/x"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown store" in bad.stderr
    assert SECRET not in bad.stderr + bad.stdout
