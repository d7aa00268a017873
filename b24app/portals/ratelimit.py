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
script and Redis' own clock; :class:`LocalLeakyBucket` does the same inside one process. While
Redis is unreachable the Redis limiter hands over to a stand-in shared through the database
(``ratelimit_db.DatabaseLeakyBucket``). The two hand-overs differ in what they can know:

* **Redis to the database.** Redis is gone, so its schedule is known only from this process's
  own replies. The stand-in is blocked until the last slot this process saw Redis give out, plus
  the queue that was waiting then (each waiting caller may have reserved once more), and then
  starts full (the burst is not used again). Other processes' reservations that this misses are
  absorbed while they are fewer than that queue plus ``burst - 3``.
* **Redis lost its data** (a restart, a fail-over, a flush) while this process did not notice an
  outage: an epoch key in Redis changes, and the process carries what it knows of the old
  schedule (as above) into the new one before reserving.
* **The database back to Redis.** The stand-in's row is shared, so the hand-back is exact: the
  first process that finds Redis working marks the row *released* (no slot is given there any
  more) and carries its schedule over into Redis before reserving there. Processes still pacing
  through the database see the mark on their next call and move to Redis at once, carrying the
  same schedule over, instead of waiting for their own retry.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = [
    "BACKGROUND_LIMITER_WAIT_S",
    "WEB_LIMITER_WAIT_S",
    "FallbackReleased",
    "LocalLeakyBucket",
    "RateLimitTimeout",
    "RateLimiter",
    "RedisLeakyBucket",
    "StandIn",
    "limiter_from_url",
    "busy_retry_after_s",
    "parse_rate",
    "schedule_for",
]

logger = logging.getLogger("b24app.ratelimit")

BURST_MARGIN = 2
"""Requests of the portal's burst we leave unused to absorb jitter."""

FALLBACK_RATE_SHARE = 0.25
"""Share of the rate one process uses on its own when no shared store is reachable (burst 1)."""

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


class FallbackReleased(Exception):
    """The stand-in no longer paces this key: a process found Redis working and took the
    schedule back. Nothing was reserved; the caller should pace through Redis."""


class StandIn(RateLimiter, Protocol):
    """What the Redis limiter needs from the store that stands in for it during an outage.

    ``acquire`` raises :class:`FallbackReleased` once the key was released, until it is taken.
    """

    def take(self, key: str, seconds: float) -> None:
        """Pace ``key`` here (again): allow no request for ``seconds``, then the steady rate."""
        ...

    def release(self, key: str, burst: int, rate: float) -> float | None:
        """Stop giving slots for ``key`` and return how far its schedule runs ahead of now, in
        seconds (GCRA ``tat - now``; may be negative), or None if this store never paced it."""
        ...


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


def schedule_for(burst: int, rate: float) -> _Schedule:
    """The GCRA parameters (``interval``, ``tolerance`` in seconds) for a portal's limit."""
    return _Schedule.for_limit(burst, rate)


class LocalLeakyBucket:
    """In-process limiter (threads of one process); same semantics as :class:`RedisLeakyBucket`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tat: dict[str, float] = {}  # theoretical arrival time, time.monotonic() seconds
        self._blocked_until: dict[str, float] = {}

    def acquire(self, key: str, burst: int, rate: float, *, max_wait: float | None = None) -> float:
        schedule = _Schedule.for_limit(burst, rate)
        with self._lock:
            now = time.monotonic()
            tat = max(self._tat.get(key, now), now)
            blocked_until = self._blocked_until.get(key)
            if blocked_until is not None:
                tat = max(tat, blocked_until + schedule.tolerance)
            wait = max(tat - schedule.tolerance - now, 0.0)
            if max_wait is not None and wait > max_wait:
                raise RateLimitTimeout(wait)
            self._tat[key] = tat + schedule.interval
        if wait > 0:
            time.sleep(wait)
        return wait

    def penalize(self, key: str, seconds: float) -> None:
        with self._lock:
            until = time.monotonic() + max(seconds, 0.0)
            self._blocked_until[key] = max(self._blocked_until.get(key, until), until)

    def reset(self, key: str) -> None:
        with self._lock:
            self._tat.pop(key, None)
            self._blocked_until.pop(key, None)

    def horizon(self, key: str, burst: int, rate: float) -> float | None:
        """How far ``key``'s schedule runs ahead of now (``tat - now``, blocks included), or
        None if this limiter never paced it."""
        schedule = _Schedule.for_limit(burst, rate)
        with self._lock:
            tat = self._tat.get(key)
            blocked_until = self._blocked_until.get(key)
            if tat is None and blocked_until is None:
                return None
            if blocked_until is not None:
                tat = max(tat or 0.0, blocked_until + schedule.tolerance)
            return tat - time.monotonic()


# All times in microseconds of Redis' clock. The bucket is a hash {tat, until}; see module doc.
# KEYS[2] holds Redis' epoch: a random id set when it is missing, i.e. on first use and after
# Redis lost its data (a restart, a fail-over, a flush). A caller that knew another epoch for
# this bucket carries its own knowledge of the schedule (ARGV[6] ahead of now) over first.
_ACQUIRE_SCRIPT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local max_wait = tonumber(ARGV[3])
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  epoch = ARGV[5]
  redis.call('SET', KEYS[2], epoch)
end
local state = redis.call('HMGET', KEYS[1], 'tat', 'until')
local tat = math.max(tonumber(state[1]) or now, now)
if ARGV[4] ~= '' and ARGV[4] ~= epoch then
  tat = math.max(tat, now + tonumber(ARGV[6]))
end
if state[2] then
  tat = math.max(tat, tonumber(state[2]) + tolerance)
end
local wait = math.max(tat - tolerance - now, 0)
if max_wait >= 0 and wait > max_wait then
  return {0, wait, tat - now, epoch}
end
tat = tat + interval
redis.call('HSET', KEYS[1], 'tat', string.format('%.0f', tat))
redis.call('PEXPIRE', KEYS[1], math.ceil((tat - now) / 1000) + 1000)
return {1, wait, tat - now, epoch}
"""

# Raise the bucket's field ARGV[1] to at least now + ARGV[2] and keep the bucket ARGV[3] ms beyond
# that: 'until' for a penalty (see penalize), 'tat' to carry a schedule over from the stand-in.
_RAISE_SCRIPT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local target = now + tonumber(ARGV[2])
local current = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if target > current then
  redis.call('HSET', KEYS[1], ARGV[1], string.format('%.0f', target))
end
local keep_ms = math.ceil(tonumber(ARGV[2]) / 1000) + tonumber(ARGV[3])
if redis.call('PTTL', KEYS[1]) < keep_ms then
  redis.call('PEXPIRE', KEYS[1], keep_ms)
end
return 1
"""

_MICROS = 1_000_000

SWITCH_ATTEMPTS = 3
"""Moves between Redis and the stand-in one acquire may make before pacing in-process."""


class RedisLeakyBucket:
    """Limiter shared by every process and machine that uses the same Redis.

    Fails safe: while Redis is unreachable it paces through ``fallback`` (the database-backed
    stand-in in the app, shared by all processes too), or, without one, each process on its own
    at burst 1 and :data:`FALLBACK_RATE_SHARE` of the rate. It logs one warning per outage,
    retries Redis after ``retry_interval`` seconds (at once when another process found it back)
    and never raises a Redis error into the caller. :attr:`degraded` says whether the last
    attempt found Redis down. See the module doc for the two hand-overs.
    """

    PENALTY_KEEP_MS = 600_000
    """How long a penalised bucket is kept after its block ends (it is treated as full)."""

    def __init__(
        self,
        redis_url: str,
        prefix: str = "b24:rl:",
        *,
        socket_timeout: float = 0.5,
        retry_interval: float = 5.0,
        fallback: StandIn | None = None,
    ) -> None:
        self._redis = redis.Redis.from_url(
            redis_url,
            socket_connect_timeout=socket_timeout,
            socket_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 1),
        )
        self._prefix = prefix
        self._acquire_script = self._redis.register_script(_ACQUIRE_SCRIPT)
        self._raise_script = self._redis.register_script(_RAISE_SCRIPT)
        self._fallback = fallback
        self._process_only = LocalLeakyBucket()
        self._retry_interval = retry_interval
        self._state_lock = threading.Lock()
        self._skip_redis_until: float | None = None  # time.monotonic(); None while Redis is fine
        self._store_of: dict[str, str] = {}  # key -> "redis" | "fallback": where it was paced last
        self._horizon: dict[str, float] = {}  # key -> monotonic time Redis' schedule may run to
        self._epoch_of: dict[str, str] = {}  # key -> Redis' epoch at our last reservation
        self._epoch_key = prefix + "~epoch"  # "~" cannot occur in a member_id

    @property
    def degraded(self) -> bool:
        with self._state_lock:
            return self._skip_redis_until is not None

    def acquire(self, key: str, burst: int, rate: float, *, max_wait: float | None = None) -> float:
        schedule = _Schedule.for_limit(burst, rate)
        for _ in range(SWITCH_ATTEMPTS):
            if self._redis_usable():
                try:
                    return self._redis_acquire(key, burst, rate, schedule, max_wait)
                except redis.RedisError as exc:
                    self._redis_failed(exc)
            if self._fallback is None:
                break
            if self._switch_to(key, "fallback"):
                # What Redis gave out before it died is still to be sent: start after it.
                self._fallback.take(key, self._horizon_left(key))
            try:
                return self._fallback.acquire(key, burst, rate, max_wait=max_wait)
            except FallbackReleased:
                self._redis_found_back()
        return self._process_only.acquire(key, 1, rate * FALLBACK_RATE_SHARE, max_wait=max_wait)

    def penalize(self, key: str, seconds: float) -> None:
        self._process_only.penalize(key, seconds)
        if self._fallback is not None:
            self._fallback.penalize(key, seconds)
        if not self._redis_usable():
            return
        try:
            self._redis_penalize(key, seconds)
        except redis.RedisError as exc:
            self._redis_failed(exc)
        else:
            self._redis_ok()

    def reset(self, key: str) -> None:
        self._process_only.reset(key)
        if self._fallback is not None:
            self._fallback.reset(key)
        with self._state_lock:
            self._store_of.pop(key, None)
        if not self._redis_usable():
            return
        try:
            self._redis.delete(self._prefix + key)
        except redis.RedisError as exc:
            self._redis_failed(exc)
        else:
            self._redis_ok()

    def _redis_acquire(
        self, key: str, burst: int, rate: float, schedule: _Schedule, max_wait: float | None
    ) -> float:
        """Reserve through Redis (raises RateLimitTimeout or a Redis error)."""
        if self._switch_to(key, "redis"):
            self._take_back(key, burst, rate)
        with self._state_lock:
            known_epoch = self._epoch_of.get(key, "")
        granted, wait_us, ahead_us, epoch = self._acquire_script(
            keys=[self._prefix + key, self._epoch_key],
            args=[
                round(schedule.interval * _MICROS),
                round(schedule.tolerance * _MICROS),
                -1 if max_wait is None else round(max_wait * _MICROS),
                known_epoch,
                secrets.token_hex(8),
                round(self._horizon_left(key) * _MICROS),
            ],
        )
        self._redis_ok()
        wait = int(wait_us) / _MICROS
        with self._state_lock:
            self._epoch_of[key] = epoch.decode() if isinstance(epoch, bytes) else str(epoch)
        self._horizon_seen(key, int(ahead_us) / _MICROS, schedule)
        if not int(granted):
            raise RateLimitTimeout(wait)
        if wait > 0:
            time.sleep(wait)
        return wait

    def _take_back(self, key: str, burst: int, rate: float) -> None:
        """``key`` was paced by the stand-in: stop it there and carry its schedule into Redis
        (whose own state is lost or stale), so that no slot the stand-in gave is given twice."""
        if self._fallback is None:
            self._redis_penalize(key, 0.0)  # the process-only pacing knew nothing: start full
            return
        ahead = self._fallback.release(key, burst, rate)
        if ahead is not None and ahead > 0:
            self._raise_script(
                keys=[self._prefix + key], args=["tat", round(ahead * _MICROS), 1000]
            )

    def _redis_penalize(self, key: str, seconds: float) -> None:
        self._raise_script(
            keys=[self._prefix + key],
            args=["until", round(max(seconds, 0.0) * _MICROS), self.PENALTY_KEEP_MS],
        )

    def _horizon_seen(self, key: str, ahead: float, schedule: _Schedule) -> None:
        """Remember how far Redis' schedule for ``key`` may run: ``ahead`` (its tat after our
        reservation) plus the queue waiting then, since each waiting caller may reserve once
        more before we hear of an outage."""
        queue = max(0.0, ahead - schedule.tolerance - schedule.interval)
        until = time.monotonic() + ahead + queue
        with self._state_lock:
            self._horizon[key] = max(self._horizon.get(key, until), until)

    def _horizon_left(self, key: str) -> float:
        with self._state_lock:
            return max(0.0, self._horizon.get(key, 0.0) - time.monotonic())

    def _switch_to(self, key: str, store: str) -> bool:
        """Record that ``key`` is paced by ``store`` now; True if it was not before (for the
        stand-in: also when this process never paced it, since its row may be released)."""
        with self._state_lock:
            previous = self._store_of.get(key)
            self._store_of[key] = store
        if store == "redis":
            return previous == "fallback"
        return previous != "fallback"

    def _redis_usable(self) -> bool:
        with self._state_lock:
            return self._skip_redis_until is None or time.monotonic() >= self._skip_redis_until

    def _redis_found_back(self) -> None:
        """Another process paces through Redis again: try it now, not after our retry wait."""
        with self._state_lock:
            if self._skip_redis_until is not None:
                self._skip_redis_until = time.monotonic()

    def _redis_failed(self, exc: redis.RedisError) -> None:
        with self._state_lock:
            first_failure = self._skip_redis_until is None
            self._skip_redis_until = time.monotonic() + self._retry_interval
        if first_failure:
            logger.warning(
                "rate limiter: Redis unavailable (%s); pacing through %s until it is back",
                type(exc).__name__,
                "the database"
                if self._fallback is not None
                else f"this process alone at {FALLBACK_RATE_SHARE:.0%} of the portal rate",
            )

    def _redis_ok(self) -> None:
        with self._state_lock:
            recovered = self._skip_redis_until is not None
            self._skip_redis_until = None
        if recovered:
            logger.info("rate limiter: Redis is back; shared pacing resumed")


def limiter_from_url(redis_url: str | None, *, fallback: StandIn | None = None) -> RateLimiter:
    """The shared Redis limiter for ``REDIS_URL`` (with ``fallback`` for its outages), or an
    in-process one when it is unset."""
    if redis_url:
        return RedisLeakyBucket(redis_url, fallback=fallback)
    return LocalLeakyBucket()
