"""Operators see every change and why one failed; the outbox cannot be edited from the admin."""

import pytest

from tests.support.factories import AccountFactory, PortalFactory, ResultChangeFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def changes():
    portal = PortalFactory(
        member_id="a" * 32,
        domain="one.bitrix24.com",
        client_endpoint="https://one.bitrix24.com/rest/",
    )
    other = PortalFactory(
        member_id="b" * 32,
        domain="two.bitrix24.com",
        client_endpoint="https://two.bitrix24.com/rest/",
    )
    anna = AccountFactory(portal=portal, user_id=1, display_name="Anna Smirnova")
    olga = AccountFactory(portal=other, user_id=7, display_name="Olga Ivanova")
    failed = ResultChangeFactory(
        portal=portal,
        account=anna,
        task_id=5,
        result_id=17,
        action="update",
        text_before="old",
        text_after="new",
        state="failed",
        last_error="BITRIX_REST_V3_EXCEPTION_ACCESSDENIEDEXCEPTION",
        last_error_message="Bitrix24 does not let you change this result (only its author can).",
    )
    saved = ResultChangeFactory(
        portal=other, account=olga, task_id=9, action="add", text_after="done", state="saved"
    )
    return failed, saved


def test_admin_lists_changes_with_state_and_reason(admin_client, changes):
    failed, saved = changes
    html = admin_client.get("/admin/results/resultchange/").content.decode()
    assert "Anna Smirnova (#1)" in html and "Olga Ivanova (#7)" in html
    assert "ACCESSDENIEDEXCEPTION" in html and "only its author can" in html
    assert "Not saved" in html and "Saved" in html


def test_admin_filters_by_state_and_portal(admin_client, changes):
    failed, saved = changes
    only_failed = admin_client.get(
        "/admin/results/resultchange/?state__exact=failed"
    ).content.decode()
    assert "Anna Smirnova" in only_failed and "Olga Ivanova" not in only_failed
    by_portal = admin_client.get(
        f"/admin/results/resultchange/?portal__id__exact={saved.portal_id}"
    ).content.decode()
    assert "Olga Ivanova" in by_portal and "Anna Smirnova" not in by_portal


def test_admin_searches_by_portal_and_by_task_or_result_number(admin_client, changes):
    failed, saved = changes
    url = "/admin/results/resultchange/"
    by_member = admin_client.get(url, {"q": saved.portal.member_id}).content.decode()
    assert "Olga Ivanova" in by_member and "Anna Smirnova" not in by_member
    by_task = admin_client.get(url, {"q": str(failed.task_id)}).content.decode()
    assert "Anna Smirnova" in by_task
    unknown = admin_client.get(url, {"q": "987654321"})
    assert unknown.status_code == 200
    assert "Anna Smirnova" not in unknown.content.decode()
    assert admin_client.get(url, {"q": "9" * 40}).status_code == 200  # not a number we store


def test_admin_change_page_is_read_only(admin_client, changes):
    failed, _ = changes
    url = f"/admin/results/resultchange/{failed.pk}/change/"
    page = admin_client.get(url)
    assert page.status_code == 200
    assert (
        "<textarea" not in page.content.decode()
        and 'name="text_after"' not in page.content.decode()
    )
    admin_client.post(url, {"text_after": "hacked", "state": "saved"})
    failed.refresh_from_db()
    assert (failed.text_after, failed.state) == ("new", "failed")
    assert admin_client.get("/admin/results/resultchange/add/").status_code == 403
