"""The rate limiter's stand-in while Redis is unreachable: the same schedule in PostgreSQL.

Redis keeps each portal's GCRA schedule shared by every process and machine (`ratelimit.py`).
When it is down, pacing each process on its own cannot be safe: N busy processes would send N
times what the portal allows. The database is the one other store all of them share, so the
schedule moves there: one row per portal key (`RateBucket`), advanced by a single SQL statement
under the row's lock, on the database's clock.

Each thread uses a connection of its own in autocommit mode, so a reservation never waits for,
or holds a lock inside, the caller's transaction. If the database fails too, the caller is paced
in-process at a small share of the rate (the last resort, as before).

When Redis is back, the first process to find it *releases* the row (`released`): from then on
the row gives no slot (`FallbackReleased`), and every process carries the row's final schedule
into Redis (`release` returns it) before reserving there. A process that finds Redis down again
*takes* the row back.
"""

from __future__ import annotations

import logging
import threading
import time

from django.db import DatabaseError, connections

from b24app.portals.ratelimit import (
    FALLBACK_RATE_SHARE,
    FallbackReleased,
    LocalLeakyBucket,
    RateLimitTimeout,
    schedule_for,
)

logger = logging.getLogger("b24app.ratelimit")

NO_LIMIT_S = 1e12
"""Stands for "wait as long as it takes" (``max_wait=None``) in SQL."""

# `portals_ratebucket` is `RateBucket`'s table. Reserve the next slot if it is within max_wait
# and the row is not released; return the wait and the released flag either way (ratelimit.py).
_ACQUIRE_SQL = """
WITH clock AS (SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8 AS now),
current AS (
    SELECT b.key, b.released, c.now,
           GREATEST(b.tat, c.now, b.blocked_until + %(tolerance)s) AS start
    FROM portals_ratebucket AS b CROSS JOIN clock AS c
    WHERE b.key = %(key)s
    FOR UPDATE OF b
)
UPDATE portals_ratebucket AS b
SET tat = CASE
    WHEN NOT current.released AND current.start - %(tolerance)s - current.now <= %(max_wait)s
    THEN current.start + %(interval)s
    ELSE b.tat
END
FROM current
WHERE b.key = current.key
RETURNING GREATEST(current.start - %(tolerance)s - current.now, 0), current.released
"""

_CREATE_SQL = """
INSERT INTO portals_ratebucket (key, tat, blocked_until) VALUES (%(key)s, 0, 0)
ON CONFLICT (key) DO NOTHING
"""

_PENALIZE_SQL = """
INSERT INTO portals_ratebucket (key, tat, blocked_until)
VALUES (%(key)s, 0, EXTRACT(EPOCH FROM clock_timestamp()) + %(seconds)s)
ON CONFLICT (key) DO UPDATE
SET blocked_until = GREATEST(portals_ratebucket.blocked_until, EXCLUDED.blocked_until)
"""

# Pace the key here (again): block it and clear `released`.
_TAKE_SQL = """
INSERT INTO portals_ratebucket (key, tat, blocked_until, released)
VALUES (%(key)s, 0, EXTRACT(EPOCH FROM clock_timestamp()) + %(seconds)s, false)
ON CONFLICT (key) DO UPDATE
SET blocked_until = GREATEST(portals_ratebucket.blocked_until, EXCLUDED.blocked_until),
    released = false
"""

# Give no slot from now on; return how far the schedule runs ahead (final once released).
_RELEASE_SQL = """
UPDATE portals_ratebucket
SET released = true
WHERE key = %(key)s
RETURNING GREATEST(tat, blocked_until + %(tolerance)s) - EXTRACT(EPOCH FROM clock_timestamp())
"""

_RESET_SQL = "DELETE FROM portals_ratebucket WHERE key = %(key)s"


class DatabaseLeakyBucket:
    """GCRA limiter in PostgreSQL, shared by every process using the database; see module doc.

    Only PostgreSQL: on another database (SQLite in development, one process) it paces
    in-process, which is exact there.
    """

    def __init__(self, alias: str = "default") -> None:
        self._alias = alias
        self._local = threading.local()
        self._last_resort = LocalLeakyBucket()
        self._exact_locally = LocalLeakyBucket()
        self._state_lock = threading.Lock()
        self._failing = False

    def acquire(self, key: str, burst: int, rate: float, *, max_wait: float | None = None) -> float:
        schedule = schedule_for(burst, rate)
        if not self._shared():
            return self._exact_locally.acquire(key, burst, rate, max_wait=max_wait)
        params = {
            "key": key,
            "interval": schedule.interval,
            "tolerance": schedule.tolerance,
            "max_wait": NO_LIMIT_S if max_wait is None else max_wait,
        }
        try:
            row = self._run(_ACQUIRE_SQL, params)
            if row is None:  # first call for this key (or it was reset): create, then reserve
                self._run(_CREATE_SQL, params)
                row = self._run(_ACQUIRE_SQL, params)
        except DatabaseError as exc:
            self._database_failed(exc)
            return self._last_resort.acquire(key, 1, rate * FALLBACK_RATE_SHARE, max_wait=max_wait)
        self._database_ok()
        if row is None:  # deleted between the two statements (a reset): nothing to wait for
            return 0.0
        wait, released = float(row[0]), bool(row[1])
        if released:
            self._drop_connection()  # this thread will pace through Redis
            raise FallbackReleased(key)
        if max_wait is not None and wait > max_wait:
            raise RateLimitTimeout(wait)
        if wait > 0:
            time.sleep(wait)
        return wait

    def penalize(self, key: str, seconds: float) -> None:
        self._last_resort.penalize(key, seconds)
        self._exact_locally.penalize(key, seconds)
        if self._shared():
            self._once(_PENALIZE_SQL, {"key": key, "seconds": max(seconds, 0.0)})

    def take(self, key: str, seconds: float) -> None:
        self._last_resort.penalize(key, seconds)
        self._exact_locally.penalize(key, seconds)
        if self._shared():
            self._once(_TAKE_SQL, {"key": key, "seconds": max(seconds, 0.0)})

    def release(self, key: str, burst: int, rate: float) -> float | None:
        if not self._shared():
            ahead = self._exact_locally.horizon(key, burst, rate)
            self._exact_locally.reset(key)
            return ahead
        tolerance = schedule_for(burst, rate).tolerance
        row = self._once(_RELEASE_SQL, {"key": key, "tolerance": tolerance})
        self._drop_connection()  # this thread paces through Redis again
        return None if row is None else float(row[0])

    def reset(self, key: str) -> None:
        self._last_resort.reset(key)
        self._exact_locally.reset(key)
        if self._shared():
            self._once(_RESET_SQL, {"key": key})

    def close(self) -> None:
        """Close this thread's connection (it reopens on the next call)."""
        self._drop_connection()

    # --- the thread's own autocommit connection ---------------------------------------------

    def _shared(self) -> bool:
        return connections[self._alias].vendor == "postgresql"

    def _connection(self):
        wrapper = getattr(self._local, "connection", None)
        if wrapper is None:
            wrapper = connections.create_connection(self._alias)
            self._local.connection = wrapper
        return wrapper

    def _run(self, sql: str, params: dict):
        """Run one statement on this thread's connection; its first row, or None."""
        try:
            with self._connection().cursor() as cursor:
                cursor.execute(sql, params)
                return cursor.fetchone() if cursor.description else None
        except DatabaseError:
            self._drop_connection()
            raise

    def _once(self, sql: str, params: dict):
        """Run a statement outside the pacing path (penalize, take, release, reset) and return
        its first row, or None, also when the database fails. A thread that is not pacing here
        gets a connection for it that is closed after, so that the threads which only ever saw
        a QUERY_LIMIT_EXCEEDED do not each keep one open."""
        pacing = getattr(self._local, "connection", None) is not None
        try:
            row = self._run(sql, params)
        except DatabaseError as exc:
            self._database_failed(exc)
            return None
        finally:
            if not pacing:
                self._drop_connection()
        self._database_ok()
        return row

    def _drop_connection(self) -> None:
        wrapper = getattr(self._local, "connection", None)
        self._local.connection = None
        if wrapper is not None:
            try:
                wrapper.close()
            except DatabaseError:
                pass

    def _database_failed(self, exc: DatabaseError) -> None:
        with self._state_lock:
            first, self._failing = not self._failing, True
        if first:
            logger.warning(
                "rate limiter: database unavailable as well (%s); pacing this process locally "
                "at %.0f%% of the portal rate",
                type(exc).__name__,
                FALLBACK_RATE_SHARE * 100,
            )

    def _database_ok(self) -> None:
        with self._state_lock:
            self._failing = False
