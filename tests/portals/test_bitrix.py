"""The Bitrix24 REST client, OAuth server and error mapping, against `responses` mocks."""

from __future__ import annotations

import ipaddress
import json
import logging
import pickle
import socket
import time
import traceback
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import responses
from requests.adapters import HTTPAdapter

from b24app.masking import mask_secret
from b24app.portals.bitrix import (
    BitrixAccessDenied,
    BitrixAuthError,
    BitrixClient,
    BitrixConfig,
    BitrixError,
    BitrixTokenExpired,
    BitrixUnavailable,
    BitrixValidationError,
    OAuthServer,
    TokenSet,
    UnsafeURL,
    build_session,
    oauth_origin_for,
)
from b24app.portals.bitrix.netguard import GuardedAdapter
from b24app.portals.ratelimit import RateLimitTimeout

TOKEN = "s6p6eclrvim6da22ft9ch94ekreb52lv"
NEW_TOKEN = "lh8ze36o8ulgrljbyscr36c7ay5sinva"
REFRESH = "4s386p3q0tr8dy89xvmt96234v3dljg8"
NEW_REFRESH = "5f1ih5tsnsb11sc5heg3kp4ywqnjhd09"
SECRET = "LJSl0lNB76B5YY6u0YVQ3AW0DrVADcRTwVr4y99PXU1BWQybWK"
CODE = "avmocpghblyi01m3h42bljvqtyd19sw1"
CLIENT_ID = "app.573ad8a0346747.09223434"
MEMBER_ID = "a223c6b3710f85df22e9377d6c4f7553"
SECRETS = (TOKEN, NEW_TOKEN, REFRESH, NEW_REFRESH, SECRET, CODE)

PORTAL = "https://portal.bitrix24.com"
ENDPOINT = f"{PORTAL}/rest/"
V3 = f"{PORTAL}/rest/api/"
OAUTH = "https://oauth.bitrix.info"
TIME_BLOCK = {"start": 1777529700, "finish": 1777529700.12, "duration": 0.12,
              "operating_reset_at": 1777530300, "operating": 0.1}  # fmt: skip

PRIVATE_HOSTS = {"intranet.example": "10.0.0.5"}


@pytest.fixture(autouse=True)
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every name is public except PRIVATE_HOSTS; IP literals resolve to themselves."""

    def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):  # noqa: A002
        try:
            address = str(ipaddress.ip_address(host))
        except ValueError:
            address = PRIVATE_HOSTS.get(host, "93.184.216.34")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.fixture
def rsps():
    with responses.RequestsMock() as mock:
        yield mock


@pytest.fixture
def config() -> BitrixConfig:
    return BitrixConfig(client_id=CLIENT_ID, client_secret=SECRET)


class RecordingLimiter:
    """Test double of the rate limiter: records calls, never waits."""

    def __init__(self, timeout: float | None = None) -> None:
        self.calls: list[tuple] = []
        self._timeout = timeout

    def acquire(self, key, burst, rate, *, max_wait=None) -> float:
        self.calls.append(("acquire", key, burst, rate, max_wait))
        if self._timeout is not None:
            raise RateLimitTimeout(self._timeout)
        return 0.0

    def penalize(self, key, seconds) -> None:
        self.calls.append(("penalize", key, seconds))

    def reset(self, key) -> None:
        self.calls.append(("reset", key))


def make_client(config: BitrixConfig, **kwargs) -> BitrixClient:
    return BitrixClient(ENDPOINT, TOKEN, config=config, **kwargs)


def body_of(call) -> dict:
    return json.loads(call.request.body)


def ok(result, **extra) -> dict:
    return {"result": result, "time": TIME_BLOCK, **extra}


# --- successful calls --------------------------------------------------------------------------


def test_call_posts_json_with_auth_in_body(rsps, config) -> None:
    rsps.post(f"{ENDPOINT}user.current", json=ok({"ID": "3"}))
    client = make_client(config)

    assert client.call("user.current", {"select": ["ID"]}) == {"ID": "3"}

    request = rsps.calls[0].request
    assert request.url == f"{ENDPOINT}user.current"
    assert json.loads(request.body) == {"select": ["ID"], "auth": TOKEN}
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Accept"] == "application/json"
    assert request.headers["User-Agent"] == "b24-results/0.1"
    assert "Idempotency-Key" not in request.headers
    assert request.req_kwargs["timeout"] == (3.05, 20.0)
    assert client.last_time == TIME_BLOCK


def test_call_v3_posts_to_rest_api_and_returns_result(rsps, config) -> None:
    item = {"id": 17, "taskId": 51, "text": "Done"}
    rsps.post(f"{V3}tasks.task.result.add", json=ok({"item": item}))

    result = make_client(config).call_v3(
        "tasks.task.result.add", {"fields": {"taskId": 51, "text": "Done"}}
    )

    assert result == {"item": item}
    assert body_of(rsps.calls[0]) == {"fields": {"taskId": 51, "text": "Done"}, "auth": TOKEN}


@pytest.mark.parametrize(
    "method",
    [
        "tasks.task.result.add",
        "tasks.task.result.update",
        "tasks.task.result.delete",
        "tasks.task.result.addfromchatmessage",
    ],
)
def test_call_v3_sends_fresh_idempotency_key_on_writes(rsps, config, method) -> None:
    rsps.post(f"{V3}{method}", json=ok({"result": True}))
    client = make_client(config)

    client.call_v3(method, {"id": 1})
    client.call_v3(method, {"id": 1})

    first, second = (call.request.headers["Idempotency-Key"] for call in rsps.calls)
    assert len(first) == 32 and first != second


def test_call_v3_uses_given_idempotency_key(rsps, config) -> None:
    rsps.post(f"{V3}tasks.task.result.update", json=ok({"item": {}}))
    make_client(config).call_v3("tasks.task.result.update", {"id": 1}, idempotency_key="change-42")
    assert rsps.calls[0].request.headers["Idempotency-Key"] == "change-42"


@pytest.mark.parametrize("method", ["tasks.task.result.list", "tasks.task.get", "user.current"])
def test_call_v3_sends_no_idempotency_key_on_reads(rsps, config, method) -> None:
    rsps.post(f"{V3}{method}", json=ok({"items": []}))
    make_client(config).call_v3(method, {})
    assert "Idempotency-Key" not in rsps.calls[0].request.headers


def test_call_v3_write_flag_forces_idempotency_key(rsps, config) -> None:
    rsps.post(f"{V3}tasks.task.chat.message.send", json=ok({"result": True}))
    make_client(config).call_v3("tasks.task.chat.message.send", {}, write=True)
    assert rsps.calls[0].request.headers["Idempotency-Key"]


@pytest.mark.parametrize("key", ["", "x" * 256, "ключ", "a\nb"])
def test_call_v3_rejects_invalid_idempotency_key(config, key) -> None:
    with pytest.raises(ValueError):
        make_client(config).call_v3("tasks.task.result.add", {}, idempotency_key=key)


@pytest.mark.parametrize("method", ["", "../oauth/token", "user.current?auth=x", "a..b", "a/b"])
def test_call_rejects_method_names_that_change_the_url(config, method) -> None:
    with pytest.raises(ValueError):
        make_client(config).call(method)


def _pages(rsps, *pages) -> None:
    for page in pages:
        rsps.post(f"{V3}tasks.task.result.list", json=ok({"items": page}))


def _ids(first: int, last: int) -> list[dict]:
    return [{"id": n} for n in range(first, last + 1)]


def test_list_v3_pages_until_a_page_shorter_than_a_full_one(rsps, config) -> None:
    """Two items per page were asked for and came: a page of one is the end."""
    _pages(rsps, _ids(1, 2), _ids(3, 4), _ids(5, 5))

    listing = make_client(config).list_v3(
        "tasks.task.result.list", {"filter": [["taskId", 51]]}, page_size=2
    )

    assert listing.items == _ids(1, 5)
    bodies = [body_of(call) for call in rsps.calls]
    assert [b["pagination"] for b in bodies] == [
        {"limit": 2, "offset": 0},
        {"limit": 2, "offset": 2},
        {"limit": 2, "offset": 4},
    ]
    assert all(b["filter"] == [["taskId", 51]] for b in bodies)
    assert listing.largest_page == 2


def test_list_v3_asks_past_a_short_first_page(rsps, config) -> None:
    """Nothing is known of the portal's page size: a short first page may be its cap, so the
    next page is asked for, and an empty one ends the list."""
    _pages(rsps, _ids(1, 3), [])
    listing = make_client(config).list_v3("tasks.task.result.list", {}, page_size=50)
    assert listing.items == _ids(1, 3)
    assert [body_of(c)["pagination"]["offset"] for c in rsps.calls] == [0, 3]
    assert listing.largest_page == 3


def test_list_v3_learns_a_page_cap_below_the_limit_it_asked_for(rsps, config) -> None:
    """45 results on a portal that returns 20 per page whatever `limit` says: all 45, and the
    short last page (shorter than the proven cap) ends the list without another call."""
    _pages(rsps, _ids(1, 20), _ids(21, 40), _ids(41, 45))

    listing = make_client(config).list_v3("tasks.task.result.list", {}, page_size=50)

    assert listing.items == _ids(1, 45)
    assert [body_of(c)["pagination"]["offset"] for c in rsps.calls] == [0, 20, 40]
    assert listing.largest_page == 20


def test_list_v3_ends_on_a_page_shorter_than_one_the_portal_is_known_to_return(
    rsps, config
) -> None:
    _pages(rsps, _ids(1, 3))

    listing = make_client(config).list_v3("tasks.task.result.list", {}, known_page=12)

    assert listing.items == _ids(1, 3)
    assert len(rsps.calls) == 1
    assert listing.largest_page == 12


def test_list_v3_a_page_as_long_as_the_known_one_may_be_a_cap(rsps, config) -> None:
    _pages(rsps, _ids(1, 12), _ids(13, 14))

    listing = make_client(config).list_v3("tasks.task.result.list", {}, known_page=12)

    assert listing.items == _ids(1, 14)
    assert len(rsps.calls) == 2


def test_list_v3_stops_on_an_empty_page(rsps, config) -> None:
    _pages(rsps, _ids(1, 2), [])
    listing = make_client(config).list_v3("tasks.task.result.list", {}, page_size=2)
    assert listing.items == _ids(1, 2) and len(rsps.calls) == 2


def test_list_v3_ends_when_the_portal_repeats_a_page(rsps, config) -> None:
    """A portal that ignores `offset` answers the same page forever: the listing ends at the
    first page that brings nothing new, and keeps each item once."""
    _pages(rsps, _ids(1, 2), _ids(1, 2))
    listing = make_client(config).list_v3("tasks.task.result.list", {}, page_size=2)
    assert listing.items == _ids(1, 2) and len(rsps.calls) == 2


def test_list_v3_reads_at_most_max_items(rsps, config) -> None:
    _pages(rsps, _ids(1, 2), _ids(3, 4), _ids(5, 6))
    listing = make_client(config).list_v3("tasks.task.result.list", {}, page_size=2, max_items=5)
    assert listing.items == _ids(1, 5) and len(rsps.calls) == 3


# --- error mapping -----------------------------------------------------------------------------

CLASSIC_ERRORS = [  # §6.1, §6.2, §5.1, §5.4
    ("INTERNAL_SERVER_ERROR", 500, BitrixUnavailable),
    ("ERROR_UNEXPECTED_ANSWER", 500, BitrixUnavailable),
    ("QUERY_LIMIT_EXCEEDED", 503, BitrixUnavailable),
    ("OPERATION_TIME_LIMIT", 429, BitrixUnavailable),
    ("OVERLOAD_LIMIT", 503, BitrixUnavailable),
    ("ERROR_BATCH_METHOD_NOT_ALLOWED", 405, BitrixError),
    ("ERROR_BATCH_LENGTH_EXCEEDED", 400, BitrixValidationError),
    ("NO_AUTH_FOUND", 401, BitrixTokenExpired),  # renewed once, as an expired one (§6)
    ("INVALID_REQUEST", 400, BitrixError),
    ("ACCESS_DENIED", 403, BitrixAccessDenied),
    ("INVALID_CREDENTIALS", 403, BitrixAccessDenied),
    ("ERROR_MANIFEST_IS_NOT_AVAILABLE", 404, BitrixError),
    ("insufficient_scope", 403, BitrixAccessDenied),
    ("expired_token", 401, BitrixTokenExpired),
    ("invalid_token", 401, BitrixTokenExpired),
    ("user_access_error", 403, BitrixAccessDenied),
    ("PORTAL_DELETED", 500, BitrixAuthError),
    ("PORTAL_DELETED", 410, BitrixAuthError),
    ("ERROR_METHOD_NOT_FOUND", 404, BitrixError),
    ("authorization_error", 401, BitrixAuthError),
    ("APPLICATION_NOT_FOUND", 401, BitrixAuthError),
    ("ERROR_OAUTH", 401, BitrixAuthError),
    ("NOT_INSTALLED", 401, BitrixAuthError),
    ("PAYMENT_REQUIRED", 401, BitrixAuthError),
    ("METHOD_CONFIRM_WAITING", 401, BitrixAccessDenied),
    ("METHOD_CONFIRM_DENIED", 403, BitrixAccessDenied),
    ("WRONG_AUTH_TYPE", 403, BitrixAccessDenied),
    ("ALLOWED_ONLY_INTRANET_USER", 403, BitrixAccessDenied),
    ("ACCESS_ERROR", 403, BitrixAccessDenied),
    ("NOT_FOUND", 404, BitrixError),
    ("INVALID_ARG_VALUE", 400, BitrixValidationError),
    ("ERROR_ARGUMENT", 400, BitrixValidationError),
    ("ERROR_ARGUMENT", 200, BitrixValidationError),
    ("100", 400, BitrixValidationError),
    ("0", 400, BitrixError),
    ("ERROR_CORE", 400, BitrixError),
    ("SOMETHING_NEW", 503, BitrixUnavailable),
    ("SOMETHING_NEW", 401, BitrixAuthError),
    ("SOMETHING_NEW", 403, BitrixAccessDenied),
]

V3_ERRORS = [  # §5.2 common REST 3.0 errors
    ("VALIDATION_REQUESTVALIDATIONEXCEPTION", 400, BitrixValidationError),
    ("VALIDATION_DTOVALIDATIONEXCEPTION", 400, BitrixValidationError),
    ("VALIDATION_REQUESTFILTERVALIDATIONEXCEPTION", 400, BitrixValidationError),
    ("INVALIDJSONEXCEPTION", 400, BitrixValidationError),
    ("UNKNOWNDTOPROPERTYEXCEPTION", 400, BitrixValidationError),
    ("UNKNOWNFILTEROPERATOREXCEPTION", 400, BitrixValidationError),
    ("INVALIDFILTEREXCEPTION", 400, BitrixValidationError),
    ("INVALIDPAGINATIONEXCEPTION", 400, BitrixValidationError),
    ("INVALIDORDEREXCEPTION", 400, BitrixValidationError),
    ("INVALIDSELECTEXCEPTION", 400, BitrixValidationError),
    ("ENTITYNOTFOUNDEXCEPTION", 400, BitrixValidationError),
    ("IDEMPOTENCYKEYREUSEDEXCEPTION", 422, BitrixValidationError),
    ("INVALIDIDEMPOTENCYKEYEXCEPTION", 400, BitrixValidationError),
    ("ACCESSDENIEDEXCEPTION", 403, BitrixAccessDenied),
    ("INSUFFICIENTSCOPEEXCEPTION", 403, BitrixAccessDenied),
    ("METHODNOTFOUNDEXCEPTION", 404, BitrixError),
]


@pytest.mark.parametrize(("code", "status", "expected"), CLASSIC_ERRORS)
def test_call_maps_classic_error_codes(rsps, config, code, status, expected) -> None:
    rsps.post(
        f"{ENDPOINT}some.method",
        json={"error": code, "error_description": "Текст на языке портала"},
        status=status,
    )
    with pytest.raises(BitrixError) as caught:
        make_client(config).call("some.method")
    assert type(caught.value) is expected
    assert caught.value.code == code
    assert caught.value.status == status
    assert caught.value.description == "Текст на языке портала"


@pytest.mark.parametrize(("name", "status", "expected"), V3_ERRORS)
def test_call_v3_maps_v3_error_codes(rsps, config, name, status, expected) -> None:
    code = f"BITRIX_REST_V3_EXCEPTION_{name}"
    rsps.post(
        f"{V3}tasks.task.result.list",
        json={"error": {"code": code, "message": "Сообщение"}},
        status=status,
    )
    with pytest.raises(BitrixError) as caught:
        make_client(config).call_v3("tasks.task.result.list", {})
    assert type(caught.value) is expected
    assert (caught.value.code, caught.value.status) == (code, status)
    assert caught.value.description == "Сообщение"


@pytest.mark.parametrize(
    "body",
    [
        {"error": "expired_token", "error_description": "The access token provided has expired."},
        {"error": {"code": "expired_token", "message": "The access token provided has expired."}},
    ],
)
def test_call_v3_reads_both_error_shapes(rsps, config, body) -> None:
    rsps.post(f"{V3}tasks.task.result.list", json=body, status=401)
    with pytest.raises(BitrixTokenExpired) as caught:
        make_client(config).call_v3("tasks.task.result.list", {})
    assert caught.value.code == "expired_token"


def test_call_v3_validation_error_carries_entries(rsps, config) -> None:
    rsps.post(
        f"{V3}tasks.task.result.delete",
        json={
            "error": {
                "code": "BITRIX_REST_V3_EXCEPTION_VALIDATION_REQUESTVALIDATIONEXCEPTION",
                "message": "Error validating the request object",
                "validation": [
                    {"field": "fields", "message": "Required field `fields` is missing"},
                    {"message": "Only one of the values must be provided: id, filter"},
                ],
            }
        },
        status=400,
    )
    with pytest.raises(BitrixValidationError) as caught:
        make_client(config).call_v3("tasks.task.result.delete", {})
    assert caught.value.validation == [
        {"field": "fields", "message": "Required field `fields` is missing"},
        {"field": None, "message": "Only one of the values must be provided: id, filter"},
    ]
    assert "fields: Required field" in str(caught.value)


def test_call_classic_error_argument_becomes_validation_entry(rsps, config) -> None:
    rsps.post(
        f"{ENDPOINT}placement.bind",
        json={
            "error": "ERROR_ARGUMENT",
            "argument": "PLACEMENT",
            "error_description": "Argument 'PLACEMENT' is null or empty",
        },
        status=400,
    )
    with pytest.raises(BitrixValidationError) as caught:
        make_client(config).call("placement.bind", {})
    assert caught.value.validation == [
        {"field": "PLACEMENT", "message": "Argument 'PLACEMENT' is null or empty"}
    ]


@pytest.mark.parametrize(
    ("status", "body", "expected", "code"),
    [
        (502, "<html><body>Bad Gateway</body></html>", BitrixUnavailable, "HTTP_502"),
        (504, "", BitrixUnavailable, "HTTP_504"),
        (503, json.dumps({"message": "busy"}), BitrixUnavailable, "HTTP_503"),
        (404, "<html>Not found</html>", BitrixError, "HTTP_404"),
        (401, "<html>Unauthorized</html>", BitrixError, "HTTP_401"),
        (200, "<html>maintenance</html>", BitrixError, "INVALID_RESPONSE"),
        (200, json.dumps({"time": TIME_BLOCK}), BitrixError, "INVALID_RESPONSE"),
    ],
)
def test_call_maps_bodies_without_error_code(rsps, config, status, body, expected, code) -> None:
    rsps.post(f"{ENDPOINT}profile", body=body, status=status, content_type="text/html")
    with pytest.raises(BitrixError) as caught:
        make_client(config).call("profile")
    assert type(caught.value) is expected
    assert caught.value.code == code


@pytest.mark.parametrize(
    ("exception", "code"),
    [
        (requests.exceptions.ConnectTimeout("connect timed out"), "TIMEOUT"),
        (requests.exceptions.ReadTimeout("read timed out"), "TIMEOUT"),
        (requests.exceptions.ConnectionError("connection refused"), "CONNECTION_ERROR"),
        (requests.exceptions.SSLError("bad certificate"), "CONNECTION_ERROR"),
    ],
)
def test_call_maps_transport_failures_to_unavailable(rsps, config, exception, code) -> None:
    rsps.post(f"{ENDPOINT}profile", body=exception)
    with pytest.raises(BitrixUnavailable) as caught:
        make_client(config).call("profile")
    assert caught.value.code == code
    assert caught.value.status is None


def test_bitrix_errors_survive_pickling() -> None:
    original = BitrixUnavailable("OPERATION_TIME_LIMIT", "busy", status=429, retry_after=3.0,
                                 operating_reset_at=1777530300)  # fmt: skip
    validation = BitrixValidationError("X", "bad", status=400, validation=[{"field": "id"}])
    for error in (original, validation, UnsafeURL("PRIVATE_ADDRESS", "no")):
        copy = pickle.loads(pickle.dumps(error))  # noqa: S301 (our own object, as Celery does)
        assert type(copy) is type(error)
        assert copy.__dict__ == error.__dict__


# --- expired token -----------------------------------------------------------------------------

EXPIRED = {"error": "expired_token", "error_description": "The access token provided has expired."}


def test_call_v3_refreshes_once_and_repeats_with_same_idempotency_key(rsps, config) -> None:
    rsps.post(f"{V3}tasks.task.result.add", json=EXPIRED, status=401)
    rsps.post(f"{V3}tasks.task.result.add", json=ok({"item": {"id": 18}}))
    refreshes: list[str] = []

    def on_expired() -> str:
        refreshes.append("called")
        return NEW_TOKEN

    client = make_client(config, on_expired=on_expired)
    result = client.call_v3("tasks.task.result.add", {"fields": {"taskId": 51, "text": "x"}})

    assert result == {"item": {"id": 18}}
    assert refreshes == ["called"]
    first, second = (call.request for call in rsps.calls)
    assert first.headers["Idempotency-Key"] == second.headers["Idempotency-Key"]
    assert json.loads(first.body)["auth"] == TOKEN
    assert json.loads(second.body) == {"fields": {"taskId": 51, "text": "x"}, "auth": NEW_TOKEN}


def test_call_refresh_on_invalid_token_then_uses_new_token_for_later_calls(rsps, config) -> None:
    rsps.post(f"{ENDPOINT}profile", json={"error": "invalid_token"}, status=401)
    rsps.post(f"{ENDPOINT}profile", json=ok({"ID": "1"}))
    rsps.post(f"{ENDPOINT}user.admin", json=ok(True))
    client = make_client(config, on_expired=lambda: NEW_TOKEN)

    assert client.call("profile") == {"ID": "1"}
    assert client.call("user.admin") is True
    assert body_of(rsps.calls[2])["auth"] == NEW_TOKEN


@pytest.mark.parametrize("second", [EXPIRED, {"error": "NO_AUTH_FOUND"}])
def test_call_v3_second_auth_failure_raises_auth_error(rsps, config, second) -> None:
    rsps.post(f"{V3}tasks.task.result.update", json=EXPIRED, status=401)
    rsps.post(f"{V3}tasks.task.result.update", json=second, status=401)
    calls: list[int] = []
    client = make_client(config, on_expired=lambda: calls.append(1) or NEW_TOKEN)

    with pytest.raises(BitrixAuthError):
        client.call_v3("tasks.task.result.update", {"id": 17, "fields": {"text": "y"}})
    assert len(calls) == 1
    assert len(rsps.calls) == 2


def test_call_without_on_expired_raises_token_expired(rsps, config) -> None:
    rsps.post(f"{ENDPOINT}profile", json=EXPIRED, status=401)
    with pytest.raises(BitrixTokenExpired) as caught:
        make_client(config).call("profile")
    assert caught.value.status == 401
    assert len(rsps.calls) == 1


def test_call_refresh_failure_propagates(rsps, config) -> None:
    rsps.post(f"{ENDPOINT}profile", json=EXPIRED, status=401)

    def on_expired() -> str:
        raise BitrixAuthError("invalid_grant", status=400)

    with pytest.raises(BitrixAuthError) as caught:
        make_client(config, on_expired=on_expired).call("profile")
    assert caught.value.code == "invalid_grant"


# --- domain change (302) -----------------------------------------------------------------------


def test_call_v3_follows_domain_change_once_and_reposts_body(rsps, config) -> None:
    rsps.post(
        f"{V3}tasks.task.result.add",
        status=302,
        headers={"Location": "https://b24-x1y2z3.bitrix24.com/rest/api/tasks.task.result.add"},
        body="<html>Moved</html>",
    )
    rsps.post(
        "https://b24-x1y2z3.bitrix24.com/rest/api/tasks.task.result.add",
        json=ok({"item": {"id": 5}}),
    )
    rsps.post(f"{ENDPOINT}profile", json=ok({"ID": "1"}))
    moved_to: list[tuple[str, str]] = []
    client = make_client(config, on_domain_change=lambda *move: moved_to.append(move))

    result = client.call_v3("tasks.task.result.add", {"fields": {"taskId": 1, "text": "t"}})

    assert result == {"item": {"id": 5}}
    # The caller hears of the move with the token that worked there, to confirm it first.
    assert moved_to == [("https://b24-x1y2z3.bitrix24.com/rest/", TOKEN)]
    old, new = (call.request for call in rsps.calls)
    assert old.body == new.body
    assert old.headers["Idempotency-Key"] == new.headers["Idempotency-Key"]
    # Only that one call followed: anyone running a portal can redirect anywhere.
    assert client.client_endpoint == ENDPOINT
    client.call("profile")
    assert rsps.calls[2].request.url == f"{ENDPOINT}profile"


@pytest.mark.parametrize(
    "location",
    [
        "https://10.0.0.1/rest/profile",
        "https://intranet.example/rest/profile",
        "https://127.0.0.1/rest/profile",
        "http://portal2.bitrix24.com/rest/profile",
        "https://user@portal2.bitrix24.com/rest/profile",
        "https://2130706433/rest/profile",
    ],
)
def test_call_refuses_domain_change_to_unsafe_host(rsps, config, location) -> None:
    rsps.post(f"{ENDPOINT}profile", status=302, headers={"Location": location})
    moved_to: list[str] = []

    with pytest.raises(UnsafeURL):
        make_client(config, on_domain_change=lambda *move: moved_to.append(move)).call("profile")
    assert moved_to == []
    assert len(rsps.calls) == 1


def test_call_does_not_follow_a_second_redirect(rsps, config) -> None:
    rsps.post(f"{ENDPOINT}profile", status=302, headers={"Location": "https://a.bitrix24.com/"})
    rsps.post(
        "https://a.bitrix24.com/rest/profile",
        status=302,
        headers={"Location": "https://b.bitrix24.com/"},
    )
    with pytest.raises(BitrixError) as caught:
        make_client(config).call("profile")
    assert caught.value.code == "UNEXPECTED_REDIRECT"
    assert len(rsps.calls) == 2


def test_call_refuses_redirect_within_the_same_host(rsps, config) -> None:
    rsps.post(f"{ENDPOINT}profile", status=302, headers={"Location": "/auth/"})
    with pytest.raises(BitrixError) as caught:
        make_client(config).call("profile")
    assert caught.value.code == "UNEXPECTED_REDIRECT"


def test_client_refuses_unsafe_client_endpoint(config) -> None:
    with pytest.raises(UnsafeURL):
        BitrixClient("https://intranet.example/rest/", TOKEN, config=config)
    with pytest.raises(UnsafeURL):
        BitrixClient("http://portal.bitrix24.com/rest/", TOKEN, config=config)


def test_client_allow_private_accepts_lan_portal(rsps) -> None:
    config = BitrixConfig(client_id=CLIENT_ID, client_secret=SECRET, allow_private=True)
    rsps.post("http://10.0.0.5:8080/rest/profile", json=ok({"ID": "1"}))
    client = BitrixClient("http://10.0.0.5:8080/rest/", TOKEN, config=config)
    assert client.call("profile") == {"ID": "1"}


# --- rate limiting and the operating limit -----------------------------------------------------


def test_call_acquires_limiter_before_every_request(rsps, config) -> None:
    rsps.post(f"{ENDPOINT}profile", json=EXPIRED, status=401)
    rsps.post(f"{ENDPOINT}profile", json=ok({"ID": "1"}))
    limiter = RecordingLimiter()
    client = make_client(
        config,
        limiter=limiter,
        limiter_key=MEMBER_ID,
        rate=(250, 5.0),
        on_expired=lambda: NEW_TOKEN,
    )

    client.call("profile")

    assert limiter.calls == [("acquire", MEMBER_ID, 250, 5.0, 30.0)] * 2


def test_call_query_limit_penalizes_limiter_and_raises_unavailable(rsps, config) -> None:
    rsps.post(
        f"{ENDPOINT}profile",
        json={"error": "QUERY_LIMIT_EXCEEDED", "error_description": "Too many requests"},
        status=503,
    )
    limiter = RecordingLimiter()

    with pytest.raises(BitrixUnavailable) as caught:
        make_client(config, limiter=limiter, limiter_key=MEMBER_ID).call("profile")

    assert caught.value.retry_after == 12.5  # half of a 50/2 bucket drains in 12.5 s
    assert limiter.calls[-1] == ("penalize", MEMBER_ID, 12.5)


def test_call_query_limit_honours_retry_after_header(rsps, config) -> None:
    rsps.post(
        f"{ENDPOINT}profile",
        json={"error": "QUERY_LIMIT_EXCEEDED"},
        status=503,
        headers={"Retry-After": "7"},
    )
    limiter = RecordingLimiter()
    with pytest.raises(BitrixUnavailable) as caught:
        make_client(config, limiter=limiter, limiter_key=MEMBER_ID).call("profile")
    assert caught.value.retry_after == 7.0
    assert limiter.calls[-1] == ("penalize", MEMBER_ID, 7.0)


def test_call_limiter_timeout_raises_rate_limited(rsps, config) -> None:
    with pytest.raises(BitrixUnavailable) as caught:
        make_client(config, limiter=RecordingLimiter(timeout=42.0)).call("profile")
    assert caught.value.code == "RATE_LIMITED"
    assert caught.value.retry_after == 42.0
    assert len(rsps.calls) == 0


def test_call_operation_time_limit_takes_reset_from_error_body(rsps, config) -> None:
    reset_at = int(time.time()) + 120
    rsps.post(
        f"{V3}tasks.task.result.list",
        json={"error": "OPERATION_TIME_LIMIT", "time": {"operating_reset_at": reset_at}},
        status=429,
    )
    with pytest.raises(BitrixUnavailable) as caught:
        make_client(config).call_v3("tasks.task.result.list", {})
    assert caught.value.operating_reset_at == reset_at
    assert 100 < caught.value.retry_after <= 120


def test_call_operation_time_limit_falls_back_to_last_success_of_that_method(rsps, config) -> None:
    rsps.post(f"{V3}tasks.task.result.list", json=ok({"items": []}))
    rsps.post(f"{V3}tasks.task.result.list", json={"error": "OPERATION_TIME_LIMIT"}, status=429)
    rsps.post(f"{V3}tasks.task.result.add", json={"error": "OPERATION_TIME_LIMIT"}, status=429)
    client = make_client(config)

    client.call_v3("tasks.task.result.list", {})
    with pytest.raises(BitrixUnavailable) as caught:
        client.call_v3("tasks.task.result.list", {})
    assert caught.value.operating_reset_at == TIME_BLOCK["operating_reset_at"]

    with pytest.raises(BitrixUnavailable) as unknown:
        client.call_v3("tasks.task.result.add", {})
    assert unknown.value.operating_reset_at is None
    assert unknown.value.retry_after is None


# --- secrets stay out of URLs, logs, errors and reprs ------------------------------------------


def _exercise_everything(rsps, config) -> list[BaseException]:
    """Run a mix of successes, failures, refreshes and a domain change; return the errors."""
    leaky = f"token {TOKEN} / {NEW_TOKEN} is not valid"
    rsps.post(f"{ENDPOINT}profile", json=EXPIRED, status=401)
    rsps.post(f"{ENDPOINT}profile", json=ok({"ID": "1"}))
    rsps.post(
        f"{V3}tasks.task.result.add", status=302, headers={"Location": "https://n.bitrix24.com/"}
    )
    rsps.post("https://n.bitrix24.com/rest/api/tasks.task.result.add", json=ok({"item": {}}))
    rsps.post(
        f"{ENDPOINT}app.info",
        json={"error": "ACCESS_DENIED", "error_description": leaky},
        status=403,
    )
    v3_error = {
        "code": "BITRIX_REST_V3_EXCEPTION_VALIDATION_DTOVALIDATIONEXCEPTION",
        "message": leaky,
        "validation": [{"field": "text", "message": leaky}],
    }
    rsps.post(f"{V3}tasks.task.result.update", status=400, json={"error": v3_error})
    rsps.post(
        f"{OAUTH}/oauth/token/",
        json={"error": "invalid_grant", "error_description": leaky},
        status=400,
    )
    rsps.post(f"{OAUTH}/oauth/token/", json=TOKEN_RESPONSE)
    rsps.post(
        f"{OAUTH}/rest/app.info",
        json={"error": "invalid_token", "error_description": leaky},
        status=401,
    )
    errors: list[BaseException] = []
    client = make_client(config, on_expired=lambda: NEW_TOKEN)
    client.call("profile")
    client.call_v3("tasks.task.result.add", {"fields": {"taskId": 1, "text": "x"}})
    server = OAuthServer(config)
    for action in (
        lambda: make_client(config).call("app.info"),
        lambda: make_client(config).call_v3("tasks.task.result.update", {"id": 1}),
        lambda: server.refresh(OAUTH, REFRESH),
        lambda: server.app_info(OAUTH, TOKEN),
    ):
        try:
            action()
        except BitrixError as exc:
            errors.append(exc)
    server.exchange_code(OAUTH, CODE)
    return errors


def test_no_token_or_secret_in_any_request_url(rsps, config) -> None:
    _exercise_everything(rsps, config)
    assert len(rsps.calls) == 9
    for call in rsps.calls:
        url = call.request.url
        assert not urlsplit(url).query, url
        assert not any(secret in url for secret in SECRETS), url


def test_no_token_or_secret_in_log_records(rsps, config, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    _exercise_everything(rsps, config)

    texts = [record.getMessage() for record in caplog.records]
    assert texts
    for text in texts:
        assert not any(secret in text for secret in SECRETS), text
    # requests-oauthlib dumps token request bodies and responses at DEBUG: those never get out.
    assert not [r for r in caplog.records if r.name.startswith("requests_oauthlib")]
    bitrix_lines = [
        r
        for r in caplog.records
        if r.name == "b24app.bitrix" and r.getMessage().startswith("bitrix24 call ")
    ]
    assert len(bitrix_lines) == 9  # one per HTTP exchange
    # A quick success at DEBUG, a failure at INFO: a busy screen writes no line per call.
    levels = [(r.levelno, "error=-" in r.getMessage()) for r in bitrix_lines]
    assert {level for level, succeeded in levels if succeeded} == {logging.DEBUG}
    assert {level for level, succeeded in levels if not succeeded} == {logging.INFO}
    first = bitrix_lines[0].getMessage()
    assert "method=profile" in first and "api=classic" in first and "status=401" in first
    assert "error=expired_token" in first and "duration_ms=" in first


def test_no_token_or_secret_in_exception_strings_or_reprs(rsps, config) -> None:
    errors = _exercise_everything(rsps, config)
    assert len(errors) == 4
    for error in errors:
        for text in (str(error), repr(error), str(error.args), str(error.__dict__)):
            assert not any(secret in text for secret in SECRETS), text
    assert mask_secret(TOKEN) in errors[0].description


def test_reprs_mask_tokens_and_secret(config) -> None:
    tokens = TokenSet.from_response({"access_token": TOKEN, "refresh_token": REFRESH})
    client = make_client(config)
    for text in (repr(tokens), str(tokens), repr(config), repr(client)):
        assert not any(secret in text for secret in SECRETS), text
    assert "s6p6***" in repr(tokens) and "4s38***" in repr(tokens)
    assert "LJSl***" in repr(config)


# --- OAuth server ------------------------------------------------------------------------------

TOKEN_RESPONSE = {
    "access_token": NEW_TOKEN,
    "client_endpoint": "https://portal.bitrix24.com/rest/",
    "domain": "oauth.bitrix.info",
    "expires": 1780319382,
    "expires_in": 3600,
    "member_id": MEMBER_ID,
    "refresh_token": NEW_REFRESH,
    "scope": "crm,entity,im,task",
    "server_endpoint": "https://oauth.bitrix.info/rest/",
    "status": "F",
    "user_id": 67,
}


def test_oauth_refresh_posts_form_with_secrets_in_body(rsps, config) -> None:
    rsps.post(f"{OAUTH}/oauth/token/", json=TOKEN_RESPONSE)

    tokens = OAuthServer(config).refresh("https://oauth.bitrix.info/rest/", REFRESH)

    request = rsps.calls[0].request
    assert request.url == f"{OAUTH}/oauth/token/"
    assert parse_qs(request.body) == {
        "grant_type": ["refresh_token"],
        "client_id": [CLIENT_ID],
        "client_secret": [SECRET],
        "refresh_token": [REFRESH],
    }
    assert tokens == TokenSet(
        access_token=NEW_TOKEN,
        refresh_token=NEW_REFRESH,
        expires_at=datetime.fromtimestamp(1780319382, UTC),
        scope="crm,entity,im,task",
        member_id=MEMBER_ID,
        user_id=67,
        request_method="post",
    )
    assert OAuthServer(config).token_method(OAUTH) == "post"


@pytest.mark.parametrize(
    ("status", "body", "expected", "code"),
    [
        (400, {"error": "invalid_grant"}, BitrixAuthError, "invalid_grant"),
        (400, {"error": "invalid_client"}, BitrixAuthError, "invalid_client"),
        (401, {"error": "NOT_INSTALLED"}, BitrixAuthError, "NOT_INSTALLED"),
        (400, {"error": "PAYMENT_REQUIRED", "error_description": "Payment required"},
         BitrixAuthError, "PAYMENT_REQUIRED"),
        (400, {"error": "bad_verification_code"}, BitrixAuthError, "bad_verification_code"),
        (403, {"error": "invalid_scope"}, BitrixAccessDenied, "invalid_scope"),
        (502, "<html>Bad Gateway</html>", BitrixUnavailable, "HTTP_502"),
    ],
)  # fmt: skip
def test_oauth_refresh_maps_errors(rsps, config, status, body, expected, code) -> None:
    if isinstance(body, dict):
        rsps.post(f"{OAUTH}/oauth/token/", json=body, status=status)
    else:
        rsps.post(f"{OAUTH}/oauth/token/", body=body, status=status)
    with pytest.raises(BitrixError) as caught:
        OAuthServer(config).refresh(OAUTH, REFRESH)
    assert type(caught.value) is expected
    assert caught.value.code == code


def test_oauth_refresh_does_not_follow_redirects(rsps, config) -> None:
    rsps.post(f"{OAUTH}/oauth/token/", status=302, headers={"Location": "https://evil.example/"})
    with pytest.raises(BitrixError) as caught:
        OAuthServer(config).refresh(OAUTH, REFRESH)
    assert caught.value.code == "UNEXPECTED_REDIRECT"
    assert len(rsps.calls) == 1


def test_oauth_refresh_timeout_is_unavailable(rsps, config) -> None:
    rsps.post(f"{OAUTH}/oauth/token/", body=requests.exceptions.ReadTimeout())
    with pytest.raises(BitrixUnavailable) as caught:
        OAuthServer(config).refresh(OAUTH, REFRESH)
    assert caught.value.code == "TIMEOUT"


def test_oauth_refresh_refuses_server_not_allow_listed(rsps, config) -> None:
    with pytest.raises(UnsafeURL):
        OAuthServer(config).refresh("https://oauth.bitrix.info.evil.com/rest/", REFRESH)
    assert len(rsps.calls) == 0


def test_oauth_exchange_code_posts_body_via_oauthlib(rsps, config) -> None:
    response = {**TOKEN_RESPONSE}
    del response["expires"]
    rsps.post(f"{OAUTH}/oauth/token/", json=response)

    before = datetime.now(UTC)
    tokens = OAuthServer(config).exchange_code(OAUTH, CODE)

    request = rsps.calls[0].request
    assert request.url == f"{OAUTH}/oauth/token/"
    assert request.method == "POST"
    assert parse_qs(request.body) == {
        "grant_type": ["authorization_code"],
        "code": [CODE],
        "client_id": [CLIENT_ID],
        "client_secret": [SECRET],
    }
    assert "Authorization" not in request.headers
    assert tokens.access_token == NEW_TOKEN and tokens.refresh_token == NEW_REFRESH
    assert tokens.scope == "crm,entity,im,task"
    assert (tokens.member_id, tokens.user_id) == (MEMBER_ID, 67)
    assert before + timedelta(seconds=3590) < tokens.expires_at < before + timedelta(seconds=3610)


@pytest.mark.parametrize(
    ("status", "body", "expected", "code"),
    [
        (400, {"error": "invalid_grant", "error_description": "code expired"}, BitrixAuthError,
         "invalid_grant"),
        (400, {"error": "invalid_client"}, BitrixAuthError, "invalid_client"),
        (200, {"refresh_token": NEW_REFRESH}, BitrixError, "INVALID_TOKEN_RESPONSE"),
        (503, "<html>down</html>", BitrixUnavailable, "HTTP_503"),
    ],
)  # fmt: skip
def test_oauth_exchange_code_maps_errors(rsps, config, status, body, expected, code) -> None:
    if isinstance(body, dict):
        rsps.post(f"{OAUTH}/oauth/token/", json=body, status=status)
    else:
        rsps.post(f"{OAUTH}/oauth/token/", body=body, status=status)
    with pytest.raises(BitrixError) as caught:
        OAuthServer(config).exchange_code(OAUTH, CODE)
    assert type(caught.value) is expected
    assert caught.value.code == code


def test_oauth_exchange_code_does_not_follow_redirects(rsps, config) -> None:
    rsps.post(f"{OAUTH}/oauth/token/", status=302, headers={"Location": "https://evil.example/"})
    with pytest.raises(BitrixError) as caught:
        OAuthServer(config).exchange_code(OAUTH, CODE)
    assert caught.value.code == "UNEXPECTED_REDIRECT"
    assert len(rsps.calls) == 1


def test_oauth_exchange_code_connection_error_is_unavailable(rsps, config) -> None:
    rsps.post(f"{OAUTH}/oauth/token/", body=requests.exceptions.ConnectionError())
    with pytest.raises(BitrixUnavailable) as caught:
        OAuthServer(config).exchange_code(OAUTH, CODE)
    assert caught.value.code == "CONNECTION_ERROR"


# --- the token request: POST body first, GET query only when the body was provably not read ---

TOKEN_URL = f"{OAUTH}/oauth/token/"
NO_CLIENT_ID = {"error": "invalid_request", "error_description": 'No "client_id" parameter found'}
REFRESH_PARAMS = {
    "grant_type": ["refresh_token"],
    "client_id": [CLIENT_ID],
    "client_secret": [SECRET],
    "refresh_token": [REFRESH],
}
CODE_PARAMS = {
    "grant_type": ["authorization_code"],
    "code": [CODE],
    "client_id": [CLIENT_ID],
    "client_secret": [SECRET],
}
BODY_NOT_READ = [
    pytest.param({"json": NO_CLIENT_ID, "status": 400}, id="invalid_request-no-client_id"),
    pytest.param({"json": {"error": "invalid_request"}, "status": 400}, id="invalid_request"),
    pytest.param({"body": "<html>405 Not Allowed</html>", "status": 405}, id="405"),
    pytest.param({"json": {"error": "METHOD_NOT_ALLOWED"}, "status": 405}, id="405-json"),
]
NOT_A_PROOF = [
    pytest.param({"json": {"error": "invalid_grant"}, "status": 400}, id="invalid_grant"),
    pytest.param({"json": {"error": "invalid_client"}, "status": 400}, id="invalid_client"),
    pytest.param({"json": {"error": "PAYMENT_REQUIRED"}, "status": 401}, id="PAYMENT_REQUIRED"),
    pytest.param({"json": {"error": "NOT_INSTALLED"}, "status": 401}, id="NOT_INSTALLED"),
    pytest.param({"body": "<html>Internal Server Error</html>", "status": 500}, id="500"),
    pytest.param({"body": "<html>Bad Gateway</html>", "status": 502}, id="502"),
    pytest.param({"body": "", "status": 400}, id="400-without-a-body"),
    pytest.param({"status": 302, "headers": {"Location": "https://evil.example/"}}, id="302"),
    pytest.param({"json": {"refresh_token": NEW_REFRESH}}, id="200-without-access_token"),
    pytest.param({"body": requests.exceptions.ReadTimeout()}, id="timeout"),
    pytest.param({"body": requests.exceptions.ConnectionError()}, id="connection-lost"),
]


def _query(request) -> dict:
    return parse_qs(urlsplit(request.url).query)


def _methods(rsps) -> list[str]:
    return [call.request.method for call in rsps.calls]


@pytest.mark.parametrize("refusal", BODY_NOT_READ)
def test_oauth_refresh_sends_by_get_when_the_post_body_was_not_read(
    rsps, config, caplog, refusal
) -> None:
    rsps.post(TOKEN_URL, **refusal)
    rsps.get(TOKEN_URL, json=TOKEN_RESPONSE)
    server = OAuthServer(config)

    tokens = server.refresh(OAUTH, REFRESH)

    post, get = (call.request for call in rsps.calls)
    assert post.method == "POST" and parse_qs(post.body) == REFRESH_PARAMS
    assert get.method == "GET" and not get.body and _query(get) == REFRESH_PARAMS
    assert tokens.refresh_token == NEW_REFRESH and tokens.request_method == "get"
    # Remembered per process (any OAuthServer) and per OAuth server origin.
    assert server.token_method(OAUTH) == "get"
    assert OAuthServer(config).token_method("https://oauth.bitrix.info/rest/") == "get"
    assert OAuthServer(config).token_method("https://oauth.bitrix24.tech/rest/") is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "oauth.bitrix.info" in warnings[0]
    assert "POST" in warnings[0] and "sending it by GET" in warnings[0]


def test_oauth_token_requests_go_straight_to_get_once_it_worked(rsps, config) -> None:
    rsps.post(TOKEN_URL, json=NO_CLIENT_ID, status=400)
    rsps.get(TOKEN_URL, json=TOKEN_RESPONSE)
    server = OAuthServer(config)
    server.refresh(OAUTH, REFRESH)
    assert server.refresh(OAUTH, NEW_REFRESH).request_method == "get"
    # The code exchange goes to the same endpoint, so it is sent the same way.
    assert OAuthServer(config).exchange_code(OAUTH, CODE).request_method == "get"
    assert _methods(rsps) == ["POST", "GET", "GET", "GET"]
    assert _query(rsps.calls[3].request) == CODE_PARAMS


def test_oauth_refresh_by_post_is_remembered_too(rsps, config) -> None:
    rsps.post(TOKEN_URL, json=TOKEN_RESPONSE)
    server = OAuthServer(config)
    assert server.token_method(OAUTH) is None
    assert server.refresh(OAUTH, REFRESH).request_method == "post"
    assert server.token_method(OAUTH) == "post"
    OAuthServer.forget_token_methods()
    assert server.token_method(OAUTH) is None


def test_oauth_refresh_goes_back_to_post_when_a_known_get_is_not_read(rsps, config) -> None:
    """A server that changed (now reads only a body) is followed the other way, too."""
    rsps.post(TOKEN_URL, json=NO_CLIENT_ID, status=400)
    rsps.post(TOKEN_URL, json=TOKEN_RESPONSE)
    rsps.get(TOKEN_URL, json=TOKEN_RESPONSE)
    rsps.get(TOKEN_URL, json=NO_CLIENT_ID, status=400)
    server = OAuthServer(config)
    assert server.refresh(OAUTH, REFRESH).request_method == "get"
    assert server.refresh(OAUTH, NEW_REFRESH).request_method == "post"
    assert _methods(rsps) == ["POST", "GET", "GET", "POST"]
    assert server.token_method(OAUTH) == "post"


def test_oauth_refresh_not_read_either_way_raises_and_learns_nothing(rsps, config) -> None:
    rsps.post(TOKEN_URL, json=NO_CLIENT_ID, status=400)
    rsps.get(TOKEN_URL, json=NO_CLIENT_ID, status=400)
    server = OAuthServer(config)
    with pytest.raises(BitrixError) as caught:
        server.refresh(OAUTH, REFRESH)
    assert type(caught.value) is BitrixError and caught.value.code == "invalid_request"
    assert _methods(rsps) == ["POST", "GET"]
    assert server.token_method(OAUTH) is None


@pytest.mark.parametrize("answer", NOT_A_PROOF)
def test_oauth_refresh_is_never_sent_again_after_any_other_answer(rsps, config, answer) -> None:
    """The server may have read the request and spent the refresh token (a timeout or a lost
    connection may hide a rotation): it is never sent a second time."""
    rsps.post(TOKEN_URL, **answer)
    server = OAuthServer(config)
    with pytest.raises(BitrixError):
        server.refresh(OAUTH, REFRESH)
    assert _methods(rsps) == ["POST"]
    assert server.token_method(OAUTH) is None


@pytest.mark.parametrize("answer", NOT_A_PROOF)
def test_oauth_exchange_code_is_never_sent_again_after_any_other_answer(
    rsps, config, answer
) -> None:
    rsps.post(TOKEN_URL, **answer)
    server = OAuthServer(config)
    with pytest.raises(BitrixError):
        server.exchange_code(OAUTH, CODE)
    assert _methods(rsps) == ["POST"]
    assert server.token_method(OAUTH) is None


def test_oauth_refresh_wrong_client_is_tried_by_get_once_per_server(rsps, config) -> None:
    """A server that read no client_id may call it unknown (wrong_client): tried by GET while
    no way is known, once per server and process, since a really wrong B24_CLIENT_ID answers
    the same and must not send the secret in a URL on every refresh."""
    rsps.post(TOKEN_URL, json={"error": "wrong_client"})
    rsps.get(TOKEN_URL, json={"error": "wrong_client"})
    server = OAuthServer(config)
    for _ in range(2):
        with pytest.raises(BitrixAuthError) as caught:
            server.refresh(OAUTH, REFRESH)
        assert caught.value.code == "wrong_client"
    assert _methods(rsps) == ["POST", "GET", "POST"]
    assert server.token_method(OAUTH) is None


def test_oauth_refresh_wrong_client_then_get_works_learns_get(rsps, config) -> None:
    rsps.post(TOKEN_URL, json={"error": "wrong_client"})
    rsps.get(TOKEN_URL, json=TOKEN_RESPONSE)
    server = OAuthServer(config)
    assert server.refresh(OAUTH, REFRESH).request_method == "get"
    assert _methods(rsps) == ["POST", "GET"] and _query(rsps.calls[1].request) == REFRESH_PARAMS


def test_oauth_refresh_wrong_client_once_post_is_known_is_about_the_client_id(rsps, config) -> None:
    rsps.post(TOKEN_URL, json=TOKEN_RESPONSE)
    rsps.post(TOKEN_URL, json={"error": "wrong_client"})
    server = OAuthServer(config)
    server.refresh(OAUTH, REFRESH)
    with pytest.raises(BitrixAuthError) as caught:
        server.refresh(OAUTH, NEW_REFRESH)
    assert caught.value.code == "wrong_client"
    assert _methods(rsps) == ["POST", "POST"]


@pytest.mark.parametrize("refusal", BODY_NOT_READ)
def test_oauth_exchange_code_sends_by_get_via_oauthlib_when_the_body_was_not_read(
    rsps, config, refusal
) -> None:
    rsps.post(TOKEN_URL, **refusal)
    rsps.get(TOKEN_URL, json=TOKEN_RESPONSE)
    server = OAuthServer(config)

    tokens = server.exchange_code(OAUTH, CODE)

    post, get = (call.request for call in rsps.calls)
    assert post.method == "POST" and parse_qs(post.body) == CODE_PARAMS
    assert get.method == "GET" and not get.body and _query(get) == CODE_PARAMS
    assert "Content-Type" not in get.headers and "Authorization" not in get.headers
    assert tokens.access_token == NEW_TOKEN and tokens.request_method == "get"
    assert server.token_method(OAUTH) == "get"
    server.exchange_code(OAUTH, CODE)
    assert _methods(rsps) == ["POST", "GET", "GET"]


def test_oauth_exchange_code_wrong_client_is_tried_by_get_once(rsps, config) -> None:
    rsps.post(TOKEN_URL, json={"error": "wrong_client"})
    rsps.get(TOKEN_URL, json={"error": "wrong_client"})
    server = OAuthServer(config)
    for _ in range(2):
        with pytest.raises(BitrixAuthError):
            server.exchange_code(OAUTH, CODE)
    assert _methods(rsps) == ["POST", "GET", "POST"]


LEAKY_TRANSPORT_ERROR = (
    "HTTPSConnectionPool(host='oauth.bitrix.info', port=443): Max retries exceeded with url: "
    f"/oauth/token/?grant_type=refresh_token&client_secret={SECRET}&refresh_token={REFRESH}"
    f"&code={CODE}"
)


@pytest.mark.parametrize("call", ["refresh", "exchange_code"])
@pytest.mark.parametrize("exception", [requests.exceptions.ConnectionError, requests.ReadTimeout])
def test_oauth_get_transport_error_carries_no_url(rsps, config, call, exception) -> None:
    """requests' exceptions embed the URL, and a GET's URL holds the secrets: the typed error
    is not chained to them, so no traceback or error tracker shows them."""
    rsps.post(TOKEN_URL, json=NO_CLIENT_ID, status=400)
    rsps.get(TOKEN_URL, body=exception(LEAKY_TRANSPORT_ERROR))
    server = OAuthServer(config)
    with pytest.raises(BitrixUnavailable) as caught:
        getattr(server, call)(OAUTH, CODE if call == "exchange_code" else REFRESH)
    error = caught.value
    chain, link = [], error
    while link is not None:
        chain.append(link)
        link = link.__cause__ or link.__context__
    assert not [link for link in chain if isinstance(link, requests.RequestException)]
    assert chain[0].code in ("CONNECTION_ERROR", "TIMEOUT")
    assert [link.code for link in chain[1:]] == ["invalid_request"]  # the unread POST's answer
    text = "".join(traceback.format_exception(error)) + repr(error) + str(error.__dict__)
    assert not any(secret in text for secret in SECRETS), text
    assert _methods(rsps) == ["POST", "GET"]


def test_oauth_app_info_posts_auth_form_and_returns_result(rsps, config) -> None:
    info = {"client_id": CLIENT_ID, "install": {"member_id": MEMBER_ID, "installed": True}}
    rsps.post(f"{OAUTH}/rest/app.info", json={"result": info, "time": TIME_BLOCK})

    assert OAuthServer(config).app_info("https://oauth.bitrix.info/rest/", TOKEN) == info
    request = rsps.calls[0].request
    assert request.url == f"{OAUTH}/rest/app.info"
    assert parse_qs(request.body) == {"auth": [TOKEN]}


@pytest.mark.parametrize(
    ("body", "status", "expected"),
    [
        ({"error": "invalid_client"}, 400, BitrixAuthError),
        ({"error": "expired_token"}, 401, BitrixTokenExpired),
        ({"result": [1]}, 200, BitrixError),
    ],
)
def test_oauth_app_info_maps_errors(rsps, config, body, status, expected) -> None:
    rsps.post(f"{OAUTH}/rest/app.info", json=body, status=status)
    with pytest.raises(BitrixError) as caught:
        OAuthServer(config).app_info(OAUTH, TOKEN)
    assert type(caught.value) is expected


def test_oauth_authorize_url_has_client_id_and_state_only(config) -> None:
    url = OAuthServer(config).authorize_url("https://Portal.bitrix24.com/rest/", "a b&c=d")
    assert url == (
        f"https://portal.bitrix24.com/oauth/authorize/?client_id={CLIENT_ID}&state=a+b%26c%3Dd"
    )


def test_oauth_authorize_url_refuses_unsafe_portal(config) -> None:
    with pytest.raises(UnsafeURL):
        OAuthServer(config).authorize_url("http://portal.bitrix24.com", "s")


@pytest.mark.parametrize(
    ("endpoint", "origin"),
    [
        ("https://oauth.bitrix.info/rest/", "https://oauth.bitrix.info"),
        ("https://oauth.bitrix.info/rest", "https://oauth.bitrix.info"),
        ("https://oauth.bitrix.info/", "https://oauth.bitrix.info"),
        ("https://OAUTH.Bitrix.Info:443/rest/", "https://oauth.bitrix.info"),
        ("https://oauth.bitrix24.tech/rest/", "https://oauth.bitrix24.tech"),
    ],
)
def test_oauth_origin_for_accepts_allow_listed_servers(config, endpoint, origin) -> None:
    assert oauth_origin_for(endpoint, config) == origin


@pytest.mark.parametrize(
    "endpoint",
    [
        "https://oauth.bitrix.info.evil.com/rest/",
        "https://evil.com/oauth.bitrix.info/rest/",
        "https://sub.oauth.bitrix.info/rest/",
        "http://oauth.bitrix.info/rest/",
        "https://oauth.bitrix.info:8443/rest/",
        "https://user@oauth.bitrix.info/rest/",
        "https://oauth.bitrix.info/other/",
        "https://oauth.bitrix.info/rest/?x=1",
        "https://oauth.bitrix.info#/rest/",
        "oauth.bitrix.info",
    ],
)
def test_oauth_origin_for_refuses_anything_else(config, endpoint) -> None:
    with pytest.raises(UnsafeURL):
        oauth_origin_for(endpoint, config)


def test_oauth_origin_for_allows_http_server_only_when_private_allowed() -> None:
    local = BitrixConfig(
        client_id=CLIENT_ID,
        client_secret=SECRET,
        oauth_servers="http://127.0.0.1:8001, https://oauth.bitrix.info/",
        allow_private=True,
    )
    assert local.oauth_servers == ("http://127.0.0.1:8001", "https://oauth.bitrix.info")
    assert oauth_origin_for("http://127.0.0.1:8001/rest/", local) == "http://127.0.0.1:8001"
    with pytest.raises(UnsafeURL):
        BitrixConfig(client_id=CLIENT_ID, client_secret=SECRET, oauth_servers=("http://x.com",))


# --- tokens and sessions -----------------------------------------------------------------------


def test_token_set_from_install_payload_normalises_scope_and_user_id() -> None:
    tokens = TokenSet.from_response(
        {"access_token": TOKEN, "refresh_token": REFRESH, "expires_in": "3600",
         "scope": "task, placement user_brief", "user_id": "1", "member_id": MEMBER_ID}
    )  # fmt: skip
    assert tokens.scope == "task,placement,user_brief"
    assert tokens.user_id == 1
    assert tokens.expires_at.tzinfo is UTC


@pytest.mark.parametrize(
    "data",
    [
        {"refresh_token": REFRESH},
        {"access_token": TOKEN},
        {"access_token": TOKEN, "refresh_token": REFRESH, "expires": "soon"},
        {"access_token": TOKEN, "refresh_token": REFRESH, "user_id": "admin"},
    ],
)
def test_token_set_rejects_incomplete_responses(data) -> None:
    with pytest.raises(BitrixError) as caught:
        TokenSet.from_response(data)
    assert caught.value.code == "INVALID_TOKEN_RESPONSE"


def test_build_session_guards_connections_unless_private_allowed(config) -> None:
    guarded = build_session(config)
    assert isinstance(guarded.get_adapter("https://portal.bitrix24.com/"), GuardedAdapter)
    lan = build_session(BitrixConfig(client_id=CLIENT_ID, client_secret=SECRET, allow_private=True))
    adapter = lan.get_adapter("http://10.0.0.5/")
    assert isinstance(adapter, HTTPAdapter)
    assert not isinstance(adapter, GuardedAdapter)
