"""An edit made just as Bitrix24 loses its answer to our token renewal is not lost.

The OAuth server rotates the refresh token and the answer never arrives: the stored refresh token
is dead, and only the user's next visit brings new tokens. The change waits in the outbox (no
"Not saved", no more token calls meanwhile) and goes out once the user opens the app again.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from b24app.portals.models import Account, Portal
from b24app.portals.services import AccountAwaitingSignIn
from results import services
from results.models import PortalOutbox, ResultChange
from tests.support.results import (
    applied,
    edit,
    frame_get,
    frame_post,
    installed,
    open_screen,
    texts,
)

# Background work inline (no worker), so that each step is the test's: the worker's retries are
# `_retry_when_due`, and the open screen's polling delivers due changes.
pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("celery_eager")]
ANNA = 1


def _refresh_calls(fake) -> int:
    return sum(1 for call in fake.token_calls if call["grant_type"] == "refresh_token")


def _retry_when_due(change: ResultChange) -> ResultChange:
    """What the worker does once the change's backoff (and its portal's) has passed."""
    past = timezone.now() - timedelta(seconds=1)
    ResultChange.objects.filter(pk=change.pk).update(next_attempt_at=past)
    PortalOutbox.objects.update(resume_at=past)
    return services.result_change_deliver(change_id=change.pk)


def _lost_renewal_during_an_edit(client, fake, portal):
    """Anna edits her result just as Bitrix24 rotates her refresh token and loses the answer."""
    installed(client, portal, ANNA)
    task = portal.add_task(title="Prepare the quarterly report")
    result = portal.add_result(task, author_id=ANNA, text="Draft")
    _, token = open_screen(client, portal, ANNA, task)
    portal.expire_access_tokens()
    fake.fail_token_next(count=1, error="lost_response")

    response = edit(client, token, task, result, "Final figures", as_json=True)

    # The quick try's renewal lost its answer: the change is queued, and the answer to the edit
    # did not depend on reading the list again.
    assert response.status_code == 200
    assert response.json()["change"]["state"] == "queued"
    change = ResultChange.objects.get()
    assert change.state == ResultChange.State.QUEUED
    assert _refresh_calls(fake) == 1
    # The next attempt renews once more and gets invalid_grant (the rotation whose answer was
    # lost): the account now waits for Anna, and nothing is blocked.
    change = _retry_when_due(change)
    assert change.state == ResultChange.State.QUEUED
    assert Account.objects.get(user_id=ANNA).state == Account.State.WAITING
    assert Portal.objects.get().state == Portal.State.ACTIVE
    assert _refresh_calls(fake) == 2
    return task, token, change


def test_edit_waits_without_token_calls_until_the_user_is_back(client, fake, portal):
    task, _, change = _lost_renewal_during_an_edit(client, fake, portal)
    change = _retry_when_due(change)
    assert change.state == ResultChange.State.QUEUED
    assert change.last_error == AccountAwaitingSignIn.CODE
    assert change.next_attempt_at > timezone.now()
    assert _refresh_calls(fake) == 2  # waiting costs no token call
    assert texts(portal, task) == ["Draft"]

    open_screen(client, portal, ANNA, task)  # Anna opens the app again: fresh tokens

    change.refresh_from_db()
    assert change.next_attempt_at <= timezone.now()  # due at once, not after its backoff
    change = services.result_change_deliver(change_id=change.pk)
    assert change.state == ResultChange.State.SAVED
    assert texts(portal, task) == ["Final figures"]
    assert len(applied(portal, str(change.idempotency_key))) == 1
    assert _refresh_calls(fake) == 2


def test_open_screen_renews_a_waiting_session_with_fresh_frame_auth(client, fake, portal):
    """The screen still open in the frame is told its session expired; it renews it with
    `refreshAuth` from the Bitrix24 frame, as it does after 30 minutes, and the change goes out."""
    task, token, change = _lost_renewal_during_an_edit(client, fake, portal)
    poll_url = f"/b24/app/changes/?ids={change.pk}"
    poll = frame_get(client, token, poll_url, as_json=True)
    assert poll.status_code == 401 and poll.json()["error"] == "frame_expired"

    fresh = portal.issue_tokens(ANNA)
    renewed = frame_post(
        client,
        token,
        "/b24/app/session/",
        {"AUTH_ID": fresh["access_token"], "REFRESH_ID": fresh["refresh_token"]},
        as_json=True,
    )
    assert renewed.status_code == 200
    assert Account.objects.get(user_id=ANNA).state == Account.State.ACTIVE
    poll = frame_get(client, renewed.json()["token"], poll_url, as_json=True)
    assert poll.status_code == 200
    assert poll.json()["changes"][0]["state"] == "saved"  # inline mode: the poll delivered it
    assert texts(portal, task) == ["Final figures"]
