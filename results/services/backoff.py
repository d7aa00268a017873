"""How long a change waits: the delivery's leases, backoff and give-up times, in one place."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

from b24app.portals.bitrix import BitrixUnavailable

LEASE = timedelta(seconds=60)
"""How long one delivery attempt owns a change: longer than one attempt can take (a wait for the
request budget, a token refresh and the call, each bounded by its timeout)."""
DEFER_AFTER_SLOTS = 2
"""A background delivery sleeps for its portal's request budget at most this many of the
portal's request intervals. A longer wait means the budget is spoken for (the portal's other
changes, a penalty after `QUERY_LIMIT_EXCEEDED`): the change is re-queued for its own turn
instead, so no worker sits on one portal's budget while other portals' changes wait behind it in
the queue (head-of-line blocking)."""
DEFERRED = "RATE_LIMITED"
"""`last_error` of a change re-queued for its turn: the code of our own limiter's refusal."""
NOT_SENT = frozenset({DEFERRED, "PORTAL_BUSY"})
"""Refusals of our own, before anything was sent: the portal's request budget spoken for, or its
requests in flight at the cap. Such a change takes its turn (as `DEFERRED`); it says nothing
about the portal, which is not made to back off for it."""
BACKOFF_BASE_S = 2.0
BACKOFF_CAP_S = 300.0
"""The backoff of a portal Bitrix24 is unavailable for (and of an account waiting for its user):
from `BACKOFF_BASE_S` doubling per failure in a row up to `BACKOFF_CAP_S`, with jitter."""
JITTER = random.Random()  # noqa: S311 - jitter, not security
"""Where the backoff's jitter comes from; tests put a seeded or fixed source here."""
MAX_DELAY_S = 600.0
"""Never schedule further ahead than this (below the broker's visibility timeout)."""
CLOCK_SKEW = timedelta(seconds=60)
"""How far Bitrix24's clock may be behind ours when a change is read back by its time."""
GIVE_UP_AFTER = timedelta(hours=20)
"""Bitrix24 keeps an idempotent answer for 24 h; after that a resend could apply twice."""
PORTAL_LIMIT_CODES = ("QUERY_LIMIT_EXCEEDED", "OPERATION_TIME_LIMIT", "OVERLOAD_LIMIT", DEFERRED)
"""Errors that hold a change back for the portal's sake, whoever is signed in."""


def backoff_delay(
    failures: int, exc: BitrixUnavailable, *, now: datetime, rand: random.Random | None = None
) -> float:
    """Seconds to wait after `failures` attempts in a row found Bitrix24 unavailable:
    exponential from `BACKOFF_BASE_S` up to `BACKOFF_CAP_S`, drawn between half of that and
    all of it from `rand` (default `JITTER`), and never before the portal's own `Retry-After`
    or `operating_reset_at`; at most `MAX_DELAY_S`."""
    ceiling = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** max(0, failures - 1))
    delay = (rand or JITTER).uniform(ceiling / 2, ceiling)
    if exc.retry_after:
        delay = max(delay, float(exc.retry_after))
    if exc.operating_reset_at:
        delay = max(delay, float(exc.operating_reset_at) - now.timestamp())
    return min(delay, MAX_DELAY_S)
