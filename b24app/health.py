"""`GET /healthz`: can this process reach what it needs?

Reports the database, the broker (when `CELERY_BROKER_URL` is set), the shared Redis store of the
rate limiter (when `REDIS_URL` is set) and the token keys (can tokens be encrypted and decrypted).
200 `ok` when every configured part is usable; 200 `degraded` when only Redis is down, or when
this process's rate limiter still paces on its own after an outage (until its next try of
Redis): each process then paces at a reduced rate, slower but still under every portal's limit,
and web requests leave changes queued for the worker; 503 otherwise.

The URL is public and anonymous, so it stays cheap and tells a stranger nothing of use:

- The broker and Redis are probed at most once per `CACHE_SECONDS` per process (`PROBES`, whose
  clock tests replace), through one long-lived client per URL (`_clients`; a Redis broker's
  kombu connection, Redis's connection pool), not a new connection per request. Concurrent
  requests wait for the one probe under way.
- Without `Authorization: Bearer <B24_HEALTH_TOKEN>` (compared in constant time; the variable is
  optional, and unset means nobody gets more) the answer has only the status and each check's
  `ok`. With it, the detail too: how long each check took, how old a cached probe is, the
  error's type, the mode of an unconfigured part, what paces the limiter. Never a URL or secret.
"""

from __future__ import annotations

import hmac
import threading
import time
from collections import Counter
from collections.abc import Callable

from django.conf import settings
from django.db import connection
from django.http import JsonResponse
from django.utils.cache import patch_vary_headers
from django.views.decorators.http import require_GET

CHECK_TIMEOUT_S = 2.0
CACHE_SECONDS = 5.0
"""How long a broker or Redis probe's outcome is reused by this process."""
LIMITER_WHILE_DOWN = "in-process, reduced rate"
"""What the `redis` check's detail says paces requests while Redis is unusable."""
CLIENT_NAME = "b24app-healthz"
"""The name the health check's Redis connections carry (`CLIENT LIST`; the broker's: `-broker`
appended)."""


class ProbeCache:
    """Outcomes of the remote probes, each reused for `ttl` seconds of `clock`.

    `counts` says how many probes really ran, per check name (for tests and the curious)."""

    def __init__(self, ttl: float = CACHE_SECONDS, clock: Callable[[], float] = time.monotonic):
        self.ttl = ttl
        self.clock = clock
        self.counts: Counter[str] = Counter()
        self._results: dict[tuple[str, str], tuple[float, dict]] = {}
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._guard = threading.Lock()

    def clear(self) -> None:
        with self._guard:
            self._results.clear()
            self.counts.clear()

    def get(self, name: str, url: str, probe: Callable[[], None]) -> dict:
        """The outcome of `probe` for (`name`, `url`): a fresh one if none is younger than
        `ttl`, with `age_s` set to how old it is."""
        key = (name, url)
        result = self._fresh(key)
        if result is None:
            with self._guard:
                lock = self._locks.setdefault(key, threading.Lock())
            with lock:  # one probe at a time per check; the others then read its outcome
                result = self._fresh(key)
                if result is None:
                    self.counts[name] += 1
                    outcome = _run(probe)
                    with self._guard:
                        self._results[key] = (self.clock(), outcome)
                    result = {**outcome, "age_s": 0.0}
        return result

    def _fresh(self, key: tuple[str, str]) -> dict | None:
        with self._guard:
            stored = self._results.get(key)
        if stored is None:
            return None
        age = self.clock() - stored[0]
        if not 0 <= age < self.ttl:
            return None
        return {**stored[1], "age_s": round(age, 1)}


PROBES = ProbeCache()

_clients: dict[tuple[str, str], object] = {}
_clients_guard = threading.Lock()


def _redis_client(url: str):
    """One client (one small connection pool) per URL for the life of the process."""
    import redis

    key = ("redis", url)
    with _clients_guard:
        client = _clients.get(key)
        if client is None:
            client = redis.Redis.from_url(
                url,
                socket_connect_timeout=CHECK_TIMEOUT_S,
                socket_timeout=CHECK_TIMEOUT_S,
                client_name=CLIENT_NAME,
                max_connections=4,
            )
            _clients[key] = client
    return client


def _database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()


def _broker_connection(url: str):
    """One kombu connection per broker URL for the life of the process, made the way Celery
    makes its own (the app's transport options and SSL settings)."""
    from b24app.celery import app

    key = ("broker", url)
    with _clients_guard:
        conn = _clients.get(key)
        if conn is None:
            conn = app.connection_for_write(
                url,
                connect_timeout=CHECK_TIMEOUT_S,
                transport_options={
                    "client_name": CLIENT_NAME + "-broker",
                    "max_retries": 1,
                    "interval_start": 0,
                    "interval_step": 0,
                    "socket_timeout": CHECK_TIMEOUT_S,
                },
            )
            _clients[key] = conn
    return conn


def _forget_broker(url: str, conn) -> None:
    with _clients_guard:
        if _clients.get(("broker", url)) is conn:
            del _clients[("broker", url)]
    try:
        conn.release()
    except Exception:  # noqa: S110 - it is being dropped because it does not work
        pass


def _broker() -> None:
    url = settings.CELERY_BROKER_URL
    conn = _broker_connection(url)
    try:
        conn.ensure_connection(max_retries=1, interval_start=0, timeout=CHECK_TIMEOUT_S)
        if conn.transport.driver_type == "redis":
            # A round trip on the kept connection (redis-py reconnects a dropped one).
            conn.default_channel.client.ping()
            return
    except Exception:
        _forget_broker(url, conn)  # the next probe starts afresh
        raise
    # Another transport (AMQP): a kept connection can look connected after the broker dropped
    # it, so each probe (at most one per CACHE_SECONDS) connects afresh.
    _forget_broker(url, conn)


def _redis() -> None:
    _redis_client(settings.REDIS_URL).ping()


def _limiter_degraded() -> bool:
    """Whether this process's rate limiter paces on its own (its last try of Redis failed)."""
    from b24app.portals.ratelimit import limiter_degraded
    from b24app.portals.services import rate_limiter

    return limiter_degraded(rate_limiter())


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


def _may_see_detail(request) -> bool:
    expected = settings.B24_HEALTH_TOKEN
    if not expected:
        return False
    scheme, _, presented = request.META.get("HTTP_AUTHORIZATION", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(presented.strip().encode(), expected.encode())


@require_GET
def healthz(request):
    checks: dict[str, dict] = {"database": _run(_database), "token_keys": _run(_token_keys)}
    checks["broker"] = (
        PROBES.get("broker", settings.CELERY_BROKER_URL, _broker)
        if settings.CELERY_BROKER_URL
        else {"ok": True, "mode": "inline"}
    )
    checks["redis"] = (
        PROBES.get("redis", settings.REDIS_URL, _redis)
        if settings.REDIS_URL
        else {"ok": True, "mode": "in-process"}
    )
    if settings.REDIS_URL and _limiter_degraded():
        checks["redis"]["ok"] = False  # Redis may answer again; the limiter has not tried yet
    if not checks["redis"]["ok"]:
        checks["redis"]["limiter"] = LIMITER_WHILE_DOWN
    required = [check for name, check in checks.items() if name != "redis"]
    if not all(check["ok"] for check in required):
        status = "unavailable"
    else:
        status = "ok" if checks["redis"]["ok"] else "degraded"
    if not _may_see_detail(request):
        checks = {name: {"ok": check["ok"]} for name, check in checks.items()}
    response = JsonResponse({"status": status, "checks": checks})
    response.status_code = 503 if status == "unavailable" else 200
    response["Cache-Control"] = "no-store"
    patch_vary_headers(response, ["Authorization"])
    return response
