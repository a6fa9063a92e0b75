"""Exceptions raised by the sessiond client helpers.

Answers the server gives for good (NOT_FOUND, OUT_OF_RANGE, PERMISSION_DENIED,
INVALID_ARGUMENT, ...) are not wrapped: they surface as the `grpc.RpcError` the
call raised, so `err.code()` works as with the plain stubs. The types below cover
what only the helpers can know about:

    SessiondClientError
    ├── TaskNotSuccessful        a task ended, but not COMPLETED (raise_on_failure=True)
    │   ├── TaskFailed           state FAILED; `.status` is the google.rpc.Status
    │   └── TaskCancelled        state CANCELLED
    └── WatchInterrupted         re-attaching a task watch gave up; resume at `.last_seq`
        └── WatchTimeout         the overall `timeout` of a watch/wait ran out (also TimeoutError)
"""

from __future__ import annotations

import grpc
from google.rpc import status_pb2
from sessiond.v1 import task_pb2

__all__ = [
    "SessiondClientError",
    "TaskCancelled",
    "TaskFailed",
    "TaskNotSuccessful",
    "WatchInterrupted",
    "WatchTimeout",
]


class SessiondClientError(Exception):
    """Base class of every exception the sessiond client helpers raise themselves."""


class TaskNotSuccessful(SessiondClientError):
    """A task reached a terminal state other than COMPLETED.

    `task` is the final Task, `status` its `error` (a google.rpc.Status; empty
    when the server recorded none)."""

    def __init__(self, task: task_pb2.Task) -> None:
        self.task = task
        self.task_id = task.task_id
        self.status: status_pb2.Status = task.error
        state = task_pb2.TaskState.Name(task.state)
        detail = f": {task.error.message}" if task.error.message else ""
        super().__init__(f"task {task.task_id} ended {state}{detail}")

    @property
    def code(self) -> grpc.StatusCode | None:
        """The status code of `status` as a grpc.StatusCode (None when unknown)."""
        for code in grpc.StatusCode:
            if code.value[0] == self.status.code:
                return code
        return None


class TaskFailed(TaskNotSuccessful):
    """The task ended FAILED; `status` says why."""


class TaskCancelled(TaskNotSuccessful):
    """The task ended CANCELLED."""


class WatchInterrupted(SessiondClientError):
    """A task watch kept breaking and the resume policy gave up.

    `last_seq` is the last event delivered to the caller: watching again with
    `after_seq=last_seq` continues without gaps or repeats. `attempts` counts the
    consecutive failed attempts since the last progress (for WatchTimeout: the
    attaches made). The last underlying error (usually a grpc.RpcError) is
    `__cause__`."""

    def __init__(self, message: str, *, task_id: str, last_seq: int, attempts: int) -> None:
        super().__init__(message)
        self.task_id = task_id
        self.last_seq = last_seq
        self.attempts = attempts


class WatchTimeout(WatchInterrupted, TimeoutError):
    """The overall `timeout` given to a watch or wait ran out before the task ended."""
