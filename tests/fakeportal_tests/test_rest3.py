"""REST 3.0 tasks.task.result.* (§5.2, §5.3)."""

from __future__ import annotations

import threading

import pytest
import requests

from .support import (
    ACCESS_DENIED,
    DTO_VALIDATION,
    REQUEST_VALIDATION,
    TIMEOUT,
    UNKNOWN_DTO_PROPERTY,
    P,
    v3,
)

ITEM_KEYS = {
    "id",
    "taskId",
    "text",
    "authorId",
    "createdAt",
    "updatedAt",
    "status",
    "fileIds",
    "rights",
    "messageId",
}
ISO_RE = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d$"


def error_of(resp):
    return resp.json()["error"]


def test_v3_add_returns_the_item(portal, anna):
    resp = v3(
        portal, "tasks.task.result.add", anna["access_token"], fields={"taskId": 1, "text": "Done"}
    )
    assert resp.status_code == 200
    body = resp.json()
    item = body["result"]["item"]
    assert set(item) == ITEM_KEYS
    assert item["taskId"] == 1 and item["text"] == "Done" and item["authorId"] == 1
    assert item["updatedAt"] is None and item["status"] == "open" and item["messageId"] is None
    assert item["fileIds"] == [] and item["rights"] == {"edit": True, "remove": True}
    assert __import__("re").match(ISO_RE, item["createdAt"])
    assert {"operating", "operating_reset_at"} <= set(body["time"])
    assert [r["text"] for r in portal.results(1)] == ["Done"]


def test_v3_update_changes_text_and_sets_updated_at(portal, anna):
    rid = portal.add_result(1, author_id=1, text="Draft")
    resp = v3(
        portal, "tasks.task.result.update", anna["access_token"], id=rid, fields={"text": "Final"}
    )
    assert resp.status_code == 200
    item = resp.json()["result"]["item"]
    assert item["id"] == rid and item["text"] == "Final" and item["updatedAt"] is not None
    assert portal.results(1)[0]["text"] == "Final"


def test_v3_delete_removes_the_item(portal, anna):
    rid = portal.add_result(1, author_id=1)
    resp = v3(portal, "tasks.task.result.delete", anna["access_token"], id=rid)
    assert resp.status_code == 200 and resp.json()["result"] == {"result": True}
    assert portal.results(1) == []


# Every error row of the §5.3 update table (the 403 rows are tested below).
UPDATE_ERRORS = [
    pytest.param(
        {"fields": {"text": "x"}},
        400,
        REQUEST_VALIDATION,
        [
            {"message": "At least one required field is not filled: `id`, `filter`"},
            {"message": "Only one of the values must be provided: `id`, `filter`"},
        ],
        id="no-id-no-filter",
    ),
    pytest.param(
        {"id": "RID", "filter": [["id", "RID"]], "fields": {"text": "x"}},
        400,
        REQUEST_VALIDATION,
        [{"message": "Only one of the values must be provided: `id`, `filter`"}],
        id="id-and-filter",
    ),
    pytest.param(
        {"id": "RID"},
        400,
        REQUEST_VALIDATION,
        [{"field": "fields", "message": "Required field `fields` is missing"}],
        id="no-fields",
    ),
    pytest.param(
        {"id": "RID", "fields": {}},
        400,
        DTO_VALIDATION,
        [{"field": "text", "message": 'The required field "text" is not filled'}],
        id="no-text",
    ),
    pytest.param(
        {"id": "RID", "fields": {"text": ""}},
        400,
        DTO_VALIDATION,
        [{"field": "text", "message": 'The required field "text" is not filled'}],
        id="empty-text",
    ),
    pytest.param(
        {"id": "RID", "fields": {"text": "x", "fileIds": [1]}},
        400,
        DTO_VALIDATION,
        [{"field": "fileIds", "message": 'The field "fileIds" is not available for filling'}],
        id="fileIds",
    ),
    pytest.param(
        {"id": "RID", "fields": {"text": "x", "taskId": 1}},
        400,
        UNKNOWN_DTO_PROPERTY,
        [{"field": "fields", "message": "Unknown field `taskId` for entity `ResultDto`"}],
        id="taskId-in-fields",
    ),
    pytest.param(
        {"id": "RID", "fields": {"text": "x", "status": "closed"}},
        400,
        UNKNOWN_DTO_PROPERTY,
        [{"field": "fields", "message": "Unknown field `status` for entity `ResultDto`"}],
        id="status-in-fields",
    ),
]


def _with_rid(value, rid):
    if value == "RID":
        return rid
    if isinstance(value, dict):
        return {k: _with_rid(v, rid) for k, v in value.items()}
    if isinstance(value, list):
        return [_with_rid(v, rid) for v in value]
    return value


@pytest.mark.parametrize("body,status,code,validation", UPDATE_ERRORS)
def test_v3_update_validation_errors(portal, anna, body, status, code, validation):
    rid = portal.add_result(1, author_id=1, text="Original")
    resp = v3(portal, "tasks.task.result.update", anna["access_token"], **_with_rid(body, rid))
    assert resp.status_code == status
    assert resp.json() == {
        "error": {"code": code, "message": error_of(resp)["message"], "validation": validation}
    }
    assert "result" not in resp.json()
    assert portal.results(1)[0]["text"] == "Original"


def test_v3_update_by_non_author_is_403(portal, anna, boris):
    rid = portal.add_result(1, author_id=1, text="Anna's")
    resp = v3(
        portal, "tasks.task.result.update", boris["access_token"], id=rid, fields={"text": "Boris"}
    )
    assert resp.status_code == 403
    assert error_of(resp)["code"] == ACCESS_DENIED
    assert portal.results(1)[0]["text"] == "Anna's"


def test_v3_update_admin_cannot_edit_others_result(portal, anna):
    rid = portal.add_result(1, author_id=2, text="Boris's")
    resp = v3(
        portal, "tasks.task.result.update", anna["access_token"], id=rid, fields={"text": "x"}
    )
    assert resp.status_code == 403 and error_of(resp)["code"] == ACCESS_DENIED


def test_v3_update_unknown_id_is_403(portal, anna):
    resp = v3(
        portal, "tasks.task.result.update", anna["access_token"], id=999, fields={"text": "x"}
    )
    assert resp.status_code == 403 and error_of(resp) == {
        "code": ACCESS_DENIED,
        "message": "Access denied",
    }


def test_v3_rights_are_computed_for_the_caller(portal, anna, boris):
    portal.add_result(1, author_id=1, text="Anna's")
    portal.add_result(1, author_id=2, text="Boris's")
    as_boris = v3(portal, "tasks.task.result.list", boris["access_token"], filter=[["taskId", 1]])
    rights = {i["text"]: i["rights"] for i in as_boris.json()["result"]["items"]}
    assert rights == {
        "Anna's": {"edit": False, "remove": False},
        "Boris's": {"edit": True, "remove": True},
    }
    as_anna = v3(portal, "tasks.task.result.list", anna["access_token"], filter=[["taskId", 1]])
    rights = {i["text"]: i["rights"] for i in as_anna.json()["result"]["items"]}
    assert rights == {
        "Anna's": {"edit": True, "remove": True},
        "Boris's": {"edit": False, "remove": False},
    }


ADD_ERRORS = [
    pytest.param({}, 400, REQUEST_VALIDATION, "fields", id="no-fields"),
    pytest.param({"fields": {"text": "x"}}, 400, DTO_VALIDATION, "taskId", id="no-taskId"),
    pytest.param({"fields": {"taskId": 1}}, 400, DTO_VALIDATION, "text", id="no-text"),
    pytest.param(
        {"fields": {"taskId": 1, "text": ""}}, 400, DTO_VALIDATION, "text", id="empty-text"
    ),
    pytest.param(
        {"fields": {"taskId": 1, "text": "x", "fileIds": []}},
        400,
        DTO_VALIDATION,
        "fileIds",
        id="fileIds",
    ),
    pytest.param(
        {"fields": {"taskId": "one", "text": "x"}},
        400,
        REQUEST_VALIDATION,
        "taskId",
        id="taskId-not-int",
    ),
    pytest.param(
        {"fields": {"taskId": -5, "text": "x"}},
        400,
        REQUEST_VALIDATION,
        "taskId",
        id="taskId-negative",
    ),
    pytest.param(
        {"fields": {"taskId": None, "text": "x"}},
        400,
        REQUEST_VALIDATION,
        "taskId",
        id="taskId-null",
    ),
    pytest.param(
        {"fields": {"taskId": 99, "text": "x"}},
        400,
        REQUEST_VALIDATION,
        "taskId",
        id="task-not-found",
    ),
    pytest.param(
        {"fields": {"taskId": 1, "text": "x", "authorId": 2}},
        400,
        UNKNOWN_DTO_PROPERTY,
        "fields",
        id="unknown-field",
    ),
]


@pytest.mark.parametrize("body,status,code,field", ADD_ERRORS)
def test_v3_add_validation_errors(portal, anna, body, status, code, field):
    resp = v3(portal, "tasks.task.result.add", anna["access_token"], **body)
    assert resp.status_code == status
    error = error_of(resp)
    assert error["code"] == code
    assert [entry["field"] for entry in error["validation"]] == [field]
    assert portal.results(1) == []


def test_v3_add_messages_for_task_id(portal, anna):
    messages = {}
    for task_id in (None, -1, 99):
        resp = v3(
            portal,
            "tasks.task.result.add",
            anna["access_token"],
            fields={"taskId": task_id, "text": "x"},
        )
        messages[task_id] = error_of(resp)["validation"][0]["message"]
    assert messages == {
        None: "Task id must be set",
        -1: "Task id must be positive",
        99: "Task not found",
    }


def test_v3_add_without_task_access_is_403(portal, boris):
    secret = portal.add_task(title="Secret", members=[1])
    resp = v3(
        portal,
        "tasks.task.result.add",
        boris["access_token"],
        fields={"taskId": secret, "text": "x"},
    )
    assert resp.status_code == 403 and error_of(resp)["code"] == ACCESS_DENIED


DELETE_ERRORS = [
    pytest.param(
        {},
        [
            {"message": "At least one required field must be filled: id, filter"},
            {"message": "Only one of the values must be provided: id, filter"},
        ],
        id="nothing",
    ),
    pytest.param(
        {"id": None},
        [{"field": "id", "message": "Required field `id` is not specified"}],
        id="id-null",
    ),
    pytest.param(
        {"id": "RID", "filter": [["id", "RID"]]},
        [{"message": "Only one of the values must be provided: id, filter"}],
        id="id-and-filter",
    ),
]


@pytest.mark.parametrize("body,validation", DELETE_ERRORS)
def test_v3_delete_validation_errors(portal, anna, body, validation):
    rid = portal.add_result(1, author_id=1)
    resp = v3(portal, "tasks.task.result.delete", anna["access_token"], **_with_rid(body, rid))
    assert resp.status_code == 400
    assert error_of(resp)["code"] == REQUEST_VALIDATION
    assert error_of(resp)["validation"] == validation
    assert len(portal.results(1)) == 1


def test_v3_delete_by_non_author_is_403(portal, boris):
    rid = portal.add_result(1, author_id=1)
    resp = v3(portal, "tasks.task.result.delete", boris["access_token"], id=rid)
    assert resp.status_code == 403 and error_of(resp)["code"] == ACCESS_DENIED
    assert len(portal.results(1)) == 1


# ---- list


@pytest.fixture
def five_results(portal):
    task2 = portal.add_task(title="Other")
    ids = [
        portal.add_result(1, author_id=1 + i % 2, text=f"r{i}", created_at=1_700_000_000 + i * 60)
        for i in range(5)
    ]
    portal.add_result(task2, author_id=1, text="elsewhere")
    return ids


@pytest.mark.parametrize(
    "condition,expected",
    [
        (["id", "RID2"], [2]),
        (["id", "=", "RID2"], [2]),
        (["id", "!=", "RID2"], [0, 1, 3, 4]),
        (["id", ">", "RID2"], [3, 4]),
        (["id", ">=", "RID2"], [2, 3, 4]),
        (["id", "<", "RID2"], [0, 1]),
        (["id", "<=", "RID2"], [0, 1, 2]),
        (["id", "in", ["RID0", "RID4"]], [0, 4]),
        (["id", ["RID1", "RID3"]], [1, 3]),
        (["id", "between", ["RID1", "RID3"]], [1, 2, 3]),
        (["authorId", 2], [1, 3]),
        (["status", "open"], [0, 1, 2, 3, 4]),
        (["messageId", None], [0, 1, 2, 3, 4]),
    ],
)
def test_v3_list_filter_operators(portal, anna, five_results, condition, expected):
    def resolve(value):  # "RID<n>" -> id of the n-th result
        if isinstance(value, list):
            return [resolve(x) for x in value]
        if isinstance(value, str) and value.startswith("RID"):
            return five_results[int(value[3:])]
        return value

    condition = resolve(condition)
    resp = v3(
        portal, "tasks.task.result.list", anna["access_token"], filter=[["taskId", 1], condition]
    )
    assert resp.status_code == 200, resp.text
    assert [i["id"] for i in resp.json()["result"]["items"]] == [five_results[k] for k in expected]
    assert "total" not in resp.json()["result"] and "total" not in resp.json()


def test_v3_list_or_group_order_select_pagination(portal, anna, five_results):
    body = {
        "filter": [
            ["taskId", 1],
            {"logic": "or", "conditions": [["authorId", 2], ["id", five_results[0]]]},
        ],
        "order": {"createdAt": "DESC"},
        "select": ["id", "text", "author"],
        "pagination": {"limit": 2, "offset": 1},
    }
    resp = v3(portal, "tasks.task.result.list", anna["access_token"], **body)
    items = resp.json()["result"]["items"]
    assert [i["text"] for i in items] == ["r1", "r0"]  # r3, r1, r0 by createdAt DESC; offset 1
    assert set(items[0]) == {"id", "text", "author"}
    assert items[0]["author"]["id"] == 2
    page2 = v3(
        portal,
        "tasks.task.result.list",
        anna["access_token"],
        filter=[["taskId", 1]],
        pagination={"page": 2, "limit": 2},
    ).json()["result"]["items"]
    assert [i["id"] for i in page2] == five_results[2:4]


def test_v3_list_default_limit_is_50_and_max_1000(portal, anna):
    with portal.lock:
        for i in range(1005):
            portal.create_result(1, 1, f"r{i}")
    items = v3(portal, "tasks.task.result.list", anna["access_token"], filter=[["taskId", 1]])
    assert len(items.json()["result"]["items"]) == 50
    items = v3(
        portal,
        "tasks.task.result.list",
        anna["access_token"],
        filter=[["taskId", 1]],
        pagination={"limit": 5000},
    )
    assert len(items.json()["result"]["items"]) == 1000


def test_v3_list_page_cap_holds_whatever_limit_asks(portal, anna):
    with portal.lock:
        for i in range(45):
            portal.create_result(1, 1, f"r{i}")
    portal.result_page_cap = 20

    def page(offset):
        return v3(
            portal,
            "tasks.task.result.list",
            anna["access_token"],
            filter=[["taskId", 1]],
            pagination={"limit": 50, "offset": offset},
        ).json()["result"]["items"]

    assert [len(page(offset)) for offset in (0, 20, 40)] == [20, 20, 5]


LIST_ERRORS = [
    pytest.param({}, REQUEST_VALIDATION, "filter", id="no-filter"),
    pytest.param({"filter": []}, REQUEST_VALIDATION, "filter", id="empty-filter"),
    pytest.param(
        {"filter": [["id", 1]]},
        P + "VALIDATION_REQUESTFILTERVALIDATIONEXCEPTION",
        "filter.taskId",
        id="no-taskId",
    ),
    pytest.param(
        {"filter": [["taskId", "one"]]}, REQUEST_VALIDATION, "taskId", id="taskId-not-int"
    ),
    pytest.param({"filter": "taskId=1"}, P + "INVALIDFILTEREXCEPTION", "filter", id="unparsable"),
    pytest.param(
        {"filter": [["taskId", "like", 1]]},
        P + "UNKNOWNFILTEROPERATOREXCEPTION",
        "filter",
        id="bad-operator",
    ),
    pytest.param(
        {"filter": [["taskId", 1], ["color", 1]]},
        UNKNOWN_DTO_PROPERTY,
        "filter",
        id="unknown-field",
    ),
    pytest.param(
        {"filter": [["taskId", 1]], "select": ["id", "color"]},
        UNKNOWN_DTO_PROPERTY,
        "select",
        id="unknown-select",
    ),
    pytest.param(
        {"filter": [["taskId", 1]], "order": {"color": "ASC"}},
        UNKNOWN_DTO_PROPERTY,
        "order",
        id="unknown-order-field",
    ),
    pytest.param(
        {"filter": [["taskId", 1]], "order": {"id": "UP"}},
        P + "INVALIDORDEREXCEPTION",
        "order",
        id="bad-direction",
    ),
    pytest.param(
        {"filter": [["taskId", 1]], "pagination": {"limit": "ten"}},
        P + "INVALIDPAGINATIONEXCEPTION",
        "pagination",
        id="bad-pagination",
    ),
]


@pytest.mark.parametrize("body,code,field", LIST_ERRORS)
def test_v3_list_errors(portal, anna, body, code, field):
    resp = v3(portal, "tasks.task.result.list", anna["access_token"], **body)
    assert resp.status_code == 400
    assert error_of(resp)["code"] == code
    assert error_of(resp)["validation"][0]["field"] == field


def test_v3_list_of_unreadable_task_is_403(portal, boris):
    secret = portal.add_task(title="Secret", members=[1])
    resp = v3(portal, "tasks.task.result.list", boris["access_token"], filter=[["taskId", secret]])
    assert resp.status_code == 403 and error_of(resp)["code"] == ACCESS_DENIED


# ---- addfromchatmessage


def test_v3_add_from_chat_message(portal, boris):
    mid = portal.add_chat_message(1, author_id=2, text="Sent the report")
    resp = v3(
        portal,
        "tasks.task.result.addfromchatmessage",
        boris["access_token"],
        fields={"messageId": mid},
    )
    assert resp.status_code == 200
    item = resp.json()["result"]["item"]
    assert item["messageId"] == mid and item["taskId"] == 1 and item["text"] == "Sent the report"


@pytest.mark.parametrize(
    "fields,code,field",
    [
        ({}, DTO_VALIDATION, "messageId"),
        ({"messageId": "x"}, REQUEST_VALIDATION, "messageId"),
        ({"messageId": "MID", "fileIds": [1]}, DTO_VALIDATION, "fileIds"),
        ({"messageId": "MID", "text": "x"}, UNKNOWN_DTO_PROPERTY, "fields"),
        ({"messageId": "FOREIGN"}, REQUEST_VALIDATION, "messageId"),
        (None, REQUEST_VALIDATION, "fields"),
    ],
)
def test_v3_add_from_chat_message_errors(portal, anna, fields, code, field):
    mid = portal.add_chat_message(1, author_id=1)
    foreign = portal.add_chat_message(None, author_id=1)
    body = (
        {}
        if fields is None
        else {
            "fields": {
                k: mid if v == "MID" else foreign if v == "FOREIGN" else v
                for k, v in fields.items()
            }
        }
    )
    resp = v3(portal, "tasks.task.result.addfromchatmessage", anna["access_token"], **body)
    assert resp.status_code == 400
    assert error_of(resp)["code"] == code and error_of(resp)["validation"][0]["field"] == field


# ---- transport rules


@pytest.mark.parametrize(
    "kwargs",
    [
        {"data": {"auth": "x", "fields[taskId]": "1"}},
        {"data": "{not json", "headers": {"Content-Type": "application/json"}},
        {"data": "[1, 2]", "headers": {"Content-Type": "application/json"}},
    ],
)
def test_v3_body_must_be_a_json_object(portal, anna, kwargs):
    resp = requests.post(portal.url + "/rest/api/tasks.task.result.add", timeout=TIMEOUT, **kwargs)
    assert resp.status_code == 400
    assert error_of(resp)["code"] == P + "INVALIDJSONEXCEPTION"


def test_v3_unknown_method(portal, anna):
    resp = v3(portal, "tasks.task.result.get", anna["access_token"], id=1)
    assert resp.status_code == 404 and error_of(resp)["code"] == P + "METHODNOTFOUNDEXCEPTION"


@pytest.mark.parametrize(
    "scopes,ok", [("task", True), ("tasks", True), ("placement,user_brief", False)]
)
def test_v3_needs_task_or_tasks_scope(fake, scopes, ok):
    portal = fake.add_portal(scopes=scopes)
    portal.add_user(name="Anna", admin=True)
    portal.add_task(title="T")
    resp = v3(
        portal,
        "tasks.task.result.list",
        portal.issue_tokens(1)["access_token"],
        filter=[["taskId", 1]],
    )
    if ok:
        assert resp.status_code == 200
    else:
        assert (
            resp.status_code == 403 and error_of(resp)["code"] == P + "INSUFFICIENTSCOPEEXCEPTION"
        )


def test_v3_auth_errors_use_the_classic_shape(portal, anna):
    resp = v3(portal, "tasks.task.result.list", None, filter=[["taskId", 1]])
    assert resp.status_code == 401 and resp.json()["error"] == "NO_AUTH_FOUND"
    resp = requests.post(
        portal.url + "/rest/api/tasks.task.result.list",
        params={"auth": anna["access_token"]},
        json={"filter": [["taskId", 1]]},
        timeout=TIMEOUT,
    )
    assert resp.status_code == 401  # v3 does not read the query string
    portal.expire_access_tokens()
    resp = v3(portal, "tasks.task.result.list", anna["access_token"], filter=[["taskId", 1]])
    assert resp.status_code == 401
    assert resp.json() == {
        "error": "expired_token",
        "error_description": "The access token provided has expired.",
    }


def test_v3_webhook_path(portal):
    hook = portal.add_webhook(2)
    base = hook.replace("/rest/", "/rest/api/")
    resp = requests.post(
        base + "tasks.task.result.add",
        json={"fields": {"taskId": 1, "text": "via hook"}},
        timeout=TIMEOUT,
    )
    assert resp.status_code == 200 and resp.json()["result"]["item"]["authorId"] == 2


def test_v3_concurrent_adds_are_all_stored(portal, anna):
    errors = []

    def worker(n):
        with requests.Session() as session:
            for i in range(2):
                resp = session.post(
                    portal.url + "/rest/api/tasks.task.result.add",
                    timeout=TIMEOUT,
                    json={
                        "auth": anna["access_token"],
                        "fields": {"taskId": 1, "text": f"{n}-{i}"},
                    },
                )
                if resp.status_code != 200:
                    errors.append(resp.status_code)

    portal.set_rate_limit(1000, 100)
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    results = portal.results(1)
    assert len(results) == 100
    assert sorted(r["id"] for r in results) == list(range(1, 101))
    assert len(portal.calls("tasks.task.result.add")) == 100
