"""Every HTML page of the project carries the right framing policy (b24app/framing.py).

All URL patterns are read from the URLconf; each is requested with GET and POST in every state
that renders something (a verified frame session or placement POST, none, a bad one, a claimed
portal in the query; an operator and an anonymous visitor), plus the error pages (404, 400, 403)
and a static file. Expected, per response:

- a frame page of a verified session: `frame-ancestors <that portal's origin>` and no
  `X-Frame-Options`;
- a refusal page that names a portal in its query (`DOMAIN`): that claimed origin, the same way
  (known limit 7 of docs/SECURITY.md);
- everything else: `X-Frame-Options: DENY` and `frame-ancestors 'none'`.

A new URL pattern outside the admin fails `test_framing_every_url_pattern_is_covered` until it
is added to `ROUTES` with its kind; the admin's patterns are all covered by the admin rule.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

import pytest
from django.apps import apps
from django.contrib.auth.models import Group
from django.contrib.contenttypes.models import ContentType
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver, resolve

from b24app.portals.models import Portal
from results.models import ResultChange
from tests.support.portals import post_frame
from tests.support.results import add, installed, open_screen

pytestmark = pytest.mark.django_db

CLAIMED = "claimed-portal.bitrix24.com"
CLAIMED_ORIGIN = f"https://{CLAIMED}"
DENY = ("'none'", "DENY")

FRAME = "frame"  # frame endpoints: the frame token decides
ROUTES = {
    "healthz": "plain",
    "metrics": "plain",  # text for Prometheus; 404 without B24_METRICS_TOKEN
    "b24/install/": "install",
    "b24/events/": "plain",
    "b24/oauth/start/": "plain",
    "b24/oauth/callback/": "plain",
    "b24/app/": "screen",
    "b24/app/session/": "plain",  # JSON only, never framed
    "b24/app/task/": FRAME,
    "b24/app/results/add/": FRAME,
    "b24/app/results/<int:result_id>/edit/": FRAME,
    "b24/app/results/<int:result_id>/delete/": FRAME,
    "b24/app/changes/": FRAME,
    "b24/app/changes/<int:change_id>/retry/": FRAME,
    "b24/app/rebind/": FRAME,
}
"""Every URL pattern outside the admin, and how its framing is decided."""


def all_routes(patterns=None, prefix: str = "") -> list[str]:
    """The full route of every URL pattern of the project, joined as `resolve()` joins them
    (`ResolverMatch.route`: a regex part loses its leading `^`)."""
    routes = []
    for pattern in get_resolver().url_patterns if patterns is None else patterns:
        route = prefix + str(pattern.pattern).removeprefix("^")
        if isinstance(pattern, URLResolver):
            routes += all_routes(pattern.url_patterns, route)
        elif isinstance(pattern, URLPattern):
            routes.append(route)
    return routes


def _admin_object_id(route: str) -> str:
    app_label, model_name = route.split("/")[1:3]
    return str(apps.get_model(app_label, model_name).objects.order_by("pk").first().pk)


def concrete_path(route: str, ids: dict[str, int]) -> str:
    """A path that resolves to `route`, with real objects' ids in place of its parameters."""
    if route.endswith("(?P<url>.*)$"):
        return "/admin/no-such-admin-page/"
    if "(?P<app_label>" in route:
        return "/admin/portals/"
    path = route
    path = path.replace("<path:content_type_id>", str(ContentType.objects.get_for_model(Portal).pk))
    if route.startswith("admin/r/"):
        path = path.replace("<path:object_id>", str(Portal.objects.first().pk))
    elif "<path:object_id>" in path or "<id>" in path:
        object_id = _admin_object_id(route)
        path = path.replace("<path:object_id>", object_id).replace("<id>", object_id)
    path = re.sub(r"<int:(\w+)>", lambda m: str(ids[m.group(1)]), path)
    assert "<" not in path and "(" not in path, path
    return "/" + path


@dataclass
class World:
    portal_origin: str
    frame_token: str
    placement: tuple[str, dict]
    install: tuple[str, dict]
    ids: dict[str, int]


@pytest.fixture
def world(client, fake, portal, admin_user):
    installed(client, portal, 1)
    task = portal.add_task(title="Prepare the report")
    result = portal.add_result(task, author_id=1, text="Done")
    _, token = open_screen(client, portal, 1, task)
    add(client, token, task, "A result")
    Group.objects.create(name="operators")
    return World(
        portal_origin=Portal.objects.get(member_id=portal.member_id).origin,
        frame_token=token,
        placement=portal.frame_post(1, options={"taskId": str(task)}),
        install=portal.install_post(1),
        ids={"result_id": result, "change_id": ResultChange.objects.get().pk},
    )


def framing(response) -> tuple[str | None, str | None]:
    """(the value of `frame-ancestors`, `X-Frame-Options`) of a response."""
    ancestors = None
    for directive in response.get("Content-Security-Policy", "").split(";"):
        name, _, value = directive.strip().partition(" ")
        if name == "frame-ancestors":
            ancestors = value.strip()
    return ancestors, response.get("X-Frame-Options")


def requests_for(route: str, world: World, anonymous: Client, operator: Client):
    """(label, client, method, path, data, headers, expected framing) for one route."""
    kind = "admin" if route.startswith("admin/") else ROUTES[route]
    path = concrete_path(route, world.ids)
    claimed = f"{path}?DOMAIN={CLAIMED}&PROTOCOL=1"
    portal = (world.portal_origin, None)
    claimed_framing = (CLAIMED_ORIGIN, None)
    good = {"HTTP_X_FRAME_TOKEN": world.frame_token}
    bad = {"HTTP_X_FRAME_TOKEN": world.frame_token[:-3] + "abc"}
    cases = []
    for method in ("get", "post"):
        if kind in ("admin", "plain"):
            cases.append((f"anonymous {method}", anonymous, method, path, {}, {}, DENY))
            cases.append((f"operator {method}", operator, method, path, {}, {}, DENY))
        elif kind == FRAME:
            data = {"task": 1, "text": "Edited"} if method == "post" else {}
            for state, target, extra, expected in (
                ("session", path, good, portal),
                ("no session", path, {}, DENY),
                ("bad session", path, bad, DENY),
                ("no session, claim", claimed, {}, claimed_framing),
                ("bad session, claim", claimed, bad, claimed_framing),
            ):
                cases.append(
                    (f"{state} {method}", anonymous, method, target, data, extra, expected)
                )
    if kind in ("screen", "install"):
        url, fields = world.placement if kind == "screen" else world.install
        cases += [
            ("genuine POST", anonymous, "post", url, fields, {}, portal),
            ("GET", anonymous, "get", claimed, {}, {}, DENY),  # 405 before any check
            ("empty POST", anonymous, "post", path, {}, {}, DENY),
            ("empty POST, claim", anonymous, "post", claimed, {}, {}, claimed_framing),
            ("forged POST, claim", anonymous, "post", claimed, {**fields, "AUTH_ID": "x"}, {},
             claimed_framing),
        ]  # fmt: skip
    return cases


def send(client: Client, method: str, path: str, data: dict, headers: dict):
    if method == "post" and "?" in path and data and "AUTH_ID" in data:
        return post_frame(client, path, data)
    return getattr(client, method)(path, data, **headers)


def test_framing_every_url_pattern_is_covered():
    routes = all_routes()
    outside_admin = {route for route in routes if not route.startswith("admin/")}
    assert outside_admin == set(ROUTES), (
        "URL patterns without a framing rule in ROUTES (add them, with their kind): "
        f"{sorted(outside_admin - set(ROUTES))}; rules for patterns that are gone: "
        f"{sorted(set(ROUTES) - outside_admin)}"
    )


def test_framing_every_html_response_of_every_url_pattern(world, admin_user):
    anonymous = Client(raise_request_exception=False)
    operator = Client(raise_request_exception=False)
    operator.force_login(admin_user)
    visited, wrong, html = set(), [], 0
    for route in all_routes():
        for label, client, method, path, data, headers, expected in requests_for(
            route, world, anonymous, operator
        ):
            response = send(client, method, path, data, headers)
            visited.add(resolve(urlsplit(path).path).route)
            if not response.get("Content-Type", "").startswith("text/html"):
                continue
            html += 1
            if framing(response) != expected:
                wrong.append(
                    f"{method.upper()} {path} ({label}) -> {response.status_code} "
                    f"{framing(response)}, expected {expected}"
                )
    assert visited == set(all_routes())
    assert not wrong, "\n".join(wrong)
    assert html >= 150, html


@pytest.mark.parametrize(
    "label, request_kwargs",
    [
        ("404", {"path": "/no-such-page/"}),
        ("400 bad host", {"path": "/b24/install/", "HTTP_HOST": "evil.example"}),
        ("400 bad host on a frame page", {"path": "/b24/app/", "HTTP_HOST": "evil.example"}),
        ("static file", {"path": "/static/results/screen.js"}),
    ],
)
def test_framing_error_pages_and_static_files_forbid_framing(client, label, request_kwargs):
    response = client.get(**request_kwargs)
    assert response.status_code in (200, 400, 404), label
    assert framing(response) == DENY, label


def test_framing_csrf_failure_page_forbids_framing(admin_user):
    response = Client(enforce_csrf_checks=True).post(
        "/admin/login/", {"username": "admin", "password": "password"}
    )
    assert response.status_code == 403
    assert response["Content-Type"].startswith("text/html")
    assert framing(response) == DENY
