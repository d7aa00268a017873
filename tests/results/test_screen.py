"""The placement entry (`POST /b24/app/`) and the server-rendered screen."""

from datetime import UTC, datetime
from unittest import mock
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest

from b24app.portals import frame, services
from b24app.portals.models import Account, Portal
from tests.support.http import csp
from tests.support.portals import install, kill_installer_tokens, post_frame
from tests.support.results import frame_token
from tests.support.results import post_screen as open_screen  # any status, any placement

pytestmark = pytest.mark.django_db


# A fixed moment, so that what the screen shows of a date (the month's name, the year) is the
# same whatever day the suite runs on.
SEEDED_AT = datetime(2026, 11, 5, 9, 30, tzinfo=UTC)


@pytest.fixture
def task(portal):
    task_id = portal.add_task(title="Prepare the quarterly report")
    portal.add_result(
        task_id, author_id=2, text="Figures <b>checked</b>\nsecond line", created_at=SEEDED_AT
    )
    portal.add_result(task_id, author_id=1, text="Report sent", created_at=SEEDED_AT)
    return task_id


@pytest.mark.parametrize(
    "placement, key",
    [
        ("TASK_VIEW_TAB", "taskId"),
        ("TASK_VIEW_SIDEBAR", "taskId"),
        ("TASK_VIEW_TOP_PANEL", "taskId"),
        ("TASK_LIST_CONTEXT_MENU", "ID"),
    ],
)
def test_screen_shows_the_tasks_results_for_each_task_placement(
    client, portal, task, placement, key
):
    install(client, portal)
    response = open_screen(client, portal, placement=placement, options={key: str(task)})
    assert response.status_code == 200
    html = response.content.decode()
    assert html.index("Report sent") < html.index("Figures")  # newest first
    assert "Figures &lt;b&gt;checked&lt;/b&gt;<br>second line" in html  # escaped, breaks kept
    assert "Boris Petrov" in html and "Anna Smirnova" in html
    assert f'data-task="{task}"' in html


def test_screen_works_for_a_portal_it_has_not_seen_yet(client, portal, task):
    """No install record (events lost): the OAuth server's app.info vouches for the POST."""
    response = open_screen(client, portal, options={"taskId": str(task)})
    assert response.status_code == 200
    assert Portal.objects.get().member_id == portal.member_id
    assert Portal.objects.get().application_token_hash == ""  # never learnt from a browser


def test_screen_never_shows_the_posted_tokens(client, portal, task):
    install(client, portal)
    url, fields = portal.frame_post(1, options={"taskId": str(task)})
    html = post_frame(client, url, fields).content.decode()
    for name in ("AUTH_ID", "REFRESH_ID", "APPLICATION_TOKEN"):
        assert fields[name] not in html


def _item_html(html: str, text: str) -> str:
    return next(part for part in html.split('<li class="result') if text in part)


def test_screen_only_author_gets_edit_and_delete(client, portal, task):
    install(client, portal)
    html = open_screen(client, portal, user_id=2, options={"taskId": str(task)}).content.decode()
    own, others = _item_html(html, "Figures"), _item_html(html, "Report sent")
    assert 'data-action="edit"' in own and 'data-action="delete"' in own
    assert 'data-action="edit"' not in others and 'data-action="delete"' not in others
    assert "/edit/" not in others


@pytest.mark.parametrize(
    "options",
    [
        "not json",
        "[1, 2]",
        '"31"',
        "",
        '{"taskId": "-4"}',
        '{"taskId": "abc"}',
        '{"taskId": {"x": 1}}',
        "null",
        '{"taskId": "99999999999999999999999"}',
    ],
)
def test_screen_malformed_placement_options_show_the_task_picker(client, portal, options):
    install(client, portal)
    url, fields = portal.frame_post(1, placement="TASK_VIEW_TAB")
    fields["PLACEMENT_OPTIONS"] = options
    response = post_frame(client, url, fields)
    assert response.status_code == 200
    assert 'class="picker"' in response.content.decode()


def test_screen_default_placement_shows_picker_and_admin_panel(client, portal, task):
    install(client, portal)
    admin = open_screen(client, portal, user_id=1, placement="DEFAULT").content.decode()
    assert 'class="picker"' in admin and "Connection to Bitrix24" in admin
    assert 'data-bindings="ok"' in admin
    user = open_screen(client, portal, user_id=2, placement="DEFAULT").content.decode()
    assert 'class="picker"' in user and "Connection to Bitrix24" not in user


def test_screen_picker_shows_a_tasks_results(client, portal, task):
    install(client, portal)
    token = frame_token(open_screen(client, portal, placement="DEFAULT"))
    response = client.post("/b24/app/task/", {"frame_token": token, "task": str(task)})
    assert response.status_code == 200 and "Report sent" in response.content.decode()


def test_screen_rebind_puts_the_tab_back(client, portal, task):
    install(client, portal)
    portal.placements.clear()
    token = frame_token(open_screen(client, portal, placement="DEFAULT"))
    response = client.post("/b24/app/rebind/", {"frame_token": token})
    assert response.status_code == 200
    assert portal.placement_binding("TASK_VIEW_TAB").handler == "https://app.example.test/b24/app/"
    boris = frame_token(open_screen(client, portal, user_id=2, placement="DEFAULT"))
    assert client.post("/b24/app/rebind/", {"frame_token": boris}).status_code == 403


def test_screen_in_russian_and_other_languages_fall_back_to_english(client, portal, task):
    install(client, portal)
    ru = open_screen(client, portal, user_id=2, options={"taskId": str(task)}, lang="ru")
    html = ru.content.decode()
    for label in (
        "Редактировать",
        "Текст результата",
        "Добавить результат",
        "Удалить",
        "Сохранить",
        "Отмена",
    ):
        assert label in html
    # Dates in the user's locale, in the portal's own offset (the fake's is +03:00).
    assert "5 ноября 2026 г. 12:30" in html
    de = open_screen(client, portal, user_id=2, options={"taskId": str(task)}, lang="de")
    assert "Add result" in de.content.decode()


def test_screen_blank_text_is_refused_in_russian(client, portal, task):
    install(client, portal)
    token = frame_token(open_screen(client, portal, options={"taskId": str(task)}, lang="ru"))
    response = client.post(
        "/b24/app/results/add/", {"frame_token": token, "task": str(task), "text": "  \n "}
    )
    assert response.status_code == 400
    assert "Введите текст результата." in response.content.decode()


@pytest.mark.parametrize("state, blocked_by_operator", [("uninstalled", False), ("blocked", True)])
def test_screen_for_an_unusable_portal_is_a_clear_4xx_page(
    client, portal, task, state, blocked_by_operator
):
    install(client, portal)
    Portal.objects.update(state=state, blocked_by_operator=blocked_by_operator)
    portal.installed = state != "uninstalled"  # what app.info says of the install
    response = open_screen(client, portal, options={"taskId": str(task)})
    assert response.status_code == 403
    assert 'data-screen="refused"' in response.content.decode()
    assert csp(response)["frame-ancestors"] == portal.url
    assert "X-Frame-Options" not in response


def test_screen_open_repairs_a_blocked_account_and_the_installers_portal(
    client, fake, portal, task
):
    install(client, portal)
    kill_installer_tokens(portal)
    assert Portal.objects.get().state == Portal.State.BLOCKED

    assert open_screen(client, portal, options={"taskId": str(task)}).status_code == 200

    account = Account.objects.get(user_id=1)
    assert account.state == Account.State.ACTIVE and account.state_reason == ""
    assert Portal.objects.get().state == Portal.State.ACTIVE
    assert services.account_client(account).call("profile")["ID"] == "1"


def test_screen_application_token_mismatch_falls_back_to_the_oauth_server(
    client, fake, portal, task
):
    install(client, portal)
    url, fields = portal.frame_post(1, options={"taskId": str(task)})
    fields["APPLICATION_TOKEN"] = "0" * 32
    assert post_frame(client, url, fields).status_code == 200
    fields["AUTH_ID"] = "f" * 70
    assert post_frame(client, url, fields).status_code == 403


def test_screen_other_domain_in_query_is_checked_with_the_oauth_server(client, fake, portal, task):
    install(client, portal)
    other = fake.add_portal()
    url, fields = portal.frame_post(1, options={"taskId": str(task)})
    parts = urlsplit(url)
    query = urlencode({**dict(parse_qsl(parts.query)), "DOMAIN": other.domain})
    response = post_frame(client, f"{parts.path}?{query}", fields)
    assert response.status_code == 403


def test_frame_session_renewal_with_fresh_auth(client, portal, task):
    install(client, portal)
    assert open_screen(client, portal, user_id=2, options={"taskId": str(task)}).status_code == 200
    account = Account.objects.get(user_id=2)
    old_token = frame.issue(frame.FrameSession(account.portal_id, account.pk, "en"))
    url = f"/b24/app/task/?task={task}"

    with mock.patch.object(frame, "TTL_SECONDS", -1):  # as if 30 minutes had passed
        refused = client.get(url, HTTP_X_FRAME_TOKEN=old_token, HTTP_ACCEPT="application/json")
    assert refused.status_code == 401 and refused.json()["error"] == "frame_expired"

    fresh = portal.issue_tokens(2)
    renewed = client.post(
        "/b24/app/session/",
        {
            "AUTH_ID": fresh["access_token"],
            "REFRESH_ID": fresh["refresh_token"],
            "AUTH_EXPIRES": "3600",
        },
        HTTP_X_FRAME_TOKEN=old_token,
    )
    assert renewed.status_code == 200
    new_token = renewed.json()["token"]
    assert fresh["access_token"] not in renewed.content.decode()
    assert frame.read(new_token).account_id == account.pk
    ok = client.get(url, HTTP_X_FRAME_TOKEN=new_token, HTTP_ACCEPT="application/json")
    assert ok.status_code == 200 and "Report sent" in ok.json()["html"]

    someone_else = portal.issue_tokens(1)
    refused = client.post(
        "/b24/app/session/",
        {"AUTH_ID": someone_else["access_token"], "REFRESH_ID": someone_else["refresh_token"]},
        HTTP_X_FRAME_TOKEN=old_token,
    )
    assert refused.status_code == 403
    tampered = client.post(
        "/b24/app/session/",
        {"AUTH_ID": fresh["access_token"], "REFRESH_ID": fresh["refresh_token"]},
        HTTP_X_FRAME_TOKEN=old_token[:-2] + "xx",
    )
    assert tampered.status_code == 403


def test_screen_for_a_task_the_user_cannot_see_offers_nothing_to_add(client, portal, task):
    install(client, portal)
    response = open_screen(client, portal, options={"taskId": "424242"})
    assert response.status_code == 403
    html = response.content.decode()
    assert "You do not have access to this task in Bitrix24." in html
    assert 'class="add"' not in html


def test_screen_change_on_a_busy_portal_answers_2xx_without_reading_the_list(
    client, portal, task, celery_eager
):
    """An edit that Bitrix24 answers QUERY_LIMIT_EXCEEDED is queued, and the limiter then holds
    the portal: the answer must not depend on reading the list again (which the held portal
    would refuse), so the person keeps the list they have, with the change marked Queued."""
    install(client, portal)
    token = frame_token(open_screen(client, portal, options={"taskId": str(task)}))
    lists = len(portal.calls("tasks.task.result.list"))
    portal.fail_next(count=3, error="QUERY_LIMIT_EXCEEDED")  # the add, and whatever comes next
    response = client.post(
        "/b24/app/results/add/",
        {"task": str(task), "text": "Sent to the board"},
        HTTP_X_FRAME_TOKEN=token,
        HTTP_ACCEPT="application/json",
    )
    body = response.json()
    assert response.status_code == 200
    assert body["change"]["state"] == "queued"
    assert "Sent to the board" in body["item_html"] and "Queued" in body["item_html"]
    assert "No results yet." not in body["item_html"]
    assert len(portal.calls("tasks.task.result.list")) == lists  # no read of the list


def test_screen_form_post_on_a_busy_portal_answers_2xx_and_says_the_list_could_not_load(
    client, portal, task, celery_eager
):
    """Without JavaScript the whole screen comes back: the person's queued result is in it, the
    list is said to be unavailable with a way to try again, and never "No results yet."."""
    install(client, portal)
    token = frame_token(open_screen(client, portal, options={"taskId": str(task)}))
    portal.fail_next(count=3, error="QUERY_LIMIT_EXCEEDED")
    response = client.post(
        "/b24/app/results/add/", {"frame_token": token, "task": str(task), "text": "On paper"}
    )
    page = response.content.decode()
    assert response.status_code == 200
    assert "On paper" in page and "Queued" in page
    assert "The results could not be loaded." in page
    assert 'class="reload"' in page
    assert "No results yet." not in page


def test_screen_open_on_a_busy_portal_says_the_list_could_not_load_and_offers_a_retry(
    client, portal, task
):
    install(client, portal)
    Portal.objects.update(rate_limit="100000/100000")  # the busy answer's pause is 1 s
    services.rate_limiter().reset(portal.member_id)  # the install's calls, paced at 50/2
    portal.fail_next(error="QUERY_LIMIT_EXCEEDED", method="tasks.task.result.list")
    response = open_screen(client, portal, options={"taskId": str(task)})
    page = response.content.decode()
    assert response.status_code == 503
    assert "The results could not be loaded." in page
    assert "No results yet." not in page  # a statement about the task, which nobody knows
    assert 'class="reload"' in page and "Try again" in page

    token = frame_token(response)
    services.rate_limiter().reset(portal.member_id)  # the pause is over when they try again
    again = client.post("/b24/app/task/", {"frame_token": token, "task": str(task)})
    assert again.status_code == 200
    assert "Report sent" in again.content.decode()


def test_screen_without_app_credentials_is_a_clear_refusal(client, portal, task, settings):
    settings.B24_CLIENT_ID = ""
    response = open_screen(client, portal, options={"taskId": str(task)})
    assert response.status_code == 503
    assert "B24_CLIENT_ID" in response.content.decode()


def test_screen_with_the_broker_down_still_queues_the_change(client, portal, task):
    from b24app.celery import app

    install(client, portal)
    token = frame_token(open_screen(client, portal, options={"taskId": str(task)}))
    portal.fail_next(count=1, error="QUERY_LIMIT_EXCEEDED", method="tasks.task.result.add")
    was_eager, old_broker = app.conf.task_always_eager, app.conf.broker_url
    app.conf.task_always_eager, app.conf.broker_url = False, "redis://127.0.0.1:1/0"
    try:
        response = client.post(
            "/b24/app/results/add/",
            {"task": str(task), "text": "Written while the broker is down"},
            HTTP_X_FRAME_TOKEN=token,
            HTTP_ACCEPT="application/json",
        )
    finally:
        app.conf.task_always_eager, app.conf.broker_url = was_eager, old_broker
    assert response.status_code < 500 or "Queued" in response.json()["html"]
    from results.models import ResultChange

    change = ResultChange.objects.get()
    assert change.state == ResultChange.State.QUEUED and change.text_after.startswith("Written")


# --- paging without guessing the page size ------------------------------------------------------


def _list_calls(portal) -> int:
    return len(portal.calls("tasks.task.result.list", api="v3"))


@pytest.mark.parametrize("cap", [None, 20, 50, 7])
def test_screen_shows_every_result_whatever_page_size_the_portal_returns(client, portal, cap):
    """The documentation gives no default or maximum page for tasks.task.result.list: a task
    with 45 results shows all 45 on a portal that returns 7, 20, 50 or 1000 per page."""
    install(client, portal)
    portal.result_page_cap = cap
    task_id = portal.add_task(title="Many results")
    for n in range(45):
        portal.add_result(task_id, author_id=1, text=f"Result number {n:02d}")

    html = open_screen(client, portal, options={"taskId": str(task_id)}).content.decode()

    assert html.count('<li class="result') == 45
    assert all(f"Result number {n:02d}" in html for n in range(45))


def test_screen_learns_the_page_size_once_and_then_reads_a_small_task_in_one_call(client, portal):
    install(client, portal)
    portal.result_page_cap = 20
    big, small = portal.add_task(title="Big"), portal.add_task(title="Small")
    for n in range(45):
        portal.add_result(big, author_id=1, text=f"Big {n}")
    for n in range(3):
        portal.add_result(small, author_id=1, text=f"Small {n}")

    before = _list_calls(portal)
    open_screen(client, portal, options={"taskId": str(big)})
    assert _list_calls(portal) - before == 3  # 20 + 20 + 5: the cap is proven by page two
    assert Portal.objects.get().result_page_seen == 20

    before = _list_calls(portal)
    html = open_screen(client, portal, options={"taskId": str(small)}).content.decode()
    assert _list_calls(portal) - before == 1  # 3 < 20: the end, no second call
    assert html.count('<li class="result') == 3


def test_screen_relearns_the_page_size_after_a_day(client, portal):
    """A portal whose cap changed is learnt again: what was learnt is trusted for a day."""
    from datetime import timedelta

    from django.utils import timezone

    install(client, portal)
    task_id = portal.add_task(title="Task")
    for n in range(30):
        portal.add_result(task_id, author_id=1, text=f"R {n}")
    portal.result_page_cap = 10
    # Learnt when the portal still returned 25 per page, more than a day ago.
    Portal.objects.update(
        result_page_seen=25, result_page_seen_at=timezone.now() - timedelta(days=1, minutes=1)
    )
    html = open_screen(client, portal, options={"taskId": str(task_id)}).content.decode()
    assert html.count('<li class="result') == 30
    assert Portal.objects.get().result_page_seen == 10


def test_a_portal_admin_answered_as_a_truthy_string_is_no_admin_in_the_frame(client, portal, task):
    """`ADMIN` counts only as JSON `true`, on a first visit and on a later one alike."""
    assert install(client, portal).status_code == 200
    assert Account.objects.get(user_id=1).is_admin
    portal.users[1].admin = "N"
    assert open_screen(client, portal, options={"taskId": str(task)}).status_code == 200
    assert not Account.objects.get(user_id=1).is_admin
    portal.users[2].admin = "Y"
    assert open_screen(client, portal, user_id=2, options={"taskId": str(task)}).status_code == 200
    assert not Account.objects.get(user_id=2).is_admin
