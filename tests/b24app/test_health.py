import pytest
from django.db import connection


@pytest.mark.django_db
def test_healthz_ok_on_embedded_defaults(client, settings):
    settings.CELERY_BROKER_URL = ""
    settings.REDIS_URL = ""
    response = client.get("/healthz")
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
    """The app still works without Redis (the limiter paces through the database), so the
    instance stays in rotation; the body says what is missing and what stands in for it."""
    settings.CELERY_BROKER_URL = ""
    settings.REDIS_URL = "redis://:hunter2secret@127.0.0.1:1/0"
    response = client.get("/healthz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "degraded"
    assert body["checks"]["redis"]["ok"] is False
    expected = "database" if connection.vendor == "postgresql" else "in-process, reduced rate"
    assert body["checks"]["redis"]["limiter"] == expected
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
@pytest.mark.redis
def test_healthz_ok_with_real_redis(client, settings):
    settings.CELERY_BROKER_URL = ""
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json()["checks"]["redis"]["ok"] is True


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
