"""Nothing lost, nothing applied twice: real Celery workers on Redis against PostgreSQL, killed
mid-delivery or facing a portal that is down.

The portal's truth is what counts: after the faults every change is `saved`, each change's key
was carried out by the portal exactly once (`applied`), and each change's effect exists once.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from datetime import timedelta

import pytest
from django.utils import timezone

from b24app.portals.models import Portal
from b24app.portals.services import rate_limiter
from results import selectors
from results.models import ResultChange
from results.tasks import result_changes_sweep_task
from tests.results.support import (
    acting_user,
    add,
    applied,
    delete,
    edit,
    installed,
    kill_worker,
    open_screen,
    start_worker,
    stop_worker,
    writes,
)

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.redis,
    pytest.mark.django_db(transaction=True),
    pytest.mark.timeout(150),
]

ANNA, BORIS = 1, 2
WAIT_S = 90


def _wait_for(condition, what: str, timeout: float = WAIT_S, interval: float = 0.05, logs=()):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            states = dict(_states())
            tails = "\n".join(
                f"--- {w.log_path.name}\n{w.log_path.read_text()[-4000:]}" for w in logs
            )
            pytest.fail(f"waited {timeout:g} s for {what}; changes: {states}\n{tails}")
        time.sleep(interval)


def _states() -> Counter:
    return Counter(ResultChange.objects.values_list("state", flat=True))


@pytest.fixture
def task(client, fake, portal):
    """Installed by Anna; a portal whose request budget is not what these tests are about."""
    installed(client, portal, ANNA)
    portal.set_rate_limit(1000, 500.0)
    Portal.objects.update(rate_limit="1000/500")
    rate_limiter().reset(portal.member_id)
    return portal.add_task(title="Quarterly report")


@pytest.fixture
def more_workers(fake, settings, tmp_path, celery_worker_process):
    """Start further workers like `celery_worker_process` (same broker, database and fake), each
    in its own process group; stopped at the end (before the first one's teardown)."""
    started = []

    def start():
        number = len(started) + 2
        worker = start_worker(fake, settings, tmp_path / f"worker-{number}.log", f"w{number}")
        started.append(worker)
        return worker

    yield start
    for worker in started:
        stop_worker(worker)


class InFlight:
    """Write requests the fake portal is working on right now (monotonic start times)."""

    def __init__(self, portal, monkeypatch) -> None:
        self._lock = threading.Lock()
        self._started: dict[int, float] = {}
        rest = portal._rest

        def tracked(req, record):
            if "/rest/api/tasks.task.result." not in req.path or req.path.endswith(".list"):
                return rest(req, record)
            ticket = object()
            with self._lock:
                self._started[id(ticket)] = time.monotonic()
            try:
                return rest(req, record)
            finally:
                with self._lock:
                    del self._started[id(ticket)]

        monkeypatch.setattr(portal, "_rest", tracked)

    def ages(self) -> list[float]:
        now = time.monotonic()
        with self._lock:
            return [now - started for started in self._started.values()]


def _assert_each_applied_once(fake, portal, changes) -> None:
    for change in changes:
        assert change.state == ResultChange.State.SAVED, (change.pk, change.last_error)
        carried_out = applied(portal, change.idempotency_key)
        assert len(carried_out) == 1, (change.pk, change.action, len(carried_out))
        sent = [r for r in writes(portal) if r["idempotency_key"] == change.idempotency_key]
        assert {acting_user(fake, r) for r in sent} == {change.account.user_id}
    assert not [r for r in writes(portal) if r["status"] in (400, 403, 422)]


def test_result_changes_survive_a_worker_killed_mid_delivery(
    client, fake, portal, task, celery_worker_process, more_workers, monkeypatch
):
    first_worker = celery_worker_process
    to_edit = [portal.add_result(task, author_id=BORIS, text=f"draft {n}") for n in range(5)]
    to_delete = [portal.add_result(task, author_id=ANNA, text=f"obsolete {n}") for n in range(5)]
    tokens = {user: open_screen(client, portal, user, task)[1] for user in (ANNA, BORIS)}
    portal.go_down()  # the web request's own attempt fails: every change goes to the worker
    for n in range(20):
        add(client, tokens[ANNA if n % 2 else BORIS], task, f"added {n}")
    for n, result_id in enumerate(to_edit):
        edit(client, tokens[BORIS], task, result_id, f"final {n}")
    for result_id in to_delete:
        delete(client, tokens[ANNA], task, result_id)
    assert _states() == {"queued": 30}
    in_flight = InFlight(portal, monkeypatch)
    portal.latency_s = 1.0
    portal.come_back()

    # Kill the worker while some changes are done and one has just reached Bitrix24.
    _wait_for(
        lambda: _states()["saved"] >= 3 and any(age < 0.4 for age in in_flight.ages()),
        "deliveries in flight",
        timeout=60,
        interval=0.02,
        logs=[first_worker],
    )
    kill_worker(first_worker)  # SIGKILL, the worker and its pool processes at once
    _wait_for(lambda: not in_flight.ages(), "the portal to finish what the dead worker sent")

    queued = list(ResultChange.objects.filter(state=ResultChange.State.QUEUED))
    assert queued, "the worker finished everything before it was killed"
    crashed = [c for c in queued if applied(portal, c.idempotency_key)]
    assert crashed, "no change was applied by Bitrix24 and left unrecorded by the killed worker"
    assert all(c.lease_until is not None for c in crashed)
    # Until their lease runs out nothing may pick them up (the attempt might still be alive).
    assert not {c.pk for c in crashed} & set(selectors.result_changes_due())

    # Every attempt that held a lease died with the worker: jump past `services.LEASE` instead
    # of waiting for it. A new worker comes up and the sweep re-queues what the dead one held.
    ResultChange.objects.filter(state=ResultChange.State.QUEUED, lease_until__isnull=False).update(
        lease_until=timezone.now() - timedelta(seconds=1)
    )
    portal.latency_s = 0.05
    second_worker = more_workers()

    def all_saved():
        if _states() == {"saved": 30}:
            return True
        result_changes_sweep_task.delay()
        time.sleep(1.0)
        return False

    _wait_for(all_saved, "every change to be saved", logs=[first_worker, second_worker])

    changes = list(ResultChange.objects.select_related("account").order_by("pk"))
    _assert_each_applied_once(fake, portal, changes)
    for change in crashed:
        resent = [r for r in writes(portal) if r["idempotency_key"] == change.idempotency_key]
        assert resent[-1]["replayed"] is True
    expected = Counter([f"added {n}" for n in range(20)] + [f"final {n}" for n in range(5)])
    assert Counter(item["text"] for item in portal.results(task)) == expected
    ids = {item["text"]: item["id"] for item in portal.results(task)}
    for change in changes:
        if change.action == ResultChange.Action.ADD:
            assert change.result_id == ids[change.text_after]


def test_result_changes_queued_while_the_portal_is_down_are_delivered_once(
    client, fake, portal, task, celery_worker_process
):
    worker = celery_worker_process
    tokens = {user: open_screen(client, portal, user, task)[1] for user in (ANNA, BORIS)}
    before = len(portal.requests)
    portal.go_down()
    for n in range(10):
        response = add(client, tokens[ANNA if n % 2 else BORIS], task, f"while down {n}")
        assert "Queued" in response.content.decode()
    changes = list(ResultChange.objects.all())
    assert len(changes) == 10
    assert {(c.state, c.last_error) for c in changes} == {("queued", "CONNECTION_ERROR")}
    # The worker keeps trying (and failing) while the portal is down.
    _wait_for(
        lambda: not ResultChange.objects.filter(attempts__lt=2).exists(),
        "a background attempt of every change while the portal is down",
        timeout=30,
        logs=[worker],
    )
    assert _states() == {"queued": 10}
    assert len(portal.requests) == before

    portal.come_back()

    _wait_for(
        lambda: _states() == {"saved": 10}, "every change to be saved", interval=0.2, logs=[worker]
    )
    changes = list(ResultChange.objects.select_related("account").order_by("pk"))
    _assert_each_applied_once(fake, portal, changes)
    assert Counter(item["text"] for item in portal.results(task)) == Counter(
        f"while down {n}" for n in range(10)
    )
    assert all(change.attempts >= 2 for change in changes)
