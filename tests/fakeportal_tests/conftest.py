"""Fixtures for the emulator's own tests. Needs no Django (run with -p no:django)."""

from __future__ import annotations

import pytest

from tests.fakeportal import FakeBitrix

from .support import CLIENT_ID, CLIENT_SECRET, AppCatcher


@pytest.fixture(scope="session", autouse=True)
def _collected_static():
    """Overrides the project-wide autouse fixture of tests/conftest.py (collectstatic):
    the emulator's tests use no Django and must run with ``-p no:django``."""
    yield


@pytest.fixture
def catcher():
    app = AppCatcher()
    yield app
    app.stop()


@pytest.fixture
def fake(catcher):
    with FakeBitrix(
        client_id=CLIENT_ID, client_secret=CLIENT_SECRET, app_url=catcher.url
    ) as emulator:
        emulator.timeout_delay_s = 0.6
        yield emulator


@pytest.fixture
def portal(fake):
    """A portal with Anna (1, admin), Boris (2), task 1 and no results."""
    p = fake.add_portal()
    assert p.add_user(name="Anna", last_name="Smirnova", admin=True) == 1
    assert p.add_user(name="Boris", last_name="Petrov") == 2
    assert p.add_task(title="Prepare the report") == 1
    return p


@pytest.fixture
def anna(portal):
    return portal.issue_tokens(1)


@pytest.fixture
def boris(portal):
    return portal.issue_tokens(2)
