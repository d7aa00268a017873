"""Cross-tenant attempts: portal A's credentials (frame token, application token, user tokens)
combined with portal B's identity (member_id, result and change ids) are refused, and nothing
changes at either portal (the fakes' records) or in the database.

The placement-POST fuzz of tests/results/test_frame_security.py already mixes A's and B's fields
at random; this module goes through each swap the issue names, on every endpoint that takes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from b24app.portals.models import Portal
from results.models import ResultChange
from tests.support.portals import post_event, post_frame
from tests.support.results import (
    UNLIMITED,
    acting_user,
    edit,
    frame_get,
    frame_post,
    installed,
    open_screen,
    writes,
)
from tests.support.security import db_snapshot

pytestmark = pytest.mark.django_db


@dataclass
class Tenant:
    fake_portal: object
    task: int
    result: int
    frame_token: str
    change_id: int


@pytest.fixture
def tenants(client, fake, portal, settings):
    """A (the `portal` fixture) and B, both installed, each with a task, a result by user 2, a
    frame session of user 1 and a change of user 2 that Bitrix24 refused (not the author)."""
    settings.B24_RATE_LIMIT = UNLIMITED
    b = fake.add_portal()
    b.add_user(name="Viktor", last_name="Orlov", admin=True)
    b.add_user(name="Galina", last_name="Sokolova")
    made = {}
    for name, each in (("a", portal), ("b", b)):
        installed(client, each, 1)
        task = each.add_task(title=f"{name}'s task")
        result = each.add_result(task, author_id=1, text=f"{name}'s secret result")
        _, user2 = open_screen(client, each, 2, task)
        edit(client, user2, task, result, "not the author")
        _, token = open_screen(client, each, 1, task)
        change = ResultChange.objects.get(portal__member_id=each.member_id)
        made[name] = Tenant(each, task, result, token, change.pk)
    return made["a"], made["b"]


class Watch:
    """What a request must not do: change a row, write to either portal, or (unless the request
    names B's own address, so the app must ask it who the user is) reach portal B at all."""

    def __init__(self, a: Tenant, b: Tenant, *, b_may_be_asked: bool = False) -> None:
        self.a, self.b, self.b_may_be_asked = a, b, b_may_be_asked
        self.rows = db_snapshot()
        self.b_requests = len(b.fake_portal.requests)
        self.writes = len(writes(a.fake_portal)) + len(writes(b.fake_portal))

    def assert_nothing_changed(self, what: str) -> None:
        assert db_snapshot() == self.rows, f"{what}: the database changed"
        if not self.b_may_be_asked:
            assert len(self.b.fake_portal.requests) == self.b_requests, f"{what}: B was asked"
        assert len(writes(self.a.fake_portal)) + len(writes(self.b.fake_portal)) == self.writes, (
            f"{what}: something was written to a portal"
        )


def _row(member_id: str) -> dict:
    return Portal.objects.filter(member_id=member_id).values().get()


def _row_in(snapshot: dict, member_id: str) -> dict:
    return next(row for row in snapshot["Portal"] if row["member_id"] == member_id)


def test_cross_tenant_frame_token_of_a_on_every_frame_endpoint_with_bs_ids(client, fake, tenants):
    a, b = tenants
    a_writes_before = len(writes(a.fake_portal))
    calls = [
        ("get", f"/b24/app/task/?task={b.task}", {}),
        ("post", "/b24/app/task/", {"task": b.task}),
        ("post", "/b24/app/results/add/", {"task": b.task, "text": "into B"}),
        ("post", f"/b24/app/results/{b.result}/edit/", {"task": b.task, "text": "into B"}),
        ("post", f"/b24/app/results/{b.result}/delete/", {"task": b.task}),
        ("get", f"/b24/app/changes/?ids={b.change_id}", {}),
        ("post", f"/b24/app/changes/{b.change_id}/retry/", {}),
        ("post", "/b24/app/rebind/", {"member_id": b.fake_portal.member_id}),
    ]
    for method, path, data in calls:
        watch = Watch(a, b)
        send = frame_get if method == "get" else frame_post
        response = send(client, a.frame_token, path, **({"data": data} if data else {}))
        body = response.content.decode()
        assert "b's secret result" not in body, path
        if "/changes/" in path and method == "get":
            assert response.json() == {"changes": []}
        if "/retry/" in path:
            assert response.status_code == 404
        if "/results/" in path:
            # A change is made, but for A: B's ids mean only A's own task and result there.
            stored = ResultChange.objects.order_by("-pk").first()
            assert (stored.portal.member_id, stored.account.user_id) == (a.fake_portal.member_id, 1)
            continue
        if "/rebind/" in path:
            # A's admin checked A's bindings (a member_id in the form means nothing): only A's
            # row records it; B's stays as it was, and B is never asked.
            a_before, a_after = (
                _row_in(watch.rows, a.fake_portal.member_id),
                _row(a.fake_portal.member_id),
            )
            changed = {key for key, value in a_after.items() if a_before[key] != value}
            assert changed <= {"bindings", "bindings_detail", "bindings_checked_at"}
            assert _row(b.fake_portal.member_id) == _row_in(watch.rows, b.fake_portal.member_id)
            rows = db_snapshot()
            assert {k: rows[k] for k in rows if k != "Portal"} == {
                k: watch.rows[k] for k in watch.rows if k != "Portal"
            }
            assert len(b.fake_portal.requests) == watch.b_requests
            continue
        watch.assert_nothing_changed(f"{method.upper()} {path}")
    assert [w["status"] for w in writes(b.fake_portal)] == [403]  # only B's own refused edit
    new_on_a = writes(a.fake_portal)[a_writes_before:]
    assert new_on_a and {acting_user(fake, w) for w in new_on_a} == {1}


def test_cross_tenant_placement_posts_with_swapped_member_id_are_refused(client, tenants):
    a, b = tenants
    url_a, genuine_a = a.fake_portal.frame_post(1, options={"taskId": str(a.task)})
    url_b, genuine_b = b.fake_portal.frame_post(1, options={"taskId": str(b.task)})
    b_member = b.fake_portal.member_id
    cases = {
        # A's genuine POST (A's user tokens and application token) claiming B's member_id.
        "A's POST with B's member_id": (url_a, {**genuine_a, "member_id": b_member}, False),
        "A's POST with B's member_id, on B's domain": (
            url_b,
            {**genuine_a, "member_id": b_member},
            False,
        ),
        # B's member_id and application token (any user of B can read it) with A's user tokens:
        # the app asks B's portal who the user is, and B does not know A's token.
        "A's user tokens with B's member_id and application token": (
            url_b,
            {**genuine_b, "AUTH_ID": genuine_a["AUTH_ID"], "REFRESH_ID": genuine_a["REFRESH_ID"]},
            True,
        ),
    }
    for label, (url, form, b_may_be_asked) in cases.items():
        watch = Watch(a, b, b_may_be_asked=b_may_be_asked)
        response = post_frame(client, url, form)
        assert response.status_code in (400, 401, 403), (label, response.status_code)
        assert 'data-frame-token="' not in response.content.decode(), label
        assert "b's secret result" not in response.content.decode(), label
        watch.assert_nothing_changed(label)


@pytest.mark.parametrize("event", ["ONAPPINSTALL", "ONAPPUPDATE", "ONAPPUNINSTALL"])
def test_cross_tenant_events_with_swapped_member_id_are_refused(client, tenants, event):
    a, b = tenants
    b_member = b.fake_portal.member_id
    user = None if event == "ONAPPUNINSTALL" else 1
    b_identity = {"member_id": b_member, "domain": b.fake_portal.domain}
    b_identity["client_endpoint"] = b.fake_portal.client_endpoint
    cases = {
        # A's genuine event (its user's tokens and application token), claiming to be B.
        "A's event with B's member_id": a.fake_portal.event_body(
            event, user_id=user, extra_auth={"member_id": b_member}
        ),
        "A's event with B's member_id, domain and endpoint": a.fake_portal.event_body(
            event, user_id=user, extra_auth=b_identity
        ),
    }
    if user is None:
        # An uninstall naming B, proven only by A's application token (which every user of A
        # reads in their frame POST). (With a live token of B's admin, an install or update
        # event is B's own, whatever application token it carries: see known limit 2.)
        cases["B's uninstall with A's application token"] = b.fake_portal.event_body(
            event, user_id=None, application_token=a.fake_portal.application_token
        )
    else:
        a_tokens = a.fake_portal.issue_tokens(1)
        cases["B's event with A's user tokens"] = b.fake_portal.event_body(
            event,
            user_id=user,
            extra_auth={
                "access_token": a_tokens["access_token"],
                "refresh_token": a_tokens["refresh_token"],
            },
        )
    for label, body in cases.items():
        watch = Watch(a, b)
        response = post_event(client, body)
        assert response.status_code in (400, 401, 403), (label, response.content)
        assert response.json()["error"], label
        watch.assert_nothing_changed(label)


def test_cross_tenant_session_renewal_never_crosses(client, tenants):
    a, b = tenants
    b_tokens = b.fake_portal.issue_tokens(1)
    a_boris = a.fake_portal.issue_tokens(2)
    cases = {
        "A's frame token with B's user's fresh auth": b_tokens,
        "A's frame token (user 1) with another A user's fresh auth": a_boris,
    }
    for label, tokens in cases.items():
        watch = Watch(a, b)
        response = frame_post(
            client,
            a.frame_token,
            f"/b24/app/session/?DOMAIN={b.fake_portal.domain}",
            {
                "AUTH_ID": tokens["access_token"],
                "REFRESH_ID": tokens["refresh_token"],
                "AUTH_EXPIRES": "3600",
                "member_id": b.fake_portal.member_id,
            },
        )
        assert response.status_code in (401, 403), (label, response.content)
        assert "token" not in response.json(), label
        watch.assert_nothing_changed(label)
