"""OAuth reconnect, the operator admin and the `b24` command: repair paths, no token shown."""

import re
from datetime import timedelta
from io import StringIO
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import requests
from cryptography.fernet import Fernet
from django.contrib.auth.models import Permission
from django.core import signing
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from b24app.portals import services
from b24app.portals.bitrix import TokenSet
from b24app.portals.models import Account, Portal
from b24app.portals.views import OAUTH_SESSION_KEY, OAUTH_STATE_SALT
from tests.support.portals import install, issued_tokens, kill_installer_tokens, post_frame

pytestmark = pytest.mark.django_db


@pytest.fixture
def blocked(client, fake, portal):
    """An installed portal whose installer's refresh token died."""
    assert install(client, portal).status_code == 200
    kill_installer_tokens(portal)
    assert Portal.objects.get().state == Portal.State.BLOCKED
    return Portal.objects.get()


def _start(client, member_id):
    """The operator confirms the reconnect: the POST of the form `GET /b24/oauth/start/` shows."""
    return client.post("/b24/oauth/start/", {"portal": member_id})


def test_oauth_reconnect_restores_a_blocked_portal(admin_client, fake, portal, blocked):
    start = _start(admin_client, blocked.member_id)
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
    start = _start(admin_client, member_id)
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
    start = _start(admin_client, blocked.member_id)
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
    assert blocked.app_status_label and str(blocked.app_status_label) in text  # a word, not F
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


def _accounts_of_five(portal) -> list[Account]:
    """The installer and four more users of the portal, in id order."""
    install(Client(), portal)
    stored = Portal.objects.get()
    for user_id in range(2, 6):
        services.account_tokens_store(
            portal=stored,
            user_id=user_id,
            tokens=TokenSet(
                access_token=f"access-{user_id}",
                refresh_token=f"refresh-{user_id}",
                expires_at=timezone.now() + timedelta(hours=1),
                scope="task",
                member_id=stored.member_id,
                user_id=user_id,
            ),
        )
    return list(Account.objects.order_by("pk"))


def test_reencrypt_goes_through_every_account_batch_by_batch(portal, settings):
    accounts = _accounts_of_five(portal)
    before = {a.pk: (a.access_token, a.refresh_token) for a in accounts}
    new_key = Fernet.generate_key().decode()
    settings.B24_TOKEN_KEYS = [new_key, *settings.B24_TOKEN_KEYS]

    with CaptureQueriesContext(connection) as queries:
        assert services.accounts_reencrypt(batch=2) == 5

    # Batches of 2, 2 and 1 accounts, and the read that finds none left.
    assert sum("LIMIT 2" in query["sql"] for query in queries) == 4
    settings.B24_TOKEN_KEYS = [new_key]
    after = {a.pk: (a.access_token, a.refresh_token) for a in Account.objects.all()}
    assert after == before


def test_reencrypt_stops_at_the_batch_with_a_token_no_key_reads(portal, settings):
    accounts = _accounts_of_five(portal)
    foreign = Fernet(Fernet.generate_key()).encrypt(b"someone else's").decode()
    Account.objects.filter(pk=accounts[2].pk).update(access_token_encrypted=foreign)
    stored = dict(Account.objects.values_list("pk", "refresh_token_encrypted"))
    new_key = Fernet.generate_key().decode()
    settings.B24_TOKEN_KEYS = [new_key, *settings.B24_TOKEN_KEYS]

    with pytest.raises(services.ReencryptStopped) as stopped:
        services.accounts_reencrypt(batch=2)

    assert stopped.value.done == 2
    settings.B24_TOKEN_KEYS = [new_key]
    for account in Account.objects.filter(pk__in=[a.pk for a in accounts[:2]]):
        assert account.refresh_token  # the first batch: readable under the new key alone
    later = Account.objects.filter(pk__in=[a.pk for a in accounts[2:]])
    assert {a.pk: a.refresh_token_encrypted for a in later} == {a.pk: stored[a.pk] for a in later}


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


# --- the reconnect cannot be driven from another site, needs the change permission, and makes
# --- only a portal admin the connection; an operator's block stays until an operator lifts it


def _operator(django_user_model, username, *codenames, client=None):
    """A logged-in staff user holding only the given `portals` permissions."""
    user = django_user_model.objects.create_user(
        username, f"{username}@example.com", "pw-operator-123", is_staff=True
    )
    user.user_permissions.set(
        Permission.objects.filter(content_type__app_label="portals", codename__in=codenames)
    )
    client = client or Client()
    client.force_login(user)
    return client


def _authorization_code_calls(fake) -> list:
    return [c for c in fake.token_calls if c["grant_type"] == "authorization_code"]


def _through_bitrix24(start) -> str:
    """The operator's browser at the portal: the path and query Bitrix24 sends it back to."""
    answer = requests.get(start["Location"], allow_redirects=False, timeout=5)
    assert answer.status_code == 302, answer.text[:300]
    callback = urlsplit(answer.headers["Location"])
    return f"{callback.path}?{callback.query}"


def test_oauth_start_by_get_only_shows_a_confirmation_and_changes_nothing(
    admin_client, fake, portal, blocked
):
    token_calls = len(fake.token_calls)
    # What a cross-site <img src> or link makes an operator's browser do: a GET, cookies and all.
    page = admin_client.get(f"/b24/oauth/start/?portal={blocked.member_id}")

    assert page.status_code == 200
    html = page.content.decode()
    assert 'id="site-name"' in html  # the admin's own look (admin/base_site.html)
    assert '<form method="post" action="/b24/oauth/start/">' in html
    assert 'name="csrfmiddlewaretoken"' in html
    assert f'name="portal" value="{blocked.member_id}"' in html and blocked.domain in html
    assert "Bitrix24 administrator" in html
    assert page["X-Frame-Options"] == "DENY"
    assert OAUTH_SESSION_KEY not in admin_client.session  # no flow was started
    assert not [r for r in portal.requests if r["method_name"] == "oauth.authorize"]
    assert len(fake.token_calls) == token_calls
    assert Portal.objects.get().state == Portal.State.BLOCKED


def test_oauth_start_post_needs_the_pages_csrf_token(django_user_model, fake, portal, blocked):
    # A cross-site form POST carries the operator's session cookie but not the CSRF token.
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(
        django_user_model.objects.create_superuser("ops", "ops@example.com", "pw-ops-12345")
    )
    forged = browser.post("/b24/oauth/start/", {"portal": blocked.member_id})
    assert forged.status_code == 403
    assert OAUTH_SESSION_KEY not in browser.session

    page = browser.get(f"/b24/oauth/start/?portal={blocked.member_id}").content.decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
    started = browser.post(
        "/b24/oauth/start/", {"portal": blocked.member_id, "csrfmiddlewaretoken": token}
    )
    assert started.status_code == 302
    assert started["Location"].startswith(portal.url + "/oauth/authorize/?")
    assert browser.session[OAUTH_SESSION_KEY]


def test_oauth_reconnect_needs_the_change_permission(django_user_model, fake, portal, blocked):
    viewer = _operator(django_user_model, "viewer", "view_portal")
    assert viewer.get(f"/b24/oauth/start/?portal={blocked.member_id}").status_code == 403
    assert _start(viewer, blocked.member_id).status_code == 403
    assert OAUTH_SESSION_KEY not in viewer.session

    # Even holding a state bound to its own session and Bitrix24's genuine code, the callback
    # refuses a viewer before the code is spent.
    session = viewer.session
    session[OAUTH_SESSION_KEY] = "nonce-of-this-session"
    session.save()
    state = signing.dumps(
        {"m": blocked.member_id, "n": "nonce-of-this-session"}, salt=OAUTH_STATE_SALT
    )
    query = urlencode({"client_id": fake.client_id, "state": state})
    answer = requests.get(
        f"{portal.url}/oauth/authorize/?{query}", allow_redirects=False, timeout=5
    )
    callback = urlsplit(answer.headers["Location"])
    refused = viewer.get(f"{callback.path}?{callback.query}")

    assert refused.status_code == 403
    assert Portal.objects.get().state == Portal.State.BLOCKED
    assert not _authorization_code_calls(fake)

    # The change permission (no superuser) is enough for the whole flow.
    editor = _operator(django_user_model, "editor", "view_portal", "change_portal")
    assert editor.get(f"/b24/oauth/start/?portal={blocked.member_id}").status_code == 200
    done = editor.get(_through_bitrix24(_start(editor, blocked.member_id)))
    assert done.status_code == 302
    assert Portal.objects.get().state == Portal.State.ACTIVE


def test_oauth_state_is_good_only_in_the_session_that_started_it(admin_user, fake, portal, blocked):
    started_here, elsewhere = Client(), Client()
    started_here.force_login(admin_user)
    elsewhere.force_login(admin_user)  # the same operator, in another browser
    callback = _through_bitrix24(_start(started_here, blocked.member_id))

    assert elsewhere.get(callback).status_code == 400
    assert Portal.objects.get().state == Portal.State.BLOCKED
    assert not _authorization_code_calls(fake)

    assert started_here.get(callback).status_code == 302
    assert Portal.objects.get().state == Portal.State.ACTIVE


def test_oauth_reconnect_by_a_non_admin_is_refused_and_stores_nothing(
    admin_client, client, fake, portal, blocked
):
    post_frame(client, *portal.frame_post(2))  # Boris (no admin) has opened the app
    before = list(Account.objects.order_by("pk").values())
    portal_before = Portal.objects.values().get()
    fake.authorize_as_user = 2  # Boris is the one logged in to Bitrix24 when it asks

    done = admin_client.get(_through_bitrix24(_start(admin_client, blocked.member_id)))

    assert done.status_code == 302
    shown = admin_client.get(done["Location"]).content.decode()
    assert "Only a Bitrix24 administrator of this portal can reconnect it" in shown
    assert [c["ok"] for c in _authorization_code_calls(fake)] == [True]  # the code was good
    assert list(Account.objects.order_by("pk").values()) == before
    assert Portal.objects.values().get() == portal_before
    assert not Account.objects.get(user_id=2).is_installer


def test_oauth_reconnect_keeps_an_operators_block(admin_client, client, fake, portal):
    install(client, portal)
    stored = Portal.objects.get()
    url = "/admin/portals/portal/"
    admin_client.post(url, {"action": "block", "_selected_action": [stored.pk]})
    blocked_reason = Portal.objects.get().state_reason
    assert "confirmation" not in blocked_reason
    page = admin_client.get(f"/b24/oauth/start/?portal={stored.member_id}").content.decode()
    assert "blocked by an operator" in page
    version = Account.objects.get(user_id=1).token_version

    done = admin_client.get(_through_bitrix24(_start(admin_client, stored.member_id)))

    stored = Portal.objects.get()
    assert stored.state == Portal.State.BLOCKED and stored.blocked_by_operator
    assert stored.state_reason == blocked_reason
    assert Account.objects.get(user_id=1).token_version == version + 1  # the tokens are stored
    shown = admin_client.get(done["Location"]).content.decode()
    assert "stays blocked by its operator" in shown
    refused = post_frame(client, *portal.frame_post(1, placement="DEFAULT"))
    assert refused.status_code == 403 and 'data-screen="refused"' in refused.content.decode()

    # Only the operator's explicit Unblock lifts it.
    admin_client.post(url, {"action": "unblock", "_selected_action": [stored.pk]})
    stored = Portal.objects.get()
    assert stored.state == Portal.State.ACTIVE and not stored.blocked_by_operator
    assert stored.state_reason == "unblocked by operator admin"
    assert post_frame(client, *portal.frame_post(1, placement="DEFAULT")).status_code == 200


def test_admin_unblock_with_the_installers_tokens_dead_leaves_it_blocked_by_token(
    admin_client, client, fake, portal
):
    install(client, portal)
    stored = Portal.objects.get()
    url = "/admin/portals/portal/"
    admin_client.post(url, {"action": "block", "_selected_action": [stored.pk]})
    kill_installer_tokens(portal)

    admin_client.post(url, {"action": "unblock", "_selected_action": [stored.pk]})

    stored = Portal.objects.get()
    assert stored.state == Portal.State.BLOCKED and not stored.blocked_by_operator
    assert "installer's tokens do not work" in stored.state_reason
    # The installer opening the app repairs it, as for any dead installer token.
    assert post_frame(client, *portal.frame_post(1, placement="DEFAULT")).status_code == 200
    assert Portal.objects.get().state == Portal.State.ACTIVE


# --- admin actions need the change permission --------------------------------------------------

WRITE_ACTIONS = (
    "verify_connection",
    "check_bindings",
    "refresh_tokens_now",
    "block",
    "unblock",
    "reconnect_via_oauth",
)


def _what_an_action_touches(fake, portal):
    """The rows an action could write and the requests it could send to Bitrix24."""
    return (
        Portal.objects.values().get(),
        list(Account.objects.order_by("pk").values()),
        len(portal.requests),
        len(fake.requests),
    )


@pytest.mark.parametrize("action", WRITE_ACTIONS)
def test_admin_write_actions_need_the_change_permission(
    django_user_model, client, fake, portal, action
):
    install(client, portal)
    stored = Portal.objects.get()
    if action == "unblock":
        services.portal_block(portal_id=stored.pk, reason="blocked by operator someone")
    url = "/admin/portals/portal/"
    viewer = _operator(django_user_model, "viewer", "view_portal", "view_account")

    listing = viewer.get(url).content.decode()
    assert stored.domain in listing
    assert 'name="action"' not in listing  # no action to choose from, none of these
    assert f'value="{action}"' not in listing
    change = viewer.get(f"{url}{stored.pk}/change/").content.decode()
    assert stored.domain in change and 'name="_save"' not in change
    before = _what_an_action_touches(fake, portal)

    refused = viewer.post(url, {"action": action, "_selected_action": [stored.pk]})

    assert "/b24/oauth/" not in refused.get("Location", "")
    assert _what_an_action_touches(fake, portal) == before

    editor = _operator(django_user_model, "editor", "view_portal", "change_portal")
    assert f'value="{action}"' in editor.get(url).content.decode()
    done = editor.post(url, {"action": action, "_selected_action": [stored.pk]})
    assert (
        done.get("Location", "").startswith("/b24/oauth/start/")
        or _what_an_action_touches(fake, portal) != before
    )


# --- tenants never read operators' names or internal detail ------------------------------------


def _panel(client, portal, user_id: int, lang: str = "en") -> str:
    """The connection panel a portal admin sees on the app's own page (DEFAULT placement)."""
    response = post_frame(client, *portal.frame_post(user_id, placement="DEFAULT", lang=lang))
    assert response.status_code == 200, response.content.decode()[:1000]
    html = response.content.decode()
    match = re.search(r'<section class="panel connection".*?</section>', html, re.S)
    assert match, html[:2000]
    return match.group(0)


def _panel_state(panel: str) -> str:
    return re.search(r"<dd data-portal-state>(.*?)</dd>", panel, re.S).group(1).strip()


def test_connection_panel_names_no_operator_after_a_reconnect(
    client, django_user_model, fake, portal, blocked
):
    operator = Client()
    operator.force_login(
        django_user_model.objects.create_superuser("ops.jsmith", "j@example.com", "pw-ops-123")
    )
    assert operator.get(_through_bitrix24(_start(operator, blocked.member_id))).status_code == 302
    stored = Portal.objects.get()
    assert stored.state_reason == "reconnected via OAuth by ops.jsmith"
    assert (
        "ops.jsmith" in operator.get(f"/admin/portals/portal/{stored.pk}/change/").content.decode()
    )

    english, russian = _panel(client, portal, 1), _panel(client, portal, 1, lang="ru")

    assert _panel_state(english) == "Active"
    assert _panel_state(russian) == "Работает"
    for panel in (english, russian):
        assert "ops.jsmith" not in panel and "reconnected" not in panel


def test_connection_panel_of_a_blocked_portal_gives_a_neutral_reason(client, fake, portal, blocked):
    carl = portal.add_user(name="Carl", last_name="Weber", admin=True)  # not the installer
    internal = Portal.objects.get().state_reason
    assert "invalid_grant" in internal

    english, russian = _panel(client, portal, carl), _panel(client, portal, carl, lang="ru")

    assert _panel_state(english) == (
        "Blocked — Waiting for the administrator who installed the app to open it again."
    )
    assert _panel_state(russian) == (
        "Заблокировано — Ожидает, когда администратор, установивший приложение, снова его откроет."
    )
    for panel in (english, russian):
        assert "invalid_grant" not in panel and internal not in panel
