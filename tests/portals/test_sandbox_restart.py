"""`make run` restarts the sandbox portal against the same db.sqlite3: the app keeps one portal
row for it, active, and the people who used it before go on using it."""

import pytest

from b24app.portals import crypto
from b24app.portals.models import Account, Portal
from tests.fakeportal import FakeBitrix
from tests.fakeportal.__main__ import build_sandbox, sandbox_state
from tests.support.portals import post_event, post_frame

pytestmark = pytest.mark.django_db

MEMBER_ID = "5a4db0c5000000000000000000000001"  # the Makefile's SANDBOX_MEMBER_ID
RESULT = "Report sent to the board."  # one of the sandbox's results on task 1


class Sandbox:
    """One start of the sandbox (`python -m tests.fakeportal`, in-process), on the same ports
    as the start before it, as `make run` starts it: it sends ONAPPINSTALL for user 1."""

    def __init__(self, client, settings, ports=(0, 0), state=None):
        self.fake = FakeBitrix(
            client_id=settings.B24_CLIENT_ID,
            client_secret=settings.B24_CLIENT_SECRET,
            app_url="http://testserver",
        ).start(port=ports[0])
        self.portal = build_sandbox(self.fake, ports[1], "F", member_id=MEMBER_ID, state=state)
        settings.B24_OAUTH_SERVERS = (self.fake.oauth_url,)
        settings.B24_ALLOW_PRIVATE_PORTALS = True
        settings.B24_APP_URL = "http://testserver"
        self.client = client
        installed = post_event(client, self.portal.event_body("ONAPPINSTALL", user_id=1))
        assert installed.status_code == 200, installed.content

    @property
    def ports(self):
        return self.fake._require_started().port, self.portal.port

    def open_task(self, user_id: int) -> str:
        """The task card's Results tab as `user_id` opens it: the app's page."""
        url, fields = self.portal.frame_post(user_id, options={"taskId": 1})
        response = post_frame(self.client, url, fields)
        assert response.status_code == 200, response.content.decode()[-600:]
        return response.content.decode()

    def stop(self) -> dict:
        state = sandbox_state(self.fake, self.portal)
        self.fake.stop()
        return state


def _one_portal() -> Portal:
    (portal,) = Portal.objects.all()
    assert (portal.member_id, portal.state, portal.app_status) == (
        MEMBER_ID,
        Portal.State.ACTIVE,
        "F",
    )
    return portal


def test_a_restarted_sandbox_is_one_portal_its_people_keep_using(client, settings):
    first = Sandbox(client, settings)
    for user_id in (1, 2):  # Anna, then Boris ("View as")
        assert RESULT in first.open_task(user_id)
    before = _one_portal()
    ports, state = first.ports, first.stop()

    second = Sandbox(client, settings, ports, state)
    try:
        portal = _one_portal()
        assert portal.pk == before.pk
        assert portal.application_token_hash == before.application_token_hash
        assert portal.application_token_hash == crypto.fingerprint(second.portal.application_token)
        # Boris's stored tokens are from the first start: they still work at the second.
        for user_id in (1, 2):
            assert RESULT in second.open_task(user_id)
        assert sorted(Account.objects.values_list("user_id", "state")) == [
            (1, Account.State.ACTIVE),
            (2, Account.State.ACTIVE),
        ]
        _one_portal()
    finally:
        second.stop()


def test_a_sandbox_that_lost_its_state_is_still_the_same_portal(client, settings):
    """Without its state (the file deleted), the same member_id with a new application_token:
    the second ONAPPINSTALL is verified with app.info and updates the portal, not a new one."""
    first = Sandbox(client, settings)
    before = _one_portal()
    ports, _ = first.ports, first.stop()

    second = Sandbox(client, settings, ports)
    try:
        portal = _one_portal()
        assert portal.pk == before.pk
        assert portal.application_token_hash != before.application_token_hash
        assert portal.application_token_hash == crypto.fingerprint(second.portal.application_token)
        assert RESULT in second.open_task(1)
        _one_portal()
    finally:
        second.stop()
