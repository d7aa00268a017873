"""Who may witness an uninstall, which tokens the app keeps, and where a redirect may lead.

A plain user of a portal reads `APPLICATION_TOKEN` from any frame POST and can post any
`REFRESH_ID` beside their genuine `AUTH_ID`; a tenant may run its own portal and answer
anything. None of that may remove a portal, delete its data, or repoint it.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from b24app.portals import services
from b24app.portals.bitrix import BitrixError
from b24app.portals.models import Account, Portal
from results.models import ResultChange
from tests.support.factories import PortalFactory
from tests.support.portals import kill_installer_tokens, post_event, post_frame
from tests.support.results import add, frame_token, installed_task

pytestmark = pytest.mark.django_db

ANNA, BORIS = 1, 2  # the portal fixture's admin and plain user


def _open(client, portal, user_id: int, task: int, **fields):
    url, posted = portal.frame_post(user_id, options={"taskId": str(task)})
    posted.update(fields)
    return post_frame(client, url, posted), posted


def _forged_uninstall(portal, clean: int = 1):
    """What the plain user posts: the real APPLICATION_TOKEN, no revocation at Bitrix24."""
    return portal.event_body("ONAPPUNINSTALL", user_id=None, data={"CLEAN": clean})


@pytest.fixture
def task(client, portal):
    return installed_task(
        client, portal, user_id=ANNA, title="Quarterly report", results=["Figures checked"]
    )


def test_forged_uninstall_by_a_plain_user_with_a_garbage_refresh_id_deletes_nothing(
    client, admin_client, portal, task
):
    """The attack: the installer's tokens are dead and no other admin is active; a plain user
    opens the app with a garbage REFRESH_ID, waits for their access token to expire and posts
    ONAPPUNINSTALL with CLEAN=1."""
    response, _ = _open(client, portal, BORIS, task, REFRESH_ID="garbage" * 5)
    assert add(client, frame_token(response), task, "Boris's result").status_code == 200
    kill_installer_tokens(portal)
    portal.expire_access_tokens()
    Account.objects.update(expires_at=timezone.now() - timedelta(minutes=1))
    accounts, changes = Account.objects.count(), ResultChange.objects.count()
    assert accounts == 2 and changes == 1

    answer = post_event(client, _forged_uninstall(portal))

    assert answer.status_code == 202 and answer.json()["outcome"] == "uninstall_unconfirmed"
    stored = Portal.objects.get()
    assert stored.state != Portal.State.UNINSTALLED
    assert stored.uninstall_reported_at is not None
    assert "not confirmed" in stored.uninstall_report and "CLEAN" in stored.uninstall_report
    assert Account.objects.count() == accounts and ResultChange.objects.count() == changes
    assert stored.application_token_hash  # genuine frame opens still pass the cheap check
    # The operator sees it: the portal list filters on it, the portal's page says it.
    listed = admin_client.get("/admin/portals/portal/?uninstall_reported_at__isempty=0")
    assert stored.domain in listed.content.decode()
    page = admin_client.get(f"/admin/portals/portal/{stored.pk}/change/").content.decode()
    assert "not confirmed" in page
    # The next genuine visit works, and its working token clears the report.
    assert _open(client, portal, BORIS, task)[0].status_code == 200
    stored.refresh_from_db()
    assert stored.uninstall_reported_at is None and stored.uninstall_report == ""


def test_uninstall_is_confirmed_by_an_admin_token_refused_before_its_expiry(client, portal, task):
    """Bitrix24 revokes every token before it sends ONAPPUNINSTALL: the installer's access
    token, an hour from expiry, is refused outright (invalid_token)."""
    portal._revoke_all_tokens()

    answer = post_event(client, _forged_uninstall(portal))

    assert answer.status_code == 200 and answer.json()["outcome"] == "uninstalled"
    assert Portal.objects.get().state == Portal.State.UNINSTALLED
    assert Account.objects.count() == 0


def test_a_refused_refresh_token_from_a_frame_proves_no_uninstall(client, portal, task):
    """An admin who is not the installer opened the app: their REFRESH_ID came from a frame,
    where anyone can post anything, so its refusal is no witness; the installer is blocked."""
    portal.add_user(name="Vera", last_name="Admin", admin=True)  # user 3
    _open(client, portal, 3, task)
    kill_installer_tokens(portal)
    portal.expire_access_tokens()
    portal.revoke_refresh_tokens()
    Account.objects.update(expires_at=timezone.now() - timedelta(minutes=1))

    answer = post_event(client, _forged_uninstall(portal))

    assert answer.json()["outcome"] == "uninstall_unconfirmed"
    assert Account.objects.count() == 2
    vera = Account.objects.get(user_id=3)
    # Her refresh token was refused: she waits for her next visit, nothing is blocked for it.
    assert vera.state == Account.State.WAITING


def test_a_plain_users_working_token_proves_the_app_installed(client, portal, task):
    """Every admin token is dead, but a plain user's access token still works: forged."""
    _open(client, portal, BORIS, task)
    kill_installer_tokens(portal)
    portal.issue_tokens(BORIS)  # Boris's stored access token is still alive at Bitrix24
    with portal.lock:
        for token in portal.fake.access_tokens.values():
            if token.user_id == BORIS:
                token.expires_at = portal.fake.now() + 3600
    Account.objects.filter(user_id=BORIS).update(expires_at=timezone.now() + timedelta(hours=1))

    answer = post_event(client, _forged_uninstall(portal))

    assert answer.status_code == 401 and answer.json()["error"] == "app_still_installed"
    assert Portal.objects.get().uninstall_reported_at is None


def test_a_portal_wrongly_taken_for_uninstalled_comes_back_when_app_info_vouches(
    client, portal, task
):
    Portal.objects.update(state=Portal.State.UNINSTALLED)

    response, _ = _open(client, portal, BORIS, task)

    assert response.status_code == 200
    assert Portal.objects.get().state == Portal.State.ACTIVE


def test_a_frame_refresh_id_never_replaces_one_the_oauth_server_issued(client, portal, task):
    anna = Account.objects.get(user_id=ANNA)
    assert not anna.refresh_from_frame  # the wizard's: the installer was verified
    proven = services.account_tokens_refresh(account_id=anna.pk).refresh_token
    Account.objects.filter(pk=anna.pk).update(expires_at=timezone.now() + timedelta(minutes=1))

    response, posted = _open(client, portal, ANNA, task, REFRESH_ID="garbage" * 5)

    assert response.status_code == 200
    anna.refresh_from_db()
    assert anna.access_token == posted["AUTH_ID"]  # vouched for by app.info, so kept
    assert anna.refresh_token == proven and not anna.refresh_from_frame


def test_a_new_users_frame_refresh_id_is_kept_but_marked_unproven(client, portal, task):
    _open(client, portal, BORIS, task, REFRESH_ID="garbage" * 5)
    boris = Account.objects.get(user_id=BORIS)
    assert boris.refresh_from_frame

    with pytest.raises(services.AccountAwaitingSignIn):
        services.account_tokens_refresh(account_id=boris.pk)
    boris.refresh_from_db()
    assert boris.state == Account.State.WAITING  # not blocked: nothing is known against it


def test_another_apps_token_never_becomes_an_accounts_token(client, portal, task):
    """`profile` answers for a token of any app on the portal; the cheap path (APPLICATION_TOKEN
    matches) skips app.info, so the token is stored only after app.info vouched for it."""
    _open(client, portal, BORIS, task)
    Account.objects.filter(user_id=BORIS).update(expires_at=timezone.now() + timedelta(minutes=1))
    before = Account.objects.get(user_id=BORIS)
    foreign = portal.other_app_access_token(BORIS)

    response, _ = _open(client, portal, BORIS, task, AUTH_ID=foreign)

    assert response.status_code == 403
    after = Account.objects.get(user_id=BORIS)
    assert after.access_token == before.access_token != foreign
    assert after.token_version == before.token_version


def test_a_live_account_keeps_its_tokens_whatever_token_the_frame_brings(client, portal, task):
    _open(client, portal, BORIS, task)
    before = Account.objects.get(user_id=BORIS)
    foreign = portal.other_app_access_token(BORIS)

    response, _ = _open(client, portal, BORIS, task, AUTH_ID=foreign)

    assert response.status_code == 200  # Boris is who profile says; his stored token acts
    after = Account.objects.get(user_id=BORIS)
    assert after.access_token == before.access_token != foreign


# --- a portal that answers with a redirect -----------------------------------------------------


def _installer_client():
    account = Account.objects.select_related("portal").get(user_id=ANNA)
    return services.account_client(account)


def test_a_redirect_to_another_tenant_is_followed_once_and_never_stored(client, fake, portal, task):
    other = fake.add_portal()
    home = (Portal.objects.get().domain, Portal.objects.get().client_endpoint)
    portal.redirect_to(other.url)

    with pytest.raises(BitrixError):
        _installer_client().call("profile")  # the other portal does not know the token

    assert (Portal.objects.get().domain, Portal.objects.get().client_endpoint) == home
    assert other.calls("profile")  # followed for the one call


def test_a_redirect_app_info_does_not_confirm_is_not_stored(client, portal, task):
    home = (Portal.objects.get().domain, Portal.objects.get().client_endpoint)
    portal.redirect_to(portal.alias())

    assert _installer_client().call("profile")["ID"] == str(ANNA)  # the mirror answered

    assert (Portal.objects.get().domain, Portal.objects.get().client_endpoint) == home


def test_a_vouched_move_to_a_domain_another_portal_holds_is_not_stored(client, fake, portal, task):
    other = PortalFactory(
        member_id="b" * 32, domain="", client_endpoint="", oauth_server=fake.oauth_url
    )
    new_domain = portal.change_domain()
    Portal.objects.filter(pk=other.pk).update(
        domain=new_domain, client_endpoint=f"http://{new_domain}/rest/"
    )
    home = Portal.objects.get(member_id=portal.member_id).domain

    assert _installer_client().call("profile")["ID"] == str(ANNA)

    assert Portal.objects.get(member_id=portal.member_id).domain == home != new_domain
