"""The install wizard as an admin meets it: the fake portal's installer frame loads
`POST /b24/install/`, and the page finishes the install only when the portal says it is
installing (getInitData's INSTALL, as b24jssdk's isInstallMode), in the frame's language."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

ANNA = 1  # the sandbox's admin
TEXTS = {
    "en": {
        "heading": "Task results is installed",
        "installed": "The app was already installed in this Bitrix24: there is nothing to finish.",
        "no-answer": "Bitrix24 did not answer; reload the page to finish the installation.",
        "outside": "Open this page from Bitrix24 to finish the installation.",
    },
    "ru": {
        "heading": "Приложение «Результаты задачи» установлено",
        "installed": "Приложение уже было установлено в этом Битрикс24: завершать нечего.",
        "no-answer": "Битрикс24 не ответил; перезагрузите страницу, чтобы завершить установку.",
        "outside": "Откройте эту страницу из Битрикс24, чтобы завершить установку.",
    },
}
NO_ANSWER_WAIT_MS = 30_000
"""The page gives up on the portal after 10 s (b24frame.js); wait well past that."""


def install_posts(page, live_server):
    """The installer POSTs the page (and its frames) send to the app, as they are sent."""
    posts = []
    page.on(
        "request",
        lambda r: (
            posts.append(r.url)
            if r.method == "POST" and r.url.startswith(f"{live_server.url}/b24/install/")
            else None
        ),
    )
    return posts


def messages(page, command=None):
    """The frame messages the portal page accepted (of one command)."""
    found = page.evaluate("window.__fakeB24Messages")
    return [m for m in found if command is None or m["command"] == command]


def install_finish_calls(portal):
    return [r for r in portal.requests if r["path"].startswith("/_fake/install_finish")]


def test_install_in_the_portal_finishes_once_and_opens_the_app(
    browser_page, new_sandbox, live_server
):
    from b24app.portals.models import Portal

    page = browser_page
    posts = install_posts(page, live_server)
    page.goto(f"{new_sandbox.url}/marketplace/app/?as={ANNA}")

    # installFinish made the portal reload into the app: the DEFAULT placement's screen.
    expect(page.locator("#b24-app-title")).to_have_text("Application", timeout=30_000)
    frame = page.frame_locator("#b24-app-frame")
    expect(frame.locator("main[data-screen='results']")).to_be_visible()
    assert new_sandbox.installed is True
    assert len(install_finish_calls(new_sandbox)) == 1
    assert len(posts) == 1  # the installer ran once, the app page came after
    binding = new_sandbox.placement_binding("TASK_VIEW_TAB")
    assert binding is not None and binding.handler == f"{live_server.url}/b24/app/"
    assert Portal.objects.get(member_id=new_sandbox.member_id).state == Portal.State.ACTIVE


@pytest.mark.parametrize("lang", ["en", "ru"])
def test_install_page_after_the_install_says_so_and_finishes_nothing(
    browser_page, new_sandbox, lang
):
    new_sandbox.mark_installed()  # the app was installed before; an admin opens the installer
    page = browser_page
    page.goto(f"{new_sandbox.url}/marketplace/install/?as={ANNA}&lang={lang}")

    frame = page.frame_locator("#b24-app-frame")
    expect(frame.locator("[data-install-status]")).to_have_text(TEXTS[lang]["installed"])
    expect(frame.locator("h1")).to_have_text(TEXTS[lang]["heading"])
    expect(frame.locator("html")).to_have_attribute("lang", lang)
    assert len(messages(page, "getInitData")) == 1
    assert messages(page, "setInstallFinish") == []
    assert page.evaluate("window.__fakeB24Ignored") == []
    assert install_finish_calls(new_sandbox) == []


@pytest.mark.parametrize("silent", ["getInitData", "setInstallFinish"])
def test_install_page_when_the_portal_does_not_answer_says_to_reload(
    browser_page, new_sandbox, silent
):
    new_sandbox.unanswered_commands = {silent}
    page = browser_page
    page.goto(f"{new_sandbox.url}/marketplace/app/?as={ANNA}&lang=ru")

    frame = page.frame_locator("#b24-app-frame")
    expect(frame.locator("[data-install-status]")).to_have_text(
        TEXTS["ru"]["no-answer"], timeout=NO_ANSWER_WAIT_MS
    )
    assert new_sandbox.installed is False
    sent = [m["command"] for m in messages(page)]
    if silent == "getInitData":
        assert sent == ["getInitData"]  # nothing is finished without knowing the mode
    else:
        assert sent == ["getInitData", "setInstallFinish"]


def test_install_page_outside_the_portal_frame_says_where_to_open_it(
    browser_page, new_sandbox, live_server
):
    """The installer POST, sent by a page of its own instead of from the portal's frame."""
    url, fields = new_sandbox.install_post(ANNA, lang="ru")
    page = browser_page
    page.goto(f"{new_sandbox.url}/")  # any page: it only hosts the form below
    page.evaluate(
        """([url, fields]) => {
          const form = document.createElement("form");
          form.method = "post";
          form.action = url;
          for (const [name, value] of Object.entries(fields)) {
            const input = document.createElement("input");
            input.type = "hidden"; input.name = name; input.value = value;
            form.appendChild(input);
          }
          document.body.appendChild(form);
          form.submit();
        }""",
        [url, fields],
    )
    expect(page.locator("[data-install-status]")).to_have_text(TEXTS["ru"]["outside"])
    assert page.url.startswith(f"{live_server.url}/b24/install/")
