"""Who the calls act for: the (account, user, agent) triple sent as request metadata.

The server reads `x-sessiond-account`, `x-sessiond-user` and `x-sessiond-agent`; a
missing key means "default". Sessions and tasks of another identity are NOT_FOUND.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["ACCOUNT_KEY", "AGENT_KEY", "DEFAULT", "IDENTITY_KEYS", "USER_KEY", "Identity"]

ACCOUNT_KEY = "x-sessiond-account"
USER_KEY = "x-sessiond-user"
AGENT_KEY = "x-sessiond-agent"
IDENTITY_KEYS = (ACCOUNT_KEY, USER_KEY, AGENT_KEY)
DEFAULT = "default"

# Same rule the server enforces; checked here so a typo fails at construction.
_VALID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}$")


@dataclass(frozen=True, slots=True)
class Identity:
    account: str = DEFAULT
    user: str = DEFAULT
    agent: str = DEFAULT

    def __post_init__(self) -> None:
        for name in ("account", "user", "agent"):
            value = getattr(self, name)
            if not _VALID.match(value):
                raise ValueError(f"identity {name} {value!r} is not valid: 1-128 characters "
                                 "of letters, digits and ._@:- (starting with a letter or digit)")

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The request metadata carrying this identity."""
        return ((ACCOUNT_KEY, self.account), (USER_KEY, self.user), (AGENT_KEY, self.agent))
