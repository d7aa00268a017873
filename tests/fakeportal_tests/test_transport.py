"""Domain change, outages, injected faults and request recording."""

from __future__ import annotations

import pytest
import requests

from .support import TIMEOUT, P, classic, v3


def test_change_domain_old_host_redirects_every_request(portal, anna):
    old_url, member_id = portal.url, portal.member_id
    new_domain = portal.change_domain()
    assert new_domain == portal.domain and portal.url != old_url and portal.member_id == member_id
    for method in ("GET", "POST"):
        resp = requests.request(
            method,
            old_url + "/rest/profile.json?auth=abc&x=1",
            timeout=TIMEOUT,
            allow_redirects=False,
            data={"auth": anna["access_token"]},
        )
        assert resp.status_code == 302
        assert resp.headers["Location"] == portal.url + "/rest/profile.json?auth=abc&x=1"
        assert resp.headers["Content-Type"].startswith("text/html")
    page = requests.get(
        old_url + "/company/personal/user/1/tasks/", allow_redirects=False, timeout=TIMEOUT
    )
    assert page.status_code == 302 and page.headers["Location"].startswith(portal.url)
    # the same tokens work on the new host; new tokens name it
    assert classic(portal, "profile", anna["access_token"]).status_code == 200
    assert portal.issue_tokens(1)["client_endpoint"] == portal.url + "/rest/"
    assert portal.requests[0]["api"] == "redirect" and portal.requests[0]["status"] == 302


def test_go_down_refuses_connections_and_come_back_on_the_same_port(portal, anna):
    port = portal.port
    with requests.Session() as session:  # a kept-alive connection is cut too
        assert (
            session.post(
                portal.url + "/rest/profile", json={"auth": anna["access_token"]}, timeout=TIMEOUT
            ).status_code
            == 200
        )
        portal.go_down()
        assert portal.down
        with pytest.raises(requests.ConnectionError):
            session.post(
                portal.url + "/rest/profile", json={"auth": anna["access_token"]}, timeout=TIMEOUT
            )
    with pytest.raises(requests.ConnectionError):
        classic(portal, "profile", anna["access_token"])
    portal.come_back()
    assert portal.port == port and not portal.down
    assert classic(portal, "profile", anna["access_token"]).status_code == 200


@pytest.mark.parametrize(
    "error,status",
    [
        ("QUERY_LIMIT_EXCEEDED", 503),
        ("INTERNAL_SERVER_ERROR", 500),
        ("expired_token", 401),
        ("NO_AUTH_FOUND", 401),
        ("OVERLOAD_LIMIT", 503),
        ("PORTAL_DELETED", 500),
    ],
)
def test_fail_next_injects_classic_errors_with_their_status(portal, anna, error, status):
    portal.fail_next(error=error)
    resp = classic(portal, "profile", anna["access_token"])
    assert resp.status_code == status and resp.json()["error"] == error
    assert "error_description" in resp.json()
    assert classic(portal, "profile", anna["access_token"]).status_code == 200
    assert portal.requests[0]["injected"] == error


def test_fail_next_count_method_and_status(portal, anna):
    portal.fail_next(
        count=2, error="INTERNAL_SERVER_ERROR", method="tasks.task.result.add", status=502
    )
    assert classic(portal, "profile", anna["access_token"]).status_code == 200
    for _ in range(2):
        resp = v3(
            portal, "tasks.task.result.add", anna["access_token"], fields={"taskId": 1, "text": "x"}
        )
        assert resp.status_code == 502 and resp.json()["error"] == "INTERNAL_SERVER_ERROR"
    assert (
        v3(
            portal, "tasks.task.result.add", anna["access_token"], fields={"taskId": 1, "text": "x"}
        ).status_code
        == 200
    )
    assert len(portal.results(1)) == 1


def test_fail_next_operation_time_limit_carries_reset_time(portal, anna):
    portal.fail_next(error="OPERATION_TIME_LIMIT", operating_reset_at=1234567890)
    resp = v3(portal, "tasks.task.result.list", anna["access_token"], filter=[["taskId", 1]])
    assert resp.status_code == 429 and resp.json()["error"] == "OPERATION_TIME_LIMIT"
    assert resp.json()["time"]["operating_reset_at"] == 1234567890


def test_fail_next_v3_code_uses_the_v3_shape(portal, anna):
    portal.fail_next(error=P + "ACCESSDENIEDEXCEPTION")
    resp = v3(portal, "tasks.task.result.list", anna["access_token"], filter=[["taskId", 1]])
    assert resp.status_code == 403 and resp.json()["error"]["code"] == P + "ACCESSDENIEDEXCEPTION"


def test_fail_next_timeout_and_drop(fake, portal, anna):
    portal.fail_next(error="timeout", delay_s=0.5)
    with pytest.raises(requests.ReadTimeout):
        requests.post(
            portal.url + "/rest/profile", json={"auth": anna["access_token"]}, timeout=0.2
        )
    portal.fail_next(error="drop")
    with pytest.raises(requests.ConnectionError):
        classic(portal, "profile", anna["access_token"])
    portal.fail_next(error="502")
    resp = classic(portal, "profile", anna["access_token"])
    assert resp.status_code == 502 and resp.headers["Content-Type"].startswith("text/html")
    assert classic(portal, "profile", anna["access_token"]).status_code == 200


def test_requests_are_recorded(portal, anna):
    v3(
        portal,
        "tasks.task.result.add",
        anna["access_token"],
        headers={"Idempotency-Key": "k", "X-Test": "1"},
        fields={"taskId": 1, "text": "Done"},
    )
    requests.get(
        portal.url + "/rest/user.admin.json", params={"auth": anna["access_token"]}, timeout=TIMEOUT
    )
    first, second = portal.requests
    assert first["api"] == "v3" and first["method_name"] == "tasks.task.result.add"
    assert (
        first["http_method"] == "POST" and first["status"] == 200 and first["path"].endswith(".add")
    )
    assert (
        first["body"]["fields"] == {"taskId": 1, "text": "Done"} and b'"Done"' in first["raw_body"]
    )
    assert (
        first["headers"]["x-test"] == "1"
        and first["idempotency_key"] == "k"
        and first["replayed"] is False
    )
    assert second["api"] == "classic" and second["method_name"] == "user.admin"
    assert second["query"]["auth"] == anna["access_token"] and second["http_method"] == "GET"
    assert portal.calls(api="v3") == [first]


# --- transport switches (transport.py) ---------------------------------------------------------


def _wait_for(predicate, seconds=10.0):
    import time

    give_up = time.monotonic() + seconds
    while time.monotonic() < give_up:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_drip_sends_the_body_one_byte_at_a_time(portal, anna):
    import time

    portal.transport.drip_interval_s = 0.003
    started = time.monotonic()
    # Every read gets a byte well within a short read timeout, however long the body takes.
    resp = requests.post(
        portal.url + "/rest/profile", json={"auth": anna["access_token"]}, timeout=(2, 0.5)
    )
    took = time.monotonic() - started
    assert resp.status_code == 200 and resp.json()["result"]["ID"] == "1"
    assert took >= 0.003 * len(resp.content)  # every byte waited for its pause
    record = portal.requests[-1]
    assert _wait_for(lambda: record.get("body_complete") is True)
    assert record["sent_bytes"] == len(resp.content)
    portal.transport.off()
    started = time.monotonic()
    classic(portal, "profile", anna["access_token"])
    assert time.monotonic() - started < took / 2


@pytest.mark.parametrize("declared", [True, False])
def test_huge_body_is_valid_json_of_the_given_size(portal, anna, declared):
    portal.transport.huge_body_bytes = 3_000_000
    portal.transport.huge_body_declared = declared
    resp = classic(portal, "profile", anna["access_token"])
    assert resp.status_code == 200 and len(resp.content) == 3_000_000
    assert resp.json()["result"] == "x" * (3_000_000 - len('{"result":""}'))
    assert ("Content-Length" in resp.headers) is declared
    assert (resp.headers.get("Transfer-Encoding") == "chunked") is not declared
    record = portal.requests[-1]
    assert _wait_for(lambda: record.get("body_complete") is True)
    assert record["sent_bytes"] == 3_000_000


def test_huge_body_records_a_client_that_went_away(portal, anna):
    portal.transport.huge_body_bytes = 200_000_000
    with requests.post(
        portal.url + "/rest/profile", json={"auth": anna["access_token"]}, stream=True, timeout=5
    ) as resp:
        resp.raw.read(100_000)
    record = portal.requests[-1]
    assert _wait_for(lambda: "body_complete" in record)
    assert record["body_complete"] is False and record["sent_bytes"] < 100_000_000


def test_unresponsive_accepts_records_and_never_answers_until_switched_off(portal, anna):
    portal.transport.unresponsive = True
    with pytest.raises(requests.ReadTimeout):
        classic_timeout = (2, 0.5)
        requests.post(
            portal.url + "/rest/profile",
            json={"auth": anna["access_token"]},
            timeout=classic_timeout,
        )
    assert portal.requests[-1]["injected"] == "unresponsive"
    assert portal.requests[-1]["method_name"] is None  # never routed
    portal.transport.unresponsive = False
    assert classic(portal, "profile", anna["access_token"]).status_code == 200


def test_the_oauth_server_has_the_same_switches(fake, portal, anna):
    from .support import refresh

    fake.transport.unresponsive = True
    with pytest.raises(requests.ReadTimeout):
        requests.post(fake.oauth_url + "/oauth/token/", data={}, timeout=(2, 0.5))
    assert fake.requests[-1]["injected"] == "unresponsive"
    fake.transport.off()
    fake.transport.huge_body_bytes = 1_000_000
    resp = refresh(fake, anna["refresh_token"])
    assert len(resp.content) == 1_000_000
    fake.transport.off()
    fake.transport.drip_interval_s = 0.003
    resp = requests.post(fake.oauth_url + "/rest/app.info", data={}, timeout=(2, 0.5))
    assert resp.status_code == 401 and resp.json()["error"] == "NO_AUTH_FOUND"
