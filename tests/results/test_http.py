"""How services' outcomes become HTTP statuses, and what the delivery makes of odd answers."""

from types import SimpleNamespace
from typing import Any

import pytest

from b24app.portals.bitrix.client import V3Listing
from b24app.portals.services import FrameRefusal, FrameRefused
from results.http import status_of
from results.models import ResultChange
from results.services.delivery import _read_back, _write


@pytest.mark.parametrize(
    ("reason", "status"),
    [
        (FrameRefusal.MALFORMED, 400),
        (FrameRefusal.EXPIRED, 401),
        (FrameRefusal.DENIED, 403),
        (FrameRefusal.UNAVAILABLE, 503),
    ],
)
def test_a_frame_refusal_becomes_the_status_of_its_reason(reason, status):
    assert status_of(FrameRefused("no", reason=reason)) == status


def test_a_frame_refusal_is_denied_unless_it_says_otherwise():
    assert status_of(FrameRefused("no")) == 403


class Listing:
    """A client whose every list answers `items`, and every v3 call `answer`."""

    def __init__(self, items: list[Any], answer: Any = None) -> None:
        self.items, self.answer = items, answer

    def list_v3(self, method: str, params: dict | None = None, **kwargs: Any) -> V3Listing:
        return V3Listing(items=self.items, largest_page=len(self.items))

    def call_v3(self, method: str, params: dict | None = None, **kwargs: Any) -> Any:
        return self.answer


def _change(action, **fields):
    return SimpleNamespace(action=action, task_id=7, result_id=5, text_after="new", **fields)


@pytest.mark.parametrize(
    ("items", "found"),
    [([], 5), ([{"id": "5", "text": "old"}], None), (["garbage"], None), ([{"id": "x"}], None)],
)
def test_a_delete_is_read_back_as_done_only_when_nothing_came_back(items, found):
    assert _read_back(Listing(items), _change(ResultChange.Action.DELETE)) == found


def test_an_edit_is_read_back_as_done_when_the_result_has_its_text():
    change = _change(ResultChange.Action.UPDATE)
    assert _read_back(Listing([{"id": "5", "text": "new"}]), change) == 5
    assert _read_back(Listing([{"id": "5", "text": "old"}, "garbage"]), change) is None


@pytest.mark.parametrize("answer", [None, [], {"item": None}, {"item": {"id": "x"}}])
def test_an_add_answered_without_a_readable_item_names_no_result(answer):
    assert _write(Listing([], answer), _change(ResultChange.Action.ADD), "key") is None


def test_an_add_names_the_result_the_portal_answers():
    assert _write(Listing([], {"item": {"id": 42}}), _change(ResultChange.Action.ADD), "k") == 42
