"""The install wizard (`POST /b24/install/`) against the fake portal over HTTP."""

from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest

from b24app.portals.models import Account, Portal
from tests.support.http import csp
from tests.support.portals import install, post_frame

pytestmark = pytest.mark.django_db


def test_install_wizard_stores_portal_binds_tab_and_events_then_finishes(client, portal):
    response = install(client, portal)

    assert response.status_code == 200, response.content
    html = response.content.decode()
    assert 'data-screen="install"' in html and "/static/portals/install." in html  # installFinish
    assert response["Content-Security-Policy"] == f"frame-ancestors {portal.url}"
    stored = Portal.objects.get(member_id=portal.member_id)
    assert stored.state == Portal.State.ACTIVE
    assert stored.domain == portal.domain
    assert stored.client_endpoint == portal.client_endpoint
    installer = Account.objects.get(portal=stored, user_id=1)
    assert installer.is_installer and installer.is_admin
    assert installer.display_name == "Anna Smirnova"
    assert installer.refresh_token and installer.access_token
    binding = portal.placement_binding("TASK_VIEW_TAB")
    assert binding.handler == "https://app.example.test/b24/app/"
    assert binding.lang_all["ru"]["TITLE"] == "Результаты"
    assert binding.lang_all["en"]["TITLE"] == "Results"
    bound = {(b.event, b.handler) for b in portal.event_bindings}
    assert ("ONAPPUNINSTALL", "https://app.example.test/b24/events/") in bound
    assert ("ONAPPUPDATE", "https://app.example.test/b24/events/") in bound


def test_install_wizard_repeated_is_harmless(client, portal):
    assert install(client, portal).status_code == 200
    assert install(client, portal).status_code == 200
    assert Portal.objects.count() == 1
    assert Account.objects.count() == 1
    assert len([b for b in portal.event_bindings if b.event == "ONAPPUNINSTALL"]) == 1
    assert len(portal.calls("placement.bind")) == 1


def test_install_wizard_reinstall_over_uninstalled_portal(client, portal):
    install(client, portal)
    Portal.objects.filter(member_id=portal.member_id).update(state=Portal.State.UNINSTALLED)
    assert install(client, portal).status_code == 200
    assert Portal.objects.get(member_id=portal.member_id).state == Portal.State.ACTIVE


@pytest.mark.parametrize(
    "forge",
    [
        lambda f, other: {**f, "AUTH_ID": "0" * 70},
        lambda f, other: {**f, "member_id": other.member_id},
        lambda f, other: {**f, "SERVER_ENDPOINT": "https://oauth.evil.example/rest/"},
        lambda f, other: {**f, "AUTH_ID": ""},
    ],
    ids=["bad-token", "other-portals-member-id", "untrusted-oauth-server", "no-token"],
)
def test_install_wizard_forged_post_changes_nothing(client, fake, portal, forge):
    other = fake.add_portal()
    url, fields = portal.install_post(1)
    response = post_frame(client, url, forge(fields, other))
    assert response.status_code in (400, 403)
    assert "could not be installed" in response.content.decode()
    assert "/static/portals/install." not in response.content.decode()
    assert Portal.objects.count() == 0 and Account.objects.count() == 0
    assert portal.placement_binding("TASK_VIEW_TAB") is None
    # The refusal shows inside the frame of the portal the POST names, and nowhere else.
    assert csp(response)["frame-ancestors"] == portal.url


def test_install_wizard_other_domain_in_query_is_refused(client, fake, portal):
    other = fake.add_portal()
    url, fields = portal.install_post(1)
    parts = urlsplit(url)
    query = urlencode({**dict(parse_qsl(parts.query)), "DOMAIN": other.domain})
    response = post_frame(client, f"{parts.path}?{query}", fields)
    assert response.status_code == 403
    assert Portal.objects.count() == 0


def test_install_wizard_by_non_admin_is_refused_with_a_clear_message(client, portal):
    response = install(client, portal, user_id=2)
    assert response.status_code == 403
    assert "Only a Bitrix24 administrator can install this app." in response.content.decode()
    assert Account.objects.count() == 0


@pytest.mark.parametrize("admin", ["N", "0", "Y", 1])
def test_install_wizard_counts_only_json_true_as_an_admin(client, portal, admin):
    """A portal may answer `ADMIN` as anything; a truthy string such as "N" is no admin."""
    portal.users[1].admin = admin
    response = install(client, portal)
    assert response.status_code == 403
    assert "Only a Bitrix24 administrator can install this app." in response.content.decode()
    assert Portal.objects.count() == 0 and Account.objects.count() == 0


def test_install_wizard_without_credentials_says_so(client, portal, settings):
    settings.B24_CLIENT_ID = ""
    response = install(client, portal)
    assert response.status_code == 503
    assert "B24_CLIENT_ID" in response.content.decode()
    assert Portal.objects.count() == 0


def test_install_wizard_bind_refused_shows_error_and_no_finish(client, portal):
    portal.fail_next(count=1, error="ERROR_WRONG_HANDLER_URL", method="placement.bind", status=400)
    response = install(client, portal)
    assert response.status_code == 400
    assert "/static/portals/install." not in response.content.decode()
    assert "ERROR_WRONG_HANDLER_URL" in response.content.decode()
