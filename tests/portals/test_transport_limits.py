"""One tenant cannot slow the others: a deadline and a size cap on every call to Bitrix24, a
circuit breaker per portal host and a cap on the requests in flight to one portal.

Every test talks to the fake portal over real HTTP (its `transport` switches: a portal that
drips its answer, answers a huge one, or never answers). Time bounds are generous: a deadline of
1 s must return in under 5 s where a `(connect, read)` timeout alone waits for the whole drip
(tens of seconds). The breaker's clock is injected; the Redis variants use REDIS_URL.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import threading
import time
import uuid

import pytest
import redis

from b24app.portals.bitrix import (
    BitrixClient,
    BitrixConfig,
    BitrixError,
    BitrixUnavailable,
    OAuthServer,
)
from b24app.portals.breaker import (
    BreakerOpen,
    InflightTimeout,
    LocalCircuitBreaker,
    LocalInflightLimiter,
    RedisCircuitBreaker,
    RedisInflightLimiter,
)

REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/15"
DEADLINE = 1.0
BOUND = 5.0  # a call under a 1 s deadline returns well within this, however the portal behaves
DRIP = 0.2  # s per byte: a ~300-byte answer takes a minute; every read gets a byte in 0.2 s


class Clock:
    """An injected wall clock for the breaker."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def config(fake) -> BitrixConfig:
    # The 4 s read timeout of the issue: a dripping portal never trips it.
    return BitrixConfig(
        client_id=fake.client_id,
        client_secret=fake.client_secret,
        oauth_servers=(fake.oauth_url,),
        allow_private=True,
        connect_timeout=2.0,
        read_timeout=4.0,
        deadline=DEADLINE,
        max_body_bytes=1024 * 1024,
    )


@pytest.fixture
def anna(portal) -> dict:
    return portal.issue_tokens(1)


def client_for(portal, token: str, config: BitrixConfig, **kwargs) -> BitrixClient:
    return BitrixClient(portal.client_endpoint, token, config=config, **kwargs)


def timed(call):
    started = time.monotonic()
    try:
        return call(), time.monotonic() - started
    except BitrixUnavailable as exc:
        return exc, time.monotonic() - started


def wait_for(predicate, seconds: float = 10.0) -> bool:
    give_up = time.monotonic() + seconds
    while time.monotonic() < give_up:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def redis_or_skip() -> str:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except redis.RedisError:
        reason = f"needs Redis at {REDIS_URL.split('@')[-1]} (set REDIS_URL)"
        if os.environ.get("CI"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    return REDIS_URL


def no_secret_in(text: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in text


# --- the exchange's log line -------------------------------------------------------------------


def test_a_quick_success_is_logged_at_debug_a_slow_one_and_a_failure_at_info(
    portal, anna, config, caplog, monkeypatch
) -> None:
    """A busy screen writes no line per successful call; what an operator needs to see (a
    failure, a call that took long) stays at INFO."""
    from b24app.portals.bitrix import transport

    monkeypatch.setattr(transport, "SLOW_CALL_S", 0.2)
    caplog.set_level(logging.DEBUG, logger="b24app.bitrix")
    client = client_for(portal, anna["access_token"], config)
    client.call("profile")
    portal.latency_s = 0.3
    client.call("profile")
    portal.latency_s = 0.0
    with pytest.raises(BitrixError):
        client_for(portal, "not-a-token", config).call("profile")
    lines = [r for r in caplog.records if r.getMessage().startswith("bitrix24 call ")]
    assert [r.levelno for r in lines] == [logging.DEBUG, logging.INFO, logging.INFO]
    assert "error=-" in lines[1].getMessage() and "error=-" not in lines[2].getMessage()


# --- the deadline ------------------------------------------------------------------------------


def test_rest_call_to_a_dripping_portal_returns_within_the_deadline(
    portal, anna, config, caplog
) -> None:
    caplog.set_level(logging.DEBUG)
    portal.transport.drip_interval_s = DRIP
    outcome, took = timed(lambda: client_for(portal, anna["access_token"], config).call("profile"))
    assert isinstance(outcome, BitrixUnavailable) and outcome.code == "DEADLINE_EXCEEDED"
    assert took < BOUND
    record = portal.requests[-1]
    # The connection was closed long before the portal could finish: the old client, whose
    # read timeout every byte resets, would have waited for all of it (a minute).
    assert wait_for(lambda: "body_complete" in record)
    assert record["body_complete"] is False and record["sent_bytes"] * DRIP < took + 1
    no_secret_in(caplog.text, anna["access_token"], anna["refresh_token"])


def test_a_connect_and_read_timeout_alone_exceed_the_bound_against_the_same_drip(
    portal, anna, config
) -> None:
    """What the client did before the deadline: one POST with `(connect, read)` timeouts. Every
    byte arrives well within the read timeout, so the drip holds it for the whole answer."""
    import requests

    portal.transport.drip_interval_s = 0.09  # the 77-byte "method not found": about 7 s
    started = time.monotonic()
    with requests.Session() as session:
        answer = session.post(
            portal.client_endpoint + "no.such.method",
            json={"auth": anna["access_token"]},
            timeout=config.timeout,  # (2, 4): the 4 s budget of the issue
        )
    assert answer.json()["error"] == "ERROR_METHOD_NOT_FOUND"  # the whole answer, at last
    assert time.monotonic() - started > BOUND


def test_rest_call_to_a_portal_that_never_answers_returns_within_the_deadline(
    portal, anna, config
) -> None:
    portal.transport.unresponsive = True
    config = dataclasses.replace(config, read_timeout=20.0)  # the default: 20 s without a deadline
    outcome, took = timed(lambda: client_for(portal, anna["access_token"], config).call("profile"))
    assert isinstance(outcome, BitrixUnavailable) and outcome.code == "DEADLINE_EXCEEDED"
    assert took < BOUND
    assert portal.requests[-1]["injected"] == "unresponsive"


def test_a_connection_the_deadline_cut_is_not_reused(portal, anna, config) -> None:
    client = client_for(portal, anna["access_token"], config)
    portal.transport.unresponsive = True
    assert timed(lambda: client.call("profile"))[0].code == "DEADLINE_EXCEEDED"
    portal.transport.off()
    assert client.call("profile")["ID"] == "1"
    assert client.call("profile")["ID"] == "1"


def test_the_deadline_is_per_call_not_per_read(portal, anna, config) -> None:
    """A healthy portal's calls pass one after another on one client; each gets its own."""
    client = client_for(portal, anna["access_token"], config)
    started = time.monotonic()
    for _ in range(3):
        assert client.call("profile")["ID"] == "1"
        time.sleep(0.4)
    assert time.monotonic() - started > DEADLINE  # longer than one deadline in all


def test_oauth_token_request_to_a_dripping_server_returns_within_the_deadline(
    fake, portal, anna, config, caplog
) -> None:
    caplog.set_level(logging.DEBUG)
    fake.transport.drip_interval_s = DRIP
    server = OAuthServer(config)
    outcome, took = timed(lambda: server.refresh(fake.oauth_url, anna["refresh_token"]))
    assert isinstance(outcome, BitrixUnavailable) and outcome.code == "DEADLINE_EXCEEDED"
    assert took < BOUND
    no_secret_in(caplog.text, anna["refresh_token"], fake.client_secret)
    no_secret_in(str(outcome) + repr(outcome), anna["refresh_token"], fake.client_secret)


def test_oauth_code_exchange_and_app_info_to_a_silent_server_return_within_the_deadline(
    fake, portal, anna, config
) -> None:
    fake.transport.unresponsive = True
    server = OAuthServer(config)
    for call in (
        lambda: server.exchange_code(fake.oauth_url, "a" * 32),
        lambda: server.app_info(fake.oauth_url, anna["access_token"]),
    ):
        outcome, took = timed(call)
        assert isinstance(outcome, BitrixUnavailable) and outcome.code == "DEADLINE_EXCEEDED"
        assert took < BOUND


# --- the size cap ------------------------------------------------------------------------------


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_huge_answer_is_refused_and_its_connection_closed(portal, anna, config, declared) -> None:
    portal.transport.huge_body_bytes = 64 * 1024 * 1024
    portal.transport.huge_body_declared = declared
    client = client_for(portal, anna["access_token"], config)
    outcome, took = timed(lambda: client.call("profile"))
    assert isinstance(outcome, BitrixUnavailable) and outcome.code == "RESPONSE_TOO_LARGE"
    assert "1048576" in str(outcome)
    record = portal.requests[-1]
    assert wait_for(lambda: "body_complete" in record)
    assert record["body_complete"] is False  # we hung up; the 64 MB were never read
    assert record["sent_bytes"] < 32 * 1024 * 1024
    portal.transport.off()
    assert client.call("profile")["ID"] == "1"  # the next call gets a fresh connection


def test_an_answer_within_the_cap_is_read_whole(portal, anna, config) -> None:
    portal.transport.huge_body_bytes = 1024 * 1024  # exactly the cap
    result = client_for(portal, anna["access_token"], config).call("profile")
    assert result == "x" * (1024 * 1024 - len('{"result":""}'))


def test_a_huge_oauth_answer_is_refused(fake, portal, anna, config) -> None:
    fake.transport.huge_body_bytes = 8 * 1024 * 1024
    outcome, _ = timed(lambda: OAuthServer(config).app_info(fake.oauth_url, anna["access_token"]))
    assert isinstance(outcome, BitrixUnavailable) and outcome.code == "RESPONSE_TOO_LARGE"


def test_transport_settings_are_checked() -> None:
    for bad in ({"deadline": 0}, {"deadline": float("nan")}, {"max_body_bytes": 0}):
        with pytest.raises(ValueError):
            BitrixConfig(client_id="x", client_secret="y", **bad)


# --- the circuit breaker -----------------------------------------------------------------------


@pytest.fixture(params=["local", pytest.param("redis", marks=pytest.mark.redis)])
def make_breaker(request):
    made: list = []

    def make(threshold: int = 3, cooldown: float = 30.0, clock=None):
        clock = clock or Clock()
        if request.param == "local":
            breaker = LocalCircuitBreaker(threshold, cooldown, clock=clock)
        else:
            prefix = f"b24:cb:test:{uuid.uuid4().hex}:"
            breaker = RedisCircuitBreaker(
                redis_or_skip(), threshold, cooldown, clock=clock, prefix=prefix
            )
            made.append(prefix)
        return breaker

    yield make
    for prefix in made:
        connection = redis.Redis.from_url(REDIS_URL)
        for key in connection.scan_iter(prefix + "*"):
            connection.delete(key)


def test_breaker_after_n_failures_the_next_call_sends_nothing_then_one_probe_closes_it(
    portal, anna, config, make_breaker
) -> None:
    clock = Clock()
    breaker = make_breaker(threshold=3, cooldown=30.0, clock=clock)
    client = client_for(portal, anna["access_token"], config, breaker=breaker)
    portal.transport.unresponsive = True
    for _ in range(3):
        assert timed(lambda: client.call("profile"))[0].code == "DEADLINE_EXCEEDED"
    assert len(portal.requests) == 3

    outcome, took = timed(lambda: client.call("profile"))
    assert outcome.code == "PORTAL_UNREACHABLE" and outcome.retry_after == pytest.approx(30, 1)
    assert took < 0.5 and len(portal.requests) == 3  # failed fast: no request was made
    clock.advance(29)
    assert timed(lambda: client.call("profile"))[0].code == "PORTAL_UNREACHABLE"
    assert len(portal.requests) == 3

    portal.transport.off()
    clock.advance(2)  # the cool-down is over: one probe goes
    assert client.call("profile")["ID"] == "1"
    assert len(portal.requests) == 4
    for _ in range(3):  # closed: every call goes again
        assert client.call("profile")["ID"] == "1"
    assert len(portal.requests) == 7


def test_breaker_a_failed_probe_opens_it_for_another_cool_down(
    portal, anna, config, make_breaker
) -> None:
    clock = Clock()
    breaker = make_breaker(threshold=2, cooldown=10.0, clock=clock)
    client = client_for(portal, anna["access_token"], config, breaker=breaker)
    portal.fail_next(count=3, error="502")  # gateway errors: no Bitrix24 error body
    for _ in range(2):
        assert timed(lambda: client.call("profile"))[0].code == "HTTP_502"
    assert timed(lambda: client.call("profile"))[0].code == "PORTAL_UNREACHABLE"
    clock.advance(11)
    assert timed(lambda: client.call("profile"))[0].code == "HTTP_502"  # the probe fails
    assert len(portal.requests) == 3
    outcome, _ = timed(lambda: client.call("profile"))
    assert outcome.code == "PORTAL_UNREACHABLE" and outcome.retry_after == pytest.approx(10, 1)
    clock.advance(11)
    assert client.call("profile")["ID"] == "1"
    assert len(portal.requests) == 4


def test_breaker_one_probe_at_a_time_while_half_open(make_breaker) -> None:
    clock = Clock()
    breaker = make_breaker(threshold=1, cooldown=5.0, clock=clock)
    breaker.failed("portal.example")
    with pytest.raises(BreakerOpen):
        breaker.before("portal.example")
    clock.advance(6)
    assert breaker.before("portal.example") is True  # the probe
    with pytest.raises(BreakerOpen) as refused:
        breaker.before("portal.example")  # the others still fail fast...
    assert 0 < refused.value.retry_after <= 2.0  # ...and try again soon: the probe ends soon
    breaker.abandoned("portal.example", probe=True)  # it sent nothing: the turn passes on
    assert breaker.before("portal.example") is True
    breaker.succeeded("portal.example")
    assert breaker.before("portal.example") is False  # closed
    assert breaker.before("other.example") is False  # hosts are independent


def test_breaker_bitrix24_error_answers_are_not_failures(
    portal, anna, config, make_breaker
) -> None:
    """A portal that answers with an error body (busy, a refused request) is reachable."""
    breaker = make_breaker(threshold=2)
    client = client_for(portal, anna["access_token"], config, breaker=breaker)
    portal.fail_next(count=1, error="502")
    portal.fail_next(count=1, error="QUERY_LIMIT_EXCEEDED")  # 503 with a Bitrix24 body
    portal.fail_next(count=1, error="502")
    portal.fail_next(count=1, error="INTERNAL_SERVER_ERROR")  # 500 with a Bitrix24 body
    portal.fail_next(count=1, error="502")
    codes = [timed(lambda: client.call("profile"))[0].code for _ in range(5)]
    assert codes == ["HTTP_502", "QUERY_LIMIT_EXCEEDED", "HTTP_502", "INTERNAL_SERVER_ERROR"] + [
        "HTTP_502"
    ]
    assert client.call("profile")["ID"] == "1"  # never two failures in a row: still closed
    assert len(portal.requests) == 6


def test_breaker_counts_refused_connections(fake, anna, config, make_breaker) -> None:
    down = fake.add_portal()
    down.add_user(name="Dora", last_name="Down", admin=True)
    token = down.issue_tokens(1)["access_token"]
    breaker = make_breaker(threshold=2)
    client = client_for(down, token, config, breaker=breaker)
    down.go_down()
    assert [timed(lambda: client.call("profile"))[0].code for _ in range(3)] == [
        "CONNECTION_ERROR",
        "CONNECTION_ERROR",
        "PORTAL_UNREACHABLE",
    ]


def test_breaker_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        LocalCircuitBreaker(0, 30)
    with pytest.raises(ValueError):
        LocalCircuitBreaker(3, 0)


@pytest.mark.redis
def test_breaker_is_shared_by_processes_through_redis() -> None:
    """What one process learnt of a host, another one's breaker knows (the same Redis)."""
    url = redis_or_skip()
    prefix = f"b24:cb:test:{uuid.uuid4().hex}:"
    clock = Clock()
    first = RedisCircuitBreaker(url, 2, 30.0, clock=clock, prefix=prefix)
    second = RedisCircuitBreaker(url, 2, 30.0, clock=clock, prefix=prefix)
    first.failed("portal.example")
    second.failed("portal.example")
    with pytest.raises(BreakerOpen):
        first.before("portal.example")
    with pytest.raises(BreakerOpen):
        second.before("portal.example")
    redis.Redis.from_url(url).delete(prefix + "portal.example")


def test_breaker_without_redis_decides_in_process() -> None:
    breaker = RedisCircuitBreaker(
        "redis://127.0.0.1:1/0", 1, 30.0, clock=Clock(), socket_timeout=0.2
    )
    breaker.failed("portal.example")
    assert breaker.degraded
    with pytest.raises(BreakerOpen):
        breaker.before("portal.example")


# --- the in-flight cap -------------------------------------------------------------------------


@pytest.fixture(params=["local", pytest.param("redis", marks=pytest.mark.redis)])
def make_inflight(request):
    prefixes: list[str] = []

    def make():
        if request.param == "local":
            return LocalInflightLimiter()
        prefix = f"b24:if:test:{uuid.uuid4().hex}:"
        prefixes.append(prefix)
        return RedisInflightLimiter(redis_or_skip(), prefix=prefix)

    yield make
    for prefix in prefixes:
        connection = redis.Redis.from_url(REDIS_URL)
        for key in connection.scan_iter(prefix + "*"):
            connection.delete(key)


def _hold(client: BitrixClient, outcomes: list) -> threading.Thread:
    def run() -> None:
        outcomes.append(timed(lambda: client.call("profile"))[0])

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_inflight_a_web_caller_beyond_the_cap_gets_busy_and_sends_nothing(
    portal, anna, config, make_inflight
) -> None:
    inflight = make_inflight()
    slow = dataclasses.replace(config, deadline=3.0)
    portal.transport.unresponsive = True

    def client(wait):
        return client_for(
            portal,
            anna["access_token"],
            slow,
            inflight=inflight,
            max_inflight=2,
            limiter_max_wait=wait,
            limiter_key=portal.member_id,
        )

    outcomes: list = []
    holders = [_hold(client(None), outcomes) for _ in range(2)]
    assert wait_for(lambda: len(portal.requests) == 2)
    outcome, took = timed(lambda: client(0.2).call("profile"))  # a web caller's short wait
    assert isinstance(outcome, BitrixUnavailable) and outcome.code == "PORTAL_BUSY"
    assert outcome.retry_after is not None and took < 2.0
    assert len(portal.requests) == 2  # the third request never reached the portal

    # A background caller waits within its budget (the deadline) for a slot to free.
    background: list = []
    waiting = _hold(client(None), background)
    time.sleep(0.3)
    assert len(portal.requests) == 2
    portal.transport.off()  # the two held requests end (dropped); their slots free
    for thread in (*holders, waiting):
        thread.join(timeout=10)
    assert len(background) == 1 and isinstance(background[0], dict)
    assert background[0]["ID"] == "1"
    assert len(portal.requests) == 3


@pytest.mark.redis
def test_inflight_a_killed_holder_frees_its_slot_after_its_time_to_live() -> None:
    url = redis_or_skip()
    prefix = f"b24:if:test:{uuid.uuid4().hex}:"
    inflight = RedisInflightLimiter(url, prefix=prefix)
    inflight.acquire("portal", 1, max_wait=0, ttl=1.0)  # never released: its worker died
    with pytest.raises(InflightTimeout):
        inflight.acquire("portal", 1, max_wait=0, ttl=1.0)
    started = time.monotonic()
    slot = inflight.acquire("portal", 1, max_wait=10, ttl=1.0)
    assert time.monotonic() - started < 9
    inflight.release("portal", slot)
    redis.Redis.from_url(url).delete(prefix + "portal")


def _take_a_slot_and_die(url: str, prefix: str) -> None:
    RedisInflightLimiter(url, prefix=prefix).acquire("portal", 1, max_wait=0, ttl=600)
    os._exit(0)  # as a SIGKILLed worker: the slot is never released


@pytest.mark.redis
def test_inflight_a_dead_process_of_this_machine_frees_its_slot_at_once() -> None:
    """A killed worker's slot would stay taken for its whole TTL (the deadline plus 5 s); a
    process on the same machine finds the holder gone and frees it when the cap is full."""
    url = redis_or_skip()
    prefix = f"b24:if:test:{uuid.uuid4().hex}:"
    child = multiprocessing.get_context("spawn").Process(
        target=_take_a_slot_and_die, args=(url, prefix)
    )
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    connection = redis.Redis.from_url(url)
    assert connection.zcard(prefix + "portal") == 1  # held by the dead process
    inflight = RedisInflightLimiter(url, prefix=prefix)
    slot = inflight.acquire("portal", 1, max_wait=0, ttl=600)  # at once, not in 10 minutes
    assert connection.zrange(prefix + "portal", 0, -1) == [slot.encode()]
    inflight.release("portal", slot)
    live = RedisInflightLimiter(url, prefix=prefix).acquire("portal", 1, max_wait=0, ttl=600)
    with pytest.raises(InflightTimeout):  # a live process's slot is never taken away
        inflight.acquire("portal", 1, max_wait=0.2, ttl=600)
    inflight.release("portal", live)
    connection.delete(prefix + "portal")


@pytest.mark.redis
def test_inflight_is_shared_by_processes_through_redis() -> None:
    url = redis_or_skip()
    prefix = f"b24:if:test:{uuid.uuid4().hex}:"
    first = RedisInflightLimiter(url, prefix=prefix)
    second = RedisInflightLimiter(url, prefix=prefix)
    held = [
        first.acquire("portal", 2, max_wait=0, ttl=30),
        second.acquire("portal", 2, max_wait=0, ttl=30),
    ]
    with pytest.raises(InflightTimeout):
        first.acquire("portal", 2, max_wait=0.1, ttl=30)
    with pytest.raises(InflightTimeout):
        second.acquire("portal", 2, max_wait=0.1, ttl=30)
    assert first.acquire("other", 2, max_wait=0, ttl=30)  # portals are independent
    first.release("portal", held[0])
    assert second.acquire("portal", 2, max_wait=0, ttl=30)
    connection = redis.Redis.from_url(url)
    for key in connection.scan_iter(prefix + "*"):
        connection.delete(key)


# --- two worker processes, two tenants, real Redis -----------------------------------------------

FAIR_THRESHOLD = 3
FAIR_WORKERS = 2
FAIR_JOBS = 24
FAIR_BOUND_S = 15.0
"""The most a healthy tenant's call may wait in the shared queue, from being queued to being
answered, while the other tenant's portal drips. Expected: about two deadlines (the slow calls
before the breaker opens, shared by both workers); a dripping call alone lasts over a minute."""


def _fair_worker(redis_url, prefix, tenants, jobs, results, ready) -> None:
    from b24app.portals.bitrix import build_session

    config = BitrixConfig(
        client_id="app.fake", client_secret="unused", allow_private=True,
        connect_timeout=2.0, read_timeout=4.0, deadline=DEADLINE,
    )  # fmt: skip
    breaker = RedisCircuitBreaker(redis_url, FAIR_THRESHOLD, 600.0, prefix=prefix + "cb:")
    inflight = RedisInflightLimiter(redis_url, prefix=prefix + "if:")
    session = build_session(config)
    ready.put(os.getpid())
    while (job := jobs.get(timeout=120)) is not None:
        tenant, queued_at = job
        endpoint, token, member_id = tenants[tenant]
        client = BitrixClient(
            endpoint, token, config=config, session=session, breaker=breaker,
            inflight=inflight, limiter_key=member_id,
        )  # fmt: skip
        try:
            client.call("profile")
            code = "ok"
        except BitrixUnavailable as exc:
            code = exc.code
        results.put((tenant, code, queued_at, time.time()))


@pytest.mark.redis
def test_a_dripping_tenant_does_not_hold_up_another_tenants_calls_in_shared_workers(fake) -> None:
    """Two worker processes take calls for two tenants from one queue, as Celery workers do.
    Tenant A's portal drips. Tenant B's calls are all answered within FAIR_BOUND_S of being
    queued, and A's portal sees at most threshold + workers - 1 requests: the breaker is
    shared through Redis (process-local breakers would let each process fail on its own)."""
    url = redis_or_skip()
    prefix = f"b24:test:{uuid.uuid4().hex}:"
    slow, healthy = fake.add_portal(), fake.add_portal()
    tenants = {}
    for name, portal in (("A", slow), ("B", healthy)):
        portal.add_user(name="Anna", last_name="Smirnova", admin=True)
        tenants[name] = (portal.client_endpoint, portal.issue_tokens(1)["access_token"],
                         portal.member_id)  # fmt: skip
    slow.transport.drip_interval_s = DRIP

    context = multiprocessing.get_context("spawn")
    jobs, results, ready = context.Queue(), context.Queue(), context.Queue()
    workers = [
        context.Process(target=_fair_worker, args=(url, prefix, tenants, jobs, results, ready))
        for _ in range(FAIR_WORKERS)
    ]
    for worker in workers:
        worker.start()
    try:
        for _ in workers:
            ready.get(timeout=90)  # spawned interpreters need a moment to import
        for index in range(FAIR_JOBS):
            jobs.put(("A" if index % 2 == 0 else "B", time.time()))
        for _ in workers:
            jobs.put(None)
        done = [results.get(timeout=120) for _ in range(FAIR_JOBS)]
        for worker in workers:
            worker.join(timeout=30)
            assert worker.exitcode == 0
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()
        connection = redis.Redis.from_url(url)
        for key in connection.scan_iter(prefix + "*"):
            connection.delete(key)

    b_calls = [
        (code, answered - queued) for tenant, code, queued, answered in done if tenant == "B"
    ]
    assert [code for code, _ in b_calls] == ["ok"] * (FAIR_JOBS // 2)
    assert max(waited for _, waited in b_calls) < FAIR_BOUND_S, b_calls
    a_codes = {code for tenant, code, _, _ in done if tenant == "A"}
    assert (
        a_codes <= {"DEADLINE_EXCEEDED", "PORTAL_UNREACHABLE"} and "PORTAL_UNREACHABLE" in a_codes
    )
    assert len(slow.requests) <= FAIR_THRESHOLD + FAIR_WORKERS - 1, slow.requests
    assert len(healthy.requests) == FAIR_JOBS // 2


# --- the app's own clients ---------------------------------------------------------------------


def _app_client(portal, token: str, wait: float | None = 0.2) -> BitrixClient:
    from b24app.portals.services import clients

    return clients._client(
        portal.client_endpoint,
        token,
        member_id=portal.member_id,
        rate=(50, 2.0),
        limiter_max_wait=wait,
    )


def test_the_apps_clients_take_the_deadline_and_the_breaker_from_the_settings(
    settings, portal, anna
) -> None:
    settings.B24_HTTP_DEADLINE = DEADLINE
    settings.B24_BREAKER_FAILURES = 2
    settings.B24_BREAKER_COOLDOWN = 60.0
    portal.transport.unresponsive = True
    for _ in range(2):
        outcome, took = timed(lambda: _app_client(portal, anna["access_token"]).call("profile"))
        assert outcome.code == "DEADLINE_EXCEEDED" and took < BOUND
    outcome, took = timed(lambda: _app_client(portal, anna["access_token"]).call("profile"))
    assert outcome.code == "PORTAL_UNREACHABLE" and 50 < outcome.retry_after <= 60
    assert len(portal.requests) == 2


def test_the_apps_clients_cap_the_requests_in_flight_to_a_portal(settings, portal, anna) -> None:
    settings.B24_HTTP_DEADLINE = 3.0
    settings.B24_PORTAL_MAX_INFLIGHT = 1
    portal.transport.unresponsive = True
    held: list = []
    holder = _hold(_app_client(portal, anna["access_token"], wait=None), held)
    assert wait_for(lambda: len(portal.requests) == 1)
    outcome, took = timed(lambda: _app_client(portal, anna["access_token"]).call("profile"))
    assert outcome.code == "PORTAL_BUSY" and took < 2.0
    assert len(portal.requests) == 1
    portal.transport.off()
    holder.join(timeout=10)
    assert _app_client(portal, anna["access_token"]).call("profile")["ID"] == "1"


@pytest.mark.parametrize(
    "name, value",
    [
        ("B24_HTTP_DEADLINE", "0"),
        ("B24_HTTP_DEADLINE", "soon"),
        ("B24_HTTP_MAX_BODY", "-1"),
        ("B24_HTTP_MAX_BODY", "1.5"),
        ("B24_BREAKER_FAILURES", "0"),
        ("B24_BREAKER_COOLDOWN", "inf"),
        ("B24_PORTAL_MAX_INFLIGHT", "none"),
    ],
)
def test_transport_settings_refuse_bad_values_at_start_up(name, value) -> None:
    from tests.b24app.test_settings import _run_django

    result = _run_django({"DJANGO_DEBUG": "true", name: value}, "check")
    assert result.returncode != 0
    assert f"{name} must be a positive" in result.stderr
