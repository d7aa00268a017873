"""Test-run environment defaults, loaded as a pytest plugin (`-p tests.envdefaults`) so that they
are in place before pytest-django imports the settings. The real environment wins (CI sets
DATABASE_URL, CELERY_BROKER_URL and REDIS_URL to the machine's PostgreSQL and Redis)."""

import os
import re

TEST_ENV = {
    "DJANGO_DEBUG": "false",
    "DJANGO_SECRET_KEY": "test-only-secret-key-not-for-production-0123456789abcdef",
    # A fixed Fernet key for tests only; production keys come from the environment.
    "B24_TOKEN_KEYS": "x8Q4zv8W7V1o3bZr2m9P0f3c5kQyH1nJtU6wE2sRdAg=",
    "DJANGO_SECURE_SSL_REDIRECT": "false",
    "DJANGO_ALLOWED_HOSTS": "localhost,127.0.0.1,testserver",
    "B24_CLIENT_ID": "app.fake0000000001.00000001",
    "B24_CLIENT_SECRET": "fake-client-secret-for-tests-0123456789",
    "B24_ALLOW_PRIVATE_PORTALS": "true",
    # Without CELERY_BROKER_URL (`make test` on a bare machine) tasks run inline, as in `make run`.
    "B24_INLINE_TASKS": "true",
}

for _name, _value in TEST_ENV.items():
    os.environ.setdefault(_name, _value)
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "b24app.settings")
# Never the machine's error reports: a test's deliberate failures (and the secrets the tests
# plant) must not reach a real Sentry project. Its tests start the SDK themselves, on a
# transport that only records.
os.environ["SENTRY_DSN"] = ""


def _redis_database(url: str, number: int) -> str:
    """`url` with its database number replaced by `number`."""
    base, _, _ = url.partition("?")
    base = re.sub(r"/\d*$", "", base.rstrip("/"))
    return f"{base}/{number}"


# Parallel runs (`pytest -n N`, pytest-xdist): each worker gets its own test database (pytest-django
# suffixes its name with the worker id) and, here, its own Redis databases for the broker and the
# shared state, so one worker's queue, breaker and limiter keys are never another's. Worker gwK
# uses databases 2 + 2K (broker) and 3 + 2K (REDIS_URL); Redis has 16, so at most 7 workers.
_worker = os.environ.get("PYTEST_XDIST_WORKER", "")
if _worker.startswith("gw"):
    _index = int(_worker[2:])
    for _name, _offset in (("CELERY_BROKER_URL", 2), ("REDIS_URL", 3)):
        _url = os.environ.get(_name, "")
        if _url.startswith("redis://"):
            os.environ[_name] = _redis_database(_url, _offset + 2 * _index)
