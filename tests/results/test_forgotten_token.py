"""A stored access token the portal no longer knows (`NO_AUTH_FOUND` before it expired: revoked,
or the portal lost it) is renewed once like an expired one; when the renewal fails too, the
person's next visit brings a token the app takes, so "Reopen the app" is advice that works."""

import pytest

from b24app.portals.models import Account
from tests.support.results import ANNA, html, installed_task, open_screen, post_screen

pytestmark = pytest.mark.django_db


def _forget(fake, *tokens: str) -> None:
    with fake.lock:
        for token in tokens:
            fake.access_tokens.pop(token, None)
            fake.refresh_tokens.pop(token, None)


def test_an_access_token_the_portal_forgot_is_renewed_and_the_screen_shows_the_results(
    client, fake, portal
):
    task = installed_task(client, portal, results=["Figures checked"])
    account = Account.objects.get(user_id=ANNA)
    _forget(fake, account.access_token)

    response, _ = open_screen(client, portal, ANNA, task)

    assert "Figures checked" in html(response)
    renewed = Account.objects.get(pk=account.pk)
    assert renewed.access_token != account.access_token
    assert renewed.token_version == account.token_version + 1


def test_when_the_renewal_fails_too_the_next_open_takes_the_frames_token(client, fake, portal):
    task = installed_task(client, portal, results=["Figures checked"])
    account = Account.objects.get(user_id=ANNA)
    _forget(fake, account.access_token, account.refresh_token)

    first = post_screen(client, portal, ANNA, options={"taskId": str(task)})
    assert "Figures checked" not in html(first)
    assert "Reopen the app" in html(first)

    again = post_screen(client, portal, ANNA, options={"taskId": str(task)})  # Anna reopens it
    assert again.status_code == 200 and "Figures checked" in html(again)
    stored = Account.objects.get(pk=account.pk)
    assert stored.state == Account.State.ACTIVE
    assert stored.access_token not in (account.access_token, "")
