"""Per-portal request pacing that keeps every process and machine under Bitrix24's limit.

Bitrix24 (protocol §7.1) keeps a counter per portal and source address: every request adds 1,
the counter drains ``rate`` per second, and a request that finds it above ``burst`` gets
``503 QUERY_LIMIT_EXCEEDED``. The limiters here model that bucket with GCRA (the generic cell rate
algorithm): each caller *reserves* the next free slot and sleeps until it, so callers queue in
arrival order and the portal's counter never goes above ``burst``.

Safety margins: we aim at ``burst - 2`` (network jitter can bunch requests that left us evenly
spaced) and never schedule faster than ``rate``. After a ``QUERY_LIMIT_EXCEEDED`` (the counter was
fuller than we thought: other apps on our address, a clock step) :meth:`penalize` blocks the key
and treats the bucket as full when the block ends, so traffic resumes at the steady rate.

:class:`RedisLeakyBucket` shares the schedule between all processes and machines through one Lua
script and Redis' own clock; :class:`LocalLeakyBucket` does the same inside one process.

**While Redis is unreachable** the Redis limiter is :attr:`~RedisLeakyBucket.degraded`: each
process paces on its own, conservatively (burst 1 and the rate divided by
:data:`DEGRADED_PROCESSES`; see there), so that the processes together stay under the portal's
limit without sharing anything. It is slower, not lossy: background work waits for its slots,
and a web read that would wait longer than the web wait answers "busy". Inside
:func:`shared_pacing_only` the limiter refuses instead of pacing on its own
(:class:`SharedPacingUnavailable`): a web request's *write* runs inside it, so the change stays
queued and the worker sends it, paced (writes are the calls a burst of web traffic must not
multiply). The two hand-overs are kept simple:

* **Redis to in-process.** A key starts after the last slot this process saw Redis give out,
  plus the queue waiting then (each waiting caller may have reserved once more), and not before
  every assumed process could send one request into a full bucket (``DEGRADED_PROCESSES``
  intervals).
* **In-process back to Redis.** Redis' state may be stale or lost (a restart), so a key this
  process paced on its own is marked full in Redis (a zero-length penalty) before it reserves
  there: no fresh burst beside the slots given out meanwhile.

A Redis that lost its data while this process did not notice an outage gives a fresh burst; the
portal may then answer ``QUERY_LIMIT_EXCEEDED``, which blocks the key (:meth:`penalize`) and
leaves the change queued, not lost.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import redis

from b24app.portals.redisbacked import RedisBacked

__all__ = [
    "BACKGROUND_LIMITER_WAIT_S",
    "DEGRADED_PROCESSES",
    "WEB_LIMITER_WAIT_S",
    "LocalLeakyBucket",
    "RateLimitTimeout",
    "RateLimiter",
    "RedisLeakyBucket",
    "SharedPacingUnavailable",
    "limiter_degraded",
    "limiter_from_url",
    "busy_retry_after_s",
    "parse_rate",
    "shared_pacing_only",
]

logger = logging.getLogger("b24app.ratelimit")

BURST_MARGIN = 2
"""Requests of the portal's burst we leave unused to absorb jitter."""

DEGRADED_PROCESSES = 8
"""How many processes the in-process pacing assumes send to one portal while Redis is down:
each then paces at burst 1 and ``rate / DEGRADED_PROCESSES``. The default deployment runs 2 web
processes (``WEB_CONCURRENCY``) and a worker of 4 (``CELERY_CONCURRENCY``), 6 in all, and web
processes send no writes meanwhile (:func:`shared_pacing_only`); 8 leaves room for a second
worker machine's share, a `manage.py b24 doctor` or a restart overlapping the old processes.
Together they then send at most the portal's rate, and, as each waits for this many intervals
before its first request, never more than ``burst`` even if Redis had just filled the bucket.
With more processes than this, raise it (``processes=``): each of N processes over it adds its
share to the portal's counter, and a portal that then answers ``QUERY_LIMIT_EXCEEDED`` blocks
the key, which delays changes, never loses them."""

WEB_LIMITER_WAIT_S = 0.3
"""The longest a web request sleeps for a slot of a portal's request budget, per call: every web
path (the frame's `profile`, an event sender's `profile`, the results list, an edit's first
try, the install wizard, the admin's "Bind again", the admin site's actions) passes it. Beyond
it the request answers "busy, try again" (503 with `Retry-After`) or leaves the work queued for
Celery (an edit), instead of holding one of gunicorn's few threads while one portal's budget is
spoken for: those threads serve every tenant."""
BACKGROUND_LIMITER_WAIT_S = 30.0
"""The longest background work (Celery tasks, `manage.py b24 doctor`) sleeps for a slot, per
call: it holds no web thread, and waiting spares it a retry."""
BUSY_RETRY_AFTER_S = (5, 120)
"""`Retry-After` of a busy answer, in whole seconds: the default when nothing tells when a slot
is free, and the most it says."""


class RateLimitTimeout(Exception):
    """The next free slot is further away than the caller's ``max_wait``; nothing was reserved."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"next request slot is {retry_after:.2f}s away")
        self.retry_after = retry_after


class SharedPacingUnavailable(RateLimitTimeout):
    """Inside :func:`shared_pacing_only`, the shared schedule (Redis) is unreachable: nothing
    was reserved; ``retry_after`` is when this process asks Redis again."""


_shared_only: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "b24_shared_pacing_only", default=False
)


@contextlib.contextmanager
def shared_pacing_only(enabled: bool = True) -> Iterator[None]:
    """Within this block (this thread or task), a Redis limiter that cannot reach Redis raises
    :class:`SharedPacingUnavailable` instead of pacing on its own. For a web request's write:
    it stays queued for the worker. ``enabled=False`` makes it a no-op, for a caller that
    decides at run time. An in-process limiter (no ``REDIS_URL``) is never refused."""
    token = _shared_only.set(bool(enabled) or _shared_only.get())
    try:
        yield
    finally:
        _shared_only.reset(token)


class RateLimiter(Protocol):
    """What the Bitrix24 client needs from a limiter."""

    def acquire(self, key: str, burst: int, rate: float, *, max_wait: float | None = None) -> float:
        """Reserve a request slot for ``key``, sleep until it and return the seconds waited.

        Raises :class:`RateLimitTimeout` (without reserving) when the wait would exceed
        ``max_wait``.
        """
        ...

    def penalize(self, key: str, seconds: float) -> None:
        """Allow no request for ``key`` for ``seconds``, then resume at the steady rate."""
        ...

    def reset(self, key: str) -> None:
        """Forget everything about ``key`` (an empty bucket)."""
        ...


def limiter_degraded(limiter: RateLimiter) -> bool:
    """Whether ``limiter`` paces this process on its own because its shared store (Redis) is
    unreachable, as of its last attempt. An in-process limiter (no ``REDIS_URL``) never is."""
    return bool(getattr(limiter, "degraded", False))


def busy_retry_after_s(exc: BaseException | None) -> int:
    """`Retry-After` (whole seconds, 1 to the cap of :data:`BUSY_RETRY_AFTER_S`) for a busy
    answer caused by ``exc``: the ``retry_after`` of the first exception in its chain
    (``__cause__``) that has one (our limiter's next slot, Bitrix24's own header), else the
    default."""
    default, cap = BUSY_RETRY_AFTER_S
    seen = 0
    while exc is not None and seen < 10:
        seconds = getattr(exc, "retry_after", None)
        if isinstance(seconds, int | float) and seconds > 0:
            return max(1, min(cap, math.ceil(seconds)))
        exc, seen = exc.__cause__, seen + 1
    return default


def parse_rate(text: str) -> tuple[int, float]:
    """Parse ``"burst/per_second"`` (``B24_RATE_LIMIT``, e.g. ``"50/2"``) into ``(50, 2.0)``."""
    burst_text, sep, rate_text = str(text).strip().partition("/")
    if not sep or "/" in rate_text:
        raise ValueError(f"rate limit {text!r} must look like 'burst/per_second', e.g. '50/2'")
    try:
        burst = int(burst_text.strip())
    except ValueError:
        raise ValueError(f"rate limit {text!r}: burst must be a whole number") from None
    try:
        rate = float(rate_text.strip())
    except ValueError:
        raise ValueError(f"rate limit {text!r}: per_second must be a number") from None
    if burst < 1:
        raise ValueError(f"rate limit {text!r}: burst must be at least 1")
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"rate limit {text!r}: per_second must be a positive number")
    return burst, rate


@dataclass(frozen=True)
class _Schedule:
    """GCRA parameters: seconds between requests and how far ahead a burst may run."""

    interval: float
    tolerance: float

    @classmethod
    def for_limit(cls, burst: int, rate: float) -> _Schedule:
        if burst < 1 or not rate > 0:
            raise ValueError(f"invalid limit burst={burst!r} rate={rate!r}")
        interval = 1.0 / rate
        return cls(interval=interval, tolerance=(max(1, burst - BURST_MARGIN) - 1) * interval)


class LocalLeakyBucket:
    """In-process limiter (threads of one process); same semantics as :class:`RedisLeakyBucket`.

    ``clock`` (monotonic seconds) and ``sleep`` are injectable, so tests can measure pacing
    without waiting for it."""

    degraded = False
    """Never: it shares nothing, so there is nothing to lose."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tat: dict[str, float] = {}  # theoretical arrival time, in seconds of the clock
        self._blocked_until: dict[str, float] = {}

    def acquire(self, key: str, burst: int, rate: float, *, max_wait: float | None = None) -> float:
        schedule = _Schedule.for_limit(burst, rate)
        with self._lock:
            now = self._clock()
            tat = max(self._tat.get(key, now), now)
            blocked_until = self._blocked_until.get(key)
            if blocked_until is not None:
                tat = max(tat, blocked_until + schedule.tolerance)
            wait = max(tat - schedule.tolerance - now, 0.0)
            if max_wait is not None and wait > max_wait:
                raise RateLimitTimeout(wait)
            self._tat[key] = tat + schedule.interval
        if wait > 0:
            self._sleep(wait)
        return wait

    def penalize(self, key: str, seconds: float) -> None:
        with self._lock:
            until = self._clock() + max(seconds, 0.0)
            self._blocked_until[key] = max(self._blocked_until.get(key, until), until)

    def reset(self, key: str) -> None:
        with self._lock:
            self._tat.pop(key, None)
            self._blocked_until.pop(key, None)


# All times in microseconds of Redis' clock. The bucket is a hash {tat, until}; see module doc.
# Returns {granted, wait, tat - now}.
_ACQUIRE_SCRIPT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local max_wait = tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tat', 'until')
local tat = math.max(tonumber(state[1]) or now, now)
if state[2] then
  tat = math.max(tat, tonumber(state[2]) + tolerance)
end
local wait = math.max(tat - tolerance - now, 0)
if max_wait >= 0 and wait > max_wait then
  return {0, wait, tat - now}
end
tat = tat + interval
redis.call('HSET', KEYS[1], 'tat', string.format('%.0f', tat))
redis.call('PEXPIRE', KEYS[1], math.ceil((tat - now) / 1000) + 1000)
return {1, wait, tat - now}
"""

# Block the bucket until at least now + ARGV[1] and keep it ARGV[2] ms beyond that (penalize).
_PENALIZE_SCRIPT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local target = now + tonumber(ARGV[1])
local current = tonumber(redis.call('HGET', KEYS[1], 'until') or '0')
if target > current then
  redis.call('HSET', KEYS[1], 'until', string.format('%.0f', target))
end
local keep_ms = math.ceil(tonumber(ARGV[1]) / 1000) + tonumber(ARGV[2])
if redis.call('PTTL', KEYS[1]) < keep_ms then
  redis.call('PEXPIRE', KEYS[1], keep_ms)
end
return 1
"""

_MICROS = 1_000_000


class RedisLeakyBucket(RedisBacked):
    """Limiter shared by every process and machine that uses the same Redis.

    Fails safe: while Redis is unreachable it is :attr:`degraded` and paces this process on its
    own at burst 1 and ``rate / processes`` (:data:`DEGRADED_PROCESSES`), or refuses inside
    :func:`shared_pacing_only`. It logs one warning per outage, retries Redis after
    ``retry_interval`` seconds and never raises a Redis error into the caller. ``clock`` and
    ``sleep`` drive the in-process pacing and the waits (tests inject them); Redis' schedule runs
    on Redis' own clock.
    """

    NAME = "rate limiter"
    LOGGER = logger

    PENALTY_KEEP_MS = 600_000
    """How long a penalised bucket is kept after its block ends (it is treated as full)."""

    def __init__(
        self,
        redis_url: str,
        prefix: str = "b24:rl:",
        *,
        socket_timeout: float = 0.5,
        retry_interval: float = 5.0,
        processes: int = DEGRADED_PROCESSES,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        if int(processes) < 1:
            raise ValueError("the assumed number of processes must be at least 1")
        super().__init__(redis_url, socket_timeout=socket_timeout, retry_interval=retry_interval)
        self._prefix = prefix
        self._acquire_script = self._redis.register_script(_ACQUIRE_SCRIPT)
        self._penalize_script = self._redis.register_script(_PENALIZE_SCRIPT)
        self.processes = int(processes)
        self._clock = clock
        self._sleep = sleep
        self._local = LocalLeakyBucket(clock=clock, sleep=sleep)
        self._horizon: dict[str, float] = {}  # key -> clock time Redis' schedule may run to
        self._paced_locally: set[str] = set()  # keys paced in-process since their last Redis use

    def _while_down(self) -> str:
        return f"pacing this process alone at burst 1 and 1/{self.processes} of the rate"

    def acquire(self, key: str, burst: int, rate: float, *, max_wait: float | None = None) -> float:
        schedule = _Schedule.for_limit(burst, rate)
        if self._redis_usable():
            try:
                return self._redis_acquire(key, schedule, max_wait)
            except redis.RedisError as exc:
                self._redis_failed(exc)
        if _shared_only.get():
            raise SharedPacingUnavailable(self._retry_interval)
        self._start_locally(key, schedule)
        return self._local.acquire(key, 1, rate / self.processes, max_wait=max_wait)

    def penalize(self, key: str, seconds: float) -> None:
        self._local.penalize(key, seconds)
        self._shared(self._redis_penalize, key, seconds)

    def reset(self, key: str) -> None:
        self._local.reset(key)
        with self._state_lock:
            self._horizon.pop(key, None)
            self._paced_locally.discard(key)
        self._shared(self._redis.delete, self._prefix + key)

    def _redis_acquire(self, key: str, schedule: _Schedule, max_wait: float | None) -> float:
        """Reserve through Redis (raises RateLimitTimeout or a Redis error)."""
        with self._state_lock:
            back = key in self._paced_locally
        if back:  # Redis' state is stale or lost: it starts full, at the steady rate
            self._redis_penalize(key, 0.0)
            with self._state_lock:
                self._paced_locally.discard(key)
        granted, wait_us, ahead_us = self._acquire_script(
            keys=[self._prefix + key],
            args=[
                round(schedule.interval * _MICROS),
                round(schedule.tolerance * _MICROS),
                -1 if max_wait is None else round(max_wait * _MICROS),
            ],
        )
        self._redis_ok()
        wait = int(wait_us) / _MICROS
        self._horizon_seen(key, int(ahead_us) / _MICROS, schedule)
        if not int(granted):
            raise RateLimitTimeout(wait)
        if wait > 0:
            self._sleep(wait)
        return wait

    def _redis_penalize(self, key: str, seconds: float) -> None:
        self._penalize_script(
            keys=[self._prefix + key],
            args=[round(max(seconds, 0.0) * _MICROS), self.PENALTY_KEEP_MS],
        )

    def _horizon_seen(self, key: str, ahead: float, schedule: _Schedule) -> None:
        """Remember how far Redis' schedule for ``key`` may run: ``ahead`` (its tat after our
        reservation) plus the queue waiting then, since each waiting caller may reserve once
        more before we hear of an outage."""
        queue = max(0.0, ahead - schedule.tolerance - schedule.interval)
        until = self._clock() + ahead + queue
        with self._state_lock:
            self._horizon[key] = max(self._horizon.get(key, until), until)

    def _start_locally(self, key: str, schedule: _Schedule) -> None:
        """The first in-process pacing of ``key`` since Redis paced it: block it until the slots
        Redis gave out are sent, and for at least ``processes`` intervals (see the module doc)."""
        with self._state_lock:
            if key in self._paced_locally:
                return
            self._paced_locally.add(key)
            horizon = self._horizon.pop(key, 0.0) - self._clock()
        self._local.penalize(key, max(horizon, self.processes * schedule.interval))


def limiter_from_url(redis_url: str | None, *, processes: int = DEGRADED_PROCESSES) -> RateLimiter:
    """The shared Redis limiter for ``REDIS_URL`` (pacing on its own at burst 1 and
    ``rate / processes`` while Redis is unreachable), or an in-process one when it is unset."""
    if redis_url:
        return RedisLeakyBucket(redis_url, processes=processes)
    return LocalLeakyBucket()
