"""The metrics move where things happen: each test drives the app through its endpoints against
the fake portal, scrapes `/metrics` before and after, and checks the difference."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from b24app import metrics
from b24app.portals import services
from b24app.portals.bitrix import BitrixAuthError, BitrixUnavailable
from b24app.portals.models import Account
from results.models import ResultChange
from tests.support.metrics import TOKEN, moved, scrape
from tests.support.portals import issued_tokens, post_event, post_frame
from tests.support.results import ANNA, BORIS, add, edit, html, installed_task, open_screen

pytestmark = pytest.mark.django_db

ADD = "tasks.task.result.add"
REST = "b24app_rest_call_duration_seconds_count"


@pytest.fixture
def task(client, portal):
    return installed_task(client, portal, user_id=ANNA)


def _installer() -> Account:
    return Account.objects.select_related("portal").get(user_id=ANNA)


def test_metrics_delivery_saved_and_its_rest_call_and_limiter_wait_move_by_one(
    client, settings, portal, task, celery_eager
):
    _, token = open_screen(client, portal, BORIS, task)
    before = scrape(client, settings)

    assert "Saved" in html(add(client, token, task, "Sent the report"))

    after = scrape(client, settings)
    assert moved(before, after, "b24app_deliveries_total", outcome="saved") == 1
    assert moved(before, after, "b24app_deliveries_total", outcome="failed") == 0
    assert moved(before, after, REST, method=ADD, api="v3", outcome="ok") == 1
    assert moved(before, after, "b24app_limiter_wait_seconds_count") >= 1


def test_metrics_query_limit_exceeded_answer_is_counted_and_the_change_queued(
    client, settings, portal, task, celery_eager
):
    _, token = open_screen(client, portal, BORIS, task)
    portal.fail_next(error="QUERY_LIMIT_EXCEEDED", method=ADD)
    before = scrape(client, settings)

    assert "Queued" in html(add(client, token, task, "Waiting for the portal"))

    after = scrape(client, settings)
    assert moved(before, after, "b24app_query_limit_exceeded_total", method=ADD) == 1
    assert moved(before, after, "b24app_deliveries_total", outcome="queued") == 1
    assert moved(before, after, REST, method=ADD, api="v3", outcome="error") == 1


def test_metrics_outbox_gauges_count_queued_changes_and_the_oldest_ones_age(
    client, settings, portal, task, celery_eager, django_assert_num_queries
):
    portal.add_result(task, author_id=BORIS, text="First")
    _, token = open_screen(client, portal, BORIS, task)
    [result] = portal.results(task)
    empty = scrape(client, settings)
    assert empty.value("b24app_outbox_queued_changes") == 0
    assert empty.value("b24app_outbox_oldest_queued_age_seconds") == 0

    portal.unavailable_status = 503
    assert "Queued" in html(edit(client, token, task, result["id"], "Second"))
    assert "Queued" in html(add(client, token, task, "Third"))
    oldest = ResultChange.objects.order_by("pk").first()
    ResultChange.objects.filter(pk=oldest.pk).update(
        created_at=timezone.now() - timedelta(minutes=10)
    )
    with django_assert_num_queries(1):  # the outbox's one query, whatever else is exported
        queued = scrape(client, settings)

    assert ResultChange.objects.filter(state=ResultChange.State.QUEUED).count() == 2
    assert queued.value("b24app_outbox_queued_changes") == 2
    assert 600 <= queued.value("b24app_outbox_oldest_queued_age_seconds") < 600 + 300
    # The first found the portal unavailable; the second waited for the portal's backoff.
    assert moved(empty, queued, "b24app_deliveries_total", outcome="queued") == 1
    assert moved(empty, queued, "b24app_deliveries_total", outcome="waits") == 1


def test_metrics_refused_frame_opens_count_by_reason_and_a_portals_code_adds_no_label(
    client, settings, portal, task
):
    before = scrape(client, settings)
    url, fields = portal.frame_post(BORIS, options={"taskId": str(task)})
    assert post_frame(client, url, {**fields, "member_id": "not-a-member-id"}).status_code == 400
    portal.fail_next(error="HOSTILE_MADE_UP_CODE_7", method="profile")
    refused = post_frame(client, *portal.frame_post(BORIS, options={"taskId": str(task)}))
    assert refused.status_code in (401, 403)

    after = scrape(client, settings)
    family = "b24app_frame_opens_refused_total"
    assert moved(before, after, family, reason="malformed", code="malformed") == 1
    assert moved(before, after, family, reason="denied", code="other") == 1
    assert after.label_values(family, "reason") <= metrics.FRAME_REASONS | {"other"}
    assert after.label_values(family, "code") <= metrics.FRAME_CODES | {"other"}
    assert "HOSTILE" not in after.text


def test_metrics_refused_events_count_by_kind_and_reason_and_made_up_ones_add_no_label(
    client, settings, portal
):
    before = scrape(client, settings)
    assert post_event(client, [("event", "ONAPPINSTALL")]).status_code == 400
    made_up = portal.event_body("ONHOSTILEEVENT_XYZ")
    assert post_event(client, made_up).status_code == 400
    stranger = [(k, "0" * 31 + "z" if k == "auth[member_id]" else v) for k, v in made_up]
    assert post_event(client, stranger).status_code == 401

    after = scrape(client, settings)
    family = "b24app_events_refused_total"
    assert moved(before, after, family, kind="malformed", reason="malformed_event") == 1
    assert moved(before, after, family, kind="malformed", reason="unsupported_event") == 1
    assert moved(before, after, family, kind="refused", reason="unknown_portal") == 1
    assert after.label_values(family, "kind") <= metrics.EVENT_KINDS | {"other"}
    assert after.label_values(family, "reason") <= metrics.EVENT_REASONS | {"other"}
    assert "HOSTILE" not in after.text


def test_metrics_token_refreshes_count_ok_unavailable_and_refused(
    client, settings, fake, portal, task
):
    before = scrape(client, settings)
    portal.expire_access_tokens()
    assert services.account_client(_installer()).call("profile")["ID"] == "1"
    ok = scrape(client, settings)
    assert moved(before, ok, "b24app_token_refreshes_total", outcome="ok") == 1
    assert moved(before, ok, REST, method="oauth.token", api="oauth", outcome="ok") == 1

    portal.expire_access_tokens()
    fake.fail_token_next(count=1, error="500")
    with pytest.raises(BitrixUnavailable):
        services.account_client(_installer()).call("profile")
    unavailable = scrape(client, settings)
    assert moved(ok, unavailable, "b24app_token_refreshes_total", outcome="unavailable") == 1

    Account.objects.filter(user_id=ANNA).update(refresh_unconfirmed_at=None)
    portal.expire_access_tokens()
    portal.revoke_refresh_tokens()
    with pytest.raises(BitrixAuthError):
        services.account_client(_installer()).call("profile")
    refused = scrape(client, settings)
    assert moved(unavailable, refused, "b24app_token_refreshes_total", outcome="refused") == 1
    assert moved(unavailable, refused, "b24app_token_refreshes_total", outcome="ok") == 0


def test_metrics_scrape_carries_no_token_secret_member_id_or_domain(
    client, settings, fake, portal, task, celery_eager
):
    _, token = open_screen(client, portal, BORIS, task)
    add(client, token, task, "Done")
    portal.expire_access_tokens()
    services.account_client(_installer()).call("profile")
    post_event(client, portal.event_body("ONHOSTILEEVENT_XYZ"))

    text = scrape(client, settings).text

    secrets = [
        *issued_tokens(fake, portal),
        settings.B24_CLIENT_SECRET,
        portal.application_token,
        portal.member_id,
        portal.domain,
        TOKEN,
        token,
    ]
    assert len(secrets) > 7
    for secret in secrets:
        assert secret not in text


@pytest.mark.postgres
def test_metrics_outbox_query_is_one_indexed_query_on_postgresql():
    """The scrape's one query reads only Queued rows, through an index (with sequential scans
    off: the planner would scan an almost empty test table whole anyway)."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as captured:
        list(metrics.OutboxCollector().collect())
    [query] = captured.captured_queries
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")
        cursor.execute("EXPLAIN " + query["sql"])
        plan = "\n".join(row[0] for row in cursor.fetchall())
    assert "Index" in plan and "Seq Scan" not in plan, plan
