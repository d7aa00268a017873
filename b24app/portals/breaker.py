"""What keeps one tenant's broken portal from costing the others: a circuit breaker per portal
host and a cap on the requests in flight to one portal.

**Circuit breaker.** After ``threshold`` consecutive transport failures to one portal host
(connect errors, timeouts, the call's deadline, an oversized answer, a 5xx without a Bitrix24
error body) the breaker *opens*: for ``cooldown`` seconds every call to that host fails at once,
without a request, and without waiting for a rate-limit slot. Then it is *half-open*: one call
(the probe) is let through and the others still fail fast; the probe's success closes the
breaker, its failure opens it for another cool-down. Any answer from the portal, an error
answer included (``QUERY_LIMIT_EXCEEDED``, a validation error), counts as a success: the host is
reachable. State is keyed by the portal's host, never by a token.

**In-flight cap.** At most ``limit`` requests to one portal (its ``member_id``) are in flight at
once. A slot is held from just before the request is sent until its answer is read (a request
lasts at most the transport's deadline) and carries a time to live, so a killed worker does not
hold it for ever.

:class:`RedisCircuitBreaker` and :class:`RedisInflightLimiter` share their state between every
process and machine through Redis. While Redis is unreachable each falls back to its in-process
counterpart (:class:`LocalCircuitBreaker`, :class:`LocalInflightLimiter`), logs one warning per
outage, retries Redis after ``retry_interval`` seconds and never raises a Redis error into the
caller (``redisbacked.RedisBacked``, as the rate limiter). The breaker's clock is injectable
(``clock``, wall seconds, shared in meaning across machines); the in-flight slots' time to live
runs on Redis' own clock.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Protocol

import redis

from b24app.portals.redisbacked import UNREACHABLE, RedisBacked

__all__ = [
    "BreakerOpen",
    "CircuitBreaker",
    "InflightLimiter",
    "InflightTimeout",
    "LocalCircuitBreaker",
    "LocalInflightLimiter",
    "RedisCircuitBreaker",
    "RedisInflightLimiter",
    "breaker_from_url",
    "inflight_from_url",
]

logger = logging.getLogger("b24app.breaker")

PROBE_LEASE_S = 60.0
"""How long a half-open breaker waits for its probe's outcome before it lets another one go
(a probe whose process died reports nothing)."""

PROBE_RETRY_S = 2.0
"""The ``retry_after`` of a call refused while the probe is out: its outcome comes soon (within
the probe's deadline), so try again shortly rather than after the probe's whole lease."""


class BreakerOpen(Exception):
    """The breaker for this host is open (or its probe is out): no request may be sent now."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"portal host blocked for {retry_after:.1f}s")
        self.retry_after = retry_after


class InflightTimeout(Exception):
    """No in-flight slot for this portal became free within the caller's wait."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"no in-flight slot; one frees in about {retry_after:.1f}s")
        self.retry_after = retry_after


class CircuitBreaker(Protocol):
    """What the Bitrix24 client needs from a breaker."""

    def before(self, key: str) -> bool:
        """May a request to ``key`` go now? True when it is the half-open probe; raises
        :class:`BreakerOpen` when it may not."""
        ...

    def succeeded(self, key: str) -> None:
        """The host answered: close the breaker and forget the failures."""
        ...

    def failed(self, key: str) -> None:
        """A transport failure: count it; open the breaker at the threshold or after a probe."""
        ...

    def abandoned(self, key: str, probe: bool) -> None:
        """A call let through sent nothing (e.g. no rate-limit slot); a probe's turn passes on."""
        ...

    def reset(self, key: str) -> None:
        """Forget everything about ``key``."""
        ...


class InflightLimiter(Protocol):
    """What the Bitrix24 client needs from an in-flight cap."""

    def acquire(self, key: str, limit: int, *, max_wait: float, ttl: float) -> str:
        """Take one of ``limit`` slots for ``key`` within ``max_wait`` seconds; returns the
        slot's id for :meth:`release`. Raises :class:`InflightTimeout`."""
        ...

    def release(self, key: str, slot: str) -> None: ...


def _check_breaker_settings(threshold: int, cooldown: float) -> None:
    if int(threshold) < 1:
        raise ValueError("the breaker's threshold must be at least 1 failure")
    if not cooldown > 0:
        raise ValueError("the breaker's cool-down must be a positive number of seconds")


class LocalCircuitBreaker:
    """In-process breaker (threads of one process); same rules as :class:`RedisCircuitBreaker`."""

    def __init__(
        self,
        threshold: int = 5,
        cooldown: float = 30.0,
        *,
        clock: Callable[[], float] = time.time,
        probe_lease: float = PROBE_LEASE_S,
    ) -> None:
        _check_breaker_settings(threshold, cooldown)
        self.threshold = int(threshold)
        self.cooldown = float(cooldown)
        self.probe_lease = float(probe_lease)
        self._clock = clock
        self._lock = threading.Lock()
        self._fails: dict[str, int] = {}
        self._open_until: dict[str, float] = {}
        self._probe_until: dict[str, float] = {}

    def before(self, key: str) -> bool:
        with self._lock:
            now = self._clock()
            open_until = self._open_until.get(key)
            if open_until is None:
                return False
            if now < open_until:
                raise BreakerOpen(open_until - now)
            probe_until = self._probe_until.get(key)
            if probe_until is not None and now < probe_until:
                raise BreakerOpen(min(probe_until - now, PROBE_RETRY_S))
            self._probe_until[key] = now + self.probe_lease
            return True

    def succeeded(self, key: str) -> None:
        with self._lock:
            was_open = key in self._open_until
            self._forget(key)
        if was_open:
            logger.info("circuit breaker closed host=%s", key)

    def failed(self, key: str) -> None:
        with self._lock:
            fails = self._fails.get(key, 0) + 1
            self._fails[key] = fails
            if fails < self.threshold and key not in self._open_until:
                return
            self._open_until[key] = self._clock() + self.cooldown
            self._probe_until.pop(key, None)
        logger.warning(
            "circuit breaker open host=%s failures=%s cooldown_s=%s", key, fails, self.cooldown
        )

    def abandoned(self, key: str, probe: bool) -> None:
        if probe:
            with self._lock:
                self._probe_until.pop(key, None)

    def reset(self, key: str) -> None:
        with self._lock:
            self._forget(key)

    def _forget(self, key: str) -> None:
        self._fails.pop(key, None)
        self._open_until.pop(key, None)
        self._probe_until.pop(key, None)


# The breaker is a hash {fails, open_until, probe_until}; times are the caller's clock (ARGV[1]).
_BEFORE_SCRIPT = """
local now = tonumber(ARGV[1])
local state = redis.call('HMGET', KEYS[1], 'open_until', 'probe_until')
local open_until = tonumber(state[1])
if not open_until then
  return {1, '0', 0}
end
if now < open_until then
  return {0, tostring(open_until - now), 0}
end
local probe_until = tonumber(state[2])
if probe_until and now < probe_until then
  return {0, tostring(math.min(probe_until - now, tonumber(ARGV[3]))), 0}
end
redis.call('HSET', KEYS[1], 'probe_until', tostring(now + tonumber(ARGV[2])))
return {1, '0', 1}
"""

# ARGV: now, threshold, cooldown, keep (ms). Returns the failure count when this failure opened
# (or re-opened) the breaker, 0 otherwise.
_FAILED_SCRIPT = """
local now = tonumber(ARGV[1])
local fails = redis.call('HINCRBY', KEYS[1], 'fails', 1)
local open_until = redis.call('HGET', KEYS[1], 'open_until')
local opened = 0
if fails >= tonumber(ARGV[2]) or open_until then
  redis.call('HSET', KEYS[1], 'open_until', tostring(now + tonumber(ARGV[3])))
  redis.call('HDEL', KEYS[1], 'probe_until')
  opened = fails
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]))
return opened
"""


class RedisCircuitBreaker(RedisBacked):
    """Breaker shared by every process and machine that uses the same Redis; see module doc."""

    NAME = "circuit breaker"
    LOGGER = logger

    def __init__(
        self,
        redis_url: str,
        threshold: int = 5,
        cooldown: float = 30.0,
        *,
        prefix: str = "b24:cb:",
        clock: Callable[[], float] = time.time,
        probe_lease: float = PROBE_LEASE_S,
        socket_timeout: float = 0.5,
        retry_interval: float = 5.0,
    ) -> None:
        _check_breaker_settings(threshold, cooldown)
        super().__init__(redis_url, socket_timeout=socket_timeout, retry_interval=retry_interval)
        self.threshold = int(threshold)
        self.cooldown = float(cooldown)
        self.probe_lease = float(probe_lease)
        self._prefix = prefix
        self._clock = clock
        self._before_script = self._redis.register_script(_BEFORE_SCRIPT)
        self._failed_script = self._redis.register_script(_FAILED_SCRIPT)
        self._local = LocalCircuitBreaker(threshold, cooldown, clock=clock, probe_lease=probe_lease)
        # How long a key outlives its last failure: a cool-down, a probe's lease and 10 minutes.
        self._keep_ms = round((self.cooldown + self.probe_lease + 600) * 1000)

    def before(self, key: str) -> bool:
        outcome = self._shared(
            self._before_script,
            keys=[self._prefix + key],
            args=[repr(self._clock()), self.probe_lease, PROBE_RETRY_S],
        )
        if outcome is UNREACHABLE:
            return self._local.before(key)
        allowed, wait, probe = outcome
        if not int(allowed):
            raise BreakerOpen(float(wait))
        return bool(int(probe))

    def succeeded(self, key: str) -> None:
        self._local.succeeded(key)
        self._shared(self._redis.delete, self._prefix + key)

    def failed(self, key: str) -> None:
        opened = self._shared(
            self._failed_script,
            keys=[self._prefix + key],
            args=[repr(self._clock()), self.threshold, self.cooldown, self._keep_ms],
        )
        if opened is UNREACHABLE:
            self._local.failed(key)
        elif int(opened):
            logger.warning(
                "circuit breaker open host=%s failures=%s cooldown_s=%s",
                key,
                int(opened),
                self.cooldown,
            )

    def abandoned(self, key: str, probe: bool) -> None:
        self._local.abandoned(key, probe)
        if probe:
            self._shared(self._redis.hdel, self._prefix + key, "probe_until")

    def reset(self, key: str) -> None:
        self._local.reset(key)
        self._shared(self._redis.delete, self._prefix + key)


def _poll_intervals() -> Callable[[], float]:
    """Growing pauses between tries for a slot: 10 ms doubling up to 100 ms."""
    state = {"next": 0.01}

    def pause() -> float:
        current = state["next"]
        state["next"] = min(0.1, current * 2)
        return current

    return pause


class LocalInflightLimiter:
    """In-process in-flight cap (threads of one process)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held: dict[str, set[str]] = {}

    def acquire(self, key: str, limit: int, *, max_wait: float, ttl: float = 0.0) -> str:
        if int(limit) < 1:
            raise ValueError("the in-flight limit must be at least 1")
        slot = secrets.token_hex(8)
        give_up = time.monotonic() + max(0.0, max_wait)
        with self._cond:
            while len(self._held.get(key, ())) >= limit:
                left = give_up - time.monotonic()
                if left <= 0:
                    raise InflightTimeout(1.0)
                self._cond.wait(left)
            self._held.setdefault(key, set()).add(slot)
        return slot

    def release(self, key: str, slot: str) -> None:
        with self._cond:
            held = self._held.get(key)
            if held is not None:
                held.discard(slot)
                if not held:
                    del self._held[key]
            self._cond.notify_all()

    def in_flight(self, key: str) -> int:
        with self._cond:
            return len(self._held.get(key, ()))


# A sorted set of slot ids scored by their expiry (ms of Redis' clock). ARGV: slot, limit, ttl
# ms. Returns {1, 0} when taken, {0, ms until the oldest slot expires} when full.
_INFLIGHT_ACQUIRE_SCRIPT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local ttl = tonumber(ARGV[3])
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
  if redis.call('PTTL', KEYS[1]) < ttl then
    redis.call('PEXPIRE', KEYS[1], ttl)
  end
  return {1, 0}
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {0, tonumber(oldest[2]) - now}
"""


class RedisInflightLimiter(RedisBacked):
    """In-flight cap shared by every process and machine that uses the same Redis."""

    NAME = "in-flight cap"
    LOGGER = logger

    def __init__(
        self,
        redis_url: str,
        *,
        prefix: str = "b24:if:",
        socket_timeout: float = 0.5,
        retry_interval: float = 5.0,
    ) -> None:
        super().__init__(redis_url, socket_timeout=socket_timeout, retry_interval=retry_interval)
        self._prefix = prefix
        self._acquire_script = self._redis.register_script(_INFLIGHT_ACQUIRE_SCRIPT)
        self._local = LocalInflightLimiter()
        self._local_slots: set[str] = set()
        self._slots_lock = threading.Lock()

    def acquire(self, key: str, limit: int, *, max_wait: float, ttl: float) -> str:
        if int(limit) < 1:
            raise ValueError("the in-flight limit must be at least 1")
        slot = f"{_process_namespace()}:{os.getpid()}:{secrets.token_hex(8)}"
        give_up = time.monotonic() + max(0.0, max_wait)
        pause = _poll_intervals()
        ttl_ms = max(1000, round(ttl * 1000))
        while self._redis_usable():
            try:
                taken, wait_ms = self._acquire_script(
                    keys=[self._prefix + key], args=[slot, int(limit), ttl_ms]
                )
                if not int(taken) and self._reap_dead(key):
                    continue  # a dead process's slot was freed: try again at once
            except redis.RedisError as exc:
                self._redis_failed(exc)
                break
            self._redis_ok()
            if int(taken):
                return slot
            left = give_up - time.monotonic()
            if left <= 0:
                raise InflightTimeout(max(0.1, min(int(wait_ms) / 1000, ttl)))
            time.sleep(min(pause(), left))
        slot = self._local.acquire(key, limit, max_wait=max(0.0, give_up - time.monotonic()))
        with self._slots_lock:
            self._local_slots.add(slot)
        return slot

    def _reap_dead(self, key: str) -> bool:
        """Free the slots of processes of this machine (this PID namespace) that are gone, a
        killed worker's: True if one was freed. Other machines' slots end by their TTL."""
        mine = _process_namespace() + ":"
        dead = []
        for raw in self._redis.zrange(self._prefix + key, 0, -1):
            member = raw.decode() if isinstance(raw, bytes) else str(raw)
            if not member.startswith(mine):
                continue
            pid = member[len(mine) :].split(":", 1)[0]
            if pid.isdigit() and not _process_alive(int(pid)):
                dead.append(member)
        if not dead:
            return False
        freed = self._redis.zrem(self._prefix + key, *dead)
        if freed:
            logger.info("in-flight cap: freed %s slot(s) of dead processes key=%s", freed, key)
        return bool(freed)

    def release(self, key: str, slot: str) -> None:
        with self._slots_lock:
            local = slot in self._local_slots
            self._local_slots.discard(slot)
        if local:
            self._local.release(key, slot)
            return
        try:
            self._redis.zrem(self._prefix + key, slot)
        except redis.RedisError as exc:
            self._redis_failed(exc)  # the slot's time to live frees it


_namespace: str | None = None


def _process_namespace() -> str:
    """What makes a process id mean one process: this machine's boot and PID namespace (no
    ``:``). Slots carry it, so a process can tell which slots belong to its own neighbours."""
    global _namespace
    if _namespace is None:
        try:
            with open("/proc/sys/kernel/random/boot_id") as boot:
                boot_id = boot.read().strip()
            namespace = os.stat("/proc/self/ns/pid").st_ino
            _namespace = f"{boot_id}.{namespace}".replace(":", "")
        except OSError:  # no /proc: a name of this machine, and no reaping across it
            _namespace = (
                "host-" + socket.gethostname().replace(":", "") + "-" + secrets.token_hex(4)
            )
    return _namespace


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def breaker_from_url(
    redis_url: str | None,
    threshold: int,
    cooldown: float,
    *,
    clock: Callable[[], float] = time.time,
) -> CircuitBreaker:
    """The shared Redis breaker for ``REDIS_URL``, or an in-process one when it is unset."""
    if redis_url:
        return RedisCircuitBreaker(redis_url, threshold, cooldown, clock=clock)
    return LocalCircuitBreaker(threshold, cooldown, clock=clock)


def inflight_from_url(redis_url: str | None) -> InflightLimiter:
    """The shared Redis in-flight cap for ``REDIS_URL``, or an in-process one when it is unset."""
    if redis_url:
        return RedisInflightLimiter(redis_url)
    return LocalInflightLimiter()
