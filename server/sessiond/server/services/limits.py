"""Per-caller rate limits: token buckets by caller and method class (no gRPC here).

A caller is the authenticated principal (an API key, a token subject, a client
certificate) or, with `--auth none`, the identity the call acts for
(account/user/agent). Each method class (reads, writes, commits: the Phase 2
submissions) has its own rate and burst; a class with no rate is not limited. A call
takes one token from each bucket of its classes, or none when any of them is empty:
then it is refused with the time until the emptiest bucket has a token again.

The buckets live in this process: behind a load balancer each replica enforces its
own share, so the rate a caller gets from N replicas is up to N times the configured
one (configure the per-replica share: total / N).
"""

from __future__ import annotations

import enum
import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from sessiond.server.auth.principal import Principal
from sessiond.server.domain.errors import ResourceExhausted
from sessiond.server.domain.values import Identity

# Callers whose buckets are kept; the least recently seen is dropped beyond this
# (it comes back full, which only ever errs on the generous side).
MAX_CALLERS = 100_000


class RateClass(enum.StrEnum):
    READ = "read"
    WRITE = "write"
    COMMIT = "commit"


@dataclass(frozen=True, slots=True)
class Rate:
    """`per_second` tokens are added each second up to `burst`; 0: unlimited."""

    per_second: float = 0.0
    burst: int = 0

    @property
    def limited(self) -> bool:
        return self.per_second > 0

    @property
    def capacity(self) -> float:
        return float(self.burst) if self.burst > 0 else max(1.0, math.ceil(self.per_second))


def caller_key(principal: Principal, identity: Identity) -> str:
    """Whom a call's tokens are counted for: the principal when the call is
    authenticated, else the identity it acts for."""
    if principal.kind == "anonymous":
        return f"identity {identity.account}/{identity.user}/{identity.agent}"
    return f"{principal.kind} {principal.subject}"


class TokenBucket:
    __slots__ = ("capacity", "rate", "tokens", "updated")

    def __init__(self, rate: Rate, now: float) -> None:
        self.rate = rate.per_second
        self.capacity = rate.capacity
        self.tokens = self.capacity
        self.updated = now

    def wait(self, now: float) -> float:
        """Seconds until a token is available (0: one is available now)."""
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.rate

    def take(self) -> None:
        self.tokens -= 1.0


class RateLimiter:
    def __init__(self, rates: Mapping[RateClass, Rate], *, max_callers: int = MAX_CALLERS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rates = {c: r for c, r in rates.items() if r.limited}
        self.max_callers = max_callers
        self.clock = clock
        self._buckets: OrderedDict[tuple[str, RateClass], TokenBucket] = OrderedDict()
        self.rejected: Counter[RateClass] = Counter()  # for a metrics exporter

    @property
    def enabled(self) -> bool:
        return bool(self.rates)

    def acquire(self, caller: str, classes: Sequence[RateClass]) -> None:
        """Take a token of each class for `caller`, or raise ResourceExhausted
        (nothing taken) with the delay after which a retry can succeed."""
        now = self.clock()
        buckets: list[tuple[RateClass, TokenBucket]] = []
        for cls in classes:
            rate = self.rates.get(cls)
            if rate is None:
                continue
            key = (caller, cls)
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = TokenBucket(rate, now)
                while len(self._buckets) > self.max_callers:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(key)
            buckets.append((cls, bucket))
        waits = [(b.wait(now), cls) for cls, b in buckets]
        delay, cls = max(waits, default=(0.0, RateClass.READ))
        if delay > 0:
            self.rejected[cls] += 1
            rate = self.rates[cls]
            raise ResourceExhausted(
                f"rate limit exceeded: at most {rate.per_second:g} {cls.value} calls per "
                f"second (burst {rate.capacity:g}) for {caller}; retry in {delay:.2f} s",
                reason="RATE_LIMITED", retry_after=delay, subject=caller,
                description=f"{cls.value} calls: {rate.per_second:g}/s, burst "
                            f"{rate.capacity:g}",
                metadata={"limit": cls.value, "rate_per_second": f"{rate.per_second:g}",
                          "burst": f"{rate.capacity:g}"})
        for _, b in buckets:
            b.take()


def limiter_from(read: Rate, write: Rate, commit: Rate) -> RateLimiter | None:
    """The limiter of these rates; None when none is limited."""
    limiter = RateLimiter({RateClass.READ: read, RateClass.WRITE: write,
                           RateClass.COMMIT: commit})
    return limiter if limiter.enabled else None
