"""sessiond.client: what the generated stubs cannot do on their own.

* `connect` / `aio_connect`: channels with retries for idempotent calls, keepalive,
  16 MiB messages, an interceptor adding identity metadata and request ids, and
  TLS / mTLS / API-key / JWT credentials (`sessiond.client.auth`).
* `with_request_id`: AIP-155 idempotency keys for your own retries.
* `watch_task` / `aio_watch_task`: task watches that re-attach after a broken stream
  without repeating or skipping events.
* `wait_for_task` / `aio_wait_for_task`: block until a task ends.

Use the generated modules (`sessiond.v1.session_pb2`, `..._pb2_grpc`, ...) for the
messages and stubs themselves.
"""

from sessiond.client.auth import RefreshingToken, TokenSource, channel_credentials
from sessiond.client.channel import (
    DEFAULT_OPTIONS,
    RETRYABLE_METHODS,
    SERVICE_CONFIG_JSON,
    aio_connect,
    channel_options,
    connect,
    service_config,
)
from sessiond.client.errors import (
    SessiondClientError,
    TaskCancelled,
    TaskFailed,
    TaskNotSuccessful,
    WatchInterrupted,
    WatchTimeout,
)
from sessiond.client.idempotency import REQUEST_ID_METHODS, new_request_id, with_request_id
from sessiond.client.identity import Identity
from sessiond.client.interceptors import SessiondInterceptor, aio_interceptors
from sessiond.client.wait import aio_wait_for_task, wait_for_task
from sessiond.client.watch import (
    TERMINAL_EVENT_KINDS,
    TERMINAL_STATES,
    AioTaskWatch,
    ResumePolicy,
    TaskWatch,
    WatchItem,
    aio_watch_task,
    is_terminal,
    watch_task,
)

__all__ = [
    "DEFAULT_OPTIONS",
    "REQUEST_ID_METHODS",
    "RETRYABLE_METHODS",
    "SERVICE_CONFIG_JSON",
    "TERMINAL_EVENT_KINDS",
    "TERMINAL_STATES",
    "AioTaskWatch",
    "Identity",
    "RefreshingToken",
    "ResumePolicy",
    "SessiondClientError",
    "SessiondInterceptor",
    "TaskCancelled",
    "TaskFailed",
    "TaskNotSuccessful",
    "TaskWatch",
    "TokenSource",
    "WatchInterrupted",
    "WatchItem",
    "WatchTimeout",
    "aio_connect",
    "aio_interceptors",
    "aio_wait_for_task",
    "aio_watch_task",
    "channel_credentials",
    "channel_options",
    "connect",
    "is_terminal",
    "new_request_id",
    "service_config",
    "wait_for_task",
    "watch_task",
    "with_request_id",
]
