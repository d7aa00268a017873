"""Cloud limits (§7): leaky bucket -> 503, operating budget -> 429."""

from __future__ import annotations

import time

from .support import classic, v3


def test_bucket_allows_the_burst_then_503(fake, portal, anna):
    portal.set_rate_limit(5, 0.5)
    statuses = [classic(portal, "profile", anna["access_token"]).status_code for _ in range(7)]
    assert statuses == [200] * 5 + [503, 503]
    resp = classic(portal, "profile", anna["access_token"])
    assert resp.json() == {
        "error": "QUERY_LIMIT_EXCEEDED",
        "error_description": "Too many requests",
    }
    assert portal.limit_hits == 3


def test_bucket_drains_at_the_configured_rate(fake, portal, anna):
    portal.set_rate_limit(3, 0.5)
    for _ in range(3):
        assert classic(portal, "profile", anna["access_token"]).status_code == 200
    assert classic(portal, "profile", anna["access_token"]).status_code == 503
    fake.advance_clock(2.0)  # 0.5/s * 2 s = room for exactly one request
    assert classic(portal, "profile", anna["access_token"]).status_code == 200
    assert classic(portal, "profile", anna["access_token"]).status_code == 503


def test_bucket_drains_in_real_time(portal, anna):
    portal.set_rate_limit(2, 5.0)
    codes = [classic(portal, "profile", anna["access_token"]).status_code for _ in range(6)]
    assert 503 in codes  # a burst of 6 against 2 (would need > 0.8 s to pass)
    time.sleep(0.45)  # 5/s * 0.45 s = 2.25 slots drained
    assert classic(portal, "profile", anna["access_token"]).status_code == 200


def test_bucket_counts_classic_and_v3_together_and_errors_too(portal, anna):
    portal.set_rate_limit(4, 0.01)
    assert classic(portal, "profile", "bad-token").status_code == 401
    assert classic(portal, "profile", anna["access_token"]).status_code == 200
    assert (
        v3(
            portal, "tasks.task.result.list", anna["access_token"], filter=[["taskId", 1]]
        ).status_code
        == 200
    )
    assert v3(portal, "tasks.task.result.list", None).status_code == 401
    resp = v3(portal, "tasks.task.result.list", anna["access_token"], filter=[["taskId", 1]])
    assert resp.status_code == 503 and resp.json()["error"] == "QUERY_LIMIT_EXCEEDED"


def test_bucket_is_per_portal(fake, portal, anna):
    other = fake.add_portal(rate_limit=(1, 0.01))
    other.add_user(name="Eve", admin=True)
    portal.set_rate_limit(1, 0.01)
    assert classic(portal, "profile", anna["access_token"]).status_code == 200
    assert classic(other, "profile", other.issue_tokens(1)["access_token"]).status_code == 200
    assert classic(portal, "profile", anna["access_token"]).status_code == 503


def test_operating_budget_blocks_the_method_after_the_call_that_exceeds_it(fake, portal, anna):
    portal.operating_limit_s = 250
    portal.method_cost["tasks.task.result.list"] = 100
    start = int(fake.now())
    operating = []
    for _ in range(3):  # 100, 200, 300: the third pushes over the limit but completes
        resp = v3(portal, "tasks.task.result.list", anna["access_token"], filter=[["taskId", 1]])
        assert resp.status_code == 200
        operating.append(resp.json()["time"]["operating"])
        reset_at = resp.json()["time"]["operating_reset_at"]
        assert start + 600 <= reset_at <= start + 601
    assert operating == [100, 200, 300]
    resp = v3(portal, "tasks.task.result.list", anna["access_token"], filter=[["taskId", 1]])
    assert resp.status_code == 429
    assert resp.json()["error"] == "OPERATION_TIME_LIMIT"
    assert resp.json()["time"]["operating_reset_at"] == reset_at
    # other methods are not affected
    assert (
        v3(
            portal, "tasks.task.result.add", anna["access_token"], fields={"taskId": 1, "text": "x"}
        ).status_code
        == 200
    )
    assert classic(portal, "profile", anna["access_token"]).status_code == 200
    # the block lifts when the oldest minute bucket drops out
    fake.advance_clock(reset_at - fake.now() + 1)
    token = portal.issue_tokens(1)["access_token"]
    resp = v3(portal, "tasks.task.result.list", token, filter=[["taskId", 1]])
    assert resp.status_code == 200 and resp.json()["time"]["operating"] == 100


def test_operating_is_reported_for_classic_calls(portal, anna):
    portal.method_cost["profile"] = 0.5
    first = classic(portal, "profile", anna["access_token"]).json()["time"]
    second = classic(portal, "profile", anna["access_token"]).json()["time"]
    assert (first["operating"], second["operating"]) == (0.5, 1.0)
    assert first["operating_reset_at"] == second["operating_reset_at"]


def test_batch_inner_calls_are_charged_to_their_methods(portal, anna):
    portal.operating_limit_s = 1
    portal.method_cost["profile"] = 1
    body = classic(
        portal, "batch", anna["access_token"], cmd={"a": "profile", "b": "profile", "c": "profile"}
    ).json()["result"]
    assert set(body["result"]) == {"a", "b"}
    assert body["result_error"]["c"]["error"] == "OPERATION_TIME_LIMIT"
    assert classic(portal, "profile", anna["access_token"]).status_code == 429


def test_latency_delays_every_rest_call(portal, anna):
    portal.latency_s = 0.2
    started = time.monotonic()
    assert classic(portal, "profile", anna["access_token"]).status_code == 200
    assert time.monotonic() - started >= 0.2
