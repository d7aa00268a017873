"""Reading a task's results from Bitrix24, with the person's undelivered changes laid over them."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import lru_cache

from django.core.signals import setting_changed
from django.utils import formats, timezone, translation
from django.utils.translation import gettext_lazy as _

from b24app.portals.bitrix import (
    BitrixAccessDenied,
    BitrixAuthError,
    BitrixError,
    BitrixTokenExpired,
    BitrixUnavailable,
    BitrixValidationError,
)
from b24app.portals.bitrix.methods import RESULT_FIELDS, TaskResult, task_results_list
from b24app.portals.models import Account, Portal
from b24app.portals.ratelimit import WEB_LIMITER_WAIT_S  # every web path's wait for a slot
from b24app.portals.services import AccountAwaitingSignIn, account_client
from results.models import ResultChange
from results.selectors import portal_user_names, result_changes_pending

LIST_PAGE_SIZE = 50
"""Results asked for per page. The documentation gives no default or maximum for
`tasks.task.result.list`, so the listing learns what the portal really returns (`list_v3`)."""
RESULT_PAGE_MEMORY = timedelta(days=1)
"""How long what was learnt of a portal's page size is trusted before it is learnt again."""


class Unreadable(enum.Enum):
    """Why a task's results could not be read."""

    SIGNED_OUT = "signed_out"  # the account waits for its user to open the app again
    BUSY = "busy"  # Bitrix24 (or the portal's request budget) is busy
    FAILED = "failed"  # Bitrix24 answered with an error of its own
    NO_ACCESS = "no_access"  # Bitrix24 says the person may not see the task
    SESSION_ENDED = "session_ended"  # the person's Bitrix24 tokens were refused
    NOT_FOUND = "not_found"  # no such task

    @property
    def transient(self) -> bool:
        """Bitrix24 could not answer now (busy or down), rather than answered no."""
        return self in (Unreadable.SIGNED_OUT, Unreadable.BUSY, Unreadable.FAILED)


class ScreenUnavailable(Exception):
    """The results could not be read from Bitrix24: `message` is for the person, `reason`
    says why (`Unreadable`)."""

    def __init__(self, message, *, reason: Unreadable = Unreadable.FAILED) -> None:
        super().__init__(str(message))
        self.message = message
        self.reason = reason


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

    # What the item template shows of its times, as `|date:'c'` and `|date:"DATETIME_FORMAT"`
    # under `{% localtime off %}` would: the value as Bitrix24 sent it, in the active language's
    # format. Formatted once per value and language in a process, not per row and open.
    @property
    def created_iso(self) -> str:
        return _iso(self.created_at)

    @property
    def created_display(self) -> str:
        return _display(self.created_at, translation.get_language())

    @property
    def updated_iso(self) -> str:
        return _iso(self.updated_at)

    @property
    def updated_display(self) -> str:
        return _display(self.updated_at, translation.get_language())


def _iso(value: datetime | None) -> str:
    return value.isoformat() if value is not None else ""


@lru_cache(maxsize=8192)
def _display(value: datetime | None, language: str | None) -> str:
    if value is None:
        return ""
    return formats.date_format(value, "DATETIME_FORMAT")


def _formats_changed(**kwargs) -> None:
    _display.cache_clear()  # a test overrode a format or language setting


setting_changed.connect(_formats_changed)


def _item(raw: TaskResult, names: dict[int, str]) -> ResultItem:
    """A result as the screen shows it; a name Bitrix24 did not send is the portal's user
    directory's, else the author's id."""
    return ResultItem(
        id=raw.id,
        text=raw.text or "",
        author_id=raw.author_id,
        author_name=raw.author_name or names.get(raw.author_id) or f"#{raw.author_id}",
        created_at=raw.created_at,
        updated_at=raw.updated_at,
        closed=raw.closed,
        can_edit=raw.can_edit,
        can_remove=raw.can_remove,
    )


UNREADABLE_BECAUSE = (
    # (what Bitrix24 raised, what the person is told, why); the first that matches applies
    (
        AccountAwaitingSignIn,
        _("Bitrix24 needs you to sign in again. Reopen the app; your changes are kept."),
        Unreadable.SIGNED_OUT,
    ),
    (BitrixUnavailable, _("Bitrix24 is busy right now. Try again in a minute."), Unreadable.BUSY),
    (
        BitrixAccessDenied,
        _("You do not have access to this task in Bitrix24."),
        Unreadable.NO_ACCESS,
    ),
    (
        (BitrixAuthError, BitrixTokenExpired),
        _("Your Bitrix24 session has ended. Reopen the app."),
        Unreadable.SESSION_ENDED,
    ),
    (BitrixValidationError, _("This task was not found in Bitrix24."), Unreadable.NOT_FOUND),
    (BitrixError, _("Bitrix24 could not show the results right now."), Unreadable.FAILED),
)


def results_fetch(*, account: Account, task_id: int) -> list[ResultItem]:
    """The task's results as `account`'s user sees them (their own token), newest first, with
    this user's undelivered changes laid over them."""
    try:
        listing = task_results_list(
            account_client(account, limiter_max_wait=WEB_LIMITER_WAIT_S),
            task_id,
            select=RESULT_FIELDS,
            order={"id": "DESC"},
            page_size=LIST_PAGE_SIZE,
            known_page=_known_result_page(account.portal),
        )
    except BitrixError as exc:
        message, reason = next(said for kind, *said in UNREADABLE_BECAUSE if isinstance(exc, kind))
        raise ScreenUnavailable(message, reason=reason) from exc
    _result_page_remember(account.portal, listing.largest_page)
    # The portal's user directory only for the authors Bitrix24 sent no name for.
    unnamed = any(not raw.author_name for raw in listing.items)
    names = portal_user_names(account.portal) if unnamed else {}
    items = [_item(raw, names) for raw in listing.items]
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


@dataclass
class TaskResults:
    """What the screen shows of a task: its results, or why they could not be read (then, if
    Bitrix24 was only busy or down, at least the person's own recent changes)."""

    items: list[ResultItem] = field(default_factory=list)
    unavailable: ScreenUnavailable | None = None


def results_for_screen(*, account: Account, task_id: int) -> TaskResults:
    """The task's results for the screen (`results_fetch`). When they cannot be read because
    Bitrix24 is busy or down, what the person did is kept in sight (`results_pending_only`)."""
    try:
        return TaskResults(items=results_fetch(account=account, task_id=task_id))
    except ScreenUnavailable as exc:
        items = (
            results_pending_only(account=account, task_id=task_id) if exc.reason.transient else []
        )
        return TaskResults(items=items, unavailable=exc)
