"""The portal's turn: a portal Bitrix24 is unavailable for backs off as one.

One attempt probes a portal whose backoff is over; the portal's other changes wait with it and
drain once it answers again. Changes re-queued for the portal's request budget get their turns
one request interval apart.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.db import transaction
from django.db.models import F, Max, Q
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from b24app.portals.bitrix import BitrixUnavailable
from b24app.portals.models import Portal
from results.models import PortalOutbox, ResultChange
from results.services.backoff import DEFERRED, GIVE_UP_AFTER, LEASE, MAX_DELAY_S, backoff_delay
from results.services.schedule import result_change_schedule_on_commit

logger = logging.getLogger("results")


SEND, PROBE, WAIT = "send", "probe", "wait"


def portal_turn(portal_id: int) -> tuple[str, PortalOutbox | None]:
    """Whether an attempt may send to its portal now: `SEND` while the portal is well; `PROBE`
    for the one attempt that tries again a portal whose backoff is over (it holds the portal's
    probe lease); `WAIT` (with the portal's outbox) while the portal backs off or another
    attempt probes it."""
    outbox = PortalOutbox.objects.filter(pk=portal_id).first()
    if outbox is None or not outbox.held:
        return SEND, None
    now = timezone.now()
    probing = (
        PortalOutbox.objects.filter(pk=portal_id, failures__gt=0)
        .filter(Q(resume_at__isnull=True) | Q(resume_at__lte=now))
        .filter(Q(probe_until__isnull=True) | Q(probe_until__lt=now))
        .update(probe_until=now + LEASE)
    )
    if probing:
        return PROBE, None
    outbox.refresh_from_db()
    return (WAIT, outbox) if outbox.held else (SEND, None)


def portal_wait(change: ResultChange, outbox: PortalOutbox) -> ResultChange:
    """Put a claimed change back, unsent, to wait with its portal's other changes: not an
    attempt, and no message of its own (the portal's probe, then its drain, sends it; the
    sweep if those are lost). Past `GIVE_UP_AFTER` it ends Not saved, like any other."""
    now = timezone.now()
    updates: dict = {"lease_until": None, "attempts": F("attempts") - 1, "updated_at": now}
    if now - change.created_at > GIVE_UP_AFTER:
        updates.update(
            state=ResultChange.State.FAILED,
            last_error=outbox.last_error,
            last_error_message=str(_("Bitrix24 was unreachable for too long. Press Retry.")),
        )
    else:
        # Due with the portal: the selectors hold it back while the portal backs off or is
        # being tried (`result_changes_due`), and take it as soon as the portal answers again.
        until = max(outbox.resume_at or now, now)
        updates.update(next_attempt_at=until, last_error=outbox.last_error or change.last_error)
    ResultChange.objects.filter(pk=change.pk).update(**updates)
    change.refresh_from_db()
    logger.info(
        "change %s waits for its portal (%s failure(s) in a row) -> %s",
        change.pk,
        outbox.failures,
        change.state,
    )
    if (
        change.state == ResultChange.State.QUEUED
        and not PortalOutbox.objects.filter(pk=change.portal_id, failures__gt=0).exists()
    ):
        # The portal answered again while this change was being put back: its drain may
        # have passed it by (it was leased), so it goes on its own.
        result_change_schedule_on_commit(change)
    return change


def portal_unavailable(portal_id: int, exc: BitrixUnavailable, *, probe: bool) -> datetime:
    """Bitrix24 is unavailable for the portal: it backs off as one, and the attempt's change
    waits until then like the others. Counted once per backoff step: by the probe, or by the
    first attempt that finds a well portal unavailable (others that were on the wire then
    only wait)."""
    with transaction.atomic():
        outbox, _created = PortalOutbox.objects.select_for_update().get_or_create(
            portal_id=portal_id
        )
        now = timezone.now()
        if probe or not outbox.held or outbox.resume_at is None:
            outbox.failures += 1
            delay = backoff_delay(outbox.failures, exc, now=now)
            outbox.resume_at = now + timedelta(seconds=delay)
            logger.warning(
                "portal %s unavailable (%s), %s failure(s) in a row: its changes wait %.0f s",
                portal_id,
                exc.code,
                outbox.failures,
                delay,
            )
        if probe:
            outbox.probe_until = None
        outbox.last_error = exc.code[:120]
        outbox.save()
    return max(outbox.resume_at, now)


def portal_probe_done(portal_id: int) -> None:
    """The probe ended without learning whether the portal is back (nothing reached it): the
    next attempt may try at once."""
    PortalOutbox.objects.filter(pk=portal_id).update(probe_until=None)


def portal_answered(portal_id: int) -> bool:
    """Bitrix24 answered for the portal (a success, or a refusal of the change): it is well.
    If it was backing off, its waiting changes are due now. Returns whether it was."""
    now = timezone.now()
    released = PortalOutbox.objects.filter(pk=portal_id, failures__gt=0).update(
        failures=0, resume_at=None, probe_until=None, last_error="", updated_at=now
    )
    if released:
        count = (
            ResultChange.objects.filter(
                portal_id=portal_id, state=ResultChange.State.QUEUED, next_attempt_at__gt=now
            )
            .exclude(last_error=DEFERRED)
            .update(next_attempt_at=now, updated_at=now)
        )
        logger.info("portal %s answers again: its queue drains (%s waiting)", portal_id, count)
    return bool(released)


def change_turn(change: ResultChange, not_before_s: float, interval_s: float) -> datetime:
    """The change's own turn in its portal's request budget: one request interval after the
    last turn handed out to the portal's other deferred changes, and not before the limiter's
    next free slot. Call inside a transaction: the portal's row lock makes concurrent workers
    hand out turns one after another, so deferred changes come back spread out, in order,
    instead of all at once."""
    Portal.objects.select_for_update().only("pk").get(pk=change.portal_id)
    now = timezone.now()
    turn = now + timedelta(seconds=not_before_s)
    last = (
        ResultChange.objects.filter(
            portal_id=change.portal_id, state=ResultChange.State.QUEUED, last_error=DEFERRED
        )
        .exclude(pk=change.pk)
        .aggregate(last=Max("next_attempt_at"))["last"]
    )
    if last is not None:
        turn = max(turn, last + timedelta(seconds=interval_s))
    return min(turn, now + timedelta(seconds=MAX_DELAY_S))
