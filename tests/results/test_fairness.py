"""One tenant cannot slow the others: caps on queued changes, a portal that backs off as one,
a sweep that takes portals in turn, and a retention purge.

The portals are fake Bitrix24s over real HTTP. `portal.unavailable_status` makes one answer
every call with a gateway error, so each attempt that reaches it is counted (`_attempts`).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from datetime import timedelta

import pytest
from django.conf import settings as django_settings
from django.db import connection
from django.utils import timezone

from b24app.portals.bitrix import BitrixUnavailable
from b24app.portals.models import Account, Portal
from b24app.portals.services import rate_limiter
from results import selectors, services
from results.models import PortalOutbox, ResultChange
from results.services import backoff
from results.tasks import result_changes_purge_task, result_changes_sweep_task
from tests.support.factories import PortalOutboxFactory, ResultChangeFactory
from tests.support.results import (
    add,
    applied,
    carried_out,
    frame_post,
    html,
    installed,
    open_screen,
    writes,
    writes_by_key,
)

ANNA, BORIS = 1, 2


class Ceiling:
    """A jitter source that always draws the top of its range: backoffs are exact."""

    def uniform(self, low: float, high: float) -> float:
        return high


def _attempts(portal) -> int:
    """Requests that reached a portal while it was unavailable."""
    return sum(1 for r in portal.requests if r["injected"] == "unavailable")


def _queue(account: Account, count: int, prefix: str, task_id: int = 1) -> list[ResultChange]:
    """`count` additions by `account`, written to the outbox as the screen writes them."""
    changes = [
        ResultChangeFactory.build(
            account=account,
            task_id=task_id,
            action=ResultChange.Action.ADD,
            text_after=f"{prefix} {n}",
        )
        for n in range(count)
    ]
    return ResultChange.objects.bulk_create(changes)


def _unlimited(portal) -> None:
    """A portal whose request budget is not what the test is about."""
    portal.set_rate_limit(100000, 100000.0)
    Portal.objects.filter(member_id=portal.member_id).update(rate_limit="100000/100000")
    rate_limiter().reset(portal.member_id)


def _deliver_due(**filters) -> list[ResultChange]:
    """One pass of what the worker (or the open screen's polling) does: every due change."""
    return [
        services.result_change_deliver(change_id=change_id)
        for change_id in selectors.result_changes_due(**filters)
    ]


def _backoff_passes(portal) -> None:
    """Jump past the portal's backoff (its outbox's and its waiting changes' time)."""
    past = timezone.now() - timedelta(seconds=1)
    PortalOutbox.objects.filter(portal__member_id=portal.member_id).update(resume_at=past)
    ResultChange.objects.filter(
        portal__member_id=portal.member_id, state=ResultChange.State.QUEUED
    ).update(next_attempt_at=past)


# --- caps on queued changes ---------------------------------------------------------------------


@pytest.fixture
def down_task(client, fake, portal, celery_eager):
    """Anna installed; the portal then goes down behind its proxy (every call answers 503)."""
    installed(client, portal, ANNA)
    task = portal.add_task(title="Quarterly report")
    tokens = {user: open_screen(client, portal, user, task)[1] for user in (ANNA, BORIS)}
    portal.unavailable_status = 503
    return task, tokens


@pytest.mark.django_db
def test_queue_cap_refuses_the_21st_queued_change_of_an_account_and_stores_nothing(
    client, fake, portal, down_task
):
    task, tokens = down_task
    assert django_settings.RESULTS_QUEUED_PER_ACCOUNT == 20  # the documented default
    for n in range(20):
        response = add(client, tokens[BORIS], task, f"change {n}", as_json=True)
        assert response.status_code == 200, response.content
        assert response.json()["change"]["state"] == "queued"
    sent = len(writes(portal))

    refused = add(client, tokens[BORIS], task, "one too many", as_json=True)
    page = add(client, tokens[BORIS], task, "one too many")

    assert refused.status_code == 429
    assert "Too many of your changes are waiting to reach Bitrix24 (20)" in refused.json()["error"]
    assert page.status_code == 429
    assert "Too many of your changes are waiting to reach Bitrix24 (20)" in html(page)
    assert ResultChange.objects.count() == 20
    assert not ResultChange.objects.filter(text_after="one too many").exists()
    assert len(writes(portal)) == sent  # nothing was sent for it
    # Another person on the portal is not held to Boris's cap.
    assert add(client, tokens[ANNA], task, "Anna's", as_json=True).status_code == 200

    # Once Boris's changes are delivered, he may edit again.
    portal.unavailable_status = None
    _backoff_passes(portal)
    _deliver_due()
    _deliver_due()
    assert not ResultChange.objects.filter(state=ResultChange.State.QUEUED).exists()
    assert add(client, tokens[BORIS], task, "now it fits", as_json=True).status_code == 200


@pytest.mark.django_db
def test_queue_cap_message_is_in_russian(client, fake, portal, celery_eager, settings):
    settings.RESULTS_QUEUED_PER_ACCOUNT = 1
    installed(client, portal, ANNA)
    task = portal.add_task(title="Quarterly report")
    _, token = open_screen(client, portal, BORIS, task, lang="ru")
    portal.unavailable_status = 503
    assert add(client, token, task, "first", as_json=True).status_code == 200

    refused = add(client, token, task, "second", as_json=True)

    assert refused.status_code == 429
    assert refused.json()["error"] == (
        "Слишком много ваших изменений ждут отправки в Битрикс24 (1). "
        "Дождитесь, пока они сохранятся, и попробуйте снова."
    )
    assert ResultChange.objects.count() == 1


@pytest.mark.django_db
def test_queue_cap_per_portal_refuses_everyone_on_a_full_portal(
    client, fake, portal, down_task, settings
):
    task, tokens = down_task
    settings.RESULTS_QUEUED_PER_PORTAL = 5
    for n in range(3):
        assert add(client, tokens[ANNA], task, f"anna {n}", as_json=True).status_code == 200
    for n in range(2):
        assert add(client, tokens[BORIS], task, f"boris {n}", as_json=True).status_code == 200

    refused = add(client, tokens[BORIS], task, "boris 2", as_json=True)

    assert refused.status_code == 429
    assert "Too many changes on this Bitrix24 are waiting to be sent" in refused.json()["error"]
    assert ResultChange.objects.count() == 5


@pytest.mark.django_db
def test_queue_cap_applies_to_retry_of_a_change_not_saved(
    client, fake, portal, down_task, settings
):
    """Retry puts a change back in the queue: it counts like a new one."""
    task, tokens = down_task
    settings.RESULTS_QUEUED_PER_ACCOUNT = 2
    add(client, tokens[BORIS], task, "one", as_json=True)
    add(client, tokens[BORIS], task, "two", as_json=True)
    failed = _queue(Account.objects.get(user_id=BORIS), 1, "refused")[0]
    ResultChange.objects.filter(pk=failed.pk).update(
        state=ResultChange.State.FAILED, last_error_message="Bitrix24 refused the change."
    )

    refused = frame_post(
        client, tokens[BORIS], f"/b24/app/changes/{failed.pk}/retry/", as_json=True
    )

    assert refused.status_code == 429
    assert "Too many of your changes" in refused.json()["error"]
    assert ResultChange.objects.get(pk=failed.pk).state == ResultChange.State.FAILED


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_queue_cap_holds_under_concurrent_posts(client, fake, portal, celery_eager):
    """Ten edits posted at once by someone with 19 queued: exactly one is taken (PostgreSQL,
    ten connections; the count is made under the portal's row lock)."""
    installed(client, portal, ANNA)
    open_screen(client, portal, BORIS, portal.add_task(title="Quarterly report"))
    boris = Account.objects.select_related("portal").get(user_id=BORIS)
    _queue(boris, 19, "queued")
    # The portal backs off: the quick try of each edit sends nothing, so they overlap.
    PortalOutboxFactory(
        portal=boris.portal, failures=3, resume_at=timezone.now() + timedelta(minutes=5)
    )
    barrier = threading.Barrier(10)
    outcomes: list[str] = []
    lock = threading.Lock()

    def submit(n: int) -> None:
        try:
            barrier.wait(timeout=30)
            account = Account.objects.select_related("portal").get(pk=boris.pk)
            try:
                services.result_change_submit(
                    account=account, task_id=1, action="add", text=f"at once {n}"
                )
                outcome = "taken"
            except services.QueueFull:
                outcome = "refused"
            with lock:
                outcomes.append(outcome)
        finally:
            connection.close()

    threads = [threading.Thread(target=submit, args=(n,)) for n in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert Counter(outcomes) == {"taken": 1, "refused": 9}
    assert ResultChange.objects.filter(account=boris, state=ResultChange.State.QUEUED).count() == 20


@pytest.mark.django_db
def test_a_change_takes_the_lowest_place_a_delivered_one_left(client, fake, portal, down_task):
    """The places that make the caps exact: unique among the Queued changes, reused once free."""
    task, tokens = down_task
    for n in range(3):
        assert add(client, tokens[BORIS], task, f"change {n}", as_json=True).status_code == 200
    first, second, third = ResultChange.objects.order_by("pk")
    assert [c.account_slot for c in (first, second, third)] == [0, 1, 2]
    assert [c.portal_slot for c in (first, second, third)] == [0, 1, 2]
    ResultChange.objects.filter(pk=second.pk).update(state=ResultChange.State.SAVED)

    assert add(client, tokens[ANNA], task, "Anna's", as_json=True).status_code == 200
    assert add(client, tokens[BORIS], task, "change 3", as_json=True).status_code == 200

    annas = ResultChange.objects.get(text_after="Anna's")
    assert (annas.account_slot, annas.portal_slot) == (0, 1)
    latest = ResultChange.objects.get(text_after="change 3")
    assert (latest.account_slot, latest.portal_slot) == (1, 3)


@pytest.mark.django_db
def test_retry_takes_a_free_place_among_the_queued_changes(client, fake, portal, down_task):
    task, tokens = down_task
    add(client, tokens[BORIS], task, "one", as_json=True)
    failed = _queue(Account.objects.get(user_id=BORIS), 1, "refused")[0]
    ResultChange.objects.filter(pk=failed.pk).update(
        state=ResultChange.State.FAILED, account_slot=0, portal_slot=0
    )

    response = frame_post(
        client, tokens[BORIS], f"/b24/app/changes/{failed.pk}/retry/", as_json=True
    )

    assert response.status_code == 200, response.content
    failed.refresh_from_db()
    assert failed.state == ResultChange.State.QUEUED
    assert (failed.account_slot, failed.portal_slot) == (1, 1)


def _at_once(count: int, work) -> Counter:
    """`work(n)` in `count` threads released together (own connections); their outcomes."""
    barrier = threading.Barrier(count)
    outcomes: list[str] = []
    lock = threading.Lock()

    def run(n: int) -> None:
        try:
            barrier.wait(timeout=30)
            try:
                work(n)
                outcome = "taken"
            except services.QueueFull:
                outcome = "refused"
            with lock:
                outcomes.append(outcome)
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return Counter(outcomes)


def _people_of_a_held_portal(client, portal, count: int) -> tuple[list[int], dict[int, Account]]:
    """The app installed by Anna and `count` people in all (Anna, Boris, new users) who opened
    it, their accounts by user id; the portal backs off, so their changes' quick tries send
    nothing and the writes overlap."""
    installed(client, portal, ANNA)
    task = portal.add_task(title="Quarterly report")
    people = [ANNA, BORIS, *(portal.add_user(name=f"User {n}") for n in range(count - 2))]
    for user in people[1:]:
        open_screen(client, portal, user, task)
    accounts = {a.user_id: a for a in Account.objects.select_related("portal")}
    PortalOutboxFactory(
        portal=accounts[ANNA].portal, failures=3, resume_at=timezone.now() + timedelta(minutes=5)
    )
    return people, accounts


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_portal_cap_holds_under_concurrent_posts_of_several_people(
    client, fake, portal, celery_eager, settings
):
    """A portal with one free place of five, and ten people's edits at once: one is taken."""
    settings.RESULTS_QUEUED_PER_PORTAL = 5
    people, accounts = _people_of_a_held_portal(client, portal, 5)
    for user in people[:4]:
        services.result_change_submit(
            account=accounts[user], task_id=1, action="add", text=f"queued {user}"
        )

    def submit(n: int) -> None:
        account = Account.objects.select_related("portal").get(pk=accounts[people[n % 5]].pk)
        services.result_change_submit(account=account, task_id=1, action="add", text=f"{n}")

    assert _at_once(10, submit) == {"taken": 1, "refused": 9}
    queued = ResultChange.objects.filter(state=ResultChange.State.QUEUED)
    assert queued.count() == 5
    assert sorted(queued.values_list("portal_slot", flat=True)) == [0, 1, 2, 3, 4]


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_far_from_the_caps_concurrent_writers_of_one_portal_are_all_taken(
    client, fake, portal, celery_eager, settings
):
    """Twelve people of one portal, each writing 15 changes one after another, all at the same
    time, while the portal backs off: every change is stored. They compete for the same lowest
    free places; a writer who keeps losing that race must not be told the queue is full."""
    settings.RESULTS_QUEUED_PER_ACCOUNT = settings.RESULTS_QUEUED_PER_PORTAL = 1000
    people, accounts = _people_of_a_held_portal(client, portal, 12)

    def submit(n: int) -> None:
        account = Account.objects.select_related("portal").get(pk=accounts[people[n]].pk)
        for k in range(15):
            services.result_change_submit(account=account, task_id=1, action="add", text=f"{n}-{k}")

    assert _at_once(len(people), submit) == {"taken": len(people)}
    queued = ResultChange.objects.filter(state=ResultChange.State.QUEUED)
    assert queued.count() == 15 * len(people)
    assert sorted(queued.values_list("portal_slot", flat=True)) == list(range(15 * len(people)))


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_account_cap_holds_under_concurrent_retries_and_posts(client, fake, portal, celery_eager):
    """18 queued, five changes not saved retried and five new edits at once: two are taken."""
    installed(client, portal, ANNA)
    open_screen(client, portal, BORIS, portal.add_task(title="Quarterly report"))
    boris = Account.objects.select_related("portal").get(user_id=BORIS)
    _queue(boris, 18, "queued")
    failed = _queue(boris, 5, "refused")
    ResultChange.objects.filter(pk__in=[c.pk for c in failed]).update(
        state=ResultChange.State.FAILED
    )
    PortalOutboxFactory(
        portal=boris.portal, failures=3, resume_at=timezone.now() + timedelta(minutes=5)
    )

    def work(n: int) -> None:
        account = Account.objects.select_related("portal").get(pk=boris.pk)
        if n % 2:
            services.result_change_resend(change_id=failed[n // 2].pk, account=account)
        else:
            services.result_change_submit(account=account, task_id=1, action="add", text=f"{n}")

    assert _at_once(10, work) == {"taken": 2, "refused": 8}
    assert ResultChange.objects.filter(account=boris, state=ResultChange.State.QUEUED).count() == 20


# --- a portal backs off as one ------------------------------------------------------------------


@pytest.mark.django_db
def test_portal_down_costs_one_attempt_per_backoff_step_and_drains_when_back(
    client, fake, portal, celery_eager, monkeypatch, settings
):
    monkeypatch.setattr(backoff, "JITTER", Ceiling())
    # The backoff steps pass by moving the outbox's times, not the wall clock the transport's
    # circuit breaker counts its cool-down on: keep the breaker out of this count.
    settings.B24_BREAKER_FAILURES = 1000
    installed(client, portal, ANNA)
    task = portal.add_task(title="Quarterly report")
    open_screen(client, portal, BORIS, task)
    _unlimited(portal)
    _queue(Account.objects.get(user_id=BORIS), 30, "waiting", task)
    portal.unavailable_status = 503

    # First pass: one change finds the portal unavailable; the other 29 wait with it, unsent.
    before = timezone.now()
    _deliver_due()
    assert _attempts(portal) == 1
    outbox = PortalOutbox.objects.get()
    assert (outbox.failures, outbox.last_error) == (1, "HTTP_503")
    first = (outbox.resume_at - before).total_seconds()
    assert services.BACKOFF_BASE_S - 0.5 <= first <= services.BACKOFF_BASE_S + 5
    assert sum(ResultChange.objects.values_list("attempts", flat=True)) == 1
    assert set(ResultChange.objects.values_list("state", "last_error")) == {("queued", "HTTP_503")}
    # While it backs off nothing is due and nothing is sent.
    assert selectors.result_changes_due() == []
    _deliver_due()
    assert _attempts(portal) == 1

    # Each backoff step costs one attempt, and the steps double.
    steps = []
    for step in range(2, 6):
        _backoff_passes(portal)
        assert len(selectors.result_changes_due()) == 1  # only the one that tries again
        at = timezone.now()
        _deliver_due()
        assert _attempts(portal) == step
        outbox = PortalOutbox.objects.get()
        assert outbox.failures == step
        steps.append((outbox.resume_at - at).total_seconds())
    for n, seconds in enumerate(steps, start=2):
        assert seconds == pytest.approx(services.BACKOFF_BASE_S * 2 ** (n - 1), abs=2)
    assert sum(ResultChange.objects.values_list("attempts", flat=True)) == 5

    # It comes back: the next try succeeds, the portal is well again, its queue drains.
    portal.unavailable_status = None
    _backoff_passes(portal)
    _deliver_due()
    outbox = PortalOutbox.objects.get()
    assert (outbox.failures, outbox.resume_at) == (0, None)
    _deliver_due()
    assert set(ResultChange.objects.values_list("state", flat=True)) == {"saved"}
    by_key = writes_by_key(portal)
    for change in ResultChange.objects.all():
        assert len(carried_out(by_key[change.idempotency_key])) == 1
    assert sorted(i["text"] for i in portal.results(task)) == sorted(
        f"waiting {n}" for n in range(30)
    )


def test_portal_backoff_is_exponential_capped_and_jittered_from_its_source():
    exc = BitrixUnavailable("HTTP_503", "down")
    now = timezone.now()

    class Floor:
        def uniform(self, low: float, high: float) -> float:
            return low

    top = [services.backoff_delay(n, exc, now=now, rand=Ceiling()) for n in range(1, 12)]
    bottom = [services.backoff_delay(n, exc, now=now, rand=Floor()) for n in range(1, 12)]

    assert top[:4] == [2.0, 4.0, 8.0, 16.0]
    assert top[-1] == services.BACKOFF_CAP_S
    assert bottom[:2] == [1.0, 2.0] and bottom[-1] == services.BACKOFF_CAP_S / 2
    # A portal's own Retry-After wins over a shorter backoff.
    later = BitrixUnavailable("QUERY_LIMIT_EXCEEDED", "busy", retry_after=40)
    assert services.backoff_delay(1, later, now=now, rand=Ceiling()) == 40


# --- the sweep takes portals in turn ------------------------------------------------------------


@pytest.mark.django_db
def test_sweep_takes_every_portal_in_turn_not_the_oldest_thousand(client, fake, celery_eager):
    """Portal A has 1,200 changes due, older than B's 5 and C's 3: one sweep takes at most
    `SWEEP_PER_PORTAL` of A, and all of B's and C's, oldest first within each."""
    portals = {}
    for name in ("a", "b", "c"):
        fake_portal = fake.add_portal()
        fake_portal.add_user(name="Anna", last_name="Smirnova", admin=True)
        installed(client, fake_portal, ANNA)
        portals[name] = Account.objects.select_related("portal").get(
            portal__member_id=fake_portal.member_id
        )
    old = timezone.now() - timedelta(hours=1)
    a = _queue(portals["a"], 1200, "a")
    ResultChange.objects.filter(pk__in=[c.pk for c in a]).update(created_at=old)
    b = [change.pk for change in _queue(portals["b"], 5, "b")]
    c = [change.pk for change in _queue(portals["c"], 3, "c")]

    due = selectors.result_changes_due()

    assert set(b) <= set(due) and set(c) <= set(due)
    assert len(due) == selectors.SWEEP_PER_PORTAL + 8
    taken = set(due) - set(b + c)
    assert taken == {change.pk for change in a[: selectors.SWEEP_PER_PORTAL]}
    assert due[:3] == [a[0].pk, b[0], c[0]]  # each portal's oldest first
    assert len(selectors.result_changes_due(limit=4)) == 4  # bounded in all


@pytest.mark.django_db
def test_sweep_drains_a_big_backlog_a_batch_at_a_time_once_the_last_is_taken_up(
    client, fake, portal, monkeypatch
):
    """One portal with 120 due changes: the sweep queues its oldest 50 and starts one drain;
    the drain queues the next 50 only once the workers took up the last 50, never copies of
    them, and stops when the backlog is gone. (The broker's side is recorded here: what the
    sweep and the drain hand to Celery.)"""
    from b24app.celery import app
    from results import tasks

    installed(client, portal, ANNA)
    _unlimited(portal)
    changes = [c.pk for c in _queue(Account.objects.get(user_id=ANNA), 120, "backlog")]
    sent, drains = [], []
    monkeypatch.setattr(tasks.result_change_deliver_task, "delay", sent.append)
    monkeypatch.setattr(
        tasks.result_changes_drain_task,
        "apply_async",
        lambda args, countdown=None, **kw: drains.append((args, countdown)),
    )
    was_eager, app.conf.task_always_eager = app.conf.task_always_eager, False
    try:
        _drain_steps(portal, changes, sent, drains, tasks)
    finally:
        app.conf.task_always_eager = was_eager


def _drain_steps(portal, changes, sent, drains, tasks) -> None:

    def taken_up(ids) -> None:  # what the workers do with the changes they were sent
        ResultChange.objects.filter(pk__in=ids).update(
            state=ResultChange.State.SAVED, updated_at=timezone.now()
        )

    assert result_changes_sweep_task() == 50
    assert sent == changes[:50]
    [(args, countdown)] = drains
    portal_id, previous, since = args
    assert previous == changes[:50] and countdown == services.DRAIN_STEP_MIN_S
    result_changes_sweep_task()  # the next sweep: no second drain of the same portal
    assert len(drains) == 1

    sent.clear()
    assert tasks.result_changes_drain_task(portal_id, previous, since) == 0
    assert sent == []  # the last batch is not taken up yet: no copies of it
    assert drains[-1][0] == (portal_id, previous, since)

    taken_up(changes[:50])
    assert tasks.result_changes_drain_task(portal_id, previous, since) == 50
    assert sent == changes[50:100]
    _, previous, since = drains[-1][0]
    assert previous == changes[50:100]

    taken_up(changes[50:100])
    sent.clear()
    steps = len(drains)
    assert tasks.result_changes_drain_task(portal_id, previous, since) == 20
    assert sent == changes[100:]
    assert len(drains) == steps  # done: no further step
    assert PortalOutbox.objects.get(portal_id=portal_id).drain_until is None


# --- retention ----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_purge_removes_only_delivered_changes_older_than_the_retention(
    client, fake, portal, celery_eager
):
    installed(client, portal, ANNA)
    anna = Account.objects.get(user_id=ANNA)
    assert django_settings.RESULTS_RETENTION_DAYS == 90  # the documented default
    old = timezone.now() - timedelta(days=91)
    recent = timezone.now() - timedelta(days=89)
    kept, purged = [], []
    for state in ("saved", "failed"):
        for n in range(3):
            [change] = _queue(anna, 1, f"old {state} {n}")
            ResultChange.objects.filter(pk=change.pk).update(state=state, updated_at=old)
            purged.append(change.pk)
        [change] = _queue(anna, 1, f"recent {state}")
        ResultChange.objects.filter(pk=change.pk).update(state=state, updated_at=recent)
        kept.append(change.pk)
    [queued] = _queue(anna, 1, "old but still queued")
    ResultChange.objects.filter(pk=queued.pk).update(updated_at=old, created_at=old)
    kept.append(queued.pk)

    assert services.result_changes_purge(batch=2) == 6  # several batches
    assert sorted(ResultChange.objects.values_list("pk", flat=True)) == sorted(kept)
    assert result_changes_purge_task.delay().get() == 0  # nothing more to purge
    schedule = django_settings.CELERY_BEAT_SCHEDULE["result-changes-purge"]
    assert schedule["task"] == "results.tasks.result_changes_purge_task"


# --- a real worker: one portal down, the others delivered ---------------------------------------

WAIT_S = 90
BEAT_S = 5
"""The sweep's interval here: the beat's 60 s, on a faster clock."""


def _wait_for(condition, what: str, timeout: float = WAIT_S, interval: float = 0.1, log=None):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            states = Counter(ResultChange.objects.values_list("portal_id", "state"))
            tail = log.log_path.read_text()[-4000:] if log is not None else ""
            pytest.fail(f"waited {timeout:g} s for {what}; changes: {dict(states)}\n{tail}")
        time.sleep(interval)


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(240)
def test_one_sweep_delivers_portal_b_while_portal_a_is_down_then_a_drains(
    client, fake, celery_worker_process
):
    """Portal A is down (each call hangs for 0.5 s, then 503) with 150 queued changes, older
    than portal B's 5. One sweep: B's 5 are saved, and A was tried only once per backoff step,
    not once per change. A comes back: its whole queue drains, each change applied once."""
    worker = celery_worker_process
    fakes, accounts = {}, {}
    for name in ("a", "b"):
        fake_portal = fake.add_portal()
        fake_portal.add_user(name="Anna", last_name="Smirnova", admin=True)
        installed(client, fake_portal, ANNA)
        _unlimited(fake_portal)
        fake_portal.add_task(title="Quarterly report")
        fakes[name] = fake_portal
        accounts[name] = Account.objects.select_related("portal").get(
            portal__member_id=fake_portal.member_id
        )
    fakes["a"].unavailable_status = 503
    fakes["a"].latency_s = 0.5
    a = _queue(accounts["a"], 150, "a")
    b = _queue(accounts["b"], 5, "b")
    a_ids, b_ids = [c.pk for c in a], [c.pk for c in b]

    def saved(ids) -> int:
        return ResultChange.objects.filter(pk__in=ids, state=ResultChange.State.SAVED).count()

    started = time.monotonic()
    result_changes_sweep_task.delay()  # one sweep, and no other
    _wait_for(lambda: saved(b_ids) == 5, "portal B's changes to be saved", timeout=60, log=worker)
    # A stays down a while longer: its backoff steps, not its 150 changes, make its attempts.
    time.sleep(max(0.0, 10 - (time.monotonic() - started)))
    elapsed = time.monotonic() - started
    attempts = _attempts(fakes["a"])
    assert 1 <= attempts <= 8, (attempts, elapsed)
    assert saved(a_ids) == 0
    assert sum(ResultChange.objects.filter(pk__in=a_ids).values_list("attempts", flat=True)) <= 8
    assert PortalOutbox.objects.get(portal=accounts["a"].portal).failures >= 1

    # A comes back. Its backoff runs out (jumped to, instead of waited for), the beat's sweep
    # finds the one change that tries it, and its success drains the rest.
    fakes["a"].unavailable_status = None
    fakes["a"].latency_s = 0.0
    _backoff_passes(fakes["a"])
    sweeps = {"last": 0.0}

    def drained() -> bool:
        if saved(a_ids) == 150:
            return True
        if time.monotonic() - sweeps["last"] > BEAT_S:
            result_changes_sweep_task.delay()
            sweeps["last"] = time.monotonic()
        return False

    _wait_for(drained, "portal A's queue to drain", timeout=120, interval=0.2, log=worker)
    by_key = writes_by_key(fakes["a"])
    for change in ResultChange.objects.filter(pk__in=a_ids):
        assert len(applied(fakes["a"], change.idempotency_key)) == 1, change.pk
        assert by_key[change.idempotency_key][-1]["status"] == 200
    assert sorted(i["text"] for i in fakes["a"].results(1)) == sorted(f"a {n}" for n in range(150))
    assert PortalOutbox.objects.get(portal=accounts["a"].portal).failures == 0


@pytest.mark.parametrize(
    "variable, value, error",
    [
        ("RESULTS_RETENTION_DAYS", "1", "RESULTS_RETENTION_DAYS must be at least 2"),
        ("RESULTS_QUEUED_PER_ACCOUNT", "0", "RESULTS_QUEUED_PER_ACCOUNT and"),
        ("RESULTS_QUEUED_PER_PORTAL", "-5", "RESULTS_QUEUED_PER_PORTAL must be at least 1"),
    ],
)
def test_settings_refuse_an_outbox_setting_that_would_lose_or_block_changes(variable, value, error):
    from tests.b24app.test_settings import _run_django

    result = _run_django({"DJANGO_DEBUG": "true", variable: value}, "check")

    assert result.returncode != 0
    assert error in result.stderr
