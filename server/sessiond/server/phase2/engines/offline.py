"""The embedded default Phase 2 engine: offline, deterministic, no network.

It does not understand language. The summary is built by rules from the archive's
messages (a structured digest with the required sections) and extraction matches
plain first-person patterns ("my name is", "I prefer", ...), tool calls and skill use.
The same archive and previous overview always give the same output.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Sequence

from sessiond.server.domain.values import (
    CandidateMemory,
    ContextPart,
    MemoryCategory,
    Message,
    Role,
    ToolPart,
    ToolStatus,
    UsageRecord,
)
from sessiond.server.phase2.engines.base import (
    ExtractionRequest,
    ExtractionResponse,
    RetryReporter,
    SummaryRequest,
    SummaryResponse,
    no_report,
)
from sessiond.server.phase2.gate import checkpoint, run_cpu

ABSTRACT_MAX = 200
QUOTE_MAX = 300
SECTION_ITEMS = 8


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _first_sentence(text: str) -> str:
    text = " ".join(text.split())
    m = re.match(r"(.+?[.!?])(\s|$)", text)
    return m.group(1) if m else text


def _key(*parts: str) -> str:
    norm = " ".join(" ".join(p.lower().split()) for p in parts)
    return hashlib.sha256(norm.encode()).hexdigest()[:32]


def _section(text: str, title: str) -> str:
    """Body of a '## title' section of an overview this engine (or an LLM) wrote."""
    m = re.search(rf"^##\s*{re.escape(title)}\s*$(.*?)(?=^##\s|\Z)", text, re.M | re.S)
    return m.group(1).strip() if m else ""


class OfflineEngine:
    """Deterministic rule-based summaries and memory extraction."""

    name = "offline"

    async def summarize(self, request: SummaryRequest,
                        report: RetryReporter = no_report) -> SummaryResponse:
        # CPU-bound and linear in the archive: run off the event loop so a large
        # archive never stalls other RPCs (see docs/phase2.md), through the Phase 2
        # gate when one is bound (fair by identity; sliced at the checkpoints).
        return await run_cpu(lambda: self.summarize_now(request))

    def summarize_now(self, request: SummaryRequest) -> SummaryResponse:
        msgs = list(request.messages)
        users = [m for m in msgs if m.role is Role.USER and m.text().strip()]
        tools = [p for m in msgs for p in m.parts if isinstance(p, ToolPart)]
        topic = _clip(_first_sentence(users[0].text()), 120) if users else "no user text"
        one_line = (f"Archive {request.archive_index} holds {len(msgs)} messages "
                    f"({len(users)} from the user) about: {topic}")
        lines = [f"# Session {request.session_id}: archive {request.archive_index}", "",
                 "## Overview", one_line, "", "## Historical context"]
        lines += self._history(request.previous_overview)
        lines += ["", "## New information"]
        lines += self._new_information(msgs, tools, request.usage)
        lines += ["", "## Key user messages"]
        lines += [f'> "{_clip(m.text(), QUOTE_MAX)}"' for m in users[:SECTION_ITEMS]] or ["- none"]
        open_loops = self._open_loops(msgs, tools)
        lines += ["", "## Open loops"]
        lines += [f"- {x}" for x in open_loops] or ["- none"]
        lines += ["", "## Next step", f"- {self._next_step(msgs, open_loops)}"]
        overview = "\n".join(lines) + "\n"
        return SummaryResponse(overview=overview, abstract=_clip(one_line, ABSTRACT_MAX))

    @staticmethod
    def _history(previous: str) -> list[str]:
        if not previous.strip():
            return ["- none: this is the first completed archive of the session"]
        carried: list[str] = []
        prev_overview = _section(previous, "Overview")
        if prev_overview:
            carried.append(f"- earlier: {_clip(prev_overview, 240)}")
        prev_history = _section(previous, "Historical context")
        for ln in prev_history.splitlines():
            ln = ln.strip()
            if ln.startswith("- earlier:") and len(carried) < 4:
                carried.append(ln)
        prev_loops = _section(previous, "Open loops")
        loops = [ln.strip()[2:] for ln in prev_loops.splitlines()
                 if ln.strip().startswith("- ") and ln.strip() != "- none"]
        if loops:
            carried.append(f"- still open before this archive: {_clip('; '.join(loops), 240)}")
        if not carried:
            carried.append(f"- earlier: {_clip(previous, 240)}")
        return carried

    @staticmethod
    def _new_information(msgs: Sequence[Message], tools: Sequence[ToolPart],
                         usage: Sequence[UsageRecord]) -> list[str]:
        out: list[str] = []
        roles = Counter(m.role.value for m in msgs)
        out.append("- messages: " + ", ".join(f"{n} {r}" for r, n in sorted(roles.items())))
        assistants = [m for m in msgs if m.role is Role.ASSISTANT and m.text().strip()]
        for m in assistants[-3:]:
            out.append(f"- assistant said: {_clip(_first_sentence(m.text()), 160)}")
        if tools:
            by_name = Counter(t.tool_name or t.tool_id for t in tools)
            out.append("- tools called: " + ", ".join(f"{n} x{c}" for n, c in
                                                        sorted(by_name.items())))
        contexts = sorted({p.uri for m in msgs for p in m.parts if isinstance(p, ContextPart)})
        used = sorted({u for rec in usage for u in rec.used_uris()})
        if contexts:
            out.append("- contexts referenced: " + ", ".join(contexts[:SECTION_ITEMS]))
        if used:
            out.append("- contexts and skills used: " + ", ".join(used[:SECTION_ITEMS]))
        return out

    @staticmethod
    def _open_loops(msgs: Sequence[Message], tools: Sequence[ToolPart]) -> list[str]:
        loops: list[str] = []
        last_assistant = max((i for i, m in enumerate(msgs) if m.role is Role.ASSISTANT),
                             default=-1)
        for i, m in enumerate(msgs):
            checkpoint()
            if m.role is Role.USER and m.text().strip().endswith("?"):
                if i > last_assistant:  # no assistant message after it
                    loops.append(f"unanswered: {_clip(m.text(), 160)}")
        for t in tools:
            if t.status in (ToolStatus.PENDING, ToolStatus.RUNNING):
                loops.append(f"tool {t.tool_name or t.tool_id} still {t.status.value}")
            elif t.status is ToolStatus.ERROR:
                loops.append(f"tool {t.tool_name or t.tool_id} failed: {_clip(t.output, 120)}")
        return loops[:SECTION_ITEMS]

    @staticmethod
    def _next_step(msgs: Sequence[Message], loops: Sequence[str]) -> str:
        if loops:
            return f"resolve {loops[0]}"
        if msgs and msgs[-1].role is Role.USER:
            return f"answer the user's last message: {_clip(msgs[-1].text(), 160)}"
        return "continue from the assistant's last reply"

    # ------------------------------------------------------------------ extraction
    async def extract(self, request: ExtractionRequest,
                      report: RetryReporter = no_report) -> ExtractionResponse:
        return await run_cpu(lambda: self.extract_now(request))

    def extract_now(self, request: ExtractionRequest) -> ExtractionResponse:
        out: list[CandidateMemory] = []
        profile_lines: list[str] = []
        profile_ids: list[str] = []
        for m in request.messages:
            checkpoint()
            if m.role is not Role.USER:
                continue
            for sentence in _sentences(m.text()):
                lowered = sentence.lower()
                first_person = "i " in lowered or "i'm" in lowered or "my " in lowered
                for label, cue, rx in _PROFILE:
                    hit = rx.search(sentence) if any(c in lowered for c in cue) else None
                    if hit:
                        profile_lines.append(f"{label}: {_clip(hit.group(1), 120)}")
                        profile_ids.append(m.id)
                for rx in _PREFERENCE if first_person or "always" in lowered else ():
                    hit = rx.search(sentence)
                    if hit:
                        text = _clip(sentence, 240)
                        out.append(CandidateMemory(MemoryCategory.PREFERENCES,
                                                   _key(hit.group("obj")), text, (m.id,)))
                entities = _ENTITY.finditer(sentence) if _ENTITY_CUE.search(lowered) else ()
                for hit in entities:
                    name = hit.group("name")
                    out.append(CandidateMemory(MemoryCategory.ENTITIES, _key(name),
                                               f"{hit.group('kind').lower()} {name}: "
                                               f"{_clip(sentence, 200)}", (m.id,)))
                if _EVENT.search(sentence):
                    out.append(CandidateMemory(MemoryCategory.EVENTS, _key(sentence),
                                               _clip(sentence, 240), (m.id,)))
        if profile_lines:
            out.append(CandidateMemory(MemoryCategory.PROFILE, "profile",
                                       "\n".join(dict.fromkeys(profile_lines)),
                                       tuple(dict.fromkeys(profile_ids))))
        out += self._cases(request.messages)
        out += self._tools_and_skills(request.messages, request.usage)
        return ExtractionResponse(candidates=tuple(out))

    @staticmethod
    def _cases(msgs: Sequence[Message]) -> list[CandidateMemory]:
        out: list[CandidateMemory] = []
        # The next assistant message with text after each position, in one pass
        # from the end (linear in the archive).
        next_reply: list[Message | None] = [None] * len(msgs)
        following: Message | None = None
        for i in range(len(msgs) - 1, -1, -1):
            next_reply[i] = following
            if msgs[i].role is Role.ASSISTANT and msgs[i].text().strip():
                following = msgs[i]
        for i, m in enumerate(msgs):
            checkpoint()
            if m.role is not Role.USER or not _PROBLEM.search(m.text()):
                continue
            reply = next_reply[i]
            if reply is None:
                continue
            problem = _clip(_first_sentence(m.text()), 200)
            solution = _clip(_first_sentence(reply.text()), 200)
            out.append(CandidateMemory(MemoryCategory.CASES, _key(problem),
                                       f"Problem: {problem}\nSolution: {solution}",
                                       (m.id, reply.id)))
        return out

    @staticmethod
    def _tools_and_skills(msgs: Sequence[Message],
                          usage: Sequence[UsageRecord]) -> list[CandidateMemory]:
        out: list[CandidateMemory] = []
        calls: dict[str, list[tuple[ToolPart, str]]] = {}
        for m in msgs:
            checkpoint()
            for p in m.parts:
                if isinstance(p, ToolPart):
                    calls.setdefault(p.tool_name or p.tool_id, []).append((p, m.id))
        for name, items in sorted(calls.items()):
            done = sum(1 for p, _ in items if p.status is ToolStatus.COMPLETED)
            failed = sum(1 for p, _ in items if p.status is ToolStatus.ERROR)
            durations = [p.duration_ms for p, _ in items if p.duration_ms]
            avg = f", about {sum(durations) // len(durations)} ms per call" if durations else ""
            ids = tuple(dict.fromkeys(mid for _, mid in items))
            out.append(CandidateMemory(
                MemoryCategory.TOOLS, _key("tool", name),
                f"tool {name}: {len(items)} calls, {done} completed, {failed} failed{avg}", ids))
            if len(items) >= 2:
                out.append(CandidateMemory(
                    MemoryCategory.PATTERNS, _key("pattern", name),
                    f"calls {name} repeatedly within one task ({len(items)} times)", ids))
            for p, mid in items:
                if p.skill_uri:
                    out.append(CandidateMemory(
                        MemoryCategory.SKILLS, _key("skill", p.skill_uri),
                        f"skill {p.skill_uri} used through tool {name} "
                        f"({p.status.value})", (mid,)))
        for rec in usage:
            if rec.skill is not None and rec.skill.uri:
                outcome = "succeeded" if rec.skill.success else "failed"
                out.append(CandidateMemory(
                    MemoryCategory.SKILLS, _key("skill", rec.skill.uri),
                    f"skill {rec.skill.uri} {outcome}: {_clip(rec.skill.input, 100)} -> "
                    f"{_clip(rec.skill.output, 100)}"))
        return out

    async def aclose(self) -> None:
        return None


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", text) if s.strip()]


# (label, lower-case cues one of which must be in the sentence, pattern): the cues
# skip the regular expression for the many sentences that cannot match. The cue
# words match in any case ("My name is", "i work at"); the captured names must be
# capitalised.
_PROFILE = [
    ("name", ("my name",), re.compile(r"\b(?i:my name is) ([A-Z][\w'-]*(?: [A-Z][\w'-]*)*)")),
    ("name", ("call me",), re.compile(r"\b(?i:call me) ([A-Z][\w'-]*)")),
    ("occupation", ("work",), re.compile(r"\bI (?:work as|am working as) (?:an? )?([^.,;!?]+)",
                                      re.I)),
    ("role", ("i am a", "i'm a"), re.compile(
        r"\bI(?: am|'m) an? ((?:[a-z-]+ ){0,3}(?:engineer|developer|designer|"
                        r"manager|scientist|student|teacher|researcher|analyst|writer|doctor|"
                        r"lawyer|founder|consultant))\b", re.I)),
    ("location", (" in ",), re.compile(r"\b(?i:I (?:live|am based|'m based) in) ([A-Z][^.,;!?]*)")),
    ("employer", ("work",), re.compile(r"\b(?i:I work (?:at|for)) ([A-Z][^.,;!?]*)")),
]

_PREFERENCE = [
    re.compile(r"\bI (?:really )?(?:prefer|like|love|enjoy|want|favou?r) (?P<obj>[^.,;!?]+)", re.I),
    re.compile(r"\bI (?:don't|do not|never) (?:like|want|use) (?P<obj>[^.,;!?]+)", re.I),
    re.compile(r"\bI (?:hate|dislike|avoid) (?P<obj>[^.,;!?]+)", re.I),
    re.compile(r"\b(?:please )?always (?P<obj>[^.,;!?]+)", re.I),
]

_ENTITY = re.compile(r"\b(?P<kind>project|repo|repository|company|team|service|product|"
                     r"library|customer|client) (?:named |called )?(?P<name>[A-Z][\w.-]+)")

_ENTITY_CUE = re.compile(r"project|repo|company|team|service|product|library|customer|client")

_EVENT = re.compile(r"\b(yesterday|today|tomorrow|last (?:week|month|year)|next (?:week|month|"
                    r"year)|on (?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday)|"
                    r"\d{4}-\d{2}-\d{2}|deadline|meeting|launch(?:ed)?|released?|shipped|"
                    r"interview|conference|trip)\b", re.I)

_PROBLEM = re.compile(r"\b(error|fails?|failed|failing|bug|broken|crash(?:es|ed)?|exception|"
                      r"doesn't work|does not work|not working|issue|problem)\b", re.I)
