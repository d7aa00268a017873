"""A real `celery -A b24app worker` for tests: started in its own session on the run's broker
and the test database, trusting the fake OAuth server; stopped, or killed mid-work, as a group."""

from __future__ import annotations


def start_worker(fake, settings, log_path, name: str, concurrency: int = 2, env=None):
    """Start a worker (prefork, `concurrency` processes) named `name`, logging to `log_path`;
    ready when its log says so or it answers a ping. `env` overrides its environment.
    `celery_worker_process` in tests/conftest.py is one; `bench/throughput.py` starts them
    with 1 and 4 processes and production's persistent database connections."""
    import os
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    from b24app.celery import app
    from tests.support.db import test_database_url

    env = {
        **os.environ,
        "DATABASE_URL": test_database_url(),
        "CELERY_BROKER_URL": settings.CELERY_BROKER_URL,
        "REDIS_URL": settings.REDIS_URL,
        "B24_OAUTH_SERVERS": fake.oauth_url,
        "B24_ALLOW_PRIVATE_PORTALS": "true",
        "DJANGO_CONN_MAX_AGE": "0",
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
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
                str(concurrency),
                "--hostname",
                node,
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "--loglevel",
                "INFO",
            ],
            cwd=Path(__file__).resolve().parents[1],
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
