"""What people change: a validated change is written to the outbox (`ResultChange`) and tried
once at once; `Retry` queues a change that was not saved again. Also the outbox's upkeep: a
returning user's changes made due, and delivered changes purged after their retention."""

from __future__ import annotations

import logging
import random
import time
from datetime import datetime, timedelta

from django.conf import settings
from django.db import IntegrityError, connections, transaction
from django.db.models import Count, Q
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from b24app.portals.models import Account
from b24app.portals.ratelimit import WEB_LIMITER_WAIT_S
from results.models import PortalOutbox, ResultChange
from results.selectors import result_changes_expired
from results.services.backoff import GIVE_UP_AFTER, LEASE, PORTAL_LIMIT_CODES
from results.services.delivery import result_change_deliver, result_change_deliver_claimed

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
    now = timezone.now()
    change = ResultChange(
        portal=account.portal,
        account=account,
        task_id=task_id,
        result_id=result_id,
        action=action,
        text_before=text_before.replace("\x00", "")[:MAX_TEXT_LENGTH],
        text_after=text,
        # Claimed by this request's own attempt as it is written (as `delivery._claim` would).
        attempts=1,
        lease_until=now + LEASE,
        next_attempt_at=now,
        created_at=now,
    )
    portal_held = _write_queued(change)
    logger.info(
        "change %s queued portal=%s user=%s action=%s task=%s",
        change.pk,
        account.portal.member_id,
        account.user_id,
        action,
        task_id,
    )
    return result_change_deliver_claimed(
        change, portal_held=portal_held, limiter_max_wait=WEB_LIMITER_WAIT_S
    )


WRITE_TRIES = 40
"""How often a change is written again after another one written at once took its place."""
WRITE_PAUSE_S = 0.002
"""Up to this many seconds times the tries so far, at random, before writing again: writers
who keep choosing the same free place at the same moment fall out of step (under a stream of
people's changes to one portal a writer could otherwise lose every try and be told the queue is
full when it is not)."""


def _pause_before_try(tries: int) -> None:
    time.sleep(_JITTER.uniform(0, WRITE_PAUSE_S * tries))


_JITTER = random.Random()


def _queued(owner: str) -> str:
    """SQL: the number of Queued changes of the owner (its id the first parameter, then the
    Queued state)."""
    return f"(SELECT COUNT(*) FROM {_TABLE} WHERE {owner} = %s AND state = %s)"  # noqa: S608


def _free_slot(owner: str, slot: str) -> str:
    """SQL: the lowest place among the owner's Queued changes that none of them holds (the
    owner's id and the Queued state, twice): 0, or one past a held place."""
    return (  # identifiers of this module only; the values are parameters
        f"(SELECT MIN(c.n) FROM (SELECT 0 AS n UNION ALL SELECT q.{slot} + 1 FROM {_TABLE} q "  # noqa: S608
        f"WHERE q.{owner} = %s AND q.state = %s AND q.{slot} IS NOT NULL) c "
        f"WHERE NOT EXISTS (SELECT 1 FROM {_TABLE} o "
        f"WHERE o.{owner} = %s AND o.state = %s AND o.{slot} = c.n))"
    )


_TABLE = ResultChange._meta.db_table
_SLOTS = ("account_slot", "portal_slot")
_FIELDS = [f for f in ResultChange._meta.concrete_fields if f.name != "id" and f.name not in _SLOTS]
_INSERT = (
    f"INSERT INTO {_TABLE} ({', '.join(f.column for f in _FIELDS)}, account_slot, portal_slot) "  # noqa: S608
    f"SELECT {', '.join(['%s'] * len(_FIELDS))}, "
    f"{_free_slot('account_id', 'account_slot')}, {_free_slot('portal_id', 'portal_slot')} "
    f"WHERE {_queued('account_id')} < %s AND {_queued('portal_id')} < %s "
    f"ON CONFLICT DO NOTHING "
    f"RETURNING id, account_slot, portal_slot, "
    f"(SELECT failures FROM {PortalOutbox._meta.db_table} WHERE portal_id = %s)"
)


def _write_queued(change: ResultChange) -> bool:
    """Store a new Queued change unless its author or its portal has too many queued
    (`QueueFull`, and nothing stored): `RESULTS_QUEUED_PER_ACCOUNT` of one person,
    `RESULTS_QUEUED_PER_PORTAL` of one portal. Returns whether the portal's outbox had
    failures then (it backs off, or did until now).

    One statement, no lock: the caps are counted as the row is written, and the row takes the
    lowest free place among its author's and its portal's Queued changes, which are unique
    while queued. Two changes written at once see the same places free and pick the same one:
    the database keeps one of them, and the other is written again, counting the first."""
    connection = connections[ResultChange.objects.db]
    for field in _FIELDS:
        field.pre_save(change, add=True)
    values = [
        field.get_db_prep_save(getattr(change, field.attname), connection) for field in _FIELDS
    ]
    queued = ResultChange.State.QUEUED
    account_id, portal_id = change.account_id, change.portal_id
    caps = (settings.RESULTS_QUEUED_PER_ACCOUNT, settings.RESULTS_QUEUED_PER_PORTAL)
    params = [
        *values,
        *(account_id, queued, account_id, queued, portal_id, queued, portal_id, queued),
        account_id,
        queued,
        caps[0],
        portal_id,
        queued,
        caps[1],
        portal_id,
    ]
    for _try in range(WRITE_TRIES):
        with connection.cursor() as cursor:
            cursor.execute(_INSERT, params)
            row = cursor.fetchone()
        if row is not None:
            change.pk, change.account_slot, change.portal_slot, failures = row
            change._state.adding = False
            change._state.db = connection.alias
            return bool(failures)
        _refuse_if_full(change.account, *caps)
        _pause_before_try(_try + 1)
    raise _portal_full(change.account, caps[1])


def _refuse_if_full(account: Account, per_account: int, per_portal: int) -> None:
    """Raise `QueueFull` if the person or the portal has its cap of Queued changes."""
    counts = ResultChange.objects.filter(
        portal_id=account.portal_id, state=ResultChange.State.QUEUED
    ).aggregate(mine=Count("pk", filter=Q(account_id=account.pk)), portal=Count("pk"))
    if counts["mine"] >= per_account:
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
    if counts["portal"] >= per_portal:
        raise _portal_full(account, per_portal)


def _portal_full(account: Account, per_portal: int) -> QueueFull:
    logger.warning(
        "change refused: portal queue full portal=%s queued>=%s",
        account.portal.member_id,
        per_portal,
    )
    return QueueFull(
        _(
            "Too many changes on this Bitrix24 are waiting to be sent. Wait until they "
            "are saved, then try again."
        )
    )


_REQUEUE = (
    f"UPDATE {_TABLE} SET state = %s, next_attempt_at = %s, lease_until = NULL, "  # noqa: S608
    f"last_error_message = '', idempotency_key = %s, created_at = %s, updated_at = %s, "
    f"account_slot = {_free_slot('account_id', 'account_slot')}, "
    f"portal_slot = {_free_slot('portal_id', 'portal_slot')} "
    f"WHERE id = %s AND state = %s "
    f"AND {_queued('account_id')} < %s AND {_queued('portal_id')} < %s"
)


def result_change_retry(*, change_id: int, account: Account) -> ResultChange:
    """Queue a change that was not saved once more (same idempotency key: an error is never
    stored by Bitrix24, so the same key cannot replay it). Refused (`QueueFull`) like a new
    change when the person or the portal has too many changes queued: it takes its places
    among the Queued changes the way a new one does (`_write_queued`)."""
    change = ResultChange.objects.get(pk=change_id, account=account)
    connection = connections[ResultChange.objects.db]
    caps = (settings.RESULTS_QUEUED_PER_ACCOUNT, settings.RESULTS_QUEUED_PER_PORTAL)
    queued, failed = ResultChange.State.QUEUED, ResultChange.State.FAILED
    for _try in range(WRITE_TRIES):
        if change.state != failed:
            return change
        now = timezone.now()
        key, created_at = change.idempotency_key, change.created_at
        if now - change.created_at > GIVE_UP_AFTER:
            key = ResultChange._meta.get_field("idempotency_key").default()
            created_at = now
        at = [connection.ops.adapt_datetimefield_value(value) for value in (now, created_at)]
        params = [
            *(queued, at[0], key, at[1], at[0]),
            *(account.pk, queued, account.pk, queued),
            *(change.portal_id, queued, change.portal_id, queued),
            *(change.pk, failed),
            *(account.pk, queued, caps[0], change.portal_id, queued, caps[1]),
        ]
        try:
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute(_REQUEUE, params)
                done = cursor.rowcount
        except IntegrityError:  # another change took the same place meanwhile: try again
            done = 0
            _pause_before_try(_try + 1)
        else:
            if not done:
                try:
                    _refuse_if_full(account, *caps)
                except QueueFull as exc:
                    exc.task_id = change.task_id
                    raise
        change = ResultChange.objects.get(pk=change_id, account=account)
    if change.state == failed:
        exc = _portal_full(account, caps[1])
        exc.task_id = change.task_id
        raise exc
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
