"""Bitrix24 cloud limits (§7): the request-rate leaky bucket and the
per-method "operating" time budget.

Both classes are NOT locked themselves: callers hold the emulator's lock.
``clock`` is the emulator clock (``FakeBitrix.now``), so ``advance_clock``
drains buckets and expires budget buckets too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


class LeakyBucket:
    """§7.1: every request adds 1 to a counter that drains by ``drain_per_s``
    per second; a request that would take the counter above ``burst`` is
    rejected (503 QUERY_LIMIT_EXCEEDED).

    With a full drain, exactly ``burst`` requests in a row pass and the next
    one is rejected. Rejected requests do not add to the counter (the
    reference does not say; a guess that keeps "stay at or below Y req/s
    never trips the limit" true for a client that backs off).
    Keyed by source IP (the counter is per portal and source IP)."""

    def __init__(self, burst: int, drain_per_s: float, clock: Callable[[], float]):
        self.burst = burst
        self.drain_per_s = drain_per_s
        self._clock = clock
        self._levels: dict[str, tuple[float, float]] = {}

    def configure(self, burst: int, drain_per_s: float) -> None:
        self.burst = burst
        self.drain_per_s = drain_per_s

    def level(self, key: str = "127.0.0.1") -> float:
        now = self._clock()
        level, last = self._levels.get(key, (0.0, now))
        return max(0.0, level - (now - last) * self.drain_per_s)

    def hit(self, key: str) -> bool:
        """Count one request; False when it must be rejected."""
        now = self._clock()
        level = self.level(key)
        if level + 1 > self.burst:
            self._levels[key] = (level, now)
            return False
        self._levels[key] = (level + 1, now)
        return True

    def reset(self) -> None:
        self._levels.clear()


@dataclass
class _MinuteBucket:
    minute: int  # int(first_call // 60)
    first_call: float
    seconds: float


class OperatingBudget:
    """§7.2: per (app or webhook, method), execution time summed in one-minute
    buckets over a sliding 10-minute window. A bucket drops out at
    ``first call in it + 600 s`` (that moment is ``operating_reset_at`` for the
    oldest bucket). Before a call the sum is checked: when it is above the
    limit the call is refused with 429 OPERATION_TIME_LIMIT; the call that
    pushes the sum over the limit still completes."""

    WINDOW_S = 600

    def __init__(self, clock: Callable[[], float]):
        self._clock = clock
        self._buckets: dict[tuple, list[_MinuteBucket]] = {}

    def _prune(self, key, now: float) -> list[_MinuteBucket]:
        buckets = self._buckets.setdefault(key, [])
        while buckets and buckets[0].first_call + self.WINDOW_S <= now:
            buckets.pop(0)
        return buckets

    def used(self, key) -> float:
        return sum(b.seconds for b in self._prune(key, self._clock()))

    def blocked(self, key, limit_s: float) -> bool:
        return self.used(key) > limit_s

    def charge(self, key, seconds: float) -> None:
        now = self._clock()
        buckets = self._prune(key, now)
        minute = int(now // 60)
        if buckets and buckets[-1].minute == minute:
            buckets[-1].seconds += seconds
        else:
            buckets.append(_MinuteBucket(minute, now, seconds))

    def status(self, key) -> tuple[float, int]:
        """(operating seconds in the window, operating_reset_at unix time)."""
        now = self._clock()
        buckets = self._prune(key, now)
        operating = sum(b.seconds for b in buckets)
        reset_at = (
            int(buckets[0].first_call + self.WINDOW_S) if buckets else int(now + self.WINDOW_S)
        )
        return operating, reset_at

    def reset(self) -> None:
        self._buckets.clear()
