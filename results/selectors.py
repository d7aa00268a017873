"""Reads about result changes: database only, never HTTP."""

from __future__ import annotations

from datetime import timedelta

from django.db.models import Exists, F, OuterRef, Q, Window
from django.db.models.functions import RowNumber
from django.utils import timezone
from django.utils.translation import gettext as _
from django.utils.translation import pgettext

from b24app.portals.models import Account, Portal
from b24app.portals.selectors import portal_last_refreshed_at
from results.models import PortalOutbox, ResultChange

SHOW_FAILED_FOR = timedelta(days=1)
SHOW_SAVED_FOR = timedelta(minutes=2)


def result_changes_pending(*, account: Account, task_id: int) -> list[ResultChange]:
    """This person's changes to a task worth showing beside the results: queued ones, refused
    ones from the last day (so the person sees why and can retry), and ones saved moments ago."""
    now = timezone.now()
    return list(
        ResultChange.objects.filter(account=account, task_id=task_id)
        .filter(
            Q(state=ResultChange.State.QUEUED)
            | Q(state=ResultChange.State.FAILED, updated_at__gte=now - SHOW_FAILED_FOR)
            | Q(state=ResultChange.State.SAVED, updated_at__gte=now - SHOW_SAVED_FOR)
        )
        .order_by("created_at", "pk")
    )


def result_changes_of(*, account: Account, ids: list[int]) -> list[ResultChange]:
    """The states of the given changes, only those this person made."""
    return list(ResultChange.objects.filter(account=account, pk__in=ids[:200]))


SWEEP_PER_PORTAL = 50
"""At most this many of one portal's due changes per sweep (or drain step), oldest first."""
SWEEP_LIMIT = 1000
"""At most this many due changes in all per sweep."""


def result_changes_due(
    *,
    account: Account | None = None,
    portal_id: int | None = None,
    per_portal: int = SWEEP_PER_PORTAL,
    limit: int = SWEEP_LIMIT,
) -> list[int]:
    """Queued changes whose next attempt is due and that no attempt owns, portal by portal in
    turn: every portal's oldest change first, then every portal's second, and so on, at most
    `per_portal` of each and `limit` in all, so one portal's backlog never pushes the others'
    changes out. A portal that backs off (`PortalOutbox`) gives none until its backoff is over,
    then only its oldest (the one that tries it again)."""
    now = timezone.now()
    held = PortalOutbox.objects.filter(pk=OuterRef("portal_id"), failures__gt=0)
    due = ResultChange.objects.filter(state=ResultChange.State.QUEUED, next_attempt_at__lte=now)
    if account is not None:
        due = due.filter(account=account)
    if portal_id is not None:
        due = due.filter(portal_id=portal_id)
    due = (
        due.filter(Q(lease_until__isnull=True) | Q(lease_until__lt=now))
        .exclude(
            Exists(held.filter(Q(resume_at__gt=now) | Q(probe_until__gte=now))),
        )
        .annotate(
            held=Exists(held),
            turn=Window(
                RowNumber(), partition_by=[F("portal_id")], order_by=[F("created_at"), F("pk")]
            ),
        )
    )
    return list(
        due.filter(turn__lte=per_portal)
        .filter(Q(held=False) | Q(turn=1))
        .order_by("turn", "created_at", "pk")
        .values_list("pk", flat=True)[:limit]
    )


def result_changes_expired(*, before, limit: int) -> list[int]:
    """Delivered changes (Saved or Not saved) last touched before `before`, oldest first."""
    return list(
        ResultChange.objects.exclude(state=ResultChange.State.QUEUED)
        .filter(updated_at__lt=before)
        .order_by("updated_at")
        .values_list("pk", flat=True)[:limit]
    )


def portal_user_names(portal: Portal) -> dict[int, str]:
    return dict(portal.accounts.exclude(display_name="").values_list("user_id", "display_name"))


def _connection_state(portal: Portal) -> tuple[str, str]:
    """The portal's state and a neutral reason, as the portal's people may read them. The
    recorded `state_reason` is for operators (the admin): it names operators and carries
    Bitrix24's codes, so it never reaches the screen."""
    if portal.state == Portal.State.ACTIVE:
        return pgettext("connection state", "Active"), ""
    if portal.state == Portal.State.BLOCKED and portal.blocked_by_operator:
        return pgettext("connection state", "Blocked"), _("Blocked by the app's operator.")
    if portal.state == Portal.State.BLOCKED:
        return pgettext("connection state", "Blocked"), _(
            "Waiting for the administrator who installed the app to open it again."
        )
    if portal.state == Portal.State.UNINSTALLED:
        return pgettext("connection state", "Uninstalled"), _(
            "The app was removed from this Bitrix24."
        )
    return pgettext("connection state", "New"), _("Waiting for the installation to finish.")


def portal_connection(portal: Portal) -> dict:
    """What a portal admin sees of the app's connection: read from what the app recorded, so
    the page costs no call to Bitrix24 (the bindings are read by their own check)."""
    state, reason = _connection_state(portal)
    return {
        "state": state,
        "reason": reason,
        "last_refreshed_at": portal_last_refreshed_at(portal),
        "bindings": portal.bindings,
        "bindings_label": portal.get_bindings_display(),
        "bindings_detail": portal.bindings_detail,
        "bindings_checked_at": portal.bindings_checked_at,
    }
