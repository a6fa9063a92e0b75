"""The auto-commit server flags: off by default, parsed into the server default policy
(also from the environment), and refused at start when they make no sense."""

from __future__ import annotations

import pytest
from sessiond.server.cli import _parser, main, settings_from_args
from sessiond.server.domain.autocommit import AutoCommitPolicy


def test_auto_commit_is_off_by_default_and_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings_from_args(_parser().parse_args(["serve"]))
    assert s.auto_commit == AutoCommitPolicy() and not s.auto_commit.enabled
    s = settings_from_args(_parser().parse_args(
        ["serve", "--auto-commit-messages", "50", "--auto-commit-tokens", "4000",
         "--auto-commit-idle", "600", "--auto-commit-keep-recent", "4"]))
    assert s.auto_commit == AutoCommitPolicy(50, 4000, 600, 4)
    monkeypatch.setenv("SESSIOND_AUTO_COMMIT_IDLE", "30")
    s = settings_from_args(_parser().parse_args(["serve"]))
    assert s.auto_commit == AutoCommitPolicy(idle_seconds=30)


@pytest.mark.parametrize(("args", "flag"), [
    (["--auto-commit-messages", "-1"], "--auto-commit-messages"),
    (["--auto-commit-idle", "-5"], "--auto-commit-idle"),
    (["--auto-commit-messages", "3", "--auto-commit-keep-recent", "3"],
     "--auto-commit-keep-recent"),
])
def test_bad_auto_commit_flags_are_refused(args: list[str], flag: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", *args]) == 2
    err = capsys.readouterr().err
    assert flag in err and err.startswith("sessiond: ")
