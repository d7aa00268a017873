"""Frame POSTs (§3.2, §3.3), the portal's HTML pages and the parent-frame JS (§8.3)."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from .support import TIMEOUT, classic, refresh

FRAME_FIELDS = [
    "AUTH_ID",
    "AUTH_EXPIRES",
    "REFRESH_ID",
    "SERVER_ENDPOINT",
    "APPLICATION_TOKEN",
    "APPLICATION_SCOPE",
    "member_id",
    "status",
    "PLACEMENT",
    "PLACEMENT_OPTIONS",
]


def test_frame_post_is_the_documented_request(fake, portal, catcher):
    url, fields = portal.frame_post(2, placement="TASK_VIEW_TAB", options={"taskId": 1}, lang="ru")
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == catcher.url + "/b24/app/"
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert list(query) == ["DOMAIN", "PROTOCOL", "LANG", "APP_SID"]
    assert query["DOMAIN"] == portal.domain and query["PROTOCOL"] == "0" and query["LANG"] == "ru"
    assert re.fullmatch(r"[0-9a-f]{32}", query["APP_SID"])
    assert list(fields) == FRAME_FIELDS
    assert all(isinstance(v, str) for v in fields.values())
    assert fields["AUTH_EXPIRES"] == "3600" and fields["PLACEMENT"] == "TASK_VIEW_TAB"
    assert fields["SERVER_ENDPOINT"] == fake.oauth_url + "/rest/"
    assert fields["APPLICATION_TOKEN"] == portal.application_token
    assert fields["APPLICATION_SCOPE"] == portal.scopes and fields["member_id"] == portal.member_id
    assert fields["status"] == "F"
    assert fields["PLACEMENT_OPTIONS"] == (
        '{"taskId":"1","URI":"\\/company\\/personal\\/user\\/2\\/tasks\\/task\\/view\\/1\\/"}'
    )
    # the tokens belong to the user who opened the frame
    assert classic(portal, "profile", fields["AUTH_ID"]).json()["result"]["ID"] == "2"
    assert refresh(fake, fields["REFRESH_ID"]).json()["user_id"] == 2
    # a new APP_SID for every render
    assert portal.frame_post(2)[0] != url


def test_frame_post_uses_the_bound_handler_and_placement_keys(portal):
    portal.bind_placement("TASK_LIST_CONTEXT_MENU", "http://127.0.0.1:1/menu/?x=1", title="Results")
    url, fields = portal.frame_post(1, placement="TASK_LIST_CONTEXT_MENU", options={"ID": 7})
    assert url.startswith("http://127.0.0.1:1/menu/?x=1&DOMAIN=")
    assert json.loads(fields["PLACEMENT_OPTIONS"]) == {
        "ID": "7",
        "URI": "/company/personal/user/1/tasks/",
    }


def test_install_post_targets_the_installer_url(portal, catcher):
    url, fields = portal.install_post(1)
    assert url.startswith(catcher.url + "/b24/install/?DOMAIN=")
    assert fields["PLACEMENT"] == "DEFAULT" and list(fields) == FRAME_FIELDS
    assert json.loads(fields["PLACEMENT_OPTIONS"]) == {"URI": "/marketplace/install/"}


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.iframes, self.forms, self.inputs, self.scripts = [], [], {}, []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "iframe":
            self.iframes.append(attrs)
        elif tag == "form":
            self.forms.append(attrs)
        elif tag == "input" and attrs.get("type") == "hidden":
            self.inputs[attrs["name"]] = attrs["value"]
        elif tag == "script":
            self._in_script = True
            self.scripts.append("")

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1] += data


def parse(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    return page


def test_task_page_embeds_the_app_with_the_frame_post(fake, portal, catcher):
    portal.mark_installed()
    portal.bind_placement("TASK_VIEW_TAB", catcher.url + "/b24/app/", title="Task results")
    resp = requests.get(
        portal.url + "/company/personal/user/1/tasks/task/view/1/?as=2", timeout=TIMEOUT
    )
    assert resp.status_code == 200
    page = parse(resp.text)
    (iframe,) = page.iframes
    domain, protocol, app_sid = iframe["name"].split("|")
    assert (domain, protocol) == (portal.domain, "0") and re.fullmatch(r"[0-9a-f]{32}", app_sid)
    (form,) = page.forms
    assert form["method"] == "post" and form["target"] == iframe["name"]
    action = urlsplit(form["action"])
    assert f"{action.scheme}://{action.netloc}{action.path}" == catcher.url + "/b24/app/"
    assert parse_qs(action.query)["APP_SID"] == [app_sid]
    assert list(page.inputs) == FRAME_FIELDS
    assert page.inputs["PLACEMENT"] == "TASK_VIEW_TAB"
    assert json.loads(page.inputs["PLACEMENT_OPTIONS"])["taskId"] == "1"
    assert classic(portal, "profile", page.inputs["AUTH_ID"]).json()["result"]["ID"] == "2"
    assert "Task results" in resp.text and "Prepare the report" in resp.text
    config = json.loads(next(s for s in page.scripts if '"appOrigin"' in s))
    assert config == {
        "appOrigin": catcher.url,
        "appSid": app_sid,
        "placement": "TASK_VIEW_TAB",
        "installMode": False,
        "unanswered": [],
    }
    assert any('addEventListener("message"' in s for s in page.scripts)
    assert "?as=1" in resp.text and "?as=2" in resp.text  # the user switcher


def test_task_page_default_tab_and_not_installed(portal):
    resp = requests.get(portal.url + "/company/personal/user/1/tasks/task/view/1/", timeout=TIMEOUT)
    assert parse(resp.text).iframes == [] and "not fully installed" in resp.text
    portal.mark_installed()
    resp = requests.get(portal.url + "/company/personal/user/1/tasks/task/view/1/", timeout=TIMEOUT)
    page = parse(resp.text)
    assert len(page.iframes) == 1 and ">Results<" in resp.text
    missing = requests.get(
        portal.url + "/company/personal/user/1/tasks/task/view/99/", timeout=TIMEOUT
    )
    assert missing.status_code == 404


def test_marketplace_pages(portal, catcher):
    app = requests.get(portal.url + "/marketplace/app/?as=1", timeout=TIMEOUT).text
    assert "/b24/install/?DOMAIN=" in app  # admins get the installer until installFinish
    assert parse(app).inputs["PLACEMENT"] == "DEFAULT"
    assert (
        "not fully installed"
        in requests.get(portal.url + "/marketplace/app/?as=2", timeout=TIMEOUT).text
    )
    portal.mark_installed()
    app = requests.get(portal.url + "/marketplace/app/?as=2", timeout=TIMEOUT).text
    assert "/b24/app/?DOMAIN=" in app and parse(app).inputs["PLACEMENT"] == "DEFAULT"
    installer = requests.get(portal.url + "/marketplace/install/?as=1", timeout=TIMEOUT).text
    assert "/b24/install/?DOMAIN=" in installer


def test_fake_endpoints_behind_the_parent_js(fake, portal):
    _, _, session = portal.build_frame(2, "TASK_VIEW_TAB", {"taskId": "1"})
    sid = session.app_sid
    init = requests.post(
        portal.url + "/_fake/init_data", params={"sid": sid}, timeout=TIMEOUT
    ).json()
    assert set(init) == {
        "DOMAIN",
        "PROTOCOL",
        "PATH",
        "LANG",
        "MEMBER_ID",
        "IS_ADMIN",
        "APP_OPTIONS",
        "USER_OPTIONS",
        "PLACEMENT",
        "PLACEMENT_OPTIONS",
        "INSTALL",
        "FIRST_RUN",
        "AUTH_ID",
        "REFRESH_ID",
        "AUTH_EXPIRES",
    }
    assert (
        init["IS_ADMIN"] is False
        and init["INSTALL"] is True
        and init["MEMBER_ID"] == portal.member_id
    )
    assert init["PLACEMENT_OPTIONS"]["taskId"] == "1"
    assert classic(portal, "profile", init["AUTH_ID"]).json()["result"]["ID"] == "2"
    auth = requests.post(
        portal.url + "/_fake/refresh_auth", params={"as": 1}, timeout=TIMEOUT
    ).json()
    assert set(auth) == {"AUTH_ID", "REFRESH_ID", "AUTH_EXPIRES"}
    assert classic(portal, "profile", auth["AUTH_ID"]).json()["result"]["ID"] == "1"
    resp = requests.post(portal.url + "/_fake/install_finish", params={"sid": sid}, timeout=TIMEOUT)
    assert resp.status_code == 403 and portal.installed is False  # Boris is no admin
    _, _, admin_session = portal.build_frame(1, "DEFAULT", {})
    requests.post(
        portal.url + "/_fake/install_finish", params={"sid": admin_session.app_sid}, timeout=TIMEOUT
    )
    assert portal.installed is True
    assert (
        requests.post(
            portal.url + "/_fake/init_data", params={"sid": "nope"}, timeout=TIMEOUT
        ).status_code
        == 404
    )


# ---- in a real browser

APP_PAGE = """<!DOCTYPE html><html><body><p>fake app</p><script>
var parts = window.name.split("|");
var origin = (parts[1] === "1" ? "https://" : "http://") + parts[0];
var sid = parts[2];
window.__replies = [];
window.addEventListener("message", function (e) {
  if (e.origin === origin) { window.__replies.push(e.data); }
});
parent.postMessage("getInitData:cb1:" + sid, origin);
parent.postMessage('resizeWindow:{"width":"100%","height":321}:cb2:' + sid, origin);
parent.postMessage('setTitle:{"title":"Results: mine"}:cb3:' + sid, origin);
parent.postMessage("getInitData:cbX:0123456789abcdef0123456789abcdef", origin);
parent.postMessage("refreshAuth:cb4:" + sid, origin);
parent.postMessage("openPath:{}:cb5:" + sid, origin);
</script></body></html>"""

INSTALLER_PAGE = """<!DOCTYPE html><html><body><p>installer</p><script>
var parts = window.name.split("|");
parent.postMessage("setInstallFinish:cb1:" + parts[2], "http://" + parts[0]);
</script></body></html>"""


@pytest.mark.browser
def test_parent_frame_protocol_in_a_browser(portal, catcher, browser_page):
    catcher.routes["/b24/app/"] = (200, APP_PAGE, "text/html")
    portal.mark_installed()
    page = browser_page
    page.goto(portal.url + "/company/personal/user/1/tasks/task/view/1/?as=2")
    frame = page.frame_locator("#b24-app-frame")
    frame.locator("text=fake app").wait_for()
    app_frame = next(f for f in page.frames if f.url.startswith(catcher.url))
    app_frame.wait_for_function("window.__replies.length >= 4", timeout=5000)
    replies = {
        r.split(":", 1)[0]: r.split(":", 1)[1] for r in app_frame.evaluate("window.__replies")
    }
    assert set(replies) == {"cb1", "cb2", "cb3", "cb4"}  # no answer to a wrong APP_SID or openPath
    init = json.loads(replies["cb1"])
    assert init["PLACEMENT"] == "TASK_VIEW_TAB" and init["PLACEMENT_OPTIONS"]["taskId"] == "1"
    assert (
        init["DOMAIN"] == portal.domain and init["IS_ADMIN"] is False and init["INSTALL"] is False
    )
    assert classic(portal, "profile", init["AUTH_ID"]).json()["result"]["ID"] == "2"
    assert (
        classic(portal, "profile", json.loads(replies["cb4"])["AUTH_ID"]).json()["result"]["ID"]
        == "2"
    )
    messages = page.evaluate("window.__fakeB24Messages")
    assert [m["command"] for m in messages] == [
        "getInitData",
        "resizeWindow",
        "setTitle",
        "refreshAuth",
        "openPath",
    ]
    assert messages[2]["params"] == {"title": "Results: mine"} and messages[4]["handled"] is False
    assert [r["reason"] for r in page.evaluate("window.__fakeB24Rejected")] == ["app_sid"]
    assert page.evaluate("document.getElementById('b24-app-frame').style.height") == "321px"
    assert page.title() == "Results: mine"
    # the frame really got the §3.2 POST
    (post,) = catcher.posts("/b24/app/")
    assert (
        "APP_SID=" in post["query"]
        and b"AUTH_ID=" in post["body"]
        and b"PLACEMENT=TASK_VIEW_TAB" in post["body"]
    )


@pytest.mark.browser
def test_install_finish_from_the_installer_frame(portal, catcher, browser_page):
    catcher.routes["/b24/install/"] = (200, INSTALLER_PAGE, "text/html")
    catcher.routes["/b24/app/"] = (200, "<p>the app</p>", "text/html")
    page = browser_page
    page.goto(portal.url + "/marketplace/app/?as=1")
    page.frame_locator("#b24-app-frame").locator("text=the app").wait_for(timeout=5000)
    assert portal.installed is True
    assert len(catcher.posts("/b24/install/")) == 1 and len(catcher.posts("/b24/app/")) == 1


@pytest.mark.browser
def test_install_finish_outside_the_install_phase_is_recorded_and_ignored(
    portal, catcher, browser_page
):
    catcher.routes["/b24/install/"] = (200, INSTALLER_PAGE, "text/html")
    portal.mark_installed()
    page = browser_page
    page.goto(portal.url + "/marketplace/install/?as=1")
    page.frame_locator("#b24-app-frame").locator("text=installer").wait_for(timeout=5000)
    page.wait_for_function("window.__fakeB24Ignored.length >= 1", timeout=5000)
    assert page.evaluate("window.__fakeB24Ignored") == [
        {"command": "setInstallFinish", "reason": "not_install_mode"}
    ]
    assert [m["command"] for m in page.evaluate("window.__fakeB24Messages")] == ["setInstallFinish"]
    # Nothing happened: no install_finish call, no reload (the installer was posted once).
    assert [r for r in portal.requests if r["path"].startswith("/_fake/install_finish")] == []
    assert len(catcher.posts("/b24/install/")) == 1 and portal.installed is True


APP_ASKING_PAGE = """<!DOCTYPE html><html><body><p>asking app</p><script>
var parts = window.name.split("|");
var origin = "http://" + parts[0];
window.__replies = [];
window.addEventListener("message", function (e) {
  if (e.origin === origin) { window.__replies.push(e.data); }
});
parent.postMessage("getInitData:cb1:" + parts[2], origin);
parent.postMessage('resizeWindow:{"height":200}:cb2:' + parts[2], origin);
</script></body></html>"""


@pytest.mark.browser
def test_unanswered_commands_are_recorded_but_never_answered(portal, catcher, browser_page):
    catcher.routes["/b24/app/"] = (200, APP_ASKING_PAGE, "text/html")
    portal.mark_installed()
    portal.unanswered_commands = {"getInitData"}
    page = browser_page
    page.goto(portal.url + "/company/personal/user/1/tasks/task/view/1/?as=2")
    page.frame_locator("#b24-app-frame").locator("text=asking app").wait_for(timeout=5000)
    app_frame = next(f for f in page.frames if f.url.startswith(catcher.url))
    app_frame.wait_for_function("window.__replies.length >= 1", timeout=5000)
    page.wait_for_function("window.__fakeB24Messages.length >= 2", timeout=5000)
    messages = page.evaluate("window.__fakeB24Messages")
    assert [(m["command"], m["handled"]) for m in messages] == [
        ("getInitData", False),
        ("resizeWindow", True),
    ]
    assert [r.split(":", 1)[0] for r in app_frame.evaluate("window.__replies")] == ["cb2"]
    assert [r for r in portal.requests if r["path"].startswith("/_fake/init_data")] == []
