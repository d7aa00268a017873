"""The fake OAuth server (§2.2-2.5, §2.7) and the portal's /oauth/authorize/."""

from __future__ import annotations

import threading
import time
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from .support import CLIENT_ID, TIMEOUT, classic, refresh, token_request

TOKEN_KEYS = {
    "access_token",
    "refresh_token",
    "expires",
    "expires_in",
    "scope",
    "domain",
    "server_endpoint",
    "status",
    "client_endpoint",
    "member_id",
    "user_id",
}


def authorize_code(fake, portal, **query):
    resp = requests.get(
        portal.url + "/oauth/authorize/",
        params={"client_id": CLIENT_ID, **query},
        allow_redirects=False,
        timeout=TIMEOUT,
    )
    assert resp.status_code == 302, resp.text
    return parse_qs(urlsplit(resp.headers["Location"]).query)["code"][0]


def test_issue_tokens_has_the_token_response_shape(fake, portal, anna):
    assert set(anna) == TOKEN_KEYS
    assert anna["domain"] == fake.oauth_host == fake.oauth_url.removeprefix("http://")
    assert anna["server_endpoint"] == fake.oauth_url + "/rest/"
    assert anna["client_endpoint"] == portal.url + "/rest/"
    assert anna["member_id"] == portal.member_id and len(portal.member_id) == 32
    assert anna["user_id"] == 1 and anna["expires_in"] == 3600 and anna["status"] == "F"
    assert abs(anna["expires"] - (time.time() + 3600)) < 5


def test_token_refresh_rotates_both_tokens(fake, portal, anna):
    resp = refresh(fake, anna["refresh_token"])
    assert resp.status_code == 200
    body = resp.json()
    assert set(body) == TOKEN_KEYS
    assert body["access_token"] != anna["access_token"]
    assert body["refresh_token"] != anna["refresh_token"]
    assert body["user_id"] == 1 and body["member_id"] == portal.member_id
    assert classic(portal, "profile", body["access_token"]).status_code == 200


def test_token_refresh_reuse_is_invalid_grant(fake, anna):
    assert refresh(fake, anna["refresh_token"]).status_code == 200
    resp = refresh(fake, anna["refresh_token"])
    assert resp.status_code == 400
    assert resp.json()["error"] == "invalid_grant"


def test_token_refresh_chain_keeps_working(fake, anna):
    token = anna["refresh_token"]
    for _ in range(3):
        resp = refresh(fake, token)
        assert resp.status_code == 200
        token = resp.json()["refresh_token"]


def test_token_refresh_accepts_get_query(fake, anna):
    resp = token_request(
        fake, method="GET", grant_type="refresh_token", refresh_token=anna["refresh_token"]
    )
    assert resp.status_code == 200 and "access_token" in resp.json()


def test_token_refresh_revoked_is_invalid_grant(fake, portal, anna, boris):
    portal.revoke_refresh_tokens(user_id=1)
    assert refresh(fake, anna["refresh_token"]).json()["error"] == "invalid_grant"
    assert refresh(fake, boris["refresh_token"]).status_code == 200


def test_token_concurrent_refresh_has_one_winner(fake, anna):
    statuses = []
    lock = threading.Lock()

    def worker():
        status = refresh(fake, anna["refresh_token"]).status_code
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=worker) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [200] + [400] * 19
    assert len(fake.token_calls) == 20
    assert sum(call["ok"] for call in fake.token_calls) == 1


@pytest.mark.parametrize("http_method", ["GET", "POST"])
def test_token_code_exchange(fake, portal, http_method):
    portal.mark_installed()
    code = authorize_code(fake, portal)
    resp = token_request(fake, method=http_method, grant_type="authorization_code", code=code)
    assert resp.status_code == 200
    body = resp.json()
    assert set(body) == TOKEN_KEYS
    assert body["user_id"] == 1  # default: the first admin
    assert classic(portal, "profile", body["access_token"]).json()["result"]["ID"] == "1"


def test_token_code_is_single_use(fake, portal):
    portal.mark_installed()
    code = authorize_code(fake, portal)
    assert token_request(fake, grant_type="authorization_code", code=code).status_code == 200
    resp = token_request(fake, grant_type="authorization_code", code=code)
    assert resp.status_code == 400 and resp.json()["error"] == "invalid_grant"


def test_token_code_lives_30_seconds(fake, portal):
    portal.mark_installed()
    fresh = authorize_code(fake, portal)
    stale = authorize_code(fake, portal)
    fake.advance_clock(29)
    assert token_request(fake, grant_type="authorization_code", code=fresh).status_code == 200
    fake.advance_clock(2)
    resp = token_request(fake, grant_type="authorization_code", code=stale)
    assert resp.status_code == 400 and resp.json()["error"] == "invalid_grant"


def test_token_wrong_client_is_an_error_in_a_200(fake, anna):
    resp = refresh(fake, anna["refresh_token"], client_id="app.someone.else")
    assert resp.status_code == 200
    assert resp.json() == {"error": "wrong_client"}
    # nothing was consumed
    assert refresh(fake, anna["refresh_token"]).status_code == 200


def test_token_invalid_client_secret_is_400(fake, anna):
    resp = refresh(fake, anna["refresh_token"], client_secret="wrong")
    assert resp.status_code == 400 and resp.json()["error"] == "invalid_client"
    assert refresh(fake, anna["refresh_token"]).status_code == 200


@pytest.mark.parametrize(
    "params",
    [
        {"grant_type": "refresh_token"},
        {"grant_type": "authorization_code"},
        {"grant_type": "refresh_token", "refresh_token": "x", "client_secret": ""},
        {"refresh_token": "x"},
    ],
)
def test_token_missing_parameter_is_invalid_request(fake, params):
    resp = token_request(fake, **params)
    assert resp.status_code == 400
    assert resp.json()["error"] == "invalid_request"


def test_token_calls_are_recorded(fake, portal, anna):
    refresh(fake, anna["refresh_token"])
    refresh(fake, anna["refresh_token"])
    ok, bad = fake.token_calls
    assert ok["ok"] is True and ok["grant_type"] == "refresh_token" and ok["client_id"] == CLIENT_ID
    assert ok["user_id"] == 1 and ok["member_id"] == portal.member_id and ok["error"] is None
    assert bad["ok"] is False and bad["error"] == "invalid_grant"


def test_token_fault_lost_response_rotates_then_drops(fake, anna):
    fake.fail_token_next(error="lost_response")
    with pytest.raises(requests.ConnectionError):
        refresh(fake, anna["refresh_token"])
    # the server did rotate: the old refresh token is gone
    assert refresh(fake, anna["refresh_token"]).json()["error"] == "invalid_grant"
    assert fake.token_calls[0]["ok"] is True and fake.token_calls[0]["error"] == "lost_response"


def test_token_fault_timeout_and_500_do_not_consume(fake, anna):
    fake.fail_token_next(error="timeout")
    with pytest.raises(requests.Timeout):
        requests.post(
            fake.oauth_url + "/oauth/token/",
            timeout=0.2,
            data={"grant_type": "refresh_token", "refresh_token": anna["refresh_token"]},
        )
    fake.fail_token_next(error="500")
    assert refresh(fake, anna["refresh_token"]).status_code == 500
    fake.fail_token_next(error="invalid_grant")
    assert refresh(fake, anna["refresh_token"]).json()["error"] == "invalid_grant"
    assert refresh(fake, anna["refresh_token"]).status_code == 200


# ---- where /oauth/token/ reads its parameters (fake.token_params)

NO_CLIENT_ID = {"error": "invalid_request", "error_description": 'No "client_id" parameter found'}


@pytest.mark.parametrize("http_method", ["GET", "POST"])
def test_token_params_both_reads_the_query_and_a_post_body(fake, anna, http_method):
    assert fake.token_params == "both"
    resp = token_request(
        fake, method=http_method, grant_type="refresh_token", refresh_token=anna["refresh_token"]
    )
    assert resp.status_code == 200 and "access_token" in resp.json()
    assert fake.token_calls[0]["http_method"] == http_method


def test_token_params_query_ignores_a_post_body_and_spends_nothing(fake, anna):
    fake.token_params = "query"
    resp = refresh(fake, anna["refresh_token"])  # a POST form
    assert resp.status_code == 400 and resp.json() == NO_CLIENT_ID
    resp = token_request(
        fake, method="GET", grant_type="refresh_token", refresh_token=anna["refresh_token"]
    )
    assert resp.status_code == 200  # the POST did not spend the refresh token
    failed, ok = fake.token_calls
    assert failed["http_method"] == "POST" and failed["error"] == "invalid_request"
    assert not failed["client_id"] and not failed["grant_type"]
    assert ok["http_method"] == "GET" and ok["ok"] is True


def test_token_params_query_ignores_a_post_body_for_a_code_too(fake, portal):
    portal.mark_installed()
    fake.token_params = "query"
    code = authorize_code(fake, portal)
    resp = token_request(fake, grant_type="authorization_code", code=code)
    assert resp.status_code == 400 and resp.json() == NO_CLIENT_ID
    resp = token_request(fake, method="GET", grant_type="authorization_code", code=code)
    assert resp.status_code == 200 and resp.json()["user_id"] == 1


def test_token_params_body_ignores_the_query_string(fake, anna):
    fake.token_params = "body"
    resp = token_request(
        fake, method="GET", grant_type="refresh_token", refresh_token=anna["refresh_token"]
    )
    assert resp.status_code == 400 and resp.json() == NO_CLIENT_ID
    # A POST with the parameters only in its query string is not read either.
    resp = requests.post(
        fake.oauth_url + "/oauth/token/",
        params={
            "grant_type": "refresh_token",
            "client_id": CLIENT_ID,
            "client_secret": fake.client_secret,
            "refresh_token": anna["refresh_token"],
        },
        timeout=TIMEOUT,
    )
    assert resp.status_code == 400 and resp.json() == NO_CLIENT_ID
    assert refresh(fake, anna["refresh_token"]).status_code == 200


def test_token_params_get_only_answers_405_to_a_post_and_spends_nothing(fake, anna):
    fake.token_params = "get_only"
    fake.fail_token_next(error="500")
    resp = refresh(fake, anna["refresh_token"])
    assert resp.status_code == 405 and resp.headers["Allow"] == "GET"
    assert fake.token_calls[-1]["error"] == "method_not_allowed"
    # The 405 comes before the token logic: the queued fault is still there for the next call.
    get = {"method": "GET", "grant_type": "refresh_token", "refresh_token": anna["refresh_token"]}
    assert token_request(fake, **get).status_code == 500
    assert token_request(fake, **get).status_code == 200
    assert [call["http_method"] for call in fake.token_calls] == ["POST", "GET", "GET"]


def test_token_missing_client_id_error_can_be_wrong_client(fake, anna):
    fake.token_params = "query"
    fake.missing_client_id_error = "wrong_client"
    resp = refresh(fake, anna["refresh_token"])
    assert resp.status_code == 200 and resp.json() == {"error": "wrong_client"}
    assert fake.token_calls[0]["error"] == "wrong_client"


def test_token_params_switches_refuse_unknown_values(fake):
    with pytest.raises(ValueError):
        fake.token_params = "post"
    with pytest.raises(ValueError):
        fake.missing_client_id_error = "invalid_client"
    assert (fake.token_params, fake.missing_client_id_error) == ("both", "invalid_request")


def test_token_payment_required(fake, portal, anna):
    portal.payment_required = True
    resp = refresh(fake, anna["refresh_token"])
    assert resp.json()["error"] == "PAYMENT_REQUIRED"
    portal.payment_required = False
    assert refresh(fake, anna["refresh_token"]).status_code == 200


# ---- app.info on the OAuth server


@pytest.mark.parametrize("how", ["query", "form", "json"])
def test_server_app_info_shape(fake, portal, anna, how):
    portal.mark_installed()
    url = fake.oauth_url + "/rest/app.info"
    auth = {"auth": anna["access_token"]}
    resp = {
        "query": lambda: requests.get(url, params=auth, timeout=TIMEOUT),
        "form": lambda: requests.post(url, data=auth, timeout=TIMEOUT),
        "json": lambda: requests.post(url, json=auth, timeout=TIMEOUT),
    }[how]()
    assert resp.status_code == 200
    result = resp.json()["result"]
    assert set(result) == {"client_id", "scope", "expires", "install", "user_id"}
    assert result["client_id"] == CLIENT_ID and str(result["user_id"]) == "1"
    install = result["install"]
    assert set(install) == {
        "installed",
        "version",
        "status",
        "scope",
        "domain",
        "uri",
        "client_endpoint",
        "member_id",
        "member_type",
    }
    assert install["installed"] is True
    assert install["member_id"] == portal.member_id and install["domain"] == portal.domain
    assert install["client_endpoint"] == portal.url + "/rest/"
    assert "time" in resp.json()


def test_server_app_info_bad_tokens(fake, portal, anna):
    url = fake.oauth_url + "/rest/app.info"
    resp = requests.get(url, params={"auth": "nope"}, timeout=TIMEOUT)
    assert resp.status_code == 401 and resp.json()["error"] == "invalid_token"
    portal.expire_access_tokens()
    resp = requests.get(url, params={"auth": anna["access_token"]}, timeout=TIMEOUT)
    assert resp.status_code == 401 and resp.json()["error"] == "expired_token"


# ---- /oauth/authorize/


def test_authorize_redirects_with_documented_parameters(fake, portal):
    portal.mark_installed()
    resp = requests.get(
        portal.url + "/oauth/authorize/",
        params={"client_id": CLIENT_ID, "state": "xyz 1"},
        allow_redirects=False,
        timeout=TIMEOUT,
    )
    assert resp.status_code == 302
    location = resp.headers["Location"]
    assert location.startswith(fake.app_url + "/b24/oauth/callback/?")
    query = {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
    assert set(query) == {"code", "state", "domain", "member_id", "scope", "server_domain"}
    assert query["state"] == "xyz 1"
    assert query["domain"] == portal.domain and query["member_id"] == portal.member_id
    assert query["scope"] == portal.scopes and query["server_domain"] == fake.oauth_host


def test_authorize_user_override(fake, portal):
    portal.mark_installed()
    code = authorize_code(fake, portal, **{"as": "2"})
    assert token_request(fake, grant_type="authorization_code", code=code).json()["user_id"] == 2
    fake.authorize_as_user = 2
    code = authorize_code(fake, portal)
    assert token_request(fake, grant_type="authorization_code", code=code).json()["user_id"] == 2


def test_authorize_custom_redirect_uri(fake, portal):
    portal.mark_installed()
    fake.redirect_uri = "http://127.0.0.1:1/cb/?x=1"
    resp = requests.get(
        portal.url + "/oauth/authorize/",
        params={"client_id": CLIENT_ID},
        allow_redirects=False,
        timeout=TIMEOUT,
    )
    assert resp.headers["Location"].startswith("http://127.0.0.1:1/cb/?x=1&code=")
    assert "state=" not in resp.headers["Location"]


@pytest.mark.parametrize("installed,client_id", [(True, "app.wrong.1"), (False, CLIENT_ID)])
def test_authorize_failure_is_an_html_page_without_redirect(fake, portal, installed, client_id):
    if installed:
        portal.mark_installed()
    resp = requests.get(
        portal.url + "/oauth/authorize/",
        params={"client_id": client_id, "state": "s"},
        allow_redirects=False,
        timeout=TIMEOUT,
    )
    assert resp.status_code == 200
    assert "Location" not in resp.headers
    assert resp.headers["Content-Type"].startswith("text/html")
    assert "oauth-error" in resp.text
    assert not fake.codes
