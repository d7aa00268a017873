"""Test-run environment defaults, loaded as a pytest plugin (`-p tests.envdefaults`) so that they
are in place before pytest-django imports the settings. The real environment wins (CI sets
DATABASE_URL, CELERY_BROKER_URL and REDIS_URL to the machine's PostgreSQL and Redis)."""

import os

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
