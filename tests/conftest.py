"""Shared fixtures and the rule that CI never skips a test for want of a service.

Tests marked `postgres`, `redis` or `browser` need PostgreSQL (DATABASE_URL=postgres://…),
Redis (REDIS_URL) or Debian's Chromium. On a developer machine without them such tests are
skipped with the reason; in CI (CI=true) a missing service fails the test instead.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys

import pytest

CHROMIUM = "/usr/bin/chromium"


def _missing_service(marker: str) -> str | None:
    from django.conf import settings
    from django.db import connection

    if marker == "postgres" and connection.vendor != "postgresql":
        return "needs PostgreSQL: set DATABASE_URL=postgres://…"
    if marker == "redis":
        if not settings.REDIS_URL:
            return "needs Redis: set REDIS_URL (or CELERY_BROKER_URL=redis://…)"
        import redis

        try:
            redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=1).ping()
        except redis.RedisError:
            return f"needs Redis, but {settings.REDIS_URL.split('@')[-1]} does not answer"
    if marker == "browser" and not (os.path.exists(CHROMIUM) and shutil.which("chromium")):
        return "needs Debian's Chromium: apt-get install -y chromium"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker in ("postgres", "redis", "browser"):
        if item.get_closest_marker(marker) is None:
            continue
        reason = _missing_service(marker)
        if reason is None:
            continue
        if os.environ.get("CI"):
            pytest.fail(f"CI must provide every service; {reason}", pytrace=False)
        pytest.skip(reason)


@pytest.fixture(scope="session", autouse=True)
def _collected_static(tmp_path_factory):
    """Collect static files once, as a deployment does, so the manifest storage works as in
    production (DEBUG is off in tests)."""
    from django.core.management import call_command
    from django.test import override_settings

    with override_settings(STATIC_ROOT=tmp_path_factory.mktemp("static")):
        call_command("collectstatic", interactive=False, verbosity=0)
        yield


def pytest_collection_modifyitems(config, items):
    """The tests marked `slow` first, each followed by one other: a parallel run (`-n`, with
    `--maxschedchunk 2`) then starts each of them on its own worker at once, instead of one
    worker running them one after another at the end."""
    slow = [item for item in items if item.get_closest_marker("slow")]
    if not slow:
        return
    rest = [item for item in items if not item.get_closest_marker("slow")]
    ordered = []
    for item in slow:
        ordered.append(item)
        if rest:
            ordered.append(rest.pop(0))
    items[:] = ordered + rest


def pytest_report_header(config) -> list[str]:
    from django.conf import settings

    database = settings.DATABASES["default"]
    redis_url = settings.REDIS_URL.split("@")[-1] if settings.REDIS_URL else "unset (in-process)"
    broker = settings.CELERY_BROKER_URL.split("@")[-1] if settings.CELERY_BROKER_URL else "inline"
    engine = database["ENGINE"].rsplit(".", 1)[-1]
    return [
        f"database: {engine} {database.get('HOST') or database['NAME']}",
        f"redis: {redis_url}; celery broker: {broker}",
    ]


_REAL_GETADDRINFO = socket.getaddrinfo


def _getaddrinfo_without_invalid(host, *args, **kwargs):
    if isinstance(host, str) and host.rstrip(".").lower().endswith(".invalid"):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return _REAL_GETADDRINFO(host, *args, **kwargs)


@pytest.fixture(autouse=True)
def _invalid_names_never_resolve(monkeypatch):
    """`.invalid` names (RFC 6761) never resolve, so the tests use them for public-looking hosts
    that must not be reached. Their lookups are answered here, at once, as every resolver
    answers them: asked of this machine's DNS server they sometimes waited out its 5 s timeout,
    and nothing about them should leave the machine."""
    monkeypatch.setattr(socket, "getaddrinfo", _getaddrinfo_without_invalid)
    yield


@pytest.fixture(autouse=True)
def _fresh_token_methods():
    """Each test starts with a process that has learnt nothing about how OAuth servers take
    token requests (`OAuthServer.token_method`): the unit tests share one origin, and a fake's
    port may be one an earlier test's fake had."""
    bitrix = sys.modules.get("b24app.portals.bitrix")
    if bitrix is not None:
        bitrix.OAuthServer.forget_token_methods()
    yield


@pytest.fixture(autouse=True)
def _fresh_portal_breakers():
    """Each test starts with every portal host's circuit breaker closed and no request in
    flight: fake portals listen on ephemeral loopback ports, which a later test (or run) may
    get again. Breaker and in-flight state lives in the process and, with REDIS_URL, in Redis
    (`b24:cb:*`, `b24:if:*`)."""
    clients = sys.modules.get("b24app.portals.services.clients")
    if clients is not None:
        clients._breaker_for.cache_clear()
        clients._inflight_for.cache_clear()
    from django.conf import settings

    if settings.configured and settings.REDIS_URL:  # not configured: the emulator's own tests
        import redis

        try:
            connection = redis.Redis.from_url(
                settings.REDIS_URL, socket_connect_timeout=0.5, socket_timeout=0.5
            )
            for pattern in ("b24:cb:*", "b24:if:*"):
                for key in connection.scan_iter(pattern):
                    connection.delete(key)
        except redis.RedisError:
            pass  # no Redis: the breakers decide in-process, and those were just replaced
    yield


@pytest.fixture(autouse=True)
def _fresh_factory_sequences():
    """Each test's factory rows are numbered from 1 (tests/support/factories.py), whichever
    tests built rows before it. Only once a test has imported the factories: the emulator's own
    tests run without Django."""
    factories = sys.modules.get("tests.support.factories")
    if factories is not None:
        factories.reset_sequences()
    yield


@pytest.fixture
def fake(settings):
    """A fake Bitrix24 (OAuth server + portals) on loopback, trusted by the app's settings."""
    from tests.fakeportal import FakeBitrix

    fake = FakeBitrix(client_id=settings.B24_CLIENT_ID, client_secret=settings.B24_CLIENT_SECRET)
    fake.app_url = "http://testserver"
    fake.start()
    settings.B24_OAUTH_SERVERS = (fake.oauth_url,)
    settings.B24_ALLOW_PRIVATE_PORTALS = True
    settings.B24_APP_URL = "https://app.example.test"
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def portal(fake):
    """A fake portal with an admin (Anna, user 1) and an ordinary user (Boris, user 2)."""
    portal = fake.add_portal()
    portal.add_user(name="Anna", last_name="Smirnova", admin=True)
    portal.add_user(name="Boris", last_name="Petrov", admin=False)
    return portal


@pytest.fixture
def celery_eager():
    """Run Celery tasks inline for this test, even when the run has a broker configured."""
    from b24app.celery import app

    previous = app.conf.task_always_eager
    app.conf.task_always_eager = True
    try:
        yield app
    finally:
        app.conf.task_always_eager = previous


CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def chromium():
    """Debian's Chromium under Playwright, one per test module (Playwright's sync API runs an
    event loop in the test thread; keeping it to the module keeps other tests clear of it)."""
    reason = _missing_service("browser")
    if reason:
        pytest.fail(reason, pytrace=False) if os.environ.get("CI") else pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    # The test's own ORM calls (set-up, assertions) run in the thread that holds that loop.
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                yield browser
            finally:
                browser.close()
    finally:
        if previous is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


@pytest.fixture
def browser_page(chromium):
    """A fresh browser context whose requests never carry a Cookie header, as in a browser
    that blocks third-party cookies."""
    context = chromium.new_context(viewport={"width": 1200, "height": 900})

    def strip_cookies(route, request):
        headers = {k: v for k, v in request.headers.items() if k.lower() != "cookie"}
        route.continue_(headers=headers)

    context.route("**/*", strip_cookies)
    try:
        yield context.new_page()
    finally:
        context.close()


@pytest.fixture
def celery_worker_process(fake, settings, tmp_path):
    """A real `celery -A b24app worker` (prefork, 2 processes) on the run's Redis broker and
    the test database, trusting the fake OAuth server. Needs PostgreSQL and Redis, and a
    test marked `django_db(transaction=True)` so the worker sees committed rows."""
    from b24app.celery import app
    from tests.celery_worker import start_worker, stop_worker

    if not settings.CELERY_BROKER_URL:
        pytest.fail("celery_worker_process needs CELERY_BROKER_URL", pytrace=False)
    app.conf.broker_url = settings.CELERY_BROKER_URL
    was_eager, app.conf.task_always_eager = app.conf.task_always_eager, False
    with app.connection_for_write() as conn:
        app.control.purge(connection=conn)
    worker = start_worker(fake, settings, tmp_path / "celery-worker.log", "main")
    try:
        yield worker
    finally:
        app.conf.task_always_eager = was_eager
        stop_worker(worker)
