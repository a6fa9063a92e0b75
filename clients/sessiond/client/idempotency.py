"""Request ids (AIP-155) for the mutating calls that accept one.

CreateSession, AddMessage, AddMessages, Commit, RecordUsage, RetryTask and RevertArchive
carry a
`request_id`: the server remembers it (for a retention window) and answers a replay
with the original result instead of doing the work twice. That is what makes retrying these calls
safe, so channels from `connect`/`aio_connect` retry them on UNAVAILABLE.

Two ways to get an id onto a request:

* `with_request_id(request)` sets a fresh uuid4 on *your* object (when it has none)
  and returns it. Use it when you retry on your own: send the same object again and
  the server returns the first answer.
* The interceptor of `connect`/`aio_connect` fills an empty `request_id` on a *copy*
  of the request just before sending (your object is left untouched). This covers
  gRPC's transparent retries of that one call; a second call you make yourself gets
  a new id and is a new operation.
"""

from __future__ import annotations

import uuid
from typing import TypeVar, cast

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

__all__ = [
    "REQUEST_ID_FIELD",
    "REQUEST_ID_METHODS",
    "filled_request_id",
    "new_request_id",
    "with_request_id",
]

REQUEST_ID_FIELD = "request_id"

# Full method names ("/package.Service/Method") whose requests carry a request_id.
REQUEST_ID_METHODS: frozenset[str] = frozenset({
    "/sessiond.v1.SessionService/CreateSession",
    "/sessiond.v1.SessionService/AddMessage",
    "/sessiond.v1.SessionService/AddMessages",
    "/sessiond.v1.SessionService/Commit",
    "/sessiond.v1.SessionService/RecordUsage",
    "/sessiond.v1.TaskService/RetryTask",
    "/sessiond.v1.SessionService/RevertArchive",
})

M = TypeVar("M", bound=Message)
T = TypeVar("T")


def new_request_id() -> str:
    """A fresh request id (a random UUID in canonical text form)."""
    return str(uuid.uuid4())


def _has_request_id_field(request: Message) -> bool:
    field = request.DESCRIPTOR.fields_by_name.get(REQUEST_ID_FIELD)
    return field is not None and field.type == FieldDescriptor.TYPE_STRING


def with_request_id(request: M) -> M:
    """Set `request.request_id` to a new uuid4 when it is empty; returns `request`
    (the same object, changed in place). TypeError when the message has no
    string `request_id` field."""
    if not _has_request_id_field(request):
        raise TypeError(f"{request.DESCRIPTOR.full_name} has no request_id field")
    if not getattr(request, REQUEST_ID_FIELD):
        setattr(request, REQUEST_ID_FIELD, new_request_id())
    return request


def filled_request_id(request: T) -> T:
    """`request` itself when it already has a request id (or cannot have one: not a
    message with a request_id field), otherwise a copy with a fresh one. Never
    changes `request`."""
    if not isinstance(request, Message) or not _has_request_id_field(request):
        return request
    if getattr(request, REQUEST_ID_FIELD):
        return request
    copy = type(request)()
    copy.CopyFrom(request)
    setattr(copy, REQUEST_ID_FIELD, new_request_id())
    return cast(T, copy)
