"""Reads about portals and accounts: database only, never HTTP."""

from __future__ import annotations

from datetime import timedelta

from django.db.models import Count, Max, QuerySet
from django.utils import timezone

from b24app.portals.models import Account, Portal

KEEPALIVE_AFTER_DAYS = 150
"""Refresh tokens die after 180 days unused; the keep-alive refreshes idle ones after 150."""


def portals_overview() -> QuerySet[Portal]:
    """Portals with their account count and latest refresh error time, for the admin and CLI."""
    return Portal.objects.annotate(
        accounts_count=Count("accounts"), last_refreshed_at=Max("accounts__last_refreshed_at")
    ).order_by("domain")


def portal_last_refresh_error(portal: Portal) -> str:
    account = (
        portal.accounts.exclude(last_refresh_error="")
        .order_by("-updated_at")
        .only("last_refresh_error")
        .first()
    )
    return account.last_refresh_error if account else ""


def portal_connection_account(portal: Portal) -> Account | None:
    """The account the app acts through for the portal itself: the installer's, else an admin's."""
    return (
        portal.accounts.filter(state=Account.State.ACTIVE)
        .exclude(refresh_token_encrypted="")
        .order_by("-is_installer", "-is_admin", "-last_seen_at")
        .first()
    )


def accounts_keepalive_due() -> QuerySet[Account]:
    """Accounts whose refresh token would die unused: issued more than 150 days ago."""
    cutoff = timezone.now() - timedelta(days=KEEPALIVE_AFTER_DAYS)
    return (
        Account.objects.filter(
            state=Account.State.ACTIVE,
            portal__state=Portal.State.ACTIVE,
            tokens_issued_at__lt=cutoff,
        )
        .exclude(refresh_token_encrypted="")
        .order_by("tokens_issued_at")
    )
