"""Fairness between tenants: one portal's screen while another floods rebinds and edits.

The app runs as the Procfile's ``web`` process does (gunicorn, ``gthread``, production settings
but for the loopback allowances of ``bench.common``), on PostgreSQL with the shared Redis rate
limiter and no broker, against the fake Bitrix24 in this process. Two portals are installed
through the install wizard over HTTP:

* **A**, the flooder, keeps the default request budget (``B24_RATE_LIMIT``, 50/2, the fake's
  bucket alike). Its admin's ``FLOOD`` clients send, with no pause, "Bind again"
  (``POST /b24/app/rebind/``: ``placement.get`` and ``event.get``) and an add of a result
  (``POST /b24/app/results/add/``, JSON) in turn, which uses A's budget up within a second.
* **B**, the other tenant, has its budget raised to 10^6/10^6 (its own limit is not what is
  measured). ``PEOPLE`` people of B open a task card (``POST /b24/app/``: ``profile`` and the
  task's ``tasks.task.result.list``), each one after the other's answer, with no pause.

Phases: B alone for ``SECONDS`` s, then B while A floods for ``SECONDS`` s. Per phase: B's
screen opens (latency median, p95, max; anything but a 200 with the task's result is a
failure), ``/healthz`` asked every 0.5 s (median, max), and A's answers by status. Every web
request waits at most ``WEB_LIMITER_WAIT_S`` for a slot of its portal's budget, so A's requests
answer "busy" (503) or "queued" at once instead of sleeping in the threads B is served by.

Needs PostgreSQL (``BENCH_FAIRNESS_DATABASE_URL``, default database ``b24bench_fairness``,
created when missing and migrated; the portals are deleted at the end) and Redis
(``BENCH_FAIRNESS_REDIS_URL``, default DB 7: only keys of the bench's own portals, which
expire); without them it prints why it skipped. ``DATABASE_URL``, ``REDIS_URL`` and
``CELERY_BROKER_URL`` are not used.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    ensure_database,
    fake_and_database,
    fmt,
    print_table,
    record,
    require_loopback,
    skipped,
    summary,
)
from bench.load import _install, _redis_problem  # the same install and Redis check as `load`
from tests.appserver import PROCFILE_ACCESS_FORMAT, AppServer

BENCH_ORDER = 37
TITLE = "fairness: one portal's screen while another floods rebinds and edits"

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/b24bench_fairness"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/7"
SECONDS = max(3, min(int(os.environ.get("BENCH_FAIRNESS_SECONDS", "15")), 300))
"""Measured seconds of each phase."""
FLOOD = int(os.environ.get("BENCH_FAIRNESS_FLOOD", "60"))
"""Portal A's concurrent clients, each sending its next request as soon as it has an answer."""
PEOPLE = 5
WORKERS = 2
THREADS = 8
"""The Procfile's gunicorn: 2 gthread workers of 8 threads (as `load`)."""
NO_LIMIT = (10**6, 10**6)
HTTP_TIMEOUT_S = 90
"""Longer than the longest sleep of a web request before the web wait (30 s), so that a run of
the code before it measures instead of failing."""
HEALTH_EVERY_S = 0.5
READY_TIMEOUT_S = 30.0


@dataclass
class Phase:
    name: str
    opens: list[float] = field(default_factory=list)
    """Seconds of B's successful screen opens."""
    open_failures: Counter = field(default_factory=Counter)
    health: list[float] = field(default_factory=list)
    flood: Counter = field(default_factory=Counter)
    """A's answers: ``(kind, status)``; ``queued``/``saved`` for an add answered 200."""


def main(argv: list[str]) -> int:
    database_url = os.environ.get("BENCH_FAIRNESS_DATABASE_URL") or DEFAULT_DATABASE_URL
    redis_url = os.environ.get("BENCH_FAIRNESS_REDIS_URL") or DEFAULT_REDIS_URL
    problem = ensure_database(database_url) or _redis_problem(redis_url)
    if problem:
        return skipped(TITLE, problem)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-fairness-") as tmp:
        folder = Path(tmp)
        server = AppServer(
            folder / "gunicorn.out",
            workers=WORKERS,
            threads=THREADS,
            access_log=folder / "access.log",
            access_format=PROCFILE_ACCESS_FORMAT,
            graceful_timeout_s=5,
        )
        os.environ["REDIS_URL"] = redis_url
        os.environ["CELERY_BROKER_URL"] = ""
        os.environ["DJANGO_STATIC_ROOT"] = str(folder / "static")
        os.environ["B24_APP_URL"] = server.url
        with fake_and_database(database_url) as fake:
            from django.core.management import call_command
            from django.db import connections

            call_command("collectstatic", interactive=False, verbosity=0, ignore_patterns=["admin"])
            connections.close_all()
            phases = _run(fake, server)
    _print(phases, time.monotonic() - started)
    _record(phases)
    return 0 if all(not phase.open_failures for phase in phases) else 1


def _run(fake: Any, server: AppServer) -> list[Phase]:
    import requests

    from b24app.portals.models import Portal
    from b24app.portals.services import rate_limiter

    fake.app_url = server.url
    flooder = fake.add_portal()
    flooder.add_user(name="Anna", last_name="Smirnova", admin=True)
    other = fake.add_portal(rate_limit=NO_LIMIT)
    other.add_user(name="Vera", last_name="Orlova", admin=True)
    people = [other.add_user(name=f"Person {n + 1}", last_name="B") for n in range(PEOPLE)]
    task = other.add_task(title="Quarterly report", created_by=1, responsible_id=1)
    other.add_result(task, author_id=1, text="Report sent")
    flood_task = flooder.add_task(title="Flood", created_by=1, responsible_id=1)
    server.start()
    try:
        server.wait_ready(READY_TIMEOUT_S)
        _install(flooder, 1)
        _install(other, 1)
        Portal.objects.filter(member_id=other.member_id).update(
            rate_limit=f"{NO_LIMIT[0]}/{NO_LIMIT[1]}"
        )
        # The install's calls were paced at 50/2; at B's new limit that schedule would hold
        # its first requests back for a few seconds.
        rate_limiter().reset(other.member_id)
        opens = [other.frame_post(person, options={"taskId": str(task)}) for person in people]
        url, fields = flooder.frame_post(1, placement="DEFAULT")
        answer = requests.post(require_loopback(url), data=fields, timeout=HTTP_TIMEOUT_S)
        token = answer.text.split('data-frame-token="', 1)[1].split('"', 1)[0]
        phases = []
        for name, flooding in (("B alone", False), (f"B while A floods ({FLOOD})", True)):
            phases.append(_phase(name, server.url, opens, token if flooding else None, flood_task))
        return phases
    finally:
        server.stop()
        Portal.objects.filter(member_id__in=[flooder.member_id, other.member_id]).delete()


def _phase(name: str, app_url: str, opens: list, token: str | None, flood_task: int) -> Phase:
    import requests

    phase = Phase(name)
    lock = threading.Lock()
    stop_at = time.monotonic() + SECONDS
    flood_stop = threading.Event()

    def person(post: tuple[str, dict]) -> None:
        url, fields = post
        session = requests.Session()
        while time.monotonic() < stop_at:
            started = time.monotonic()
            try:
                response = session.post(url, data=fields, timeout=HTTP_TIMEOUT_S)
            except requests.RequestException as exc:
                with lock:
                    phase.open_failures[type(exc).__name__] += 1
                continue
            elapsed = time.monotonic() - started
            with lock:
                if response.status_code == 200 and "Report sent" in response.text:
                    phase.opens.append(elapsed)
                else:
                    phase.open_failures[f"HTTP {response.status_code}"] += 1

    def health() -> None:
        while time.monotonic() < stop_at:
            started = time.monotonic()
            try:
                requests.get(f"{app_url}/healthz", timeout=HTTP_TIMEOUT_S)
            except requests.RequestException:
                pass
            with lock:
                phase.health.append(time.monotonic() - started)
            time.sleep(HEALTH_EVERY_S)

    def flood(number: int) -> None:
        session = requests.Session()
        headers = {"X-Frame-Token": token, "Accept": "application/json"}
        sent = 0
        while not flood_stop.is_set():
            sent += 1
            try:
                if sent % 2:
                    response = session.post(
                        f"{app_url}/b24/app/rebind/",
                        data={"frame_token": token},
                        timeout=HTTP_TIMEOUT_S,
                    )
                    kind = ("rebind", str(response.status_code))
                else:
                    response = session.post(
                        f"{app_url}/b24/app/results/add/",
                        data={"task": flood_task, "text": f"Flood {number}.{sent}"},
                        headers=headers,
                        timeout=HTTP_TIMEOUT_S,
                    )
                    state = response.status_code == 200 and response.json()["change"]["state"]
                    kind = ("add", state or str(response.status_code))
            except (requests.RequestException, ValueError, KeyError) as exc:
                kind = ("error", type(exc).__name__)
            with lock:
                phase.flood[kind] += 1

    clients = FLOOD if token else 0
    with ThreadPoolExecutor(PEOPLE + 1 + clients) as pool:
        flooding = [pool.submit(flood, n) for n in range(clients)]
        if flooding:
            time.sleep(1.0)  # A's budget is spent and its requests fill the queue
            stop_at = time.monotonic() + SECONDS
        watched = [pool.submit(person, post) for post in opens] + [pool.submit(health)]
        for future in watched:
            future.result()
        flood_stop.set()
        for future in flooding:
            future.result()
    return phase


def _print(phases: list[Phase], elapsed: float) -> None:
    rows = []
    for phase in phases:
        opens, health = summary(phase.opens), summary(phase.health)
        rows.append(
            [
                phase.name,
                len(phase.opens),
                sum(phase.open_failures.values()),
                fmt(opens["median"] * 1000, 0),
                fmt(opens["p95"] * 1000, 0),
                fmt(opens["max"] * 1000, 0),
                fmt(health["median"] * 1000, 0),
                fmt(health["max"] * 1000, 0),
                sum(phase.flood.values()),
            ]
        )
    notes = []
    for phase in phases:
        if phase.flood:
            shown = ", ".join(f"{k} {s}: {n}" for (k, s), n in sorted(phase.flood.items()))
            notes.append(f"{phase.name}: A's answers by kind and status: {shown}")
        if phase.open_failures:
            notes.append(f"{phase.name}: B's failed opens: {dict(phase.open_failures)}")
    notes += [
        f"{SECONDS} s per phase; gunicorn {WORKERS} workers x {THREADS} threads; {PEOPLE} people"
        " of B open the task card one request after another; A's clients send rebinds and"
        " adds in turn with no pause",
        f"the whole bench took {elapsed:.0f} s; load average {_load()}",
    ]
    print_table(
        TITLE,
        [
            "phase",
            "B opens",
            "failed",
            "median ms",
            "p95 ms",
            "max ms",
            "healthz median ms",
            "healthz max ms",
            "A requests",
        ],
        rows,
        notes,
    )


def _record(phases: list[Phase]) -> None:
    alone, flooded = (summary(phase.opens) for phase in phases)
    record("fairness", "B screen open alone: median / p95 ms", _pair(alone))
    record(
        "fairness",
        f"B screen open while A floods ({FLOOD} clients): median / p95 ms",
        _pair(flooded),
        "median < 2000",
    )


def _pair(figures: dict[str, float]) -> str:
    return f"{fmt(figures['median'] * 1000, 0)} / {fmt(figures['p95'] * 1000, 0)}"


def _load() -> str:
    try:
        return " ".join(f"{value:.1f}" for value in os.getloadavg())
    except OSError:
        return "-"
