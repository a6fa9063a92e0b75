"""Wait until a task ends: `wait_for_task` (sync) and `aio_wait_for_task` (asyncio).

Behaviour: the final Task is returned whatever its terminal state (COMPLETED,
FAILED or CANCELLED); check `task.state`. With `raise_on_failure=True` a FAILED task
raises TaskFailed and a CANCELLED one TaskCancelled, both carrying the Task and its
google.rpc.Status.

How: GetTask first (a task that already ended is returned at once, even when its
journal was compacted); otherwise a resuming watch from the task's current last
seq until the terminal event, then GetTask again for the complete final Task. Should
that last read fail, the Task is built from the watch's snapshot plus the terminal
event (state, stage, result or error, finish time). GetTask is retried on
UNAVAILABLE with the same ResumePolicy as the watch.

Errors: grpc.RpcError for final server answers (NOT_FOUND: unknown task or another
identity's), WatchInterrupted when re-attaching gave up, WatchTimeout when `timeout`
(covering the whole wait) ran out.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable

import grpc
import tenacity
from sessiond.client.errors import TaskCancelled, TaskFailed, WatchInterrupted, WatchTimeout
from sessiond.client.watch import (
    DEFAULT_RESUME_POLICY,
    AioTaskWatch,
    Metadata,
    ResumePolicy,
    TaskWatch,
    _aio_stub,
    _Progress,
    _sync_stub,
    is_terminal,
)
from sessiond.v1 import task_pb2, task_pb2_grpc

__all__ = ["aio_wait_for_task", "wait_for_task"]


class _Waiter:
    """Deadline, GetTask retry policy and outcome handling shared by sync and aio."""

    def __init__(self, task_id: str, timeout: float | None, policy: ResumePolicy) -> None:
        self.task_id = task_id
        self.deadline = time.monotonic() + timeout if timeout is not None else None
        self.policy = policy

    def remaining(self) -> float | None:
        if self.deadline is None:
            return None
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self.timed_out(0)
        return left

    def timed_out(self, last_seq: int) -> WatchTimeout:
        return WatchTimeout(f"waiting for task {self.task_id} timed out", task_id=self.task_id,
                            last_seq=last_seq, attempts=0)

    def _retryable(self, exc: BaseException) -> bool:
        return isinstance(exc, grpc.RpcError) and exc.code() is grpc.StatusCode.UNAVAILABLE

    def _stop(self, retry_state: tenacity.RetryCallState) -> bool:
        if retry_state.attempt_number >= self.policy.max_attempts:
            return True
        return self.deadline is not None and time.monotonic() >= self.deadline

    def retrying(self) -> tenacity.Retrying:
        return tenacity.Retrying(sleep=time.sleep, stop=self._stop,
                                 wait=self.policy.wait_strategy(),
                                 retry=tenacity.retry_if_exception(self._retryable),
                                 reraise=True)

    def aio_retrying(self) -> tenacity.AsyncRetrying:
        return tenacity.AsyncRetrying(sleep=asyncio.sleep, stop=self._stop,
                                      wait=self.policy.wait_strategy(),
                                      retry=tenacity.retry_if_exception(self._retryable),
                                      reraise=True)

    def check_deadline(self, exc: grpc.RpcError, last_seq: int = 0) -> None:
        if self.deadline is not None and exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
            raise self.timed_out(last_seq) from exc

    def finish(self, task: task_pb2.Task, raise_on_failure: bool) -> task_pb2.Task:
        if raise_on_failure:
            if task.state == task_pb2.TASK_STATE_FAILED:
                raise TaskFailed(task)
            if task.state == task_pb2.TASK_STATE_CANCELLED:
                raise TaskCancelled(task)
        return task


def _from_watch(snapshot: task_pb2.Task | None, event: task_pb2.TaskEvent | None,
                task_id: str) -> task_pb2.Task:
    """The final Task as far as the watch saw it: snapshot updated by the terminal event."""
    task = task_pb2.Task()
    if snapshot is not None:
        task.CopyFrom(snapshot)
    else:
        task.task_id = task_id
    if event is not None:
        task.state = event.state
        task.stage = event.stage
        task.last_seq = max(task.last_seq, event.seq)
        if event.HasField("time"):
            task.updated_at.CopyFrom(event.time)
            task.finished_at.CopyFrom(event.time)
        if event.HasField("result"):
            task.result.CopyFrom(event.result)
        if event.HasField("error"):
            task.error.CopyFrom(event.error)
    return task


def _final(fetched: task_pb2.Task | None, watch: TaskWatch[object] | AioTaskWatch[object]
           ) -> task_pb2.Task:
    if fetched is not None and is_terminal(fetched.state):
        return fetched
    return _from_watch(watch.snapshot, watch.terminal_event, watch.task_id)


def wait_for_task(target: task_pb2_grpc.TaskServiceStub | grpc.Channel, task_id: str, *,
                  timeout: float | None = None, raise_on_failure: bool = False,
                  metadata: Metadata | None = None, resume: ResumePolicy | None = None
                  ) -> task_pb2.Task:
    """Block until task `task_id` ends and return its final Task (see module doc)."""
    stub = _sync_stub(target)
    w = _Waiter(task_id, timeout, resume or DEFAULT_RESUME_POLICY)
    md = tuple(metadata) if metadata is not None else None

    def get_task() -> task_pb2.Task:
        result: task_pb2.Task | None = None
        for attempt in w.retrying():
            with attempt:
                result = stub.GetTask(task_pb2.GetTaskRequest(task_id=task_id),
                                      timeout=w.remaining(), metadata=md)
        assert result is not None
        return result

    try:
        task = get_task()
    except grpc.RpcError as exc:
        w.check_deadline(exc)
        raise
    if is_terminal(task.state):
        return w.finish(task, raise_on_failure)
    progress = _Progress(task_id, task.last_seq, False, False, metadata, w.remaining(),
                         w.policy)
    progress.snapshot = task
    with TaskWatch[task_pb2.TaskEvent](stub, progress) as watch:
        for _ in watch:
            pass
    fetched: task_pb2.Task | None
    try:
        fetched = get_task()
    except (grpc.RpcError, WatchInterrupted):
        fetched = None  # the terminal event already says how it ended
    return w.finish(_final(fetched, watch), raise_on_failure)


async def aio_wait_for_task(target: task_pb2_grpc.TaskServiceAsyncStub | grpc.aio.Channel,
                            task_id: str, *,
                            # One budget for GetTask, re-attaches and backoff, like the sync API.
                            timeout: float | None = None,  # noqa: ASYNC109
                            raise_on_failure: bool = False, metadata: Metadata | None = None,
                            resume: ResumePolicy | None = None) -> task_pb2.Task:
    """The asyncio twin of `wait_for_task`."""
    stub = _aio_stub(target)
    w = _Waiter(task_id, timeout, resume or DEFAULT_RESUME_POLICY)
    md = tuple(metadata) if metadata is not None else None

    async def get_task() -> task_pb2.Task:
        result: task_pb2.Task | None = None
        async for attempt in w.aio_retrying():
            with attempt:
                call: Awaitable[task_pb2.Task] = stub.GetTask(
                    task_pb2.GetTaskRequest(task_id=task_id), timeout=w.remaining(),
                    metadata=md)
                result = await call
        assert result is not None
        return result

    try:
        task = await get_task()
    except grpc.RpcError as exc:
        w.check_deadline(exc)
        raise
    if is_terminal(task.state):
        return w.finish(task, raise_on_failure)
    progress = _Progress(task_id, task.last_seq, False, False, metadata, w.remaining(),
                         w.policy)
    progress.snapshot = task
    async with AioTaskWatch[task_pb2.TaskEvent](stub, progress) as watch:
        async for _ in watch:
            pass
    fetched: task_pb2.Task | None
    try:
        fetched = await get_task()
    except (grpc.RpcError, WatchInterrupted):
        fetched = None
    return w.finish(_final(fetched, watch), raise_on_failure)
