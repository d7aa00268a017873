"""When queued changes are handed to the workers: each change's next attempt, the minutely
sweep, and a portal's drain a batch at a time. Celery tasks are queued from here, after the
transaction commits; the tasks themselves (`results.tasks`) only call back into the services.

Inline mode (no broker, `B24_INLINE_TASKS`) has no worker to hand anything to: nothing is
scheduled, and the open screen's polling delivers due changes instead (`delivers_inline`).
"""

from __future__ import annotations

import logging
from collections import Counter
from datetime import datetime, timedelta

from celery import current_app
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from b24app.portals.models import Portal
from b24app.portals.services import portal_rate
from results import selectors
from results.models import PortalOutbox, ResultChange
from results.tasks import result_change_deliver_task, result_changes_drain_task

logger = logging.getLogger("results")

DRAIN_STEP_MIN_S = 1.0
"""The shortest pause between two batches of one portal's drain."""
DRAIN_PATIENCE = timedelta(seconds=60)
"""How long a drain waits for the workers to take up its last batch before it queues the next
one anyway (their messages may have been lost)."""


def delivers_inline() -> bool:
    """True when there is no broker: background work runs in the web process."""
    return bool(current_app.conf.task_always_eager)


def result_change_schedule(change: ResultChange) -> None:
    """Queue the next attempt of a queued change for when it is due (best effort: the change is
    already in the outbox, and the minutely sweep sends whatever was not queued).

    Inline mode (no broker) has no worker to wait for it: the open screen's polling delivers due
    changes instead, so nothing is scheduled here (and nothing spins in the web process).
    """
    if delivers_inline():
        return
    countdown = max(0.0, (change.next_attempt_at - timezone.now()).total_seconds())
    try:
        result_change_deliver_task.apply_async((change.pk,), countdown=countdown, retry=False)
    except Exception as exc:  # broker down: the change is safe in the outbox; the sweep sends it
        logger.warning(
            "could not queue change %s (%s); the sweep will", change.pk, type(exc).__name__
        )


def result_change_schedule_on_commit(change: ResultChange) -> None:
    """`result_change_schedule` once the current transaction commits."""
    transaction.on_commit(lambda: result_change_schedule(change))


def result_changes_drain_on_commit(portal_id: int) -> None:
    """`result_changes_drain` of the portal once the current transaction commits."""
    transaction.on_commit(lambda: result_changes_drain(portal_id))


def portal_drain_claim(portal_id: int, *, seconds: float, renew: bool = False) -> bool:
    """Take (or, for the drain that holds it, `renew`) the portal's drain for `seconds`: one
    drain per portal at a time. False when another drain holds it."""
    now = timezone.now()
    PortalOutbox.objects.get_or_create(portal_id=portal_id)
    rows = PortalOutbox.objects.filter(pk=portal_id)
    if not renew:
        rows = rows.filter(Q(drain_until__isnull=True) | Q(drain_until__lt=now))
    return bool(rows.update(drain_until=now + timedelta(seconds=seconds)))


def portal_drain_done(portal_id: int) -> None:
    PortalOutbox.objects.filter(pk=portal_id).update(drain_until=None)


def result_changes_sweep() -> int:
    """Queue a delivery of the changes whose attempt is due but whose message was lost (a
    worker killed mid-delivery, a broker restart), or that wait without one (for their portal's
    backoff to end). Their lease has run out, so nothing is in flight. Portal by portal in turn,
    at most `selectors.SWEEP_PER_PORTAL` of each (`result_changes_due`); a portal with more than
    that is drained on from there, a batch at a time (`result_changes_drain_step`)."""
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


def result_changes_drain(portal_id: int, *, previous: list[int] | None = None) -> None:
    """Drain the portal's due changes a batch at a time: after it answered again following a
    backoff (`previous` empty: start now), or after a sweep took a full batch of it (`previous`:
    that batch; continue once it is taken up). One drain per portal at a time (its outbox's
    `drain_until`); best effort: the sweep sends whatever is missed. Inline mode has no worker:
    the open screens' polling delivers them."""
    if delivers_inline():
        return
    step = 0.0 if not previous else _drain_step(portal_id, len(previous))
    if not portal_drain_claim(portal_id, seconds=step + DRAIN_PATIENCE.total_seconds()):
        return  # a drain of this portal is already under way
    try:
        result_changes_drain_task.apply_async(
            (portal_id, previous or [], timezone.now().isoformat()), countdown=step, retry=False
        )
    except Exception as exc:  # broker down: the changes are due; the sweep sends them
        portal_drain_done(portal_id)
        logger.warning("could not queue the drain of portal %s (%s)", portal_id, type(exc).__name__)


def _drain_step(portal_id: int, batch: int) -> float:
    """The time the portal's request budget needs for a batch (at least `DRAIN_STEP_MIN_S`)."""
    portal = Portal.objects.filter(pk=portal_id).first()
    rate = portal_rate(portal)[1] if portal is not None else 1.0
    return max(DRAIN_STEP_MIN_S, batch / rate)


def result_changes_drain_step(portal_id: int, previous: list[int], since: str) -> int:
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
        portal_drain_claim(portal_id, seconds=step + DRAIN_PATIENCE.total_seconds(), renew=True)
        result_changes_drain_task.apply_async((portal_id, previous, since), countdown=step)
        return 0
    due = selectors.result_changes_due(portal_id=portal_id)
    for change_id in due:
        result_change_deliver_task.delay(change_id)
    if len(due) >= selectors.SWEEP_PER_PORTAL:
        step = _drain_step(portal_id, len(due))
        portal_drain_claim(portal_id, seconds=step + DRAIN_PATIENCE.total_seconds(), renew=True)
        result_changes_drain_task.apply_async(
            (portal_id, due, timezone.now().isoformat()), countdown=step
        )
    else:
        portal_drain_done(portal_id)
    if due:
        logger.info("drain of portal %s queued %s change(s)", portal_id, len(due))
    return len(due)
