"""Prometheus metrics: every metric the app exports, and `GET /metrics`.

The other modules import this one and call one function where something ends (a delivery
attempt, a token refresh, a refused event or frame open, a REST call); each is a counter
increment or a histogram observation, never a query or a lock. The outbox's depth and age are
read from the database when Prometheus scrapes (`OutboxCollector`, one indexed query).

Labels come only from small fixed sets (`_label`): an outcome the code decides, a refusal
reason from the code's own list, a REST method from the methods the app calls. Anything else
(a code a portal made up, a method added later) becomes `other`, so no portal can add series,
and no label ever carries a portal, a user, a domain, a token or a secret.

Several processes (gunicorn's workers, Celery's prefork children): with
`PROMETHEUS_MULTIPROC_DIR` set (before the process starts) prometheus-client keeps each
process' values in files there, and `/metrics` sums them (`scrape_registry`). The directory
must be emptied when the processes that share it start (docs/OPERATIONS.md, "Metrics").
Without it (`make run`, the tests) the process' default registry is what is exported.
"""

from __future__ import annotations

import hmac
import logging
import os

from django.conf import settings
from django.http import Http404, HttpResponse, HttpResponseNotAllowed
from django.utils.cache import patch_vary_headers
from django.views.decorators.csrf import csrf_exempt
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily

logger = logging.getLogger("b24app.metrics")

OTHER = "other"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""Prometheus' classic text format, which `generate_latest` writes (every name here is ASCII);
prometheus-client's own CONTENT_TYPE_LATEST names a newer version from 0.22 on."""

DELIVERY_OUTCOMES = frozenset({"saved", "failed", "queued", "deferred", "waits"})
REFRESH_OUTCOMES = frozenset({"ok", "refused", "credentials", "waiting", "unavailable", "error"})
EVENT_KINDS = frozenset({"malformed", "refused", "unavailable"})
EVENT_REASONS = frozenset(
    {
        "malformed_event",
        "unknown_portal",
        "invalid_application_token",
        "app_still_installed",
        "unsupported_event",
        "missing_application_token",
        "unavailable",
        "not_configured",
        "rejected",
        "mismatch",
        "untrusted_server",
        "unsafe_portal",
        "not_admin",
    }
)
FRAME_REASONS = frozenset({"malformed", "denied", "expired", "unavailable"})
"""`FrameRefusal`'s values."""
FRAME_CODES = frozenset(
    {
        "malformed",
        "refused",
        "blocked",
        "uninstalled",
        "no_profile",
        "unavailable",
        "not_configured",
        "rejected",
        "mismatch",
        "untrusted_server",
        "unsafe_portal",
    }
)
"""The app's own refusal codes of a placement open; a Bitrix24 error code counts as `other`."""
REST_METHODS = frozenset(
    {
        "profile",
        "app.info",
        "placement.bind",
        "placement.get",
        "placement.unbind",
        "event.bind",
        "event.get",
        "event.unbind",
        "tasks.task.result.add",
        "tasks.task.result.update",
        "tasks.task.result.delete",
        "tasks.task.result.list",
        "oauth.token",
    }
)
REST_APIS = frozenset({"classic", "v3", "oauth"})
APP_CREDENTIAL_ERRORS = frozenset({"invalid_client", "wrong_client"})
AWAITING_SIGN_IN = "ACCOUNT_AWAITING_SIGN_IN"


def _label(value, allowed: frozenset[str]) -> str:
    value = str(value or "")
    return value if value in allowed else OTHER


DELIVERIES = Counter(
    "b24app_deliveries",
    "Delivery attempts of result changes, by how they ended: saved, failed (Not saved), queued "
    "(Bitrix24 unavailable, retried later), deferred (re-queued for the portal's request "
    "budget, unsent), waits (the portal backs off, unsent).",
    ["outcome"],
)
TOKEN_REFRESHES = Counter(
    "b24app_token_refreshes",
    "Token refreshes, by outcome: ok, refused (the refresh token was rejected: the account is "
    "blocked), credentials (the app's own credentials refused), waiting (the account waits "
    "for its user), unavailable (the OAuth server did not answer), error.",
    ["outcome"],
)
EVENTS_REFUSED = Counter(
    "b24app_events_refused",
    "Lifecycle events (POST /b24/events/) refused, by kind and reason.",
    ["kind", "reason"],
)
FRAMES_REFUSED = Counter(
    "b24app_frame_opens_refused",
    "Placement opens (POST /b24/app/) refused, by reason (FrameRefusal) and the app's code.",
    ["reason", "code"],
)
REST_CALLS = Histogram(
    "b24app_rest_call_duration_seconds",
    "Calls to Bitrix24 (REST and OAuth server), by method, api and outcome (ok or error), from "
    "sending to the whole answer; the wait for the rate limiter is not included.",
    ["method", "api", "outcome"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0),
)
LIMITER_WAITS = Histogram(
    "b24app_limiter_wait_seconds",
    "Seconds a call waited for its portal's request budget (the rate limiter); 0 for most.",
    buckets=(0.0, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
QUERY_LIMIT_EXCEEDED = Counter(
    "b24app_query_limit_exceeded",
    "QUERY_LIMIT_EXCEEDED answers from Bitrix24 (a portal's request limit overrun), by method.",
    ["method"],
)


def delivery_ended(state: str, *, deferred: bool = False) -> None:
    """One delivery attempt ended with the change in `state` (`ResultChange.State`)."""
    DELIVERIES.labels("deferred" if deferred else _label(state, DELIVERY_OUTCOMES)).inc()


def delivery_waits() -> None:
    """A claimed change was put back unsent: its portal backs off, or another attempt probes."""
    DELIVERIES.labels("waits").inc()


def token_refreshed(failure: Exception | None) -> None:
    """A token refresh ended: `failure` is what `account_tokens_refresh` raises, or None."""
    TOKEN_REFRESHES.labels(_refresh_outcome(failure)).inc()


def _refresh_outcome(failure: Exception | None) -> str:
    from b24app.portals.bitrix.errors import BitrixAuthError, BitrixUnavailable

    if failure is None:
        return "ok"
    code = getattr(failure, "code", "")
    if code == AWAITING_SIGN_IN:
        return "waiting"
    if isinstance(failure, BitrixAuthError):
        return "credentials" if code in APP_CREDENTIAL_ERRORS else "refused"
    if isinstance(failure, BitrixUnavailable):
        return "unavailable"
    return "error"


def event_refused(kind: str, reason: str) -> None:
    EVENTS_REFUSED.labels(_label(kind, EVENT_KINDS), _label(reason, EVENT_REASONS)).inc()


def frame_refused(reason, code: str) -> None:
    """A placement open refused: `reason` a `FrameRefusal`, `code` the refusal's code."""
    reason = getattr(reason, "value", reason)
    FRAMES_REFUSED.labels(_label(reason, FRAME_REASONS), _label(code, FRAME_CODES)).inc()


def rest_call(method: str, api: str, seconds: float, error: str | None) -> None:
    REST_CALLS.labels(
        _label(method.lower(), REST_METHODS), _label(api, REST_APIS), "error" if error else "ok"
    ).observe(max(0.0, seconds))


def limiter_waited(seconds: float) -> None:
    LIMITER_WAITS.observe(max(0.0, seconds))


def query_limit_exceeded(method: str) -> None:
    QUERY_LIMIT_EXCEEDED.labels(_label(method.lower(), REST_METHODS)).inc()


# --- read at scrape time -------------------------------------------------------------------------


class OutboxCollector:
    """The Queued result changes and the age of the oldest, read from the database when
    Prometheus scrapes: `COUNT(*)` and `MIN(created_at)` of the Queued rows in one query,
    which the partial index on Queued changes (`resultchange_portal_queue`) answers."""

    def describe(self):
        return self._families()

    def collect(self):
        from django.db import DatabaseError
        from django.db.models import Count, Min
        from django.utils import timezone

        # The results app's table, read by the shell's scrape: a read, imported here only.
        from results.models import ResultChange

        try:
            row = ResultChange.objects.filter(state=ResultChange.State.QUEUED).aggregate(
                count=Count("pk"), oldest=Min("created_at")
            )
        except DatabaseError as exc:
            # A scrape without these series says the database did not answer; the logs say why.
            logger.warning("metrics: the outbox query failed error=%s", type(exc).__name__)
            return []
        oldest = row["oldest"]
        age = 0.0 if oldest is None else max(0.0, (timezone.now() - oldest).total_seconds())
        return self._families(row["count"] or 0, age)

    @staticmethod
    def _families(count: float | None = None, age: float | None = None):
        queued = GaugeMetricFamily(
            "b24app_outbox_queued_changes", "Result changes Queued (not yet in Bitrix24)."
        )
        oldest = GaugeMetricFamily(
            "b24app_outbox_oldest_queued_age_seconds",
            "Age of the oldest Queued result change in seconds (0 when none is Queued).",
        )
        if count is not None:
            queued.add_metric([], count)
            oldest.add_metric([], age or 0.0)
        return [queued, oldest]


def multiprocess_dir() -> str:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")


if not multiprocess_dir():
    # One process: its own values, and the outbox's read at each scrape (describe() keeps the
    # registration from querying).
    REGISTRY.register(OutboxCollector())


def scrape_registry() -> CollectorRegistry:
    """What `/metrics` exports. Multi-process: every process' values summed from
    `PROMETHEUS_MULTIPROC_DIR`, and the outbox once (not per process), on a fresh registry."""
    if not multiprocess_dir():
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    registry.register(OutboxCollector())
    return registry


# --- GET /metrics ----------------------------------------------------------------------------


def _authorized(request, expected: str) -> bool:
    scheme, _, presented = request.META.get("HTTP_AUTHORIZATION", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(presented.strip().encode(), expected.encode())


@csrf_exempt  # reads only; a POST is answered 405, not with a CSRF page
def metrics_view(request):
    """Prometheus' text format, for `Authorization: Bearer <B24_METRICS_TOKEN>` only; 404
    without the variable (the endpoint is off), 401 with a missing or wrong token."""
    expected = settings.B24_METRICS_TOKEN
    if not expected:
        raise Http404("metrics are off")
    if request.method not in ("GET", "HEAD"):
        return HttpResponseNotAllowed(["GET", "HEAD"])
    if not _authorized(request, expected):
        response = HttpResponse("A bearer token is required.\n", status=401)
        response["Content-Type"] = "text/plain; charset=utf-8"
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
    else:
        response = HttpResponse(generate_latest(scrape_registry()), content_type=CONTENT_TYPE)
    response["Cache-Control"] = "no-store"
    patch_vary_headers(response, ["Authorization"])
    return response
