"""Redis with an in-process stand-in: what the shared limiter, breaker and in-flight cap have in
common.

Each of them keeps its state in Redis so that every process and machine sees the same, and
decides in-process while Redis is unreachable. :class:`RedisBacked` is that common part: one
client with short timeouts and no retry of its own, one warning per outage, and a retry of
Redis ``retry_interval`` seconds after a failure (until then Redis is not asked, so an outage
costs a caller one timeout, not one per call). It never raises a Redis error; the subclass
catches ``redis.RedisError`` around its own calls and reports it here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = ["UNREACHABLE", "RedisBacked"]

UNREACHABLE: Any = object()
"""What :meth:`RedisBacked._shared` returns when Redis was not asked or did not answer."""


class RedisBacked:
    """Base of a Redis-shared component with a process-local stand-in; see module doc.

    Subclasses set :attr:`NAME` and :attr:`LOGGER` for the log, and may say what the process
    does meanwhile (:meth:`_while_down`)."""

    NAME = "redis-backed state"
    LOGGER = logging.getLogger("b24app.breaker")

    def __init__(self, redis_url: str, *, socket_timeout: float, retry_interval: float) -> None:
        self._redis = redis.Redis.from_url(
            redis_url,
            socket_connect_timeout=socket_timeout,
            socket_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 1),
        )
        self._retry_interval = retry_interval
        self._state_lock = threading.Lock()
        self._skip_redis_until: float | None = None  # time.monotonic(); None while Redis is fine

    @property
    def degraded(self) -> bool:
        """Whether the last attempt found Redis unreachable (and none succeeded since)."""
        with self._state_lock:
            return self._skip_redis_until is not None

    def _shared(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``call(*args, **kwargs)`` on Redis, or :data:`UNREACHABLE` when Redis is being
        skipped after a failure or fails now (which is recorded and logged once)."""
        if not self._redis_usable():
            return UNREACHABLE
        try:
            result = call(*args, **kwargs)
        except redis.RedisError as exc:
            self._redis_failed(exc)
            return UNREACHABLE
        self._redis_ok()
        return result

    def _redis_usable(self) -> bool:
        with self._state_lock:
            return self._skip_redis_until is None or time.monotonic() >= self._skip_redis_until

    def _redis_failed(self, exc: redis.RedisError) -> None:
        with self._state_lock:
            first = self._skip_redis_until is None
            self._skip_redis_until = time.monotonic() + self._retry_interval
        if first:
            self.LOGGER.warning(
                "%s: Redis unavailable (%s); %s until it is back",
                self.NAME,
                type(exc).__name__,
                self._while_down(),
            )

    def _redis_ok(self) -> None:
        with self._state_lock:
            recovered = self._skip_redis_until is not None
            self._skip_redis_until = None
        if recovered:
            self.LOGGER.info("%s: Redis is back; shared state resumed", self.NAME)

    def _while_down(self) -> str:
        """What this process does while Redis is unreachable, for the outage's warning."""
        return "this process decides on its own"
