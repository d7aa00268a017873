"""HTML pages of the fake portal, so a person or a browser test can use the app
"inside Bitrix24": a task card with the app's tab, the app's own page and the
installer page. Each embeds the app in an iframe loaded by an auto-submitted
POST form with the §3.2 fields, and runs the parent side of the frame
protocol (§8.3) in inline JS.

Same-origin helper endpoints used by that JS (not part of Bitrix24):
``POST /_fake/init_data?sid=``, ``POST /_fake/refresh_auth?sid=`` (or ``?as=<user id>``),
``POST /_fake/install_finish?sid=``.
"""

from __future__ import annotations

import json
import re
from html import escape
from urllib.parse import urlencode, urlsplit

from .server import Request, Response
from .state import ACCESS_TTL_S

TASK_VIEW_RE = re.compile(r"^/company/personal/user/(\d+)/tasks/task/view/(\d+)/?$")
TASK_LIST_RE = re.compile(r"^/company/personal/user/(\d+)/tasks/?$")

NOT_INSTALLED_TEXT = (
    "The application is not fully installed yet. Please contact your "
    "Bitrix24 administrator to complete the installation."
)

CSS = """
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.4 "Helvetica Neue", Arial, sans-serif;
       background: #eef2f4; color: #333; }
.b24-header { background: #2fc6f6; color: #fff; padding: 10px 20px;
              display: flex; align-items: center; gap: 20px; }
.b24-header .logo { font-weight: bold; font-size: 20px; }
.b24-header .logo span { color: #0b66c3; }
.b24-header .portal { opacity: .9; }
.b24-header .users { margin-left: auto; }
.b24-header .users a { color: #fff; margin-left: 10px; text-decoration: none;
                       padding: 2px 8px; border-radius: 10px; }
.b24-header .users a.current { background: rgba(255,255,255,.3); }
.b24-layout { display: flex; }
.b24-menu { width: 200px; background: #1f3b5c; min-height: calc(100vh - 44px); padding: 15px 0; }
.b24-menu a { display: block; color: #cfe1f3; padding: 8px 20px; text-decoration: none; }
.b24-menu a:hover { background: #2a4d75; }
.b24-main { flex: 1; padding: 20px; }
.b24-card { background: #fff; border-radius: 10px; padding: 20px;
            box-shadow: 0 1px 3px rgba(0,0,0,.08); }
.b24-card h1 { font-size: 22px; margin: 0 0 6px; font-weight: normal; }
.b24-meta { color: #828b95; margin-bottom: 14px; }
.b24-tabs { display: flex; gap: 4px; border-bottom: 1px solid #dfe3e8; margin: 16px 0 0; }
.b24-tab { padding: 8px 16px; color: #535c69; border-radius: 6px 6px 0 0; }
.b24-tab.active { background: #fff; border: 1px solid #dfe3e8; border-bottom-color: #fff;
                  margin-bottom: -1px; color: #0b66c3; }
.b24-tab-body { border: 1px solid #dfe3e8; border-top: 0; padding: 10px; background: #fff; }
.b24-app-frame { width: 100%; height: 400px; border: 0; display: block; }
.b24-notice { padding: 16px; background: #fff7d6; border: 1px solid #f3d77b; border-radius: 6px; }
.b24-fake-note { color: #a0a8b1; font-size: 12px; margin-top: 14px; }
table.b24-list { border-collapse: collapse; width: 100%; }
table.b24-list td, table.b24-list th { text-align: left; padding: 6px 10px;
                                       border-bottom: 1px solid #eef0f2; }
"""

# The parent side of the frame protocol (§8.3). Config comes from the JSON
# block #b24-fake-config. Messages are accepted only from the app's origin and
# from our iframe, and only with our APP_SID. Commands the page ignores on
# purpose (setInstallFinish outside the install phase) are also listed in
# window.__fakeB24Ignored; those in cfg.unanswered get no answer at all.
PARENT_JS = r"""
(function () {
  "use strict";
  var cfg = JSON.parse(document.getElementById("b24-fake-config").textContent);
  var frame = document.getElementById("b24-app-frame");
  window.__fakeB24Messages = [];
  window.__fakeB24Rejected = [];
  window.__fakeB24Ignored = [];
  window.__fakeB24Config = {appOrigin: cfg.appOrigin, appSid: cfg.appSid, placement: cfg.placement};

  function parseMessage(data) {
    if (data && typeof data === "object") {  // b24jssdk object form for "a:b" commands
      return {command: String(data.method || ""), params: data.params || null,
              callback: String(data.callback || ""), appSid: String(data.appSid || "")};
    }
    if (typeof data !== "string") { return null; }
    // "<command>:<JSON params or empty>:<callbackKey>:<APP_SID>"; b24jssdk drops
    // the empty params part, and params may contain ':' themselves.
    var parts = data.split(":");
    if (parts.length < 3) { return null; }
    var appSid = parts.pop();
    var callback = parts.pop();
    var command = parts.shift();
    var raw = parts.join(":");
    var params = null;
    if (raw) { try { params = JSON.parse(raw); } catch (e) { params = raw; } }
    return {command: command, params: params, callback: callback, appSid: appSid};
  }

  function reply(msg, data) {
    if (!msg.callback || !frame.contentWindow) { return; }
    var text = msg.callback + ":" + (data === undefined ? "" : JSON.stringify(data));
    frame.contentWindow.postMessage(text, cfg.appOrigin);
  }

  function post(path) {
    var url = path + "?" + "sid=" + encodeURIComponent(cfg.appSid);
    return fetch(url, {method: "POST", credentials: "same-origin"}).then(function (r) {
      if (!r.ok) { throw new Error("HTTP " + r.status); }
      return r.json();
    });
  }

  var handlers = {
    getInitData: function (msg) {
      post("/_fake/init_data").then(function (data) { reply(msg, data); });
    },
    refreshAuth: function (msg) {
      post("/_fake/refresh_auth").then(function (data) { reply(msg, data); });
    },
    resizeWindow: function (msg) {
      var p = (msg.params && typeof msg.params === "object") ? msg.params : {};
      var height = parseInt(p.height, 10);
      if (height > 0) { frame.style.height = height + "px"; }
      if (p.width === "100%" || p.width === undefined) {
        frame.style.width = "100%";
      } else {
        var width = parseInt(p.width, 10);
        frame.style.width = (width > 0 ? width : 100) + "px";
      }
      reply(msg, {});
    },
    setInstallFinish: function (msg) {
      if (!cfg.installMode) {  // BX24.installFinish does nothing outside the install phase (§1.3)
        window.__fakeB24Ignored.push({command: msg.command, reason: "not_install_mode"});
        reply(msg, {});
        return;
      }
      post("/_fake/install_finish").then(function () {
        reply(msg, {});
        window.location.reload();
      });
    },
    reloadWindow: function (msg) {
      reply(msg, {});
      window.location.reload();
    },
    setTitle: function (msg) {
      var title = (msg.params && msg.params.title) ? String(msg.params.title) : "";
      document.title = title;
      var el = document.getElementById("b24-app-title");
      if (el) { el.textContent = title; }
      reply(msg, {});
    }
  };

  window.addEventListener("message", function (event) {
    if (event.origin !== cfg.appOrigin || event.source !== frame.contentWindow) {
      window.__fakeB24Rejected.push({reason: "origin", origin: event.origin, data: event.data});
      return;
    }
    var msg = parseMessage(event.data);
    if (!msg) {
      window.__fakeB24Rejected.push({reason: "format", origin: event.origin, data: event.data});
      return;
    }
    if (msg.appSid !== cfg.appSid) {
      window.__fakeB24Rejected.push({reason: "app_sid", origin: event.origin, data: event.data});
      return;
    }
    var handler = handlers[msg.command];
    var unanswered = cfg.unanswered.indexOf(msg.command) >= 0;
    window.__fakeB24Messages.push({command: msg.command, params: msg.params,
                                   callback: msg.callback, appSid: msg.appSid,
                                   handled: !!handler && !unanswered});
    if (handler && !unanswered) { handler(msg); }
  });

  document.getElementById("b24-app-form").submit();
})();
"""


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _json_script(data) -> str:
    return json.dumps(data).replace("</", "<\\/")


def _viewer(portal, req: Request):
    value = req.query.get("as")
    if isinstance(value, str) and value.isdigit() and int(value) in portal.users:
        return portal.users[int(value)]
    return portal.users.get(1) or next(iter(portal.users.values()), None)


def _layout(portal, req: Request, viewer, title: str, body: str) -> str:
    links = []
    for user in portal.users.values():
        query = urlencode({"as": user.id})
        cls = "current" if viewer is not None and user.id == viewer.id else ""
        links.append(
            f'<a class="{cls}" href="{escape(req.path)}?{query}" data-user-id="{user.id}">'
            f"{escape(user.full_name)}{' (admin)' if user.admin else ''}</a>"
        )
    uid = viewer.id if viewer else 1
    state = "installed" if portal.installed else "not installed (installFinish not called)"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>
<style>{CSS}</style></head>
<body>
<div class="b24-header"><div class="logo">Bitrix<span>24</span></div>
<div class="portal">{escape(portal.domain)} &middot; fake portal</div>
<div class="users">View as: {"".join(links)}</div></div>
<div class="b24-layout">
<nav class="b24-menu">
<a href="/company/personal/user/{uid}/tasks/?as={uid}">Tasks</a>
<a href="/marketplace/app/?as={uid}">Application</a>
<a href="/marketplace/install/?as={uid}">Installer</a>
</nav>
<main class="b24-main">{body}
<div class="b24-fake-note">Fake Bitrix24 portal (member_id {escape(portal.member_id)})
for tests and the sandbox. App {state}.</div>
</main></div>
</body></html>"""


def _frame_html(
    portal, viewer, placement: str, options: dict, lang: str, handler: str, uri: str
) -> str:
    url, fields, session = portal.build_frame(viewer.id, placement, options, lang, handler, uri=uri)
    frame_name = f"{portal.domain}|0|{session.app_sid}"
    inputs = "\n".join(
        f'<input type="hidden" name="{escape(k)}" value="{escape(v)}">' for k, v in fields.items()
    )
    config = {
        "appOrigin": _origin(session.handler),
        "appSid": session.app_sid,
        "placement": placement,
        "installMode": not portal.installed,
        "unanswered": sorted(portal.unanswered_commands),
    }
    return f"""
<iframe class="b24-app-frame" id="b24-app-frame" name="{escape(frame_name)}"
  title="Application"></iframe>
<form id="b24-app-form" method="post" target="{escape(frame_name)}" action="{escape(url)}"
  style="display:none">
{inputs}
</form>
<script type="application/json" id="b24-fake-config">{_json_script(config)}</script>
<script>{PARENT_JS}</script>"""


def _lang(portal, req: Request, viewer) -> str:
    value = req.query.get("lang")
    if isinstance(value, str) and value:
        return value
    return viewer.lang if viewer else portal.lang


def task_page(portal, req: Request, task_id: int) -> Response:
    with portal.lock:
        viewer = _viewer(portal, req)
        task = portal.tasks.get(task_id)
        if viewer is None or task is None or not portal.can_access_task(viewer, task):
            return Response.html(
                _layout(
                    portal,
                    req,
                    viewer,
                    "Task not found",
                    '<div class="b24-card"><h1>Task not found or access denied</h1></div>',
                ),
                404,
            )
        lang = _lang(portal, req, viewer)
        binding = next(
            (
                b
                for p in ("TASK_VIEW_TAB", "TASK_VIEW_SIDEBAR", "TASK_VIEW_TOP_PANEL")
                if (b := portal.placement_binding(p)) is not None
            ),
            None,
        )
        placement = binding.placement if binding else "TASK_VIEW_TAB"
        handler = binding.handler if binding else portal.fake.app_url + "/b24/app/"
        tab_title = (binding.title_for(lang) if binding else "") or "Results"
        responsible = portal.users.get(task.responsible_id)
        if portal.installed:
            content = _frame_html(
                portal, viewer, placement, {"taskId": str(task.id)}, lang, handler, uri=req.path
            )
        else:
            # Placements are shown to nobody until installFinish (§1.3).
            content = (
                f'<div class="b24-notice" id="b24-not-installed">{escape(NOT_INSTALLED_TEXT)}</div>'
            )
        body = f"""
<div class="b24-card" data-task-id="{task.id}">
<h1 id="b24-task-title">{escape(task.title)}</h1>
<div class="b24-meta">Task #{task.id} &middot;
Responsible: {escape(responsible.full_name if responsible else "-")}
&middot; {"Completed" if task.completed else "In progress"}</div>
<div class="b24-description">{escape(task.description)}</div>
<div class="b24-tabs"><div class="b24-tab">Comments</div><div class="b24-tab">History</div>
<div class="b24-tab active" id="b24-app-title">{escape(tab_title)}</div></div>
<div class="b24-tab-body">{content}</div>
</div>"""
        return Response.html(_layout(portal, req, viewer, task.title, body))


def app_page(portal, req: Request, installer: bool) -> Response:
    with portal.lock:
        viewer = _viewer(portal, req)
        if viewer is None:
            return Response.html("<h1>No users</h1>", 404)
        lang = _lang(portal, req, viewer)
        app_url = portal.fake.app_url
        if portal.installed and not installer:
            content = _frame_html(
                portal, viewer, "DEFAULT", {}, lang, app_url + "/b24/app/", uri="/marketplace/app/"
            )
            title = "Application"
        elif viewer.admin:
            # Until installFinish, admins get the installer URL (§1.3).
            content = _frame_html(
                portal,
                viewer,
                "DEFAULT",
                {},
                lang,
                app_url + "/b24/install/",
                uri="/marketplace/install/",
            )
            title = "Application installation"
        else:
            content = (
                f'<div class="b24-notice" id="b24-not-installed">{escape(NOT_INSTALLED_TEXT)}</div>'
            )
            title = "Application"
        body = f"""<div class="b24-card"><h1 id="b24-app-title">{escape(title)}</h1>
<div class="b24-tab-body">{content}</div></div>"""
        return Response.html(_layout(portal, req, viewer, title, body))


def task_list_page(portal, req: Request, user_id: int) -> Response:
    with portal.lock:
        viewer = _viewer(portal, req)
        rows = []
        for task in portal.tasks.values():
            if viewer is not None and portal.can_access_task(viewer, task):
                href = f"/company/personal/user/{user_id}/tasks/task/view/{task.id}/?as={viewer.id}"
                count = len(portal.results_of(task.id))
                rows.append(
                    f'<tr><td>{task.id}</td><td><a href="{escape(href)}">'
                    f"{escape(task.title)}</a></td><td>{count}</td></tr>"
                )
        body = (
            '<div class="b24-card"><h1>Tasks</h1><table class="b24-list">'
            "<tr><th>#</th><th>Title</th><th>Results</th></tr>" + "".join(rows) + "</table></div>"
        )
        return Response.html(_layout(portal, req, viewer, "Tasks", body))


def _frame_session(portal, req: Request):
    sid = req.query.get("sid")
    return portal.frames.get(sid) if isinstance(sid, str) else None


def _auth_fields(portal, user_id: int) -> dict:
    tokens = portal.issue_tokens(user_id)
    return {
        "AUTH_ID": tokens["access_token"],
        "REFRESH_ID": tokens["refresh_token"],
        "AUTH_EXPIRES": str(ACCESS_TTL_S),
    }


def fake_endpoint(portal, req: Request) -> Response:
    if req.method != "POST":
        return Response.json({"error": "method not allowed"}, 405)
    with portal.lock:
        session = _frame_session(portal, req)
        name = req.path.rstrip("/").rsplit("/", 1)[-1]
        if name == "refresh_auth":
            user_id = session.user_id if session else None
            as_user = req.query.get("as")
            if user_id is None and isinstance(as_user, str) and as_user.isdigit():
                user_id = int(as_user)
            if user_id not in portal.users:
                return Response.json({"error": "unknown frame"}, 404)
            return Response.json(_auth_fields(portal, user_id))
        if session is None:
            return Response.json({"error": "unknown frame"}, 404)
        user = portal.users[session.user_id]
        if name == "init_data":
            data = {
                "DOMAIN": portal.domain,
                "PROTOCOL": "0",
                "PATH": "/rest/",
                "LANG": session.lang,
                "MEMBER_ID": portal.member_id,
                "IS_ADMIN": user.admin,
                "APP_OPTIONS": {},
                "USER_OPTIONS": {},
                "PLACEMENT": session.placement,
                "PLACEMENT_OPTIONS": session.options,
                "INSTALL": not portal.installed,
                "FIRST_RUN": False,
            }
            data.update(_auth_fields(portal, session.user_id))
            return Response.json(data)
        if name == "install_finish":
            if not user.admin:
                return Response.json({"error": "ACCESS_DENIED"}, 403)
            portal.mark_installed()
            return Response.json({"result": True})
    return Response.json({"error": "not found"}, 404)


def index_page(portal, req: Request) -> Response:
    with portal.lock:
        viewer = _viewer(portal, req)
        uid = viewer.id if viewer else 1
    return Response.redirect(f"/company/personal/user/{uid}/tasks/?as={uid}")


def handle(portal, req: Request) -> Response:
    path = req.path
    if path.startswith("/_fake/"):
        return fake_endpoint(portal, req)
    if req.method not in ("GET", "HEAD"):
        return Response.html("<h1>405 Method Not Allowed</h1>", 405)
    m = TASK_VIEW_RE.match(path)
    if m:
        return task_page(portal, req, int(m.group(2)))
    m = TASK_LIST_RE.match(path)
    if m:
        return task_list_page(portal, req, int(m.group(1)))
    if path.rstrip("/") == "/marketplace/app":
        return app_page(portal, req, installer=False)
    if path.rstrip("/") == "/marketplace/install":
        return app_page(portal, req, installer=True)
    if path == "/":
        return index_page(portal, req)
    return Response.html("<!DOCTYPE html><html><body><h1>404 Not Found</h1></body></html>", 404)
