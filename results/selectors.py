"""Reads about result changes: database only, never HTTP."""

from __future__ import annotations

from datetime import timedelta

from django.db.models import Q
from django.utils import timezone

from b24app.portals.models import Account, Portal
from results.models import ResultChange

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


def result_changes_due(*, account: Account | None = None) -> list[int]:
    """Queued changes whose next attempt is due and that no attempt owns."""
    now = timezone.now()
    due = ResultChange.objects.filter(state=ResultChange.State.QUEUED, next_attempt_at__lte=now)
    if account is not None:
        due = due.filter(account=account)
    return list(
        due.filter(Q(lease_until__isnull=True) | Q(lease_until__lt=now))
        .order_by("next_attempt_at")
        .values_list("pk", flat=True)[:1000]
    )


def portal_user_names(portal: Portal) -> dict[int, str]:
    return dict(portal.accounts.exclude(display_name="").values_list("user_id", "display_name"))
