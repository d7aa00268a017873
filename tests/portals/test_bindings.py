"""The app's bindings on a portal (the Results tab, ONAPPUNINSTALL, ONAPPUPDATE) survive app
updates, whenever and however Bitrix24 drops them, and their state is known and shown.

Bitrix24 removes an app's event bindings when the app is updated (`event.bind` docs); when (before
or after the ONAPPUPDATE event reaches the app) and whether placements go too is not documented.
The fake portal does each (`bindings_on_update`), delivering ONAPPUPDATE over real HTTP to the
app on `live_server`.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from b24app.portals import services
from b24app.portals.models import Account, Portal
from b24app.portals.tasks import portal_bindings_check_task, portals_bindings_check_task
from tests.support.portals import install, post_frame

ANNA, BORIS = 1, 2
ALL_BOUND = {"TASK_VIEW_TAB", "ONAPPUNINSTALL", "ONAPPUPDATE"}


@pytest.fixture
def app(live_server, settings, fake, portal, client, celery_eager):
    """The app on a live server (events reach it over HTTP), installed by Anna."""
    settings.B24_APP_URL = live_server.url
    fake.app_url = live_server.url
    assert install(client, portal, ANNA).status_code == 200
    return live_server.url


def bound(portal, app_url: str) -> set[str]:
    """What the portal has bound to the app at `app_url`."""
    with portal.lock:
        placements = {b.placement for b in portal.placements if b.handler == f"{app_url}/b24/app/"}
        events = {b.event for b in portal.event_bindings if b.handler == f"{app_url}/b24/events/"}
    return placements | events


def open_app(client, portal, user_id: int, placement: str = "DEFAULT"):
    response = post_frame(client, *portal.frame_post(user_id, placement=placement))
    assert response.status_code == 200, response.content.decode()[:500]
    return response


def stored(portal) -> Portal:
    return Portal.objects.get(member_id=portal.member_id)


@pytest.mark.django_db(transaction=True)
def test_install_binds_the_tab_and_both_lifecycle_events(app, portal):
    assert bound(portal, app) == ALL_BOUND
    row = stored(portal)
    assert row.bindings == Portal.Bindings.OK and row.bindings_checked_at is not None


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("drops", ["events_before", "all_before"])
def test_update_that_drops_bindings_before_its_event_is_bound_again_with_its_token(
    app, fake, portal, drops
):
    portal.bindings_on_update = drops
    before = len(portal.calls("event.bind"))
    status, _ = portal.update_app()
    assert status == 200

    assert bound(portal, app) == ALL_BOUND
    # Bound again with the admin token the ONAPPUPDATE event carried, at once.
    [update] = [e for e in portal.sent_events if e["event"] == "ONAPPUPDATE"]
    event_token = dict(update["pairs"])["auth[access_token]"]
    binds = portal.calls("event.bind")[before:]
    assert len(binds) == 2 and all(r["body"]["auth"] == event_token for r in binds)
    assert stored(portal).bindings == Portal.Bindings.REPAIRED


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("drops", ["events_after", "all_after"])
def test_update_that_drops_bindings_after_its_event_is_bound_again_at_the_next_admin_visit(
    app, client, portal, drops
):
    """Without a broker the check after the event runs inside it, before Bitrix24 drops them:
    it leaves the check due, so an admin's next visit (or the daily job) binds them again."""
    portal.bindings_on_update = drops
    assert portal.update_app()[0] == 200
    assert "ONAPPUNINSTALL" not in bound(portal, app)
    assert stored(portal).bindings_checked_at is None  # due again

    open_app(client, portal, BORIS)  # not an admin: cannot read the bindings
    assert "ONAPPUNINSTALL" not in bound(portal, app)
    open_app(client, portal, ANNA)
    assert bound(portal, app) == ALL_BOUND
    row = stored(portal)
    assert row.bindings == Portal.Bindings.REPAIRED and "ONAPPUNINSTALL" in row.bindings_detail
    assert row.bindings_checked_at is not None


@pytest.mark.django_db(transaction=True)
def test_update_that_keeps_bindings_binds_nothing(app, portal):
    portal.bindings_on_update = "kept"
    binds = len(portal.calls("event.bind")) + len(portal.calls("placement.bind"))
    assert portal.update_app()[0] == 200
    assert bound(portal, app) == ALL_BOUND
    assert len(portal.calls("event.bind")) + len(portal.calls("placement.bind")) == binds


@pytest.mark.django_db
def test_update_with_a_broker_checks_now_and_once_more_after_it_settled(
    client, portal, monkeypatch, django_capture_on_commit_callbacks
):
    """With a broker: one check right away (left due), one `BINDINGS_SETTLE_S` later."""
    from b24app.celery import app as celery_app
    from tests.support.portals import post_event

    install(client, portal)
    queued = []
    monkeypatch.setattr(
        portal_bindings_check_task, "delay", lambda *a, **kw: queued.append(("now", a, kw))
    )
    monkeypatch.setattr(
        portal_bindings_check_task,
        "apply_async",
        lambda args, countdown=None, **kw: queued.append(("later", args, countdown)),
    )
    was_eager, celery_app.conf.task_always_eager = celery_app.conf.task_always_eager, False
    try:
        with django_capture_on_commit_callbacks(execute=True):
            assert post_event(client, portal.event_body("ONAPPUPDATE")).status_code == 200
    finally:
        celery_app.conf.task_always_eager = was_eager

    row = stored(portal)
    sender = Account.objects.get(user_id=ANNA)
    assert queued == [
        ("now", (row.pk, sender.pk, "https://app.example.test"), {"settled": False}),
        ("later", (row.pk, sender.pk, "https://app.example.test"), services.BINDINGS_SETTLE_S),
    ]


@pytest.mark.django_db(transaction=True)
def test_admin_visit_checks_bindings_at_most_once_a_day(app, client, portal):
    reads = len(portal.calls("event.get"))
    open_app(client, portal, ANNA)
    assert len(portal.calls("event.get")) == reads  # checked at install, not due

    Portal.objects.update(bindings_checked_at=timezone.now() - timedelta(days=1, minutes=1))
    with portal.lock:
        portal.event_bindings.clear()
    portal.add_task(title="Any task")  # task 1: the tab's default
    open_app(client, portal, ANNA, placement="TASK_VIEW_TAB")
    assert len(portal.calls("event.get")) == reads + 1
    assert bound(portal, app) == ALL_BOUND
    open_app(client, portal, ANNA)
    assert len(portal.calls("event.get")) == reads + 1


@pytest.mark.django_db(transaction=True)
def test_daily_job_checks_the_portals_not_checked_for_a_day(app, fake, client, portal):
    other = fake.add_portal()
    other.add_user(name="Olga", admin=True)
    assert install(client, other).status_code == 200
    Portal.objects.filter(member_id=portal.member_id).update(
        bindings_checked_at=timezone.now() - timedelta(days=2)
    )
    with portal.lock:
        portal.event_bindings.clear()
    other_reads = len(other.calls("event.get"))

    assert portals_bindings_check_task.delay().get() == 1

    assert bound(portal, app) == ALL_BOUND
    assert stored(portal).bindings == Portal.Bindings.REPAIRED
    assert len(other.calls("event.get")) == other_reads  # checked at install: not due


@pytest.mark.django_db(transaction=True)
def test_bindings_bitrix24_refuses_are_recorded_as_missing_and_shown_to_the_admin(
    app, client, portal
):
    with portal.lock:
        portal.event_bindings.clear()
    portal.fail_next(error="ACCESS_DENIED", method="event.bind", count=2)
    row = services.portal_bindings_check(portal_id=stored(portal).pk)
    assert row.bindings == Portal.Bindings.MISSING
    assert "ONAPPUNINSTALL (ACCESS_DENIED)" in row.bindings_detail

    page = open_app(client, portal, ANNA).content.decode()
    assert 'data-bindings="missing"' in page and "ONAPPUNINSTALL (ACCESS_DENIED)" in page


@pytest.mark.django_db(transaction=True)
def test_bindings_are_bound_again_at_the_address_they_had_without_b24_app_url(
    app, settings, portal
):
    """B24_APP_URL unset (taken from requests): a background check binds the missing events
    at the address the portal still has the Results tab bound to."""
    settings.B24_APP_URL = ""
    with portal.lock:
        portal.event_bindings.clear()
    assert portal_bindings_check_task.delay(stored(portal).pk).get() == "repaired"
    assert bound(portal, app) == ALL_BOUND


@pytest.mark.django_db(transaction=True)
def test_bindings_check_without_an_admin_account_changes_nothing_and_says_why(app, portal):
    Account.objects.update(is_admin=False)
    row = services.portal_bindings_check(portal_id=stored(portal).pk)
    assert row.bindings == Portal.Bindings.OK  # what was last known stays
    assert row.bindings_checked_at is None  # and the check stays due
    assert "No administrator" in row.bindings_detail
