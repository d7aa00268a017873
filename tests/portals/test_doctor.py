"""`manage.py b24 doctor PORTAL [--task ID]` against the fake portal, with each documented or
observed alternative switched on: it reports every check, exits 0 when the portal conforms to
what the app relies on and 1 with the differing line when it does not, cleans up what it wrote,
and never prints a token."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from b24app.portals.doctor import PROBE_TEXT
from tests.support.portals import issued_tokens
from tests.support.results import installed_task

pytestmark = pytest.mark.django_db

CHECKS = ("oauth server", "token refresh", "rest 3.0", "scope", "page size", "bindings")
WRITES = (
    "write add",
    "write update",
    "write replay",
    "write replay, new auth",
    "write delete",
)


@pytest.fixture
def task(client, portal):
    results = [(2, f"Result {n}") for n in range(45)]
    return installed_task(client, portal, title="Checked by the doctor", results=results)


def doctor(portal, *args) -> tuple[int, dict[str, tuple[str, str]], str]:
    """Run the command; (exit status, {check: (verdict, detail)}, everything it printed)."""
    out = StringIO()
    status = 0
    try:
        call_command("b24", "doctor", portal.member_id, *args, stdout=out)
    except CommandError as exc:
        status = exc.returncode
        out.write(str(exc))
    text = out.getvalue()
    lines = {}
    for line in text.splitlines()[1:]:
        verdict, _, rest = line.partition(" ")
        name, _, detail = rest.strip().partition(": ")
        if verdict in ("ok", "differs", "unknown"):
            lines[name] = (verdict, detail)
    return status, lines, text


def assert_no_secret(fake, portal, text: str) -> None:
    for secret in [*issued_tokens(fake, portal), portal.application_token, fake.client_secret]:
        assert secret not in text


def test_doctor_on_a_conforming_portal_says_ok_to_every_check_and_cleans_up(fake, portal, task):
    before = sorted(item["id"] for item in portal.results(task))

    status, lines, text = doctor(portal, "--task", str(task))

    assert status == 0, text
    assert list(lines) == [*CHECKS, *WRITES]
    assert {verdict for verdict, _ in lines.values()} == {"ok"}, text
    assert "50 per page" not in lines["page size"][1] and "45" in lines["page size"][1]
    assert "replayed" in lines["write replay, new auth"][1]
    assert "POST" in lines["token refresh"][1]
    assert sorted(item["id"] for item in portal.results(task)) == before  # cleaned up
    assert not [i for i in portal.results(task) if i["text"].startswith(PROBE_TEXT)]
    assert_no_secret(fake, portal, text)


def test_doctor_measures_a_page_cap(portal, task):
    portal.result_page_cap = 20
    status, lines, _ = doctor(portal, "--task", str(task))
    assert status == 0
    assert lines["page size"] == (
        "ok",
        "20 per page when 1000 were asked (a cap; the app pages past it)",
    )


def test_doctor_reports_a_portal_comparing_whole_bodies_as_handled(portal, task):
    portal.idempotency_whole_body = True
    status, lines, _ = doctor(portal, "--task", str(task))
    assert status == 0
    verdict, detail = lines["write replay, new auth"]
    assert verdict == "ok" and "422" in detail and "whole bodies" in detail
    assert not [i for i in portal.results(task) if i["text"].startswith(PROBE_TEXT)]


def test_doctor_reports_bindings_an_update_dropped_and_exits_1(portal, task):
    with portal.lock:
        portal.event_bindings.clear()
    status, lines, text = doctor(portal)
    assert status == 1
    verdict, detail = lines["bindings"]
    assert verdict == "differs" and "ONAPPUNINSTALL, ONAPPUPDATE" in detail
    assert "1 check(s) differ" in text
    assert lines["page size"][0] == "unknown"  # no --task: nothing to measure with


def test_doctor_reports_a_portal_that_applies_a_replay_twice_and_exits_1(portal, task):
    portal.idempotency_ignored = True
    status, lines, _ = doctor(portal, "--task", str(task))
    assert status == 1
    assert lines["write replay"][0] == "differs"
    assert lines["write replay, new auth"][0] == "differs"
    assert not [i for i in portal.results(task) if i["text"].startswith(PROBE_TEXT)]


def test_doctor_reports_a_missing_scope_and_exits_1(portal, task):
    """The app card lost the task scope: the renewed tokens carry only what is left."""
    portal.scopes = "placement,user_brief"
    status, lines, _ = doctor(portal)
    assert status == 1
    assert lines["scope"] == ("differs", "granted 'placement,user_brief', lacks task")
    assert lines["rest 3.0"][0] == "differs"


def test_doctor_says_unknown_when_bitrix24_is_busy(portal, task):
    portal.fail_next(count=1, error="QUERY_LIMIT_EXCEEDED", method="tasks.task.result.list")
    status, lines, _ = doctor(portal)
    assert lines["rest 3.0"][0] == "unknown"
    assert status == 0  # unknown is not a difference


def test_doctor_of_an_unknown_portal_is_a_clear_error(db):
    with pytest.raises(CommandError, match="No portal"):
        call_command("b24", "doctor", "nowhere.bitrix24.com", stdout=StringIO())


@pytest.mark.parametrize(
    "token_params, method", [("both", "POST form body"), ("query", "GET query parameters")]
)
def test_doctor_says_how_the_oauth_server_took_the_refresh(
    fake, portal, task, token_params, method
):
    fake.token_params = token_params
    status, lines, _ = doctor(portal)
    assert status == 0
    verdict, detail = lines["token refresh"]
    assert verdict == "ok" and method in detail
