"""Batch ingestion: messages per second through AddMessages (batches of --batch) against
one AddMessage call per message, on one `sessiond serve` (SQLite, FULL sync by default),
one client, measured in the same run. Prints medians over --rounds and the ratio.

Usage: python bench/add_messages.py [--messages 2000] [--batch 100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sessiond.v1 import session_pb2, session_pb2_grpc

from bench.harness import median, sessiond_cmd, start_server

S = session_pb2
TEXT = "The agent reads the deploy log and finds the health-check timeout. " * 4


def part() -> S.Part:
    return S.Part(text=S.TextPart(text=TEXT))


def singles(stub: session_pb2_grpc.SessionServiceStub, sid: str, n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        stub.AddMessage(S.AddMessageRequest(session_id=sid, role=S.ROLE_USER, parts=[part()],
                                            client_message_id=f"c-{i}"))
    return n / (time.perf_counter() - t0)


def batches(stub: session_pb2_grpc.SessionServiceStub, sid: str, n: int, size: int) -> float:
    t0 = time.perf_counter()
    for start in range(0, n, size):
        stub.AddMessages(S.AddMessagesRequest(session_id=sid, messages=[
            S.NewMessage(role=S.ROLE_USER, parts=[part()], client_message_id=f"c-{i}")
            for i in range(start, min(n, start + size))]))
    return n / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--messages", type=int, default=2000)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sqlite-synchronous", default="FULL", choices=["FULL", "NORMAL"])
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        server = start_server("sessiond", [*sessiond_cmd(), "serve", "--address",
                                           "127.0.0.1:0", "--data-dir", str(data),
                                           "--sqlite-synchronous", a.sqlite_synchronous,
                                           "--log-level", "WARNING"],
                              Path(tmp) / "server.log", data_dir=data)
        try:
            with grpc.insecure_channel(server.target) as ch:
                stub = session_pb2_grpc.SessionServiceStub(ch)
                one: list[float] = []
                many: list[float] = []
                for r in range(a.rounds):
                    for name, out in (("single", one), ("batch", many)):
                        sid = f"{name}-{r}"
                        stub.CreateSession(S.CreateSessionRequest(session_id=sid))
                        out.append(singles(stub, sid, a.messages) if name == "single"
                                   else batches(stub, sid, a.messages, a.batch))
        finally:
            server.stop()
    print(f"AddMessage x{a.messages}: median {median(one):.0f} msg/s "
          f"(rounds {[round(x) for x in one]})")
    print(f"AddMessages batch {a.batch}: median {median(many):.0f} msg/s "
          f"(rounds {[round(x) for x in many]})")
    print(f"ratio batch/single: {median(many) / median(one):.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
