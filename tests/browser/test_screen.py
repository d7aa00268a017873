"""The task-results screen as a person uses it: inside the fake portal's task card (another
site), in Debian's Chromium with every Cookie header stripped, and checked against what the
portal itself holds afterwards (`sandbox.results`, `sandbox.calls`)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from playwright.sync_api import expect

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

ANNA, BORIS = 1, 2  # the sandbox's admin and ordinary user
TASK = 1  # "Prepare the quarterly report", created by the sandbox fixture
CHANGE_PATHS = ("/b24/app/results/", "/b24/app/changes/")


def open_screen(page, sandbox, *, as_user=ANNA, task_id=TASK, lang=None):
    """The task card as `as_user` sees it; returns the app's frame once its script has run."""
    query = f"?as={as_user}" + (f"&lang={lang}" if lang else "")
    page.goto(f"{sandbox.url}/company/personal/user/{as_user}/tasks/task/view/{task_id}/{query}")
    frame = page.wait_for_selector("iframe").content_frame()
    frame.wait_for_selector("main[data-screen='results'] #results")
    frame.wait_for_load_state("load")  # screen.js has run (its CSP forbids eval'd predicates)
    return frame


def result_item(frame, result_id):
    return frame.locator(f"li.result[data-result-id='{result_id}']")


def add_box(frame, label="Result text"):
    return frame.locator("form.add").get_by_label(label, exact=True)


def portal_texts(sandbox, task_id=TASK):
    return [item["text"] for item in sandbox.results(task_id)]


def write_calls(sandbox):
    return [
        call
        for method in ("add", "update", "delete")
        for call in sandbox.calls(f"tasks.task.result.{method}")
    ]


def record_app_traffic(page, live_server):
    """Every request the page (and its frames) sends to the app, and every app response."""
    traffic = {"requests": [], "responses": []}
    page.on(
        "request",
        lambda r: traffic["requests"].append(r) if r.url.startswith(live_server.url) else None,
    )
    page.on(
        "response",
        lambda r: traffic["responses"].append(r) if r.url.startswith(live_server.url) else None,
    )
    return traffic


def change_posts(traffic):
    """The requests that would change something: posts to the app's result endpoints."""
    return [
        r
        for r in traffic["requests"]
        if r.method == "POST" and any(p in r.url for p in CHANGE_PATHS)
    ]


def mark_document(frame):
    """Tag the frame's document, so a later check can tell that it was never reloaded."""
    frame.evaluate("window.__screenTestMark = 'still the same document'")


def assert_same_document(frame):
    assert frame.evaluate("window.__screenTestMark") == "still the same document"


# --- list --------------------------------------------------------------------------------------


def test_list_shows_newest_first_with_authors_escaped_text_and_line_breaks(
    browser_page, sandbox, celery_eager
):
    now = datetime.now(UTC)
    sandbox.add_result(
        TASK, author_id=ANNA, text="Collected the figures", created_at=now - timedelta(hours=3)
    )
    sandbox.add_result(TASK, author_id=BORIS, text="<b>x</b>", created_at=now - timedelta(hours=2))
    sandbox.add_result(
        TASK,
        author_id=ANNA,
        text="Line one\nLine two",
        created_at=now - timedelta(hours=1),
    )

    frame = open_screen(browser_page, sandbox)

    items = frame.locator("li.result")
    expect(items).to_have_count(3)
    expect(items.locator(".author")).to_have_text(
        ["Anna Smirnova", "Boris Petrov", "Anna Smirnova"]
    )
    expect(items.locator(".text")).to_have_text(
        ["Line one\nLine two", "<b>x</b>", "Collected the figures"], use_inner_text=True
    )
    # The markup a user typed is shown as text: no element was made from it.
    assert items.nth(1).locator(".text b").count() == 0
    assert items.nth(1).locator(".text").inner_html() == "&lt;b&gt;x&lt;/b&gt;"
    # The line break is kept as a line break, and only as one.
    assert items.nth(0).locator(".text br").count() == 1
    assert items.nth(0).locator(".text").inner_text() == "Line one\nLine two"


# --- add ---------------------------------------------------------------------------------------


def test_add_shows_the_new_result_saved_and_the_portal_has_it(browser_page, sandbox, celery_eager):
    sandbox.add_result(TASK, author_id=BORIS, text="An older result")
    frame = open_screen(browser_page, sandbox)
    mark_document(frame)

    add_box(frame).fill("Report sent to the client")
    frame.get_by_role("button", name="Add result", exact=True).click()

    newest = frame.locator("li.result").first
    expect(newest.locator(".text")).to_have_text("Report sent to the client")
    expect(newest.locator(".author")).to_have_text("Anna Smirnova")
    expect(newest.locator("[data-change-label]")).to_have_text("Saved")
    expect(add_box(frame)).to_have_value("")
    assert_same_document(frame)

    added = [r for r in sandbox.results(TASK) if r["text"] == "Report sent to the client"]
    assert len(added) == 1
    assert added[0]["authorId"] == ANNA
    expect(newest).to_have_attribute("data-result-id", str(added[0]["id"]))
    assert len(sandbox.calls("tasks.task.result.add")) == 1


# --- edit --------------------------------------------------------------------------------------


def test_edit_saves_the_new_text_in_place_and_at_the_portal(browser_page, sandbox, celery_eager):
    result_id = sandbox.add_result(TASK, author_id=ANNA, text="Draft of the report")
    frame = open_screen(browser_page, sandbox)
    mark_document(frame)
    item = result_item(frame, result_id)

    item.get_by_role("button", name="Edit", exact=True).click()
    box = item.get_by_label("Result text", exact=True)
    expect(box).to_be_visible()
    expect(box).to_have_value("Draft of the report")
    box.fill("Final report, sent")
    item.get_by_role("button", name="Save", exact=True).click()

    expect(item.locator(".text")).to_have_text("Final report, sent")
    expect(item.locator("[data-change-label]")).to_have_text("Saved")
    expect(item.locator("form.editor")).to_be_hidden()
    expect(frame.locator("li.result")).to_have_count(1)
    assert_same_document(frame)
    assert portal_texts(sandbox) == ["Final report, sent"]
    assert len(sandbox.calls("tasks.task.result.update")) == 1


def test_edit_cancel_closes_the_editor_and_sends_nothing(
    browser_page, sandbox, live_server, celery_eager
):
    result_id = sandbox.add_result(TASK, author_id=ANNA, text="Draft of the report")
    frame = open_screen(browser_page, sandbox)
    traffic = record_app_traffic(browser_page, live_server)
    item = result_item(frame, result_id)

    item.get_by_role("button", name="Edit", exact=True).click()
    box = item.get_by_label("Result text", exact=True)
    box.fill("A change I do not want")
    item.get_by_role("button", name="Cancel", exact=True).click()

    expect(item.locator("form.editor")).to_be_hidden()
    expect(item.get_by_role("button", name="Edit", exact=True)).to_be_visible()
    expect(item.locator(".text")).to_have_text("Draft of the report")
    assert change_posts(traffic) == []
    assert write_calls(sandbox) == []
    assert portal_texts(sandbox) == ["Draft of the report"]


# --- delete ------------------------------------------------------------------------------------


def test_delete_after_confirmation_removes_the_result_here_and_at_the_portal(
    browser_page, sandbox, celery_eager
):
    keep_id = sandbox.add_result(TASK, author_id=BORIS, text="Boris keeps this")
    gone_id = sandbox.add_result(TASK, author_id=ANNA, text="Posted by mistake")
    frame = open_screen(browser_page, sandbox)
    item = result_item(frame, gone_id)

    item.get_by_role("button", name="Delete", exact=True).click()
    confirm = item.locator("form.confirm-delete")
    expect(confirm).to_be_visible()
    assert write_calls(sandbox) == []  # opening the confirmation sends nothing
    confirm.get_by_role("button", name="Delete", exact=True).click()

    expect(item).to_have_count(0)
    expect(frame.locator("li.result")).to_have_count(1)
    expect(result_item(frame, keep_id)).to_be_visible()
    assert [r["id"] for r in sandbox.results(TASK)] == [keep_id]
    assert len(sandbox.calls("tasks.task.result.delete")) == 1


def test_delete_cancel_keeps_the_result_and_sends_nothing(
    browser_page, sandbox, live_server, celery_eager
):
    result_id = sandbox.add_result(TASK, author_id=ANNA, text="Worth keeping")
    frame = open_screen(browser_page, sandbox)
    traffic = record_app_traffic(browser_page, live_server)
    item = result_item(frame, result_id)

    item.get_by_role("button", name="Delete", exact=True).click()
    confirm = item.locator("form.confirm-delete")
    expect(confirm).to_be_visible()
    confirm.get_by_role("button", name="Cancel", exact=True).click()

    expect(confirm).to_be_hidden()
    expect(item.get_by_role("button", name="Delete", exact=True)).to_be_visible()
    expect(item.locator(".text")).to_have_text("Worth keeping")
    assert change_posts(traffic) == []
    assert write_calls(sandbox) == []
    assert portal_texts(sandbox) == ["Worth keeping"]


# --- blank text --------------------------------------------------------------------------------


def test_blank_text_is_refused_before_anything_is_sent(
    browser_page, sandbox, live_server, celery_eager
):
    result_id = sandbox.add_result(TASK, author_id=ANNA, text="Already there")
    frame = open_screen(browser_page, sandbox)
    traffic = record_app_traffic(browser_page, live_server)
    alert = frame.get_by_role("alert")
    add_button = frame.get_by_role("button", name="Add result", exact=True)

    for blank in ("", "   \n\t  "):
        add_box(frame).fill(blank)
        add_button.focus()
        add_button.click()
        expect(alert).to_have_text("Result text is required.")
        expect(add_box(frame)).to_be_focused()  # back in the field that needs the text

    item = result_item(frame, result_id)
    item.get_by_role("button", name="Edit", exact=True).click()
    box = item.get_by_label("Result text", exact=True)
    for blank in ("", "  \n "):
        box.fill(blank)
        save = item.get_by_role("button", name="Save", exact=True)
        save.focus()
        save.click()
        expect(alert).to_have_text("Result text is required.")
        expect(box).to_be_focused()

    expect(frame.locator("li.result")).to_have_count(1)
    assert change_posts(traffic) == []
    assert sandbox.calls("tasks.task.result.add") == []
    assert sandbox.calls("tasks.task.result.update") == []
    assert portal_texts(sandbox) == ["Already there"]


# --- rights ------------------------------------------------------------------------------------


def test_rights_non_author_gets_no_edit_or_delete_on_others_results(
    browser_page, sandbox, celery_eager
):
    annas = sandbox.add_result(TASK, author_id=ANNA, text="Anna's summary")
    boriss = sandbox.add_result(TASK, author_id=BORIS, text="Boris's numbers")

    frame = open_screen(browser_page, sandbox, as_user=BORIS)
    other, own = result_item(frame, annas), result_item(frame, boriss)
    expect(other.locator(".text")).to_have_text("Anna's summary")
    assert other.locator("[data-action], form.editor, form.confirm-delete").count() == 0
    expect(other.get_by_role("button", name="Edit", exact=True)).to_have_count(0)
    expect(other.get_by_role("button", name="Delete", exact=True)).to_have_count(0)
    expect(own.get_by_role("button", name="Edit", exact=True)).to_be_visible()
    expect(own.get_by_role("button", name="Delete", exact=True)).to_be_visible()

    # Being a portal admin does not make another person's result editable either.
    frame = open_screen(browser_page, sandbox, as_user=ANNA)
    other, own = result_item(frame, boriss), result_item(frame, annas)
    expect(other.locator(".text")).to_have_text("Boris's numbers")
    assert other.locator("[data-action], form.editor, form.confirm-delete").count() == 0
    expect(own.get_by_role("button", name="Edit", exact=True)).to_be_visible()
    expect(own.get_by_role("button", name="Delete", exact=True)).to_be_visible()


# --- Russian -----------------------------------------------------------------------------------


def test_russian_screen_shows_russian_labels_and_refusal(browser_page, sandbox, celery_eager):
    result_id = sandbox.add_result(TASK, author_id=ANNA, text="Отчёт готов")
    frame = open_screen(browser_page, sandbox, lang="ru")
    item = result_item(frame, result_id)

    add_button = frame.locator("form.add button[type=submit]")
    add_button.click()  # empty text
    frame.locator(".message.js-message").wait_for()

    item.locator("[data-action='edit']").click()
    shown = {
        "html lang": frame.locator("html").get_attribute("lang"),
        "edit button": item.locator("[data-action='edit']").text_content(),
        "delete button": item.locator("[data-action='delete']").text_content(),
        "add label": frame.locator("form.add label").text_content(),
        "add button": add_button.text_content(),
        "editor label": item.locator("form.editor label").text_content(),
        "save button": item.locator("form.editor button[type=submit]").text_content(),
        "cancel button": item.locator("form.editor [data-action='cancel']").text_content(),
        "blank refusal": frame.locator(".message.js-message").text_content(),
    }
    assert shown == {
        "html lang": "ru",
        "edit button": "Редактировать",
        "delete button": "Удалить",
        "add label": "Текст результата",
        "add button": "Добавить результат",
        "editor label": "Текст результата",
        "save button": "Сохранить",
        "cancel button": "Отмена",
        "blank refusal": "Введите текст результата.",
    }
    assert write_calls(sandbox) == []


def test_russian_change_state_is_shown_in_russian(browser_page, sandbox, celery_eager):
    frame = open_screen(browser_page, sandbox, lang="ru")

    add_box(frame, "Текст результата").fill("Отчёт отправлен")
    frame.get_by_role("button", name="Добавить результат", exact=True).click()

    newest = frame.locator("li.result").first
    expect(newest.locator(".text")).to_have_text("Отчёт отправлен")
    expect(newest.locator("[data-change-label]")).to_have_text("Сохранено")
    assert portal_texts(sandbox) == ["Отчёт отправлен"]


# --- queued, then saved by the worker ----------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.redis
def test_queued_change_turns_saved_without_reload_and_applies_once(
    browser_page, sandbox, celery_worker_process
):
    from b24app.portals.models import Portal
    from results.models import ResultChange

    sandbox.set_rate_limit(10, 20)
    frame = open_screen(browser_page, sandbox)
    # The portal row exists from the first frame open; short back-off penalties for this test.
    assert Portal.objects.filter(member_id=sandbox.member_id).update(rate_limit="10/20") == 1
    sandbox.fail_next(count=3, error="QUERY_LIMIT_EXCEEDED", method="tasks.task.result.add")
    mark_document(frame)

    add_box(frame).fill("Sent while Bitrix24 was busy")
    frame.get_by_role("button", name="Add result", exact=True).click()

    newest = frame.locator("li.result").first
    expect(newest.locator(".text")).to_have_text("Sent while Bitrix24 was busy")
    expect(newest.locator("[data-change-label]")).to_have_text("Queued")
    expect(newest.locator("[data-change-label]")).to_have_text("Saved", timeout=60_000)
    expect(newest.locator(".text")).to_have_text("Sent while Bitrix24 was busy")
    assert_same_document(frame)

    added = [r for r in sandbox.results(TASK) if r["text"] == "Sent while Bitrix24 was busy"]
    assert len(added) == 1, added
    expect(newest).to_have_attribute("data-result-id", str(added[0]["id"]))
    calls = sandbox.calls("tasks.task.result.add")
    assert [c["injected"] for c in calls].count("QUERY_LIMIT_EXCEEDED") == 3
    assert len({c["idempotency_key"] for c in calls}) == 1  # every attempt was the same change
    change = ResultChange.objects.get()
    assert (change.state, change.result_id) == (ResultChange.State.SAVED, added[0]["id"])


def test_queued_change_stays_on_screen_under_the_default_rate_limit(
    browser_page, sandbox, celery_eager
):
    """With the default B24_RATE_LIMIT and no overrides, one busy answer is enough to queue an
    add; the person must still see it queued and then saved (inline mode: the open screen's
    polling delivers it)."""
    frame = open_screen(browser_page, sandbox)
    sandbox.fail_next(count=1, error="QUERY_LIMIT_EXCEEDED", method="tasks.task.result.add")
    mark_document(frame)

    add_box(frame).fill("Sent while Bitrix24 was busy")
    frame.get_by_role("button", name="Add result", exact=True).click()

    newest = frame.locator("li.result").first
    expect(newest.locator(".text")).to_have_text("Sent while Bitrix24 was busy")
    expect(newest.locator("[data-change-label]")).to_have_text("Queued")
    expect(newest.locator("[data-change-label]")).to_have_text("Saved", timeout=60_000)
    assert_same_document(frame)
    assert portal_texts(sandbox) == ["Sent while Bitrix24 was busy"]


def test_busy_portal_keeps_the_list_and_shows_queued_then_saved(
    browser_page, sandbox, celery_eager
):
    """Bitrix24 answers the add QUERY_LIMIT_EXCEEDED and then refuses every read of the list:
    the person keeps the list they had, sees their result Queued and then Saved, and never an
    empty list."""
    from b24app.portals.models import Portal

    sandbox.add_result(TASK, author_id=BORIS, text="Boris counted the stock")
    sandbox.add_result(TASK, author_id=ANNA, text="Anna checked the invoices")
    frame = open_screen(browser_page, sandbox)
    # Short pauses after each busy answer, so the test does not wait for the default budget.
    assert Portal.objects.filter(member_id=sandbox.member_id).update(rate_limit="10/20") == 1
    sandbox.fail_next(count=1, error="QUERY_LIMIT_EXCEEDED", method="tasks.task.result.add")
    sandbox.fail_next(count=1000, error="QUERY_LIMIT_EXCEEDED", method="tasks.task.result.list")
    mark_document(frame)

    add_box(frame).fill("Sent while the list could not be read")
    frame.get_by_role("button", name="Add result", exact=True).click()

    items = frame.locator("li.result")
    newest = items.first
    expect(newest.locator("[data-change-label]")).to_have_text("Queued")
    expect(items.locator(".text")).to_have_text(
        [
            "Sent while the list could not be read",
            "Anna checked the invoices",
            "Boris counted the stock",
        ]
    )
    expect(newest.locator("[data-change-label]")).to_have_text("Saved", timeout=60_000)
    expect(items).to_have_count(3)
    expect(frame.locator("li.empty")).to_have_count(0)
    expect(frame.get_by_text("No results yet.")).to_have_count(0)
    assert_same_document(frame)
    assert sorted(portal_texts(sandbox)) == sorted(
        [
            "Sent while the list could not be read",
            "Anna checked the invoices",
            "Boris counted the stock",
        ]
    )
    assert len([c for c in sandbox.calls("tasks.task.result.add") if c["status"] == 200]) == 1


# --- cookies and framing -----------------------------------------------------------------------


def test_frame_uses_no_cookies_and_allows_only_the_portal_to_frame_it(
    browser_page, sandbox, live_server, celery_eager
):
    traffic = record_app_traffic(browser_page, live_server)
    frame = open_screen(browser_page, sandbox)
    add_box(frame).fill("Checked without cookies")
    frame.get_by_role("button", name="Add result", exact=True).click()
    expect(frame.locator("li.result").first.locator("[data-change-label]")).to_have_text("Saved")

    assert any("/b24/app/results/add/" in r.url for r in traffic["requests"])
    for request in traffic["requests"]:
        assert "cookie" not in request.all_headers(), request.url
    for response in traffic["responses"]:
        assert response.header_values("set-cookie") == [], response.url
    assert browser_page.context.cookies(live_server.url) == []

    documents = [r for r in traffic["responses"] if r.request.resource_type == "document"]
    assert documents, "the app's page in the frame was not seen"
    for response in documents:
        headers = response.all_headers()
        assert "x-frame-options" not in headers, response.url
        policy = headers.get("content-security-policy", "")
        ancestors = re.findall(r"frame-ancestors([^;]*)", policy)
        assert [a.split() for a in ancestors] == [[sandbox.url]], policy


# --- keyboard ----------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["Enter", "Space"])
def test_keyboard_opens_the_editor_focused_and_escape_closes_it(
    browser_page, sandbox, key, celery_eager
):
    result_id = sandbox.add_result(TASK, author_id=ANNA, text="Typed with the keyboard")
    frame = open_screen(browser_page, sandbox)
    item = result_item(frame, result_id)
    edit = item.get_by_role("button", name="Edit", exact=True)
    editor = item.locator("form.editor")

    edit.focus()
    expect(edit).to_be_focused()
    browser_page.keyboard.press(key)

    box = item.get_by_label("Result text", exact=True)
    expect(editor).to_be_visible()
    expect(box).to_be_focused()
    browser_page.keyboard.type(" and edited")
    browser_page.keyboard.press("Escape")

    expect(editor).to_be_hidden()
    expect(edit).to_be_visible()
    expect(item.locator(".text")).to_have_text("Typed with the keyboard")
    assert write_calls(sandbox) == []


@pytest.mark.parametrize("opener", ["Edit", "Delete"])
@pytest.mark.parametrize("close", ["Escape", "Cancel"])
def test_keyboard_closing_a_form_returns_focus_to_the_button_that_opened_it(
    browser_page, sandbox, opener, close, celery_eager
):
    result_id = sandbox.add_result(TASK, author_id=ANNA, text="Typed with the keyboard")
    frame = open_screen(browser_page, sandbox)
    item = result_item(frame, result_id)
    button = item.get_by_role("button", name=opener, exact=True)
    form = item.locator("form.editor" if opener == "Edit" else "form.confirm-delete")

    button.press("Enter")
    expect(form).to_be_visible()
    if close == "Escape":
        browser_page.keyboard.press("Escape")
    else:
        form.get_by_role("button", name="Cancel", exact=True).press("Enter")

    expect(form).to_be_hidden()
    expect(button).to_be_focused()  # a keyboard user goes on from where they were
    assert write_calls(sandbox) == []
