"""PostgreSQL restarts under a running app: requests fail cleanly while it is away, and once it
is back the same web and worker processes carry on, nothing restarted.

The app runs as in production: gunicorn (gthread) and a Celery worker with persistent database
connections (`CONN_MAX_AGE`'s default), both reaching PostgreSQL through a TCP proxy that plays
the restart (the machine's PostgreSQL is shared and stays up): the backends are terminated, every
connection is cut, new ones are refused for a few seconds, then the port accepts again.
"""

from __future__ import annotations

import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from django.db import connection

from results.models import ResultChange
from results.tasks import result_change_deliver_task, result_changes_sweep_task
from tests.appserver import AppServer
from tests.celery_worker import descendants
from tests.support.db import test_database_url
from tests.support.faults import LiveClient, TcpProxy, start_web
from tests.support.portals import post_frame
from tests.support.results import (
    add,
    applied,
    edit,
    installed,
    open_screen,
    start_worker,
    stop_worker,
)

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.redis,
    pytest.mark.django_db(transaction=True),
    pytest.mark.timeout(240),
]

ANNA, BORIS = 1, 2
THREADS = 4
"""gunicorn's threads (one gthread worker process)."""
DOWN_S = 5.0
"""How long the database refuses connections (a quick restart)."""
LEAKS = ("Traceback", "OperationalError", "psycopg", "connection refused", "5432")
"""What an error page must not show: a stack trace, driver names, where the database is."""


@pytest.fixture
def database_proxy():
    database = connection.settings_dict
    proxy = TcpProxy((database["HOST"], int(database["PORT"]))).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def app_behind_proxy(fake, settings, tmp_path, database_proxy):
    """The web app and a worker, both on the test database through `database_proxy`, with
    production's persistent connections; started after the fake portal, stopped at the end."""
    database = connection.settings_dict
    through_proxy = test_database_url().replace(
        f"@{database['HOST']}:{database['PORT']}/", f"@127.0.0.1:{database_proxy.port}/"
    )
    env = {key: value for key, value in os.environ.items() if key != "DJANGO_CONN_MAX_AGE"}
    web = start_web(
        {
            **env,
            "DATABASE_URL": through_proxy,
            "CELERY_BROKER_URL": settings.CELERY_BROKER_URL,
            "REDIS_URL": settings.REDIS_URL,
            "B24_OAUTH_SERVERS": fake.oauth_url,
            "B24_ALLOW_PRIVATE_PORTALS": "true",
            "PYTHONUNBUFFERED": "1",
        },
        tmp_path,
        threads=THREADS,
    )
    fake.app_url = web.url
    try:
        worker = start_worker(
            fake,
            settings,
            tmp_path / "worker.log",
            "dbrestart",
            env={"DATABASE_URL": through_proxy, "DJANGO_CONN_MAX_AGE": "60"},
        )
    except BaseException:
        web.stop()
        raise
    yield web, worker
    stop_worker(worker)
    web.stop()


def _database_goes_down(proxy: TcpProxy) -> float:
    """End the app's sessions as a restarting server does, then cut and refuse connections;
    returns when the database is to be back."""
    with connection.cursor() as cursor:  # the test's own connection, not through the proxy
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    proxy.drop_all()
    proxy.stop_accepting()
    return time.monotonic() + DOWN_S


def _database_comes_back(proxy: TcpProxy, at: float) -> None:
    time.sleep(max(0.0, at - time.monotonic()))
    proxy.start()


def _healthz(client) -> tuple[int, dict]:
    response = client.get("/healthz")
    return response.status_code, json.loads(response.content)


def _busy_threads(web: AppServer) -> None:
    """Requests side by side, so that each of gunicorn's threads serves some and keeps its
    database connection (`CONN_MAX_AGE`)."""
    with ThreadPoolExecutor(THREADS) as pool:
        statuses = pool.map(
            lambda _: requests.get(f"{web.url}/healthz", timeout=30).status_code,
            range(THREADS * 4),
        )
        assert set(statuses) == {200}


def _processes(web: AppServer, worker) -> set[int]:
    """The app's running processes: gunicorn's and the worker's, each with its children."""
    running = {web.process.pid, worker.pid}
    return running | set(descendants(web.process.pid)) | set(descendants(worker.pid))


def _wait_for(condition, what: str, log_path, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout:g} s for {what}\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)
    return value


def test_the_app_recovers_from_database_restarts_without_being_restarted(
    fake, portal, app_behind_proxy, database_proxy
):
    web, worker = app_behind_proxy
    client = LiveClient(web.url)
    installed(client, portal, ANNA)
    task = portal.add_task(title="Quarterly report")
    draft = portal.add_result(task, author_id=BORIS, text="draft")
    token = open_screen(client, portal, BORIS, task)[1]
    _busy_threads(web)
    processes = _processes(web, worker)
    assert database_proxy.connections_made, "the app does not reach the database by the proxy"

    # A restart while nobody uses the app: every connection the app keeps is dead when the
    # next requests come, and they must not fail for it.
    _database_comes_back(database_proxy, _database_goes_down(database_proxy))
    for _ in range(THREADS * 3):
        status, body = _healthz(client)
        assert status == 200, (body, web.tail())
    open_screen(client, portal, BORIS, task)

    # A restart while people work: what they ask for fails cleanly meanwhile.
    _busy_threads(web)
    portal.go_down()  # Bitrix24 is away too, so this change waits in the outbox
    assert "Queued" in add(client, token, task, "written before the restart").content.decode()
    queued = ResultChange.objects.get()
    back_at = _database_goes_down(database_proxy)
    status, body = _healthz(client)
    assert status == 503
    assert body["checks"]["database"]["ok"] is False
    assert all(check["ok"] for name, check in body["checks"].items() if name != "database")
    opened = post_frame(client, *portal.frame_post(BORIS, options={"taskId": str(task)}))
    for response in (opened, edit(client, token, task, draft, "during the restart")):
        assert response.status_code in (500, 503), response.status_code
        page = response.content.decode()
        assert not [leak for leak in LEAKS if leak.lower() in page.lower()], page[:2000]
    # The person in the task card reads why: the error page may be shown in their portal.
    assert "Try again in a minute" in opened.content.decode()
    assert opened.headers["Content-Security-Policy"] == f"frame-ancestors {portal.url}"
    # The worker meets the outage too: its attempt fails, and it lives on.
    result_change_deliver_task.delay(queued.pk)
    _wait_for(
        lambda: "OperationalError" in worker.log_path.read_text(),
        "the worker to fail on the missing database",
        worker.log_path,
    )
    _database_comes_back(database_proxy, back_at)
    portal.come_back()

    for _ in range(THREADS * 3):
        status, body = _healthz(client)
        assert status == 200, (body, web.tail())
    token = open_screen(client, portal, BORIS, task)[1]
    saved = edit(client, token, task, draft, "after the restart")
    assert "Saved" in saved.content.decode(), web.tail()
    assert [item["text"] for item in portal.results(task) if item["id"] == draft] == [
        "after the restart"
    ]
    # The change that waited in the outbox: the same worker delivers it, on its own retry or
    # when the beat's sweep (every minute, here every few seconds) hands it over again.
    sweeps = {"last": 0.0}

    def delivered() -> bool:
        if ResultChange.objects.filter(pk=queued.pk, state=ResultChange.State.SAVED).exists():
            return True
        if time.monotonic() - sweeps["last"] > 5:
            result_changes_sweep_task.delay()
            sweeps["last"] = time.monotonic()
        return False

    _wait_for(delivered, "the queued change to be delivered", worker.log_path, timeout=90)
    assert _processes(web, worker) == processes, "a process of the app was restarted"
    assert re.search(rf"change {queued.pk} attempt \d+ -> saved", worker.log_path.read_text())
    assert len(applied(portal, queued.idempotency_key)) == 1
    assert "written before the restart" in {item["text"] for item in portal.results(task)}
