"""The operator's portal pages make a fixed number of queries, however many portals and
accounts there are (tests/portals/test_oauth_and_admin.py covers what they show and do)."""

import re

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from b24app.portals.models import Account, Portal
from tests.support.factories import AccountFactory, PortalFactory

pytestmark = pytest.mark.django_db


def _portals(first: int, count: int, users: int) -> list[Portal]:
    portals = []
    for number in range(first, first + count):
        portal = PortalFactory(number=number, domain=f"portal{number:03d}.bitrix24.com")
        error = f"QUERY_LIMIT_EXCEEDED on portal {number}"
        for user_id in range(1, users + 1):
            AccountFactory(
                portal=portal,
                user_id=user_id,
                display_name=f"User {user_id}",
                last_refresh_error=error if user_id == 1 else "",
            )
        portals.append(portal)
    return portals


def _queries(client, path: str) -> tuple[int, str]:
    """The number of queries a page makes, and its HTML; after one unmeasured request, which
    fills per-process caches (content types) that a first request queries."""
    client.get(path)
    with CaptureQueriesContext(connection) as captured:
        response = client.get(path)
    assert response.status_code == 200
    return len(captured.captured_queries), response.content.decode()


def test_portal_changelist_queries_do_not_grow_with_portals_or_accounts(admin_client):
    _portals(1, 2, users=1)
    few, _ = _queries(admin_client, "/admin/portals/portal/")
    _portals(3, 30, users=4)

    many, html = _queries(admin_client, "/admin/portals/portal/")

    assert many == few
    assert html.count('<th class="field-domain">') == 32
    assert "QUERY_LIMIT_EXCEEDED on portal 32" in html
    assert re.search(r'<td class="field-accounts_count"><a href="[^"]+">4</a></td>', html)


def test_portal_changelist_sorts_by_accounts(admin_client):
    _portals(1, 1, users=3)
    _portals(2, 1, users=1)
    _portals(3, 1, users=2)
    html = admin_client.get("/admin/portals/portal/?o=-8").content.decode()  # accounts, desc
    positions = [html.index(f"portal{number:03d}.bitrix24.com") for number in (1, 3, 2)]
    assert positions == sorted(positions)


def test_portal_change_page_queries_do_not_grow_with_accounts(admin_client):
    small, large = _portals(1, 1, users=2)[0], _portals(2, 1, users=40)[0]
    few, _ = _queries(admin_client, f"/admin/portals/portal/{small.pk}/change/")

    many, html = _queries(admin_client, f"/admin/portals/portal/{large.pk}/change/")

    assert many == few
    assert html.count('<tr class="form-row') == 40


# --- the account list: every user of every portal, paginated -----------------------------------


def test_account_changelist_lists_one_portal_and_finds_users(admin_client):
    first, second = _portals(1, 2, 3)
    changelist = "/admin/portals/account/"
    # The portal list's account count links to that portal's accounts.
    portals = admin_client.get("/admin/portals/portal/").content.decode()
    assert f'href="{changelist}?portal__id__exact={first.pk}"' in portals

    queries, html = _queries(admin_client, f"{changelist}?portal__id__exact={first.pk}")
    assert html.count(first.domain) >= 3 and second.domain not in html
    more, _ = _queries(admin_client, f"{changelist}?portal__id__exact={second.pk}")
    assert more == queries  # no query per row

    by_member = admin_client.get(changelist, {"q": second.member_id}).content.decode()
    assert second.domain in by_member and first.domain not in by_member
    by_user = admin_client.get(changelist, {"q": "2"}).content.decode()
    assert by_user.count("User 2") >= 2 and "User 3" not in by_user


def test_account_pages_are_read_only_and_show_four_characters_of_a_token(admin_client):
    from b24app.portals import crypto

    (portal,) = _portals(1, 1, 1)
    account = Account.objects.get(portal=portal)
    secret = "a1b2c3d4e5f6a7b8c9d0a1b2c3d4e5f6"
    Account.objects.filter(pk=account.pk).update(
        access_token_encrypted=crypto.encrypt(secret),
        refresh_token_encrypted=crypto.encrypt(secret),
    )
    url = f"/admin/portals/account/{account.pk}/change/"
    page = admin_client.get(url).content.decode()
    assert "a1b2***" in page and secret not in page
    admin_client.post(url, {"display_name": "Changed", "state": "blocked"})
    account.refresh_from_db()
    assert (account.display_name, account.state) == ("User 1", Account.State.ACTIVE)
    assert admin_client.get("/admin/portals/account/add/").status_code == 403
