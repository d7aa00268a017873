"""The results screen for people on a keyboard or a screen reader: where focus goes after each
change, what the live region says, how the Edit and Delete toggles are described, how often
queued changes are polled (on Playwright's fake clock: no test waits the back-off out), and an
axe-core check of every state of the screen."""

from __future__ import annotations

import json
import re

import pytest
from axe_playwright_python.sync_playwright import Axe
from playwright.sync_api import expect

from tests.browser.test_screen import ANNA, TASK, add_box, open_screen, result_item

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

CHANGES = re.compile(r"/b24/app/changes/\?")


# --- focus after each change -------------------------------------------------------------------


def test_add_moves_focus_to_the_new_result(browser_page, sandbox, celery_eager):
    sandbox.add_result(TASK, author_id=ANNA, text="An older result")
    frame = open_screen(browser_page, sandbox)

    add_box(frame).fill("Report sent to the client")
    frame.get_by_role("button", name="Add result", exact=True).click()

    newest = frame.locator("li.result").first
    expect(newest.locator("[data-change-label]")).to_have_text("Saved")
    expect(newest.locator(".text")).to_have_text("Report sent to the client")
    expect(newest).to_be_focused()  # also once the list was read again and shown
    expect(newest).to_have_attribute("tabindex", "-1")  # focusable by script, not a Tab stop


def test_edit_moves_focus_back_to_the_items_edit_button(browser_page, sandbox, celery_eager):
    result_id = sandbox.add_result(TASK, author_id=ANNA, text="Draft of the report")
    frame = open_screen(browser_page, sandbox)
    item = result_item(frame, result_id)

    item.get_by_role("button", name="Edit", exact=True).click()
    item.get_by_label("Result text", exact=True).fill("Final report, sent")
    item.get_by_role("button", name="Save", exact=True).press("Enter")

    expect(item.locator("[data-change-label]")).to_have_text("Saved")
    expect(item.locator(".text")).to_have_text("Final report, sent")
    expect(item.get_by_role("button", name="Edit", exact=True)).to_be_focused()


def test_delete_moves_focus_to_the_next_result_then_to_the_list_heading(
    browser_page, sandbox, celery_eager
):
    older = sandbox.add_result(TASK, author_id=ANNA, text="The older one")
    newer = sandbox.add_result(TASK, author_id=ANNA, text="The newer one")
    frame = open_screen(browser_page, sandbox)
    expect(frame.locator("li.result .text")).to_have_text(["The newer one", "The older one"])

    item = result_item(frame, newer)
    item.get_by_role("button", name="Delete", exact=True).click()
    item.locator("form.confirm-delete").get_by_role("button", name="Delete", exact=True).click()
    expect(item).to_have_count(0)
    expect(result_item(frame, older)).to_be_focused()

    item = result_item(frame, older)
    item.get_by_role("button", name="Delete", exact=True).click()
    item.locator("form.confirm-delete").get_by_role("button", name="Delete", exact=True).click()
    expect(item).to_have_count(0)
    expect(frame.locator("#results h1")).to_be_focused()
    assert sandbox.results(TASK) == []


# --- what assistive technology is told ---------------------------------------------------------


def test_toggles_say_whether_their_form_is_open_and_point_only_at_forms_that_exist(
    browser_page, sandbox, celery_eager
):
    result_id = sandbox.add_result(TASK, author_id=ANNA, text="Worth keeping")
    frame = open_screen(browser_page, sandbox)
    item = result_item(frame, result_id)
    # By attribute: while its form is open the Edit and Delete buttons are hidden.
    edit, delete = item.locator("[data-action='edit']"), item.locator("[data-action='delete']")

    for button in (edit, delete):
        expect(button).to_have_attribute("aria-expanded", "false")
        assert button.get_attribute("aria-controls") is None  # its form is not made yet

    for button, form in ((edit, "form.editor"), (delete, "form.confirm-delete")):
        button.click()
        expect(button).to_have_attribute("aria-expanded", "true")
        controls = button.get_attribute("aria-controls")
        expect(item.locator(form)).to_have_attribute("id", controls)
        item.locator(form).get_by_role("button", name="Cancel", exact=True).click()
        expect(button).to_have_attribute("aria-expanded", "false")
        expect(frame.locator(f"#{controls}")).to_have_count(1)  # still there for aria-controls


def test_one_live_region_announces_a_change(browser_page, sandbox, celery_eager):
    frame = open_screen(browser_page, sandbox)

    add_box(frame).fill("Announced once")
    frame.get_by_role("button", name="Add result", exact=True).click()
    expect(frame.locator("li.result").first.locator("[data-change-label]")).to_have_text("Saved")

    expect(frame.locator("[aria-live]")).to_have_count(1)
    expect(frame.locator("#announcer")).not_to_be_empty()
    expect(frame.locator("#results li [role=status], #results li [aria-live]")).to_have_count(0)


# --- polling -----------------------------------------------------------------------------------


def queued_forever(page):
    """Every poll of the changes is answered "still queued"; returns the times (in the page's
    fake clock, ms) each poll was asked at."""
    asked = []

    def answer(route, request):
        ids = [int(i) for i in request.url.split("ids=")[1].split(",")]
        asked.append(page.evaluate("Date.now()"))
        body = {"changes": [{"id": i, "state": "queued", "action": "add"} for i in ids]}
        route.fulfill(status=200, content_type="application/json", body=json.dumps(body))

    page.route(CHANGES, answer)
    return asked


def add_a_queued_result(page, sandbox):
    """The screen on a paused fake clock, with one add Bitrix24 answered busy (Queued)."""
    page.clock.install()
    frame = open_screen(page, sandbox)
    page.clock.pause_at(page.evaluate("Date.now()") + 1000)
    sandbox.fail_next(count=1, error="QUERY_LIMIT_EXCEEDED", method="tasks.task.result.add")
    add_box(frame).fill("Sent while Bitrix24 was busy")
    frame.get_by_role("button", name="Add result", exact=True).click()
    expect(frame.locator("li.result").first.locator("[data-change-label]")).to_have_text("Queued")
    return frame


def advance(page, ms, asked, step=250):
    """Run the fake clock ms forward in steps, letting each poll's request and answer through
    (a few real milliseconds a step: the network and the app are on real time)."""
    for _ in range(ms // step):
        before = len(asked)
        page.clock.run_for(step)
        page.wait_for_timeout(15)
        if len(asked) > before:
            page.wait_for_timeout(60)  # the answer is read and the next poll scheduled


def polls_reach(page, asked, count):
    """The number of polls once those already sent have been seen (up to 2 s of real time)."""
    for _ in range(100):
        if len(asked) >= count:
            break
        page.wait_for_timeout(20)
    return len(asked)


def test_polling_backs_off_from_1_5_s_doubling_up_to_30_s(browser_page, sandbox, celery_eager):
    asked = queued_forever(browser_page)
    add_a_queued_result(browser_page, sandbox)
    start = browser_page.evaluate("Date.now()")

    advance(browser_page, 1250, asked)
    assert asked == []  # not before 1.5 s
    advance(browser_page, 1500 + 3000 + 6000 + 12000 + 24000 + 30000 + 30000 + 1000, asked)

    polls_reach(browser_page, asked, 7)
    gaps = [b - a for a, b in zip([start, *asked], asked, strict=False)]
    assert len(gaps) == 7, gaps
    for gap, expected in zip(gaps, [1500, 3000, 6000, 12000, 24000, 30000, 30000], strict=True):
        assert expected <= gap <= expected + 600, gaps


def set_visibility(frame, state):
    """What the tab would be if the person switched away from it (or back): the frame's document
    says so and fires visibilitychange."""
    frame.evaluate(
        """state => {
          const prop = (name, value) =>
            Object.defineProperty(document, name, {configurable: true, get: () => value});
          prop("visibilityState", state);
          prop("hidden", state === "hidden");
          document.dispatchEvent(new Event("visibilitychange"));
        }""",
        state,
    )


def test_polling_pauses_while_the_tab_is_hidden_and_resumes_when_shown(
    browser_page, sandbox, celery_eager
):
    asked = queued_forever(browser_page)
    frame = add_a_queued_result(browser_page, sandbox)
    advance(browser_page, 1750, asked)
    assert polls_reach(browser_page, asked, 1) == 1

    set_visibility(frame, "hidden")
    advance(browser_page, 120_000, asked, step=1000)
    assert len(asked) == 1  # nothing asked in two minutes hidden

    with browser_page.expect_request(CHANGES):
        set_visibility(frame, "visible")
    assert polls_reach(browser_page, asked, 2) == 2  # shown again: asked at once
    browser_page.wait_for_timeout(60)
    advance(browser_page, 3250, asked)
    assert polls_reach(browser_page, asked, 3) == 3  # and backing off from the start again


def test_polling_stops_when_nothing_is_queued(browser_page, sandbox, celery_eager):
    asked = []
    browser_page.on("request", lambda r: asked.append(r.url) if CHANGES.search(r.url) else None)
    frame = add_a_queued_result(browser_page, sandbox)
    label = frame.locator("li.result").first.locator("[data-change-label]")

    for _ in range(60):  # the screen's polls deliver the change (inline mode)
        advance(browser_page, 30_000, asked, step=500)
        if label.text_content() == "Saved":
            break
    expect(label).to_have_text("Saved")
    polls = len(asked)
    assert polls >= 1

    advance(browser_page, 300_000, asked, step=5000)
    assert len(asked) == polls  # five more minutes and not one poll


# --- the task picker ---------------------------------------------------------------------------


def open_picker(page, sandbox, *, as_user=ANNA):
    """The app opened from the portal's applications menu (DEFAULT placement): the task picker."""
    page.goto(f"{sandbox.url}/marketplace/app/?as={as_user}")
    frame = page.wait_for_selector("iframe").content_frame()
    frame.wait_for_selector("main[data-screen='results'] form.picker")
    frame.wait_for_load_state("load")
    return frame


def test_task_picker_shows_the_list_and_puts_focus_on_its_heading(
    browser_page, sandbox, celery_eager
):
    sandbox.add_result(TASK, author_id=ANNA, text="Picked")
    frame = open_picker(browser_page, sandbox)

    frame.get_by_label("Task number").fill(str(TASK))
    frame.get_by_role("button", name="Show results").click()

    expect(frame.locator("#results li.result .text")).to_have_text(["Picked"])
    expect(frame.locator("#results h1")).to_be_focused()


def test_task_picker_shows_an_error_when_the_app_cannot_answer(browser_page, sandbox, celery_eager):
    page_errors = []
    browser_page.on("pageerror", lambda e: page_errors.append(e))
    frame = open_picker(browser_page, sandbox)
    browser_page.route(
        re.compile(r"/b24/app/task/\?task="),
        lambda route: route.fulfill(status=502, content_type="text/html", body="<h1>Bad gateway"),
    )

    frame.get_by_label("Task number").fill(str(TASK))
    frame.get_by_role("button", name="Show results").click()

    expect(frame.get_by_role("alert")).to_have_text("Something went wrong. Try again.")
    expect(frame.get_by_role("button", name="Show results")).to_be_enabled()
    assert page_errors == []  # nothing thrown


# --- axe-core ----------------------------------------------------------------------------------


def serious_violations(frame):
    results = Axe().run(frame)
    return [
        {
            "id": v["id"],
            "impact": v["impact"],
            "help": v["help"],
            "nodes": [n["target"] for n in v["nodes"]],
        }
        for v in results.response["violations"]
        if v["impact"] in ("serious", "critical")
    ]


def test_axe_finds_nothing_serious_on_the_screen(browser_page, sandbox, celery_eager):
    result_id = sandbox.add_result(TASK, author_id=ANNA, text="Draft of the report")
    frame = open_screen(browser_page, sandbox)
    assert serious_violations(frame) == []

    result_item(frame, result_id).get_by_role("button", name="Edit", exact=True).click()
    expect(result_item(frame, result_id).locator("form.editor")).to_be_visible()
    assert serious_violations(frame) == []

    add_box(frame).fill("")
    frame.get_by_role("button", name="Add result", exact=True).click()
    expect(frame.get_by_role("alert")).to_be_visible()
    assert serious_violations(frame) == []


def test_axe_finds_nothing_serious_on_the_task_picker(browser_page, sandbox, celery_eager):
    frame = open_picker(browser_page, sandbox)
    assert serious_violations(frame) == []


def test_axe_finds_nothing_serious_on_the_russian_screen(browser_page, sandbox, celery_eager):
    result_id = sandbox.add_result(TASK, author_id=ANNA, text="Отчёт готов")
    frame = open_screen(browser_page, sandbox, lang="ru")
    result_item(frame, result_id).locator("[data-action='delete']").click()
    expect(result_item(frame, result_id).locator("form.confirm-delete")).to_be_visible()
    assert serious_violations(frame) == []


def test_axe_finds_nothing_serious_on_the_refusal_page(browser_page, live_server):
    browser_page.route(
        f"{live_server.url}/b24/app/",
        lambda route: route.continue_(
            method="POST",
            post_data="PLACEMENT=TASK_VIEW_TAB",
            headers={"content-type": "application/x-www-form-urlencoded"},
        ),
    )
    browser_page.goto(f"{live_server.url}/b24/app/")
    expect(browser_page.locator("main[data-screen='refused']")).to_be_visible()
    assert serious_violations(browser_page) == []


def test_axe_finds_nothing_serious_on_the_install_page(browser_page, new_sandbox):
    new_sandbox.mark_installed()
    browser_page.goto(f"{new_sandbox.url}/marketplace/install/?as={ANNA}")
    frame = browser_page.wait_for_selector("#b24-app-frame").content_frame()
    expect(frame.locator("[data-install-status]")).to_contain_text("already installed")
    assert serious_violations(frame) == []
