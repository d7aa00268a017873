"""Browser tests: the app on one site (localhost), the fake portal on another (127.0.0.1), in
Debian's Chromium with every Cookie header stripped (`browser_page` in tests/conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture
def new_sandbox(live_server, fake, settings):
    """The sandbox's portal before the app is installed: no tab bound, and its admins get the
    installer (`/b24/install/`) when they open the app. The app is served by `live_server`."""
    # live_server serves /static/ through Django's finders, which know no hashed names.
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }
    settings.B24_APP_URL = live_server.url
    fake.app_url = live_server.url
    portal = fake.add_portal()
    portal.add_user(name="Anna", last_name="Smirnova", admin=True)
    portal.add_user(name="Boris", last_name="Petrov", admin=False)
    portal.add_task(title="Prepare the quarterly report")
    return portal


@pytest.fixture
def sandbox(new_sandbox, live_server):
    """The fake portal set up like `make run`'s sandbox: installed, the Results tab bound."""
    new_sandbox.bind_placement("TASK_VIEW_TAB", f"{live_server.url}/b24/app/", title="Results")
    new_sandbox.mark_installed()
    return new_sandbox
