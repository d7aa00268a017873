"""Frame tokens are signed with a key of their own (`B24_FRAME_SIGNING_KEY`, else derived from
the secret key), so a token forged with a guessed weak key, or with the secret key itself, is
refused."""

from __future__ import annotations

import pytest
from django.core import signing

from b24app.portals import frame
from b24app.portals.models import Account
from results.models import ResultChange
from tests.support.results import frame_get, installed, open_screen

pytestmark = pytest.mark.django_db

GUESSED = ["change-me", "changeme", "secret", "django-insecure-development-only-key"]


def _task_page(client, portal, token, task):
    return frame_get(client, token, f"/b24/app/task/?task={task}", as_json=True)


@pytest.fixture
def opened(client, portal):
    installed(client, portal, 1)
    task = portal.add_task(title="Prepare the report")
    _, token = open_screen(client, portal, 2, task)
    account = Account.objects.get(user_id=2)
    payload = {"p": account.portal_id, "a": account.pk, "l": "en"}
    return task, token, payload


@pytest.mark.parametrize("guessed", GUESSED)
def test_frame_token_signed_with_a_guessed_weak_secret_key_is_refused(
    client, portal, settings, opened, guessed
):
    """Even a deployment whose DJANGO_SECRET_KEY is that guess (one from before start-up refused
    weak keys) does not sign frame tokens with it."""
    task, good, payload = opened
    settings.SECRET_KEY = guessed
    requests_before = len(portal.requests)
    forged = signing.dumps(payload, key=guessed, salt=frame.SALT, compress=False)

    response = _task_page(client, portal, forged, task)

    assert response.status_code == 403
    assert response.json()["error"] == "frame_invalid"
    assert len(portal.requests) == requests_before  # nothing was read as that user
    assert not ResultChange.objects.exists()


def test_frame_token_signed_with_the_secret_key_is_refused_when_a_frame_key_is_set(
    client, portal, settings, opened
):
    task, good, payload = opened
    settings.B24_FRAME_SIGNING_KEY = "Zx8Wq2Lp5Nv9Rt3Yk7Hb1Mc6Df4Gs0Aj-Ue_Oi8Ek2Qw6Xr9Tn3Pb7Cy5Hl1"
    forged = signing.dumps(payload, key=settings.SECRET_KEY, salt=frame.SALT, compress=False)

    assert _task_page(client, portal, forged, task).status_code == 403
    # Tokens signed before the key changed are refused too: rotating it ends every frame
    # session (people reopen the app), and only those.
    assert _task_page(client, portal, good, task).status_code == 403
    _, fresh = open_screen(client, portal, 2, task)
    assert _task_page(client, portal, fresh, task).status_code == 200
