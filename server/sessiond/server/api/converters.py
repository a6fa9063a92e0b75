"""Protobuf <-> domain conversion. Nothing else in the server touches protobuf."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from google.protobuf import timestamp_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from sessiond.server.domain import rules
from sessiond.server.domain.autocommit import (
    AutoCommitPolicy,
    CommitTrigger,
    SessionEvent,
    SessionEventKind,
)
from sessiond.server.domain.commands import AddedMessage, NewMessage
from sessiond.server.domain.errors import FieldViolation, InvalidArgument
from sessiond.server.domain.history import ChangeOp, MemoryChange
from sessiond.server.domain.recall import RecallKind, RecallResult
from sessiond.server.domain.values import (
    Archive,
    ArchiveState,
    CommitResult,
    ContextPart,
    ContextType,
    EventKind,
    Memory,
    MemoryCategory,
    MemoryCounts,
    Message,
    Part,
    Role,
    SessionMeta,
    SkillUse,
    Task,
    TaskError,
    TaskEvent,
    TaskState,
    TextPart,
    TokenUsage,
    ToolPart,
    ToolStatus,
    archive_uri,
)
from sessiond.v1 import common_pb2, memory_pb2, session_pb2, task_pb2

_ROLE_IN: dict[int, Role] = {
    session_pb2.ROLE_USER: Role.USER, session_pb2.ROLE_ASSISTANT: Role.ASSISTANT,
    session_pb2.ROLE_SYSTEM: Role.SYSTEM, session_pb2.ROLE_TOOL: Role.TOOL}
_ROLE_OUT: dict[Role, Any] = {v: k for k, v in _ROLE_IN.items()}
_CTX_IN: dict[int, ContextType] = {session_pb2.CONTEXT_TYPE_MEMORY: ContextType.MEMORY,
           session_pb2.CONTEXT_TYPE_RESOURCE: ContextType.RESOURCE,
           session_pb2.CONTEXT_TYPE_SKILL: ContextType.SKILL}
_CTX_OUT: dict[ContextType, Any] = {v: k for k, v in _CTX_IN.items()}
_TOOL_IN: dict[int, ToolStatus] = {session_pb2.TOOL_STATUS_PENDING: ToolStatus.PENDING,
            session_pb2.TOOL_STATUS_RUNNING: ToolStatus.RUNNING,
            session_pb2.TOOL_STATUS_COMPLETED: ToolStatus.COMPLETED,
            session_pb2.TOOL_STATUS_ERROR: ToolStatus.ERROR}
_TOOL_OUT: dict[ToolStatus, Any] = {v: k for k, v in _TOOL_IN.items()}
_STATE_OUT: dict[TaskState, Any] = {TaskState.PENDING: task_pb2.TASK_STATE_PENDING,
              TaskState.RUNNING: task_pb2.TASK_STATE_RUNNING,
              TaskState.COMPLETED: task_pb2.TASK_STATE_COMPLETED,
              TaskState.FAILED: task_pb2.TASK_STATE_FAILED,
              TaskState.CANCELLED: task_pb2.TASK_STATE_CANCELLED}
_STATE_IN: dict[int, TaskState] = {v: k for k, v in _STATE_OUT.items()}
_KIND_OUT: dict[EventKind, Any] = {EventKind.CREATED: task_pb2.TASK_EVENT_KIND_CREATED,
             EventKind.STARTED: task_pb2.TASK_EVENT_KIND_STARTED,
             EventKind.STAGE_STARTED: task_pb2.TASK_EVENT_KIND_STAGE_STARTED,
             EventKind.STAGE_COMPLETED: task_pb2.TASK_EVENT_KIND_STAGE_COMPLETED,
             EventKind.RETRYING: task_pb2.TASK_EVENT_KIND_RETRYING,
             EventKind.CANCEL_REQUESTED: task_pb2.TASK_EVENT_KIND_CANCEL_REQUESTED,
             EventKind.COMPLETED: task_pb2.TASK_EVENT_KIND_COMPLETED,
             EventKind.FAILED: task_pb2.TASK_EVENT_KIND_FAILED,
             EventKind.CANCELLED: task_pb2.TASK_EVENT_KIND_CANCELLED,
             EventKind.RETRIED: task_pb2.TASK_EVENT_KIND_RETRIED}
_CAT_IN: dict[int, MemoryCategory] = {memory_pb2.MEMORY_CATEGORY_PROFILE: MemoryCategory.PROFILE,
           memory_pb2.MEMORY_CATEGORY_PREFERENCES: MemoryCategory.PREFERENCES,
           memory_pb2.MEMORY_CATEGORY_ENTITIES: MemoryCategory.ENTITIES,
           memory_pb2.MEMORY_CATEGORY_EVENTS: MemoryCategory.EVENTS,
           memory_pb2.MEMORY_CATEGORY_CASES: MemoryCategory.CASES,
           memory_pb2.MEMORY_CATEGORY_PATTERNS: MemoryCategory.PATTERNS,
           memory_pb2.MEMORY_CATEGORY_TOOLS: MemoryCategory.TOOLS,
           memory_pb2.MEMORY_CATEGORY_SKILLS: MemoryCategory.SKILLS}
_CAT_OUT: dict[MemoryCategory, Any] = {v: k for k, v in _CAT_IN.items()}
_TRIGGER_OUT: dict[CommitTrigger, Any] = {CommitTrigger.MANUAL: task_pb2.COMMIT_TRIGGER_MANUAL,
                CommitTrigger.MESSAGES: task_pb2.COMMIT_TRIGGER_MESSAGES,
                CommitTrigger.TOKENS: task_pb2.COMMIT_TRIGGER_TOKENS,
                CommitTrigger.IDLE: task_pb2.COMMIT_TRIGGER_IDLE}
_SKIND_OUT: dict[SessionEventKind, Any] = {
    SessionEventKind.MESSAGE_APPENDED: session_pb2.SESSION_EVENT_KIND_MESSAGE_APPENDED,
    SessionEventKind.COMMIT_ACCEPTED: session_pb2.SESSION_EVENT_KIND_COMMIT_ACCEPTED,
    SessionEventKind.TASK_EVENT: session_pb2.SESSION_EVENT_KIND_TASK_EVENT,
    SessionEventKind.CONFIG_CHANGED: session_pb2.SESSION_EVENT_KIND_CONFIG_CHANGED}


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def ts(dt: datetime | None) -> timestamp_pb2.Timestamp | None:
    """The exact Timestamp of an aware datetime (naive ones are taken as UTC, as
    `Timestamp.FromDatetime` does), from integer arithmetic: several times cheaper
    than FromDatetime (time tuple + calendar.timegm), once per reply at least."""
    if dt is None:
        return None
    d = (dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)) - _EPOCH
    return timestamp_pb2.Timestamp(seconds=d.days * 86400 + d.seconds,
                                   nanos=d.microseconds * 1000)


_RKIND_IN: dict[int, RecallKind] = {memory_pb2.RECALL_KIND_MEMORY: RecallKind.MEMORY,
                                   memory_pb2.RECALL_KIND_OVERVIEW: RecallKind.OVERVIEW,
                                   memory_pb2.RECALL_KIND_MESSAGE: RecallKind.MESSAGE}
_RKIND_OUT: dict[RecallKind, Any] = {v: k for k, v in _RKIND_IN.items()}


# ---------------------------------------------------------------------- in
def ts_in(value: timestamp_pb2.Timestamp, field: str = "time") -> datetime:
    """A protobuf Timestamp as an aware datetime (INVALID_ARGUMENT when out of range)."""
    try:
        return value.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError) as exc:
        raise InvalidArgument(f"{field} is not a valid timestamp", violations=[
            FieldViolation(field, "seconds and nanos out of the Timestamp range")]) from exc


def created_at_in(holder: Any, field: str = "created_at") -> datetime | None:
    """A message's own created_at, None when unset."""
    return ts_in(holder.created_at, field) if holder.HasField("created_at") else None


def policy_in(p: session_pb2.AutoCommitPolicy) -> AutoCommitPolicy:
    return AutoCommitPolicy(max_messages=p.max_messages, max_tokens=p.max_tokens,
                            idle_seconds=p.idle_seconds, keep_recent_count=p.keep_recent_count)


def config_in(req: session_pb2.UpdateSessionConfigRequest) -> AutoCommitPolicy | None:
    """The session's new own policy, or None for reset_auto_commit."""
    given = req.HasField("auto_commit")
    if given == req.reset_auto_commit:
        raise InvalidArgument("set exactly one of auto_commit and reset_auto_commit",
                              violations=[FieldViolation(
                                  "auto_commit", "give a policy, or set reset_auto_commit "
                                  "to use the server default (not both)")])
    return policy_in(req.auto_commit) if given else None


def recall_kinds_in(values: Sequence[int]) -> tuple[RecallKind, ...]:
    out: list[RecallKind] = []
    for i, v in enumerate(values):
        kind = _RKIND_IN.get(v)
        if kind is None:
            raise InvalidArgument("unknown recall kind", violations=[
                FieldViolation(f"kinds[{i}]", "one of RECALL_KIND_MEMORY, _OVERVIEW, _MESSAGE")])
        out.append(kind)
    return tuple(out)


def role_in(value: int) -> Role:
    role = _ROLE_IN.get(value)
    if role is None:
        raise InvalidArgument("role is required", violations=[
            FieldViolation("role", "one of ROLE_USER, ROLE_ASSISTANT, ROLE_SYSTEM, ROLE_TOOL")])
    return role


def tool_status_in(value: int, field: str = "status") -> ToolStatus:
    st = _TOOL_IN.get(value)
    if st is None:
        raise InvalidArgument(f"{field} is required", violations=[
            FieldViolation(field, "one of TOOL_STATUS_PENDING, _RUNNING, _COMPLETED, _ERROR")])
    return st


def parts_in(parts: list[session_pb2.Part]) -> list[Part]:
    out: list[Part] = []
    violations: list[FieldViolation] = []
    for i, p in enumerate(parts):
        kind = p.WhichOneof("kind")
        if kind == "text":
            out.append(TextPart(p.text.text))
        elif kind == "context":
            ctype = _CTX_IN.get(p.context.context_type)
            if ctype is None:
                violations.append(FieldViolation(f"parts[{i}].context.context_type",
                                                 "one of MEMORY, RESOURCE, SKILL"))
                continue
            out.append(ContextPart(p.context.uri, ctype, p.context.abstract))
        elif kind == "tool":
            t = p.tool
            status = _TOOL_IN.get(t.status, ToolStatus.PENDING)
            out.append(ToolPart(tool_id=t.tool_id, tool_name=t.tool_name, tool_uri=t.tool_uri,
                                skill_uri=t.skill_uri, input=t.input, output=t.output,
                                status=status, duration_ms=t.duration_ms,
                                prompt_tokens=t.prompt_tokens,
                                completion_tokens=t.completion_tokens))
        else:
            violations.append(FieldViolation(f"parts[{i}]", "set one of text, context, tool"))
    if violations:
        raise InvalidArgument("message parts are not valid", violations=violations)
    return out


def skill_in(req: session_pb2.RecordUsageRequest) -> SkillUse | None:
    if not req.HasField("skill"):
        return None
    if not req.skill.uri:
        raise InvalidArgument("skill.uri is required when a skill is given",
                              violations=[FieldViolation("skill.uri", "must not be empty")])
    return SkillUse(req.skill.uri, req.skill.input, req.skill.output, req.skill.success)


def state_in(value: int) -> TaskState | None:
    if value == task_pb2.TASK_STATE_UNSPECIFIED:
        return None
    st = _STATE_IN.get(value)
    if st is None:
        raise InvalidArgument("unknown task state", violations=[
            FieldViolation("state", f"unknown value {value}")])
    return st


def category_in(value: int) -> MemoryCategory | None:
    if value == memory_pb2.MEMORY_CATEGORY_UNSPECIFIED:
        return None
    cat = _CAT_IN.get(value)
    if cat is None:
        raise InvalidArgument("unknown memory category", violations=[
            FieldViolation("category", f"unknown value {value}")])
    return cat


# ---------------------------------------------------------------------- out
def counts_out(c: MemoryCounts) -> common_pb2.MemoryCounts:
    return common_pb2.MemoryCounts(total=c.total, **c.as_dict())


def usage_out(u: TokenUsage) -> common_pb2.TokenUsage:
    return common_pb2.TokenUsage(prompt_tokens=u.prompt_tokens,
                                 completion_tokens=u.completion_tokens,
                                 total_tokens=u.total_tokens)


def policy_out(p: AutoCommitPolicy | None) -> session_pb2.AutoCommitPolicy:
    p = p or AutoCommitPolicy()
    return session_pb2.AutoCommitPolicy(max_messages=p.max_messages, max_tokens=p.max_tokens,
                                        idle_seconds=p.idle_seconds,
                                        keep_recent_count=p.keep_recent_count)


def session_out(m: SessionMeta) -> session_pb2.Session:
    return session_pb2.Session(
        session_id=m.session_id, created_at=ts(m.created_at), updated_at=ts(m.updated_at),
        message_count=m.message_count, commit_count=m.commit_count,
        memories_extracted=counts_out(m.memories_extracted),
        last_commit_at=ts(m.last_commit_at), llm_token_usage=usage_out(m.llm_token_usage),
        live_message_count=m.live_message_count, archive_count=m.archive_count,
        auto_commit=policy_out(m.auto_commit), auto_commit_inherited=m.auto_commit_inherited,
        last_event_seq=m.last_event_seq)


def session_event_out(e: SessionEvent) -> session_pb2.SessionEvent:
    out = session_pb2.SessionEvent(session_id=e.session_id, seq=e.seq, kind=_SKIND_OUT[e.kind],
                                   time=ts(e.time))
    if e.kind is SessionEventKind.MESSAGE_APPENDED:
        out.message_id, out.message_seq = e.message_id, e.message_seq
        out.client_message_id = e.client_message_id
        if e.role is not None:
            out.role = _ROLE_OUT[e.role]
    elif e.kind is SessionEventKind.COMMIT_ACCEPTED:
        out.task_id, out.archive_index = e.task_id, e.archive_index
        out.archive_uri = archive_uri(e.session_id, e.archive_index)
        out.archived_messages = e.archived_messages
        if e.trigger is not None:
            out.trigger = _TRIGGER_OUT[e.trigger]
    elif e.kind is SessionEventKind.TASK_EVENT:
        out.task_id, out.task_seq = e.task_id, e.task_seq
        if e.task_event is not None:
            out.task_event.CopyFrom(event_out(e.task_event))
    else:
        out.auto_commit.CopyFrom(policy_out(e.auto_commit))
        out.auto_commit_inherited = e.auto_commit_inherited
    return out


def part_into(out: session_pb2.Part, p: Part) -> None:
    """Fill `out` (a new, empty Part) with `p`, in place."""
    if isinstance(p, TextPart):
        out.text.text = p.text
    elif isinstance(p, ContextPart):
        c = out.context
        c.uri, c.context_type, c.abstract = p.uri, _CTX_OUT[p.context_type], p.abstract
    else:
        t = out.tool
        t.tool_id, t.tool_name, t.tool_uri, t.skill_uri = (p.tool_id, p.tool_name,
                                                            p.tool_uri, p.skill_uri)
        t.input, t.output, t.status, t.duration_ms = (p.input, p.output, _TOOL_OUT[p.status],
                                                      p.duration_ms)
        t.prompt_tokens, t.completion_tokens = p.prompt_tokens, p.completion_tokens


def part_out(p: Part) -> session_pb2.Part:
    out = session_pb2.Part()
    part_into(out, p)
    return out


def message_into(out: session_pb2.Message, m: Message) -> None:
    """Fill `out` (a new, empty Message, e.g. a reply's field) with `m`, in place: no
    intermediate messages copied into their parents (a part's text would be copied
    twice)."""
    out.id, out.role, out.seq = m.id, _ROLE_OUT[m.role], m.seq
    if m.client_message_id:
        out.client_message_id = m.client_message_id
    for p in m.parts:
        part_into(out.parts.add(), p)
    created = ts(m.created_at)
    if created is not None:
        out.created_at.CopyFrom(created)


def message_out(m: Message) -> session_pb2.Message:
    out = session_pb2.Message()
    message_into(out, m)
    return out


def new_messages_in(items: list[session_pb2.NewMessage]) -> list[NewMessage]:
    """The batch of AddMessages; an invalid item is INVALID_ARGUMENT naming its index."""
    out: list[NewMessage] = []
    for i, m in enumerate(items):
        try:
            out.append(NewMessage(role_in(m.role), tuple(parts_in(list(m.parts))),
                                  m.client_message_id, created_at_in(m)))
        except InvalidArgument as exc:
            raise rules.at_index(f"messages[{i}]", exc) from None
    return out


def added_out(a: AddedMessage) -> session_pb2.AddedMessage:
    out = session_pb2.AddedMessage(duplicate=a.duplicate)
    message_into(out.message, a.message)
    return out


def add_message_reply(a: AddedMessage) -> session_pb2.AddMessageResponse:
    out = session_pb2.AddMessageResponse(duplicate=a.duplicate)
    message_into(out.message, a.message)
    return out


def archive_out(a: Archive, messages: list[Message] | None = None) -> session_pb2.Archive:
    return session_pb2.Archive(
        archive_uri=a.uri, session_id=a.session_id, index=a.index,
        state=(session_pb2.ARCHIVE_STATE_DONE if a.state is ArchiveState.DONE
               else session_pb2.ARCHIVE_STATE_PENDING),
        overview=a.overview, abstract=a.abstract, task_id=a.task_id,
        message_count=a.message_count, first_message_id=a.first_message_id,
        last_message_id=a.last_message_id, created_at=ts(a.created_at),
        completed_at=ts(a.completed_at),
        messages=[message_out(m) for m in messages or []])


def result_out(r: CommitResult | None) -> task_pb2.CommitResult | None:
    if r is None:
        return None
    out = task_pb2.CommitResult(memories_extracted=counts_out(r.memories_extracted),
                                active_count_updated=r.active_count_updated,
                                token_usage=usage_out(r.token_usage), archive_uri=r.archive_uri)
    if r.revert is not None:
        out.revert.CopyFrom(task_pb2.RevertResult(**r.revert.as_dict()))
    return out


def error_out(e: TaskError | None) -> status_pb2.Status | None:
    """A task's error as google.rpc.Status, with an ErrorInfo naming the reason."""
    if e is None:
        return None
    st = status_pb2.Status(code=getattr(code_pb2, e.code.name), message=e.message)
    if e.reason:
        st.details.add().Pack(error_details_pb2.ErrorInfo(reason=e.reason, domain="sessiond.v1"))
    return st


def task_out(t: Task) -> task_pb2.Task:
    return task_pb2.Task(
        task_id=t.task_id, task_type=t.task_type, session_id=t.session_id,
        archive_uri=t.archive_uri, state=_STATE_OUT[t.state], stage=t.stage.value,
        created_at=ts(t.created_at), started_at=ts(t.started_at), updated_at=ts(t.updated_at),
        finished_at=ts(t.finished_at), result=result_out(t.result), error=error_out(t.error),
        attempts=t.attempts, last_seq=t.last_seq, cancel_requested=t.cancel_requested,
        retries=t.retries, commit_trigger=_TRIGGER_OUT[t.trigger])


def event_out(e: TaskEvent) -> task_pb2.TaskEvent:
    return task_pb2.TaskEvent(
        task_id=e.task_id, seq=e.seq, kind=_KIND_OUT[e.kind], time=ts(e.time),
        state=_STATE_OUT[e.state], stage=e.stage.value, message=e.message, attempt=e.attempt,
        result=result_out(e.result), error=error_out(e.error))


def memory_out(m: Memory) -> memory_pb2.Memory:
    return memory_pb2.Memory(
        memory_id=m.memory_id, category=_CAT_OUT[m.category], content=m.content, space=m.space,
        source_session_id=m.source_session_id, source_archive_uri=m.source_archive_uri,
        source_message_ids=list(m.source_message_ids), created_at=ts(m.created_at),
        updated_at=ts(m.updated_at))


_OP_OUT: dict[ChangeOp, Any] = {ChangeOp.CREATED: memory_pb2.MEMORY_CHANGE_OP_CREATED,
                                ChangeOp.UPDATED: memory_pb2.MEMORY_CHANGE_OP_UPDATED,
                                ChangeOp.DELETED: memory_pb2.MEMORY_CHANGE_OP_DELETED,
                                ChangeOp.REVERTED: memory_pb2.MEMORY_CHANGE_OP_REVERTED}


def change_out(c: MemoryChange) -> memory_pb2.MemoryChange:
    return memory_pb2.MemoryChange(
        change_id=c.change_id, seq=c.seq, memory_id=c.memory_id, category=_CAT_OUT[c.category],
        op=_OP_OUT[c.op], session_id=c.session_id, archive_index=c.archive_index,
        archive_uri=c.archive_uri, task_id=c.task_id,
        before=memory_out(c.before.memory()) if c.before is not None else None,
        after=memory_out(c.after.memory()) if c.after is not None else None,
        created_at=ts(c.created_at))


def recall_out(result: RecallResult) -> memory_pb2.RecallResponse:
    return memory_pb2.RecallResponse(
        latest_archive_overview=result.latest_archive_overview,
        items=[memory_pb2.RecallItem(
            kind=_RKIND_OUT[i.kind], text=i.text, score=i.score, session_id=i.session_id,
            archive_uri=i.archive_uri, message_ids=list(i.message_ids), memory_id=i.memory_id,
            time=ts(i.time)) for i in result.items])
