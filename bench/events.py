"""Lifecycle events delivered three times each: all answered, each applied once, and how fast.

The app runs as in production, under gunicorn (gthread workers, ``b24app.wsgi``) on a free
loopback port, on PostgreSQL, with background work inline and the in-process rate limiter (no
broker, no Redis). The fake Bitrix24 (in this process) has 100 portals with 10 admins each; each
portal gets 10 events, ``ONAPPINSTALL`` from its first admin and then ``ONAPPUPDATE`` from each
of the others (with a new ``application_token`` each time, as bitrix24-protocol.md §4.3 says).
Every event body is built once, with the tokens the fake issued for it, and POSTed three times as
it is (every copy of an event is the same body) by 16 sender threads, the copies a few positions
apart in the sending order so that duplicates are in flight together.

"Applied" is read from the database, not from the answers: every event carries the tokens of a
user no other event names, so its effect is that user's account holding exactly those tokens at
``token_version`` 1 (2 or more means a copy was applied again, 0 or no account means it was
lost) and, for ``ONAPPINSTALL``, marked as the installer. The portal rows, blocked rows and
event receipts are counted as well. The bench exits non-zero when an answer is a 5xx (or none
came) or an event was applied more than once.

Needs PostgreSQL: ``BENCH_EVENTS_DATABASE_URL`` (default
``postgres://postgres@127.0.0.1:5432/b24bench_events``, created when missing and migrated). The
rows the run creates are deleted at the end. Without PostgreSQL it prints why it skipped.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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
from tests.appserver import AppServer

BENCH_ORDER = 50
TITLE = "events delivered 3 times each"

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/b24bench_events"
PORTALS = 100
EVENTS_PER_PORTAL = 10
"""One ``ONAPPINSTALL``, then ``ONAPPUPDATE``s; each from another admin of the portal."""
COPIES = 3
SENDERS = 16
SPREAD = 4
"""Positions between two copies of one event in the sending order: with 16 senders, the three
copies are usually in flight at the same time, and sometimes one comes after another's answer."""
WORKERS, THREADS = 2, 8
"""gunicorn's gthread workers and threads per worker (the Procfile's defaults)."""
START_TIMEOUT_S = 60.0
DELIVERY_TIMEOUT_S = 30.0
NO_LIMIT = (10**6, 10**6)
EVENTS_PATH = "/b24/events/"


@dataclass(frozen=True)
class Event:
    """One event as Bitrix24 would send it, and the tokens it carries for ``user``."""

    member_id: str
    user: int
    name: str
    pairs: tuple[tuple[str, str], ...]
    """The body's form fields, built once: every delivery encodes them to the same bytes."""
    access_token: str
    refresh_token: str


@dataclass(frozen=True)
class Answer:
    """What the app answered to one delivery of an event."""

    status: int | None
    """HTTP status; ``None`` when no answer came (connection refused, reset, timed out)."""
    outcome: str
    """The events view's ``outcome`` (accepted) or ``error`` (refused), else what was read."""
    ms: float


def main(argv: list[str]) -> int:
    database_url = os.environ.get("BENCH_EVENTS_DATABASE_URL", DEFAULT_DATABASE_URL)
    problem = ensure_database(database_url)
    if problem:
        return skipped(TITLE, problem)
    with fake_and_database(database_url) as fake:
        return _run(fake, database_url)


def _run(fake: Any, database_url: str) -> int:
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "CELERY_BROKER_URL": "",
        "REDIS_URL": "",
        "B24_OAUTH_SERVERS": fake.oauth_url,
    }
    with tempfile.TemporaryDirectory(prefix="bench-events-") as folder:
        server = AppServer(
            Path(folder) / "gunicorn.out", workers=WORKERS, threads=THREADS, graceful_timeout_s=10
        ).start(env)
        fake.app_url = server.url
        try:
            try:
                events = _events(fake)  # while gunicorn starts
                server.wait_ready(START_TIMEOUT_S)
                _warm_up(server.url)
                started = time.monotonic()
                answers = _deliver(events, server.url + EVENTS_PATH)
                elapsed = time.monotonic() - started
            finally:
                server.stop()
                log_tail = server.tail()
            effects = _effects(events, [portal.member_id for portal in fake.portals])
        finally:
            _delete([portal.member_id for portal in fake.portals])
    effects["checks"] = _checks(fake)
    _print(events, answers, effects, elapsed)
    status = _verdict(answers, effects)
    if status:
        print(f"the end of the app's log:\n{log_tail}", flush=True)
    return status


def _events(fake: Any) -> list[Event]:
    """The events, in sending order: every portal's install, then each round of updates."""
    portals = []
    for _ in range(PORTALS):
        portal = fake.add_portal(rate_limit=NO_LIMIT)
        portal.set_rate_limit(*NO_LIMIT)
        require_loopback(portal.url)
        admins = [
            portal.add_user(name="Admin", last_name=str(number), admin=True)
            for number in range(1, EVENTS_PER_PORTAL + 1)
        ]
        portals.append((portal, admins))
    events = []
    for round_number in range(EVENTS_PER_PORTAL):
        for portal, admins in portals:
            name = "ONAPPINSTALL" if round_number == 0 else "ONAPPUPDATE"
            if name == "ONAPPUPDATE":
                with fake.lock:  # an update brings a new application_token (§4.3)
                    portal.application_token = secrets.token_hex(16)
            user = admins[round_number]
            pairs = portal.event_body(name, user_id=user)
            auth = {key: value for key, value in pairs if key.startswith("auth[")}
            events.append(
                Event(
                    member_id=portal.member_id,
                    user=user,
                    name=name,
                    pairs=tuple(pairs),
                    access_token=str(auth["auth[access_token]"]),
                    refresh_token=str(auth["auth[refresh_token]"]),
                )
            )
    return events


def _warm_up(url: str) -> None:
    """Every worker thread loads the URL conf and opens its database connection first."""
    with ThreadPoolExecutor(SENDERS) as pool:
        list(pool.map(lambda _: _get(f"{url}/healthz"), range(WORKERS * THREADS * 2)))


def _deliver(events: list[Event], url: str) -> list[Answer]:
    """POST every event ``COPIES`` times from ``SENDERS`` threads, copies ``SPREAD`` apart."""
    order = sorted(
        (index + copy * SPREAD, copy, index)
        for index in range(len(events))
        for copy in range(COPIES)
    )
    with ThreadPoolExecutor(SENDERS) as pool:
        return list(pool.map(lambda item: _post(url, events[item[2]]), order))


def _post(url: str, event: Event) -> Answer:
    """One delivery, as the fake's event queue makes it: a form POST on a new connection."""
    from tests.fakeportal.events import post_form

    started = time.perf_counter()
    status, text = post_form(url, event.pairs, DELIVERY_TIMEOUT_S)
    ms = (time.perf_counter() - started) * 1000
    return Answer(status, _outcome(text) if status is not None else text, ms)


def _outcome(text: str) -> str:
    try:
        answer = json.loads(text)
    except ValueError:
        return text.strip().splitlines()[0][:60] if text.strip() else "(empty body)"
    if not isinstance(answer, dict):
        return "(not an object)"
    return str(answer.get("outcome") or answer.get("error") or "(no outcome)")


def _get(url: str) -> int | None:
    """The status of a GET, or ``None`` when nothing answered."""
    import requests

    try:
        return requests.get(url, timeout=5, allow_redirects=False).status_code
    except requests.RequestException:
        return None


def _effects(events: list[Event], member_ids: list[str]) -> dict[str, Any]:
    """What the events left in the database, per event and in all."""
    from b24app.portals.models import Account, EventReceipt, Portal

    accounts = {
        (account.portal.member_id, account.user_id): account
        for account in Account.objects.select_related("portal").filter(
            portal__member_id__in=member_ids
        )
    }
    per_event = Counter(
        _applied(event, accounts.get((event.member_id, event.user))) for event in events
    )
    portals = Portal.objects.filter(member_id__in=member_ids)
    return {
        "per_event": per_event,
        "portals": portals.count(),
        "active_portals": portals.filter(state=Portal.State.ACTIVE).count(),
        "blocked_portals": portals.filter(state=Portal.State.BLOCKED).count(),
        "accounts": len(accounts),
        "blocked_accounts": sum(
            account.state == Account.State.BLOCKED for account in accounts.values()
        ),
        "receipts": EventReceipt.objects.filter(member_id__in=member_ids).count(),
    }


def _applied(event: Event, account: Any) -> str:
    """``once``, ``more than once``, ``not applied`` or ``other tokens``, from the account."""
    if account is None or account.token_version == 0:
        return "not applied"
    if account.token_version > 1:
        return "more than once"
    installer_ok = event.name != "ONAPPINSTALL" or account.is_installer
    tokens_ok = (
        account.access_token == event.access_token and account.refresh_token == event.refresh_token
    )
    return "once" if installer_ok and tokens_ok else "other tokens"


def _checks(fake: Any) -> tuple[int, int]:
    """The app's ``app.info`` calls at the OAuth server and ``profile`` calls at the portals."""
    with fake.lock:
        app_info = sum(1 for request in fake.requests if request["method_name"] == "app.info")
    return app_info, sum(len(portal.calls("profile")) for portal in fake.portals)


def _delete(member_ids: list[str]) -> None:
    from b24app.portals.models import EventReceipt, Portal

    Portal.objects.filter(member_id__in=member_ids).delete()
    EventReceipt.objects.filter(member_id__in=member_ids).delete()


def _print(
    events: list[Event], answers: list[Answer], effects: dict[str, Any], elapsed: float
) -> None:
    total = len(answers)
    ok = sum(1 for answer in answers if answer.status is not None and 200 <= answer.status < 300)
    per_event = effects["per_event"]
    outcomes = Counter((answer.status, answer.outcome) for answer in answers)
    latency = summary([answer.ms for answer in answers])
    rows = [
        ["portals x events", f"{PORTALS} x {EVENTS_PER_PORTAL}", "1 ONAPPINSTALL + ONAPPUPDATEs"],
        ["deliveries", total, f"{COPIES} per event, {SENDERS} senders"],
        ["answered 2xx", f"{ok} of {total}", ""],
    ]
    for (status, outcome), count in sorted(outcomes.items(), key=lambda item: -item[1]):
        rows.append([f"  answered {status if status is not None else '-'} {outcome}", count, ""])
    rows += [
        ["events applied once", f"{per_event['once']} of {len(events)}", "from the database"],
        ["  applied more than once", per_event["more than once"], "token_version > 1"],
        ["  not applied", per_event["not applied"], "no account, or token_version 0"],
        ["  other tokens", per_event["other tokens"], "not the event's tokens / installer"],
        ["portal rows (active)", f"{effects['portals']} ({effects['active_portals']})", ""],
        ["accounts", effects["accounts"], ""],
        [
            "blocked portals / accounts",
            f"{effects['blocked_portals']} / {effects['blocked_accounts']}",
            "",
        ],
        ["event receipts", effects["receipts"], "one per applied event"],
        [
            "app.info / profile calls",
            "{} / {}".format(*effects["checks"]),
            f"{len(events)} each if no copy were checked again",
        ],
    ]
    for name, selected in (
        ("latency, all answers (ms)", answers),
        ("latency, applied (ms)", [a for a in answers if a.outcome.startswith("onapp")]),
        ("latency, duplicate (ms)", [a for a in answers if a.outcome == "duplicate"]),
    ):
        figures = summary([answer.ms for answer in selected])
        rows.append(
            [
                name,
                f"{fmt(figures['median'])} / {fmt(figures['p95'])} / {fmt(figures['p99'])}",
                f"p50 / p95 / p99, max {fmt(figures['max'])}, n {len(selected)}",
            ]
        )
    rows.append(["deliveries per second", fmt(total / elapsed), f"{elapsed:.1f} s of sending"])
    notes = [
        f"gunicorn b24app.wsgi, gthread {WORKERS} workers x {THREADS} threads, on 127.0.0.1;",
        "PostgreSQL; no Celery broker, no Redis (in-process rate limiter); app logs to a file",
        "fake Bitrix24 in the bench's process, its rate limits raised to 10^6/10^6; every",
        "event is checked by the app with app.info (OAuth server) and profile (portal)",
        f"each body built once and POSTed {COPIES} times byte for byte on new connections;",
        f"copies {SPREAD} positions apart in the sending order of {SENDERS} sender threads",
        "latency: client side, from the POST to the whole answer read (nearest rank)",
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
        f"load average {', '.join(f'{value:.2f}' for value in os.getloadavg())}",
    ]
    print_table(TITLE, ["figure", "value", "note"], rows, notes)
    record("events", "answered 2xx", f"{ok} of {total}", target=f"{total} of {total}")
    record(
        "events",
        "events applied once",
        f"{per_event['once']} of {len(events)}",
        target=f"{len(events)} of {len(events)}",
    )
    record("events", "p99 ms", f"{fmt(latency['p99'])} ms")


def _verdict(answers: list[Answer], effects: dict[str, Any]) -> int:
    """0, or 1 with the reasons: a 5xx or a missing answer, or an event applied again."""
    failed = Counter(
        f"{answer.status} {answer.outcome}"
        for answer in answers
        if answer.status is None or answer.status >= 500
    )
    reasons = [f"{count} deliveries answered {what}" for what, count in failed.items()]
    again = effects["per_event"]["more than once"]
    if again:
        reasons.append(f"{again} events were applied more than once (token_version > 1)")
    for reason in reasons:
        print(f"FAILED: {reason}", flush=True)
    return 1 if reasons else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
