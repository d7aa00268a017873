"""Trust boundaries and secrecy: where requests may go, and where tokens may never appear."""

import logging
from datetime import timedelta

import pytest
import responses
from django.utils import timezone

from b24app.portals import services
from b24app.portals.bitrix import TokenSet
from b24app.portals.models import Account, Portal
from b24app.portals.tasks import accounts_keepalive_task
from tests.support.portals import install, issued_tokens, post_event, uninstall_body

pytestmark = pytest.mark.django_db

PUBLIC_OAUTH = "https://oauth.bitrix.info"


@pytest.fixture
def public_settings(settings):
    settings.B24_ALLOW_PRIVATE_PORTALS = False
    settings.B24_OAUTH_SERVERS = (PUBLIC_OAUTH,)
    return settings


def _app_info(client_endpoint: str, domain: str) -> dict:
    return {
        "result": {
            "client_id": "app.fake0000000001.00000001",
            "scope": "task,placement",
            "install": {
                "installed": True,
                "status": "F",
                "domain": domain,
                "client_endpoint": client_endpoint,
                "member_id": "a223c6b3710f85df22e9377d6c4f7553",
            },
            "user_id": "1",
        }
    }


@pytest.mark.parametrize(
    "endpoint, domain",
    [
        ("https://127.0.0.1/rest/", "127.0.0.1"),
        ("https://10.1.2.3/rest/", "10.1.2.3"),
        ("https://169.254.169.254/rest/", "169.254.169.254"),
        ("http://portal.bitrix24.com/rest/", "portal.bitrix24.com"),
    ],
)
@responses.activate
def test_trust_private_or_plain_http_portal_is_refused_even_if_vouched(
    public_settings, endpoint, domain
):
    responses.post(f"{PUBLIC_OAUTH}/rest/app.info", json=_app_info(endpoint, domain))
    with pytest.raises(services.VerificationFailed) as refused:
        services.auth_verify(
            access_token="4991e866007",
            member_id="a223c6b3710f85df22e9377d6c4f7553",
            domain=domain,
            server_endpoint=f"{PUBLIC_OAUTH}/rest/",
        )
    assert refused.value.code == "unsafe_portal"
    assert len(responses.calls) == 1  # only the allow-listed OAuth server was asked


@pytest.mark.parametrize(
    "server_endpoint",
    [
        "https://oauth.bitrix.info.evil.example/rest/",
        "https://127.0.0.1/rest/",
        "http://oauth.bitrix.info/rest/",
        "https://user@oauth.bitrix.info/rest/",
    ],
)
@responses.activate
def test_trust_token_never_goes_to_a_server_off_the_allow_list(public_settings, server_endpoint):
    with pytest.raises(services.VerificationFailed) as refused:
        services.auth_verify(
            access_token="4991e866007",
            member_id="a223c6b3710f85df22e9377d6c4f7553",
            domain="portal.bitrix24.com",
            server_endpoint=server_endpoint,
        )
    assert refused.value.code == "untrusted_server"
    assert len(responses.calls) == 0


def test_trust_no_token_in_logs_or_urls_through_a_whole_lifecycle(
    client, admin_client, fake, portal, caplog
):
    caplog.set_level(logging.DEBUG)
    install(client, portal)
    post_event(client, portal.event_body("ONAPPINSTALL"))
    account = Account.objects.select_related("portal").get(user_id=1)
    portal.expire_access_tokens()
    services.account_client(account).call("profile")
    admin_client.get("/admin/portals/portal/")
    post_event(client, uninstall_body(portal))

    tokens = issued_tokens(fake, portal)
    assert len(tokens) >= 6
    logged = caplog.text
    urls = [
        r["path"] + "?" + "&".join(f"{k}={v}" for k, v in r["query"].items())
        for r in portal.requests
    ]
    urls += [
        r["path"] + "?" + "&".join(f"{k}={v}" for k, v in r["query"].items()) for r in fake.requests
    ]
    for token in tokens:
        assert token not in logged
        assert not [url for url in urls if token in url]
    assert fake.client_secret not in logged
    assert not [url for url in urls if fake.client_secret in url]


def test_trust_domain_change_updates_the_portal_and_repeats_the_call(client, portal):
    install(client, portal)
    old_domain = portal.domain
    new_domain = portal.change_domain()
    account = Account.objects.select_related("portal").get(user_id=1)
    assert services.account_client(account).call("profile")["ID"] == "1"
    stored = Portal.objects.get()
    assert stored.domain == new_domain != old_domain
    assert stored.client_endpoint == f"http://{new_domain}/rest/"
    assert stored.member_id == portal.member_id


def test_keepalive_refreshes_only_idle_accounts(client, fake, portal, celery_eager):
    install(client, portal)
    stored = Portal.objects.get()
    boris = services.account_tokens_store(
        portal=stored, user_id=2, tokens=TokenSet.from_response(portal.issue_tokens(2))
    )
    Account.objects.filter(pk=boris.pk).update(
        tokens_issued_at=timezone.now() - timedelta(days=151)
    )
    Account.objects.filter(user_id=1).update(tokens_issued_at=timezone.now() - timedelta(days=149))

    assert accounts_keepalive_task.delay().get() == 1

    refreshes = [c for c in fake.token_calls if c["grant_type"] == "refresh_token"]
    assert [c["user_id"] for c in refreshes] == [2]
    assert Account.objects.get(user_id=2).tokens_issued_at > timezone.now() - timedelta(minutes=1)
