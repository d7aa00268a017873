"""Idempotency-Key on REST 3.0 write methods (§5.2)."""

from __future__ import annotations

import pytest

from .support import P, refresh, v3

ADD = "tasks.task.result.add"


def add(portal, token, key, text="Done", task_id=1):
    return v3(
        portal,
        ADD,
        token,
        headers={"Idempotency-Key": key},
        fields={"taskId": task_id, "text": text},
    )


def test_idempotency_replay_is_not_applied_again(portal, anna):
    first = add(portal, anna["access_token"], "key-1")
    second = add(portal, anna["access_token"], "key-1")
    assert first.status_code == second.status_code == 200
    assert first.headers["Idempotency-Key"] == second.headers["Idempotency-Key"] == "key-1"
    assert "Idempotent-Replayed" not in first.headers
    assert second.headers["Idempotent-Replayed"] == "true"
    assert second.json() == first.json()
    assert len(portal.results(1)) == 1
    replays = [r["replayed"] for r in portal.calls(ADD)]
    assert replays == [False, True]
    assert portal.calls(ADD)[1]["idempotency_key"] == "key-1"


def test_idempotency_same_key_different_body_is_422(portal, anna):
    assert add(portal, anna["access_token"], "key-2", text="one").status_code == 200
    resp = add(portal, anna["access_token"], "key-2", text="two")
    assert resp.status_code == 422
    assert resp.json()["error"]["code"] == P + "IDEMPOTENCYKEYREUSEDEXCEPTION"
    assert resp.headers["Idempotency-Key"] == "key-2"
    assert [r["text"] for r in portal.results(1)] == ["one"]


def test_idempotency_replays_after_a_token_refresh(fake, portal, anna):
    add(portal, anna["access_token"], "key-3")
    new_token = refresh(fake, anna["refresh_token"]).json()["access_token"]
    resp = add(portal, new_token, "key-3")
    assert resp.headers.get("Idempotent-Replayed") == "true"
    assert len(portal.results(1)) == 1


def test_idempotency_whole_body_makes_a_refreshed_token_a_reused_key(fake, portal, anna):
    portal.idempotency_whole_body = True
    add(portal, anna["access_token"], "key-4")
    assert add(portal, anna["access_token"], "key-4").headers["Idempotent-Replayed"] == "true"
    new_token = refresh(fake, anna["refresh_token"]).json()["access_token"]
    resp = add(portal, new_token, "key-4")
    assert resp.status_code == 422
    assert resp.json()["error"]["code"] == P + "IDEMPOTENCYKEYREUSEDEXCEPTION"
    assert len(portal.results(1)) == 1


def test_lost_response_is_carried_out_and_its_answer_lost(portal, anna):
    import requests

    portal.fail_next(error="lost_response", method=ADD, expire_tokens=True)
    with pytest.raises(requests.ConnectionError):
        add(portal, anna["access_token"], "key-5")
    assert [r["text"] for r in portal.results(1)] == ["Done"]
    [call] = portal.calls(ADD)
    assert (call["status"], call["injected"]) == (200, "lost_response")
    again = add(portal, anna["access_token"], "key-5")
    assert again.status_code == 401 and again.json()["error"] == "expired_token"


@pytest.mark.parametrize("key", ["x" * 256, "ключ", "tab\there"])
def test_idempotency_invalid_key_is_400(portal, anna, key):
    resp = v3(
        portal,
        ADD,
        anna["access_token"],
        headers={"Idempotency-Key": key.encode("utf-8")},
        fields={"taskId": 1, "text": "Done"},
    )
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == P + "INVALIDIDEMPOTENCYKEYEXCEPTION"
    assert portal.results(1) == []


def test_idempotency_key_of_255_printable_chars_is_fine(portal, anna):
    key = ("~ !" * 100)[:255]
    assert add(portal, anna["access_token"], key).status_code == 200


def test_idempotency_errors_are_not_stored(portal, anna):
    bad = add(portal, anna["access_token"], "key-4", text="")
    assert bad.status_code == 400 and bad.headers["Idempotency-Key"] == "key-4"
    assert add(portal, anna["access_token"], "key-4", text="").status_code == 400
    good = add(portal, anna["access_token"], "key-4", text="fixed")
    assert good.status_code == 200 and "Idempotent-Replayed" not in good.headers


def test_idempotency_scope_is_user_and_method(portal, anna, boris):
    add(portal, anna["access_token"], "shared")
    resp = add(portal, boris["access_token"], "shared")
    assert resp.status_code == 200 and "Idempotent-Replayed" not in resp.headers
    rid = resp.json()["result"]["item"]["id"]
    resp = v3(
        portal,
        "tasks.task.result.update",
        boris["access_token"],
        headers={"Idempotency-Key": "shared"},
        id=rid,
        fields={"text": "edited"},
    )
    assert resp.status_code == 200 and "Idempotent-Replayed" not in resp.headers
    assert len(portal.results(1)) == 2


def test_idempotency_update_and_delete_replay(portal, anna):
    rid = portal.add_result(1, author_id=1, text="v1")
    headers = {"Idempotency-Key": "upd"}
    first = v3(
        portal,
        "tasks.task.result.update",
        anna["access_token"],
        headers=headers,
        id=rid,
        fields={"text": "v2"},
    )
    portal.results_by_id[rid].text = "changed behind the client's back"
    second = v3(
        portal,
        "tasks.task.result.update",
        anna["access_token"],
        headers=headers,
        id=rid,
        fields={"text": "v2"},
    )
    assert second.headers["Idempotent-Replayed"] == "true" and second.json() == first.json()
    assert portal.results(1)[0]["text"] == "changed behind the client's back"  # not applied again
    headers = {"Idempotency-Key": "del"}
    assert (
        v3(
            portal, "tasks.task.result.delete", anna["access_token"], headers=headers, id=rid
        ).status_code
        == 200
    )
    again = v3(portal, "tasks.task.result.delete", anna["access_token"], headers=headers, id=rid)
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"


def test_idempotency_record_lives_24_hours(fake, portal, anna):
    add(portal, anna["access_token"], "key-5")
    fake.advance_clock(24 * 3600 - 60)
    token = portal.issue_tokens(1)["access_token"]
    assert add(portal, token, "key-5").headers.get("Idempotent-Replayed") == "true"
    fake.advance_clock(120)
    token = portal.issue_tokens(1)["access_token"]
    resp = add(portal, token, "key-5")
    assert resp.status_code == 200 and "Idempotent-Replayed" not in resp.headers
    assert len(portal.results(1)) == 2


def test_idempotency_key_is_ignored_on_list_but_echoed(portal, anna):
    for _ in range(2):
        resp = v3(
            portal,
            "tasks.task.result.list",
            anna["access_token"],
            headers={"Idempotency-Key": "l"},
            filter=[["taskId", 1]],
        )
        assert resp.status_code == 200
        assert resp.headers["Idempotency-Key"] == "l" and "Idempotent-Replayed" not in resp.headers
