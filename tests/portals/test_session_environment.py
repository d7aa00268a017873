"""The Bitrix24 session reads the environment's proxy settings once per origin (not on every
request) and still honours them, never sends ``~/.netrc`` credentials, and keeps no cookie a
portal sets."""

import requests

from b24app.portals.bitrix import BitrixClient
from b24app.portals.bitrix.config import BitrixConfig
from b24app.portals.bitrix.transport import build_session


def _session():
    return build_session(BitrixConfig(client_id="x", client_secret="y", allow_private=True))


def _proxies(session, url):
    return session.merge_environment_settings(url, {}, None, None, None)["proxies"]


def test_environment_proxies_are_honoured_and_no_proxy_bypasses(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example.test:3128")
    monkeypatch.setenv("NO_PROXY", "direct.example.test")
    session = _session()
    plain = requests.Session()
    for url in ("https://portal.example.test/rest/profile", "https://direct.example.test/rest/x"):
        assert (
            _proxies(session, url)
            == plain.merge_environment_settings(url, {}, None, None, None)["proxies"]
        )
    assert _proxies(session, "https://portal.example.test/rest/a")["https"].startswith(
        "http://proxy"
    )
    assert "https" not in _proxies(session, "https://direct.example.test/rest/b")


def test_the_environment_is_read_once_per_origin(monkeypatch):
    session = _session()
    asked = []
    real = requests.utils.get_environ_proxies

    def counting(url, no_proxy=None):
        asked.append(url)
        return real(url, no_proxy=no_proxy)

    monkeypatch.setattr("b24app.portals.bitrix.transport.get_environ_proxies", counting)
    for _ in range(3):
        _proxies(session, "https://portal.example.test/rest/profile")
    _proxies(session, "https://other.example.test/rest/profile")
    assert len(asked) == 2


def test_netrc_is_never_read(monkeypatch):
    monkeypatch.setattr(
        "requests.sessions.get_netrc_auth", lambda *a, **k: ("user", "netrc-password")
    )
    prepared = _session().prepare_request(requests.Request("POST", "https://portal.example.test/"))
    assert "Authorization" not in prepared.headers


def test_cookies_a_portal_sets_are_neither_kept_nor_sent_anywhere(fake, portal):
    """One session serves every portal: a cookie on one portal's answer must not pile up in it
    or travel with the next call, to that portal or another."""
    other = fake.add_portal()
    other.add_user(name="Olga", last_name="Ivanova", admin=True)
    portal.answer_cookies = [
        "PHPSESSID=portal-session-0123456789; path=/; HttpOnly",
        "BITRIX_SM_GUEST_ID=42; path=/; domain=127.0.0.1",
    ]
    session = _session()
    config = BitrixConfig(client_id="x", client_secret="y", allow_private=True)
    calls = [(portal, portal.issue_tokens(1)), (portal, portal.issue_tokens(1)), (other, None)]
    for where, tokens in calls:
        token = (tokens or where.issue_tokens(1))["access_token"]
        client = BitrixClient(where.client_endpoint, token, config=config, session=session)
        assert client.call("profile")["ID"]
    sent = [r["headers"].get("Cookie") for r in (*portal.requests, *other.requests)]
    assert sent == [None, None, None]
    assert len(session.cookies) == 0
