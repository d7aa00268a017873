"""Outgoing events (§1.4, §4.2, §4.3) as the app receives them, and uninstall."""

from __future__ import annotations

from .support import catcher_pairs_dict, classic, refresh, v3

INSTALL_KEYS = [
    "event",
    "event_handler_id",
    "data[VERSION]",
    "data[ACTIVE]",
    "data[INSTALLED]",
    "data[LANGUAGE_ID]",
    "ts",
    "auth[access_token]",
    "auth[expires]",
    "auth[expires_in]",
    "auth[scope]",
    "auth[domain]",
    "auth[server_endpoint]",
    "auth[status]",
    "auth[client_endpoint]",
    "auth[member_id]",
    "auth[user_id]",
    "auth[refresh_token]",
    "auth[application_token]",
]


def test_event_onappinstall_is_a_form_post_with_bracket_keys(fake, portal, catcher):
    status, body = portal.send_event("ONAPPINSTALL", user_id=1)
    assert (status, body) == (200, "ok")
    (request,) = catcher.posts("/b24/events/")
    assert request["headers"]["Content-Type"] == "application/x-www-form-urlencoded"
    assert b"auth%5Baccess_token%5D=" in request["body"]  # brackets percent-encoded, not JSON
    pairs = catcher.pairs(request)
    assert [k for k, _ in pairs] == INSTALL_KEYS
    data = dict(pairs)
    assert data["event"] == "ONAPPINSTALL"
    assert (data["data[VERSION]"], data["data[ACTIVE]"], data["data[INSTALLED]"]) == ("1", "Y", "N")
    assert data["data[LANGUAGE_ID]"] == "en" and data["ts"].isdigit()
    assert data["auth[domain]"] == portal.domain  # the portal host in events
    assert data["auth[client_endpoint]"] == portal.url + "/rest/"
    assert data["auth[server_endpoint]"] == fake.oauth_url + "/rest/"
    assert data["auth[member_id]"] == portal.member_id and data["auth[user_id]"] == "1"
    assert data["auth[application_token]"] == portal.application_token
    assert data["auth[expires_in]"] == "3600" and data["auth[scope]"] == portal.scopes
    # the tokens are real ones for user 1
    assert classic(portal, "profile", data["auth[access_token]"]).json()["result"]["ID"] == "1"
    assert refresh(fake, data["auth[refresh_token]"]).status_code == 200


def test_event_body_matches_what_is_sent(portal, catcher):
    pairs = portal.event_body("ONAPPINSTALL", user_id=2)
    assert [k for k, _ in pairs] == INSTALL_KEYS
    assert dict(pairs)["auth[user_id]"] == "2"
    portal.mark_installed()
    assert dict(portal.event_body("ONAPPINSTALL"))["data[INSTALLED]"] == "Y"


def test_event_onappupdate_rotates_the_application_token(portal, catcher):
    old = portal.application_token
    status, _ = portal.update_app()
    assert status == 200
    data = catcher_pairs_dict(catcher)
    assert data["event"] == "ONAPPUPDATE"
    assert data["auth[application_token]"] == portal.application_token != old
    assert (data["data[VERSION]"], data["data[PREVIOUS_VERSION]"]) == ("2", "1")
    assert "data[LANGUAGE_ID]" in data and "auth[refresh_token]" in data


def test_event_onappuninstall_carries_no_tokens(portal, catcher):
    token = portal.application_token
    portal.send_event("ONAPPUNINSTALL", data={"CLEAN": 0})
    pairs = catcher.pairs(catcher.posts("/b24/events/")[-1])
    assert [k for k, _ in pairs if k.startswith("auth[")] == [
        "auth[domain]",
        "auth[server_endpoint]",
        "auth[client_endpoint]",
        "auth[member_id]",
        "auth[application_token]",
    ]
    data = dict(pairs)
    assert data["data[CLEAN]"] == "0" and data["data[LANGUAGE_ID]"] == "en"
    assert data["auth[application_token]"] == token


def test_uninstall_revokes_tokens_and_bindings(fake, portal, anna, catcher):
    portal.mark_installed()
    assert (
        classic(
            portal,
            "placement.bind",
            anna["access_token"],
            PLACEMENT="TASK_VIEW_TAB",
            HANDLER=catcher.url + "/b24/app/",
        ).json()["result"]
        is True
    )
    status, _ = portal.uninstall(clean=True)
    assert status == 200
    data = catcher_pairs_dict(catcher)
    assert data["event"] == "ONAPPUNINSTALL" and data["data[CLEAN]"] == "1"
    assert "auth[access_token]" not in data
    assert portal.installed is False and portal.placements == []
    resp = classic(portal, "profile", anna["access_token"])
    assert resp.status_code == 401 and resp.json()["error"] == "invalid_token"
    assert (
        v3(
            portal, "tasks.task.result.list", anna["access_token"], filter=[["taskId", 1]]
        ).status_code
        == 401
    )
    assert refresh(fake, anna["refresh_token"]).json()["error"] == "invalid_grant"


def test_uninstall_goes_to_the_bound_handler(portal, anna, catcher):
    classic(
        portal,
        "event.bind",
        anna["access_token"],
        event="ONAPPUNINSTALL",
        handler=catcher.url + "/uninstalled/",
    )
    portal.uninstall(clean=False)
    data = catcher.pairs(catcher.posts("/uninstalled/")[0])
    assert dict(data)["event_handler_id"] == str(2) and dict(data)["data[CLEAN]"] == "0"


def test_event_ordinary_events_wait_for_installation(portal, anna, catcher):
    status, body = portal.send_event("ONTASKUPDATE", data={"FIELDS_AFTER": {"ID": 1}})
    assert status is None and "not installed" in body
    assert catcher.posts("/b24/events/") == []
    portal.mark_installed()
    classic(
        portal,
        "event.bind",
        anna["access_token"],
        event="ONTASKUPDATE",
        handler=catcher.url + "/hook/",
    )
    status, _ = portal.send_event("ONTASKUPDATE", user_id=2, data={"FIELDS_AFTER": {"ID": 1}})
    assert status == 200
    data = dict(catcher.pairs(catcher.posts("/hook/")[0]))
    assert data["data[FIELDS_AFTER][ID]"] == "1" and data["auth[user_id]"] == "2"
    assert "auth[refresh_token]" not in data  # ordinary events carry no refresh token


def test_event_overrides_and_unreachable_app(portal, catcher):
    portal.send_event(
        "ONAPPINSTALL",
        application_token="forged",
        extra_auth={"user_id": None, "x": "y"},
        data={"ACTIVE": "N", "INSTALLED": None},
    )
    data = catcher_pairs_dict(catcher)
    assert data["auth[application_token]"] == "forged" and data["auth[x]"] == "y"
    assert (
        "auth[user_id]" not in data
        and "data[INSTALLED]" not in data
        and data["data[ACTIVE]"] == "N"
    )
    status, body = portal.send_event("ONAPPINSTALL", url="http://127.0.0.1:9/b24/events/")
    assert status is None and body.startswith("error")


def test_event_app_status_is_reported(portal, catcher):
    catcher.routes["/b24/events/"] = (404, "not here", "text/plain")
    assert portal.send_event("ONAPPINSTALL") == (404, "not here")
    assert portal.sent_events[-1]["status"] == 404
