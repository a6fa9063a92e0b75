"""A Node.js @grpc/grpc-js client (examples/node/client.js) over TLS with an API key.

npm installs the example's dependencies into a cache directory on first use. Without
node/npm the test is skipped, except under CI=true, where it fails."""

from __future__ import annotations

import json
from pathlib import Path

import grpc

from tests.certs import CA
from tests.faults.harness import FAST_ARGS, ServerProcess
from tests.security.node import node_modules, run_client
from tests.security.test_apikeys import create_key, tamper


def test_node_client_over_tls_with_an_api_key(tmp_path: Path) -> None:
    modules = node_modules()  # install (or skip/fail) before starting anything
    assert (modules / "@grpc" / "grpc-js").is_dir()
    ca = CA()
    cert, key = ca.server().write(tmp_path / "tls", "server")
    (tmp_path / "tls" / "ca.pem").write_bytes(ca.pem)
    data = tmp_path / "data"
    proc = ServerProcess(data, credentials=grpc.ssl_channel_credentials(ca.pem), extra_args=[
        *FAST_ARGS, "--tls-cert", str(cert), "--tls-key", str(key), "--auth", "api-key"])
    proc.start()
    try:
        made = create_key(["--data-dir", str(data)], "--account", "acme", "--user", "node")
        out = run_client({"SESSIOND_TARGET": f"localhost:{proc.port}",
                          "SESSIOND_CA_FILE": str(tmp_path / "tls" / "ca.pem"),
                          "SESSIOND_API_KEY": made["key"]}, "node-session")
        assert out.returncode == 0, out.stderr
        steps = {s["step"]: s for s in map(json.loads, out.stdout.splitlines())}
        assert steps["GetSession"]["session_id"] == "node-session"
        assert steps["AddMessage"]["message_id"]
        assert steps["Commit"]["archive_uri"].endswith("/archives/000001")
        assert steps["WithoutKey"]["code"] == "UNAUTHENTICATED"
        wrong = run_client({"SESSIOND_TARGET": f"localhost:{proc.port}",
                            "SESSIOND_CA_FILE": str(tmp_path / "tls" / "ca.pem"),
                            "SESSIOND_API_KEY": tamper(made["key"])}, "x")
        assert wrong.returncode == 1 and "UNAUTHENTICATED" in wrong.stderr
    finally:
        proc.close()
