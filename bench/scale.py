"""Scale: the operator admin, the per-request lookups and the keep-alive over 10,000 portals.

PostgreSQL holds 10,000 portals, 100,000 accounts and 100,000 result changes (seeded once and
kept between runs). The bench then measures, as they run in production:

* the admin pages an operator uses (``django.test.Client`` logged in as a superuser): the Portal
  changelist (first page, a search by member_id and by domain, a filter by state), a portal's
  change page with its accounts inline, the ResultChange changelist (first page, a search, a
  filter); each answer is checked (status, rows shown, the portal searched for);
* the lookups every request or job makes: the portal by ``member_id`` (placement POSTs and
  events), the frame session's account, the screen's pending changes, the delivery sweep;
* the keep-alive's selection of the accounts idle for 150+ days (0.5 % of them);
* the plan of each of those queries (``EXPLAIN (ANALYZE)``): the scans and indexes it uses;
* the peak memory (``VmHWM``) of a fresh web process serving the admin pages and a placement
  POST, and of a real Celery worker (solo pool, in-memory broker) running the keep-alive job:
  every idle account is refreshed for real at the fake OAuth server.

Needs PostgreSQL: ``BENCH_SCALE_DATABASE_URL`` (default
``postgres://postgres@127.0.0.1:5432/b24bench_scale``, created when missing and migrated).
``DATABASE_URL`` is ignored, so the bench never writes into a development or production database.
Run as a child of itself (``python -m bench.scale web|worker``) for the two memory figures.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from bench.common import (
    ROOT,
    ensure_database,
    fmt,
    in_process_environment,
    print_table,
    record,
    require_loopback,
    setup_django,
    start_fake,
)
from bench.screen import RESULT_ITEM

BENCH_ORDER = 60
TITLE = "scale: 10,000 portals, 100,000 accounts"

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/b24bench_scale"
RUNS = max(1, min(int(os.environ.get("BENCH_SCALE_RUNS", "3")), 50))
"""Timed repetitions of each page and lookup (after one warm-up); the median is reported."""

# --- the seeded data ---------------------------------------------------------------------------
#
# 10,000 portals: every 200th is a large one (209 users, of whom users 200..209 have not opened
# the app for 160 days), the others have 9 users: 50 * 209 + 9,950 * 9 = 100,000 accounts, 500
# (0.5 %) of them due for the keep-alive: each is refreshed for real in the worker, and 5,000 took
# 3 minutes on the 2-CPU bench machine. Each portal has 10 result changes: 100,000.

SEED_VERSION = 3
"""Bump it when the layout below changes: the old rows are deleted and seeded again."""
MEMBER_PREFIX = "5ca1e"
"""Every seeded portal's member_id starts with it (hex, as Bitrix24's are)."""
MARKER_MEMBER_ID = f"{MEMBER_PREFIX}5eed{SEED_VERSION:023x}"
"""The marker portal, written last in the seeding transaction: it exists once seeding is done."""
PORTALS = 10_000
LARGE_EVERY = 200
SMALL_USERS = 9
LARGE_USERS = 209
IDLE_FROM_USER = 200
"""On large portals, users from this id on are idle: their refresh tokens are 160 days old."""
IDLE_AGE = timedelta(days=160)
CHANGES_PER_PORTAL = 10
WEB_PORTAL = 1
"""The small portal the web process opens the screen of (placement POST) at the fake."""
SEARCHED_PORTAL = 4242
BATCH = 2_000
NO_LIMIT = (10**6, 10**6)
UNREACHABLE = "http://127.0.0.1:9"
"""Where seeded portals not backed by the fake point: nothing listens, nothing leaves loopback."""

ROW = re.compile(r"<th class=\"field-")
INLINE_ROW = re.compile(r'<tr class="form-row')
WEB_RESULTS = 20


def _member_id(index: int) -> str:
    return f"{MEMBER_PREFIX}{index:027x}"


def _domain(index: int) -> str:
    return f"b24-{index:05d}.scale.test"


def _is_large(index: int) -> bool:
    return index % LARGE_EVERY == 0


def _users(index: int) -> int:
    return LARGE_USERS if _is_large(index) else SMALL_USERS


def main(argv: list[str]) -> int:
    database_url = os.environ.get("BENCH_SCALE_DATABASE_URL", DEFAULT_DATABASE_URL)
    problem = ensure_database(database_url)
    if problem:
        print(f"== {TITLE}\nskipped: {problem}\n", flush=True)
        return 0
    _environment(database_url)
    fake = start_fake()
    try:
        setup_django(fake.oauth_url)
        from django.core.management import call_command
        from django.db import connections

        call_command("migrate", interactive=False, verbosity=0)
        with tempfile.TemporaryDirectory(prefix="bench-scale-") as static_root:
            _collect_static(static_root)
            try:
                return _run(fake, database_url, static_root)
            finally:
                connections.close_all()
    finally:
        fake.stop()


def _environment(database_url: str) -> None:
    """The in-process environment, with warnings only in the logs: the keep-alive logs a line
    per refresh."""
    in_process_environment(database_url)
    os.environ.setdefault("DJANGO_LOG_LEVEL", "WARNING")


def _run(fake: Any, database_url: str, static_root: str) -> int:
    from django.test import Client
    from django.test.utils import override_settings

    started = time.monotonic()
    seeded_s = _seed_once()
    counts = _counts()
    _reage()
    web = _prepare_fake(fake)
    _vacuum()
    prepared_s = time.monotonic() - started - (seeded_s or 0.0)

    client = Client()
    client.force_login(_operator())
    with override_settings(STATIC_ROOT=static_root):
        pages = _pages(client)
    lookups = _lookups()
    keepalive = _keepalive_selection()
    _print_pages(pages + lookups + [keepalive], counts, seeded_s, prepared_s)
    _print_plans(pages + lookups + [keepalive])

    web_rss = _web_process(fake, web, database_url, static_root)
    worker = _worker_process(fake, database_url)
    _print_memory(web_rss, worker)

    _record(pages, lookups, keepalive, web_rss, worker)
    print(f"   the whole run took {time.monotonic() - started:.0f} s\n", flush=True)
    served = set(web_rss["statuses"]) == {200} and web_rss["results shown"] == WEB_RESULTS
    return 0 if served and worker["refreshed"] == worker["due"] else 1


# --- seeding -----------------------------------------------------------------------------------


def _seed_once() -> float | None:
    """Seed the rows unless the marker portal says they are there; seconds spent, or None."""
    from django.db import transaction

    from b24app.portals.models import Portal

    if Portal.objects.filter(member_id=MARKER_MEMBER_ID).exists():
        return None
    started = time.monotonic()
    print(f"seeding {PORTALS:,} portals (once; kept for later runs) ...", flush=True)
    with transaction.atomic():
        stale = Portal.objects.filter(member_id__startswith=MEMBER_PREFIX)
        if stale.exists():  # an older layout (SEED_VERSION changed)
            stale.delete()
        rng = random.Random(SEED_VERSION)
        ciphertexts = _ciphertexts()
        for first in range(0, PORTALS, BATCH // 10):
            _seed_portals(range(first, min(first + BATCH // 10, PORTALS)), rng, ciphertexts)
        now = _now()
        Portal.objects.create(
            member_id=MARKER_MEMBER_ID,
            domain="seed-marker.scale.test",
            client_endpoint=f"{UNREACHABLE}/rest/",
            oauth_server=UNREACHABLE,
            state=Portal.State.UNINSTALLED,
            state_reason=f"marker of the scale bench's seeded rows (layout {SEED_VERSION})",
            last_seen_at=now,  # the instant the seeded times are relative to (see _reage)
        )
    return time.monotonic() - started


def _vacuum() -> None:
    """Fresh planner statistics and no dead rows, as autovacuum keeps them in production: it
    would get to the freshly seeded tables, and to the rows each run rewrites, only later."""
    from django.db import connection

    from b24app.portals.models import Account, Portal
    from results.models import ResultChange

    with connection.cursor() as cursor:
        for model in (Portal, Account, ResultChange):
            cursor.execute(f"VACUUM ANALYZE {model._meta.db_table}")


def _ciphertexts() -> tuple[list[str], list[str]]:
    """A handful of encrypted access and refresh tokens, shared by the seeded accounts:
    encrypting 200,000 values would dominate the seeding."""
    from b24app.portals import crypto

    return (
        [crypto.encrypt(f"seeded-access-token-{n:02d}-{'a' * 40}") for n in range(8)],
        [crypto.encrypt(f"seeded-refresh-token-{n:02d}-{'r' * 40}") for n in range(8)],
    )


def _portal_state(index: int) -> str:
    from b24app.portals.models import Portal

    if _is_large(index) or index == WEB_PORTAL or index == SEARCHED_PORTAL:
        return Portal.State.ACTIVE
    if index % 20 == 7:
        return Portal.State.BLOCKED
    if index % 20 == 13:
        return Portal.State.UNINSTALLED
    if index % 100 == 3:
        return Portal.State.NEW
    return Portal.State.ACTIVE


def _seed_portals(indexes: range, rng: random.Random, ciphertexts) -> None:
    from b24app.portals import crypto
    from b24app.portals.models import Account, Portal
    from results.models import ResultChange

    now = _now()
    access, refresh = ciphertexts
    portals = []
    for index in indexes:
        state = _portal_state(index)
        reason = {
            Portal.State.BLOCKED: "Refresh token rejected by Bitrix24 (invalid_grant); "
            "the user must open the app again",
            Portal.State.UNINSTALLED: "uninstalled on the portal",
            Portal.State.NEW: "",
        }.get(state, "installed")
        installed = now - timedelta(days=rng.uniform(1, 900))
        portals.append(
            Portal(
                member_id=_member_id(index),
                domain=_domain(index),
                client_endpoint=f"{UNREACHABLE}/rest/",
                oauth_server=UNREACHABLE,
                app_status="FPSTD"[index % 5],
                application_token_hash=crypto.fingerprint(f"seeded-application-token-{index}"),
                state=state,
                state_reason=reason,
                state_changed_at=installed + timedelta(days=rng.uniform(0, 30)),
                installed_at=None if state == Portal.State.NEW else installed,
                last_seen_at=now - timedelta(hours=rng.uniform(0, 24 * 60)),
            )
        )
    Portal.objects.bulk_create(portals)

    accounts = []
    for index, portal in zip(indexes, portals, strict=True):
        gone = portal.state == Portal.State.UNINSTALLED
        for user_id in range(1, _users(index) + 1):
            idle = _is_large(index) and user_id >= IDLE_FROM_USER
            # Active portals' tokens are younger than the keep-alive's 150 days; blocked and
            # uninstalled portals' may be older (the selection must skip them by the portal).
            age = IDLE_AGE if idle else timedelta(days=rng.uniform(0, 140 if not gone else 200))
            broken = not idle and rng.random() < 0.02
            error = ""
            if portal.state == Portal.State.BLOCKED and user_id == 1:
                error = portal.state_reason
            elif broken:
                error = rng.choice(
                    ["QUERY_LIMIT_EXCEEDED: temporary, will retry", "Refresh token rejected"]
                )
            blocked = gone or (portal.state == Portal.State.BLOCKED and user_id == 1) or broken
            accounts.append(
                Account(
                    portal=portal,
                    user_id=user_id,
                    display_name=f"User {user_id} of {index}",
                    is_installer=user_id == 1,
                    is_admin=user_id <= 2,
                    access_token_encrypted="" if gone else rng.choice(access),
                    refresh_token_encrypted="" if gone else rng.choice(refresh),
                    expires_at=None if gone else now - age + timedelta(hours=1),
                    scope="task,tasks,placement,user_brief",
                    token_version=rng.randint(1, 40),
                    tokens_issued_at=now - age,
                    state=Account.State.BLOCKED if blocked else Account.State.ACTIVE,
                    state_reason="app uninstalled" if gone else error,
                    last_refreshed_at=now - age if rng.random() < 0.5 else None,
                    last_refresh_error=error,
                    last_seen_at=now - age,
                )
            )
    Account.objects.bulk_create(accounts, batch_size=BATCH)

    by_portal: dict[int, list[Account]] = {}
    for account in accounts:
        by_portal.setdefault(account.portal_id, []).append(account)
    changes = []
    for portal in portals:
        for _ in range(CHANGES_PER_PORTAL):
            changes.append(_change(portal, rng.choice(by_portal[portal.pk]), rng, now))
    ResultChange.objects.bulk_create(changes, batch_size=BATCH)


def _change(portal, account, rng: random.Random, now) -> Any:
    """A result change as the outbox holds them: mostly saved, some refused, a few queued."""
    from results.models import ResultChange

    roll = rng.random()
    action = rng.choice(list(ResultChange.Action))
    created = now - timedelta(days=rng.uniform(0, 365))
    change = ResultChange(
        portal=portal,
        account=account,
        task_id=rng.randint(1, 5_000),
        result_id=rng.randint(1, 50_000),
        action=action,
        text_before="" if action == ResultChange.Action.ADD else "Draft of the quarterly report",
        text_after="" if action == ResultChange.Action.DELETE else "Figures checked, report sent",
        state=ResultChange.State.SAVED,
        attempts=1,
        created_at=created,
        next_attempt_at=created,
        delivered_at=created + timedelta(seconds=rng.uniform(0.2, 5)),
    )
    if roll < 0.03:
        change.state = ResultChange.State.FAILED
        change.delivered_at = None
        change.last_error = "BITRIX_REST_V3_EXCEPTION_ACCESSDENIEDEXCEPTION"
        change.last_error_message = "You can only edit your own results."
    elif roll < 0.04:  # queued: waiting out a busy portal's backoff
        change.state = ResultChange.State.QUEUED
        change.delivered_at = None
        change.attempts = rng.randint(1, 6)
        change.created_at = now - timedelta(minutes=rng.uniform(1, 60))
        change.next_attempt_at = now + timedelta(minutes=rng.uniform(1, 60))
        change.last_error = "QUERY_LIMIT_EXCEEDED"
    return change


def _now():
    from django.utils import timezone

    return timezone.now()


def _reage() -> None:
    """Keep the seeded ages true: shift the accounts' token times by the time since seeding (or
    the last run), so that exactly the idle accounts stay due for the keep-alive."""
    from django.db.models import F

    from b24app.portals.models import Account, Portal

    marker = Portal.objects.get(member_id=MARKER_MEMBER_ID)
    now = _now()
    shift = now - marker.last_seen_at
    if shift < timedelta(hours=1):
        return
    Account.objects.filter(portal__member_id__startswith=MEMBER_PREFIX).update(
        tokens_issued_at=F("tokens_issued_at") + shift, last_seen_at=F("last_seen_at") + shift
    )
    Portal.objects.filter(pk=marker.pk).update(last_seen_at=now)


def _counts() -> dict[str, int]:
    from b24app.portals.models import Account, Portal
    from results.models import ResultChange

    return {
        "portals": Portal.objects.count(),
        "accounts": Account.objects.count(),
        "result changes": ResultChange.objects.count(),
    }


@dataclass
class WebPortal:
    """The fake portal behind seeded portal ``WEB_PORTAL`` and the placement POST to open."""

    url: str
    fields: dict[str, str]


def _prepare_fake(fake: Any) -> WebPortal:
    """Back the large portals and the web portal with fake ones: the large portals' idle
    accounts get refresh tokens the fake OAuth server knows (160 days old, as seeded), and the
    web portal answers the placement POST. Undoes what the previous run's keep-alive changed."""
    from django.db import transaction

    from b24app.portals import crypto
    from b24app.portals.models import Account, Portal

    backings = {
        backing.member_id: backing
        for backing in (
            _fake_portal(fake, index, LARGE_USERS) for index in range(0, PORTALS, LARGE_EVERY)
        )
    }
    idle = Account.objects.filter(portal__member_id__in=list(backings), user_id__gte=IDLE_FROM_USER)
    tokens = []
    for pk, member_id, user_id in idle.values_list("pk", "portal__member_id", "user_id"):
        issued = backings[member_id].issue_tokens(user_id)
        tokens.append(
            (crypto.encrypt(issued["access_token"]), crypto.encrypt(issued["refresh_token"]), pk)
        )
    web = _fake_portal(fake, WEB_PORTAL, SMALL_USERS)
    task = web.add_task(title="Prepare the quarterly report", created_by=1)
    for number in range(WEB_RESULTS):
        web.add_result(task, author_id=1 + number % 2, text=f"Result {number + 1}")
    with transaction.atomic():
        for member_id, backing in backings.items():
            Portal.objects.filter(member_id=member_id).update(
                client_endpoint=backing.client_endpoint, oauth_server=fake.oauth_url
            )
        for access, refresh, pk in tokens:  # an UPDATE each: bulk_update's CASE is far slower
            Account.objects.filter(pk=pk).update(
                access_token_encrypted=access, refresh_token_encrypted=refresh
            )
        idle.update(
            tokens_issued_at=_now() - IDLE_AGE,
            state=Account.State.ACTIVE,
            state_reason="",
            last_refresh_error="",
        )
        # The web portal's people open it with tokens this run's fake issues: the ones a
        # previous run stored (still live by their expiry, unknown to this fake) are not kept.
        Account.objects.filter(portal__member_id=web.member_id).update(
            expires_at=_now() - IDLE_AGE, state=Account.State.ACTIVE, state_reason=""
        )
        Portal.objects.filter(member_id=web.member_id).update(
            domain=web.domain,
            client_endpoint=web.client_endpoint,
            oauth_server=fake.oauth_url,
            application_token_hash=crypto.fingerprint(web.application_token),
            rate_limit=f"{NO_LIMIT[0]}/{NO_LIMIT[1]}",
        )
    url, fields = web.frame_post(1, options={"taskId": str(task)})
    return WebPortal(url=url, fields=fields)


def _fake_portal(fake: Any, index: int, users: int) -> Any:
    backing = fake.add_portal(member_id=_member_id(index), rate_limit=NO_LIMIT)
    require_loopback(backing.url)
    for user_id in range(1, users + 1):
        backing.add_user(name="User", last_name=str(user_id), admin=user_id <= 2)
    backing.mark_installed()
    return backing


def _operator():
    from django.contrib.auth import get_user_model

    user, created = get_user_model().objects.get_or_create(
        username="scale-bench-operator",
        defaults={"is_staff": True, "is_superuser": True, "email": "operator@example.test"},
    )
    if created:
        user.set_unusable_password()
        user.save()
    return user


# --- measuring ---------------------------------------------------------------------------------


@dataclass
class Measured:
    """One page or lookup: its median time, its queries and the plans of its slowest ones."""

    name: str
    median_ms: float
    queries: int
    check: str
    plans: list[str]


def _measure(name: str, call: Callable[[], Any], check: Callable[[Any], str]) -> Measured:
    """Warm up (and check the answer), time ``RUNS`` calls, count the queries of one more."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    verdict = check(call())
    times = []
    for _ in range(RUNS):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    with CaptureQueriesContext(connection) as captured:
        check(call())
    slowest = sorted(captured.captured_queries, key=lambda query: -float(query["time"]))[:2]
    return Measured(
        name=name,
        median_ms=statistics.median(times),
        queries=len(captured.captured_queries),
        check=verdict,
        plans=[_plan(query["sql"]) for query in slowest],
    )


def _page_check(rows: int | None = None, contains: str = "", pattern=ROW):
    """A check of an admin page: 200, the number of rows (at least one), the text shown."""

    def check(response) -> str:
        if response.status_code != 200:
            raise RuntimeError(f"{response.request['PATH_INFO']} answered {response.status_code}")
        html = response.content.decode()
        found = len(pattern.findall(html))
        if (rows is not None and found != rows) or found == 0:
            raise RuntimeError(f"{response.request['PATH_INFO']}: {found} rows, not {rows}")
        if contains and contains not in html:
            raise RuntimeError(f"{response.request['PATH_INFO']} does not show {contains!r}")
        return f"{found} rows" + (f", shows {contains}" if contains else "")

    return check


def _pages(client) -> list[Measured]:
    from b24app.portals.models import Portal

    searched = _member_id(SEARCHED_PORTAL)
    blocked = Portal.objects.filter(state=Portal.State.BLOCKED).count()
    large = Portal.objects.get(member_id=_member_id(0))
    portals, changes = "/admin/portals/portal/", "/admin/results/resultchange/"
    pages = [
        ("Portal list: first page", portals, _page_check(100)),
        (
            "Portal list: search member_id",
            f"{portals}?q={searched}",
            _page_check(1, _domain(SEARCHED_PORTAL)),
        ),
        (
            "Portal list: search domain",
            f"{portals}?q={_domain(SEARCHED_PORTAL)}",
            _page_check(1, searched),
        ),
        (
            "Portal list: state=blocked",
            f"{portals}?state__exact=blocked",
            _page_check(min(100, blocked), "Blocked"),
        ),
        (
            f"Portal change: {LARGE_USERS} accounts inline",
            f"{portals}{large.pk}/change/",
            _page_check(LARGE_USERS, large.domain, INLINE_ROW),
        ),
        ("ResultChange list: first page", changes, _page_check(100)),
        (
            "ResultChange list: search member_id",
            f"{changes}?q={searched}",
            _page_check(CHANGES_PER_PORTAL, _domain(SEARCHED_PORTAL)),
        ),
        ("ResultChange list: state=failed", f"{changes}?state__exact=failed", _page_check(100)),
    ]
    return [
        _measure(name, lambda path=path: client.get(path), check) for name, path, check in pages
    ]


def _lookups() -> list[Measured]:
    """The reads made on every placement POST, event, frame request and sweep, with arguments
    that vary from call to call (so no plan or page is cached for one row)."""
    from b24app.portals.models import Account, Portal
    from results import selectors as result_selectors

    rng = random.Random(7)
    member_ids = [_member_id(rng.randrange(PORTALS)) for _ in range(64)]
    accounts = list(
        Account.objects.filter(portal__member_id__startswith=MEMBER_PREFIX)
        .values_list("pk", "portal_id")
        .order_by("?")[:64]
    )
    sample = Account.objects.get(pk=accounts[0][0])
    next_member_id, next_account = itertools.cycle(member_ids), itertools.cycle(accounts)

    def portal_by_member_id():
        return Portal.objects.filter(member_id=next(next_member_id)).first()

    def frame_account():
        pk, portal_id = next(next_account)
        return Account.objects.select_related("portal").filter(pk=pk, portal_id=portal_id).first()

    def found(value) -> str:
        if value is None:
            raise RuntimeError("the lookup found nothing")
        return "found"

    return [
        _measure("lookup: portal by member_id", portal_by_member_id, found),
        _measure("lookup: frame request's account", frame_account, found),
        _measure(
            "lookup: screen's pending changes",
            lambda: result_selectors.result_changes_pending(account=sample, task_id=1),
            lambda value: f"{len(value)} changes",
        ),
        _measure(
            "lookup: delivery sweep (due changes)",
            result_selectors.result_changes_due,
            lambda value: f"{len(value)} due",
        ),
    ]


def _keepalive_selection() -> Measured:
    from b24app.portals import selectors

    due = _idle_count()

    def check(batch) -> str:
        if len(batch) != due:
            raise RuntimeError(f"the keep-alive selected {len(batch)} accounts, not {due}")
        return f"{len(batch)} of {due} due"

    return _measure("keep-alive selection", selectors.accounts_keepalive_batch, check)


def _idle_count() -> int:
    return (PORTALS // LARGE_EVERY) * (LARGE_USERS - IDLE_FROM_USER + 1)


def _plan(sql: str) -> str:
    """``EXPLAIN (ANALYZE)`` of a captured query: each table scan with its index and rows."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}")
        (plan,) = cursor.fetchone()
    plan = plan[0] if isinstance(plan, list) else json.loads(plan)[0]
    scans = []
    for node in _nodes(plan["Plan"]):
        if "Relation Name" not in node and "Index Name" not in node:
            continue
        rows = int(node.get("Actual Rows", 0) * node.get("Actual Loops", 1))
        table = f" on {node['Relation Name']}" if "Relation Name" in node else ""
        index = f" using {node['Index Name']}" if "Index Name" in node else ""
        scans.append(f"{node['Node Type']}{table}{index} ({rows:,} rows)")
    return f"{plan['Execution Time']:.1f} ms: " + ("; ".join(scans) or "no table scan")


def _nodes(node: dict) -> Iterator[dict]:
    yield node
    for child in node.get("Plans", ()):
        yield from _nodes(child)


# --- the two processes whose memory is measured ------------------------------------------------


def _collect_static(static_root: str) -> None:
    """Static files collected once, as a deployment does (the admin's manifest storage)."""
    from django.core.management import call_command
    from django.test.utils import override_settings

    with override_settings(STATIC_ROOT=static_root):
        call_command("collectstatic", interactive=False, verbosity=0)


def _child(role: str, env: dict[str, str], payload: dict, timeout: float) -> dict:
    """Run ``python -m bench.scale ROLE`` with ``payload`` on stdin; its ``@@result`` line."""
    completed = subprocess.run(
        [sys.executable, "-m", "bench.scale", role],
        cwd=ROOT,
        env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    for line in completed.stdout.splitlines():
        if line.startswith("@@result "):
            return json.loads(line.removeprefix("@@result "))
    raise RuntimeError(f"the {role} process failed:\n{completed.stderr[-3000:]}")


def _web_process(fake: Any, web: WebPortal, database_url: str, static_root: str) -> dict:
    from b24app.portals.models import Portal

    large = Portal.objects.get(member_id=_member_id(0))
    paths = [
        "/admin/portals/portal/",
        f"/admin/portals/portal/?q={_member_id(SEARCHED_PORTAL)}",
        "/admin/portals/portal/?state__exact=blocked",
        f"/admin/portals/portal/{large.pk}/change/",
        "/admin/results/resultchange/",
        "/admin/results/resultchange/?state__exact=failed",
    ]
    payload = {
        "static_root": static_root,
        "operator": _operator().pk,
        "paths": paths,
        "frame_url": web.url,
        "frame_fields": web.fields,
    }
    env = {"DATABASE_URL": database_url, "B24_OAUTH_SERVERS": fake.oauth_url}
    return _child("web", env, payload, timeout=120)


def _worker_process(fake: Any, database_url: str) -> dict:
    """The keep-alive in a real Celery worker; afterwards the fake and the database must agree
    that every idle account was refreshed once."""
    from b24app.portals.models import Account

    started = _now()
    env = {
        "DATABASE_URL": database_url,
        "B24_OAUTH_SERVERS": fake.oauth_url,
        "CELERY_BROKER_URL": "memory://",
    }
    result = _child("worker", env, {}, timeout=240)
    refreshes = [call for call in fake.token_calls if call["grant_type"] == "refresh_token"]
    result["due"] = _idle_count()
    result["token calls"] = len(refreshes)
    result["failed token calls"] = sum(not call["ok"] for call in refreshes)
    result["refreshed"] = Account.objects.filter(
        portal__member_id__startswith=MEMBER_PREFIX,
        user_id__gte=IDLE_FROM_USER,
        last_refreshed_at__gte=started,
        state=Account.State.ACTIVE,
    ).count()
    return result


def _child_web(payload: dict) -> dict:
    """In a fresh process: serve the admin pages and a placement POST, as a web worker would."""
    setup_django(os.environ["B24_OAUTH_SERVERS"])
    from django.contrib.auth import get_user_model
    from django.test import Client
    from django.test.utils import override_settings

    from tests.support.portals import post_frame

    after_setup = _max_rss_mb()
    statuses = []
    with override_settings(STATIC_ROOT=payload["static_root"]):
        client = Client()
        client.force_login(get_user_model().objects.get(pk=payload["operator"]))
        for path in payload["paths"]:
            statuses.append(client.get(path).status_code)
        screen = post_frame(client, payload["frame_url"], payload["frame_fields"])
        statuses.append(screen.status_code)
    return {
        "after setup MB": after_setup,
        "peak MB": _max_rss_mb(),
        "statuses": statuses,
        "results shown": screen.content.decode().count(RESULT_ITEM),
    }


def _child_worker(payload: dict) -> dict:
    """In a fresh process: a Celery worker (solo pool) on an in-memory broker runs the keep-alive
    job and the refreshes it queues, then stops itself (SIGTERM, a warm shutdown)."""
    import signal

    setup_django(os.environ["B24_OAUTH_SERVERS"])
    from celery import signals

    from b24app.celery import app
    from b24app.portals.tasks import account_tokens_refresh_task, accounts_keepalive_task

    after_setup = _max_rss_mb()
    outcome = {"queued": None, "done": 0, "failed": 0, "retried": 0}
    finished = threading.Event()

    @signals.task_postrun.connect
    def counted(sender=None, retval=None, state=None, **kwargs):
        if sender.name == accounts_keepalive_task.name:
            outcome["queued"] = retval
        elif sender.name == account_tokens_refresh_task.name:
            key = {"SUCCESS": "done", "RETRY": "retried"}.get(state, "failed")
            outcome[key] += 1
        ended = outcome["done"] + outcome["failed"]
        if outcome["queued"] is not None and ended >= outcome["queued"]:
            finished.set()

    def stop_when_finished() -> None:
        finished.wait(timeout=180)
        os.kill(os.getpid(), signal.SIGTERM)

    app.conf.worker_redirect_stdouts = False  # the result line goes to stdout as it is
    started = time.monotonic()
    accounts_keepalive_task.delay()
    threading.Thread(target=stop_when_finished, daemon=True).start()
    try:
        app.worker_main(
            [
                "worker",
                "--pool=solo",
                "--loglevel=WARNING",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ]
        )
    except SystemExit:
        pass
    return {
        **outcome,
        "seconds": time.monotonic() - started,
        "after setup MB": after_setup,
        "peak MB": _max_rss_mb(),
    }


def _max_rss_mb() -> float:
    """This process's peak resident set (``VmHWM``), in MiB. Not ``getrusage``'s ``ru_maxrss``:
    Linux carries that over ``fork`` and ``exec``, so a child of the (large) bench process would
    report the bench's own peak."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status (the memory figures need Linux)")


# --- output ------------------------------------------------------------------------------------


def _print_pages(measured: list[Measured], counts, seeded_s, prepared_s) -> None:
    seeding = f"seeded in {seeded_s:.0f} s" if seeded_s else "already seeded"
    print_table(
        TITLE,
        ["page or lookup", "median ms", "queries", "checked"],
        [(m.name, fmt(m.median_ms), m.queries, m.check) for m in measured],
        notes=[
            ", ".join(f"{value:,} {name}" for name, value in counts.items())
            + f" in PostgreSQL ({seeding}; prepared for this run in {prepared_s:.1f} s)",
            f"median of {RUNS} runs after one warm-up; queries counted on one more run",
            "pages through django.test.Client logged in as a superuser (no socket on the app's "
            "side); 100 rows per admin page",
            f"load average {', '.join(f'{load:.2f}' for load in os.getloadavg())}",
        ],
    )


def _print_plans(measured: list[Measured]) -> None:
    rows = []
    for m in measured:
        for rank, plan in enumerate(m.plans):
            rows.append((m.name if rank == 0 else "", plan))
    print_table(
        "plans of the two slowest queries of each (EXPLAIN ANALYZE)",
        ["page or lookup", "execution: scans (rows read)"],
        rows,
    )


def _print_memory(web: dict, worker: dict) -> None:
    rows = [
        (
            "web: admin pages + placement POST",
            fmt(web["after setup MB"]),
            fmt(web["peak MB"]),
            f"answers {sorted(set(web['statuses']))}; the screen shows "
            f"{web['results shown']}/{WEB_RESULTS} results",
        ),
        (
            "worker: keep-alive job",
            fmt(worker["after setup MB"]),
            fmt(worker["peak MB"]),
            f"{worker['refreshed']:,}/{worker['due']:,} idle accounts refreshed "
            f"in {worker['seconds']:.0f} s; {worker['token calls']:,} token calls, "
            f"{worker['failed token calls']} failed",
        ),
    ]
    print_table(
        "peak memory (max RSS) of fresh processes",
        ["process", "after setup MB", "peak MB", "checked"],
        rows,
        notes=[
            "web: a fresh Python process, Django set up, serving each admin page once and a "
            "placement POST through django.test.Client",
            "worker: `celery worker --pool=solo` (in-process, in-memory broker) running "
            "accounts_keepalive_task and the refresh task of every idle account",
        ],
    )


def _record(pages, lookups, keepalive, web, worker) -> None:
    """The headline figures: the pages an operator opens most, the per-request lookup, the
    keep-alive's selection, the two peaks."""
    by_name = {m.name: m for m in [*pages, *lookups, keepalive]}
    for name in (
        "Portal list: first page",
        "Portal list: search member_id",
        f"Portal change: {LARGE_USERS} accounts inline",
        "ResultChange list: first page",
        "keep-alive selection",
    ):
        m = by_name[name]
        record("scale", name, f"{fmt(m.median_ms)} ms, {m.queries} queries")
    lookup = by_name["lookup: portal by member_id"]
    record("scale", lookup.name, f"{fmt(lookup.median_ms, 2)} ms, {lookup.queries} query")
    record("scale", "peak RSS: web process", f"{fmt(web['peak MB'])} MB")
    record("scale", "peak RSS: keep-alive worker", f"{fmt(worker['peak MB'])} MB")


def _child_main(role: str) -> int:
    payload = json.loads(sys.stdin.read() or "{}")
    result = {"web": _child_web, "worker": _child_worker}[role](payload)
    print("@@result " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1]))
