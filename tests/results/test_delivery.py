"""Edits reach Bitrix24 as the person who made them, once, whatever the portal does meanwhile.

Every test drives the app through its endpoints (Django's test client) while the app talks real
HTTP to the fake portal, and checks the portal's truth: `portal.results(task)` for what exists
and `portal.requests` for what was sent, under which `Idempotency-Key` and as which user.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection
from django.test import override_settings
from django.utils import timezone

from b24app.portals.models import Account
from b24app.portals.services import portal_rate, rate_limiter
from results import services
from results.models import PortalOutbox, ResultChange
from results.services import delivery
from results.tasks import result_change_deliver_task, result_changes_sweep_task
from tests.support.results import (
    acting_user,
    add,
    applied,
    delete,
    edit,
    frame_get,
    frame_post,
    html,
    installed_task,
    open_screen,
    texts,
    writes,
)

ACCESS_DENIED = "BITRIX_REST_V3_EXCEPTION_ACCESSDENIEDEXCEPTION"
ADD, UPDATE, DELETE = (
    "tasks.task.result.add",
    "tasks.task.result.update",
    "tasks.task.result.delete",
)
ANNA, BORIS = 1, 2


@pytest.fixture
def task(client, portal):
    """The app installed by Anna (the admin) and a task everyone can see."""
    return installed_task(client, portal, user_id=ANNA)


def _change(**filters) -> ResultChange:
    return ResultChange.objects.select_related("account").get(**filters)


def _time_passes(portal, change: ResultChange) -> None:
    """Jump past the change's backoff, its portal's backoff and the portal's request-budget
    pause."""
    past = timezone.now() - timedelta(seconds=1)
    ResultChange.objects.filter(pk=change.pk).update(next_attempt_at=past)
    PortalOutbox.objects.filter(portal__member_id=portal.member_id).update(resume_at=past)
    rate_limiter().reset(portal.member_id)


def _key_header(record: dict) -> str | None:
    return record["headers"].get("Idempotency-Key")


def _body_without_auth(record: dict) -> dict:
    return {k: v for k, v in record["body"].items() if k != "auth"}


# --- add / edit / delete as the editor -------------------------------------------------------


@pytest.mark.django_db
def test_result_add_reaches_the_portal_as_the_editor_under_the_changes_key(
    client, fake, portal, task, celery_eager
):
    _, token = open_screen(client, portal, BORIS, task)

    response = add(client, token, task, "Sent the report to the client")

    assert response.status_code == 200
    assert "Saved" in html(response)
    [item] = portal.results(task)
    assert (item["text"], item["authorId"]) == ("Sent the report to the client", BORIS)
    [request] = writes(portal)
    assert request["method_name"] == ADD and request["status"] == 200
    assert acting_user(fake, request) == BORIS  # not Anna, whose token the install stored
    assert _body_without_auth(request) == {
        "fields": {"taskId": task, "text": "Sent the report to the client"}
    }
    change = _change(task_id=task)
    assert change.account.user_id == BORIS
    assert change.state == ResultChange.State.SAVED
    assert change.result_id == item["id"]
    assert _key_header(request) == request["idempotency_key"] == change.idempotency_key


@pytest.mark.django_db
def test_result_edit_sends_only_text_as_the_author(client, fake, portal, task, celery_eager):
    result_id = portal.add_result(task, author_id=BORIS, text="Draft")
    _, token = open_screen(client, portal, BORIS, task)

    response = frame_post(
        client,
        token,
        f"/b24/app/results/{result_id}/edit/",
        {
            "task": task,
            "text": "  Final version\r\nwith figures  ",
            "text_before": "Draft",
            # Whatever else a page might post, only `text` may reach `fields`.
            "taskId": "999",
            "status": "closed",
            "authorId": str(ANNA),
            "fileIds": "7",
        },
    )

    assert response.status_code == 200
    assert "Saved" in html(response)
    [request] = writes(portal)
    assert request["method_name"] == UPDATE and request["status"] == 200
    assert _body_without_auth(request) == {
        "id": result_id,
        "fields": {"text": "Final version\nwith figures"},
    }
    assert acting_user(fake, request) == BORIS
    change = _change(result_id=result_id)
    assert (change.action, change.state) == (ResultChange.Action.UPDATE, ResultChange.State.SAVED)
    assert _key_header(request) == change.idempotency_key
    [item] = portal.results(task)
    assert (item["id"], item["text"], item["authorId"]) == (
        result_id,
        "Final version\nwith figures",
        BORIS,
    )


@pytest.mark.django_db
def test_result_delete_reaches_the_portal_as_the_author(client, fake, portal, task, celery_eager):
    keep = portal.add_result(task, author_id=ANNA, text="Anna's result")
    gone = portal.add_result(task, author_id=BORIS, text="Boris's result")
    _, token = open_screen(client, portal, BORIS, task)

    response = delete(client, token, task, gone)

    assert response.status_code == 200
    assert "Saved" in html(response)
    assert [item["id"] for item in portal.results(task)] == [keep]
    [request] = writes(portal)
    assert request["method_name"] == DELETE and request["status"] == 200
    assert _body_without_auth(request) == {"id": gone}
    assert acting_user(fake, request) == BORIS
    assert _key_header(request) == _change(result_id=gone).idempotency_key
    # The deleted result is no longer shown.
    assert "Boris&#x27;s result" not in html(response) and "Boris's result" not in html(response)


@pytest.mark.django_db
def test_result_changes_of_two_people_each_carry_their_own_token_and_key(
    client, fake, portal, task, celery_eager
):
    annas = portal.add_result(task, author_id=ANNA, text="Anna v1")
    boris = portal.add_result(task, author_id=BORIS, text="Boris v1")
    _, anna_token = open_screen(client, portal, ANNA, task)
    _, boris_token = open_screen(client, portal, BORIS, task)

    edit(client, boris_token, task, boris, "Boris v2")
    edit(client, anna_token, task, annas, "Anna v2")
    add(client, boris_token, task, "Boris extra")
    delete(client, anna_token, task, annas)

    requests = writes(portal)
    assert [(r["method_name"], acting_user(fake, r), r["status"]) for r in requests] == [
        (UPDATE, BORIS, 200),
        (UPDATE, ANNA, 200),
        (ADD, BORIS, 200),
        (DELETE, ANNA, 200),
    ]
    changes = list(ResultChange.objects.order_by("pk"))
    assert [r["idempotency_key"] for r in requests] == [c.idempotency_key for c in changes]
    assert len({c.idempotency_key for c in changes}) == 4
    assert texts(portal, task) == ["Boris extra", "Boris v2"]


# --- refused before anything is sent ---------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("text", [None, "", "   ", "\r\n\t \n"])
@pytest.mark.parametrize("action", ["add", "edit"])
def test_result_text_blank_is_refused_before_anything_is_written_or_sent(
    client, portal, task, celery_eager, action, text
):
    result_id = portal.add_result(task, author_id=BORIS, text="Keep me")
    _, token = open_screen(client, portal, BORIS, task)
    data = {"task": task} if text is None else {"task": task, "text": text}
    path = "/b24/app/results/add/" if action == "add" else f"/b24/app/results/{result_id}/edit/"

    response = frame_post(client, token, path, data)
    as_json = frame_post(client, token, path, data, as_json=True)

    assert response.status_code == 400
    assert "Result text is required." in html(response)
    assert as_json.status_code == 400
    assert as_json.json()["error"] == "Result text is required."
    assert not ResultChange.objects.exists()
    assert writes(portal) == []
    assert [(i["id"], i["text"]) for i in portal.results(task)] == [(result_id, "Keep me")]


@pytest.mark.django_db
def test_result_text_blank_is_refused_in_russian(client, portal, task, celery_eager):
    _, token = open_screen(client, portal, BORIS, task, lang="ru")

    response = add(client, token, task, "  ")

    assert response.status_code == 400
    assert "Введите текст результата." in html(response)
    assert not ResultChange.objects.exists()
    assert writes(portal) == []


# --- refused by Bitrix24 -----------------------------------------------------------------------


@pytest.mark.django_db
def test_result_edit_of_another_users_result_is_not_saved_with_a_reason_and_retry_resends(
    client, fake, portal, task, celery_eager
):
    annas = portal.add_result(task, author_id=ANNA, text="Anna's own words")
    _, token = open_screen(client, portal, BORIS, task)

    response = edit(client, token, task, annas, "Boris rewrites it")

    page = html(response)
    assert response.status_code == 200
    assert "Not saved" in page
    assert "only its author can" in page
    assert ACCESS_DENIED not in page  # a reason for a person, not a code
    assert "Retry" in page
    change = _change(result_id=annas)
    assert change.state == ResultChange.State.FAILED
    assert change.last_error == ACCESS_DENIED
    [request] = writes(portal)
    assert request["status"] == 403
    assert acting_user(fake, request) == BORIS  # never Anna's (admin, author) token
    [state] = frame_get(client, token, f"/b24/app/changes/?ids={change.pk}").json()["changes"]
    assert {key: state[key] for key in ("id", "state", "label", "action")} == {
        "id": change.pk,
        "state": "failed",
        "label": "Not saved",
        "action": "update",
    }
    assert "Bitrix24 does not let you change this result (only its author can)." in state["html"]
    assert "Retry" in state["html"] and f"/b24/app/changes/{change.pk}/retry/" in state["html"]

    retried = frame_post(client, token, f"/b24/app/changes/{change.pk}/retry/")

    assert retried.status_code == 200
    assert "Not saved" in html(retried)
    first, second = writes(portal)
    assert second["idempotency_key"] == first["idempotency_key"] == change.idempotency_key
    assert _body_without_auth(second) == _body_without_auth(first)
    assert acting_user(fake, second) == BORIS
    assert _change(pk=change.pk).attempts == 2
    assert portal.results(task)[0]["text"] == "Anna's own words"


@pytest.mark.django_db
def test_result_change_retry_queues_a_refused_change_which_is_then_delivered_once(
    client, fake, portal, task, celery_eager
):
    result_id = portal.add_result(task, author_id=ANNA, text="v1")
    _, token = open_screen(client, portal, ANNA, task)
    portal.fail_next(error=ACCESS_DENIED, method=UPDATE)

    refused = edit(client, token, task, result_id, "v2")

    assert "Not saved" in html(refused)
    change = _change(result_id=result_id)
    assert change.state == ResultChange.State.FAILED
    # Retry while Bitrix24 is busy: the change goes back to the queue.
    portal.fail_next(error="QUERY_LIMIT_EXCEEDED", method=UPDATE)

    retried = frame_post(client, token, f"/b24/app/changes/{change.pk}/retry/")

    assert "Queued" in html(retried)
    change = _change(pk=change.pk)
    assert change.state == ResultChange.State.QUEUED
    assert change.last_error_message == ""
    assert portal.results(task)[0]["text"] == "v1"

    _time_passes(portal, change)
    assert result_change_deliver_task.delay(change.pk).get() == "saved"

    assert portal.results(task)[0]["text"] == "v2"
    requests = writes(portal)
    assert [r["status"] for r in requests] == [403, 503, 200]
    assert {r["idempotency_key"] for r in requests} == {change.idempotency_key}
    assert len(applied(portal, change.idempotency_key)) == 1


# --- busy portals: queued, then delivered ------------------------------------------------------


@pytest.mark.django_db
def test_result_change_query_limit_on_first_try_is_queued_then_delivered(
    client, fake, portal, task, celery_eager
):
    _, token = open_screen(client, portal, BORIS, task)
    portal.fail_next(error="QUERY_LIMIT_EXCEEDED", method=ADD)
    before = timezone.now()

    response = add(client, token, task, "Waiting for the portal")

    assert "Queued" in html(response)
    change = _change(task_id=task)
    assert change.state == ResultChange.State.QUEUED
    assert change.last_error == "QUERY_LIMIT_EXCEEDED"
    assert change.attempts == 1
    assert change.next_attempt_at > before
    assert change.lease_until is None
    assert portal.results(task) == []
    states = f"/b24/app/changes/?ids={change.pk}"
    # Not due yet: the screen's polling does not hammer a busy portal.
    assert frame_get(client, token, states).json()["changes"][0]["state"] == "queued"
    assert len(writes(portal)) == 1

    _time_passes(portal, change)
    polled = frame_get(client, token, states).json()["changes"]

    assert polled[0]["state"] == "saved" and polled[0]["label"] == "Saved"
    [item] = portal.results(task)
    assert (item["text"], item["authorId"]) == ("Waiting for the portal", BORIS)
    first, second = writes(portal)
    assert (first["status"], second["status"]) == (503, 200)
    assert first["idempotency_key"] == second["idempotency_key"] == change.idempotency_key
    assert acting_user(fake, second) == BORIS
    change = _change(pk=change.pk)
    assert (change.state, change.attempts, change.result_id) == ("saved", 2, item["id"])


@pytest.mark.django_db
def test_result_add_queued_by_a_busy_portal_stays_on_the_screen_to_be_polled(
    client, portal, task, celery_eager
):
    """Contract: a queued change turns into Saved on the open screen without a reload, so the
    answer to the submit carries the new item marked queued, under the change the page polls."""
    portal.add_result(task, author_id=ANNA, text="Already there")
    _, token = open_screen(client, portal, BORIS, task)
    portal.fail_next(error="QUERY_LIMIT_EXCEEDED", method=ADD)

    response = add(client, token, task, "Waiting for the portal", as_json=True)

    change = _change(task_id=task)
    assert change.state == ResultChange.State.QUEUED
    data = response.json()
    assert response.status_code == 200
    assert data["change"]["id"] == change.pk and data["change"]["state"] == "queued"
    assert f'data-change-id="{change.pk}" data-change-state="queued"' in data["item_html"]
    assert "Waiting for the portal" in data["item_html"]
    assert "Queued" in data["change"]["html"]


@pytest.mark.django_db
def test_result_change_operation_time_limit_waits_for_operating_reset_at(
    client, fake, portal, task, celery_eager
):
    result_id = portal.add_result(task, author_id=BORIS, text="Before")
    _, token = open_screen(client, portal, BORIS, task)
    reset_at = int(time.time()) + 240
    portal.fail_next(error="OPERATION_TIME_LIMIT", method=UPDATE, operating_reset_at=reset_at)

    response = edit(client, token, task, result_id, "After")

    assert "Queued" in html(response)
    change = _change(result_id=result_id)
    assert change.state == ResultChange.State.QUEUED
    assert change.last_error == "OPERATION_TIME_LIMIT"
    assert change.next_attempt_at >= datetime.fromtimestamp(reset_at, tz=UTC)
    # An attempt before then (a duplicate message, the sweep) sends nothing.
    assert result_change_deliver_task.delay(change.pk).get() == "queued"
    assert result_changes_sweep_task.delay().get() == 0
    assert len(writes(portal)) == 1

    ResultChange.objects.filter(pk=change.pk).update(next_attempt_at=timezone.now())
    PortalOutbox.objects.update(resume_at=timezone.now())
    assert result_change_deliver_task.delay(change.pk).get() == "saved"

    assert portal.results(task)[0]["text"] == "After"
    assert [r["idempotency_key"] for r in writes(portal)] == [change.idempotency_key] * 2


@pytest.mark.django_db
def test_result_change_queued_is_scheduled_on_the_broker_for_when_it_is_due(
    client, portal, task, monkeypatch, django_capture_on_commit_callbacks
):
    """With a broker (no inline mode) a queued change's next attempt is a Celery task whose
    countdown runs until the change is due, not sooner."""
    from b24app.celery import app

    result_id = portal.add_result(task, author_id=BORIS, text="Before")
    _, token = open_screen(client, portal, BORIS, task)
    scheduled = []
    monkeypatch.setattr(
        result_change_deliver_task,
        "apply_async",
        lambda args, countdown=None, **kw: scheduled.append((args, countdown)),
    )
    reset_at = int(time.time()) + 200
    portal.fail_next(error="OPERATION_TIME_LIMIT", method=UPDATE, operating_reset_at=reset_at)
    was_eager, app.conf.task_always_eager = app.conf.task_always_eager, False
    try:
        with django_capture_on_commit_callbacks(execute=True):
            edit(client, token, task, result_id, "After")
    finally:
        app.conf.task_always_eager = was_eager

    change = _change(result_id=result_id)
    [(args, countdown)] = scheduled
    assert args == (change.pk,)
    assert reset_at - time.time() - 5 <= countdown <= services.MAX_DELAY_S


@pytest.mark.django_db
def test_result_change_whose_portal_budget_is_taken_is_requeued_for_its_turn_not_slept_on(
    client, fake, portal, task, celery_eager
):
    """Head-of-line blocking: a worker that slept until a busy portal had budget again would
    leave every other portal's changes waiting behind it in the queue. A background delivery
    that would wait more than two of the portal's request intervals sends nothing and takes a
    turn instead: after the portal's other deferred changes, one interval apart, not before the
    limiter's next free slot, without counting as an attempt. At its turn it is sent, once."""
    changes = [_queued_change(client, portal, task, text=f"Turn {n}") for n in range(3)]
    sent_before = len(writes(portal))
    _, rate = portal_rate(changes[0].portal)
    interval = timedelta(seconds=1 / rate)
    budget_back = timezone.now() + timedelta(seconds=3)
    # Taken for 3 s: more than the 2 intervals a worker may sleep (1 s at 2/s), less than the
    # 10 s a worker used to sleep through.
    rate_limiter().penalize(portal.member_id, 3.0)

    deferred = [services.result_change_deliver(change_id=change.pk) for change in changes]

    assert [c.state for c in deferred] == [ResultChange.State.QUEUED] * 3
    assert [c.last_error for c in deferred] == [services.DEFERRED] * 3
    assert [c.attempts for c in deferred] == [1, 1, 1]  # the refused first tries only
    assert len(writes(portal)) == sent_before
    first, second, third = (c.next_attempt_at for c in deferred)
    assert first >= budget_back - timedelta(seconds=1)
    assert second >= first + interval and third >= second + interval
    assert third <= budget_back + 4 * interval + timedelta(seconds=5)

    for change in deferred:
        _time_passes(portal, change)
        assert services.result_change_deliver(change_id=change.pk).state == "saved"

    assert texts(portal, task) == ["Turn 0", "Turn 1", "Turn 2"]
    assert [len(applied(portal, c.idempotency_key)) for c in changes] == [1, 1, 1]


@pytest.mark.django_db
def test_result_change_whose_portal_has_its_requests_in_flight_at_the_cap_takes_its_turn(
    client, fake, portal, task, celery_eager
):
    """Requests in flight to the portal at the cap (B24_PORTAL_MAX_INFLIGHT): nothing is sent,
    so the change takes its turn like one whose request budget is spoken for, and the portal
    is not made to back off (it did not fail)."""
    from b24app.portals.services import inflight_limiter

    change = _queued_change(client, portal, task)
    sent_before = len(writes(portal))
    outbox_before = list(PortalOutbox.objects.values("failures", "resume_at"))
    slot = inflight_limiter().acquire(portal.member_id, 1, max_wait=0, ttl=60)
    try:
        with override_settings(B24_PORTAL_MAX_INFLIGHT=1):
            deferred = services.result_change_deliver(change_id=change.pk)
    finally:
        inflight_limiter().release(portal.member_id, slot)

    assert deferred.state == ResultChange.State.QUEUED
    assert deferred.last_error == services.DEFERRED and deferred.attempts == change.attempts
    assert len(writes(portal)) == sent_before
    assert list(PortalOutbox.objects.values("failures", "resume_at")) == outbox_before
    _time_passes(portal, deferred)
    assert services.result_change_deliver(change_id=change.pk).state == "saved"
    assert len(applied(portal, change.idempotency_key)) == 1


# --- the lease: one attempt at a time --------------------------------------------------------


def _queued_change(client, portal, task, text="Once only") -> ResultChange:
    """A committed, queued, due add by Boris that has not reached the portal."""
    _, token = open_screen(client, portal, BORIS, task)
    portal.fail_next(error="QUERY_LIMIT_EXCEEDED", method=ADD)
    add(client, token, task, text)
    change = _change(task_id=task, text_after=text)
    assert change.state == ResultChange.State.QUEUED
    _time_passes(portal, change)
    return change


def _deliver_in_thread(change_id: int, outcome: dict, key: str):
    def run():
        try:
            outcome[key] = services.result_change_deliver(change_id=change_id).state
        except Exception as exc:  # reported by the test
            outcome[key] = exc
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.django_db(transaction=True)
def test_result_change_deliver_while_another_attempt_holds_the_lease_sends_nothing(
    client, fake, portal, task, celery_eager, monkeypatch
):
    change = _queued_change(client, portal, task)
    portal.latency_s = 1.5  # the first attempt is still waiting for Bitrix24
    in_flight = threading.Event()
    send = delivery._send

    def send_and_signal(*args, **kwargs):
        in_flight.set()
        return send(*args, **kwargs)

    monkeypatch.setattr(delivery, "_send", send_and_signal)
    outcome: dict = {}

    first = _deliver_in_thread(change.pk, outcome, "first")
    assert in_flight.wait(timeout=10), outcome
    second = services.result_change_deliver(change_id=change.pk)
    first.join(timeout=30)

    assert second.state == ResultChange.State.QUEUED  # it found the change leased and left it
    assert second.lease_until is not None
    assert outcome["first"] == ResultChange.State.SAVED
    assert texts(portal, task) == ["Once only"]
    assert len(writes(portal)) == 2  # the refused first try, then exactly one more
    assert len(applied(portal, change.idempotency_key)) == 1
    assert ResultChange.objects.get(pk=change.pk).attempts == 2


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_result_change_deliver_concurrent_calls_send_once(client, fake, portal, task, celery_eager):
    change = _queued_change(client, portal, task)
    portal.latency_s = 0.5
    outcome: dict = {}
    barrier = threading.Barrier(6)

    def run(n):
        barrier.wait(timeout=10)
        try:
            outcome[n] = services.result_change_deliver(change_id=change.pk).state
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert sorted(outcome.values()).count(ResultChange.State.SAVED) >= 1
    assert texts(portal, task) == ["Once only"]
    assert len(writes(portal)) == 2
    assert len(applied(portal, change.idempotency_key)) == 1
    assert ResultChange.objects.get(pk=change.pk).state == ResultChange.State.SAVED


# --- a crash after Bitrix24 applied the change -------------------------------------------------


class WorkerKilled(BaseException):
    """The process died between Bitrix24's answer and the app recording it."""


@pytest.mark.django_db
def test_result_change_resent_after_a_crash_is_replayed_and_applied_once(
    client, fake, portal, task, celery_eager, monkeypatch
):
    change = _queued_change(client, portal, task, text="Applied before the crash")
    send = delivery._send

    def send_then_die(*args, **kwargs):
        send(*args, **kwargs)
        raise WorkerKilled

    monkeypatch.setattr(delivery, "_send", send_then_die)
    with pytest.raises(WorkerKilled):
        result_change_deliver_task.delay(change.pk)
    monkeypatch.setattr(delivery, "_send", send)

    # Bitrix24 has the result; the app never learnt it and still owns the change.
    [item] = portal.results(task)
    crashed = _change(pk=change.pk)
    assert crashed.state == ResultChange.State.QUEUED and crashed.result_id is None
    assert crashed.lease_until is not None
    assert result_changes_sweep_task.delay().get() == 0  # the lease protects it meanwhile
    assert len(writes(portal)) == 2

    ResultChange.objects.filter(pk=change.pk).update(
        lease_until=timezone.now() - timedelta(seconds=1)
    )
    assert result_changes_sweep_task.delay().get() == 1

    resent = writes(portal)[-1]
    assert resent["replayed"] is True
    assert resent["idempotency_key"] == change.idempotency_key
    assert acting_user(fake, resent) == BORIS
    assert [(i["id"], i["text"]) for i in portal.results(task)] == [
        (item["id"], "Applied before the crash")
    ]
    assert len(applied(portal, change.idempotency_key)) == 1
    saved = _change(pk=change.pk)
    assert (saved.state, saved.result_id) == (ResultChange.State.SAVED, item["id"])


@pytest.mark.django_db
def test_result_delete_resent_after_the_portal_applied_it_is_saved_not_refused(
    client, fake, portal, task, celery_eager
):
    """The same delete already reached Bitrix24 under the change's key (the answer was lost):
    the resend is replayed, so it ends `Saved` instead of an access-denied `Not saved`."""
    import requests

    result_id = portal.add_result(task, author_id=BORIS, text="Obsolete")
    _, token = open_screen(client, portal, BORIS, task)
    portal.fail_next(error="502", method=DELETE)
    delete(client, token, task, result_id)
    change = _change(result_id=result_id)
    assert change.state == ResultChange.State.QUEUED
    boris = Account.objects.get(user_id=BORIS)
    lost = requests.post(
        f"{portal.url}/rest/api/{DELETE}",
        json={"id": result_id, "auth": boris.access_token},
        headers={"Idempotency-Key": change.idempotency_key},
        timeout=10,
    )
    assert lost.status_code == 200
    assert portal.results(task) == []

    _time_passes(portal, change)
    assert result_change_deliver_task.delay(change.pk).get() == "saved"

    resent = writes(portal)[-1]
    assert resent["replayed"] is True and resent["status"] == 200
    assert len(applied(portal, change.idempotency_key)) == 1
    assert _change(pk=change.pk).last_error_message == ""


# --- a reused Idempotency-Key is not a refusal (portals that compare whole bodies) -------------

METHOD_OF = {"add": ADD, "edit": UPDATE, "delete": DELETE}


def _lost_then_refreshed(client, portal, task, action, result_id):
    """Boris's change reaches a portal that compares whole bodies; it is carried out, its
    answer is lost, and his access token expires meanwhile: the resend carries another `auth`."""
    portal.idempotency_whole_body = True
    _, token = open_screen(client, portal, BORIS, task)
    portal.fail_next(error="lost_response", method=METHOD_OF[action], expire_tokens=True)
    if action == "add":
        add(client, token, task, "Counted twice, kept once")
    elif action == "edit":
        edit(client, token, task, result_id, "Counted twice, kept once")
    else:
        delete(client, token, task, result_id)
    change = ResultChange.objects.filter(task_id=task).order_by("-pk").first()
    assert change.state == ResultChange.State.QUEUED
    assert change.last_error == "CONNECTION_ERROR"
    _time_passes(portal, change)
    return change


@pytest.mark.django_db
@pytest.mark.parametrize("action", ["add", "edit", "delete"])
def test_result_change_refused_as_a_reused_key_is_read_back_and_saved_once(
    client, fake, portal, task, celery_eager, action
):
    result_id = portal.add_result(task, author_id=BORIS, text="Before")
    change = _lost_then_refreshed(client, portal, task, action, result_id)

    assert result_change_deliver_task.delay(change.pk).get() == "saved"

    first, resent = writes(portal, METHOD_OF[action])
    assert (first["status"], first["injected"]) == (200, "lost_response")
    assert resent["status"] == 422  # same key, another auth: "a different body"
    assert first["body"]["auth"] != resent["body"]["auth"]
    assert first["idempotency_key"] == resent["idempotency_key"] == change.idempotency_key
    saved = _change(pk=change.pk)
    assert saved.idempotency_key == change.idempotency_key  # nothing sent under a new key
    items = portal.results(task)
    if action == "add":
        [_, new] = items
        assert new["text"] == "Counted twice, kept once" and new["authorId"] == BORIS
        assert saved.result_id == new["id"]
    elif action == "edit":
        assert [(i["id"], i["text"]) for i in items] == [(result_id, "Counted twice, kept once")]
    else:
        assert items == []
    assert saved.last_error_message == ""


@pytest.mark.django_db
@pytest.mark.parametrize("action", ["add", "edit"])
def test_result_change_refused_as_a_reused_key_and_not_there_is_sent_under_a_new_key(
    client, fake, portal, task, celery_eager, action
):
    """Read back, the change is not in Bitrix24 (the added result was deleted, the text was
    changed again elsewhere): it is sent once more under a new key, and applied once."""
    result_id = portal.add_result(task, author_id=BORIS, text="Before")
    change = _lost_then_refreshed(client, portal, task, action, result_id)
    with portal.lock:
        if action == "add":
            [added] = [i for i in portal.results(task) if i["id"] != result_id]
            portal.delete_result(added["id"])
        else:
            portal.results_by_id[result_id].text = "Changed in Bitrix24 meanwhile"

    assert result_change_deliver_task.delay(change.pk).get() == "saved"

    calls = writes(portal, METHOD_OF[action])
    assert [c["status"] for c in calls] == [200, 422, 200]
    saved = _change(pk=change.pk)
    assert calls[2]["idempotency_key"] == saved.idempotency_key != change.idempotency_key
    assert len(applied(portal, saved.idempotency_key)) == 1
    texts_now = [i["text"] for i in portal.results(task) if i["id"] != result_id or action != "add"]
    assert texts_now.count("Counted twice, kept once") == 1


@pytest.mark.django_db
def test_result_add_read_back_never_takes_a_result_another_change_made(
    client, fake, portal, task, celery_eager
):
    """Boris adds the same text twice: the read-back of the second add finds its own result,
    not the first one (which another change made, seconds earlier)."""
    _, token = open_screen(client, portal, BORIS, task)
    add(client, token, task, "Counted twice, kept once")
    first = _change(task_id=task)
    assert first.state == ResultChange.State.SAVED
    change = _lost_then_refreshed(client, portal, task, "add", None)

    assert result_change_deliver_task.delay(change.pk).get() == "saved"

    items = [i for i in portal.results(task) if i["text"] == "Counted twice, kept once"]
    assert len(items) == 2
    assert {first.result_id, _change(pk=change.pk).result_id} == {i["id"] for i in items}
