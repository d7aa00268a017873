"""Redis unreachable: the rate limiter paces each process on its own (degraded), web requests
send no write (the change stays queued for the worker), reads are only slower, and the worker
delivers what was queued. Nothing is lost.

Redis is made unreachable by pointing `REDIS_URL` at a port nothing listens on, after the app
was installed with it working; the fake portal's rate is raised so that the degraded pacing
(burst 1, a share of the rate) costs these tests no waiting.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from b24app.portals.models import Portal
from b24app.portals.ratelimit import WEB_LIMITER_WAIT_S, limiter_degraded, shared_pacing_only
from b24app.portals.services import rate_limiter
from results import services
from results.models import ResultChange
from results.tasks import result_change_deliver_task
from tests.support.factories import ResultChangeFactory
from tests.support.results import (
    UNLIMITED,
    add,
    applied,
    html,
    installed_task,
    open_screen,
    texts,
    writes,
)

ANNA, BORIS = 1, 2
DOWN_REDIS = "redis://127.0.0.1:1/0"  # nothing listens there


@pytest.fixture
def task(client, portal, settings):
    """The app installed by Anna, a task with one result, and then Redis gone."""
    settings.B24_RATE_LIMIT = UNLIMITED
    portal.set_rate_limit(100000, 100000.0)
    task_id = installed_task(client, portal, user_id=ANNA, results=["Report sent"])
    Portal.objects.update(rate_limit=UNLIMITED)
    settings.REDIS_URL = DOWN_REDIS
    return task_id


@pytest.fixture
def with_broker(monkeypatch):
    """A broker is configured (not inline mode): queued changes go to the worker, whose task
    messages this records instead of sending."""
    from b24app.celery import app

    scheduled: list[int] = []
    monkeypatch.setattr(
        result_change_deliver_task,
        "apply_async",
        lambda args, countdown=None, **kw: scheduled.append(args[0]),
    )
    was_eager, app.conf.task_always_eager = app.conf.task_always_eager, False
    try:
        yield scheduled
    finally:
        app.conf.task_always_eager = was_eager


def _worker_delivers(change: ResultChange) -> ResultChange:
    """What the worker does once the change is due: one background attempt."""
    ResultChange.objects.filter(pk=change.pk).update(
        next_attempt_at=timezone.now() - timedelta(seconds=1)
    )
    assert result_change_deliver_task(change.pk) == ResultChange.State.SAVED
    return ResultChange.objects.get(pk=change.pk)


@pytest.mark.django_db
def test_web_change_with_redis_unreachable_stays_queued_then_the_worker_delivers_it(
    client, portal, task, with_broker, django_capture_on_commit_callbacks
):
    _, token = open_screen(client, portal, BORIS, task)  # a read: paced on its own, not refused
    assert limiter_degraded(rate_limiter())

    with django_capture_on_commit_callbacks(execute=True):
        response = add(client, token, task, "Sent the report to the client")

    assert response.status_code == 200
    assert "Queued" in html(response)
    assert writes(portal) == []  # the web request sent no write
    change = ResultChange.objects.get(task_id=task, text_after="Sent the report to the client")
    assert change.state == ResultChange.State.QUEUED
    assert with_broker == [change.pk]  # left to the worker

    delivered = _worker_delivers(change)

    assert delivered.result_id is not None
    assert len(applied(portal, change.idempotency_key)) == 1
    assert texts(portal, task) == ["Report sent", "Sent the report to the client"]


@pytest.mark.django_db
def test_web_reads_with_redis_unreachable_are_paced_on_their_own(client, portal, task):
    response, _ = open_screen(client, portal, BORIS, task)

    assert "Report sent" in html(response)  # the list was read
    assert limiter_degraded(rate_limiter())


@pytest.mark.django_db
def test_delivery_inside_shared_pacing_only_sends_nothing_and_the_worker_sends_it(
    client, portal, task
):
    """The gate's mechanism, as a web request's delivery runs it: refused by the degraded
    limiter, the change stays queued, counted as no attempt; the worker's attempt, outside the
    gate, paces on its own and delivers it."""
    open_screen(client, portal, BORIS, task)
    change = ResultChangeFactory(
        portal=Portal.objects.get(),
        account=Portal.objects.get().accounts.get(user_id=BORIS),
        task_id=task,
        action=ResultChange.Action.ADD,
        text_after="Queued while Redis was down",
    )

    with shared_pacing_only():
        change = services.result_change_deliver(
            change_id=change.pk, limiter_max_wait=WEB_LIMITER_WAIT_S
        )

    assert change.state == ResultChange.State.QUEUED
    assert change.last_error == "RATE_LIMITED" and change.attempts == 0
    assert writes(portal) == []

    delivered = _worker_delivers(change)

    assert len(applied(portal, delivered.idempotency_key)) == 1
    assert "Queued while Redis was down" in texts(portal, task)
