"""Per-portal leaky-bucket limiter: shared through real Redis, in-process, and failing safe.

The Redis tests use ``REDIS_URL`` (default ``redis://127.0.0.1:6379/15``) and unique keys that
they delete afterwards. Without a reachable Redis they are skipped, except in CI where they fail.
Pacing in-process (the local limiter, the Redis limiter while Redis is down) is measured on an
injected clock, not by waiting. Redis paces on its own clock (the script asks Redis for the time,
so every machine shares one), so the tests of Redis' schedule wait in real time: they are marked
`alone` and run by themselves, after the parallel part of the suite.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from b24app.portals.ratelimit import (
    BURST_MARGIN,
    DEGRADED_PROCESSES,
    LocalLeakyBucket,
    RateLimitTimeout,
    RedisLeakyBucket,
    SharedPacingUnavailable,
    limiter_degraded,
    limiter_from_url,
    parse_rate,
    shared_pacing_only,
)

REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/15"
PREFIX = "b24:rl:test:"
BURST, RATE = 10, 20.0
DOWN = "redis://127.0.0.1:1/0"  # nothing listens there


class FakeClock:
    """Monotonic seconds that move only when a caller sleeps (``advance=True``) or the test
    says so; ``slept`` records every sleep."""

    def __init__(self, *, advance: bool = True) -> None:
        self.now = 1000.0
        self.advance = advance
        self.slept: list[float] = []
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.slept.append(seconds)
            if self.advance:
                self.now += seconds


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


@pytest.mark.alone
def test_redis_leaky_bucket_processes_and_threads_never_exceed_the_bucket(redis_url, key) -> None:
    stamps = run_processes(_process_main, 4, redis_url, key)
    assert len(stamps) == 4 * 8 * 2
    assert_within_limit_and_fast(stamps, BURST, RATE)


@pytest.mark.alone
def test_redis_leaky_bucket_allows_the_burst_then_the_rate(redis_url, key) -> None:
    limiter = RedisLeakyBucket(redis_url, prefix=PREFIX)
    waits = [limiter.acquire(key, BURST, RATE) for _ in range(BURST - BURST_MARGIN + 2)]
    assert waits[: BURST - BURST_MARGIN] == [0.0] * (BURST - BURST_MARGIN)
    assert all(0.0 < wait <= 1 / RATE + 0.01 for wait in waits[BURST - BURST_MARGIN :])


@pytest.mark.alone
def test_redis_leaky_bucket_penalize_delays_the_next_acquire(redis_url, key) -> None:
    limiter = RedisLeakyBucket(redis_url, prefix=PREFIX)
    limiter.acquire(key, BURST, RATE)
    penalized = time.monotonic()
    limiter.penalize(key, 0.5)

    waited = limiter.acquire(key, BURST, RATE)

    assert waited <= 0.55
    assert time.monotonic() - penalized >= 0.45
    # After a penalty the bucket counts as full: no burst, only the steady rate. Measured from
    # before the penalty (the schedule), not as this call's own wait, which a late wake-up of
    # the previous one shortens on a busy machine.
    limiter.acquire(key, BURST, RATE)
    assert time.monotonic() - penalized >= 0.5 + 1 / RATE - 0.005


@pytest.mark.alone
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


# --- Redis unreachable: each process paces on its own, conservatively --------------------------


def test_redis_down_paces_this_process_at_burst_one_and_its_share_of_the_rate(caplog) -> None:
    caplog.set_level(logging.INFO, logger="b24app.ratelimit")
    clock = FakeClock()
    limiter = RedisLeakyBucket(DOWN, prefix=PREFIX, clock=clock, sleep=clock.sleep, processes=4)

    waits = [limiter.acquire("down", BURST, RATE) for _ in range(4)]

    interval = 4 / RATE  # a quarter of the rate each, burst 1
    # The first waits for every assumed process to fit into a full bucket, then one interval.
    assert waits == pytest.approx([4 / RATE, interval, interval, interval])
    assert clock.slept == waits
    assert limiter.degraded and limiter_degraded(limiter)
    limiter.penalize("down", 0.0)
    limiter.reset("down")
    records = [r for r in caplog.records if r.name == "b24app.ratelimit"]
    assert len(records) == 1  # one warning per outage, whatever the calls
    assert "Redis unavailable" in records[0].getMessage()
    assert "1/4 of the rate" in records[0].getMessage()


def test_redis_down_paced_processes_together_stay_under_the_bucket() -> None:
    """As many processes as assumed, all starting the moment Redis went away with the bucket
    filled by Redis' burst, replayed on one clock: the portal's counter never exceeds it."""
    clock = FakeClock(advance=False)
    processes = [
        RedisLeakyBucket(DOWN, prefix=PREFIX, clock=clock, sleep=clock.sleep)
        for _ in range(DEGRADED_PROCESSES)
    ]
    stamps = [clock() - 0.001] * (BURST - BURST_MARGIN)  # Redis' burst, just sent
    for limiter in processes:
        stamps += [clock() + limiter.acquire("p", BURST, RATE) for _ in range(5)]
    assert peak_portal_counter(stamps, RATE) <= BURST
    steady = sorted(stamps[BURST - BURST_MARGIN :])
    # together at most the rate: one request of each process per its own interval
    assert len(steady) <= RATE * (steady[-1] - steady[0]) + DEGRADED_PROCESSES + 1e-6


def test_redis_down_refuses_inside_shared_pacing_only_and_reserves_nothing() -> None:
    clock = FakeClock()
    limiter = RedisLeakyBucket(DOWN, prefix=PREFIX, clock=clock, sleep=clock.sleep, processes=2)

    with shared_pacing_only():
        with pytest.raises(SharedPacingUnavailable) as caught:
            limiter.acquire("down", BURST, RATE)
        with shared_pacing_only(False):  # an inner "no" does not lift an outer "yes"
            with pytest.raises(RateLimitTimeout):
                limiter.acquire("down", BURST, RATE, max_wait=10.0)
    assert caught.value.retry_after == 5.0  # when this process asks Redis again
    assert clock.slept == []
    # Outside the block the same call is paced, from a schedule nothing was reserved in.
    assert limiter.acquire("down", BURST, RATE) == pytest.approx(2 / RATE)


def test_local_limiter_is_never_degraded_nor_refused() -> None:
    limiter = LocalLeakyBucket()
    with shared_pacing_only():
        assert limiter.acquire("portal", BURST, RATE) == 0.0
    assert not limiter.degraded and not limiter_degraded(limiter)


def _break(limiter: RedisLeakyBucket, monkeypatch) -> None:
    def unreachable(*args, **kwargs):
        raise redis.ConnectionError("Redis went away")

    monkeypatch.setattr(limiter, "_acquire_script", unreachable)


def test_redis_lost_mid_schedule_paces_after_the_slots_redis_gave(
    redis_url, key, monkeypatch
) -> None:
    """A process that saw Redis' schedule run ahead does not send beside the slots it gave out:
    its first request on its own comes after them."""
    clock = FakeClock()
    limiter = RedisLeakyBucket(
        redis_url, prefix=PREFIX, clock=clock, sleep=clock.sleep, processes=2
    )
    for _ in range(BURST - BURST_MARGIN):
        assert limiter.acquire(key, BURST, RATE) == 0.0  # the burst: Redis' tat is 8 slots on
    _break(limiter, monkeypatch)

    waited = limiter.acquire(key, BURST, RATE)

    assert limiter.degraded
    ahead = (BURST - BURST_MARGIN) / RATE  # Redis' schedule after the burst
    assert ahead - 0.05 <= waited <= ahead
    assert limiter.acquire(key, BURST, RATE) == pytest.approx(2 / RATE)  # then half the rate


@pytest.mark.alone
def test_redis_back_starts_full_after_pacing_on_its_own(redis_url, key, monkeypatch) -> None:
    """Back on Redis (its data possibly lost meanwhile), a key this process paced on its own
    gets no fresh burst: it resumes at the steady rate."""
    clock = FakeClock()
    limiter = RedisLeakyBucket(
        redis_url, prefix=PREFIX, clock=clock, sleep=clock.sleep, retry_interval=0.0
    )
    _break(limiter, monkeypatch)
    limiter.acquire(key, BURST, RATE)
    assert limiter.degraded
    monkeypatch.undo()  # Redis is back (and knows nothing of this key)
    assert not redis.Redis.from_url(redis_url).exists(PREFIX + key)

    waits = [limiter.acquire(key, BURST, RATE) for _ in range(3)]

    assert not limiter.degraded
    assert redis.Redis.from_url(redis_url).hexists(PREFIX + key, "until")  # marked full
    # No burst: one slot per interval (the sleeps are not real, so the waits add up).
    assert waits == pytest.approx([0.0, 1 / RATE, 2 / RATE], abs=0.01)


# --- in-process --------------------------------------------------------------------------------


def test_local_leaky_bucket_threads_never_exceed_the_bucket() -> None:
    """16 threads reserve at one instant of a clock that stands still: each request goes out
    at that instant plus its wait, and those times fit the bucket and use all of it."""
    clock = FakeClock(advance=False)
    limiter = LocalLeakyBucket(clock=clock, sleep=clock.sleep)
    stamps: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(3):
            sent_at = clock() + limiter.acquire("portal", BURST, RATE)
            with lock:
                stamps.append(sent_at)

    pool = [threading.Thread(target=worker) for _ in range(16)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    assert len(stamps) == 48
    assert_within_limit_and_fast(stamps, BURST, RATE)
    interval = 1 / RATE
    expected = [0.0] * (BURST - BURST_MARGIN) + [i * interval for i in range(1, 41)]
    assert sorted(stamp - clock() for stamp in stamps) == pytest.approx(expected)


def test_local_leaky_bucket_penalize_delays_the_next_acquire() -> None:
    clock = FakeClock()
    limiter = LocalLeakyBucket(clock=clock, sleep=clock.sleep)
    limiter.acquire("portal", BURST, RATE)
    limiter.penalize("portal", 0.3)
    assert limiter.acquire("portal", BURST, RATE) == pytest.approx(0.3)
    # after a penalty the bucket counts as full: no burst, only the steady rate
    assert limiter.acquire("portal", BURST, RATE) == pytest.approx(1 / RATE)
    limiter.reset("portal")
    assert limiter.acquire("portal", BURST, RATE) == 0.0
    assert clock.slept == pytest.approx([0.3, 1 / RATE])


def test_local_leaky_bucket_max_wait_raises_without_reserving() -> None:
    clock = FakeClock(advance=False)
    limiter = LocalLeakyBucket(clock=clock, sleep=clock.sleep)
    for _ in range(BURST - BURST_MARGIN):
        limiter.acquire("portal", BURST, RATE)
    for _ in range(3):
        with pytest.raises(RateLimitTimeout) as caught:
            limiter.acquire("portal", BURST, RATE, max_wait=0.0)
        assert caught.value.retry_after == pytest.approx(1 / RATE)  # unchanged: none reserved
    assert limiter.acquire("portal", BURST, RATE, max_wait=0.1) == pytest.approx(1 / RATE)


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
    assert limiter_from_url("redis://127.0.0.1:6379/15", processes=3).processes == 3
