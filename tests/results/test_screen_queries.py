"""What the screen's hot requests cost the database: a placement open and an edit, statement by
statement (transaction control left out: in a test it is savepoints, in production BEGIN and
COMMIT). A new statement on these paths is paid on every open of every portal."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from tests.support.results import ANNA, edit, installed_task, open_screen, texts

pytestmark = pytest.mark.django_db

STATEMENTS = ("SELECT", "INSERT", "UPDATE", "DELETE")


def _statements(captured) -> list[str]:
    kinds = [query["sql"].split(None, 1)[0].upper() for query in captured.captured_queries]
    return [kind for kind in kinds if kind in STATEMENTS]


def test_an_open_by_a_person_with_live_tokens_reads_three_times_and_writes_nothing(client, portal):
    """The portal, the person's account, their pending changes to the task: no write when both
    were seen a moment ago, no resume of changes when the account keeps the tokens it had."""
    task = installed_task(client, portal, results=["First figures", "Second figures"])
    open_screen(client, portal, ANNA, task)
    with CaptureQueriesContext(connection) as captured:
        response, _ = open_screen(client, portal, ANNA, task)  # a fresh AUTH_ID
    assert "Second figures" in response.content.decode()
    assert _statements(captured) == ["SELECT", "SELECT", "SELECT"]


def test_an_edit_saved_at_once_costs_four_statements(client, portal):
    """The frame's account, the change written, sent, and its outcome recorded."""
    task = installed_task(client, portal, results=["Draft"])
    _, token = open_screen(client, portal, ANNA, task)
    result_id = int(portal.results(task)[0]["id"])
    with CaptureQueriesContext(connection) as captured:
        response = edit(client, token, task, result_id, "Final figures", as_json=True)
    assert response.json()["change"]["state"] == "saved"
    assert texts(portal, task) == ["Final figures"]
    assert len(_statements(captured)) <= 4, _statements(captured)
