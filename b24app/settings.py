"""The only settings module. Production differs from development by environment variables only.

Names and defaults are listed in .env.example and docs/OPERATIONS.md. A `.env` file next to
manage.py is read when present (or the file DJANGO_ENV_FILE names); the real environment wins.
"""

import base64
import hashlib
import hmac
import os
import re
from pathlib import Path

import environ
from celery.schedules import crontab
from cryptography.fernet import Fernet
from django.core.exceptions import ImproperlyConfigured

from b24app.portals.bitrix.constants import DEFAULT_OAUTH_SERVERS

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
# DJANGO_ENV_FILE names another file (or a missing one, to read none: tests of start-up do).
environ.Env.read_env(os.environ.get("DJANGO_ENV_FILE", BASE_DIR / ".env"), overwrite=False)


def _required(name: str, why: str) -> str:
    value = env.str(name, default="")
    if not value:
        raise ImproperlyConfigured(f"{name} is not set. {why}")
    return value


DEBUG = env.bool("DJANGO_DEBUG", default=False)

MIN_SECRET_LENGTH = 50
_HOW_TO_MAKE_ONE = 'python -c "import secrets; print(secrets.token_urlsafe(50))"'
# Words of values copied from examples and templates ("change-me", "<your secret key>").
_PLACEHOLDER_WORDS = ("changeme", "replaceme", "placeholder", "insecure", "yoursecret", "keyhere")


def _weak_secret(value: str) -> str | None:
    """Why `value` is too weak to sign with when DJANGO_DEBUG is off, or None. Never echoes it."""
    letters = "".join(ch for ch in value.lower() if ch.isalnum())
    repeated = re.fullmatch(r"(.+?)\1+", value, flags=re.DOTALL)
    if value.startswith("django-insecure-"):
        return "it is a django-insecure- key, meant for development only"
    if len(value) < MIN_SECRET_LENGTH:
        return f"it is shorter than {MIN_SECRET_LENGTH} characters"
    if len(set(value)) < 5:
        return "it has fewer than 5 different characters"
    if repeated and len(repeated.group(1)) < MIN_SECRET_LENGTH:
        return "it is a short piece repeated"
    if re.search(r"<[^<>]*>", value) or any(word in letters for word in _PLACEHOLDER_WORDS):
        return "it looks like a placeholder, not a random value"
    return None


def _signing_secret(name: str, value: str) -> str:
    """`value` when it is strong enough, else a start-up error naming the variable."""
    problem = None if DEBUG else _weak_secret(value)
    if problem:
        raise ImproperlyConfigured(
            f"{name} is too weak: {problem}. With DJANGO_DEBUG off it must be at least "
            f"{MIN_SECRET_LENGTH} random characters. Make one with: {_HOW_TO_MAKE_ONE}"
        )
    return value


if DEBUG:
    SECRET_KEY = env.str("DJANGO_SECRET_KEY", default="django-insecure-development-only-key")
else:
    SECRET_KEY = _signing_secret(
        "DJANGO_SECRET_KEY",
        _required(
            "DJANGO_SECRET_KEY",
            "It is required when DJANGO_DEBUG is off; `make run` writes one into .env.",
        ),
    )


def _frame_signing_key() -> str:
    """The key of the screen's frame tokens (b24app.portals.frame): B24_FRAME_SIGNING_KEY, else
    one derived from the secret key for that use alone. Every browser that opens the app holds a
    frame token; with a key of their own they can be rotated (or lost) apart from the secret
    key that signs operators' sessions and OAuth states."""
    value = env.str("B24_FRAME_SIGNING_KEY", default="")
    if not value:
        return hmac.new(
            SECRET_KEY.encode(), b"b24app.frame-signing-key", hashlib.sha256
        ).hexdigest()
    if value == SECRET_KEY:
        raise ImproperlyConfigured(
            "B24_FRAME_SIGNING_KEY must differ from DJANGO_SECRET_KEY (or leave it unset to "
            "derive one from the secret key)."
        )
    return _signing_secret("B24_FRAME_SIGNING_KEY", value)


B24_FRAME_SIGNING_KEY = _frame_signing_key()

ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["localhost", "127.0.0.1"])

# --- Bitrix24 -----------------------------------------------------------------------------------

B24_CLIENT_ID = env.str("B24_CLIENT_ID", default="")
B24_CLIENT_SECRET = env.str("B24_CLIENT_SECRET", default="")
B24_APP_URL = env.str("B24_APP_URL", default="").rstrip("/")
B24_OAUTH_SERVERS = tuple(
    server.rstrip("/")
    for server in env.list("B24_OAUTH_SERVERS", default=list(DEFAULT_OAUTH_SERVERS))
)
B24_ALLOW_PRIVATE_PORTALS = env.bool("B24_ALLOW_PRIVATE_PORTALS", default=False)
B24_RATE_LIMIT = env.str("B24_RATE_LIMIT", default="50/2")
# Seconds to wait for an answer from Bitrix24 (REST and OAuth) once connected.
B24_HTTP_READ_TIMEOUT = env.float("B24_HTTP_READ_TIMEOUT", default=20.0)


def _positive(name: str, default: float, kind=float):
    """A positive number from the environment, or a start-up error naming the variable."""
    raw = env.str(name, default=str(default))
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not 0 < value < float("inf"):
        what = "whole number" if kind is int else "number"
        raise ImproperlyConfigured(f"{name} must be a positive {what}, not {raw!r}.")
    return value


# Wall-clock limit on one call to Bitrix24 (REST or OAuth): connect, send and the whole answer.
B24_HTTP_DEADLINE = _positive("B24_HTTP_DEADLINE", 25.0)
# The largest answer read from Bitrix24, in bytes; a longer one is refused, its connection closed.
B24_HTTP_MAX_BODY = _positive("B24_HTTP_MAX_BODY", 8 * 1024 * 1024, int)
# Per-portal circuit breaker: transport failures in a row that open it, and its cool-down (s).
B24_BREAKER_FAILURES = _positive("B24_BREAKER_FAILURES", 5, int)
B24_BREAKER_COOLDOWN = _positive("B24_BREAKER_COOLDOWN", 30.0)
# Requests in flight to one portal at once, across every process (shared through Redis).
B24_PORTAL_MAX_INFLIGHT = _positive("B24_PORTAL_MAX_INFLIGHT", 10, int)
if B24_ALLOW_PRIVATE_PORTALS:
    # oauthlib refuses http:// token endpoints unless told otherwise; only for local portals.
    os.environ.setdefault("OAUTHLIB_INSECURE_TRANSPORT", "1")


def _token_keys() -> list[str]:
    raw = env.list("B24_TOKEN_KEYS", default=[])
    if not raw:
        if not DEBUG:
            raise ImproperlyConfigured(
                "B24_TOKEN_KEYS is not set. It is required when DJANGO_DEBUG is off: "
                "comma-separated Fernet keys, the first encrypts, all decrypt. "
                'Make one with: python -c "from cryptography.fernet import Fernet; '
                'print(Fernet.generate_key().decode())"'
            )
        digest = hashlib.sha256(b"b24-token-keys:" + SECRET_KEY.encode()).digest()
        return [base64.urlsafe_b64encode(digest).decode()]
    for position, key in enumerate(raw, start=1):
        try:
            Fernet(key)
        except ValueError as exc:
            raise ImproperlyConfigured(
                f"B24_TOKEN_KEYS: key number {position} is not a valid Fernet key "
                "(32 url-safe base64-encoded bytes)."
            ) from exc
    return raw


B24_TOKEN_KEYS = _token_keys()
# Bearer token that shows /healthz's detail (timings, error types, modes); unset: nobody sees it.
B24_HEALTH_TOKEN = env.str("B24_HEALTH_TOKEN", default="")

# --- Metrics ------------------------------------------------------------------------------------

# Bearer token of GET /metrics (Prometheus, b24app/metrics.py); unset or empty: /metrics answers
# 404. Multi-process metrics (gunicorn, Celery) need PROMETHEUS_MULTIPROC_DIR, which
# prometheus-client reads from the environment itself (docs/OPERATIONS.md, "Metrics").
MIN_METRICS_TOKEN_LENGTH = 16
B24_METRICS_TOKEN = env.str("B24_METRICS_TOKEN", default="").strip()
if B24_METRICS_TOKEN and len(B24_METRICS_TOKEN) < MIN_METRICS_TOKEN_LENGTH:
    raise ImproperlyConfigured(
        f"B24_METRICS_TOKEN is too short: it must be at least {MIN_METRICS_TOKEN_LENGTH} "
        "characters (or unset, to turn /metrics off). Make one with: "
        'python -c "import secrets; print(secrets.token_urlsafe(32))"'
    )

# --- Django -------------------------------------------------------------------------------------

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "csp",
    "b24app.portals",
    "results",
]

MIDDLEWARE = [
    # django-csp's CSPMiddleware (b24app.framing), outermost, so that every response carries
    # the frame policy, error pages of the middlewares below (a disallowed host, say) included.
    "b24app.framing.FramePolicyMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.locale.LocaleMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]

ROOT_URLCONF = "b24app.urls"
WSGI_APPLICATION = "b24app.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {"default": env.db_url("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}")}
DATABASES["default"]["CONN_MAX_AGE"] = env.int("DJANGO_CONN_MAX_AGE", default=60)
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # The embedded default: write-ahead logging lets the screen read while a change is being
    # written (inline background work, the threaded dev server), and a commit appends to the log
    # instead of syncing a rollback journal and the database file each time. IMMEDIATE takes the
    # write lock when a transaction starts, so two writers wait for each other (SQLite's busy
    # timeout, 5 s) instead of one failing with "database is locked" halfway through.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            "transaction_mode": "IMMEDIATE",
        }
    )
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en"
LANGUAGES = [("en", "English"), ("ru", "Русский")]
LOCALE_PATHS = [BASE_DIR / "locale"]
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
# Where collectstatic writes and whitenoise serves from.
STATIC_ROOT = Path(env.str("DJANGO_STATIC_ROOT", default=str(BASE_DIR / "staticfiles")))
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}
# Straight from the apps' static folders only while debugging (`make run`). Otherwise from what
# collectstatic wrote (a deployment's build step; the tests' and benches' servers do it too),
# through its manifest: a file missing from it is an error, not a page without its script.
WHITENOISE_USE_FINDERS = DEBUG
WHITENOISE_MANIFEST_STRICT = not DEBUG

# --- Security -----------------------------------------------------------------------------------

# Pages are forbidden in frames (X-Frame-Options and CSP frame-ancestors 'none'), except the frame
# views, which allow exactly the verified portal's origin (b24app.framing).
X_FRAME_OPTIONS = "DENY"
# django-csp: the policy of every response is `frame-ancestors 'none'` and nothing else
# (default-src is django-csp's default otherwise). The screen adds its fuller policy
# (results.http.SCREEN_POLICY); `allow_portal_framing` replaces frame-ancestors per response.
CONTENT_SECURITY_POLICY = {"DIRECTIVES": {"default-src": None, "frame-ancestors": ["'none'"]}}
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
SESSION_COOKIE_HTTPONLY = True
if not DEBUG:
    # Behind a TLS-terminating proxy (Heroku-style routers) that sets X-Forwarded-Proto.
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = env.bool("DJANGO_SECURE_SSL_REDIRECT", default=True)
    SECURE_REDIRECT_EXEMPT = [r"^healthz$"]
    SECURE_HSTS_SECONDS = env.int("DJANGO_SECURE_HSTS_SECONDS", default=60 * 60 * 24 * 365)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True

# --- The results outbox ---------------------------------------------------------------------

# Changes waiting to reach Bitrix24 (Queued) that one person, and one portal, may have at a time;
# past either, a new change is refused with a message and nothing is stored.
RESULTS_QUEUED_PER_ACCOUNT = env.int("RESULTS_QUEUED_PER_ACCOUNT", default=20)
RESULTS_QUEUED_PER_PORTAL = env.int("RESULTS_QUEUED_PER_PORTAL", default=200)
# Days a delivered change (Saved or Not saved) is kept, then purged by the daily beat job.
RESULTS_RETENTION_DAYS = env.int("RESULTS_RETENTION_DAYS", default=90)
if RESULTS_QUEUED_PER_ACCOUNT < 1 or RESULTS_QUEUED_PER_PORTAL < 1:
    raise ImproperlyConfigured(
        "RESULTS_QUEUED_PER_ACCOUNT and RESULTS_QUEUED_PER_PORTAL must be at least 1."
    )
if RESULTS_RETENTION_DAYS < 2:
    # A refused change is shown with its reason for a day, and Bitrix24 remembers an
    # idempotent answer for 24 h: a shorter retention would lose what those rely on.
    raise ImproperlyConfigured("RESULTS_RETENTION_DAYS must be at least 2 (days).")

# --- Celery and Redis ---------------------------------------------------------------------------

CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default="")
REDIS_URL = env.str(
    "REDIS_URL",
    default=CELERY_BROKER_URL if CELERY_BROKER_URL.startswith(("redis://", "rediss://")) else "",
)
# Django's cache holds what is worth not asking Bitrix24 again for a few minutes (who a frame's
# access token belongs to, keyed by an HMAC of it): in Redis when there is one, so every process
# shares it, else in each process' memory.
CACHES = {
    "default": (
        {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": "b24app",
            "OPTIONS": {"socket_timeout": 0.5, "socket_connect_timeout": 0.5},
        }
        if REDIS_URL
        else {
            "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
            "LOCATION": "b24app",
            "OPTIONS": {"MAX_ENTRIES": 10_000},  # an identity is a few hundred bytes
        }
    )
}
# Without a broker, background work runs inline in the web process (the embedded default). That
# is no way to serve portals: a change whose first attempt failed is retried only while a screen
# polls, and nothing refreshes idle tokens. So with DJANGO_DEBUG off it needs saying.
B24_INLINE_TASKS = env.bool("B24_INLINE_TASKS", default=DEBUG)
if not CELERY_BROKER_URL and not B24_INLINE_TASKS:
    raise ImproperlyConfigured(
        "CELERY_BROKER_URL is not set. It is required when DJANGO_DEBUG is off: without a broker "
        "a change that Bitrix24 did not take at once is retried only while someone's screen is "
        "open, and idle tokens are never refreshed. Set CELERY_BROKER_URL (e.g. "
        "redis://host:6379/0), or B24_INLINE_TASKS=true to run background work inline anyway."
    )
CELERY_TASK_ALWAYS_EAGER = not CELERY_BROKER_URL
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SOFT_TIME_LIMIT = 60
CELERY_TASK_TIME_LIMIT = 90
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# Keep Django's LOGGING (secret masking, one line per event) in workers instead of Celery's own.
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# Redis redelivers an unacknowledged task after the visibility timeout; keep it well above the
# longest task so a slow task is not run twice, and short enough that a killed worker's task
# comes back.
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 15 * 60}
CELERY_TIMEZONE = "UTC"
CELERY_BEAT_SCHEDULE = {
    "result-changes-sweep": {
        "task": "results.tasks.result_changes_sweep_task",
        "schedule": 60,
    },
    # A wall-clock time (not "every 24 h", which restarts count from zero) so a beat restarted
    # more often than daily still runs it.
    "accounts-keepalive": {
        "task": "b24app.portals.tasks.accounts_keepalive_task",
        "schedule": crontab(hour=3, minute=17),
    },
    "portals-bindings-check": {
        "task": "b24app.portals.tasks.portals_bindings_check_task",
        "schedule": crontab(hour=3, minute=29),
    },
    "event-receipts-purge": {
        "task": "b24app.portals.tasks.event_receipts_purge_task",
        "schedule": crontab(hour=3, minute=41),
    },
    "result-changes-purge": {
        "task": "results.tasks.result_changes_purge_task",
        "schedule": crontab(hour=3, minute=53),
    },
}

# --- Logging ------------------------------------------------------------------------------------

LOG_LEVEL = env.str("DJANGO_LOG_LEVEL", default="INFO")
# DJANGO_LOG_FORMAT: the formatter of each value; both run after the same masking filter.
LOG_FORMATTERS = {"text": "b24app.logs.OneLineFormatter", "json": "b24app.logs.JsonLineFormatter"}


def _log_format() -> str:
    """DJANGO_LOG_FORMAT (`text` by default), or a start-up error naming the allowed values."""
    raw = env.str("DJANGO_LOG_FORMAT", default="text")
    value = raw.strip().lower() or "text"
    if value not in LOG_FORMATTERS:
        allowed = " or ".join(f"`{name}`" for name in LOG_FORMATTERS)
        # A long value is not echoed: it may be a secret pasted into the wrong variable.
        shown = repr(raw) if len(raw) <= 12 else f"a {len(raw)}-character value"
        raise ImproperlyConfigured(
            f"DJANGO_LOG_FORMAT must be {allowed} (default `text`), not {shown}."
        )
    return value


LOG_FORMAT = _log_format()
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"mask_secrets": {"()": "b24app.logs.SecretMaskingFilter"}},
    "formatters": {"line": {"()": LOG_FORMATTERS[LOG_FORMAT]}},
    "handlers": {
        "stdout": {
            "class": "logging.StreamHandler",
            "stream": "ext://sys.stdout",
            "formatter": "line",
            "filters": ["mask_secrets"],
        },
    },
    "root": {"handlers": ["stdout"], "level": LOG_LEVEL},
    "loggers": {
        "django": {"handlers": ["stdout"], "level": LOG_LEVEL, "propagate": False},
        # Celery's records go through the root handler (masked, one line) in workers too.
        "celery": {"level": LOG_LEVEL},
    },
}

# --- Error reports (Sentry) ---------------------------------------------------------------------

# Off unless SENTRY_DSN is set; on, every process that loads these settings (web and Celery
# workers) reports errors, masked like the logs (b24app/errorreports.py).
SENTRY_DSN = env.str("SENTRY_DSN", default="")
SENTRY_ENVIRONMENT = env.str("SENTRY_ENVIRONMENT", default="")


def _sample_rate(name: str) -> float:
    """A fraction from 0 to 1 (default 0), or a start-up error naming the variable."""
    raw = env.str(name, default="").strip()
    try:
        rate = float(raw) if raw else 0.0
    except ValueError:
        rate = -1.0
    if not 0.0 <= rate <= 1.0:  # also refuses nan
        shown = repr(raw) if len(raw) <= 12 else f"a {len(raw)}-character value"
        raise ImproperlyConfigured(f"{name} must be a number from 0 to 1, not {shown}.")
    return rate


SENTRY_TRACES_SAMPLE_RATE = _sample_rate("SENTRY_TRACES_SAMPLE_RATE")
if SENTRY_DSN:
    from b24app.errorreports import start_error_reports

    start_error_reports(SENTRY_DSN, SENTRY_ENVIRONMENT, SENTRY_TRACES_SAMPLE_RATE)
