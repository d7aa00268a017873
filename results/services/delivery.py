"""Delivering a change: claim it, send it with the editor's own token under its
`Idempotency-Key`, read it back when the key was reused, and record what Bitrix24 said.

Safe to run twice or concurrently: a lease lets one attempt at a time send, and the key makes
Bitrix24 apply a resent change once. A change Bitrix24 could not take now stays queued with a
backoff (or its portal's turn); a refusal ends as "Not saved" with a reason a person understands.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from b24app import metrics
from b24app.portals.bitrix import (
    IDEMPOTENCY_KEY_REUSED,
    BitrixAccessDenied,
    BitrixAuthError,
    BitrixError,
    BitrixTokenExpired,
    BitrixUnavailable,
    BitrixValidationError,
)
from b24app.portals.bitrix.methods import (
    task_result_add,
    task_result_delete,
    task_result_update,
    task_results_list,
)
from b24app.portals.models import Account, Portal
from b24app.portals.ratelimit import WEB_LIMITER_WAIT_S, shared_pacing_only
from b24app.portals.services import AccountAwaitingSignIn, account_client, portal_rate
from results import selectors
from results.models import ResultChange
from results.services.backoff import (
    CLOCK_SKEW,
    DEFER_AFTER_SLOTS,
    DEFERRED,
    GIVE_UP_AFTER,
    LEASE,
    NOT_SENT,
    backoff_delay,
)
from results.services.outbox import (
    PROBE,
    SEND,
    WAIT,
    change_turn,
    portal_answered,
    portal_probe_done,
    portal_turn,
    portal_unavailable,
    portal_wait,
)
from results.services.schedule import (
    delivers_inline,
    result_change_schedule_on_commit,
    result_changes_drain_on_commit,
)

logger = logging.getLogger("results")


def _claim(change_id: int) -> bool:
    now = timezone.now()
    return bool(
        ResultChange.objects.filter(
            pk=change_id, state=ResultChange.State.QUEUED, next_attempt_at__lte=now
        )
        .filter(Q(lease_until__isnull=True) | Q(lease_until__lt=now))
        .update(lease_until=now + LEASE, attempts=F("attempts") + 1)
    )


def _send(change: ResultChange, limiter_max_wait: float | None) -> int | None:
    """Send the change under its key; returns the result id it applies to.

    A portal that compares whole request bodies answers a resend whose `auth` was refreshed
    (the first answer was lost, the token expired meanwhile) with 422 "key reused", though it
    holds the change. That is not a refusal: the portal is read back, and a change already
    there is saved; one that is not is sent once more under a new key."""
    client = account_client(change.account, limiter_max_wait=limiter_max_wait)
    try:
        return _write(client, change, change.idempotency_key)
    except BitrixValidationError as exc:
        if exc.code != IDEMPOTENCY_KEY_REUSED:
            raise
    found = _read_back(client, change)
    if found is not None:
        logger.info("change %s was already applied (read back after a reused key)", change.pk)
        return found
    change.idempotency_key = ResultChange._meta.get_field("idempotency_key").default()
    ResultChange.objects.filter(pk=change.pk).update(
        idempotency_key=change.idempotency_key, updated_at=timezone.now()
    )
    logger.info("change %s was not applied; sending it under a new key", change.pk)
    return _write(client, change, change.idempotency_key)


def _write(client, change: ResultChange, key: str) -> int | None:
    if change.action == ResultChange.Action.ADD:
        item = task_result_add(client, change.task_id, change.text_after, idempotency_key=key)
        return item.id if item else None
    if change.action == ResultChange.Action.UPDATE:
        task_result_update(client, change.result_id, change.text_after, idempotency_key=key)
    else:
        task_result_delete(client, change.result_id, idempotency_key=key)
    return change.result_id


def _read_back(client, change: ResultChange) -> int | None:
    """Whether Bitrix24 already holds the change, read as its author: the result id it applied
    to, or None. An edit is there when the result has its text; a delete when the result is
    gone; an add when a result of this author on this task has its text, was created after the
    change (give or take the clocks' skew) and is not another change's result."""
    if change.action != ResultChange.Action.ADD:
        listing = task_results_list(
            client, change.task_id, result_id=change.result_id, select=("id", "text")
        )
        if change.action == ResultChange.Action.DELETE:
            # Gone only when nothing came back: an item that could not be read is no proof.
            gone = not listing.items and not listing.unreadable
            return change.result_id if gone else None
        texts = [item.text for item in listing.items]
        return change.result_id if change.text_after in texts else None
    listing = task_results_list(
        client,
        change.task_id,
        author_id=change.account.user_id,
        select=("id", "text", "createdAt"),
        order={"id": "ASC"},
    )
    claimed = set(
        ResultChange.objects.filter(
            portal_id=change.portal_id, task_id=change.task_id, action=ResultChange.Action.ADD
        )
        .exclude(pk=change.pk)
        .exclude(result_id=None)
        .values_list("result_id", flat=True)
    )
    since = change.created_at - CLOCK_SKEW
    for item in listing.items:
        if item.text != change.text_after:
            continue
        if item.created_at is not None and item.created_at >= since and item.id not in claimed:
            return item.id
    return None


def _refusal_reason(exc: BitrixError):
    if isinstance(exc, BitrixAccessDenied):
        return _("Bitrix24 does not let you change this result (only its author can).")
    if isinstance(exc, BitrixValidationError):
        if "ENTITYNOTFOUND" in exc.code:
            return _("This result no longer exists in Bitrix24.")
        return _("Bitrix24 did not accept this text.")
    if isinstance(exc, BitrixAuthError | BitrixTokenExpired):
        return _("Your Bitrix24 session has ended. Reopen the app, then press Retry.")
    return _("Bitrix24 refused the change.")


def _backoff(change: ResultChange, exc: BitrixUnavailable) -> datetime:
    """The next attempt of a change held back by its own account (waiting for its user), not
    by the portal."""
    now = timezone.now()
    return now + timedelta(seconds=backoff_delay(change.attempts, exc, now=now))


def result_change_deliver(*, change_id: int, limiter_max_wait: float | None = None) -> ResultChange:
    """One delivery attempt, if the change is queued, due and not being delivered elsewhere.

    Safe to run twice or concurrently: a lease lets one attempt at a time send, and the
    change's `Idempotency-Key` makes Bitrix24 apply a resent change once.

    `limiter_max_wait` bounds the wait for the portal's request budget (a web request's);
    without it (background) the wait is at most :data:`DEFER_AFTER_SLOTS` request intervals.
    A change that would wait longer is re-queued for its turn (`outbox.change_turn`), which
    is not counted as an attempt: nothing was sent.
    """
    if not _claim(change_id):
        return ResultChange.objects.get(pk=change_id)
    change = ResultChange.objects.select_related("account__portal").get(pk=change_id)
    change.portal = change.account.portal  # the same row: not read a second time
    return _attempt(change, *portal_turn(change.portal_id), limiter_max_wait=limiter_max_wait)


def result_change_deliver_claimed(
    change: ResultChange, *, portal_held: bool, limiter_max_wait: float | None = None
) -> ResultChange:
    """The attempt of a change its writer stored already claimed (leased, its attempt counted:
    `changes.result_change_submit`), with its account and portal in memory. `portal_held`: its
    portal's outbox had failures when it was written; only then is the portal's turn asked."""
    turn, outbox = portal_turn(change.portal_id) if portal_held else (SEND, None)
    return _attempt(change, turn, outbox, limiter_max_wait=limiter_max_wait)


def _attempt(
    change: ResultChange, turn: str, outbox, *, limiter_max_wait: float | None
) -> ResultChange:
    """One attempt of a claimed change, its portal's turn known."""
    change_id = change.pk
    if turn == WAIT:
        metrics.delivery_waits()
        return portal_wait(change, outbox)
    interval_s = 1 / portal_rate(change.portal)[1]
    # While Redis is unreachable a web request sends no write: each process would pace on its
    # own, and web traffic must not multiply writes; the change stays queued for the worker.
    # With no worker (inline mode) the web process is the only sender, so it still sends.
    web_write = limiter_max_wait is not None and not delivers_inline()
    if limiter_max_wait is None:
        limiter_max_wait = DEFER_AFTER_SLOTS * interval_s
    updates: dict = {"lease_until": None}
    deferred_for: float | None = None
    answered = probe_done = False
    try:
        if change.portal.state != Portal.State.ACTIVE and change.portal.blocked_by_operator:
            raise BitrixAuthError("PORTAL_BLOCKED", "portal blocked by its operator")
        with shared_pacing_only(web_write):
            result_id = _send(change, limiter_max_wait)
    except BitrixUnavailable as exc:
        code = DEFERRED if exc.code in NOT_SENT else exc.code
        updates.update(last_error=code[:120], last_error_message="")
        portal_wide = code != DEFERRED and not isinstance(exc, AccountAwaitingSignIn)
        if portal_wide:
            updates["next_attempt_at"] = portal_unavailable(
                change.portal_id, exc, probe=turn == PROBE
            )
        else:
            probe_done = True
        if timezone.now() - change.created_at > GIVE_UP_AFTER:
            updates.update(
                state=ResultChange.State.FAILED,
                last_error_message=str(_("Bitrix24 was unreachable for too long. Press Retry.")),
            )
        elif code == DEFERRED:
            deferred_for = float(exc.retry_after or 0)
            updates["attempts"] = F("attempts") - 1
        elif not portal_wide:
            updates["next_attempt_at"] = _backoff(change, exc)
    except BitrixError as exc:
        updates.update(
            state=ResultChange.State.FAILED,
            last_error=exc.code[:120],
            last_error_message=str(_refusal_reason(exc))[:300],
        )
        # A refusal the portal gave proves it answers; one of ours (a blocked portal, a token
        # the OAuth server refused) says nothing about it.
        answered = isinstance(exc, BitrixAccessDenied | BitrixValidationError)
        probe_done = not answered
    except BaseException:
        if turn == PROBE:
            portal_probe_done(change.portal_id)
        raise
    else:
        updates.update(
            state=ResultChange.State.SAVED,
            result_id=result_id,
            delivered_at=timezone.now(),
            last_error="",
            last_error_message="",
        )
        answered = True
    if turn == PROBE and probe_done:
        portal_probe_done(change.portal_id)
    drains = answered and portal_answered(change.portal_id)
    updates["updated_at"] = timezone.now()
    if deferred_for is not None:
        with transaction.atomic():
            updates["next_attempt_at"] = change_turn(change, deferred_for, interval_s)
            ResultChange.objects.filter(pk=change_id).update(**updates)
    else:
        ResultChange.objects.filter(pk=change_id).update(**updates)
    if any(hasattr(value, "resolve_expression") for value in updates.values()):
        change.refresh_from_db()
    else:  # what was written is what the row holds: no need to read it back
        for name, value in updates.items():
            setattr(change, name, value)
    logger.info(
        "change %s attempt %s -> %s %s", change.pk, change.attempts, change.state, change.last_error
    )
    metrics.delivery_ended(change.state, deferred=deferred_for is not None)
    if change.state == ResultChange.State.QUEUED:
        result_change_schedule_on_commit(change)
    if drains:
        result_changes_drain_on_commit(change.portal_id)
    return change


def result_changes_poll(*, account: Account, ids: list[int]) -> list[ResultChange]:
    """The states of the person's changes an open screen waits for. Inline mode has no worker:
    this polling is what delivers the person's due changes first (`delivers_inline`)."""
    if delivers_inline():
        for change_id in selectors.result_changes_due(account=account):
            result_change_deliver(change_id=change_id, limiter_max_wait=WEB_LIMITER_WAIT_S)
    return selectors.result_changes_of(account=account, ids=ids)
