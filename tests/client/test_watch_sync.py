"""The sync resume logic of watch_task / wait_for_task against a grpc_testing channel:
the test thread plays the TaskService, the client iterates in a helper thread."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import grpc
import grpc_testing
import pytest
from sessiond.client import (
    ResumePolicy,
    TaskFailed,
    TaskWatch,
    WatchInterrupted,
    WatchItem,
    wait_for_task,
    watch_task,
)
from sessiond.v1 import task_pb2

from tests.client.fakes import event, heartbeat, snapshot, wait_until

SERVICE = task_pb2.DESCRIPTOR.services_by_name["TaskService"]
WATCH = SERVICE.methods_by_name["WatchTask"]
GET = SERVICE.methods_by_name["GetTask"]
FAST = ResumePolicy(max_attempts=3, initial_backoff=0.001, max_backoff=0.005)
STAGE = task_pb2.TASK_EVENT_KIND_STAGE_STARTED
COMPLETED = task_pb2.TASK_EVENT_KIND_COMPLETED
MD = (("x-sessiond-account", "acme"),)


@pytest.fixture
def channel() -> Iterator[Any]:
    ch = grpc_testing.channel([SERVICE], grpc_testing.strict_real_time())
    yield ch
    ch.close()


class Consumer:
    """Drains a watch in a thread; `items` or `error` afterwards."""

    def __init__(self, watch: TaskWatch[Any]) -> None:
        self.watch = watch
        self.items: list[WatchItem] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for item in self.watch:
                self.items.append(item)
        except BaseException as exc:
            self.error = exc

    def join(self) -> None:
        self.thread.join(5)
        assert not self.thread.is_alive(), "watch did not finish"

    @property
    def seqs(self) -> list[int]:
        return [i.seq for i in self.items if isinstance(i, task_pb2.TaskEvent)]


def take(channel: Any, expect_after: int) -> Any:
    md, request, rpc = channel.take_unary_stream(WATCH)
    assert request.task_id == "t1"
    assert request.after_seq == expect_after, request
    assert set(MD) <= set(md)
    return rpc


def test_resumes_after_every_kind_of_break_without_repeats_or_gaps(channel: Any) -> None:
    watch = watch_task(channel, "t1", metadata=MD, resume=FAST)
    c = Consumer(watch)

    rpc = take(channel, 0)
    rpc.send_response(snapshot(0))
    for seq in (1, 2, 3):
        rpc.send_response(event(seq))
    wait_until(lambda: watch.last_seq == 3)
    rpc.terminate((), grpc.StatusCode.UNAVAILABLE, "server is shutting down")

    rpc = take(channel, 3)
    rpc.send_response(snapshot(3))
    for seq in (3, 4, 5):  # 3 again: a server replaying must not reach the caller twice
        rpc.send_response(event(seq))
    wait_until(lambda: watch.last_seq == 5)
    rpc.terminate((), grpc.StatusCode.INTERNAL, "Received RST_STREAM with error code 2")

    rpc = take(channel, 5)
    rpc.send_response(event(6))
    wait_until(lambda: watch.last_seq == 6)
    rpc.terminate((), grpc.StatusCode.CANCELLED, "cancelled by a proxy")

    rpc = take(channel, 6)
    rpc.send_response(event(7))
    wait_until(lambda: watch.last_seq == 7)
    rpc.terminate((), grpc.StatusCode.OK, "")  # ended without the terminal event

    rpc = take(channel, 7)
    rpc.send_response(snapshot(7))
    rpc.send_response(heartbeat(7))
    rpc.send_response(event(8, COMPLETED))
    rpc.terminate((), grpc.StatusCode.OK, "")

    c.join()
    assert c.error is None, c.error
    assert c.seqs == list(range(1, 9))
    assert all(isinstance(i, task_pb2.TaskEvent) for i in c.items)  # defaults: events only
    assert watch.done and watch.resumes == 4
    assert watch.terminal_event is not None and watch.terminal_event.kind == COMPLETED
    assert watch.snapshot is not None and watch.snapshot.last_seq == 7


def test_gap_reattaches_from_last_delivered_event(channel: Any) -> None:
    watch = watch_task(channel, "t1", after_seq=10, metadata=MD, resume=FAST)
    c = Consumer(watch)
    rpc = take(channel, 10)
    rpc.send_response(event(11))
    rpc.send_response(event(13))  # 12 missing
    rpc = take(channel, 11)
    rpc.send_response(event(12))
    rpc.send_response(event(13, COMPLETED))
    rpc.terminate((), grpc.StatusCode.OK, "")
    c.join()
    assert c.error is None and c.seqs == [11, 12, 13]


@pytest.mark.parametrize("code", [
    grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL,
])
def test_final_codes_raise_at_once(channel: Any, code: grpc.StatusCode) -> None:
    watch = watch_task(channel, "t1", metadata=MD, resume=FAST)
    c = Consumer(watch)
    rpc = take(channel, 0)
    rpc.send_response(event(1))
    wait_until(lambda: watch.last_seq == 1)
    rpc.terminate((), code, "no")
    c.join()
    assert isinstance(c.error, grpc.RpcError) and c.error.code() is code
    assert c.seqs == [1] and watch.resumes == 0


def test_gives_up_after_max_attempts_without_progress(channel: Any) -> None:
    watch = watch_task(channel, "t1", metadata=MD, resume=FAST)
    c = Consumer(watch)
    rpc = take(channel, 0)
    rpc.send_response(event(1))
    rpc.send_response(event(2))
    wait_until(lambda: watch.last_seq == 2)
    rpc.terminate((), grpc.StatusCode.UNAVAILABLE, "down")
    for _ in range(FAST.max_attempts - 1):
        rpc = take(channel, 2)
        rpc.send_response(snapshot(2))  # a snapshot alone is not progress
        rpc.terminate((), grpc.StatusCode.UNAVAILABLE, "down")
    c.join()
    assert isinstance(c.error, WatchInterrupted)
    assert c.error.last_seq == 2 and c.error.attempts == FAST.max_attempts
    assert isinstance(c.error.__cause__, grpc.RpcError)
    assert c.error.__cause__.code() is grpc.StatusCode.UNAVAILABLE
    assert c.seqs == [1, 2]


def test_attempt_count_restarts_after_progress(channel: Any) -> None:
    # Twice max_attempts breaks in a row, but each attached stream brings a new event
    # (or, once, only a heartbeat: the stream was alive, just idle).
    watch = watch_task(channel, "t1", metadata=MD, resume=FAST, include_heartbeats=True)
    c = Consumer(watch)
    breaks = 2 * FAST.max_attempts
    for seq in range(1, breaks + 1):
        rpc = take(channel, seq - 1)
        rpc.send_response(event(seq))
        wait_until(lambda: watch.last_seq == seq)  # noqa: B023 (called right here)
        rpc.terminate((), grpc.StatusCode.UNAVAILABLE, "flapping")
        if seq == 2:
            for _ in range(FAST.max_attempts):
                rpc = take(channel, seq)
                rpc.send_response(heartbeat(seq))
                wait_until(lambda: bool(c.items) and isinstance(c.items[-1], task_pb2.Heartbeat))
                c.items.pop()
                rpc.terminate((), grpc.StatusCode.UNAVAILABLE, "idle, then cut")
    rpc = take(channel, breaks)
    rpc.send_response(event(breaks + 1, COMPLETED))
    rpc.terminate((), grpc.StatusCode.OK, "")
    c.join()
    assert c.error is None and c.seqs == list(range(1, breaks + 2))
    assert watch.resumes == breaks + FAST.max_attempts


def test_include_snapshots_and_heartbeats(channel: Any) -> None:
    watch = watch_task(channel, "t1", metadata=MD, resume=FAST, include_snapshots=True,
                       include_heartbeats=True)
    c = Consumer(watch)
    rpc = take(channel, 0)
    for resp in (snapshot(0), event(1), heartbeat(1), event(2, COMPLETED)):
        rpc.send_response(resp)
    rpc.terminate((), grpc.StatusCode.OK, "")
    c.join()
    assert [type(i).__name__ for i in c.items] == ["Task", "TaskEvent", "Heartbeat",
                                                   "TaskEvent"]


def test_terminal_snapshot_at_our_position_ends_the_watch(channel: Any) -> None:
    watch = watch_task(channel, "t1", after_seq=4, metadata=MD, resume=FAST)
    c = Consumer(watch)
    rpc = take(channel, 4)
    rpc.send_response(snapshot(4, task_pb2.TASK_STATE_COMPLETED))
    rpc.terminate((), grpc.StatusCode.OK, "")
    c.join()
    assert c.error is None and c.items == [] and watch.done and watch.resumes == 0


def test_close_cancels_the_call(channel: Any) -> None:
    watch = watch_task(channel, "t1", metadata=MD, resume=FAST)
    got = threading.Event()

    def consume() -> None:
        for _ in watch:
            got.set()
            watch.close()
            return

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    rpc = take(channel, 0)
    rpc.send_response(event(1))
    rpc.cancelled()  # blocks until the client cancelled the RPC
    t.join(5)
    assert got.is_set() and not t.is_alive()


def _get(channel: Any, task: task_pb2.Task) -> None:
    md, request, rpc = channel.take_unary_unary(GET)
    assert request.task_id == "t1" and set(MD) <= set(md)
    rpc.terminate(task, (), grpc.StatusCode.OK, "")


def test_wait_for_task_returns_final_task_or_raises(channel: Any) -> None:
    results: list[Any] = []

    def run() -> None:
        try:
            results.append(wait_for_task(channel, "t1", metadata=MD, resume=FAST,
                                         raise_on_failure=True))
        except BaseException as exc:
            results.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    _get(channel, task_pb2.Task(task_id="t1", state=task_pb2.TASK_STATE_RUNNING, last_seq=2))
    rpc = take(channel, 2)  # watches from where the task is, not from 0
    rpc.send_response(snapshot(2))
    rpc.send_response(event(3))
    rpc.terminate((), grpc.StatusCode.OK, "")  # ends early: queued events still arrive
    rpc = take(channel, 3)
    rpc.send_response(event(4, task_pb2.TASK_EVENT_KIND_FAILED))
    rpc.terminate((), grpc.StatusCode.OK, "")
    # The final read fails: the task is built from the snapshot and the terminal event.
    _md, _req, get_rpc = channel.take_unary_unary(GET)
    get_rpc.terminate(task_pb2.Task(), (), grpc.StatusCode.NOT_FOUND, "swept")
    t.join(5)
    [err] = results
    assert isinstance(err, TaskFailed)
    assert err.task.state == task_pb2.TASK_STATE_FAILED and err.task.last_seq == 4
    assert err.status.message == "summarizer exploded" and err.code is grpc.StatusCode.INTERNAL


def test_wait_for_task_already_finished(channel: Any) -> None:
    results: list[task_pb2.Task] = []
    t = threading.Thread(target=lambda: results.append(
        wait_for_task(channel, "t1", metadata=MD, resume=FAST)), daemon=True)
    t.start()
    done = task_pb2.Task(task_id="t1", state=task_pb2.TASK_STATE_CANCELLED, last_seq=9)
    _get(channel, done)
    t.join(5)
    assert results == [done]  # returned, not raised, without raise_on_failure
