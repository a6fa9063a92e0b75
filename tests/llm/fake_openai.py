"""A scriptable OpenAI-compatible chat-completions server on loopback, for tests.

Real HTTP (`http.server.ThreadingHTTPServer` in a thread). Each request is recorded
and classified by its system prompt as "summary" or "extract" (a repair request is
the same kind, with `repair=True`). Replies come from a per-kind script queue, else
from the kind's default responder. Every 200 reply carries a distinct `usage`; what
was sent is recorded so tests can compare token totals.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from tests.loopback_http import LoopbackHTTPServer

SUMMARY_MARK = "archive summarizer of sessiond"
EXTRACT_MARK = "memory extractor of sessiond"


@dataclass
class Reply:
    status: int = 200
    content: str | None = None  # assistant content of a 200 reply (None: default)
    raw: bytes | None = None  # the whole body, verbatim (overrides everything)
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering
    error: str = "error"  # error message of a non-200 reply
    usage: bool = True  # include a usage block in a 200 reply


@dataclass
class Received:
    kind: str
    repair: bool
    path: str
    headers: dict[str, str]  # lower-case names
    raw: bytes
    body: dict[str, Any]
    reply: Reply | None = None
    usage: tuple[int, int] | None = None  # usage returned in the reply, if any
    received_at: float = field(default_factory=time.monotonic)

    @property
    def system(self) -> str:
        return str(self.body["messages"][0]["content"]) if self.body.get("messages") else ""

    @property
    def prompt(self) -> str:
        """All message contents joined."""
        return "\n".join(str(m.get("content", "")) for m in self.body.get("messages", []))

    @property
    def first_user(self) -> str:
        return next(str(m["content"]) for m in self.body["messages"] if m["role"] == "user")

    def section(self, tag: str) -> str:
        m = re.search(rf"<{tag}>\n?(.*?)\n?</{tag}>", self.first_user, re.S)
        return m.group(1) if m else ""

    def message_ids(self, role: str = "") -> list[str]:
        rx = rf"^\[([^\]]+)\] (?:{role or '[a-z]+'}):"
        return re.findall(rx, self.section("messages"), re.M)

    def user_texts(self) -> list[str]:
        return [m.group(1) for m in re.finditer(r"^\[[^\]]+\] user: (.*)$",
                                                 self.section("messages"), re.M)]


def good_summary(rec: Received, marker: str = "") -> str:
    quotes = [f'> "{t}"' for t in rec.user_texts()[:2]] or ["- none"]
    prev = rec.section("previous_overview").strip()
    history = "- Carried forward from earlier archives." if prev else "- none"
    tag = f" {marker}" if marker else ""
    return "\n".join([
        f"ABSTRACT: The user and the agent talk about testing{tag}.",
        "",
        "## Overview",
        f"The session is about testing sessiond with a fake model{tag}.",
        "",
        "## Historical context",
        history,
        "",
        "## New information",
        "- The user shared some facts.",
        "",
        "## Current archive analysis",
        "The user stated facts; the agent acknowledged them.",
        "",
        "## Key user messages",
        *quotes,
        "",
        "## Open loops",
        "- none",
        "",
        "## Next step",
        "- Continue helping the user.",
    ])


class FakeLLM(LoopbackHTTPServer):
    def __init__(self) -> None:
        super().__init__()
        self.received: list[Received] = []
        self.scripts: dict[str, deque[Reply]] = {"summary": deque(), "extract": deque()}
        self.summary_fn: Callable[[Received], str] = good_summary
        self.memories_fn: Callable[[Received], list[dict[str, Any]]] = lambda rec: []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self._tokens = 0

    # ---------------------------------------------------------------- control
    def push(self, kind: str, *replies: Reply) -> None:
        with self.lock:
            self.scripts[kind].extend(replies)

    def of(self, kind: str) -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.kind == kind]

    def returned_usage(self) -> tuple[int, int]:
        """Sum of the usage in every reply the client received in full."""
        with self.lock:
            done = [r.usage for r in self.received if r.usage is not None]
        return sum(u[0] for u in done), sum(u[1] for u in done)

    # ---------------------------------------------------------------- serving
    def handle_post(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length)
        headers = {k.lower(): v for k, v in h.headers.items()}
        try:
            body = json.loads(raw)
        except ValueError:
            body = {}
        rec = Received(kind="", repair=False, path=h.path, headers=headers, raw=raw, body=body)
        system = rec.system
        rec.kind = ("summary" if SUMMARY_MARK in system else
                    "extract" if EXTRACT_MARK in system else "other")
        rec.repair = len(body.get("messages", [])) > 2
        with self.lock:
            self.received.append(rec)
            queue = self.scripts.get(rec.kind)
            reply = queue.popleft() if queue else Reply()
            rec.reply = reply
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if reply.delay:
                time.sleep(reply.delay)
            if h.path != "/v1/chat/completions":
                self._send(h, 404, {"error": {"message": f"no route {h.path}"}}, {})
                return
            if reply.raw is not None:
                self._send_raw(h, reply.status, reply.raw, reply.headers)
                return
            if reply.status != 200:
                self._send(h, reply.status, {"error": {"message": reply.error,
                                                       "type": "test_error"}}, reply.headers)
                return
            content = reply.content
            if content is None:
                content = (self.summary_fn(rec) if rec.kind == "summary" else
                           json.dumps({"memories": self.memories_fn(rec)}))
            payload: dict[str, Any] = {
                "id": f"chatcmpl-{len(self.received)}", "object": "chat.completion",
                "created": int(time.time()), "model": body.get("model", "fake"),
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": content}}],
            }
            usage: tuple[int, int] | None = None
            if reply.usage:
                with self.lock:
                    self._tokens += 1
                    n = self._tokens
                usage = (100 + 11 * n, 20 + 3 * n)
                payload["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                                    "total_tokens": usage[0] + usage[1]}
            if self._send(h, 200, payload, reply.headers):
                rec.usage = usage
        finally:
            with self.lock:
                self.in_flight -= 1

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, payload: dict[str, Any],
              headers: dict[str, str]) -> bool:
        return FakeLLM._send_raw(h, status, json.dumps(payload).encode(),
                                 {"Content-Type": "application/json", **headers})

    @staticmethod
    def _send_raw(h: BaseHTTPRequestHandler, status: int, data: bytes,
                  headers: dict[str, str]) -> bool:
        """Write a response; False when the client had already gone (timed out)."""
        try:
            h.send_response(status)
            for k, v in headers.items():
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
            h.wfile.flush()
            # A client that timed out has closed its end; probe it so such replies
            # are not counted as received.
            return not _peer_closed(h)
        except OSError:
            return False


def _peer_closed(h: BaseHTTPRequestHandler) -> bool:
    import select
    import socket

    sock = h.connection
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        return bool(sock.recv(1, socket.MSG_PEEK) == b"")
    except OSError:
        return True
