"""Browser tests: Debian's Chromium driven by Playwright, the app on one site (localhost) and the
fake portal on another (127.0.0.1), every Cookie header stripped as a browser blocking
third-party cookies would."""

from __future__ import annotations

import os

import pytest

from tests.conftest import CHROMIUM

# Playwright's sync API runs an event loop in the test thread; Django's ORM calls made by the
# test itself (set-up and assertions) are still synchronous and safe.
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def chromium():
    if not os.path.exists(CHROMIUM):
        pytest.fail("needs Debian's Chromium") if os.environ.get("CI") else pytest.skip(
            "needs Debian's Chromium: apt-get install -y chromium"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def browser_page(chromium):
    """A fresh browser context whose requests never carry a Cookie header."""
    context = chromium.new_context(viewport={"width": 1200, "height": 900})
    stripped: list[str] = []

    def strip_cookies(route, request):
        headers = {k: v for k, v in request.headers.items() if k.lower() != "cookie"}
        if len(headers) != len(request.headers):
            stripped.append(request.url)
        route.continue_(headers=headers)

    context.route("**/*", strip_cookies)
    page = context.new_page()
    page.stripped_cookie_urls = stripped
    try:
        yield page
    finally:
        context.close()


@pytest.fixture
def sandbox(live_server, fake, settings):
    """The fake portal set up like `make run`'s sandbox, with the app served by `live_server`."""
    # live_server serves /static/ through Django's finders, which know no hashed names.
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }
    settings.B24_APP_URL = live_server.url
    fake.app_url = live_server.url
    portal = fake.add_portal()
    portal.add_user(name="Anna", last_name="Smirnova", admin=True)
    portal.add_user(name="Boris", last_name="Petrov", admin=False)
    portal.add_task(title="Prepare the quarterly report")
    portal.bind_placement("TASK_VIEW_TAB", f"{live_server.url}/b24/app/", title="Results")
    portal.mark_installed()
    return portal
