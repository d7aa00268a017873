"""A fake Bitrix24 portal + fake OAuth server for tests and the local sandbox.

Standard library only. See README.md in this folder and ``docs/PLATFORM.md`` (what Bitrix24
does where its documentation is silent, and the switch that plays each answer).

    from tests.fakeportal import FakeBitrix

    with FakeBitrix(client_id="app.x.1", client_secret="s") as fake:
        portal = fake.add_portal()
        anna = portal.add_user(name="Anna", last_name="Smirnova", admin=True)
        tokens = portal.issue_tokens(anna)
"""

from .fake import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, FakeBitrix
from .portal import FakePortal
from .util import issued_secrets

__all__ = [
    "FakeBitrix",
    "FakePortal",
    "DEFAULT_CLIENT_ID",
    "DEFAULT_CLIENT_SECRET",
    "issued_secrets",
]
