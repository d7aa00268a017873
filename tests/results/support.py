"""Helpers for the results tests: open the embedded screen, call its frame endpoints, and read
the fake portal's records of what reached Bitrix24 and as whom."""

from __future__ import annotations

import re

from tests.portals.support import install, post_frame

FRAME_TOKEN = re.compile(r'data-frame-token="([^"]+)"')
WRITE_METHODS = ("tasks.task.result.add", "tasks.task.result.update", "tasks.task.result.delete")
UNLIMITED = "100000/100000"


def frame_token(response) -> str:
    """The frame token the screen's HTML carries on `<main>`."""
    match = FRAME_TOKEN.search(response.content.decode())
    assert match, response.content.decode()[:2000]
    return match.group(1)


def installed(client, portal, user_id: int = 1) -> None:
    assert install(client, portal, user_id).status_code == 200


def open_screen(client, portal, user_id: int, task_id: int, lang: str = "en"):
    """Open the app in the task card as `user_id`; returns (response, frame token)."""
    response = post_frame(
        client, *portal.frame_post(user_id, options={"taskId": str(task_id)}, lang=lang)
    )
    assert response.status_code == 200, response.content.decode()[:2000]
    return response, frame_token(response)


def frame_post(client, token: str, path: str, data: dict | None = None, *, as_json=False):
    extra = {"HTTP_X_FRAME_TOKEN": token}
    if as_json:
        extra["HTTP_ACCEPT"] = "application/json"
    return client.post(path, data or {}, **extra)


def frame_get(client, token: str, path: str, *, as_json=False):
    extra = {"HTTP_X_FRAME_TOKEN": token}
    if as_json:
        extra["HTTP_ACCEPT"] = "application/json"
    return client.get(path, **extra)


def add(client, token: str, task_id: int, text: str, **kwargs):
    return frame_post(
        client, token, "/b24/app/results/add/", {"task": task_id, "text": text}, **kwargs
    )


def edit(client, token: str, task_id: int, result_id: int, text: str, **kwargs):
    return frame_post(
        client,
        token,
        f"/b24/app/results/{result_id}/edit/",
        {"task": task_id, "text": text},
        **kwargs,
    )


def delete(client, token: str, task_id: int, result_id: int, **kwargs):
    return frame_post(
        client, token, f"/b24/app/results/{result_id}/delete/", {"task": task_id}, **kwargs
    )


def html(response) -> str:
    return response.content.decode()


def writes(portal, method: str | None = None) -> list[dict]:
    """REST 3.0 write requests the portal received (all of them, or of one method)."""
    names = (method,) if method else WRITE_METHODS
    return [r for r in portal.requests if r["api"] == "v3" and (r["method_name"] or "") in names]


def acting_user(fake, record: dict) -> int | None:
    """The Bitrix24 user a recorded REST request acted as: the owner of its `auth` token."""
    body = record.get("body") if isinstance(record.get("body"), dict) else {}
    with fake.lock:
        token = fake.access_tokens.get(body.get("auth"))
        return token.user_id if token is not None else None


def applied(portal, key: str) -> list[dict]:
    """Requests under `key` that the portal carried out (200, not an idempotent replay)."""
    return [
        r
        for r in writes(portal)
        if r["idempotency_key"] == key and r["status"] == 200 and not r["replayed"]
    ]


def texts(portal, task_id: int) -> list[str]:
    return sorted(item["text"] for item in portal.results(task_id))


# --- Celery workers the fault tests start and kill ---------------------------------------------


def start_worker(fake, settings, log_path, name: str):
    """A `celery -A b24app worker` like `celery_worker_process` (prefork, 2 processes, the run's
    broker, the test database, trusting the fake OAuth server), but in its own session so that
    it can be killed as a group. Ready when its log says so or it answers a ping."""
    import os
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    from b24app.celery import app
    from tests.conftest import test_database_url

    env = {
        **os.environ,
        "DATABASE_URL": test_database_url(),
        "CELERY_BROKER_URL": settings.CELERY_BROKER_URL,
        "REDIS_URL": settings.REDIS_URL,
        "B24_OAUTH_SERVERS": fake.oauth_url,
        "B24_ALLOW_PRIVATE_PORTALS": "true",
        "DJANGO_CONN_MAX_AGE": "0",
        "PYTHONUNBUFFERED": "1",
    }
    node = f"{name}-{os.getpid()}@{socket.gethostname()}"
    with open(log_path, "w") as out:
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "b24app",
                "worker",
                "--pool",
                "prefork",
                "--concurrency",
                "2",
                "--hostname",
                node,
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "--loglevel",
                "INFO",
            ],
            cwd=Path(__file__).resolve().parents[2],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    worker.log_path = log_path
    worker.node = node
    deadline = time.monotonic() + 30
    while True:
        if "ready." in log_path.read_text() or app.control.ping([node], timeout=0.5):
            return worker
        if worker.poll() is not None or time.monotonic() > deadline:
            kill_worker(worker)
            raise AssertionError(
                f"the Celery worker did not start:\n{log_path.read_text()[-3000:]}"
            )


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (Linux /proc)."""
    import os

    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_worker(worker) -> list[int]:
    """SIGKILL a worker we started and its pool processes, by id, at once; returns the ids."""
    import os
    import signal

    if worker.poll() is not None:
        return []
    pids = [worker.pid, *descendants(worker.pid)]
    if os.getpgid(worker.pid) == worker.pid and os.getpgid(0) != worker.pid:
        os.killpg(worker.pid, signal.SIGKILL)  # its own process group: the whole group at once
    else:
        for pid in pids:  # shares our group (the conftest worker): each process by its id
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    worker.wait(timeout=10)
    return pids


def stop_worker(worker) -> None:
    """Stop a worker from `start_worker` (warm shutdown, then SIGKILL)."""
    import os
    import signal
    import subprocess

    if worker.poll() is not None:
        return
    os.killpg(worker.pid, signal.SIGTERM)
    try:
        worker.wait(timeout=20)
    except subprocess.TimeoutExpired:
        kill_worker(worker)
