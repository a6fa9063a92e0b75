#!/usr/bin/env python3
"""The quickstart's two commands, with nothing but Python 3.11+ installed.

    python3 tools/dev.py serve [sessiond serve flags...]   # set up, then start the server
    python3 tools/dev.py test  [pytest args...]            # set up, then run every test

Set-up creates .venv/ in the repository and installs sessiond into it (editable, with
the dev extras for `test`; under CI=true also the `local` embedder extra, torch
included). It is skipped when pyproject.toml has not changed since.
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
TORCH = "torch==2.13.0"


def _stamp(extras: str) -> str:
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    return f"{digest}:{extras}"


def _installed(stamp_file: Path, extras: str) -> bool:
    """Whether the last set-up was of this pyproject.toml with at least `extras`."""
    if not stamp_file.exists():
        return False
    digest, _, have = stamp_file.read_text().strip().partition(":")
    want = _stamp(extras).partition(":")[0]
    return digest == want and set(filter(None, extras.split(","))) <= set(have.split(","))


def setup(extras: str) -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - runs before anything is installed
        raise SystemExit(f"sessiond needs Python 3.11+, this is {sys.version.split()[0]}")
    stamp_file = VENV / ".sessiond-installed"
    if _installed(stamp_file, extras):
        return
    if not PY.exists():
        print(f"creating {VENV.relative_to(ROOT)}/ ...", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    target = f".[{extras}]" if extras else "."
    print(f"installing sessiond ({target}) into .venv ...", flush=True)
    pip = [str(PY), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "--upgrade", "pip"], check=True, cwd=ROOT)
    if "local" in extras.split(","):
        # The local embedder's torch, pinned to a CPU-only release that the
        # sentence-transformers range admits, before the extra asks for "torch".
        subprocess.run([*pip, "install", TORCH], check=True, cwd=ROOT)
    subprocess.run([*pip, "install", "-e", target], check=True, cwd=ROOT)
    stamp_file.write_text(_stamp(extras))


def _on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


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
    # CI also tests the local embedder, so it installs that extra (torch) itself; a
    # developer's run skips those tests unless the extra is installed.
    setup("dev,local" if _on_ci() else "dev")
    proc = subprocess.run([str(PY), "-m", "pytest", *rest], cwd=ROOT, check=False)
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
