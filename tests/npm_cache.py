"""npm packages for tests, installed once into a cache directory keyed by the manifest.

Without node/npm (or when the install fails) the calling test is skipped, except on CI
(CI=true), where it fails: these tests must run there."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest


def on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def missing(what: str) -> None:
    if on_ci():
        pytest.fail(f"{what}: this test must run on CI", pytrace=False)
    pytest.skip(what)


def installed(manifest: bytes) -> Path:
    """The node_modules directory holding the dependencies of package.json `manifest`."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        missing("node and npm are not installed")
    base = Path(os.environ.get("SESSIOND_NODE_CACHE",
                               Path.home() / ".cache" / "sessiond-tests" / "node"))
    target = base / hashlib.sha256(manifest).hexdigest()[:16]
    done = target / ".installed"
    if not done.exists():
        target.mkdir(parents=True, exist_ok=True)
        (target / "package.json").write_bytes(manifest)
        out = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"],
                             cwd=target, capture_output=True, text=True, timeout=300,
                             check=False)
        if out.returncode != 0:
            missing(f"npm install failed: {out.stderr[-2000:]}")
        done.write_text("ok")
    return target / "node_modules"
