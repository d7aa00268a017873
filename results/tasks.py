"""Background delivery of result changes: thin wrappers over `results.services`."""

from __future__ import annotations

import logging
from collections import Counter
from datetime import datetime, timedelta

from celery import current_app, shared_task
from django.db.models import Q
from django.utils import timezone

from b24app.portals.models import Portal
from b24app.portals.services import portal_rate
from results import selectors, services
from results.models import ResultChange

logger = logging.getLogger("results")


@shared_task
def result_change_deliver_task(change_id: int) -> str:
    """One attempt; safe to run twice (the change's lease and idempotency key see to it)."""
    try:
        change = services.result_change_deliver(change_id=change_id)
    except ResultChange.DoesNotExist:
        return "gone"
    return change.state


def result_change_schedule(change: ResultChange) -> None:
    """Queue the next attempt of a queued change for when it is due (best effort: the change is
    already in the outbox, and the minutely sweep sends whatever was not queued).

    Inline mode (no broker) has no worker to wait for it: the open screen's polling delivers due
    changes instead, so nothing is scheduled here (and nothing spins in the web process).
    """
    if current_app.conf.task_always_eager:
        return
    countdown = max(0.0, (change.next_attempt_at - timezone.now()).total_seconds())
    try:
        result_change_deliver_task.apply_async((change.pk,), countdown=countdown, retry=False)
    except Exception as exc:  # broker down: the change is safe in the outbox; the sweep sends it
        logger.warning(
            "could not queue change %s (%s); the sweep will", change.pk, type(exc).__name__
        )


@shared_task
def result_changes_sweep_task() -> int:
    """Every minute: queue a delivery of the changes whose attempt is due but whose message was
    lost (a worker killed mid-delivery, a broker restart), or that wait without one (for their
    portal's backoff to end). Their lease has run out, so nothing is in flight. Portal by
    portal in turn, at most `selectors.SWEEP_PER_PORTAL` of each (`result_changes_due`); a
    portal with more than that is drained on from there, a batch at a time
    (`result_changes_drain_task`)."""
    due = selectors.result_changes_due()
    for change_id in due:
        result_change_deliver_task.delay(change_id)
    portal_of = dict(ResultChange.objects.filter(pk__in=due).values_list("pk", "portal_id"))
    for portal_id, count in Counter(portal_of.values()).items():
        if count >= selectors.SWEEP_PER_PORTAL:
            batch = [pk for pk in due if portal_of.get(pk) == portal_id]
            result_changes_drain(portal_id, previous=batch)
    if due:
        logger.info("sweep re-queued %s change(s)", len(due))
    return len(due)


DRAIN_STEP_MIN_S = 1.0
"""The shortest pause between two batches of one portal's drain."""
DRAIN_PATIENCE = timedelta(seconds=60)
"""How long a drain waits for the workers to take up its last batch before it queues the next
one anyway (their messages may have been lost)."""


def result_changes_drain(portal_id: int, *, previous: list[int] | None = None) -> None:
    """Drain the portal's due changes a batch at a time: after it answered again following a
    backoff (`previous` empty: start now), or after a sweep took a full batch of it (`previous`:
    that batch; continue once it is taken up). One drain per portal at a time (its outbox's
    `drain_until`); best effort: the sweep sends whatever is missed. Inline mode has no worker:
    the open screens' polling delivers them."""
    if current_app.conf.task_always_eager:
        return
    step = 0.0 if not previous else _drain_step(portal_id, len(previous))
    if not services.portal_drain_claim(portal_id, seconds=step + DRAIN_PATIENCE.total_seconds()):
        return  # a drain of this portal is already under way
    try:
        result_changes_drain_task.apply_async(
            (portal_id, previous or [], timezone.now().isoformat()), countdown=step, retry=False
        )
    except Exception as exc:  # broker down: the changes are due; the sweep sends them
        services.portal_drain_done(portal_id)
        logger.warning("could not queue the drain of portal %s (%s)", portal_id, type(exc).__name__)


def _drain_step(portal_id: int, batch: int) -> float:
    """The time the portal's request budget needs for a batch (at least `DRAIN_STEP_MIN_S`)."""
    portal = Portal.objects.filter(pk=portal_id).first()
    rate = portal_rate(portal)[1] if portal is not None else 1.0
    return max(DRAIN_STEP_MIN_S, batch / rate)


@shared_task
def result_changes_drain_task(portal_id: int, previous: list[int], since: str) -> int:
    """One step of a portal's drain. While the workers have not taken up the last batch
    (`previous`: changes still due and unleased, untouched since `since`), wait a step more (up
    to `DRAIN_PATIENCE`), so a slow queue never fills with copies. Then queue a delivery of up
    to `selectors.SWEEP_PER_PORTAL` of the portal's due changes (oldest first) and come back
    once the portal's request budget could have sent them; stop when fewer are due. A portal
    that backs off again gives none, which ends the drain."""
    now = timezone.now()
    started = datetime.fromisoformat(since)
    waiting = (
        ResultChange.objects.filter(
            pk__in=previous,
            state=ResultChange.State.QUEUED,
            next_attempt_at__lte=now,
            updated_at__lt=started,
        )
        .filter(Q(lease_until__isnull=True) | Q(lease_until__lt=now))
        .exists()
    )
    if waiting and now - started < DRAIN_PATIENCE:
        step = _drain_step(portal_id, len(previous))
        services.portal_drain_claim(
            portal_id, seconds=step + DRAIN_PATIENCE.total_seconds(), renew=True
        )
        result_changes_drain_task.apply_async((portal_id, previous, since), countdown=step)
        return 0
    due = selectors.result_changes_due(portal_id=portal_id)
    for change_id in due:
        result_change_deliver_task.delay(change_id)
    if len(due) >= selectors.SWEEP_PER_PORTAL:
        step = _drain_step(portal_id, len(due))
        services.portal_drain_claim(
            portal_id, seconds=step + DRAIN_PATIENCE.total_seconds(), renew=True
        )
        result_changes_drain_task.apply_async(
            (portal_id, due, timezone.now().isoformat()), countdown=step
        )
    else:
        services.portal_drain_done(portal_id)
    if due:
        logger.info("drain of portal %s queued %s change(s)", portal_id, len(due))
    return len(due)


@shared_task
def result_changes_purge_task() -> int:
    """Daily: delete delivered changes (Saved, Not saved) older than `RESULTS_RETENTION_DAYS`,
    in batches (`services.PURGE_BATCH`). Queued changes are never purged."""
    deleted = services.result_changes_purge()
    logger.info("purged %s delivered change(s)", deleted)
    return deleted
