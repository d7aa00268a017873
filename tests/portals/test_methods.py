"""The Bitrix24 methods' answers read by `b24app.portals.bitrix.methods`: against the fake
portal, and against a portal that answers anything."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from b24app.portals.bitrix import (
    BitrixClient,
    BitrixConfig,
    BitrixError,
    BitrixInvalidResponse,
    V3Listing,
    methods,
)
from b24app.portals.bitrix.methods import (
    AppInfo,
    Binding,
    Profile,
    TaskResult,
)

HANDLER = "https://app.example.test/b24/app/"
EVENTS = "https://app.example.test/b24/events/"


@pytest.fixture
def config(fake) -> BitrixConfig:
    return BitrixConfig(
        client_id=fake.client_id,
        client_secret=fake.client_secret,
        oauth_servers=(fake.oauth_url,),
        allow_private=True,
        connect_timeout=2.0,
        read_timeout=5.0,
        deadline=10.0,
    )


def client_as(portal, config: BitrixConfig, user_id: int) -> BitrixClient:
    token = portal.issue_tokens(user_id)["access_token"]
    return BitrixClient(portal.client_endpoint, token, config=config)


@pytest.fixture
def anna(portal, config) -> BitrixClient:
    return client_as(portal, config, 1)


@pytest.fixture
def boris(portal, config) -> BitrixClient:
    return client_as(portal, config, 2)


# --- against the fake portal --------------------------------------------------------------------


def test_profile_get_reads_id_name_and_admin(anna, boris) -> None:
    assert methods.profile_get(anna) == Profile(id=1, name="Anna Smirnova", admin=True)
    assert methods.profile_get(boris) == Profile(id=2, name="Boris Petrov", admin=False)


@pytest.mark.parametrize("answered", ["²", "-1", "", 12.5, True, ["1"]])
def test_profile_get_refuses_an_id_that_is_not_one(portal, anna, answered) -> None:
    portal.profile_id = answered
    assert methods.profile_get(anna).id is None


def test_app_info_get_reads_status_and_installed(portal, fake, config) -> None:
    portal.mark_installed()
    client = BitrixClient(portal.client_endpoint, portal.issue_tokens(1)["access_token"],
                          config=config)  # fmt: skip
    assert methods.app_info_get(client) == AppInfo(status=portal.status, installed=True)


def test_trusted_app_info_parse_reads_the_oauth_servers_answer(portal, fake, config) -> None:
    from b24app.portals.bitrix import OAuthServer

    portal.mark_installed()
    token = portal.issue_tokens(1)["access_token"]
    info = methods.trusted_app_info_parse(OAuthServer(config).app_info(fake.oauth_url, token))
    assert info.client_id == fake.client_id
    assert info.member_id == portal.member_id
    assert info.domain == portal.domain.lower()
    assert info.client_endpoint == portal.client_endpoint
    assert info.installed is True and info.user_id == 1
    assert info.vouches_for(client_id=fake.client_id, member_id=portal.member_id)
    assert not info.vouches_for(client_id="app.other", member_id=portal.member_id)


def test_bind_list_and_unbind_placements_and_events(anna) -> None:
    assert methods.placements_list(anna) == [] and methods.events_list(anna) == []
    methods.placement_bind(anna, "TASK_VIEW_TAB", HANDLER, {"en": "Results", "ru": "Результаты"})
    methods.event_bind(anna, "onAppUpdate", EVENTS)
    assert methods.placements_list(anna) == [Binding("TASK_VIEW_TAB", HANDLER)]
    assert methods.events_list(anna) == [Binding("ONAPPUPDATE", EVENTS)]
    assert methods.placement_unbind(anna, "TASK_VIEW_TAB", HANDLER) == 2  # the §3.4 quirk
    assert methods.event_unbind(anna, "ONAPPUPDATE", EVENTS) == 1
    assert methods.placements_list(anna) == [] and methods.events_list(anna) == []


def test_placement_bind_sends_a_title_per_language(portal, anna) -> None:
    methods.placement_bind(anna, "TASK_VIEW_TAB", HANDLER, {"en": "Results", "ru": "Результаты"})
    body = portal.calls("placement.bind")[-1]["body"]
    assert body["TITLE"] == "Results"
    assert body["LANG_ALL"] == {"en": {"TITLE": "Results"}, "ru": {"TITLE": "Результаты"}}


def test_placements_list_needs_an_admin(boris) -> None:
    with pytest.raises(BitrixError):
        methods.placements_list(boris)


def test_task_results_add_update_list_delete(portal, anna) -> None:
    task = portal.add_task(title="Prepare the report")
    added = methods.task_result_add(anna, task, "Done", idempotency_key="k-1")
    assert isinstance(added, TaskResult) and added.text == "Done" and added.author_id == 1
    assert methods.task_result_add(anna, task, "Done", idempotency_key="k-1") == added  # replay
    updated = methods.task_result_update(anna, added.id, "Done twice")
    assert updated is not None and updated.id == added.id and updated.text == "Done twice"

    listing = methods.task_results_list(anna, task, order={"id": "DESC"})
    assert [item.id for item in listing.items] == [added.id] and listing.unreadable == 0
    (item,) = listing.items
    assert item.task_id == task and item.author_name == "Anna Smirnova"
    assert item.created_at is not None and item.created_at.tzinfo is not None
    assert item.can_edit and item.can_remove and not item.closed

    assert methods.task_result_delete(anna, added.id) is None
    assert methods.task_results_list(anna, task).items == []


def test_task_results_list_filters_by_result_and_author(portal, anna) -> None:
    task = portal.add_task(title="Prepare the report")
    mine = portal.add_result(task, author_id=1, text="Mine")
    theirs = portal.add_result(task, author_id=2, text="Theirs")
    by_id = methods.task_results_list(anna, task, result_id=theirs, select=("id", "text"))
    assert [(item.id, item.text) for item in by_id.items] == [(theirs, "Theirs")]
    assert by_id.items[0].author_id == 0  # not selected
    by_author = methods.task_results_list(anna, task, author_id=1)
    assert [item.id for item in by_author.items] == [mine]
    body = portal.calls("tasks.task.result.list")[-1]["body"]
    assert body["filter"] == [["taskId", task], ["authorId", 1]]


def test_task_results_page_returns_the_raw_items_of_one_page(portal, anna) -> None:
    task = portal.add_task(title="Prepare the report")
    first, second = (portal.add_result(task, author_id=1, text=t) for t in ("a", "b"))
    page = methods.task_results_page(anna, task, limit=1, offset=1, order={"id": "ASC"})
    assert page == [{"id": second}]
    assert first != second


def test_task_results_list_of_a_task_nobody_may_see_is_a_bitrix_error(portal, boris) -> None:
    task = portal.add_task(title="Secret", members=[1])
    with pytest.raises(BitrixError):
        methods.task_results_list(boris, task)


# --- a portal that answers anything -------------------------------------------------------------


class Answering:
    """A client whose every call returns ``answer`` (what a portal put in ``result``)."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.sent: list[tuple[str, dict]] = []

    def call(self, method: str, params: dict | None = None) -> Any:
        self.sent.append((method, params or {}))
        return self.answer

    def call_v3(self, method: str, params: dict | None = None, **kwargs: Any) -> Any:
        return self.call(method, params)

    def list_v3(self, method: str, params: dict | None = None, **kwargs: Any) -> V3Listing:
        self.sent.append((method, params or {}))
        return V3Listing(items=self.answer, largest_page=len(self.answer))


ODD = [None, "", "x", 0, 1, True, 1.5, [], [1, None], {}, {"x": {"y": []}}]


@pytest.mark.parametrize("answer", [None, "", "profile", 7, True, [], ["ID", 1]])
def test_profile_that_is_no_object_is_an_invalid_response(answer) -> None:
    with pytest.raises(BitrixInvalidResponse) as caught:
        methods.profile_get(Answering(answer))
    assert caught.value.code == "INVALID_RESPONSE" and isinstance(caught.value, BitrixError)


@pytest.mark.parametrize("odd", ODD)
def test_profile_fields_of_any_type_never_crash(odd) -> None:
    profile = methods.profile_get(Answering({"ID": odd, "NAME": odd, "LAST_NAME": "Li",
                                             "ADMIN": odd}))  # fmt: skip
    assert profile.id in (None, 0, 1)
    assert profile.name in ("Li", "x Li")
    assert profile.admin is (odd is True)


def test_profile_without_fields_names_nobody() -> None:
    assert methods.profile_get(Answering({})) == Profile(id=None, name="", admin=False)


def test_profile_admin_must_be_json_true() -> None:
    for value in ("Y", "true", 1, "1"):
        assert methods.profile_get(Answering({"ID": "1", "ADMIN": value})).admin is False


@pytest.mark.parametrize("answer", [None, "", 3, [], ["INSTALLED"]])
def test_app_info_that_is_no_object_is_an_invalid_response(answer) -> None:
    with pytest.raises(BitrixInvalidResponse):
        methods.app_info_get(Answering(answer))


@pytest.mark.parametrize("odd", ODD)
def test_app_info_and_trusted_app_info_fields_of_any_type_never_crash(odd) -> None:
    info = methods.app_info_get(Answering({"STATUS": odd, "INSTALLED": odd}))
    assert info.installed is (odd is True) and isinstance(info.status, str)
    trusted = methods.trusted_app_info_parse(
        {"client_id": odd, "install": {"member_id": odd, "installed": odd, "domain": odd}}
    )
    assert isinstance(trusted.client_id, str) and isinstance(trusted.domain, str)
    assert methods.trusted_app_info_parse({"install": odd}).member_id == ""
    assert methods.trusted_app_info_parse(odd).installed is False


@pytest.mark.parametrize("answer", ODD + [[{"placement": ["x"], "event": 3}, "junk", {}]])
def test_binding_lists_of_any_shape_never_crash(answer) -> None:
    for read in (methods.placements_list, methods.events_list):
        bindings = read(Answering(answer))
        assert all(isinstance(b.name, str) and isinstance(b.handler, str) for b in bindings)


@pytest.mark.parametrize("answer", ODD)
def test_unbind_counts_of_any_shape_never_crash(answer) -> None:
    assert methods.placement_unbind(Answering(answer), "TASK_VIEW_TAB", HANDLER) is None
    assert methods.event_unbind(Answering({"count": answer}), "ONAPPUPDATE", EVENTS) in (
        None,
        0,
        1,
    )


@pytest.mark.parametrize("odd", ODD)
def test_task_result_items_of_any_shape_never_crash(odd) -> None:
    assert methods.task_result_parse(odd) is None  # no object with an id
    item = methods.task_result_parse(
        {"id": "5", "taskId": odd, "text": odd, "authorId": odd, "author": odd,
         "createdAt": odd, "updatedAt": odd, "status": odd, "rights": odd}
    )  # fmt: skip
    assert item is not None and item.id == 5
    assert item.text is None or isinstance(item.text, str)
    assert isinstance(item.author_id, int) and isinstance(item.author_name, str)
    assert not (item.can_edit or item.can_remove or item.closed)


def test_task_result_item_reads_times_with_and_without_a_zone() -> None:
    item = methods.task_result_parse(
        {"id": 1, "createdAt": "2026-11-28T14:00:00+03:00", "updatedAt": "2026-11-28T14:00:00"}
    )
    assert item is not None
    assert item.created_at == datetime(2026, 11, 28, 11, 0, tzinfo=UTC)
    assert item.updated_at == datetime(2026, 11, 28, 14, 0, tzinfo=UTC)


def test_task_results_list_skips_unreadable_items_and_counts_them() -> None:
    client = Answering([{"id": 2, "text": "ok"}, {"id": "x"}, "junk", None, {"id": 3}])
    listing = methods.task_results_list(client, 51)
    assert [item.id for item in listing.items] == [2, 3] and listing.unreadable == 3
    assert listing.largest_page == 5


@pytest.mark.parametrize("answer", ODD + [{"item": None}, {"item": {"id": None}}, {"item": []}])
def test_task_result_writes_without_a_readable_item_answer_none(answer) -> None:
    assert methods.task_result_add(Answering(answer), 51, "Done") is None
    assert methods.task_result_update(Answering(answer), 7, "Done") is None


@pytest.mark.parametrize("answer", [None, [], {}, {"items": None}, {"items": {"0": {}}}, "x"])
def test_task_results_page_without_an_items_list_is_an_invalid_response(answer) -> None:
    with pytest.raises(BitrixInvalidResponse):
        methods.task_results_page(Answering(answer), 51, limit=10)
