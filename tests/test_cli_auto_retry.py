"""The automatic retry's server flags: off by default, parsed into Settings, and
refused at start when they make no sense."""

from __future__ import annotations

from pathlib import Path

import pytest
from sessiond.server.app import App
from sessiond.server.cli import _parser, settings_from_args

from tests.conftest import fast_settings


def test_auto_retry_is_off_by_default_and_parsed() -> None:
    s = settings_from_args(_parser().parse_args(["serve"]))
    assert s.auto_retry_failed is False and s.auto_retry_max == 3
    s = settings_from_args(_parser().parse_args(
        ["serve", "--auto-retry-failed", "--auto-retry-max", "5", "--auto-retry-backoff", "2",
         "--auto-retry-backoff-max", "60"]))
    assert (s.auto_retry_failed, s.auto_retry_max, s.auto_retry_backoff_seconds,
            s.auto_retry_backoff_max_seconds) == (True, 5, 2.0, 60.0)


@pytest.mark.parametrize(("field", "value"), [("auto_retry_max", 0),
                                              ("auto_retry_backoff_seconds", 0.0),
                                              ("auto_retry_backoff_max_seconds", 1.0)])
def test_bad_auto_retry_settings_are_refused(tmp_path: Path, field: str, value: float) -> None:
    settings = fast_settings(tmp_path, auto_retry_failed=True, **{field: value})
    with pytest.raises(ValueError, match="auto-retry"):
        App(settings)
