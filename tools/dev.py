#!/usr/bin/env python3
"""The quickstart's two commands, with nothing but Python 3.11+ installed.

    python3 tools/dev.py serve [sessiond serve flags...]   # set up, then start the server
    python3 tools/dev.py test  [pytest args...]            # set up, then run every test

Set-up creates .venv/ in the repository and installs sessiond into it (editable, with
the dev extras for `test`). It is skipped when pyproject.toml has not changed since.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / ("python.exe" if os.name == "nt" else "python")


def _stamp(extras: str) -> str:
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    return f"{digest}:{extras}"


def setup(extras: str) -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - runs before anything is installed
        raise SystemExit(f"sessiond needs Python 3.11+, this is {sys.version.split()[0]}")
    stamp_file = VENV / ".sessiond-installed"
    want = _stamp(extras)
    if stamp_file.exists() and stamp_file.read_text().strip() in (want, _stamp("dev")):
        return
    if not PY.exists():
        print(f"creating {VENV.relative_to(ROOT)}/ ...", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    target = f".[{extras}]" if extras else "."
    print(f"installing sessiond ({target}) into .venv ...", flush=True)
    pip = [str(PY), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "--upgrade", "pip"], check=True, cwd=ROOT)
    subprocess.run([*pip, "install", "-e", target], check=True, cwd=ROOT)
    stamp_file.write_text(want)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("serve", "test"):
        print(__doc__)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "serve":
        setup("")
        args = [str(BIN / "sessiond"), "serve", *rest]
        if "--data-dir" not in rest:
            args += ["--data-dir", str(ROOT / "data")]
        os.execv(args[0], args)
    setup("dev")
    proc = subprocess.run([str(PY), "-m", "pytest", *rest], cwd=ROOT, check=False)
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
