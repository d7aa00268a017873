"""No web request sleeps on a portal's request budget: each web path waits at most
`WEB_LIMITER_WAIT_S` for a slot of the limiter, then answers "busy, try again" (503 with
`Retry-After`, in the frame's language) or leaves the work queued for Celery (an edit).

The portal's budget is held with the app's own limiter (`penalize`, as after a
`QUERY_LIMIT_EXCEEDED`) for `HELD_S`: longer than the web wait, shorter than what the web paths
used to wait (5 s for the frame's `profile` and an event sender's, 2 s for the list and an edit,
30 s for the install wizard and "Bind again"), so before this change every path below slept
through the hold and answered as if nothing was wrong. The limiter is wrapped to record what
each caller asked of it (the longest wait it would accept, and what it waited): the assertions
are on those and on what reached the fake portal, not on the wall clock.
"""

from __future__ import annotations

import pytest

from b24app.portals import services
from b24app.portals.bitrix import BitrixUnavailable
from b24app.portals.models import Account, Portal
from b24app.portals.ratelimit import (
    BACKGROUND_LIMITER_WAIT_S,
    BUSY_RETRY_AFTER_S,
    WEB_LIMITER_WAIT_S,
)
from b24app.portals.services import accounts, clients
from b24app.portals.tasks import portal_bindings_check_task
from results.models import ResultChange
from results.tasks import result_change_deliver_task
from tests.support.http import csp
from tests.support.portals import post_event, post_frame
from tests.support.results import (
    a_task,
    add,
    applied,
    frame_post,
    frame_token,
    installed,
    open_screen,
    texts,
    writes,
)

pytestmark = pytest.mark.django_db

ANNA, BORIS = 1, 2
HELD_S = 1.5
"""How long the portal's budget is taken: more than the web wait, less than the old waits."""
BUSY_EN = "Bitrix24 is busy right now. Try again in a minute."
BUSY_RU = "Битрикс24 сейчас занят. Попробуйте через минуту."
REOPEN_RU = "Битрикс24 сейчас занят; откройте приложение через минуту."


class RecordingLimiter:
    """The app's limiter, recording each `acquire`: the key, the longest wait the caller
    accepted (`max_wait`) and the seconds it waited, or `None` when it was refused."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.asked: list[tuple[str, float | None, float | None]] = []

    def acquire(self, key, burst, rate, *, max_wait=None):
        try:
            waited = self.inner.acquire(key, burst, rate, max_wait=max_wait)
        except Exception:
            self.asked.append((key, max_wait, None))
            raise
        self.asked.append((key, max_wait, waited))
        return waited

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def of(self, member_id: str) -> list[tuple[float | None, float | None]]:
        return [(max_wait, waited) for key, max_wait, waited in self.asked if key == member_id]


@pytest.fixture
def limiter(monkeypatch):
    recording = RecordingLimiter(services.rate_limiter())
    monkeypatch.setattr(clients, "rate_limiter", lambda: recording)  # what `_client` calls
    return recording


@pytest.fixture
def task(portal):
    return a_task(portal, results=["Report sent"])


def hold_budget(portal, seconds: float = HELD_S) -> None:
    """Another caller took the portal's request budget for `seconds` (nothing was sent)."""
    services.rate_limiter().penalize(portal.member_id, seconds)


def assert_waited_at_most_the_web_wait(limiter, portal) -> None:
    asked = limiter.of(portal.member_id)
    assert asked, "the path never asked the limiter"
    assert all(max_wait == WEB_LIMITER_WAIT_S for max_wait, _ in asked), asked
    assert all(waited is None or waited <= WEB_LIMITER_WAIT_S for _, waited in asked), asked
    assert asked[-1][1] is None  # the held budget refused it: nothing waited, nothing sent


def assert_busy(response) -> None:
    assert response.status_code == 503, response.content.decode()[:2000]
    _, cap = BUSY_RETRY_AFTER_S
    assert 1 <= int(response["Retry-After"]) <= cap


def test_web_wait_is_a_few_hundred_milliseconds_and_background_keeps_its_budget():
    assert 0 < WEB_LIMITER_WAIT_S <= 0.5
    assert BACKGROUND_LIMITER_WAIT_S >= 10
    assert accounts.WEB_LIMITER_WAIT_S == WEB_LIMITER_WAIT_S  # the web paths' one constant


def test_frame_open_with_the_budget_held_answers_busy_in_the_frames_language(
    client, portal, task, limiter
):
    installed(client, portal, ANNA)
    hold_budget(portal)
    limiter.asked.clear()
    profiles = len(portal.calls("profile"))

    response = post_frame(
        client, *portal.frame_post(BORIS, options={"taskId": str(task)}, lang="ru")
    )

    assert_busy(response)
    assert REOPEN_RU in response.content.decode()
    assert len(portal.calls("profile")) == profiles
    assert_waited_at_most_the_web_wait(limiter, portal)
    assert csp(response)["frame-ancestors"] == portal.url


def test_results_list_with_the_budget_held_answers_busy_page_and_json(
    client, portal, task, limiter
):
    installed(client, portal, ANNA)
    _, token = open_screen(client, portal, BORIS, task, lang="ru")
    hold_budget(portal)
    limiter.asked.clear()
    lists = len(portal.calls("tasks.task.result.list"))

    page = client.post("/b24/app/task/", {"frame_token": token, "task": str(task)})
    as_json = frame_post(client, token, f"/b24/app/task/?task={task}", {"task": task}, as_json=True)

    assert_busy(page)
    assert BUSY_RU in page.content.decode()
    assert_busy(as_json)
    assert as_json.json()["unavailable"] == BUSY_RU
    assert len(portal.calls("tasks.task.result.list")) == lists
    assert_waited_at_most_the_web_wait(limiter, portal)


def test_rebind_with_the_budget_held_answers_busy_without_touching_the_bindings(
    client, portal, limiter
):
    installed(client, portal, ANNA)
    portal.placements.clear()
    response = post_frame(client, *portal.frame_post(ANNA, placement="DEFAULT", lang="ru"))
    token = frame_token(response)
    hold_budget(portal)
    limiter.asked.clear()
    reads = len(portal.calls("placement.get"))

    response = client.post("/b24/app/rebind/", {"frame_token": token})

    assert_busy(response)
    assert BUSY_RU in response.content.decode()
    assert len(portal.calls("placement.get")) == reads
    assert portal.placement_binding("TASK_VIEW_TAB") is None
    assert_waited_at_most_the_web_wait(limiter, portal)


def test_install_wizard_with_the_budget_held_answers_busy_and_can_be_run_again(
    client, portal, limiter
):
    hold_budget(portal)
    url, fields = portal.install_post(ANNA, lang="ru")

    response = post_frame(client, url, fields)

    assert_busy(response)
    assert BUSY_RU in response.content.decode()
    assert portal.calls("profile") == []
    assert_waited_at_most_the_web_wait(limiter, portal)
    assert not Portal.objects.filter(member_id=portal.member_id).exists()

    services.rate_limiter().reset(portal.member_id)  # the budget is back
    assert post_frame(client, url, fields).status_code == 200


def test_event_with_the_budget_held_answers_busy_and_changes_nothing(client, portal, limiter):
    hold_budget(portal)

    response = post_event(client, portal.event_body("ONAPPINSTALL", user_id=ANNA))

    assert_busy(response)
    assert response.json() == {"error": "unavailable"}
    assert not Portal.objects.filter(member_id=portal.member_id).exists()
    assert_waited_at_most_the_web_wait(limiter, portal)


def test_session_renewal_with_the_budget_held_answers_busy_json(client, portal, task, limiter):
    installed(client, portal, ANNA)
    _, token = open_screen(client, portal, BORIS, task)
    _, fields = portal.frame_post(BORIS, options={"taskId": str(task)})
    hold_budget(portal)
    limiter.asked.clear()

    response = client.post(
        "/b24/app/session/",
        {"AUTH_ID": fields["AUTH_ID"], "REFRESH_ID": fields["REFRESH_ID"], "AUTH_EXPIRES": "3600"},
        HTTP_X_FRAME_TOKEN=token,
    )

    assert_busy(response)
    assert response.json() == {"error": "RATE_LIMITED"}
    assert_waited_at_most_the_web_wait(limiter, portal)


def test_edit_with_the_budget_held_is_queued_at_once_and_delivered_by_the_worker(
    client, portal, task, limiter
):
    installed(client, portal, ANNA)
    _, token = open_screen(client, portal, BORIS, task)
    hold_budget(portal)
    limiter.asked.clear()

    response = add(client, token, task, "Figures checked", as_json=True)

    assert response.status_code == 200
    assert response.json()["change"]["state"] == "queued"
    assert writes(portal) == []
    assert_waited_at_most_the_web_wait(limiter, portal)
    change = ResultChange.objects.get()
    assert change.state == ResultChange.State.QUEUED and change.next_attempt_at is not None

    # Its turn comes (the hold is over): the worker's task sends it, once.
    services.rate_limiter().reset(portal.member_id)
    ResultChange.objects.filter(pk=change.pk).update(next_attempt_at=change.created_at)
    assert result_change_deliver_task(change.pk) == ResultChange.State.SAVED
    assert len(applied(portal, change.idempotency_key)) == 1
    assert "Figures checked" in texts(portal, task)


def test_account_client_defaults_to_the_web_wait_background_checks_wait_their_turn(
    client, portal, limiter
):
    """A caller that names no wait gets the web one (the admin's actions); the bindings check
    Celery runs sleeps through a short hold instead of failing for it."""
    installed(client, portal, ANNA)
    account = Account.objects.select_related("portal").get(user_id=ANNA)
    hold_budget(portal)
    with pytest.raises(BitrixUnavailable) as refused:
        services.account_client(account).call("profile")
    assert refused.value.code == "RATE_LIMITED"

    portal.placements.clear()
    hold_budget(portal, 0.5)
    limiter.asked.clear()
    assert portal_bindings_check_task(Portal.objects.get().pk, account.pk) == "repaired"
    assert {max_wait for max_wait, _ in limiter.of(portal.member_id)} == {BACKGROUND_LIMITER_WAIT_S}
