"""Lifecycle events (`POST /b24/events/`): verified, applied once, forged ones change nothing."""

import threading
from datetime import timedelta

import pytest
from django.db import connection
from django.test import Client
from django.utils import timezone

from b24app.portals import services
from b24app.portals.models import Account, EventReceipt, Portal
from b24app.portals.tasks import event_receipts_purge_task
from tests.support.portals import install, post_event, uninstall_body

pytestmark = pytest.mark.django_db


def _stored(portal) -> Portal:
    return Portal.objects.get(member_id=portal.member_id)


def _snapshot():
    return (
        list(Portal.objects.values()),
        list(Account.objects.values().order_by("pk")),
    )


def test_event_install_before_wizard_stores_application_token_and_installer(client, portal):
    response = post_event(client, portal.event_body("ONAPPINSTALL", user_id=1))
    assert response.status_code == 200
    assert response.json() == {"outcome": "onappinstall"}
    stored = _stored(portal)
    assert stored.state == Portal.State.ACTIVE
    assert stored.application_token_hash and portal.application_token not in str(stored.__dict__)
    installer = Account.objects.get(portal=stored, user_id=1)
    assert installer.is_installer and installer.has_tokens
    # The wizard afterwards completes the same portal.
    assert install(client, portal).status_code == 200
    assert Portal.objects.count() == 1 and Account.objects.count() == 1


def test_event_install_after_wizard_keeps_the_portal(client, portal):
    install(client, portal)
    version = Account.objects.get().token_version
    assert post_event(client, portal.event_body("ONAPPINSTALL", user_id=1)).status_code == 200
    account = Account.objects.get()
    assert account.token_version == version + 1
    assert _stored(portal).application_token_hash


def test_event_update_replaces_application_token(client, portal):
    post_event(client, portal.event_body("ONAPPINSTALL"))
    old_token = portal.application_token
    portal.application_token = "f" * 32  # what ONAPPUPDATE brings: a new application_token
    assert post_event(client, portal.event_body("ONAPPUPDATE")).status_code == 200
    forged = portal.event_body("ONAPPUNINSTALL", user_id=None, application_token=old_token)
    assert post_event(client, forged).status_code == 401
    assert _stored(portal).state == Portal.State.ACTIVE
    assert post_event(client, uninstall_body(portal)).status_code == 200


@pytest.mark.parametrize("clean", [0, 1])
def test_event_uninstall_wipes_tokens_and_honours_clean(client, portal, clean):
    install(client, portal)
    post_event(client, portal.event_body("ONAPPINSTALL"))
    body = uninstall_body(portal, clean)
    assert post_event(client, body).status_code == 200
    stored = _stored(portal)
    assert stored.state == Portal.State.UNINSTALLED
    assert stored.application_token_hash == ""
    if clean:
        assert Account.objects.count() == 0
    else:
        account = Account.objects.get()
        assert not account.has_tokens and account.access_token_encrypted == ""
        assert account.state == Account.State.BLOCKED


def test_event_reinstall_after_uninstall_is_active_again(client, portal):
    post_event(client, portal.event_body("ONAPPINSTALL"))
    post_event(client, uninstall_body(portal, 0))
    portal.application_token = "e" * 32
    assert post_event(client, portal.event_body("ONAPPINSTALL")).status_code == 200
    stored = _stored(portal)
    assert stored.state == Portal.State.ACTIVE
    assert Account.objects.get().has_tokens


@pytest.mark.parametrize(
    "make_body, status",
    [
        (
            lambda p, o: p.event_body("ONAPPUNINSTALL", user_id=None, application_token="0" * 32),
            401,
        ),
        (
            lambda p, o: p.event_body(
                "ONAPPUNINSTALL", user_id=None, extra_auth={"member_id": o.member_id}
            ),
            401,
        ),
        (lambda p, o: p.event_body("ONAPPINSTALL", extra_auth={"access_token": "x" * 32}), 401),
        (lambda p, o: p.event_body("ONAPPINSTALL", extra_auth={"member_id": o.member_id}), 401),
        (lambda p, o: p.event_body("ONAPPINSTALL", extra_auth={"domain": o.domain}), 401),
        (
            lambda p, o: p.event_body(
                "ONAPPINSTALL", extra_auth={"server_endpoint": "https://evil.example/rest/"}
            ),
            401,
        ),
        (lambda p, o: p.event_body("ONAPPINSTALL", extra_auth={"access_token": None}), 401),
        (lambda p, o: p.event_body("ONCRMDEALADD"), 400),
        (lambda p, o: [("event", "ONAPPINSTALL")], 400),
        (lambda p, o: [("auth[member_id]", p.member_id)], 400),
    ],
    ids=[
        "uninstall-wrong-token",
        "uninstall-other-portal",
        "install-bad-token",
        "install-other-member",
        "install-other-domain",
        "install-untrusted-server",
        "install-no-token",
        "unknown-event",
        "no-auth",
        "no-event",
    ],
)
def test_event_forged_is_refused_and_changes_nothing(
    client, fake, portal, make_body, status, caplog
):
    other = fake.add_portal()
    other.add_user(name="Olga", admin=True)
    post_event(client, portal.event_body("ONAPPINSTALL"))
    before = _snapshot()
    body = make_body(portal, other)
    response = post_event(client, body)
    assert response.status_code == status
    assert response.json()["error"]
    assert _snapshot() == before
    logged = caplog.text
    for key, value in body:
        if key.endswith(("access_token]", "refresh_token]", "application_token]")):
            assert value not in logged


def test_event_uninstall_for_unknown_portal_is_refused(client, portal):
    response = post_event(client, portal.event_body("ONAPPUNINSTALL", user_id=None))
    assert response.status_code == 401
    assert Portal.objects.count() == 0


def test_events_only_accept_post(client):
    assert client.get("/b24/events/").status_code == 405


def test_event_update_from_a_non_admin_is_refused(client, portal):
    """Every user who opens the app holds a token the OAuth server vouches for; only an admin
    installs or updates the app, so only an admin's event may replace the application_token."""
    post_event(client, portal.event_body("ONAPPINSTALL"))
    before = _snapshot()
    forged = portal.event_body("ONAPPUPDATE", user_id=2, application_token="c" * 32)
    response = post_event(client, forged)
    assert response.status_code == 401 and response.json()["error"] == "not_admin"
    assert _snapshot() == before
    assert post_event(client, uninstall_body(portal)).status_code == 200


def test_event_update_from_an_admin_answered_as_a_truthy_string_is_refused(client, portal):
    """`ADMIN` counts only as JSON `true`: a portal answering "N" (truthy!) has no admin."""
    post_event(client, portal.event_body("ONAPPINSTALL"))
    before = _snapshot()
    portal.users[1].admin = "N"
    forged = portal.event_body("ONAPPUPDATE", application_token="c" * 32)
    response = post_event(client, forged)
    assert response.status_code == 401 and response.json()["error"] == "not_admin"
    assert _snapshot() == before


def test_event_naming_another_user_is_refused(client, portal):
    """An admin's token cannot plant tokens on someone else's account."""
    body = portal.event_body("ONAPPINSTALL", user_id=1, extra_auth={"user_id": "2"})
    response = post_event(client, body)
    assert response.status_code == 401 and response.json()["error"] == "mismatch"
    assert Account.objects.count() == 0


def test_event_without_app_credentials_is_refused_not_crashed(client, portal, settings):
    settings.B24_CLIENT_ID = ""
    response = post_event(client, portal.event_body("ONAPPINSTALL"))
    assert response.status_code == 503
    assert Portal.objects.count() == 0


def test_event_uninstall_while_the_app_still_works_is_refused(client, fake, portal):
    """Any user of the portal can read APPLICATION_TOKEN from their frame POST; a genuine
    uninstall comes after Bitrix24 revoked our tokens, a forged one while they still work."""
    install(client, portal)
    before = _snapshot()
    forged = portal.event_body("ONAPPUNINSTALL", user_id=None, data={"CLEAN": 1})
    response = post_event(client, forged)
    assert response.status_code == 401 and response.json()["error"] == "app_still_installed"
    assert _snapshot() == before
    portal.expire_access_tokens()  # an hour later: the check refreshes, and that still works
    assert post_event(client, forged).status_code == 401
    assert Account.objects.get().state == Account.State.ACTIVE


# --- copies of an event (a retrying proxy, a replay): applied once ----------------------------


def test_event_redelivered_after_a_refresh_keeps_the_refreshed_tokens(client, fake, portal):
    """A late copy of ONAPPINSTALL carries tokens that were spent since: applying it again would
    put a dead refresh token back on the account."""
    body = portal.event_body("ONAPPINSTALL", user_id=1)
    assert post_event(client, body).json()["outcome"] == "onappinstall"
    account = Account.objects.get()
    refreshed = services.account_tokens_refresh(account_id=account.pk)
    assert refreshed.token_version == account.token_version + 1
    token_calls = fake.token_calls

    again = post_event(client, body)

    assert again.status_code == 200 and again.json()["outcome"] == "duplicate"
    account = Account.objects.get()
    assert account.token_version == refreshed.token_version
    assert account.refresh_token == refreshed.refresh_token
    assert fake.token_calls == token_calls  # nothing was asked of Bitrix24 for the copy


def test_event_uninstall_redelivered_after_clean_is_acknowledged(client, portal):
    install(client, portal)
    body = uninstall_body(portal, 1)
    assert post_event(client, body).json()["outcome"] == "uninstalled"
    again = post_event(client, body)
    assert again.status_code == 200 and again.json()["outcome"] == "duplicate"
    assert _stored(portal).state == Portal.State.UNINSTALLED


def test_event_with_new_tokens_is_not_taken_for_a_redelivery(client, portal):
    post_event(client, portal.event_body("ONAPPINSTALL", user_id=1))
    version = Account.objects.get().token_version
    response = post_event(client, portal.event_body("ONAPPUPDATE", user_id=1))
    assert response.json()["outcome"] == "onappupdate"
    assert Account.objects.get().token_version == version + 1


def test_event_receipts_are_purged_after_the_redelivery_window(client, portal):
    post_event(client, portal.event_body("ONAPPINSTALL", user_id=1))
    post_event(client, portal.event_body("ONAPPUPDATE", user_id=1))
    old = EventReceipt.objects.order_by("pk").first()
    EventReceipt.objects.filter(pk=old.pk).update(
        received_at=timezone.now() - timedelta(days=services.EVENT_RECEIPT_DAYS, minutes=1)
    )
    assert event_receipts_purge_task() == 1
    assert list(EventReceipt.objects.values_list("event", flat=True)) == ["ONAPPUPDATE"]
    assert EventReceipt.objects.get().member_id == portal.member_id


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_event_delivered_three_times_at_once_is_applied_once(portal):
    """Copies racing each other: the unique receipt lets exactly one of them apply."""
    body = portal.event_body("ONAPPINSTALL", user_id=1)
    barrier = threading.Barrier(3)
    answers: list[tuple[int, str]] = []

    def deliver() -> None:
        barrier.wait()
        response = post_event(Client(), body)
        answers.append((response.status_code, response.json().get("outcome", "")))
        connection.close()

    threads = [threading.Thread(target=deliver) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert sorted(answers) == [(200, "duplicate"), (200, "duplicate"), (200, "onappinstall")]
    assert Account.objects.get().token_version == 1
    assert EventReceipt.objects.count() == 1
