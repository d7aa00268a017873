"""Reads about portals: the admin's and CLI's overview, and the keep-alive's batch."""

from datetime import timedelta

import pytest
from django.utils import timezone

from b24app.portals import selectors
from b24app.portals.models import Account, Portal
from tests.support.factories import AccountFactory, PortalFactory

pytestmark = pytest.mark.django_db


def test_portals_overview_counts_accounts_and_names_the_latest_refresh_error():
    busy, quiet, empty = PortalFactory.create_batch(3)  # portal1…3.bitrix24.com
    AccountFactory(
        portal=busy, user_id=1, last_refresh_error="QUERY_LIMIT_EXCEEDED: temporary, will retry"
    )
    latest = AccountFactory(
        portal=busy, user_id=2, last_refresh_error="Refresh token rejected by Bitrix24"
    )
    AccountFactory(portal=busy, user_id=3)
    AccountFactory(portal=quiet, user_id=1)
    Account.objects.filter(pk=latest.pk).update(updated_at=timezone.now() + timedelta(minutes=1))

    overview = {portal.pk: portal for portal in selectors.portals_overview()}

    assert [overview[p.pk].accounts_count for p in (busy, quiet, empty)] == [3, 1, 0]
    assert overview[busy.pk].latest_refresh_error == "Refresh token rejected by Bitrix24"
    assert overview[quiet.pk].latest_refresh_error == overview[empty.pk].latest_refresh_error == ""
    assert [portal.domain for portal in selectors.portals_overview()] == [
        "portal1.bitrix24.com",
        "portal2.bitrix24.com",
        "portal3.bitrix24.com",
    ]


def test_portals_overview_counts_only_what_a_page_shows(django_assert_num_queries):
    """The paginator's count and a page are one query each, however many accounts there are."""
    for number in range(1, 6):
        portal = PortalFactory(number=number)
        for user_id in range(1, number + 1):
            AccountFactory(portal=portal, user_id=user_id, last_refresh_error=f"error {number}")

    with django_assert_num_queries(2):
        assert selectors.portals_overview().count() == 5
        page = list(selectors.portals_overview()[:3])
    assert [(p.accounts_count, p.latest_refresh_error) for p in page] == [
        (1, "error 1"),
        (2, "error 2"),
        (3, "error 3"),
    ]


def test_portals_overview_in_one_state_only():
    active, blocked = PortalFactory(number=1), PortalFactory(number=2, state=Portal.State.BLOCKED)
    AccountFactory(portal=blocked, user_id=1)

    assert [p.pk for p in selectors.portals_overview(state=Portal.State.BLOCKED)] == [blocked.pk]
    assert selectors.portals_overview(state=Portal.State.BLOCKED).get().accounts_count == 1
    assert [p.pk for p in selectors.portals_overview()] == [active.pk, blocked.pk]


def test_portal_by_member_id():
    portal = PortalFactory(number=1)
    assert selectors.portal_by_member_id(portal.member_id) == portal
    assert selectors.portal_by_member_id(f"{2:032x}") is None


def test_keepalive_batch_is_the_oldest_idle_accounts_ids_and_versions(monkeypatch):
    portal, blocked_portal = PortalFactory(), PortalFactory(state=Portal.State.BLOCKED)
    now = timezone.now()

    def idle(days: int, user_id: int, on=portal, **fields) -> Account:
        issued_at = now - timedelta(days=days)
        return AccountFactory(portal=on, user_id=user_id, tokens_issued_at=issued_at, **fields)

    oldest = idle(170, 1, token_version=4)
    older = idle(160, 2, token_version=2)
    idle(155, 3)
    idle(149, 4)  # not idle long enough
    idle(200, 5, state=Account.State.BLOCKED)
    idle(200, 1, on=blocked_portal)
    monkeypatch.setattr(selectors, "KEEPALIVE_BATCH", 2)

    assert selectors.accounts_keepalive_batch() == [(oldest.pk, 4), (older.pk, 2)]


def test_connection_account_is_one_that_can_refresh():
    """The portal's own work (verify, uninstall check) outlives any frame: an account holding
    only an access token (Bitrix24 opened the app without REFRESH_ID) is never the connection,
    even the installer's."""
    portal = PortalFactory(number=1)
    AccountFactory(portal=portal, user_id=1, is_installer=True, is_admin=True, refresh_token="")
    admin = AccountFactory(portal=portal, user_id=2, is_admin=True)
    AccountFactory(portal=portal, user_id=3, state=Account.State.WAITING, is_admin=True)

    assert selectors.portal_connection_account(portal) == admin
    Account.objects.filter(pk=admin.pk).update(refresh_token_encrypted="")
    assert selectors.portal_connection_account(portal) is None
