"""The Redis machinery the breaker, the in-flight cap and the rate limiter share
(`b24app/portals/redisbacked.py`): one warning per outage, no Redis call while it is being
skipped, and back to shared state once Redis answers."""

from __future__ import annotations

import logging

import pytest
import redis

from b24app.portals.breaker import RedisCircuitBreaker, RedisInflightLimiter
from b24app.portals.ratelimit import RateLimitTimeout, RedisLeakyBucket
from b24app.portals.redisbacked import UNREACHABLE, RedisBacked

DOWN = "redis://127.0.0.1:1/0"  # nothing listens there


class Probe(RedisBacked):
    NAME = "probe"


def _fails():
    raise redis.ConnectionError("gone")


def test_shared_skips_redis_for_the_retry_interval_after_a_failure(caplog) -> None:
    caplog.set_level(logging.INFO, logger="b24app.breaker")
    backed = Probe(DOWN, socket_timeout=0.1, retry_interval=60.0)
    calls: list[int] = []

    assert backed._shared(_fails) is UNREACHABLE
    assert backed._shared(lambda: calls.append(1)) is UNREACHABLE  # not asked meanwhile

    assert calls == [] and backed.degraded
    [warning] = [r for r in caplog.records if r.name == "b24app.breaker"]
    assert warning.getMessage() == (
        "probe: Redis unavailable (ConnectionError); this process decides on its own until it "
        "is back"
    )


def test_shared_is_back_after_the_retry_interval_and_says_so_once(caplog) -> None:
    caplog.set_level(logging.INFO, logger="b24app.breaker")
    backed = Probe(DOWN, socket_timeout=0.1, retry_interval=0.0)
    backed._shared(_fails)

    assert backed._shared(lambda: 42) == 42
    assert backed._shared(lambda: 43) == 43

    assert not backed.degraded
    messages = [r.getMessage() for r in caplog.records if r.name == "b24app.breaker"]
    assert messages[1:] == ["probe: Redis is back; shared state resumed"]


def _limiter_call(limiter: RedisLeakyBucket) -> None:
    with pytest.raises(RateLimitTimeout):  # paced on its own, from a full bucket
        limiter.acquire("portal", 50, 2.0, max_wait=0.0)


def _inflight_call(cap: RedisInflightLimiter) -> None:
    cap.release("portal", cap.acquire("portal", 1, max_wait=0.0, ttl=1.0))


@pytest.mark.parametrize(
    ("make", "call", "logger", "name"),
    [
        (
            lambda: RedisCircuitBreaker(DOWN, 5, 30.0),
            lambda breaker: breaker.failed("portal.example"),
            "b24app.breaker",
            "circuit breaker",
        ),
        (lambda: RedisInflightLimiter(DOWN), _inflight_call, "b24app.breaker", "in-flight cap"),
        (lambda: RedisLeakyBucket(DOWN), _limiter_call, "b24app.ratelimit", "rate limiter"),
    ],
)
def test_each_component_warns_once_per_outage_under_its_own_name(
    make, call, logger, name, caplog
) -> None:
    caplog.set_level(logging.WARNING)
    component = make()
    for _ in range(3):
        call(component)
    assert component.degraded
    warnings = [r.getMessage() for r in caplog.records if r.name == logger]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"{name}: Redis unavailable (ConnectionError); ")
