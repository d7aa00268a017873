"""Background delivery of result changes: thin wrappers over `results.services`."""

from __future__ import annotations

import logging

from celery import current_app, shared_task
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
    portal in turn, at most `selectors.SWEEP_PER_PORTAL` of each (`result_changes_due`)."""
    due = selectors.result_changes_due()
    for change_id in due:
        result_change_deliver_task.delay(change_id)
    if due:
        logger.info("sweep re-queued %s change(s)", len(due))
    return len(due)


DRAIN_STEP_MIN_S = 5.0


def result_changes_drain(portal_id: int) -> None:
    """A portal answers again after backing off: deliver its waiting changes now, a batch at a
    time (best effort: the sweep sends whatever is missed). Inline mode has no worker: the open
    screens' polling delivers them."""
    if current_app.conf.task_always_eager:
        return
    try:
        result_changes_drain_task.apply_async((portal_id,), retry=False)
    except Exception as exc:  # broker down: the changes are due; the sweep sends them
        logger.warning("could not queue the drain of portal %s (%s)", portal_id, type(exc).__name__)


@shared_task
def result_changes_drain_task(portal_id: int) -> int:
    """Queue a delivery of up to `selectors.SWEEP_PER_PORTAL` of the portal's due changes, then
    come back for the next batch once the portal's request budget could have sent this one,
    until none is due. A portal that backs off again gives none, which ends the drain."""
    due = selectors.result_changes_due(portal_id=portal_id)
    for change_id in due:
        result_change_deliver_task.delay(change_id)
    if len(due) == selectors.SWEEP_PER_PORTAL:
        portal = Portal.objects.filter(pk=portal_id).first()
        if portal is not None:
            step = max(DRAIN_STEP_MIN_S, len(due) / portal_rate(portal)[1])
            result_changes_drain_task.apply_async((portal_id,), countdown=step)
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
