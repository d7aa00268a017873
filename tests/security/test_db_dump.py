"""A dump of the database holds no secret in clear: after a flow that stores tokens, `pg_dump` of
the test database contains no access or refresh token, application token, authorization code,
client secret, frame token or token key, in clear, base64 or URL-encoded."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from urllib.parse import quote

import pytest
from django.conf import settings
from django.db import connection

from b24app.portals.models import Account, Portal
from results.models import ResultChange
from tests.fakeportal import issued_secrets
from tests.support.portals import issued_tokens, post_event
from tests.support.results import edit, frame_get, installed, open_screen

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


def pg_dump() -> str:
    """The whole test database as `pg_dump` writes it (schema and data, plain SQL)."""
    database = connection.settings_dict
    assert shutil.which("pg_dump"), "pg_dump is needed (postgresql-client)"
    env = {**os.environ}
    if database.get("PASSWORD"):
        env["PGPASSWORD"] = database["PASSWORD"]
    command = ["pg_dump", "--no-owner", "--dbname", database["NAME"]]
    if database.get("HOST"):
        command += ["--host", database["HOST"], "--port", str(database.get("PORT") or 5432)]
    if database.get("USER"):
        command += ["--username", database["USER"]]
    return subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout


def encodings(secret: str) -> dict[str, str]:
    """The forms a secret could take in a dump besides its own."""
    raw = secret.encode()
    return {
        "clear": secret,
        "base64": base64.b64encode(raw).decode().rstrip("="),
        "urlsafe base64": base64.urlsafe_b64encode(raw).decode().rstrip("="),
        "url-encoded": quote(secret, safe=""),
        "hex of the bytes": raw.hex(),
    }


def test_db_dump_holds_no_token_or_secret_in_clear(client, fake, portal, celery_eager):
    # Install, an update event, three people open the app, a refresh, an edit.
    installed(client, portal, 1)
    portal.add_user(name="Viktor", last_name="Orlov")
    task = portal.add_task(title="Prepare the report")
    result = portal.add_result(task, author_id=2, text="Draft")
    assert post_event(client, portal.event_body("ONAPPUPDATE", user_id=1)).status_code == 200
    frame_tokens = [open_screen(client, portal, user, task)[1] for user in (1, 2, 3)]
    portal.expire_access_tokens(2)
    assert frame_get(client, frame_tokens[1], f"/b24/app/task/?task={task}").status_code == 200
    assert "Saved" in edit(client, frame_tokens[1], task, result, "Final").content.decode()
    boris = Account.objects.get(portal__member_id=portal.member_id, user_id=2)
    assert boris.last_refreshed_at is not None  # the refresh happened and was stored
    assert ResultChange.objects.filter(state=ResultChange.State.SAVED).count() == 1
    assert Portal.objects.get(member_id=portal.member_id).application_token_hash

    dump = pg_dump()

    # The dump has the rows, searched the way secrets are: the portal's member_id is there.
    assert "COPY public.portals_account" in dump and portal.member_id in dump
    secrets = {
        "issued token or code": [*issued_secrets(), *issued_tokens(fake, portal)],
        "application token": [portal.application_token],
        "client secret": [settings.B24_CLIENT_SECRET],
        "frame token": frame_tokens,
        "token key": list(settings.B24_TOKEN_KEYS),
        "Django secret key": [settings.SECRET_KEY],
    }
    assert len(secrets["issued token or code"]) >= 10
    found = [
        f"{kind} {secret[:4]}*** ({form})"
        for kind, values in secrets.items()
        for secret in values
        for form, text in encodings(secret).items()
        if text in dump
    ]
    assert not found, found
