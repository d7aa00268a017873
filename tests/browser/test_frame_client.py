"""The app's frame client (results/static/results/b24frame.js) against a portal page that names
its frame the way Bitrix24 may: with a default port in DOMAIN ("host:443|1|sid").

The portal and the app are pages Playwright serves itself (`page.route`), so each can have any
origin, a default port included, which no loopback server of the suite could: the portal page
answers the frame's messages as a Bitrix24 parent does (§8.3), and the frame runs the real
b24frame.js from the app's static files.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from django.contrib.staticfiles import finders

pytestmark = pytest.mark.browser

APP = "https://app.example.test"
FRAME_JS = Path(finders.find("results/b24frame.js")).read_text(encoding="utf-8")

# A Bitrix24 parent in miniature: answers "<command>:<params>:<key>:<APP_SID>" with
# "<key>:<JSON>" to the frame, for our APP_SID only.
PORTAL_PAGE = """<!DOCTYPE html><html><body>
<iframe id="app" name="{name}" src="{app}/frame/"></iframe>
<script>
window.addEventListener("message", function (event) {{
  var parts = String(event.data).split(":");
  if (parts.length < 3 || parts[parts.length - 1] !== "sid0123") return;
  var key = parts[parts.length - 2];
  event.source.postMessage(key + ":" + JSON.stringify({{command: parts[0], answered: true}}),
                           event.origin);
}});
</script></body></html>"""
APP_PAGE = f"""<!DOCTYPE html><html><body><p>app</p>
<script src="{APP}/static/results/b24frame.js"></script></body></html>"""


def _fulfill(body: str, content_type: str = "text/html"):
    return lambda route: route.fulfill(status=200, body=body, content_type=content_type)


def _serve_app(page) -> None:
    page.route(f"{APP}/frame/", _fulfill(APP_PAGE))
    page.route(f"{APP}/static/results/b24frame.js", _fulfill(FRAME_JS, "text/javascript"))


def _serve(page, portal_url: str, frame_name: str) -> None:
    page.route(portal_url, _fulfill(PORTAL_PAGE.format(name=frame_name, app=APP)))
    _serve_app(page)


@pytest.mark.parametrize(
    "frame_name, portal_url",
    [
        # b24jssdk's AppFrame drops a default port (packages/jssdk/src/frame/frame.ts) ...
        ("portal.example.test:443|1|sid0123", "https://portal.example.test/"),
        ("portal.example.test:80|0|sid0123", "http://portal.example.test/"),
        # ... and keeps any other port, or none
        ("portal.example.test:8443|1|sid0123", "https://portal.example.test:8443/"),
        ("portal.example.test:8080|0|sid0123", "http://portal.example.test:8080/"),
        ("portal.example.test|1|sid0123", "https://portal.example.test/"),
    ],
    ids=["https-443", "http-80", "https-8443", "http-8080", "no-port"],
)
def test_frame_client_talks_to_the_portal_origin_without_its_default_port(
    browser_page, frame_name, portal_url
):
    page = browser_page
    _serve(page, portal_url, frame_name)
    page.goto(portal_url)
    frame = page.frame(name=frame_name)
    assert frame is not None
    frame.wait_for_function("() => window.B24Frame !== undefined")

    expected = portal_url.rstrip("/")  # what the browser itself says the portal's origin is
    assert page.evaluate("window.location.origin") == expected
    assert frame.evaluate("window.B24Frame.origin") == expected
    # The portal's answer is accepted: it comes from exactly that origin.
    answer = frame.evaluate("window.B24Frame.send('getInitData')")
    assert answer == {"command": "getInitData", "answered": True}


def test_frame_client_outside_a_frame_has_no_origin(browser_page):
    page = browser_page
    _serve_app(page)
    page.goto(f"{APP}/frame/")
    page.wait_for_function("() => window.B24Frame !== undefined")
    assert page.evaluate("[window.B24Frame.available, window.B24Frame.origin]") == [False, None]
