"""Phase 2: the stages that turn an archive into a summary, memories, relations and
active counts, each made durable with its own stage-completed event.

A stage's writes and the mark that it is done commit together, so a task resumed
after a crash starts at the first stage not done and counts nothing twice. Stages
that are cheap to redo (made in under `HOLD_SECONDS`, no engine tokens) are held and
commit together with the next checkpoint, so the offline engine's whole pipeline
after the claim is one transaction; an LLM stage commits as soon as it is made.
Shutdown is honoured at stage boundaries. A cancel is honoured at stage boundaries
and also interrupts an engine call in flight (an HTTP attempt, a retry's backoff
sleep): nothing of that stage is written and the task ends CANCELLED.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from sessiond.server import failpoints
from sessiond.server.domain.commands import (
    ActiveCountsOutput,
    ExtractionResponse,
    IndexOutput,
    RelationsOutput,
    StageOutput,
)
from sessiond.server.domain.errors import ErrorCode, LeaseLost, NotFound, Unavailable
from sessiond.server.domain.recall import (
    EntryVector,
    RecallEntry,
    message_entry,
    overview_entry,
)
from sessiond.server.domain.rules import utcnow
from sessiond.server.domain.values import (
    PIPELINE,
    CandidateMemory,
    ContextPart,
    EventKind,
    Identity,
    MemoryCounts,
    Message,
    NewEvent,
    Stage,
    Task,
    TaskError,
    TaskEvent,
    ToolPart,
    UsageRecord,
)
from sessiond.server.embedders.base import Embedder
from sessiond.server.observability import logs, metrics, tracing
from sessiond.server.phase2.engines.base import (
    EngineError,
    ExtractionRequest,
    Phase2Engine,
    SummaryRequest,
)
from sessiond.server.phase2.gate import checkpoint, held, run_cpu
from sessiond.server.phase2.sanitize import sanitize
from sessiond.server.store import codec
from sessiond.server.store.base import Store

log = logging.getLogger(__name__)
T = TypeVar("T")
B = TypeVar("B")
R = TypeVar("R")

STAGE_INDEX = {s: i for i, s in enumerate(Stage)}
# Every write of a stage is bounded (it holds the single SQLite writer and a slot of
# the Phase 2 gate, and other identities' writes wait behind it): the index stage
# writes at most INDEX_POSTINGS postings (an entry counts its terms plus one) and at
# most INDEX_BATCH entries per transaction, a few milliseconds of work.
INDEX_BATCH = 200
INDEX_POSTINGS = 100
# Index batches in flight at once (one unit of the Phase 2 gate): the SQLite writer
# commits them in one group-commit transaction, so the index's pages are written
# once per window, not once per batch (a commit of random postings dirties about a
# page per posting); between two windows the gate can hand the slot over.
INDEX_WINDOW = 4
# Entry texts per embedder call.
EMBED_BATCH = 64
# Memories the extract stage merges per transaction, for the same reason.
MEMORY_BATCH = 8
# A stage's output that took less than this to make (and used no engine tokens) does
# not commit on its own: it is held and commits with the next checkpoint, at the
# latest with finalize (one transaction instead of one per stage; a crash redoes at
# most this much work). The journal reads the same either way.
HOLD_SECONDS = 0.1


def used_uris(messages: list[Message], usage: list[UsageRecord]) -> tuple[str, ...]:
    """The contexts and skills the archive used: recorded usage first, then context
    references and skill-backed tool calls in the messages; each uri once."""
    uris: list[str] = []
    for rec in usage:
        uris += rec.used_uris()
    for m in messages:
        for p in m.parts:
            if isinstance(p, ContextPart) and p.uri:
                uris.append(p.uri)
            elif isinstance(p, ToolPart) and p.skill_uri:
                uris.append(p.skill_uri)
    return tuple(dict.fromkeys(uris))


def archive_entries(task: Task, messages: list[Message], overview: str,
                    abstract: str) -> tuple[RecallEntry, ...]:
    """The retrieval index's entries of `task`'s archive."""
    return archive_entries_of(task.identity, task.session_id, task.archive_index, messages,
                              overview, abstract)


def archive_entries_of(owner: Identity, session_id: str, archive_index: int,
                       messages: list[Message], overview: str,
                       abstract: str) -> tuple[RecallEntry, ...]:
    """The retrieval index's entries of an archive: each message with text, and the
    overview with its abstract (sourced from all of the archive's messages)."""
    skey = codec.session_key(owner, session_id)
    out: list[RecallEntry] = []
    for m in messages:
        checkpoint()  # sliced when run through the Phase 2 gate
        if (e := message_entry(owner, skey, session_id, archive_index, m)) is not None:
            out.append(e)
    ov = overview_entry(owner, skey, session_id, archive_index, abstract, overview,
                        tuple(m.id for m in messages),
                        messages[-1].created_at if messages else utcnow())
    if ov is not None:
        out.append(ov)
    return tuple(out)


def postings_batches(entries: Sequence[RecallEntry], postings: int = INDEX_POSTINGS,
                     most: int = INDEX_BATCH) -> list[tuple[RecallEntry, ...]]:
    """`entries` cut in order into batches of at most `postings` postings (an entry
    counts its terms plus one; a larger entry is a batch of its own) and `most`
    entries. At least one batch, maybe empty."""
    out: list[tuple[RecallEntry, ...]] = []
    batch: list[RecallEntry] = []
    size = 0
    for e in entries:
        cost = len(e.term_counts) + 1
        if batch and (size + cost > postings or len(batch) >= most):
            out.append(tuple(batch))
            batch, size = [], 0
        batch.append(e)
        size += cost
    out.append(tuple(batch))
    return out


def with_terms(entries: Sequence[RecallEntry]) -> list[RecallEntry]:
    """`entries` given their terms (those with text and none yet)."""
    out: list[RecallEntry] = []
    for e in entries:
        checkpoint()
        out.append(e if e.term_counts or not e.text.strip() else e.with_terms())
    return out


async def _windowed(batches: Sequence[B], write: Callable[[B], Awaitable[R]]) -> list[R]:
    """Write independent, idempotent `batches`, INDEX_WINDOW at a time, each window
    one unit of the Phase 2 gate (and one group commit of the SQLite writer); what
    each write returned, in order."""
    out: list[R] = []
    for start in range(0, len(batches), INDEX_WINDOW):
        async with held():
            out += await asyncio.gather(*(write(b) for b in batches[start:start + INDEX_WINDOW]))
    return out


async def fail_task(store: Store, worker_id: str, task: Task, error: TaskError) -> None:
    """End `task` FAILED with `error` (a worker that lost its lease only says so)."""
    try:
        await store.fail_task(task.task_id, worker_id, error, utcnow())
        metrics.record_task_finished("failed")
    except LeaseLost:
        log.warning("could not fail %s: lease lost", task.task_id)


@dataclass
class _Run:
    """One attempt at a task: its inputs, what it made so far, and the stages whose
    output is held (made, not yet committed) since the last checkpoint."""

    task: Task
    messages: list[Message]
    usage: list[UsageRecord]
    prev_overview: str
    uris: tuple[str, ...]  # what relations and active_counts both write
    overview: str = ""
    abstract: str = ""
    held: list[tuple[Stage, StageOutput]] = field(default_factory=list)
    since: float = field(default_factory=time.monotonic)


@dataclass
class RunOutcome:
    finished: bool  # reached a terminal state (or lost the lease)


class _Interrupted(Exception):
    """An engine call was stopped because its task was cancelled (or ended) meanwhile."""

    reason = "cancelled"  # the metrics' error reason of the interrupted call


class Phase2Pipeline:
    def __init__(self, store: Store, engine: Phase2Engine, worker_id: str,
                 should_stop: Callable[[], bool] = lambda: False,
                 secrets: tuple[str, ...] = (), embedder: Embedder | None = None,
                 cancel_poll_seconds: float = 1.0) -> None:
        self.store = store
        self.embedder = embedder
        self.engine = engine
        self.worker_id = worker_id
        self.should_stop = should_stop
        self.secrets = secrets
        # Seconds between store reads that look for a cancel while an engine call runs
        # (a cancel made through this process is seen at once, through its event).
        self.cancel_poll_seconds = cancel_poll_seconds
        self._cancel_signals: dict[str, asyncio.Event] = {}
        self._runs: dict[str, _Run] = {}  # the attempts running now, by task id
        store.add_event_listener(self._on_events)
        store.add_remote_event_listener(self._on_remote_event)

    def _on_events(self, events: Sequence[TaskEvent]) -> None:
        for ev in events:
            signal = self._cancel_signals.get(ev.task_id)
            if signal is not None and (ev.kind is EventKind.CANCEL_REQUESTED
                                       or ev.kind.terminal):
                signal.set()

    def _on_remote_event(self, task_id: str) -> None:
        signal = self._cancel_signals.get(task_id)
        if signal is not None:
            signal.set()  # another process wrote to its journal: look at the task

    async def _interruptible(self, task: Task, call: Awaitable[T]) -> T:
        """Run an engine call; when the task is cancelled (or ends) meanwhile, stop
        the call and raise `_Interrupted`."""
        signal = self._cancel_signals.setdefault(task.task_id, asyncio.Event())
        work = asyncio.ensure_future(call)
        try:
            while True:
                waiter = asyncio.ensure_future(signal.wait())
                try:
                    await asyncio.wait({work, waiter}, timeout=self.cancel_poll_seconds,
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                if work.done():
                    return work.result()
                signal.clear()
                now = await self.store.get_task(task.task_id)
                if now is None or now.cancel_requested or now.state.terminal:
                    work.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await work
                    raise _Interrupted
        finally:
            if not work.done():
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await work
            self._cancel_signals.pop(task.task_id, None)

    async def run(self, task: Task, announced: bool = False) -> RunOutcome:
        """Run the stages after `task.done_stage`; `announced` when the claim already
        appended STAGE_STARTED for the first of them. Returns finished=False when it
        stopped for shutdown or a store outage (the worker hands the task back)."""
        with logs.bind(task_id=task.task_id, session_id=task.session_id):
            return await self._run_logged(task, announced)

    async def _run_logged(self, task: Task, announced: bool) -> RunOutcome:
        try:
            with tracing.task_span(task):
                return await self._run(task, announced)
        except _Interrupted:
            try:
                await self.store.cancel_task(task.task_id, self.worker_id, utcnow())
            except (LeaseLost, NotFound):
                await self._lease_lost(task.task_id)
            return RunOutcome(True)
        except LeaseLost:
            await self._lease_lost(task.task_id)
            return RunOutcome(True)
        except Unavailable as exc:
            # The store is unreachable: not the task's fault. Hand it back unfinished;
            # it resumes from its last finished stage once the store answers again.
            log.warning("Phase 2 of %s paused, store unavailable: %s", task.task_id, exc)
            return RunOutcome(False)
        except EngineError as exc:
            await self._fail(task, TaskError(code=engine_code(exc), reason=exc.reason,
                                             message=sanitize(str(exc), self.secrets)))
            return RunOutcome(True)
        except NotFound as exc:
            await self._fail(task, TaskError(code=ErrorCode.NOT_FOUND, reason=exc.reason,
                                             message=sanitize(exc.message, self.secrets)))
            return RunOutcome(True)
        except Exception as exc:
            log.exception("Phase 2 of %s failed", task.task_id)
            msg = sanitize(f"{type(exc).__name__}: {exc}", self.secrets)
            await self._fail(task, TaskError(code=ErrorCode.INTERNAL, reason="INTERNAL",
                                             message=msg))
            return RunOutcome(True)

    async def _lease_lost(self, task_id: str) -> None:
        """Say why this worker may no longer write for the task: it was cancelled or
        ended meanwhile (DeleteSession cancels a session's tasks), it was removed, its
        lease expired, or another worker took it over."""
        try:
            now = await self.store.get_task(task_id)
        except Exception as exc:
            log.warning("stopped Phase 2 of %s: lease lost (its state cannot be read: %s)",
                        task_id, exc)
            return
        if now is None:
            log.info("stopped Phase 2 of %s: the task was removed meanwhile", task_id)
        elif now.state.terminal:
            why = f" ({now.error.message})" if now.error is not None else ""
            log.info("stopped Phase 2 of %s: the task ended %s meanwhile%s", task_id,
                     now.state.value, why)
        elif now.lease_owner and now.lease_owner != self.worker_id:
            log.warning("lost the lease of %s; worker %s owns it now", task_id,
                        now.lease_owner)
        else:
            log.warning("lost the lease of %s: it expired before this worker renewed it",
                        task_id)

    async def _fail(self, task: Task, error: TaskError) -> None:
        await fail_task(self.store, self.worker_id, task, error)

    async def _run(self, task: Task, announced: bool) -> RunOutcome:
        store, ident = self.store, task.identity
        async with held():  # decoding a large archive is CPU work too
            inputs = await store.phase2_inputs(ident, task.session_id, task.archive_index)
        if not inputs.messages:
            raise NotFound(f"archive {task.archive_uri} has no messages (session deleted?)",
                           reason="ARCHIVE_NOT_FOUND")
        run = _Run(task, inputs.messages, inputs.usage, inputs.previous_overview,
                   used_uris(inputs.messages, inputs.usage))
        self._runs[task.task_id] = run
        try:
            return await self._stages(run, announced)
        finally:
            self._runs.pop(task.task_id, None)

    async def _stages(self, run: _Run, announced: bool) -> RunOutcome:
        store, task = self.store, run.task
        # Whether this stage was already announced (by the claim or the previous stage).
        started = announced and not task.cancel_requested
        for i, stage in enumerate(PIPELINE):
            if STAGE_INDEX[stage] <= STAGE_INDEX[task.done_stage]:
                continue
            if not started and task.cancel_requested:
                # Requested before this attempt started; later requests are honoured by
                # complete_stages at the boundary it crosses (no extra read per stage).
                await store.cancel_task(task.task_id, self.worker_id, utcnow())
                metrics.record_task_finished("cancelled")
                return RunOutcome(True)
            if self.should_stop():
                # Keep what was made: held stages commit before the task is handed back.
                if run.held and (await self._flush(run, stage)).state.terminal:
                    metrics.record_task_finished("cancelled")
                    return RunOutcome(True)
                return RunOutcome(False)
            if not started:
                await store.append_event(task.task_id, self.worker_id,
                                         NewEvent(EventKind.STAGE_STARTED,
                                                  f"{stage.value} started"), stage, utcnow())
            with metrics.stage_timer(stage.value), \
                    tracing.span(f"stage {stage.value}", {"sessiond.stage": stage.value}):
                failpoints.hit(f"phase2.{stage.value}.before")
                if stage is Stage.FINALIZE:
                    last = await self._flush(run, Stage.FINALIZE, finalize=True)
                    if last.kind is not EventKind.COMPLETED:  # cancelled at a boundary
                        metrics.record_task_finished("cancelled")
                        return RunOutcome(True)
                    metrics.record_task_finished("completed")
                    failpoints.hit("phase2.finalize.after")
                    return RunOutcome(True)
                try:
                    output = await self._output(run, stage)
                except _Interrupted:
                    # Cancelled: held stages commit first, and the boundary they cross
                    # ends the task (the journal says after which stage).
                    if run.held and (await self._flush(run, stage)).state.terminal:
                        metrics.record_task_finished("cancelled")
                        return RunOutcome(True)
                    raise
                except (EngineError, NotFound):
                    # The failure is this stage's: held stages commit before it is told.
                    with contextlib.suppress(Exception):
                        await self._flush(run, stage)
                    raise
                run.held.append((stage, output))
                following = PIPELINE[i + 1]
                if self._checkpoint_due(run, output, following):
                    if (await self._flush(run, following)).state.terminal:
                        metrics.record_task_finished("cancelled")  # at this boundary
                        return RunOutcome(True)
                started = True
        return RunOutcome(True)

    def _checkpoint_due(self, run: _Run, output: StageOutput, following: Stage) -> bool:
        """Whether the held stages must commit now rather than with the next stage's:
        when they took `HOLD_SECONDS` or more to make, when this one used engine tokens
        (paid work is never redone), or when the next stage embeds the archive's
        memories (it reads them from the store)."""
        usage = getattr(output, "usage", None)
        return (time.monotonic() - run.since >= HOLD_SECONDS
                or (usage is not None and usage.total_tokens > 0)
                or (following is Stage.INDEX
                    and (self.embedder is not None
                         or (isinstance(output, ExtractionResponse)
                             and bool(output.candidates)))))

    async def _flush(self, run: _Run, following: Stage, finalize: bool = False) -> TaskEvent:
        """Commit the held stages' writes and events in one transaction, crossing into
        `following` (with `finalize`, the task is finalized in it too); their `after`
        failpoints are hit once they are durable."""
        flushed = [s for s, _ in run.held]
        async with held():
            last = await self.store.complete_stages(run.task.task_id, self.worker_id,
                                                    run.held, utcnow(), next_stage=following,
                                                    finalize=finalize)
        run.held = []
        run.since = time.monotonic()
        for s in flushed:
            failpoints.hit(f"phase2.{s.value}.after")
        return last

    async def flush_held(self, task_id: str, following: Stage) -> None:
        """Commit what a running task holds before an event of `following` (a retry's)
        is appended to its journal, so the journal stays in stage order."""
        run = self._runs.get(task_id)
        if run is not None and run.held:
            await self._flush(run, following)

    async def _output(self, run: _Run, stage: Stage) -> StageOutput:
        """Make one stage's output (engine calls, entries, vectors); nothing of it is
        written here but the early batches of a large extraction or index."""
        task = run.task
        reporter = self._reporter(task, stage)
        engine_attrs = {"sessiond.engine": self.engine.name}
        if stage is Stage.SUMMARIZE:
            with metrics.engine_call(self.engine.name, "summarize") as tokens, \
                    tracing.span("engine summarize", engine_attrs):
                summary = await self._interruptible(task, self.engine.summarize(
                    SummaryRequest(session_id=task.session_id,
                                   archive_index=task.archive_index,
                                   messages=run.messages, previous_overview=run.prev_overview,
                                   usage=run.usage), reporter))
                tokens(summary.usage.prompt_tokens, summary.usage.completion_tokens)
            run.overview, run.abstract = summary.overview, summary.abstract
            return summary
        if stage is Stage.EXTRACT:
            if not run.overview:
                run.overview, run.abstract = await self._saved_summary(task)
            with metrics.engine_call(self.engine.name, "extract") as tokens, \
                    tracing.span("engine extract", engine_attrs):
                extracted = await self._interruptible(task, self.engine.extract(
                    ExtractionRequest(session_id=task.session_id,
                                      archive_uri=task.archive_uri, messages=run.messages,
                                      previous_overview=run.prev_overview,
                                      overview=run.overview, usage=run.usage), reporter))
                tokens(extracted.usage.prompt_tokens, extracted.usage.completion_tokens)
            return await self._upsert_batches(task, extracted)
        if stage is Stage.INDEX:
            if not run.overview:
                run.overview, run.abstract = await self._saved_summary(task)
            return await self._index(task, run.messages, run.overview, run.abstract)
        if stage is Stage.RELATIONS:
            return RelationsOutput(run.uris)
        return ActiveCountsOutput(run.uris)

    async def _upsert_batches(self, task: Task, out: ExtractionResponse) -> ExtractionResponse:
        """All but the last MEMORY_BATCH candidates (one per memory key, in key order)
        merged in transactions of their own, so that a large extraction never holds
        the store's writer for long; the rest commits with the stage's done mark."""
        first: dict[tuple[str, str], CandidateMemory] = {}
        for cand in out.candidates:
            first.setdefault((cand.category.value, codec.clean_text(cand.key)), cand)
        ordered = [first[k] for k in sorted(first)]
        head = len(ordered) - MEMORY_BATCH if len(ordered) > MEMORY_BATCH else 0
        counts = MemoryCounts()
        batches = [ordered[start:min(start + MEMORY_BATCH, head)]
                   for start in range(0, head, MEMORY_BATCH)]
        # Windowed as the index's batches. Each batch takes its keys' locks in key order
        # and the batches are consecutive key ranges, so concurrent ones cannot
        # deadlock (PostgreSQL).
        for got in await _windowed(batches, lambda b: self.store.upsert_memories(
                task.task_id, self.worker_id, b, utcnow())):
            counts += got
        return ExtractionResponse(tuple(ordered[head:]), out.usage, earlier=counts)

    async def _saved_summary(self, task: Task) -> tuple[str, str]:
        """The overview and abstract a previous attempt's summarize stage stored."""
        arch = await self.store.get_archive(task.identity, task.session_id, task.archive_index)
        return (arch.overview, arch.abstract) if arch is not None else ("", "")

    async def _index(self, task: Task, messages: list[Message], overview: str,
                     abstract: str) -> IndexOutput:
        """Entries (and their terms) are made off the event loop; all but the last
        batch are written in transactions of their own so that a large archive never
        holds the store's writer for long. Entry ids are deterministic, so batches
        written before a crash are not written twice; the last batch commits with the
        stage's done mark. With an embedder, every entry (the archive's memories
        included) gets its vector, embedded before any write; vectors a previous
        attempt stored are not embedded again."""
        entries = await run_cpu(lambda: archive_entries(task, messages, overview, abstract))
        vectors = await self._embed(task, entries) if self.embedder is not None else []
        *early_batches, last = postings_batches(entries)
        await _windowed(early_batches, self.store.index_entries)
        # The memories the extraction wrote (committed before this stage): their
        # entries, terms made here, written ahead in bounded batches too; the last
        # transaction then finds them current (and indexes any changed meanwhile).
        async with held():
            memory = await self.store.archive_memory_entries(task)
        if memory:
            prepared = await run_cpu(lambda: with_terms(memory))
            await _windowed(postings_batches(prepared),
                            lambda batch: self.store.index_memory_entries(task, batch))
        model = self.embedder.model if self.embedder is not None else ""
        written = {e.entry_id for b in early_batches for e in b}
        early = [v for v in vectors if v.entry.entry_id in written]
        for start in range(0, len(early), INDEX_BATCH):
            async with held():
                await self.store.index_vectors(model, early[start:start + INDEX_BATCH])
        return IndexOutput(last, tuple(v for v in vectors if v.entry.entry_id not in written),
                           model, len(entries), len(vectors))

    async def _embed(self, task: Task, entries: tuple[RecallEntry, ...]) -> list[EntryVector]:
        assert self.embedder is not None
        model = self.embedder.model
        todo = [e for e in (*entries, *await self.store.archive_memory_entries(task))
                if e.text.strip()]
        have = await self.store.vectors_present(model, [e.entry_id for e in todo])
        todo = [e for e in todo if e.entry_id not in have]
        out: list[EntryVector] = []
        for start in range(0, len(todo), EMBED_BATCH):
            chunk = todo[start:start + EMBED_BATCH]
            with metrics.embedding_call(model, "index", len(chunk)), \
                    tracing.span("embed", {"sessiond.embedder": metrics.embedder_label(model)}):
                vecs = await self._interruptible(
                    task, self.embedder.embed([e.text for e in chunk]))
            out += [EntryVector(e, tuple(v)) for e, v in zip(chunk, vecs, strict=True)]
        return out

    def _reporter(self, task: Task, stage: Stage) -> RetryReporterImpl:
        return RetryReporterImpl(self, task, stage)


class RetryReporterImpl:
    """Turns an engine's retry into a RETRYING journal event."""

    def __init__(self, pipeline: Phase2Pipeline, task: Task, stage: Stage) -> None:
        self.pipeline = pipeline
        self.task = task
        self.stage = stage

    async def __call__(self, attempt: int, max_attempts: int, reason: str) -> None:
        safe = sanitize(reason, self.pipeline.secrets)
        metrics.record_engine_retry(self.pipeline.engine.name, self.stage.value, safe)
        tracing.add_event("retry", {"sessiond.attempt": attempt,
                                    "sessiond.max_attempts": max_attempts,
                                    "sessiond.reason": safe})
        msg = (f"retrying {self.stage.value}, attempt {attempt} of {max_attempts}, after "
               f"{safe}")
        await self.pipeline.flush_held(self.task.task_id, self.stage)
        await self.pipeline.store.append_event(
            self.task.task_id, self.pipeline.worker_id,
            NewEvent(EventKind.RETRYING, msg, attempt=attempt), self.stage, utcnow())


def engine_code(exc: EngineError) -> ErrorCode:
    """The google.rpc code of a failed stage: what a watcher should make of it."""
    reason = exc.reason.removeprefix("LLM_").removeprefix("EMBEDDER_")  # same meanings
    if reason == "TIMEOUT":
        return ErrorCode.DEADLINE_EXCEEDED
    if reason in ("UNAVAILABLE", "RATE_LIMITED"):
        return ErrorCode.UNAVAILABLE
    if reason in ("AUTH", "BAD_REQUEST"):
        return ErrorCode.FAILED_PRECONDITION  # the engine's configuration must change
    return ErrorCode.INTERNAL
