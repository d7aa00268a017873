"""Per-portal leaky-bucket limiter: shared through real Redis, in-process, and failing safe.

The Redis tests use ``REDIS_URL`` (default ``redis://127.0.0.1:6379/15``) and unique keys that
they delete afterwards. Without a reachable Redis they are skipped, except in CI where they fail.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis
from django.db import connection

from b24app.portals.ratelimit import (
    BURST_MARGIN,
    FallbackReleased,
    LocalLeakyBucket,
    RateLimitTimeout,
    RedisLeakyBucket,
    limiter_from_url,
    parse_rate,
)
from b24app.portals.ratelimit_db import DatabaseLeakyBucket

REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/15"
PREFIX = "b24:rl:test:"
BURST, RATE = 10, 20.0


@pytest.fixture
def redis_url() -> str:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except redis.RedisError:
        reason = f"needs Redis at {REDIS_URL.split('@')[-1]} (set REDIS_URL)"
        if os.environ.get("CI"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    return REDIS_URL


@pytest.fixture
def key(redis_url: str) -> Iterator[str]:
    name = uuid.uuid4().hex
    yield name
    redis.Redis.from_url(redis_url).delete(PREFIX + name)


def peak_portal_counter(stamps: list[float], rate: float) -> float:
    """Replay Bitrix24's counter (+1 per request, drains ``rate``/s) and return its maximum."""
    counter = peak = 0.0
    previous = None
    for stamp in sorted(stamps):
        if previous is not None:
            counter = max(0.0, counter - (stamp - previous) * rate)
        counter += 1
        peak = max(peak, counter)
        previous = stamp
    return peak


def assert_within_limit_and_fast(stamps: list[float], burst: int, rate: float) -> None:
    assert peak_portal_counter(stamps, rate) <= burst
    span = max(stamps) - min(stamps)
    allowed = burst + rate * span  # the most the portal would have accepted in that time
    assert len(stamps) >= 0.9 * allowed, f"{len(stamps)} requests, {allowed:.1f} allowed"


def run_threads(limiter, key: str, threads: int, per_thread: int, start_at: float) -> list[float]:
    stamps: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(per_thread):
            limiter.acquire(key, BURST, RATE)
            sent_at = time.time()
            with lock:
                stamps.append(sent_at)

    time.sleep(max(0.0, start_at - time.time()))
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return stamps


def _process_main(redis_url: str, key: str, start_at: float, results) -> None:
    limiter = RedisLeakyBucket(redis_url, prefix=PREFIX)
    results.put(run_threads(limiter, key, threads=8, per_thread=2, start_at=start_at))


# --- Redis, shared by processes ----------------------------------------------------------------


def run_processes(target, count: int, *args) -> list[float]:
    """Start ``count`` processes of ``target(*args, start_at, results)`` at one shared instant;
    the stamps they all report, once each has exited cleanly."""
    # spawn, not fork: forking a pytest process that runs threads (fake servers) can deadlock
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    start_at = time.time() + 4.0  # spawned interpreters need a moment to import
    processes = [
        context.Process(target=target, args=(*args, start_at, results)) for _ in range(count)
    ]
    for process in processes:
        process.start()
    stamps = [stamp for _ in processes for stamp in results.get(timeout=60)]
    for process in processes:
        process.join(timeout=5)
        assert process.exitcode == 0
    return stamps


def test_redis_leaky_bucket_processes_and_threads_never_exceed_the_bucket(redis_url, key) -> None:
    stamps = run_processes(_process_main, 4, redis_url, key)
    assert len(stamps) == 4 * 8 * 2
    assert_within_limit_and_fast(stamps, BURST, RATE)


def test_redis_leaky_bucket_allows_the_burst_then_the_rate(redis_url, key) -> None:
    limiter = RedisLeakyBucket(redis_url, prefix=PREFIX)
    waits = [limiter.acquire(key, BURST, RATE) for _ in range(BURST - BURST_MARGIN + 2)]
    assert waits[: BURST - BURST_MARGIN] == [0.0] * (BURST - BURST_MARGIN)
    assert all(0.0 < wait <= 1 / RATE + 0.01 for wait in waits[BURST - BURST_MARGIN :])


def test_redis_leaky_bucket_penalize_delays_the_next_acquire(redis_url, key) -> None:
    limiter = RedisLeakyBucket(redis_url, prefix=PREFIX)
    limiter.acquire(key, BURST, RATE)
    limiter.penalize(key, 0.5)

    started = time.monotonic()
    waited = limiter.acquire(key, BURST, RATE)

    assert 0.45 <= waited <= 0.55
    assert time.monotonic() - started >= 0.45
    # after a penalty the bucket counts as full: no burst, only the steady rate
    assert limiter.acquire(key, BURST, RATE) >= 0.04


def test_redis_leaky_bucket_max_wait_raises_without_reserving(redis_url, key) -> None:
    limiter = RedisLeakyBucket(redis_url, prefix=PREFIX)
    limiter.penalize(key, 2.0)
    for _ in range(3):
        with pytest.raises(RateLimitTimeout) as caught:
            limiter.acquire(key, BURST, RATE, max_wait=0.1)
        assert 1.9 <= caught.value.retry_after <= 2.0  # unchanged: nothing was reserved


def test_redis_leaky_bucket_keys_expire_and_reset_clears(redis_url, key) -> None:
    limiter = RedisLeakyBucket(redis_url, prefix=PREFIX)
    client = redis.Redis.from_url(redis_url)
    limiter.acquire(key, BURST, RATE)
    assert 0 < client.pttl(PREFIX + key) <= 2000

    limiter.penalize(key, 1.0)
    limiter.reset(key)

    assert not client.exists(PREFIX + key)
    assert limiter.acquire(key, BURST, RATE) == 0.0


def test_redis_leaky_bucket_keys_are_independent(redis_url, key) -> None:
    limiter = RedisLeakyBucket(redis_url, prefix=PREFIX)
    other = key + "-other"
    try:
        limiter.penalize(key, 5.0)
        assert limiter.acquire(other, BURST, RATE) == 0.0
    finally:
        limiter.reset(other)


# --- Redis unreachable -------------------------------------------------------------------------


def test_redis_leaky_bucket_falls_back_safely_when_redis_is_down(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="b24app.ratelimit")
    limiter = RedisLeakyBucket("redis://127.0.0.1:1/0", prefix=PREFIX)  # nothing listens there

    started = time.monotonic()
    stamps = []
    for _ in range(4):
        limiter.acquire("down", BURST, RATE)
        stamps.append(time.monotonic())
    limiter.penalize("down", 0.0)
    limiter.reset("down")

    # burst 1 at a quarter of the rate: 5/s, so the 4th slot is 0.6 s after the first. (Measured
    # from before the first call: a late wake-up can shorten one gap but never the schedule.)
    assert stamps[-1] - started >= 3 * 0.2 - 0.005, stamps
    assert peak_portal_counter(stamps, RATE) <= BURST
    warnings = [r for r in caplog.records if r.name == "b24app.ratelimit"]
    assert len(warnings) == 1
    assert "Redis unavailable" in warnings[0].getMessage()


# --- the database, standing in while Redis is down ------------------------------------------


# (Models are imported inside the tests: spawned worker processes import this module before
# Django is set up.)


@pytest.fixture
def db_key() -> Iterator[str]:
    from b24app.portals.models import RateBucket

    name = "test:" + uuid.uuid4().hex
    yield name
    RateBucket.objects.filter(key=name).delete()


@pytest.fixture
def db_limiter() -> Iterator[Callable[[], DatabaseLeakyBucket]]:
    """New `DatabaseLeakyBucket`s whose connections are closed after the test (an open one
    would keep the test database from being dropped)."""
    made: list[DatabaseLeakyBucket] = []

    def make() -> DatabaseLeakyBucket:
        made.append(DatabaseLeakyBucket())
        return made[-1]

    yield make
    for limiter in made:
        limiter.close()


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_database_leaky_bucket_allows_the_burst_then_the_rate(db_key, db_limiter) -> None:
    limiter = db_limiter()
    waits = [limiter.acquire(db_key, BURST, RATE) for _ in range(BURST - BURST_MARGIN + 2)]
    assert waits[: BURST - BURST_MARGIN] == [0.0] * (BURST - BURST_MARGIN)
    assert all(0.0 < wait <= 1 / RATE + 0.02 for wait in waits[BURST - BURST_MARGIN :])
    with pytest.raises(RateLimitTimeout):
        limiter.acquire(db_key, BURST, RATE, max_wait=0.0)
    # The refusal reserved nothing: the next slot is one interval on, not two.
    assert limiter.acquire(db_key, BURST, RATE) <= 1 / RATE + 0.02


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_database_leaky_bucket_is_shared_by_processes(db_key) -> None:
    """Two processes (each with its own connections) draw from one schedule: together they
    never exceed the portal's counter."""
    database = connection.settings_dict["NAME"]
    stamps = run_processes(_database_process_main, 2, database, db_key)
    assert len(stamps) == 2 * 4 * 4
    assert_within_limit_and_fast(stamps, BURST, RATE)


def _database_process_main(database: str, key: str, start_at: float, results) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "b24app.settings")
    import django

    django.setup()
    from django.db import connections

    connections["default"].settings_dict["NAME"] = database  # the test database
    limiter = DatabaseLeakyBucket()
    results.put(run_threads(limiter, key, 4, 4, start_at))


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_database_leaky_bucket_penalize_holds_every_process_back(db_key, db_limiter) -> None:
    db_limiter().acquire(db_key, BURST, RATE)
    db_limiter().penalize(db_key, 0.5)  # another process saw QUERY_LIMIT_EXCEEDED
    started = time.monotonic()
    waited = db_limiter().acquire(db_key, BURST, RATE)
    assert 0.4 <= waited <= 0.6
    assert time.monotonic() - started >= 0.4


def _sessions_opened_since(moment) -> int:
    """Client sessions on the test database opened at or after ``moment`` and still open (so
    that others closing meanwhile, e.g. by garbage collection, do not count, nor an autovacuum
    worker that PostgreSQL starts on the database meanwhile)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND backend_start >= %s"
            " AND backend_type = 'client backend'",
            [moment],
        )
        return cursor.fetchone()[0]


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_database_leaky_bucket_keeps_a_connection_only_while_pacing(db_key, db_limiter) -> None:
    """A penalty (every QUERY_LIMIT_EXCEEDED, Redis up or not) or a reset opens no connection
    that stays; pacing keeps one per thread, and the hand-back to Redis closes it."""
    limiter = db_limiter()
    with connection.cursor() as cursor:
        cursor.execute("SELECT clock_timestamp()")
        started = cursor.fetchone()[0]
    limiter.penalize(db_key, 0.0)
    limiter.reset(db_key)
    assert _sessions_opened_since(started) == 0
    limiter.acquire(db_key, BURST, RATE)
    assert _sessions_opened_since(started) == 1
    assert limiter.release(db_key, BURST, RATE) is not None
    assert _sessions_opened_since(started) == 0


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_redis_down_hands_over_to_the_database_starting_full(db_key, db_limiter) -> None:
    """Handing over, the database's bucket starts full: one slot now, then the steady rate
    (what Redis sent just before is unknown to it)."""
    limiter = RedisLeakyBucket("redis://127.0.0.1:1/0", prefix=PREFIX, fallback=db_limiter())
    limiter._store_of[db_key] = "redis"  # as if Redis had paced this portal until now
    started = time.monotonic()
    waits, used_at = [], []
    for _ in range(3):
        waits.append(limiter.acquire(db_key, BURST, RATE))
        used_at.append(time.monotonic() - started)
    assert waits[0] == pytest.approx(0.0, abs=0.02)
    # Slots one interval apart, not a burst. (From before the first call: a slow call can
    # shorten one measured wait, never the schedule.)
    assert used_at[1] >= 1 / RATE - 0.005 and used_at[2] >= 2 / RATE - 0.005, used_at
    assert limiter.degraded
    from b24app.portals.models import RateBucket

    assert RateBucket.objects.filter(key=db_key).exists()


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_redis_back_takes_the_schedule_over_from_the_database(
    redis_url, db_key, db_limiter
) -> None:
    """The first process to find Redis back releases the database's row and carries its
    schedule into Redis; a process still pacing through the database moves over at its next
    call (not after its own retry wait), so no slot is given twice."""
    from b24app.portals.models import RateBucket

    prefix = f"{PREFIX}{uuid.uuid4().hex}:"  # a Redis of its own, as if just restarted empty
    started = time.monotonic()
    db_limiter().take(db_key, 0.5)  # the database's schedule runs 0.5 s (and a burst) ahead
    first = RedisLeakyBucket(redis_url, prefix=prefix, fallback=db_limiter())
    first._store_of[db_key] = "fallback"  # it paced this portal through the database until now
    late = RedisLeakyBucket(redis_url, prefix=prefix, retry_interval=60, fallback=db_limiter())
    late._store_of[db_key] = "fallback"
    late._redis_failed(redis.ConnectionError("down a moment ago"))  # next retry in a minute
    try:
        first.acquire(db_key, BURST, RATE)
        first_at = time.monotonic() - started
        assert RateBucket.objects.get(key=db_key).released
        late.acquire(db_key, BURST, RATE)
    finally:
        redis.Redis.from_url(redis_url).delete(prefix + db_key, prefix + "~epoch")

    assert first_at >= 0.5 - 0.005  # after the database's slots, not a fresh burst
    assert not late.degraded  # moved to Redis at once, into the same schedule
    with pytest.raises(FallbackReleased):  # the database gives no more slots for it
        db_limiter().acquire(db_key, BURST, RATE)


def test_redis_that_lost_its_data_continues_the_schedule_this_process_knew(redis_url) -> None:
    """Redis restarted (or failed over, or was flushed) without this process seeing an outage:
    the epoch key is gone, so the process carries its knowledge of the old schedule over instead
    of starting a fresh burst beside the slots it already gave out."""
    prefix = f"{PREFIX}{uuid.uuid4().hex}:"
    limiter = RedisLeakyBucket(redis_url, prefix=prefix)
    client = redis.Redis.from_url(redis_url)
    try:
        started = time.monotonic()
        for _ in range(BURST - BURST_MARGIN):  # the burst: the schedule now runs ahead
            assert limiter.acquire("portal", BURST, RATE) == 0.0
        client.delete(prefix + "portal", prefix + "~epoch")  # Redis lost everything
        limiter.acquire("portal", BURST, RATE)
        # The old schedule's next slot, one interval after the burst; a fresh bucket gives one
        # at once. (Measured from before the burst: a slow call cannot make a slot earlier.)
        assert time.monotonic() - started >= 1 / RATE - 0.005
        fresh = RedisLeakyBucket(redis_url, prefix=prefix)  # knew nothing: queues behind it
        fresh.acquire("portal", BURST, RATE)
        assert time.monotonic() - started >= 2 / RATE - 0.005
    finally:
        client.delete(prefix + "portal", prefix + "~epoch")


# --- in-process --------------------------------------------------------------------------------


def test_local_leaky_bucket_threads_never_exceed_the_bucket() -> None:
    limiter = LocalLeakyBucket()
    stamps = run_threads(limiter, "portal", threads=16, per_thread=3, start_at=time.time())
    assert len(stamps) == 48
    assert_within_limit_and_fast(stamps, BURST, RATE)


def test_local_leaky_bucket_penalize_delays_the_next_acquire() -> None:
    limiter = LocalLeakyBucket()
    limiter.acquire("portal", BURST, RATE)
    limiter.penalize("portal", 0.3)
    assert 0.25 <= limiter.acquire("portal", BURST, RATE) <= 0.3
    limiter.reset("portal")
    assert limiter.acquire("portal", BURST, RATE) == 0.0


def test_local_leaky_bucket_max_wait_raises_without_reserving() -> None:
    limiter = LocalLeakyBucket()
    for _ in range(BURST - BURST_MARGIN):
        limiter.acquire("portal", BURST, RATE)
    with pytest.raises(RateLimitTimeout):
        limiter.acquire("portal", BURST, RATE, max_wait=0.0)
    assert limiter.acquire("portal", BURST, RATE, max_wait=0.1) <= 1 / RATE


@pytest.mark.parametrize(("burst", "rate"), [(0, 2.0), (50, 0.0), (50, -1.0), (50, float("nan"))])
def test_local_leaky_bucket_rejects_invalid_limits(burst, rate) -> None:
    with pytest.raises(ValueError):
        LocalLeakyBucket().acquire("portal", burst, rate)


# --- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("50/2", (50, 2.0)), ("250/5", (250, 5.0)), (" 10 / 0.5 ", (10, 0.5))],
)
def test_parse_rate_reads_burst_and_rate(text, expected) -> None:
    assert parse_rate(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "50", "50/", "/2", "50/2/3", "a/2", "50/b", "0/2", "-1/2", "50/0", "50/-2", "50/inf"],
)
def test_parse_rate_rejects_bad_input(text) -> None:
    with pytest.raises(ValueError, match="rate limit"):
        parse_rate(text)


def test_limiter_from_url_picks_redis_or_local() -> None:
    assert isinstance(limiter_from_url(None), LocalLeakyBucket)
    assert isinstance(limiter_from_url(""), LocalLeakyBucket)
    assert isinstance(limiter_from_url("redis://127.0.0.1:6379/15"), RedisLeakyBucket)
