import threading

import pytest
import redis

from b24app import health
from b24app.portals import services
from b24app.portals.ratelimit import RateLimitTimeout, RedisLeakyBucket

TOKEN = "health-token-for-tests-Qm8vX2pL7wR4tN8b"
DOWN_REDIS = "redis://:hunter2secret@127.0.0.1:1/0"


class FrozenClock:
    """The probe cache's clock: it moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(autouse=True)
def clock(monkeypatch):
    frozen = FrozenClock()
    monkeypatch.setattr(health.PROBES, "clock", frozen)
    health.PROBES.clear()
    yield frozen
    health.PROBES.clear()


def _detail(client, settings):
    """`GET /healthz` with the health token: the detailed answer."""
    settings.B24_HEALTH_TOKEN = TOKEN
    return client.get("/healthz", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")


@pytest.mark.django_db
def test_healthz_ok_on_embedded_defaults(client, settings):
    settings.CELERY_BROKER_URL = ""
    settings.REDIS_URL = ""
    response = _detail(client, settings)
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["checks"]["database"]["ok"] is True
    assert body["checks"]["token_keys"]["ok"] is True
    assert body["checks"]["broker"] == {"ok": True, "mode": "inline"}
    assert body["checks"]["redis"] == {"ok": True, "mode": "in-process"}
    assert response["Cache-Control"] == "no-store"


@pytest.mark.django_db
def test_healthz_degraded_when_redis_is_unreachable_and_hides_the_url(client, settings):
    """The app still works without Redis (each process paces on its own, at a reduced rate),
    so the instance stays in rotation; the body says what is missing and what stands in."""
    settings.CELERY_BROKER_URL = ""
    settings.REDIS_URL = DOWN_REDIS
    response = _detail(client, settings)
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "degraded"
    assert body["checks"]["redis"]["ok"] is False
    assert body["checks"]["redis"]["limiter"] == "in-process, reduced rate"
    assert body["checks"]["database"]["ok"] is True
    assert "hunter2secret" not in response.content.decode()


@pytest.mark.django_db
def test_healthz_503_when_redis_and_the_broker_are_down(client, settings):
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:1/0"
    settings.REDIS_URL = "redis://127.0.0.1:1/1"
    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.json()["status"] == "unavailable"


@pytest.mark.django_db
def test_healthz_503_when_broker_is_unreachable(client, settings):
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:1/0"
    settings.REDIS_URL = ""
    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.json()["checks"]["broker"]["ok"] is False


@pytest.mark.django_db
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"HTTP_AUTHORIZATION": "Bearer not-the-token"},
        {"HTTP_AUTHORIZATION": f"Bearer {TOKEN[:-1]}"},
        {"HTTP_AUTHORIZATION": f"Bearer {TOKEN}x"},
        {"HTTP_AUTHORIZATION": f"Basic {TOKEN}"},
        {"HTTP_AUTHORIZATION": TOKEN},
        {"HTTP_X_HEALTH_TOKEN": TOKEN},
    ],
    ids=["anonymous", "wrong", "prefix", "longer", "basic", "no-scheme", "other-header"],
)
def test_healthz_without_the_token_answers_only_status_and_ok_flags(client, settings, headers):
    settings.B24_HEALTH_TOKEN = TOKEN
    settings.CELERY_BROKER_URL = "redis://:brokerpass@127.0.0.1:1/0"
    settings.REDIS_URL = DOWN_REDIS

    response = client.get("/healthz", {"token": TOKEN}, **headers)

    assert response.status_code == 503
    assert response.json() == {
        "status": "unavailable",
        "checks": {
            "database": {"ok": True},
            "token_keys": {"ok": True},
            "broker": {"ok": False},
            "redis": {"ok": False},
        },
    }
    assert response["Cache-Control"] == "no-store"


@pytest.mark.django_db
def test_healthz_without_the_token_hides_the_modes_too(client, settings):
    settings.B24_HEALTH_TOKEN = TOKEN
    settings.CELERY_BROKER_URL = ""
    settings.REDIS_URL = ""
    body = client.get("/healthz").json()
    assert body["checks"] == {name: {"ok": True} for name in body["checks"]}
    assert "inline" not in str(body) and "in-process" not in str(body)


@pytest.mark.django_db
def test_healthz_with_no_token_configured_nobody_sees_the_detail(client, settings):
    settings.B24_HEALTH_TOKEN = ""
    settings.REDIS_URL = DOWN_REDIS
    for header in ("Bearer ", "Bearer", "Bearer x"):
        body = client.get("/healthz", HTTP_AUTHORIZATION=header).json()
        assert body["checks"]["redis"] == {"ok": False}


@pytest.mark.django_db
def test_healthz_with_the_token_shows_the_detail_but_no_url_or_secret(client, settings):
    settings.CELERY_BROKER_URL = "redis://:brokerpass@127.0.0.1:1/0"
    settings.REDIS_URL = DOWN_REDIS

    response = _detail(client, settings)

    checks = response.json()["checks"]
    assert checks["broker"]["error"] == "OperationalError"  # kombu's
    assert checks["redis"]["error"] == "ConnectionError"
    assert {"ms", "age_s"} <= set(checks["redis"]) and "ms" in checks["database"]
    assert checks["redis"]["limiter"]
    text = response.content.decode()
    assert "hunter2secret" not in text and "brokerpass" not in text and "127.0.0.1" not in text
    assert "Authorization" in response["Vary"]


@pytest.mark.django_db
def test_healthz_probes_an_unreachable_redis_once_per_cache_window(client, settings, clock):
    """A probe of a dead Redis costs up to the connect timeout: 20 hits pay for one."""
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:1/0"
    settings.REDIS_URL = "redis://127.0.0.1:1/1"

    statuses = {client.get("/healthz").status_code for _ in range(20)}

    assert statuses == {503}
    assert health.PROBES.counts == {"broker": 1, "redis": 1}
    clock.advance(health.CACHE_SECONDS)
    assert client.get("/healthz").status_code == 503
    assert health.PROBES.counts == {"broker": 2, "redis": 2}


def test_healthz_concurrent_requests_wait_for_the_one_probe_under_way():
    started, release = threading.Event(), threading.Event()
    calls = []

    def slow_probe():
        calls.append(1)
        started.set()
        assert release.wait(30)

    results = []
    threads = [
        threading.Thread(
            target=lambda: results.append(health.PROBES.get("redis", "redis://x", slow_probe))
        )
        for _ in range(20)
    ]
    for thread in threads:
        thread.start()
    assert started.wait(30)
    release.set()
    for thread in threads:
        thread.join(30)

    assert len(calls) == 1
    assert len(results) == 20 and all(result["ok"] for result in results)


def _named_connections(url: str, name: str) -> set[int]:
    """Ids of the connections to the Redis at `url` that carry `name` (`CLIENT LIST`), on its
    database only: parallel test runs give each worker its own."""
    observer = redis.Redis.from_url(url)
    database = str(observer.connection_pool.connection_kwargs.get("db", 0))
    try:
        return {
            int(c["id"])
            for c in observer.client_list()
            if c.get("name") == name and str(c.get("db")) == database
        }
    finally:
        observer.close()


@pytest.mark.django_db
@pytest.mark.redis
def test_healthz_with_real_redis_probes_once_per_window_over_one_kept_connection(
    client, settings, clock
):
    if not settings.CELERY_BROKER_URL.startswith("redis://"):
        settings.CELERY_BROKER_URL = settings.REDIS_URL
    broker_name = health.CLIENT_NAME + "-broker"

    assert {client.get("/healthz").status_code for _ in range(20)} == {200}
    assert health.PROBES.counts == {"broker": 1, "redis": 1}
    redis_ids = _named_connections(settings.REDIS_URL, health.CLIENT_NAME)
    broker_ids = _named_connections(settings.CELERY_BROKER_URL, broker_name)
    assert len(redis_ids) == 1 and len(broker_ids) == 1

    for _ in range(10):  # each hit past the window probes again, on the same connection
        clock.advance(health.CACHE_SECONDS)
        assert client.get("/healthz").status_code == 200
    assert health.PROBES.counts == {"broker": 11, "redis": 11}
    assert _named_connections(settings.REDIS_URL, health.CLIENT_NAME) == redis_ids
    assert _named_connections(settings.CELERY_BROKER_URL, broker_name) == broker_ids

    # A kept connection the server closed is not an outage: the next probe connects again.
    for url, ids in ((settings.REDIS_URL, redis_ids), (settings.CELERY_BROKER_URL, broker_ids)):
        observer = redis.Redis.from_url(url)
        try:
            observer.client_kill_filter(_id=next(iter(ids)))
        finally:
            observer.close()
    clock.advance(health.CACHE_SECONDS)
    checks = client.get("/healthz").json()["checks"]
    assert checks["redis"] == checks["broker"] == {"ok": True}
    renewed = _named_connections(settings.REDIS_URL, health.CLIENT_NAME)
    assert len(renewed) == 1 and renewed != redis_ids
    renewed = _named_connections(settings.CELERY_BROKER_URL, broker_name)
    assert len(renewed) == 1 and renewed != broker_ids


@pytest.mark.django_db
@pytest.mark.redis
def test_healthz_ok_with_real_redis(client, settings):
    settings.CELERY_BROKER_URL = ""
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json()["checks"]["redis"]["ok"] is True


@pytest.mark.django_db
@pytest.mark.redis
def test_healthz_degraded_while_the_limiter_paces_on_its_own(client, settings, monkeypatch):
    """Redis answers the probe again, but this process's limiter found it down and has not
    tried it since: requests are still paced at the reduced rate, and the answer says so."""
    settings.CELERY_BROKER_URL = ""
    limiter = RedisLeakyBucket(DOWN_REDIS)
    monkeypatch.setattr(services, "rate_limiter", lambda: limiter)
    assert client.get("/healthz").json()["status"] == "ok"  # not degraded before it tried

    with pytest.raises(RateLimitTimeout):  # found Redis down: paces on its own, from full
        limiter.acquire("portal", 50, 2.0, max_wait=0.0)
    response = _detail(client, settings)

    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "degraded"
    assert body["checks"]["redis"]["ok"] is False
    assert body["checks"]["redis"]["limiter"] == "in-process, reduced rate"
    assert client.get("/healthz").json()["checks"]["redis"] == {"ok": False}


@pytest.mark.django_db
@pytest.mark.redis
def test_healthz_ok_with_real_broker(client, settings):
    if not settings.CELERY_BROKER_URL:
        settings.CELERY_BROKER_URL = settings.REDIS_URL
    response = client.get("/healthz")
    assert response.status_code == 200, response.json()
    assert response.json()["checks"]["broker"]["ok"] is True


def test_healthz_rejects_post(client):
    assert client.post("/healthz").status_code == 405
