"""Who a call acts for, read from request metadata.

Keys: x-sessiond-account, x-sessiond-user, x-sessiond-agent. A missing key means
"default", so a single-user deployment needs no metadata at all. This is attribution
and isolation, not authentication: put an authenticating proxy in front of sessiond
when clients are not trusted.
"""

from __future__ import annotations

import re
from typing import Any

import grpc
from sessiond.server.domain.errors import FieldViolation, InvalidArgument
from sessiond.server.domain.values import Identity

ACCOUNT_KEY = "x-sessiond-account"
USER_KEY = "x-sessiond-user"
AGENT_KEY = "x-sessiond-agent"
DEFAULT = "default"
_VALID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}$")


def identity_of(context: grpc.aio.ServicerContext[Any, Any]) -> Identity:
    md = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
    values = {}
    bad = []
    for key in (ACCOUNT_KEY, USER_KEY, AGENT_KEY):
        v = md.get(key, "") or DEFAULT
        if not _VALID.match(v):
            bad.append(FieldViolation(key, "1-128 characters of letters, digits and ._@:-"))
        values[key] = v
    if bad:
        raise InvalidArgument("identity metadata is not valid", violations=bad)
    return Identity(values[ACCOUNT_KEY], values[USER_KEY], values[AGENT_KEY])
