"""Run examples/node/client.js: `npm install` of its package.json into a cache
directory (reused while package.json is unchanged), then `node` with NODE_PATH.

Without node/npm the test is skipped, except on CI (CI=true), where it fails."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "node"


def _on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _missing(what: str) -> None:
    if _on_ci():
        pytest.fail(f"{what}: the Node.js client test must run on CI", pytrace=False)
    pytest.skip(what)


def node_modules() -> Path:
    """The node_modules directory with the example's dependencies installed."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        _missing("node and npm are not installed")
    manifest = (EXAMPLE / "package.json").read_bytes()
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
            _missing(f"npm install failed: {out.stderr[-2000:]}")
        done.write_text("ok")
    return target / "node_modules"


def run_client(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "NODE_PATH": str(node_modules()), **env}
    return subprocess.run(["node", str(EXAMPLE / "client.js"), *args], env=full,
                          capture_output=True, text=True, timeout=120, check=False)
