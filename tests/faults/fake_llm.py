"""A minimal OpenAI-compatible chat-completions server on loopback for the crash test.

It lives in the test process, so it survives the sessiond kills. Summary requests get
a well-formed overview, extraction requests a couple of memories; every reply carries
a distinct `usage` (prompt 100+11n, completion 20+3n for the n-th reply, so no sum of
two replies equals a sum of three), and each reply is recorded with the message ids its
prompt contained, so a task's token usage can be traced to the replies it counted.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any

from tests.loopback_http import LoopbackHTTPServer

_MSG_ID = re.compile(r"msg_[0-9a-f]{32}")


@dataclass(frozen=True)
class Served:
    kind: str  # "summary" | "extract" | "other"
    message_ids: frozenset[str]
    usage: tuple[int, int]


class FakeLLM(LoopbackHTTPServer):
    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.served: list[Served] = []
        self._n = 0
        self.delay = 0.0  # seconds each reply waits (a slow model)
        self.started = threading.Event()  # set when a request arrives

    def for_archive(self, message_ids: set[str]) -> dict[str, list[tuple[int, int]]]:
        """Usage of the replies whose prompt held (only) messages of this archive."""
        out: dict[str, list[tuple[int, int]]] = {"summary": [], "extract": []}
        with self.lock:
            for s in self.served:
                if s.kind in out and s.message_ids and s.message_ids <= message_ids:
                    out[s.kind].append(s.usage)
        return out

    def handle_post(self, h: BaseHTTPRequestHandler) -> None:
        raw = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw)
        except ValueError:
            body = {}
        self.started.set()
        if self.delay:
            time.sleep(self.delay)
        data = json.dumps(self._reply(body)).encode()
        try:
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
        except OSError:
            pass  # the client (a killed or stopping server) has gone

    def _reply(self, body: dict[str, Any]) -> dict[str, Any]:
        messages = body.get("messages") or [{}]
        system = str(messages[0].get("content", ""))
        prompt = "\n".join(str(m.get("content", "")) for m in messages[1:])
        kind = ("summary" if "archive summarizer" in system else
                "extract" if "memory extractor" in system else "other")
        ids = frozenset(_MSG_ID.findall(prompt))
        if kind == "summary":
            content = "\n".join([
                "ABSTRACT: The user and the agent test sessiond.", "",
                "## Overview", "A test conversation.", "",
                "## Historical context", "- none", "",
                "## New information", "- Some facts.", "",
                "## Current archive analysis", "Facts were stated.", "",
                "## Key user messages", "- none", "",
                "## Open loops", "- none", "",
                "## Next step", "- Continue."])
        else:
            first = sorted(ids)[:1]
            content = json.dumps({"memories": [
                {"category": "preferences", "key": "Preferred drink",
                 "content": "The user prefers tea.", "source_message_ids": first},
                {"category": "entities", "key": f"Archive {first[0] if first else 'none'}",
                 "content": "An archive of the crash test.", "source_message_ids": first},
            ]})
        with self.lock:
            self._n += 1
            n = self._n
            usage = (100 + 11 * n, 20 + 3 * n)
            self.served.append(Served(kind, ids, usage))
        return {"id": f"chatcmpl-{n}", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model", "fake"),
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": content}}],
                "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                          "total_tokens": usage[0] + usage[1]}}
