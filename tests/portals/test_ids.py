"""Ids from outside are 1 to 18 ASCII digits (`b24app.ids.parse_id`), never `str.isdigit()`:
"²" is a digit to `isdigit()` and an error to `int()`, so a portal answering it made a 500."""

from __future__ import annotations

import pytest

from b24app.ids import parse_id
from b24app.portals.models import Account, EventReceipt, Portal
from results.models import ResultChange
from tests.support.portals import install, post_event, post_frame

ODD_IDS = ["²", "١", "１", "1²", "1_000", " 1", "1\n", "+1", "-1", "0x1", "1.0", "9" * 19, ""]


@pytest.mark.parametrize("value", ODD_IDS)
def test_parse_id_refuses_anything_but_ascii_digits(value):
    assert parse_id(value) is None


@pytest.mark.parametrize("value", [None, True, 1.0, -1, 10**18, ["1"], {"1": 1}])
def test_parse_id_refuses_other_types_and_out_of_range_numbers(value):
    assert parse_id(value) is None


@pytest.mark.parametrize(
    ("value", "number"), [("0", 0), ("7", 7), ("007", 7), ("9" * 18, 10**18 - 1), (42, 42)]
)
def test_parse_id_reads_ascii_digits(value, number):
    assert parse_id(value) == number


def _snapshot():
    return (
        list(Portal.objects.values().order_by("pk")),
        list(Account.objects.values().order_by("pk")),
        list(EventReceipt.objects.values().order_by("pk")),
        ResultChange.objects.count(),
    )


@pytest.mark.django_db
@pytest.mark.parametrize("odd", ["²", "١", "7 "])
def test_frame_open_with_an_odd_profile_id_is_refused_and_stores_nothing(client, portal, odd):
    assert install(client, portal).status_code == 200
    before = _snapshot()
    portal.profile_id = odd

    response = post_frame(client, *portal.frame_post(2))

    assert 400 <= response.status_code < 500, response.status_code
    assert "did not say who you are" in response.content.decode()
    assert "data-frame-token" not in response.content.decode()
    assert _snapshot() == before


@pytest.mark.django_db
def test_install_wizard_with_an_odd_profile_id_is_refused_and_stores_nothing(client, portal):
    portal.profile_id = "²"

    response = install(client, portal)

    assert 400 <= response.status_code < 500, response.status_code
    assert "did not tell who is installing" in response.content.decode()
    assert Portal.objects.count() == 0 and Account.objects.count() == 0
    assert portal.placement_binding("TASK_VIEW_TAB") is None


@pytest.mark.django_db
@pytest.mark.parametrize("event", ["ONAPPINSTALL", "ONAPPUPDATE"])
def test_event_with_an_odd_profile_id_is_refused_and_stores_nothing(client, portal, event):
    if event == "ONAPPUPDATE":
        assert post_event(client, portal.event_body("ONAPPINSTALL", user_id=1)).status_code == 200
    before = _snapshot()
    portal.profile_id = "²"

    response = post_event(client, portal.event_body(event, user_id=1))

    assert 400 <= response.status_code < 500, response.status_code
    assert response.json()["error"] == "mismatch"
    assert _snapshot() == before


@pytest.mark.django_db
def test_an_odd_user_id_from_app_info_is_not_believed_and_not_a_500(client, fake, portal):
    """`app.info`'s `user_id` is only a cross-check of `profile`: an odd one counts as none."""
    task = portal.add_task(title="Prepare the report")
    fake.app_info_user_id = "²"

    response = post_frame(client, *portal.frame_post(2, options={"taskId": str(task)}))

    assert response.status_code == 200, response.content.decode()[:500]
    assert list(Account.objects.values_list("user_id", flat=True)) == [2]


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/admin/portals/account/", "/admin/results/resultchange/"])
def test_admin_search_for_an_odd_number_is_a_text_search_not_a_500(admin_client, path):
    response = admin_client.get(path, {"q": "²"})
    assert response.status_code == 200
