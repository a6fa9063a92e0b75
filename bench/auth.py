"""What authentication and TLS cost per call, side by side.

    python bench/auth.py [--trials 5] [--seconds 3] [--concurrency 16]
                         [--modes none,api-key,...] [--baseline-tree DIR]

One `sessiond serve` process per mode, all running at once on SQLite: plaintext
with --auth none (the baseline), --auth api-key, --auth jwt (HS256, and ES256 from a
JWKS file), TLS with --auth none, and TLS with --auth api-key. The workload is a read
(`GetSession` of an existing session) in a closed loop; trials of the modes are
interleaved, and the table shows the median throughput of the trials, latency
percentiles of all samples, the ratio to the baseline, and the median CPU time per
call of the server process and of the client (this process) - the steadiest figure
on a busy machine.

`--baseline-tree DIR` adds a server run from another source tree (e.g. a `git
archive` of the commit before authentication existed), plaintext and without auth
flags, to see what the auth interceptor costs when nothing is authenticated.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` and `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc
import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm
from sessiond.client import aio_connect
from sessiond.v1 import session_pb2, session_pb2_grpc

from bench import harness as h
from bench.workloads import LoadResult, closed_loop
from tests.certs import CA

ISSUER, AUDIENCE = "https://bench.issuer", "sessiond-bench"


@dataclass
class Mode:
    name: str
    flags: list[str]
    client: dict[str, Any]
    server: h.ServerProc | None = None
    env: dict[str, str] = field(default_factory=dict)
    trials: list[LoadResult] = field(default_factory=list)
    server_us: list[float] = field(default_factory=list)  # server CPU per call, per trial
    client_us: list[float] = field(default_factory=list)  # this process's CPU per call


def _token(key: Any, alg: str, kid: str | None = None) -> str:
    now = int(time.time())
    return jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "exp": now + 3600,
                       "sessiond_account": "bench", "scope": "read write"}, key,
                      algorithm=alg, headers={"kid": kid} if kid else None)


def _modes(work: Path) -> list[Mode]:
    ca = CA()
    cert, key = ca.server().write(work / "tls", "server")
    secret = work / "secret"
    secret.write_bytes(b"b" * 48)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    jwk = {**ECAlgorithm.to_jwk(ec_key.public_key(), as_dict=True), "kid": "e1",
           "alg": "ES256"}
    (work / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    jwt_flags = ["--auth", "jwt", "--jwt-issuer", ISSUER, "--jwt-audience", AUDIENCE]
    tls_flags = ["--tls-cert", str(cert), "--tls-key", str(key)]
    local = {"plaintext_loopback": True}
    return [
        Mode("none", [], {}),
        Mode("api-key", ["--auth", "api-key"], {**local, "api_key": "(per server)"}),
        # the same key as plain per-call metadata: the server's cost without the
        # client's call credentials
        Mode("api-key header", ["--auth", "api-key"], {"header": "(per server)"}),
        Mode("jwt HS256", [*jwt_flags, "--jwt-secret-file", str(secret)],
             {**local, "token": _token(secret.read_bytes(), "HS256")}),
        Mode("jwt ES256", [*jwt_flags, "--jwt-jwks-file", str(work / "jwks.json")],
             {**local, "token": _token(ec_key, "ES256", "e1")}),
        Mode("TLS none", tls_flags, {"root_certificates": ca.pem}),
        Mode("TLS api-key", [*tls_flags, "--auth", "api-key"],
             {"root_certificates": ca.pem, "api_key": "(per server)"}),
    ]


def _make_key(data_dir: Path) -> str:
    out = subprocess.run([*h.sessiond_cmd(), "keys", "create", "--data-dir", str(data_dir),
                          "--account", "bench", "--scopes", "read,write", "--json"],
                         capture_output=True, text=True, check=True)
    return str(json.loads(out.stdout)["key"])


def _start(mode: Mode, work: Path, i: int) -> None:
    data = work / f"data{i}"
    data.mkdir()
    for field_name in ("api_key", "header"):
        if field_name in mode.client:
            mode.client[field_name] = _make_key(data)
    mode.server = h.start_server(mode.name, [
        sys.executable, "-m", "sessiond.server.cli", "serve", "--address", "127.0.0.1:0",
        "--data-dir", str(data), "--log-level", "WARNING", *mode.flags],
        work / f"server{i}.log", data_dir=data, env=mode.env)


async def _trial(mode: Mode, seconds: float, concurrency: int) -> LoadResult:
    assert mode.server is not None
    opts = dict(mode.client)
    key = opts.pop("header", None)
    md = (("authorization", f"Bearer {key}"),) if key else None
    ch = aio_connect(f"localhost:{mode.server.port}", **opts)
    try:
        stub: Any = session_pb2_grpc.SessionServiceStub(ch)
        await stub.GetSession(session_pb2.GetSessionRequest(session_id="b", auto_create=True),
                              metadata=md)
        req = session_pb2.GetSessionRequest(session_id="b")
        done = [0]

        async def one() -> Any:
            reply = await stub.GetSession(req, timeout=10, metadata=md)
            done[0] += 1
            return reply

        def make(_: int) -> Callable[[], Awaitable[Any]]:
            return one

        server0, client0 = h.cpu_seconds(mode.server.pid), h.self_cpu_seconds()
        res = await closed_loop(make, concurrency, seconds)
        calls = max(done[0], 1)
        mode.server_us.append((h.cpu_seconds(mode.server.pid) - server0) / calls * 1e6)
        mode.client_us.append((h.self_cpu_seconds() - client0) / calls * 1e6)
        return res
    finally:
        await ch.close()


async def _run(args: argparse.Namespace, modes: list[Mode]) -> None:
    for _ in range(args.trials):
        for mode in modes:
            res = await _trial(mode, args.seconds, args.concurrency)
            if res.errors:
                raise RuntimeError(f"{mode.name}: {res.errors} errors, {res.first_error}")
            mode.trials.append(res)


def _table(modes: list[Mode]) -> str:
    base = h.median([t.throughput for t in modes[0].trials])
    rows = ["| mode | calls/s (median) | ratio | p50 ms | p99 ms | server CPU µs/call "
            "| client CPU µs/call |", "|---|---|---|---|---|---|---|"]
    for m in modes:
        tput = h.median([t.throughput for t in m.trials])
        lat = h.summarize_ms([x for t in m.trials for x in t.latencies])
        rows.append(f"| {m.name} | {tput:.0f} | {h.ratio(tput, base):.2f} | "
                    f"{lat['p50_ms']:.2f} | {lat['p99_ms']:.2f} | "
                    f"{h.median(m.server_us):.0f} | {h.median(m.client_us):.0f} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--modes", help="comma-separated subset of the mode names")
    p.add_argument("--baseline-tree", type=Path, help="another source tree to compare")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="sessiond-bench-auth-") as tmp:
        work = Path(tmp)
        modes = _modes(work)
        if args.modes:
            wanted = args.modes.split(",")
            modes = [m for m in modes if m.name in wanted]
        if args.baseline_tree:
            tree = args.baseline_tree.resolve()
            modes.insert(1, Mode(f"none @ {tree.name}", [], {}, env={
                "PYTHONPATH": f"{tree / 'server'}:{tree / 'clients'}"}))
        try:
            for i, mode in enumerate(modes):
                _start(mode, work, i)
            asyncio.run(_run(args, modes))
        finally:
            for mode in modes:
                if mode.server is not None:
                    mode.server.stop(5)
    print(f"GetSession, closed loop, concurrency {args.concurrency}, {args.trials} trials "
          f"of {args.seconds:g} s per mode (interleaved), grpc {grpc.__version__}")
    print(_table(modes))


if __name__ == "__main__":
    main()
