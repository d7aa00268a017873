"""Reads about portals and accounts: database only, never HTTP."""

from __future__ import annotations

from datetime import timedelta

from django.db.models import Count, F, OuterRef, Q, QuerySet, Subquery, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from b24app.portals import bindings
from b24app.portals.models import Account, Portal

KEEPALIVE_AFTER_DAYS = 150
"""Refresh tokens die after 180 days unused; the keep-alive refreshes idle ones after 150."""
KEEPALIVE_BATCH = 10_000
"""Refreshes one keep-alive run queues at most, oldest first; any others are due the next day,
with 29 days left before their tokens die."""


def portals_overview(*, state: str | None = None) -> QuerySet[Portal]:
    """Portals (in `state`, when given) with their number of accounts (`accounts_count`) and
    their accounts' latest refresh error (`latest_refresh_error`, "" when none), for the admin
    and the CLI.

    Both are correlated subqueries rather than a join with GROUP BY: a page of 100 portals reads
    only those portals' accounts (through the account's portal index), and the paginator's
    COUNT(*) leaves them out; the join aggregated every account on every page.
    """
    accounts = Account.objects.filter(portal=OuterRef("pk")).order_by()
    portals = Portal.objects.filter(state=state) if state else Portal.objects.all()
    return portals.annotate(
        accounts_count=Coalesce(
            Subquery(accounts.values("portal").annotate(count=Count("pk")).values("count")), 0
        ),
        latest_refresh_error=Coalesce(
            Subquery(
                accounts.exclude(last_refresh_error="")
                .order_by("-updated_at")
                .values("last_refresh_error")[:1]
            ),
            Value(""),
        ),
    ).order_by("domain")


def portal_by_member_id(member_id: str) -> Portal | None:
    """The portal with this member_id, if the app knows one."""
    return Portal.objects.filter(member_id=member_id).first()


def portal_by_name(name: str) -> Portal | None:
    """A portal by its member_id or (current) domain, as an operator names it."""
    name = name.strip()
    return (
        Portal.objects.filter(member_id=name).first()
        or Portal.objects.filter(domain__iexact=name.removeprefix("https://").rstrip("/")).first()
    )


def portal_connection_account(portal: Portal) -> Account | None:
    """The account the app acts through for the portal itself: the installer's, else a portal
    admin's, and always one with a refresh token (an access token alone dies within the hour).
    Never a plain user's: what the app concludes about the portal through this account (that it
    is still installed, or not) must not rest on a token a plain user handed in."""
    return (
        portal.accounts.filter(state=Account.State.ACTIVE)
        .filter(Q(is_installer=True) | Q(is_admin=True))
        .exclude(refresh_token_encrypted="")
        .order_by("-is_installer", "-is_admin", "-last_seen_at")
        .first()
    )


def portal_uninstall_witnesses(portal: Portal, *, limit: int = 3) -> list[Account]:
    """The accounts whose tokens may confirm that Bitrix24 removed the app: the installer's and
    portal admins' that hold tokens, the installer first, then the admin seen last."""
    return list(
        portal.accounts.filter(state=Account.State.ACTIVE)
        .filter(Q(is_installer=True) | Q(is_admin=True))
        .exclude(access_token_encrypted="", refresh_token_encrypted="")
        .order_by("-is_installer", "-last_seen_at")[:limit]
    )


def portal_live_accounts(portal: Portal, *, limit: int = 5) -> list[Account]:
    """Accounts of any user whose stored access token has not expired yet, the one seen last
    first: a token of the app that still works proves the app is installed."""
    return list(
        portal.accounts.filter(state=Account.State.ACTIVE, expires_at__gt=timezone.now())
        .exclude(access_token_encrypted="")
        .order_by("-last_seen_at")[:limit]
    )


def portal_admin_account(portal: Portal) -> Account | None:
    """A portal admin's account with working tokens: the installer's first, else the admin seen
    most recently. Reading a portal's event bindings needs an admin (others see only their own)."""
    return (
        portal.accounts.filter(state=Account.State.ACTIVE, is_admin=True)
        .exclude(refresh_token_encrypted="")
        .order_by("-is_installer", "-last_seen_at")
        .first()
    )


def portal_last_refreshed_at(portal: Portal):
    """When any of the portal's tokens were last renewed (None: never)."""
    return (
        portal.accounts.exclude(last_refreshed_at=None)
        .order_by("-last_refreshed_at")
        .values_list("last_refreshed_at", flat=True)
        .first()
    )


BINDINGS_BATCH = 10_000
"""Bindings checks one daily run queues at most, the longest unchecked first."""


def portals_bindings_due() -> list[int]:
    """Active portals whose bindings were never read, or not for a day: ids, oldest first."""
    cutoff = timezone.now() - bindings.CHECK_EVERY
    return list(
        Portal.objects.filter(state=Portal.State.ACTIVE)
        .filter(Q(bindings_checked_at__isnull=True) | Q(bindings_checked_at__lte=cutoff))
        .order_by(F("bindings_checked_at").asc(nulls_first=True), "pk")
        .values_list("pk", flat=True)[:BINDINGS_BATCH]
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


def accounts_keepalive_batch() -> list[tuple[int, int]]:
    """`(id, token_version)` of the accounts the keep-alive refreshes now: two integers per
    account and at most `KEEPALIVE_BATCH` of them, whatever the number of accounts."""
    return list(accounts_keepalive_due().values_list("pk", "token_version")[:KEEPALIVE_BATCH])
