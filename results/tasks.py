"""Background delivery of result changes: thin wrappers over `results.services`."""

from __future__ import annotations

import logging

from celery import current_app, shared_task
from django.utils import timezone

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
    """Every minute: re-queue changes whose attempt is due but whose message was lost (a worker
    killed mid-delivery, a broker restart). Their lease has run out, so nothing is in flight."""
    due = selectors.result_changes_due()
    for change_id in due:
        result_change_deliver_task.delay(change_id)
    if due:
        logger.info("sweep re-queued %s change(s)", len(due))
    return len(due)
