"""Bitrix24 may open the app without `REFRESH_ID`: the docs' table of the placement POST (§3.2)
marks it optional, though b24pysdk treats it as required.

The person works with the access token (`AUTH_ID`, still verified by `profile`). An account that
had a refresh token keeps it. One that never had one acts until its access token expires, then
waits for its user (their next visit, or the open frame's `refreshAuth` renewal): their edits
stay queued instead of failing, and no call to the token endpoint is made with nothing to spend.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from b24app.portals.models import Account, Portal
from b24app.portals.services import AccountAwaitingSignIn
from results import services
from results.models import ResultChange
from tests.support.portals import kill_installer_tokens, post_frame
from tests.support.results import (
    applied,
    edit,
    frame_get,
    frame_post,
    frame_token,
    html,
    installed_task,
    texts,
)

# Background work inline (no worker): the open screen's polling delivers due changes.
pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("celery_eager")]
ANNA, BORIS = 1, 2


@pytest.fixture
def task(client, portal):
    return installed_task(client, portal, user_id=ANNA, results=["Figures checked"])


def open_without_refresh(client, portal, user_id: int, task: int):
    """The task card's placement POST as Bitrix24 may send it: no `REFRESH_ID`."""
    url, fields = portal.frame_post(user_id, options={"taskId": str(task)})
    del fields["REFRESH_ID"]
    return post_frame(client, url, fields), fields


def open_with_refresh(client, portal, user_id: int, task: int):
    url, fields = portal.frame_post(user_id, options={"taskId": str(task)})
    return post_frame(client, url, fields), fields


def refresh_calls(fake) -> list[dict]:
    return [call for call in fake.token_calls if call["grant_type"] == "refresh_token"]


def _stored_token_nearly_expired(user_id: int) -> None:
    """An hour later: the stored access token is about to expire, so the next visit's is kept
    (a fresher one is kept only once app.info vouched for it)."""
    Account.objects.filter(user_id=user_id).update(expires_at=timezone.now() + timedelta(minutes=1))


def account_of(user_id: int) -> Account:
    return Account.objects.get(user_id=user_id)


def test_placement_post_without_refresh_id_opens_the_screen_and_lists_results(client, portal, task):
    response, fields = open_without_refresh(client, portal, BORIS, task)

    assert response.status_code == 200, html(response)[:2000]
    assert 'data-screen="results"' in html(response) and "Figures checked" in html(response)
    assert fields["AUTH_ID"] not in html(response)
    boris = account_of(BORIS)
    assert boris.access_token == fields["AUTH_ID"]
    assert boris.refresh_token_encrypted == "" and boris.tokens_issued_at is None
    # The frame token it issued works: the screen's own requests are served.
    listed = frame_get(client, frame_token(response), f"/b24/app/task/?task={task}", as_json=True)
    assert listed.status_code == 200 and "Figures checked" in listed.json()["html"]


def test_placement_post_without_refresh_id_keeps_the_stored_refresh_token(
    client, fake, portal, task
):
    open_with_refresh(client, portal, BORIS, task)
    _stored_token_nearly_expired(BORIS)
    before = account_of(BORIS)

    response, fields = open_without_refresh(client, portal, BORIS, task)

    assert response.status_code == 200
    after = account_of(BORIS)
    assert after.access_token == fields["AUTH_ID"]  # the new access token is used
    assert after.refresh_token == before.refresh_token  # the refresh token is kept
    assert after.tokens_issued_at == before.tokens_issued_at
    assert after.token_version == before.token_version + 1
    # ... and it still works once the access token has expired.
    portal.expire_access_tokens()
    listed = frame_get(client, frame_token(response), f"/b24/app/task/?task={task}", as_json=True)
    assert listed.status_code == 200 and "Figures checked" in listed.json()["html"]
    assert [call["ok"] for call in refresh_calls(fake)] == [True]


def test_session_renewal_without_refresh_id_keeps_the_stored_refresh_token(client, portal, task):
    response, _ = open_with_refresh(client, portal, BORIS, task)
    stored = account_of(BORIS).refresh_token
    _stored_token_nearly_expired(BORIS)
    fresh = portal.issue_tokens(BORIS)

    renewed = frame_post(
        client,
        frame_token(response),
        "/b24/app/session/",
        {"AUTH_ID": fresh["access_token"], "AUTH_EXPIRES": "3600"},
        as_json=True,
    )

    assert renewed.status_code == 200, renewed.content[:500]
    boris = account_of(BORIS)
    assert boris.access_token == fresh["access_token"] and boris.refresh_token == stored
    listed = frame_get(client, renewed.json()["token"], f"/b24/app/task/?task={task}", as_json=True)
    assert listed.status_code == 200


def test_account_without_refresh_token_queues_edits_once_expired_and_renews_without_one(
    client, fake, portal, task
):
    result = portal.add_result(task, author_id=BORIS, text="Draft")
    response, _ = open_without_refresh(client, portal, BORIS, task)
    token = frame_token(response)
    portal.expire_access_tokens()

    edited = edit(client, token, task, result, "Final figures", as_json=True)

    # Nothing to renew the access token with: the edit waits for Boris, it is not refused.
    assert edited.status_code == 200 and edited.json()["change"]["state"] == "queued"
    change = ResultChange.objects.get()
    assert change.state == ResultChange.State.QUEUED
    assert change.last_error == AccountAwaitingSignIn.CODE
    assert account_of(BORIS).state == Account.State.WAITING
    assert Portal.objects.get().state == Portal.State.ACTIVE
    assert refresh_calls(fake) == []  # no token call with an empty refresh token
    ResultChange.objects.filter(pk=change.pk).update(
        next_attempt_at=timezone.now() - timedelta(seconds=1)
    )
    change = services.result_change_deliver(change_id=change.pk)  # the worker's retry
    assert change.state == ResultChange.State.QUEUED and refresh_calls(fake) == []
    assert texts(portal, task) == ["Draft", "Figures checked"]

    # The open screen is told its session expired and renews it with the frame's refreshAuth,
    # which may bring no refresh token either; the edit then goes out.
    poll_url = f"/b24/app/changes/?ids={change.pk}"
    assert frame_get(client, token, poll_url, as_json=True).status_code == 401
    fresh = portal.issue_tokens(BORIS)
    renewed = frame_post(
        client, token, "/b24/app/session/", {"AUTH_ID": fresh["access_token"]}, as_json=True
    )
    assert renewed.status_code == 200
    assert account_of(BORIS).state == Account.State.ACTIVE
    poll = frame_get(client, renewed.json()["token"], poll_url, as_json=True)
    assert poll.json()["changes"][0]["state"] == "saved"
    assert texts(portal, task) == ["Figures checked", "Final figures"]
    assert len(applied(portal, str(change.idempotency_key))) == 1
    assert refresh_calls(fake) == []


def test_visit_without_refresh_id_does_not_repair_a_portal_blocked_by_a_dead_token(
    client, fake, portal, task
):
    kill_installer_tokens(portal)  # Anna's refresh token died: her account and the portal block
    assert Portal.objects.get().state == Portal.State.BLOCKED
    spent = len(refresh_calls(fake))

    response, _ = open_without_refresh(client, portal, ANNA, task)

    assert response.status_code == 200  # Anna works with her access token ...
    anna = account_of(ANNA)
    assert anna.state == Account.State.ACTIVE
    assert anna.refresh_token_encrypted == ""  # ... and the refused refresh token is gone
    assert Portal.objects.get().state == Portal.State.BLOCKED  # no refresh token: not repaired
    portal.expire_access_tokens()
    listed = frame_get(client, frame_token(response), f"/b24/app/task/?task={task}", as_json=True)
    assert listed.status_code == 503 and "sign in again" in listed.json()["html"]
    assert len(refresh_calls(fake)) == spent  # the dead token was not tried again

    response, _ = open_with_refresh(client, portal, ANNA, task)  # the next visit brings one
    assert response.status_code == 200
    assert Portal.objects.get().state == Portal.State.ACTIVE
    assert account_of(ANNA).can_refresh


@pytest.mark.parametrize("refresh_id", ["", None], ids=["empty", "missing"])
def test_placement_post_without_auth_id_is_still_refused(client, portal, task, refresh_id):
    url, fields = portal.frame_post(BORIS, options={"taskId": str(task)})
    fields["AUTH_ID"] = ""
    if refresh_id is None:
        del fields["REFRESH_ID"]
    response = post_frame(client, url, fields)
    assert response.status_code == 400
    assert "Bitrix24 sent no authorization" in html(response)
    assert not Account.objects.filter(user_id=BORIS).exists()
