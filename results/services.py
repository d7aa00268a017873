"""What people do with task results: read them from Bitrix24 and change them, nothing lost.

Every add, edit and delete is validated, written as a `ResultChange` (the outbox), then sent with
the editor's own token through REST 3.0 under the change's `Idempotency-Key`. The web request
tries once, quickly; whatever is still queued is delivered by Celery with exponential backoff and
jitter, honouring the portal's shared request budget and `operating_reset_at`. Refusals end as
"Not saved" with a reason a person understands; `Retry` queues the change again.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import F, Max, Q
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from b24app.portals.bitrix import (
    IDEMPOTENCY_KEY_REUSED,
    BitrixAccessDenied,
    BitrixAuthError,
    BitrixError,
    BitrixTokenExpired,
    BitrixUnavailable,
    BitrixValidationError,
)
from b24app.portals.models import Account, Portal
from b24app.portals.ratelimit import WEB_LIMITER_WAIT_S  # every web path's wait for a slot
from b24app.portals.services import AccountAwaitingSignIn, account_client, portal_rate
from results.models import PortalOutbox, ResultChange
from results.selectors import (
    portal_user_names,
    result_changes_expired,
    result_changes_pending,
)

logger = logging.getLogger("results")

MAX_TEXT_LENGTH = 10_000
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
LIST_PAGE_SIZE = 50
"""Results asked for per page. The documentation gives no default or maximum for
`tasks.task.result.list`, so the listing learns what the portal really returns (`list_v3`)."""
RESULT_PAGE_MEMORY = timedelta(days=1)
"""How long what was learnt of a portal's page size is trusted before it is learnt again."""
LIST_SELECT = [
    "id",
    "taskId",
    "text",
    "authorId",
    "author",
    "createdAt",
    "updatedAt",
    "status",
    "rights",
]


class ResultError(Exception):
    """Input refused before anything was written or sent; `message` is for the person."""

    status = 400

    def __init__(self, message) -> None:
        super().__init__(str(message))
        self.message = message


class QueueFull(ResultError):
    """Too many changes wait to reach Bitrix24 (the person's, or the portal's): refused, and
    nothing stored, until some are delivered."""

    status = 429


class ScreenUnavailable(Exception):
    """The results could not be read from Bitrix24; `message` is for the person."""

    def __init__(self, message, *, status: int = 503) -> None:
        super().__init__(str(message))
        self.message = message
        self.status = status


# --- reading -----------------------------------------------------------------------------------


@dataclass
class ResultItem:
    id: int
    text: str
    author_id: int
    author_name: str
    created_at: datetime | None
    updated_at: datetime | None
    closed: bool
    can_edit: bool
    can_remove: bool
    change: ResultChange | None = None
    pending_delete: bool = False


def _parse_time(value) -> datetime | None:
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _item(raw: dict, names: dict[int, str]) -> ResultItem | None:
    try:
        result_id = int(raw["id"])
        author_id = int(raw.get("authorId") or 0)
    except (KeyError, TypeError, ValueError):
        return None
    author = raw.get("author") if isinstance(raw.get("author"), dict) else {}
    rights = raw.get("rights") if isinstance(raw.get("rights"), dict) else {}
    return ResultItem(
        id=result_id,
        text=str(raw.get("text") or ""),
        author_id=author_id,
        author_name=str(author.get("name") or names.get(author_id) or f"#{author_id}"),
        created_at=_parse_time(raw.get("createdAt")),
        updated_at=_parse_time(raw.get("updatedAt")),
        closed=str(raw.get("status")) == "closed",
        can_edit=rights.get("edit") is True,
        can_remove=rights.get("remove") is True,
    )


def results_fetch(*, account: Account, task_id: int) -> list[ResultItem]:
    """The task's results as `account`'s user sees them (their own token), newest first, with
    this user's undelivered changes laid over them."""
    try:
        listing = account_client(account, limiter_max_wait=WEB_LIMITER_WAIT_S).list_v3(
            "tasks.task.result.list",
            {"filter": [["taskId", task_id]], "select": LIST_SELECT, "order": {"id": "DESC"}},
            page_size=LIST_PAGE_SIZE,
            known_page=_known_result_page(account.portal),
        )
    except AccountAwaitingSignIn as exc:
        raise ScreenUnavailable(
            _("Bitrix24 needs you to sign in again. Reopen the app; your changes are kept.")
        ) from exc
    except BitrixUnavailable as exc:
        raise ScreenUnavailable(_("Bitrix24 is busy right now. Try again in a minute.")) from exc
    except BitrixAccessDenied as exc:
        raise ScreenUnavailable(
            _("You do not have access to this task in Bitrix24."), status=403
        ) from exc
    except (BitrixAuthError, BitrixTokenExpired) as exc:
        raise ScreenUnavailable(
            _("Your Bitrix24 session has ended. Reopen the app."), status=403
        ) from exc
    except BitrixValidationError as exc:
        raise ScreenUnavailable(_("This task was not found in Bitrix24."), status=404) from exc
    except BitrixError as exc:
        raise ScreenUnavailable(_("Bitrix24 could not show the results right now.")) from exc
    _result_page_remember(account.portal, listing.largest_page)
    names = portal_user_names(account.portal)
    items = [item for raw in listing.items if isinstance(raw, dict) and (item := _item(raw, names))]
    items.sort(key=lambda item: item.id, reverse=True)  # ids grow with creation: newest first
    return _with_pending_changes(items, account=account, task_id=task_id)


def _known_result_page(portal: Portal) -> int:
    """The page size this portal was seen to return, while that knowledge is fresh."""
    seen_at = portal.result_page_seen_at
    if seen_at is None or timezone.now() - seen_at > RESULT_PAGE_MEMORY:
        return 0
    return portal.result_page_seen


def _result_page_remember(portal: Portal, largest: int) -> None:
    """Keep what a listing learnt of the portal's page size: written when it grows, or once
    its day is over (a portal whose cap changed is relearnt then), never on every open."""
    known = _known_result_page(portal)
    if largest == 0 or (known and largest <= known):
        return
    now = timezone.now()
    Portal.objects.filter(pk=portal.pk).update(result_page_seen=largest, result_page_seen_at=now)
    portal.result_page_seen, portal.result_page_seen_at = largest, now


def results_pending_only(*, account: Account, task_id: int) -> list[ResultItem]:
    """When Bitrix24 cannot be read: at least this person's own recent changes (their new
    results, queued or just saved), so nothing they did vanishes from the screen."""
    return _with_pending_changes([], account=account, task_id=task_id, complete=False)


def result_item_of_change(*, change: ResultChange, account: Account | None = None) -> ResultItem:
    """The result a person added, as the screen shows it before Bitrix24's list has it: their
    text under their name, with the change's state. What they may do with it (`rights`) is
    Bitrix24's to say, so it offers nothing until the list is read again."""
    account = account or change.account
    return ResultItem(
        id=change.result_id or 0,
        text=change.text_after,
        author_id=account.user_id,
        author_name=account.display_name or f"#{account.user_id}",
        created_at=change.created_at,
        updated_at=None,
        closed=False,
        can_edit=False,
        can_remove=False,
        change=change,
    )


def _with_pending_changes(
    items, *, account: Account, task_id: int, complete: bool = True
) -> list[ResultItem]:
    """Show what this person changed but Bitrix24 has not confirmed yet (or refused). With a
    `complete` list from Bitrix24, a saved new result is already in it; without one, show it."""
    changes = result_changes_pending(account=account, task_id=task_id)
    by_id = {item.id: item for item in items}
    added: list[ResultItem] = []
    for change in changes:
        if change.state == ResultChange.State.SAVED and change.action == ResultChange.Action.DELETE:
            continue
        if change.action == ResultChange.Action.ADD and change.result_id not in by_id:
            if change.state == ResultChange.State.SAVED and complete:
                continue
            added.append(result_item_of_change(change=change, account=account))
        elif change.result_id in by_id:
            item = by_id[change.result_id]
            item.change = change
            if change.state == ResultChange.State.QUEUED:
                if change.action == ResultChange.Action.UPDATE:
                    item.text = change.text_after
                item.pending_delete = change.action == ResultChange.Action.DELETE
    return list(reversed(added)) + items


# --- changing ----------------------------------------------------------------------------------


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
        _queue_room(account)
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
        result = client.call_v3(
            "tasks.task.result.add",
            {"fields": {"taskId": change.task_id, "text": change.text_after}},
            idempotency_key=key,
        )
        item = result.get("item") if isinstance(result, dict) else None
        return int(item["id"]) if isinstance(item, dict) and "id" in item else None
    if change.action == ResultChange.Action.UPDATE:
        client.call_v3(
            "tasks.task.result.update",
            {"id": change.result_id, "fields": {"text": change.text_after}},
            idempotency_key=key,
        )
    else:
        client.call_v3("tasks.task.result.delete", {"id": change.result_id}, idempotency_key=key)
    return change.result_id


def _read_back(client, change: ResultChange) -> int | None:
    """Whether Bitrix24 already holds the change, read as its author: the result id it applied
    to, or None. An edit is there when the result has its text; a delete when the result is
    gone; an add when a result of this author on this task has its text, was created after the
    change (give or take the clocks' skew) and is not another change's result."""
    task_filter = ["taskId", change.task_id]
    if change.action != ResultChange.Action.ADD:
        items = client.list_v3(
            "tasks.task.result.list",
            {"filter": [task_filter, ["id", change.result_id]], "select": ["id", "text"]},
        ).items
        if change.action == ResultChange.Action.DELETE:
            return change.result_id if not items else None
        texts = [item.get("text") for item in items if isinstance(item, dict)]
        return change.result_id if change.text_after in texts else None
    items = client.list_v3(
        "tasks.task.result.list",
        {
            "filter": [task_filter, ["authorId", change.account.user_id]],
            "select": ["id", "text", "createdAt"],
            "order": {"id": "ASC"},
        },
    ).items
    claimed = set(
        ResultChange.objects.filter(
            portal_id=change.portal_id, task_id=change.task_id, action=ResultChange.Action.ADD
        )
        .exclude(pk=change.pk)
        .exclude(result_id=None)
        .values_list("result_id", flat=True)
    )
    since = change.created_at - CLOCK_SKEW
    for item in items:
        if not isinstance(item, dict) or item.get("text") != change.text_after:
            continue
        created = _parse_time(item.get("createdAt"))
        try:
            result_id = int(item["id"])
        except (KeyError, TypeError, ValueError):
            continue
        if created is not None and created >= since and result_id not in claimed:
            return result_id
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


def _backoff(change: ResultChange, exc: BitrixUnavailable) -> datetime:
    """The next attempt of a change held back by its own account (waiting for its user), not
    by the portal."""
    now = timezone.now()
    return now + timedelta(seconds=backoff_delay(change.attempts, exc, now=now))


# --- the portal's turn: a portal backs off as one ----------------------------------------------

SEND, PROBE, WAIT = "send", "probe", "wait"


def _portal_turn(portal_id: int) -> tuple[str, PortalOutbox | None]:
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


def _wait_for_portal(change: ResultChange, outbox: PortalOutbox) -> ResultChange:
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
        from results.tasks import result_change_schedule

        transaction.on_commit(lambda: result_change_schedule(change))
    return change


def _portal_unavailable(portal_id: int, exc: BitrixUnavailable, *, probe: bool) -> datetime:
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


def _portal_probe_done(portal_id: int) -> None:
    """The probe ended without learning whether the portal is back (nothing reached it): the
    next attempt may try at once."""
    PortalOutbox.objects.filter(pk=portal_id).update(probe_until=None)


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


def _portal_answered(portal_id: int) -> bool:
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


def _turn(change: ResultChange, not_before_s: float, interval_s: float) -> datetime:
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


def result_change_deliver(*, change_id: int, limiter_max_wait: float | None = None) -> ResultChange:
    """One delivery attempt, if the change is queued, due and not being delivered elsewhere.

    Safe to run twice or concurrently: a lease lets one attempt at a time send, and the
    change's `Idempotency-Key` makes Bitrix24 apply a resent change once.

    `limiter_max_wait` bounds the wait for the portal's request budget (a web request's);
    without it (background) the wait is at most :data:`DEFER_AFTER_SLOTS` request intervals.
    A change that would wait longer is re-queued for its turn (:func:`_turn`), which is not
    counted as an attempt: nothing was sent.
    """
    if not _claim(change_id):
        return ResultChange.objects.get(pk=change_id)
    change = ResultChange.objects.select_related("account__portal").get(pk=change_id)
    turn, outbox = _portal_turn(change.portal_id)
    if turn == WAIT:
        return _wait_for_portal(change, outbox)
    interval_s = 1 / portal_rate(change.portal)[1]
    if limiter_max_wait is None:
        limiter_max_wait = DEFER_AFTER_SLOTS * interval_s
    updates: dict = {"lease_until": None}
    deferred_for: float | None = None
    answered = probe_done = False
    try:
        if change.portal.state != Portal.State.ACTIVE and change.portal.blocked_by_operator:
            raise BitrixAuthError("PORTAL_BLOCKED", "portal blocked by its operator")
        result_id = _send(change, limiter_max_wait)
    except BitrixUnavailable as exc:
        code = DEFERRED if exc.code in NOT_SENT else exc.code
        updates.update(last_error=code[:120], last_error_message="")
        portal_wide = code != DEFERRED and not isinstance(exc, AccountAwaitingSignIn)
        if portal_wide:
            updates["next_attempt_at"] = _portal_unavailable(
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
            _portal_probe_done(change.portal_id)
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
        _portal_probe_done(change.portal_id)
    drains = answered and _portal_answered(change.portal_id)
    with transaction.atomic():
        if deferred_for is not None:
            updates["next_attempt_at"] = _turn(change, deferred_for, interval_s)
        ResultChange.objects.filter(pk=change_id).update(**updates, updated_at=timezone.now())
    change.refresh_from_db()
    logger.info(
        "change %s attempt %s -> %s %s", change.pk, change.attempts, change.state, change.last_error
    )
    if change.state == ResultChange.State.QUEUED:
        from results.tasks import result_change_schedule

        transaction.on_commit(lambda: result_change_schedule(change))
    if drains:
        from results.tasks import result_changes_drain

        portal_id = change.portal_id
        transaction.on_commit(lambda: result_changes_drain(portal_id))
    return change


def delivers_inline() -> bool:
    """True when there is no broker: background work runs in the web process."""
    from celery import current_app

    return bool(current_app.conf.task_always_eager)


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
