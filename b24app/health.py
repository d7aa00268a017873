"""`GET /healthz`: can this process reach what it needs?

Reports the database, the broker (when `CELERY_BROKER_URL` is set), the shared Redis store of the
rate limiter (when `REDIS_URL` is set) and the token keys (can tokens be encrypted and decrypted).
200 `ok` when every configured part is usable; 200 `degraded` when only Redis is down (the rate
limiter then paces through the database, slower but still under every portal's limit, and says
so); 503 otherwise. Never shows a URL or secret.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from django.conf import settings
from django.db import connection
from django.http import JsonResponse
from django.views.decorators.http import require_GET

CHECK_TIMEOUT_S = 2.0


def _database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()


def _broker() -> None:
    from kombu import Connection

    with Connection(settings.CELERY_BROKER_URL, connect_timeout=CHECK_TIMEOUT_S) as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, timeout=CHECK_TIMEOUT_S)


def _redis() -> None:
    import redis

    client = redis.Redis.from_url(
        settings.REDIS_URL,
        socket_connect_timeout=CHECK_TIMEOUT_S,
        socket_timeout=CHECK_TIMEOUT_S,
    )
    try:
        client.ping()
    finally:
        client.close()


def _token_keys() -> None:
    from cryptography.fernet import Fernet, MultiFernet

    keys = MultiFernet([Fernet(key) for key in settings.B24_TOKEN_KEYS])
    if keys.decrypt(keys.encrypt(b"healthz")) != b"healthz":
        raise RuntimeError("token keys do not round-trip")


def _run(check: Callable[[], None]) -> dict:
    started = time.monotonic()
    try:
        check()
    except Exception as exc:  # any failure means "not usable"; the type is enough to act on
        return {"ok": False, "error": type(exc).__name__, "ms": _ms(started)}
    return {"ok": True, "ms": _ms(started)}


def _ms(started: float) -> int:
    return round((time.monotonic() - started) * 1000)


@require_GET
def healthz(request):
    checks: dict[str, dict] = {"database": _run(_database), "token_keys": _run(_token_keys)}
    checks["broker"] = (
        _run(_broker) if settings.CELERY_BROKER_URL else {"ok": True, "mode": "inline"}
    )
    checks["redis"] = _run(_redis) if settings.REDIS_URL else {"ok": True, "mode": "in-process"}
    if not checks["redis"]["ok"]:
        checks["redis"]["limiter"] = (
            "database" if connection.vendor == "postgresql" else "in-process, reduced rate"
        )
    required = [check for name, check in checks.items() if name != "redis"]
    if not all(check["ok"] for check in required):
        status = "unavailable"
    else:
        status = "ok" if checks["redis"]["ok"] else "degraded"
    response = JsonResponse({"status": status, "checks": checks})
    response.status_code = 503 if status == "unavailable" else 200
    response["Cache-Control"] = "no-store"
    return response
