"""OAuth reconnect, the operator admin and the `b24` command: repair paths, no token shown."""

from io import StringIO
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from cryptography.fernet import Fernet
from django.core.management import call_command
from django.core.management.base import CommandError

from b24app.portals import services
from b24app.portals.models import Account, Portal
from tests.portals.support import install, issued_tokens, kill_installer_tokens

pytestmark = pytest.mark.django_db


@pytest.fixture
def blocked(client, fake, portal):
    """An installed portal whose installer's refresh token died."""
    assert install(client, portal).status_code == 200
    kill_installer_tokens(portal)
    assert Portal.objects.get().state == Portal.State.BLOCKED
    return Portal.objects.get()


def test_oauth_reconnect_restores_a_blocked_portal(admin_client, fake, portal, blocked):
    start = admin_client.get(f"/b24/oauth/start/?portal={blocked.member_id}")
    assert start.status_code == 302
    authorize = start["Location"]
    assert authorize.startswith(portal.url + "/oauth/authorize/?")
    query = parse_qs(urlsplit(authorize).query)
    assert query["client_id"] == [fake.client_id] and "redirect_uri" not in query

    # The operator's browser at the portal: Bitrix24 redirects to our callback with a code.
    answer = requests.get(authorize, allow_redirects=False, timeout=5)
    assert answer.status_code == 302
    callback = urlsplit(answer.headers["Location"])
    assert callback.path == "/b24/oauth/callback/"
    done = admin_client.get(f"{callback.path}?{callback.query}")

    assert done.status_code == 302
    stored = Portal.objects.get()
    assert stored.state == Portal.State.ACTIVE and "reconnected via OAuth" in stored.state_reason
    account = Account.objects.get(user_id=1)
    assert account.state == Account.State.ACTIVE
    assert services.account_client(account).call("profile")["ID"] == "1"
    assert [c for c in fake.token_calls if c["grant_type"] == "authorization_code"][0]["ok"]


def _reconnect(admin_client, member_id):
    """The operator's reconnect, start to callback; returns the callback's response."""
    start = admin_client.get(f"/b24/oauth/start/?portal={member_id}")
    answer = requests.get(start["Location"], allow_redirects=False, timeout=5)
    callback = urlsplit(answer.headers["Location"])
    return admin_client.get(f"{callback.path}?{callback.query}")


def _code_calls(fake, since):
    return [
        (call["http_method"], call["grant_type"], call["ok"]) for call in fake.token_calls[since:]
    ]


@pytest.mark.parametrize(
    ("params", "missing", "first"),
    [
        pytest.param("both", "invalid_request", ["POST"], id="both"),
        pytest.param("body", "invalid_request", ["POST"], id="body"),
        pytest.param("query", "invalid_request", ["POST", "GET"], id="query"),
        pytest.param("get_only", "invalid_request", ["POST", "GET"], id="get_only-405"),
        pytest.param("query", "wrong_client", ["POST", "GET"], id="query-wrong_client"),
    ],
)
def test_oauth_reconnect_works_however_the_oauth_server_reads_the_code(
    admin_client, fake, portal, blocked, params, missing, first
):
    fake.token_params = params
    fake.missing_client_id_error = missing
    since = len(fake.token_calls)
    assert _reconnect(admin_client, blocked.member_id).status_code == 302
    assert Portal.objects.get().state == Portal.State.ACTIVE
    assert [method for method, _, _ in _code_calls(fake, since)] == first
    assert services.oauth_server().token_method(fake.server_endpoint) == first[-1].lower()

    assert _reconnect(admin_client, blocked.member_id).status_code == 302
    calls = _code_calls(fake, since)
    assert [method for method, _, _ in calls] == [*first, first[-1]]  # straight to what worked
    # Each code was read once, and redeemed: none was presented twice (that is invalid_grant).
    assert [(grant, ok) for _, grant, ok in calls if grant] == [("authorization_code", True)] * 2


@pytest.mark.parametrize("fault", ["invalid_grant", "500", "timeout", "drop"])
def test_oauth_reconnect_is_not_sent_by_get_after_an_answer_that_proves_nothing(
    admin_client, fake, portal, blocked, settings, fault
):
    settings.B24_HTTP_READ_TIMEOUT = 0.5
    fake.timeout_delay_s = 2.0
    fake.token_params = "query"  # a GET would succeed: it must not be sent
    fake.fail_token_next(error=fault)
    since = len(fake.token_calls)
    _reconnect(admin_client, blocked.member_id)
    assert [method for method, _, _ in _code_calls(fake, since)] == ["POST"]
    assert Portal.objects.get().state == Portal.State.BLOCKED


def test_oauth_callback_with_forged_state_changes_nothing(admin_client, blocked):
    response = admin_client.get("/b24/oauth/callback/?code=abc&state=forged")
    assert response.status_code == 400
    assert Portal.objects.get().state == Portal.State.BLOCKED


def test_oauth_callback_from_another_browser_is_refused(
    admin_client, client, django_user_model, blocked
):
    start = admin_client.get(f"/b24/oauth/start/?portal={blocked.member_id}")
    state = parse_qs(urlsplit(start["Location"]).query)["state"][0]
    other = django_user_model.objects.create_superuser("other", "o@example.com", "pw-other-123")
    client.force_login(other)
    response = client.get(f"/b24/oauth/callback/?code=abc&state={state}")
    assert response.status_code == 400
    assert Portal.objects.get().state == Portal.State.BLOCKED


def test_oauth_start_is_operator_only(client, blocked):
    response = client.get(f"/b24/oauth/start/?portal={blocked.member_id}")
    assert response.status_code == 302 and "/admin/login/" in response["Location"]


def test_admin_shows_state_reason_and_error_but_never_a_token(admin_client, fake, portal, blocked):
    changelist = admin_client.get("/admin/portals/portal/")
    change = admin_client.get(f"/admin/portals/portal/{blocked.pk}/change/")
    for response in (changelist, change):
        assert response.status_code == 200
        html = response.content.decode()
        assert blocked.domain in html and "invalid_grant" in html
        for token in issued_tokens(fake, portal):
            assert token not in html
    assert "Blocked" in changelist.content.decode()


def test_admin_filters_and_searches(admin_client, fake, portal, blocked):
    assert (
        blocked.domain
        in admin_client.get("/admin/portals/portal/?state__exact=blocked").content.decode()
    )
    assert (
        blocked.domain
        not in admin_client.get("/admin/portals/portal/?state__exact=active").content.decode()
    )
    assert (
        blocked.domain
        in admin_client.get(f"/admin/portals/portal/?q={blocked.member_id}").content.decode()
    )


def test_admin_actions_verify_refresh_and_block(admin_client, fake, client, portal):
    assert install(client, portal).status_code == 200
    stored = Portal.objects.get()
    url = "/admin/portals/portal/"
    verify = admin_client.post(
        url, {"action": "verify_connection", "_selected_action": [stored.pk]}, follow=True
    )
    assert (
        "connected, app installed" in verify.content.decode()
        or "connected" in verify.content.decode()
    )
    version = Account.objects.get().token_version
    admin_client.post(url, {"action": "refresh_tokens_now", "_selected_action": [stored.pk]})
    assert Account.objects.get().token_version == version + 1
    assert len([c for c in fake.token_calls if c["grant_type"] == "refresh_token"]) == 1
    admin_client.post(url, {"action": "block", "_selected_action": [stored.pk]})
    assert Portal.objects.get().state == Portal.State.BLOCKED
    reconnect = admin_client.post(
        url, {"action": "reconnect_via_oauth", "_selected_action": [stored.pk]}
    )
    assert reconnect.status_code == 302
    assert reconnect["Location"] == f"/b24/oauth/start/?portal={stored.member_id}"


def test_admin_check_bindings_action_binds_again_and_the_list_shows_the_state(
    admin_client, client, portal
):
    assert install(client, portal).status_code == 200
    stored = Portal.objects.get()
    with portal.lock:
        portal.event_bindings.clear()
    url = "/admin/portals/portal/"

    page = admin_client.post(
        url, {"action": "check_bindings", "_selected_action": [stored.pk]}, follow=True
    ).content.decode()

    assert "Bound again: ONAPPUNINSTALL, ONAPPUPDATE" in page
    assert {b.event for b in portal.event_bindings} == {"ONAPPUNINSTALL", "ONAPPUPDATE"}
    listing = admin_client.get(url).content.decode()
    assert '<td class="field-bindings">Bound again</td>' in listing
    missing = admin_client.get(url + "?bindings__exact=missing").content.decode()
    assert stored.domain not in missing


def test_command_portals_lists_connections(client, fake, portal, blocked):
    out = StringIO()
    call_command("b24", "portals", stdout=out)
    text = out.getvalue()
    assert blocked.domain in text and blocked.member_id in text and "blocked" in text
    assert "invalid_grant" in text
    for token in issued_tokens(fake, portal):
        assert token not in text


def test_command_rotate_keys_reencrypts_under_the_new_key(client, portal, settings):
    install(client, portal)
    account = Account.objects.get()
    access, refresh = account.access_token, account.refresh_token
    new_key = Fernet.generate_key().decode()
    settings.B24_TOKEN_KEYS = [new_key, *settings.B24_TOKEN_KEYS]
    call_command("b24", "rotate-keys", stdout=StringIO())
    settings.B24_TOKEN_KEYS = [new_key]
    account = Account.objects.get()
    assert (account.access_token, account.refresh_token) == (access, refresh)


def test_command_rotate_keys_with_a_missing_key_changes_nothing(client, portal, settings):
    install(client, portal)
    before = Account.objects.values_list("access_token_encrypted", flat=True).get()
    settings.B24_TOKEN_KEYS = [Fernet.generate_key().decode()]
    with pytest.raises(CommandError):
        call_command("b24", "rotate-keys", stdout=StringIO())
    assert Account.objects.values_list("access_token_encrypted", flat=True).get() == before


def test_admin_refuses_a_malformed_rate_limit(admin_client, client, portal):
    install(client, portal)
    stored = Portal.objects.get()
    response = admin_client.post(
        f"/admin/portals/portal/{stored.pk}/change/",
        {
            "rate_limit": "fast",
            "accounts-TOTAL_FORMS": "1",
            "accounts-INITIAL_FORMS": "1",
            "accounts-MIN_NUM_FORMS": "0",
            "accounts-MAX_NUM_FORMS": "1000",
            "accounts-0-id": str(Account.objects.get().pk),
            "accounts-0-portal": str(stored.pk),
        },
    )
    assert response.status_code == 200
    assert "expected burst/per second" in response.content.decode()
    assert Portal.objects.get().rate_limit == ""


def test_operator_block_survives_the_installers_token_dying(admin_client, client, fake, portal):
    install(client, portal)
    stored = Portal.objects.get()
    admin_client.post(
        "/admin/portals/portal/", {"action": "block", "_selected_action": [stored.pk]}
    )
    kill_installer_tokens(portal)
    stored = Portal.objects.get()
    assert stored.state == Portal.State.BLOCKED and stored.blocked_by_operator
    assert "operator" in stored.state_reason
