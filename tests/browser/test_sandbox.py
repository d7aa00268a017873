"""The sandbox: the app opens inside a simulated Bitrix24 task card, on another site."""

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_sandbox_task_page_shows_the_results_screen_in_its_frame(
    browser_page, sandbox, live_server
):
    page = browser_page
    page.goto(f"{sandbox.url}/company/personal/user/1/tasks/task/view/1/")
    frame_element = page.wait_for_selector("iframe")
    frame = frame_element.content_frame()
    frame.wait_for_selector("main[data-screen=results]")
    assert frame.get_by_role("button", name="Add result").is_visible()
    assert frame.url.startswith(f"{live_server.url}/b24/app/")
    assert "localhost" in live_server.url and "127.0.0.1" in sandbox.url  # two sites
    # The app asked the portal to fit the frame to its content, with the portal's protocol.
    page.wait_for_function(
        "() => (window.__fakeB24Messages || []).some(m => m.command === 'resizeWindow')"
    )
    app_requests = [r for r in sandbox.requests if r.get("path", "").startswith("/b24/")]
    assert app_requests == []  # the frame talks to the app, never through the portal
