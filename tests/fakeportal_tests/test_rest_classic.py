"""Classic REST on the portal (§3.4, §3.5, §4.4, §5.1, §5.4, §6)."""

from __future__ import annotations

import pytest
import requests

from .support import TIMEOUT, classic

TIME_KEYS = {
    "start",
    "finish",
    "duration",
    "processing",
    "date_start",
    "date_finish",
    "operating_reset_at",
    "operating",
}


def test_profile_shape_and_admin_flag(portal, anna, boris):
    resp = classic(portal, "profile", anna["access_token"])
    assert resp.status_code == 200
    body = resp.json()
    assert body["result"] == {
        "ID": "1",
        "ADMIN": True,
        "NAME": "Anna",
        "LAST_NAME": "Smirnova",
        "PERSONAL_GENDER": "",
        "TIME_ZONE": "",
    }
    assert set(body["time"]) == TIME_KEYS
    assert classic(portal, "profile", boris["access_token"]).json()["result"]["ADMIN"] is False


@pytest.mark.parametrize("how", ["query", "form", "json", "json-suffixless"])
def test_classic_auth_from_query_form_or_json(portal, anna, how):
    token = anna["access_token"]
    if how == "query":
        resp = requests.get(
            portal.url + "/rest/user.admin", params={"auth": token}, timeout=TIMEOUT
        )
    elif how == "form":
        resp = requests.post(
            portal.url + "/rest/user.admin.json", data={"auth": token}, timeout=TIMEOUT
        )
    elif how == "json":
        resp = requests.post(
            portal.url + "/rest/user.admin.json", json={"auth": token}, timeout=TIMEOUT
        )
    else:
        resp = requests.post(portal.url + "/rest/user.admin", json={"auth": token}, timeout=TIMEOUT)
    assert resp.status_code == 200
    assert resp.json()["result"] is True


def test_user_current_and_user_admin(portal, boris):
    current = classic(portal, "user.current", boris["access_token"]).json()["result"]
    assert current["ID"] == "2" and current["NAME"] == "Boris" and current["ACTIVE"] is True
    assert classic(portal, "user.admin", boris["access_token"]).json()["result"] is False


def test_portal_app_info_reflects_installation(portal, anna):
    result = classic(portal, "app.info", anna["access_token"]).json()["result"]
    assert (
        result["INSTALLED"] is False
        and result["STATUS"] == "F"
        and result["PAYMENT_EXPIRED"] == "N"
    )
    assert {"ID", "CODE", "VERSION", "LANGUAGE_ID", "LICENSE", "DAYS"} <= set(result)
    portal.mark_installed()
    assert classic(portal, "app.info", anna["access_token"]).json()["result"]["INSTALLED"] is True


@pytest.mark.parametrize("auth", [None, "", "not-a-token"])
def test_classic_missing_or_unknown_auth_is_no_auth_found(portal, auth):
    resp = classic(portal, "profile", auth)
    assert resp.status_code == 401
    assert resp.json()["error"] == "NO_AUTH_FOUND"
    assert "error_description" in resp.json()


def test_classic_token_of_another_portal_is_rejected(fake, portal):
    other = fake.add_portal()
    other.add_user(name="Eve", admin=True)
    token = other.issue_tokens(1)["access_token"]
    assert classic(portal, "profile", token).json()["error"] == "NO_AUTH_FOUND"


def test_classic_expired_token_is_401(portal, anna, boris):
    portal.expire_access_tokens(user_id=1)
    resp = classic(portal, "profile", anna["access_token"])
    assert resp.status_code == 401
    assert resp.json() == {
        "error": "expired_token",
        "error_description": "The access token provided has expired.",
    }
    assert classic(portal, "profile", boris["access_token"]).status_code == 200
    assert classic(portal, "profile", portal.issue_tokens(1)["access_token"]).status_code == 200


def test_classic_token_expires_after_an_hour(fake, portal, anna):
    fake.advance_clock(3599)
    assert classic(portal, "profile", anna["access_token"]).status_code == 200
    fake.advance_clock(2)
    assert classic(portal, "profile", anna["access_token"]).json()["error"] == "expired_token"


def test_classic_insufficient_scope_is_403(fake):
    portal = fake.add_portal(scopes="task,placement")
    portal.add_user(name="Anna", admin=True)
    token = portal.issue_tokens(1)["access_token"]
    resp = classic(portal, "user.current", token)
    assert resp.status_code == 403 and resp.json()["error"] == "insufficient_scope"
    assert classic(portal, "profile", token).status_code == 200  # basic needs nothing


@pytest.mark.parametrize(
    "method",
    [
        "tasks.task.result.add",
        "tasks.task.result.update",
        "tasks.task.result.delete",
        "tasks.task.result.addfromchatmessage",
    ],
)
def test_classic_path_does_not_know_v3_only_methods(portal, anna, method):
    resp = classic(portal, method, anna["access_token"], id=1, fields={"text": "x"})
    assert resp.status_code == 404
    assert resp.json()["error"] == "ERROR_METHOD_NOT_FOUND"


def test_classic_unknown_method_is_404(portal, anna):
    resp = classic(portal, "crm.deal.list", anna["access_token"])
    assert resp.status_code == 404 and resp.json()["error"] == "ERROR_METHOD_NOT_FOUND"


def test_classic_task_result_list_shape(portal, anna):
    portal.add_result(1, author_id=2, text="[B]Done[/B]")
    portal.complete_task(1)
    resp = classic(portal, "tasks.task.result.list", anna["access_token"], taskId=1)
    assert resp.status_code == 200
    (item,) = resp.json()["result"]
    assert set(item) == {
        "id",
        "taskId",
        "commentId",
        "createdBy",
        "createdAt",
        "updatedAt",
        "status",
        "text",
        "formattedText",
        "files",
    }
    assert item["createdBy"] == 2 and item["status"] == 1 and item["commentId"] == 0
    assert item["files"] == [] and item["text"] == "[B]Done[/B]"


@pytest.mark.parametrize(
    "params,code", [({}, "100"), ({"taskId": "abc"}, "100"), ({"taskId": 99}, "0")]
)
def test_classic_task_result_list_errors(portal, anna, params, code):
    resp = classic(portal, "tasks.task.result.list", anna["access_token"], **params)
    assert resp.status_code == 400 and resp.json()["error"] == code


# ---- placements


def test_placement_bind_get_and_unbind(portal, anna, catcher):
    handler = catcher.url + "/b24/app/"
    resp = classic(
        portal,
        "placement.bind",
        anna["access_token"],
        PLACEMENT="TASK_VIEW_TAB",
        HANDLER=handler,
        TITLE="Results",
        LANG_ALL={"ru": {"TITLE": "Результаты", "DESCRIPTION": "", "GROUP_NAME": ""}},
    )
    assert resp.status_code == 200 and resp.json()["result"] is True
    listed = classic(portal, "placement.get", anna["access_token"]).json()["result"]
    assert listed == [
        {
            "placement": "TASK_VIEW_TAB",
            "userId": 0,
            "handler": handler,
            "options": [],
            "title": "Results",
            "description": "",
            "langAll": {"ru": {"TITLE": "Результаты", "DESCRIPTION": "", "GROUP_NAME": ""}},
        }
    ]
    assert portal.placement_binding("TASK_VIEW_TAB").title_for("ru") == "Результаты"
    resp = classic(portal, "placement.unbind", anna["access_token"], PLACEMENT="TASK_VIEW_TAB")
    assert resp.json()["result"] == {"count": 2}
    assert portal.placements == []


def test_placement_bind_from_form_with_bracket_keys(portal, anna):
    resp = requests.post(
        portal.url + "/rest/placement.bind",
        timeout=TIMEOUT,
        data={
            "auth": anna["access_token"],
            "PLACEMENT": "TASK_VIEW_SIDEBAR",
            "HANDLER": "https://app.example/h",
            "LANG_ALL[en][TITLE]": "Results EN",
            "OPTIONS[groupId]": "11,12",
        },
    )
    assert resp.json()["result"] is True
    binding = portal.placement_binding("TASK_VIEW_SIDEBAR")
    assert binding.lang_all == {"en": {"TITLE": "Results EN"}} and binding.options == {
        "groupId": "11,12"
    }


@pytest.mark.parametrize(
    "params,argument",
    [
        ({"HANDLER": "https://app.example/h"}, "PLACEMENT"),
        ({"PLACEMENT": "", "HANDLER": "https://app.example/h"}, "PLACEMENT"),
        ({"PLACEMENT": "TASK_VIEW_TAB"}, "HANDLER"),
        (
            {
                "PLACEMENT": "TASK_VIEW_TAB",
                "HANDLER": "https://app.example/h",
                "LANG_ALL": "Results",
            },
            "LANG_ALL",
        ),
        (
            {"PLACEMENT": "TASK_VIEW_TAB", "HANDLER": "https://app.example/h", "TITLE": ["x"]},
            "TITLE",
        ),
    ],
)
def test_placement_bind_argument_errors(portal, anna, params, argument):
    resp = classic(portal, "placement.bind", anna["access_token"], **params)
    assert resp.status_code == 400
    assert resp.json()["error"] == "ERROR_ARGUMENT"
    assert resp.json()["argument"] == argument
    assert portal.placements == []


@pytest.mark.parametrize(
    "handler,error",
    [
        ("ftp://app.example/h", "ERROR_UNSUPPORTED_PROTOCOL"),
        ("https:///nohost", "ERROR_WRONG_HANDLER_URL"),
    ],
)
def test_placement_bind_handler_url_errors(portal, anna, handler, error):
    resp = classic(
        portal, "placement.bind", anna["access_token"], PLACEMENT="TASK_VIEW_TAB", HANDLER=handler
    )
    assert resp.json()["error"] == error


def test_placement_bind_loopback_handler_allowed_unless_strict(portal, anna):
    params = {"PLACEMENT": "TASK_VIEW_TAB", "HANDLER": "http://127.0.0.1:8000/b24/app/"}
    assert (
        classic(portal, "placement.bind", anna["access_token"], **params).json()["result"] is True
    )
    portal.strict_handlers = True
    params["HANDLER"] = "http://localhost:8000/b24/app/"
    assert (
        classic(portal, "placement.bind", anna["access_token"], **params).json()["error"]
        == "ERROR_WRONG_HANDLER_URL"
    )


def test_placement_bind_needs_admin_and_known_placement(portal, anna, boris):
    resp = classic(
        portal,
        "placement.bind",
        boris["access_token"],
        PLACEMENT="TASK_VIEW_TAB",
        HANDLER="https://app.example/h",
    )
    assert resp.status_code == 403 and resp.json()["error"] == "ACCESS_DENIED"
    resp = classic(
        portal,
        "placement.bind",
        anna["access_token"],
        PLACEMENT="CRM_DEAL_LIST_TOOLBAR",
        HANDLER="https://app.example/h",
    )  # no crm scope
    assert resp.json()["error"] == "ERROR_PLACEMENT_NOT_FOUND"
    assert classic(portal, "placement.get", boris["access_token"]).status_code == 403
    codes = classic(portal, "placement.list", boris["access_token"]).json()["result"]
    assert "TASK_VIEW_TAB" in codes and "CRM_DEAL_LIST_TOOLBAR" not in codes


def test_placement_methods_refuse_webhooks(portal):
    hook = portal.add_webhook(1)
    resp = requests.post(
        hook + "placement.bind.json",
        timeout=TIMEOUT,
        json={"PLACEMENT": "TASK_VIEW_TAB", "HANDLER": "https://app.example/h"},
    )
    assert resp.status_code == 403 and resp.json()["error"] == "WRONG_AUTH_TYPE"
    assert requests.post(hook + "profile", timeout=TIMEOUT).json()["result"]["ID"] == "1"
    resp = requests.post(hook + "app.info", timeout=TIMEOUT)
    assert resp.json()["error"] == "ACCESS_DENIED"


# ---- events


def test_event_bind_get_duplicate_and_unbind(portal, anna, boris):
    params = {"event": "onAppUninstall", "handler": "https://app.example/b24/events/"}
    assert classic(portal, "event.bind", anna["access_token"], **params).json()["result"] is True
    resp = classic(portal, "event.bind", anna["access_token"], **params)
    assert resp.status_code == 400 and resp.json()["error"] == "ERROR_HANDLER_ALREADY_EXIST"
    assert classic(portal, "event.get", anna["access_token"]).json()["result"] == [
        {
            "event": "ONAPPUNINSTALL",
            "handler": "https://app.example/b24/events/",
            "auth_type": "0",
            "offline": 0,
        }
    ]
    assert classic(portal, "event.get", boris["access_token"]).json()["result"] == []
    assert classic(portal, "event.unbind", anna["access_token"], **params).json()["result"] == {
        "count": 1
    }
    assert portal.event_bindings == []


def test_event_bind_errors(portal, boris):
    resp = classic(
        portal, "event.bind", boris["access_token"], event="ONNOSUCHEVENT", handler="https://a.b/"
    )
    assert resp.json()["error"] == "ERROR_EVENT_NOT_FOUND"
    resp = classic(
        portal,
        "event.bind",
        boris["access_token"],
        event="ONTASKUPDATE",
        handler="https://a.b/",
        event_type="offline",
    )
    assert resp.status_code == 403 and resp.json()["error"] == "ACCESS_DENIED"
    resp = classic(
        portal,
        "event.bind",
        boris["access_token"],
        event="ONTASKUPDATE",
        handler="https://a.b/",
        auth_type=1,
    )
    assert resp.status_code == 403


# ---- batch


def test_batch_runs_commands_and_substitutes_results(portal, anna):
    resp = classic(
        portal,
        "batch",
        anna["access_token"],
        halt=0,
        cmd={
            "me": "user.current",
            "admin": "user.admin",
            "list": "tasks.task.result.list?taskId=$result[me][ID]",
            "bad": "tasks.task.result.update?id=1",
            "nested": "batch?cmd[x]=profile",
        },
    )
    assert resp.status_code == 200
    body = resp.json()["result"]
    assert body["result"]["me"]["ID"] == "1" and body["result"]["admin"] is True
    assert body["result"]["list"] == []  # task 1 has no results
    assert body["result_error"]["bad"]["error"] == "ERROR_METHOD_NOT_FOUND"
    assert body["result_error"]["nested"]["error"] == "ERROR_BATCH_METHOD_NOT_ALLOWED"
    assert set(body["result_time"]) == {"me", "admin", "list"}
    assert "operating" not in body["result_time"]["me"]


def test_batch_halt_stops_at_first_error(portal, anna):
    body = classic(
        portal, "batch", anna["access_token"], halt=1, cmd={"a": "no.such.method", "b": "profile"}
    ).json()["result"]
    assert "a" in body["result_error"] and body["result"] == []


def test_batch_is_limited_to_50_commands(portal, anna):
    cmd = {f"c{i}": "profile" for i in range(51)}
    resp = classic(portal, "batch", anna["access_token"], cmd=cmd)
    assert resp.status_code == 400 and resp.json()["error"] == "ERROR_BATCH_LENGTH_EXCEEDED"
    cmd.pop("c50")
    assert (
        len(classic(portal, "batch", anna["access_token"], cmd=cmd).json()["result"]["result"])
        == 50
    )
