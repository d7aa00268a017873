"""What people change: a validated change is written to the outbox (`ResultChange`) and tried
once at once; `Retry` queues a change that was not saved again. Also the outbox's upkeep: a
returning user's changes made due, and delivered changes purged after their retention."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from b24app.portals.models import Account, Portal
from b24app.portals.ratelimit import WEB_LIMITER_WAIT_S
from results.models import ResultChange
from results.selectors import result_changes_expired
from results.services.backoff import GIVE_UP_AFTER, PORTAL_LIMIT_CODES
from results.services.delivery import result_change_deliver

logger = logging.getLogger("results")

MAX_TEXT_LENGTH = 10_000


class ResultError(Exception):
    """A change refused before anything was written or sent; `message` is for the person,
    `task_id` the task it was for, when known."""

    def __init__(self, message, *, task_id: int | None = None) -> None:
        super().__init__(str(message))
        self.message = message
        self.task_id = task_id


class QueueFull(ResultError):
    """Too many changes wait to reach Bitrix24 (the person's, or the portal's): refused, and
    nothing stored, until some are delivered."""


class ChangeNotFound(ResultError):
    """No such change of this person's."""


def _clean_text(text: str) -> str:
    text = (text or "").replace("\r\n", "\n").strip()
    if not text:
        raise ResultError(_("Result text is required."))
    if "\x00" in text:
        raise ResultError(_("The text contains a character that cannot be saved."))
    if len(text) > MAX_TEXT_LENGTH:
        raise ResultError(_("The text is too long (at most 10,000 characters)."))
    return text


def result_change_submit(
    *,
    account: Account,
    task_id: int,
    action: str,
    result_id: int | None = None,
    text: str = "",
    text_before: str = "",
) -> ResultChange:
    """Validate, write the outbox row, try it once now, and queue it if Bitrix24 is busy."""
    if task_id <= 0:
        raise ResultError(_("Choose a task first."))
    if action not in ResultChange.Action.values:
        raise ResultError(_("Unknown change."))
    if action != ResultChange.Action.ADD and (result_id is None or result_id <= 0):
        raise ResultError(_("Unknown result."))
    if action != ResultChange.Action.DELETE:
        text = _clean_text(text)
    else:
        text = ""
    with transaction.atomic():
        _queue_room(account)
        change = ResultChange.objects.create(
            portal=account.portal,
            account=account,
            task_id=task_id,
            result_id=result_id,
            action=action,
            text_before=text_before.replace("\x00", "")[:MAX_TEXT_LENGTH],
            text_after=text,
        )
    logger.info(
        "change %s queued portal=%s user=%s action=%s task=%s",
        change.pk,
        account.portal.member_id,
        account.user_id,
        action,
        task_id,
    )
    return result_change_deliver(change_id=change.pk, limiter_max_wait=WEB_LIMITER_WAIT_S)


def _queue_room(account: Account) -> None:
    """Refuse a change past the caps on Queued changes: `RESULTS_QUEUED_PER_ACCOUNT` of one
    person, `RESULTS_QUEUED_PER_PORTAL` of one portal.

    Call inside a transaction, before writing the change: the portal's row lock makes
    concurrent submissions of the portal count one after another, so no two of them both see
    the last free place."""
    Portal.objects.select_for_update().only("pk").get(pk=account.portal_id)
    queued = ResultChange.objects.filter(state=ResultChange.State.QUEUED)
    per_account = settings.RESULTS_QUEUED_PER_ACCOUNT
    if queued.filter(account=account).count() >= per_account:
        logger.warning(
            "change refused: queue full portal=%s user=%s queued>=%s",
            account.portal.member_id,
            account.user_id,
            per_account,
        )
        raise QueueFull(
            _(
                "Too many of your changes are waiting to reach Bitrix24 (%(count)s). Wait "
                "until they are saved, then try again."
            )
            % {"count": per_account}
        )
    per_portal = settings.RESULTS_QUEUED_PER_PORTAL
    if queued.filter(portal_id=account.portal_id).count() >= per_portal:
        logger.warning(
            "change refused: portal queue full portal=%s queued>=%s",
            account.portal.member_id,
            per_portal,
        )
        raise QueueFull(
            _(
                "Too many changes on this Bitrix24 are waiting to be sent. Wait until they "
                "are saved, then try again."
            )
        )


@transaction.atomic
def result_change_retry(*, change_id: int, account: Account) -> ResultChange:
    """Queue a change that was not saved once more (same idempotency key: an error is never
    stored by Bitrix24, so the same key cannot replay it). Refused (`QueueFull`) like a new
    change when the person or the portal has too many changes queued."""
    change = ResultChange.objects.get(pk=change_id, account=account)
    if change.state == ResultChange.State.FAILED:
        try:
            _queue_room(account)
        except QueueFull as exc:
            exc.task_id = change.task_id
            raise
    change = ResultChange.objects.select_for_update().get(pk=change_id, account=account)
    if change.state == ResultChange.State.FAILED:
        change.state = ResultChange.State.QUEUED
        change.next_attempt_at = timezone.now()
        change.lease_until = None
        change.last_error_message = ""
        if timezone.now() - change.created_at > GIVE_UP_AFTER:
            change.idempotency_key = ResultChange._meta.get_field("idempotency_key").default()
            change.created_at = timezone.now()
        change.save()
    return change


def result_change_resend(*, change_id: int, account: Account) -> ResultChange:
    """`Retry`: queue the person's change again (`result_change_retry`) and try it once now,
    as a new change is (`ChangeNotFound` if it is not theirs, `QueueFull` as for a new one)."""
    try:
        change = result_change_retry(change_id=change_id, account=account)
    except ResultChange.DoesNotExist as exc:
        raise ChangeNotFound(_("Unknown change.")) from exc
    return result_change_deliver(change_id=change.pk, limiter_max_wait=WEB_LIMITER_WAIT_S)


def result_changes_resume(*, account: Account) -> int:
    """The account's user is back with fresh tokens (opened the app, or renewed the frame
    session): their queued changes are due now instead of after their backoff, unless the
    portal's own limits hold them back. The next delivery pass (the worker's sweep, or the
    open screen's polling) sends them. Returns how many."""
    now = timezone.now()
    return (
        ResultChange.objects.filter(
            account=account, state=ResultChange.State.QUEUED, next_attempt_at__gt=now
        )
        .exclude(last_error__in=PORTAL_LIMIT_CODES)
        .update(next_attempt_at=now, updated_at=now)
    )


PURGE_BATCH = 1000


def result_changes_purge(*, now: datetime | None = None, batch: int = PURGE_BATCH) -> int:
    """Delete delivered changes (Saved or Not saved) last touched more than
    `RESULTS_RETENTION_DAYS` ago, `batch` rows per statement so no long lock is held; never a
    Queued one. Returns how many were deleted."""
    before = (now or timezone.now()) - timedelta(days=settings.RESULTS_RETENTION_DAYS)
    deleted = 0
    while ids := result_changes_expired(before=before, limit=batch):
        deleted += (
            ResultChange.objects.filter(pk__in=ids, updated_at__lt=before)
            .exclude(state=ResultChange.State.QUEUED)
            .delete()[0]
        )
    return deleted
