"""A scriptable OpenAI-compatible `/v1/embeddings` server on loopback, for tests.

Real HTTP. Its "model" is a bag of concepts: each word maps to a dimension (words
of one synonym group share theirs, any other word hashes to one), so texts that
share meaning but no word are near each other, which is what a dense ranking adds
to a lexical one. Replies can be scripted (status codes, Retry-After, bad bodies).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from tests.loopback_http import LoopbackHTTPServer

DIM = 64
SYNONYMS = [
    {"dog", "dogs", "puppy", "puppies", "canine", "hound", "retriever", "pet"},
    {"car", "cars", "vehicle", "automobile", "sedan"},
    {"doctor", "physician", "clinic", "hospital"},
]


def concept(word: str) -> int:
    for i, group in enumerate(SYNONYMS):
        if word in group:
            return i
    digest = hashlib.blake2b(word.encode(), digest_size=4).digest()
    return len(SYNONYMS) + int.from_bytes(digest, "big") % (DIM - len(SYNONYMS))


def embed(text: str) -> list[float]:
    v = [0.0] * DIM
    for w in re.findall(r"[a-z]+", text.lower()):
        if len(w) > 2:
            v[concept(w)] += 1.0
    if not any(v):
        v[-1] = 1.0
    return v  # not normalized: the client must normalize


@dataclass
class Scripted:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes | None = None


@dataclass
class Seen:
    headers: dict[str, str]
    body: dict[str, Any]
    raw: bytes


class FakeEmbeddings(LoopbackHTTPServer):
    def __init__(self) -> None:
        super().__init__()
        self.script: deque[Scripted] = deque()
        self.default: Scripted = Scripted()
        self.received: list[Seen] = []
        self._lock = threading.Lock()

    def handle_post(self, h: BaseHTTPRequestHandler) -> None:
        raw = h.rfile.read(int(h.headers.get("content-length", "0")))
        body = json.loads(raw or b"{}")
        with self._lock:
            self.received.append(Seen({k.lower(): v for k, v in h.headers.items()}, body, raw))
            reply = self.script.popleft() if self.script else self.default
        if not h.path.endswith("/embeddings"):
            reply = Scripted(404)
        if reply.raw is not None:
            out = reply.raw
        elif reply.status == 200:
            inputs = body.get("input", [])
            inputs = [inputs] if isinstance(inputs, str) else inputs
            out = json.dumps({"object": "list", "model": body.get("model"), "data": [
                {"object": "embedding", "index": i, "embedding": embed(t)}
                for i, t in enumerate(inputs)],
                "usage": {"prompt_tokens": 1, "total_tokens": 1}}).encode()
        else:
            out = json.dumps({"error": {"message": f"scripted {reply.status}",
                                        "type": "error"}}).encode()
        h.send_response(reply.status)
        h.send_header("content-type", "application/json")
        h.send_header("content-length", str(len(out)))
        for k, v in reply.headers.items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(out)

    @property
    def texts(self) -> list[str]:
        out: list[str] = []
        for s in self.received:
            inputs = s.body.get("input", [])
            out += [inputs] if isinstance(inputs, str) else list(inputs)
        return out
