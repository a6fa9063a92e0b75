"""Prompt templates shipped in `sessiond.server.phase2.engines.prompts`, and how archive
messages are rendered into them.

A template file `<name>.v<version>.md` holds an optional leading HTML comment (notes
for humans, dropped) and sections introduced by `=== system ===` / `=== user ===`
lines. Fields use `string.Template` syntax (`$field`); a missing field is an error,
so a template and the code filling it cannot drift apart silently.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from string import Template
from typing import Any

from sessiond.server.domain.values import (
    ContextPart,
    Message,
    TextPart,
    ToolPart,
    UsageRecord,
)

PROMPT_PACKAGE = "sessiond.server.phase2.engines.prompts"

SUMMARY_PROMPT = ("archive_summary", 1)
EXTRACTION_PROMPT = ("memory_extraction", 1)
REPAIR_PROMPT = ("output_repair", 1)
EXTRACTION_SCHEMA = ("memory_extraction", 1)

# Rendering limits: a message's text, a tool's input/output, and the whole archive.
TEXT_MAX = 4000
TOOL_IO_MAX = 600
ARCHIVE_MAX = 120_000

_SECTION = re.compile(r"^===\s*(system|user)\s*===\s*$", re.M)
_COMMENT = re.compile(r"\A\s*<!--.*?-->\s*", re.S)


@dataclass(frozen=True, slots=True)
class PromptTemplate:
    name: str
    version: int
    system: Template | None
    user: Template

    @property
    def id(self) -> str:
        return f"{self.name}.v{self.version}"

    def render(self, **fields: str) -> tuple[str, str]:
        """(system, user) with every field substituted; KeyError names a missing one."""
        system = self.system.substitute(fields).strip() if self.system is not None else ""
        return system, self.user.substitute(fields).strip()


def _read(filename: str) -> str:
    return resources.files(PROMPT_PACKAGE).joinpath(filename).read_text(encoding="utf-8")


def parse_template(name: str, version: int, text: str) -> PromptTemplate:
    text = _COMMENT.sub("", text, count=1)
    parts = _SECTION.split(text)
    sections: dict[str, str] = {}
    # parts: [before, label1, body1, label2, body2, ...]
    if parts[0].strip():
        raise ValueError(f"prompt {name}.v{version}: text before the first === section ===")
    for label, body in zip(parts[1::2], parts[2::2], strict=True):
        if label in sections:
            raise ValueError(f"prompt {name}.v{version}: section {label} appears twice")
        sections[label] = body.strip("\n")
    if "user" not in sections:
        raise ValueError(f"prompt {name}.v{version}: no === user === section")
    system = Template(sections["system"]) if "system" in sections else None
    return PromptTemplate(name, version, system, Template(sections["user"]))


@cache
def load_prompt(name: str, version: int) -> PromptTemplate:
    """The template `<name>.v<version>.md` shipped in the package."""
    return parse_template(name, version, _read(f"{name}.v{version}.md"))


@cache
def _schema_text(name: str, version: int) -> str:
    return _read(f"{name}.v{version}.schema.json")


def load_schema(name: str, version: int) -> dict[str, Any]:
    """A fresh copy of the JSON schema `<name>.v<version>.schema.json`."""
    schema = json.loads(_schema_text(name, version))
    if not isinstance(schema, dict):
        raise ValueError(f"schema {name}.v{version} is not a JSON object")
    return schema


# ------------------------------------------------------------------ rendering
def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def render_message(m: Message) -> str:
    """`[id] role: text`, then one indented line per tool call or context reference."""
    text = "\n".join(p.text for p in m.parts if isinstance(p, TextPart)).strip()
    lines = [f"[{m.id}] {m.role.value}: {_clip(text, TEXT_MAX)}"]
    for p in m.parts:
        if isinstance(p, ToolPart):
            name = p.tool_name or p.tool_id
            head = f"  (tool {name}, {p.status.value}"
            if p.skill_uri:
                head += f", skill {p.skill_uri}"
            if p.duration_ms:
                head += f", {p.duration_ms} ms"
            head += ")"
            io = [f"{label}: {_clip(' '.join(value.split()), TOOL_IO_MAX)}"
                  for label, value in (("input", p.input), ("output", p.output)) if value]
            lines.append(f"{head} {'; '.join(io)}" if io else head)
        elif isinstance(p, ContextPart):
            ref = f"  (context {p.context_type.value} {p.uri}"
            lines.append(ref + (f": {_clip(p.abstract, TOOL_IO_MAX)})" if p.abstract else ")"))
    return "\n".join(lines)


def render_usage(usage: Sequence[UsageRecord]) -> str:
    lines: list[str] = []
    for rec in usage:
        if rec.context_uris:
            lines.append("  (contexts used: " + ", ".join(rec.context_uris) + ")")
        if rec.skill is not None and rec.skill.uri:
            outcome = "succeeded" if rec.skill.success else "failed"
            lines.append(f"  (skill {rec.skill.uri} {outcome}; input: "
                         f"{_clip(rec.skill.input, TOOL_IO_MAX)}; output: "
                         f"{_clip(rec.skill.output, TOOL_IO_MAX)})")
    return "\n".join(lines)


def render_messages(messages: Sequence[Message], usage: Sequence[UsageRecord] = (),
                    budget: int = ARCHIVE_MAX) -> str:
    """The archive as prompt text. Over `budget` characters, the oldest quarter and the
    newest three quarters of the budget are kept and the middle is marked omitted."""
    blocks = [render_message(m) for m in messages]
    used = render_usage(usage)
    if used:
        blocks.append("[recorded usage]\n" + used)
    if sum(len(b) + 2 for b in blocks) <= budget:
        return "\n\n".join(blocks)
    head: list[str] = []
    size = 0
    for b in blocks:
        if size + len(b) + 2 > budget // 4:
            break
        head.append(b)
        size += len(b) + 2
    tail: list[str] = []
    size = 0
    for b in reversed(blocks[len(head):]):
        if size + len(b) + 2 > budget - budget // 4:
            break
        tail.append(b)
        size += len(b) + 2
    tail.reverse()
    omitted = len(blocks) - len(head) - len(tail)
    if not head and not tail:
        # One block larger than the budget: keep its start.
        return _clip(blocks[-1], budget)
    return "\n\n".join([*head, f"[… {omitted} messages omitted for length …]", *tail])
