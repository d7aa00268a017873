"""Throughput under the portal's rate limit: our Celery delivery beside fast-bitrix24 and b24pysdk.

N queued edits of task results go to one fake portal whose leaky bucket is scaled up (burst 10,
20 requests per second, so a run takes seconds, not minutes). Each variant delivers the same N
writes (`tasks.task.result.update` through REST 3.0) and is measured at the fake portal: when
the writes it accepted arrived, how many it refused with `QUERY_LIMIT_EXCEEDED`, and whether every
edit was applied exactly once. Variants:

* ours: the changes are written through `result_change_submit` (the service the screen uses)
  while the portal is unreachable, so they are queued as they would be in production; then real
  `celery -A b24app worker` processes (prefork, 1 or 4 processes) deliver them, paced by the
  shared Redis limiter;
* fast-bitrix24 and b24pysdk with the same user's OAuth token, configured as their documentation
  recommends for this rate;
* two portals at once, both at 5 requests per second: A saturated, B with fewer changes, our
  4 worker processes; B's rate beside B's solo run.

Needs PostgreSQL and Redis: ``BENCH_THROUGHPUT_DATABASE_URL`` (default
``postgres://postgres@127.0.0.1:5432/b24bench_tp``, created when missing and migrated), Redis
database 5 (the broker) and 6 (the limiter), both emptied first. ``DATABASE_URL``,
``CELERY_BROKER_URL`` and ``REDIS_URL`` are ignored, so the bench cannot touch a development or
production database or queue. Without the services it prints why it skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import math
import os
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    b24pysdk_over_http,
    ensure_database,
    fake_and_database,
    fmt,
    install_directly,
    print_table,
    record,
    require_loopback,
    skipped,
)

BENCH_ORDER = 40
TITLE = "throughput under the rate limit"

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/b24bench_tp"
BROKER_URL = os.environ.get("BENCH_THROUGHPUT_BROKER_URL", "redis://127.0.0.1:6379/5")
LIMITER_URL = os.environ.get("BENCH_THROUGHPUT_REDIS_URL", "redis://127.0.0.1:6379/6")
CHANGES = int(os.environ.get("BENCH_THROUGHPUT_CHANGES", "250"))
SATURATED = int(os.environ.get("BENCH_THROUGHPUT_SATURATED", "120"))
"""Changes of portal A, the saturated one, in the two-portal run."""
SIDE = int(os.environ.get("BENCH_THROUGHPUT_SIDE", "40"))
"""Changes of portal B in the two-portal run and in its solo run."""
BURST, RATE = 10, 20.0
"""The fake portal's leaky bucket: Bitrix24's 50 / 2 per second, scaled up."""
SHARED_RATE = 5.0
"""The bucket's rate in the two-portal runs: low enough that A's budget, not the machine's CPU,
is what holds A back even on a busy 2-CPU machine, as Bitrix24's 2 per second does."""
PEER_THREADS = 4
"""Threads driving b24pysdk, as many as our worker processes."""
SUBMITTERS = 4
"""Threads writing the changes through the service layer before a run (not measured)."""
WORKER_ENV = {"DJANGO_CONN_MAX_AGE": "60", "DJANGO_LOG_LEVEL": "INFO"}
"""Workers as deployed: persistent database connections, and the per-call log line whose
``wait_ms`` says how long the call slept in the limiter."""
CALL_LINE = re.compile(r"bitrix24 call .* host=(\S+) .* wait_ms=(\d+)")
REQUEUED_LINE = re.compile(r"change (\d+) attempt \d+ -> queued RATE_LIMITED")
"""A change re-queued for its turn in the portal's budget instead of waiting for it."""
UNLIMITED = "1000000/1000000"
UPDATE = "tasks.task.result.update"
POLL_S = 0.2
SLACK_S = 30.0
"""Every run may take this much longer than its changes need at the bucket's rate."""


def main(argv: list[str]) -> int:
    database_url = os.environ.get("BENCH_THROUGHPUT_DATABASE_URL", DEFAULT_DATABASE_URL)
    problem = ensure_database(database_url) or _redis_problem()
    if problem:
        return skipped(TITLE, problem)
    os.environ.update(CELERY_BROKER_URL=BROKER_URL, REDIS_URL=LIMITER_URL)
    os.environ.setdefault("DJANGO_LOG_LEVEL", "WARNING")  # 2 lines per change otherwise
    # One person queues every change of a portal here (CHANGES of them, by design): the caps on
    # a person's and a portal's queued changes (20 and 200 by default) would refuse most.
    for cap in ("RESULTS_QUEUED_PER_ACCOUNT", "RESULTS_QUEUED_PER_PORTAL"):
        os.environ[cap] = str(max(CHANGES * 4, 1000))
    with fake_and_database(database_url) as fake:
        return _run(fake)


def _redis_problem() -> str | None:
    """Empty the bench's two Redis databases; the reason to skip, or ``None``."""
    import redis

    for url in (BROKER_URL, LIMITER_URL):
        require_loopback(url)
        try:
            redis.Redis.from_url(url, socket_connect_timeout=3).flushdb()
        except redis.RedisError as exc:
            return f"needs Redis, but {url} is not usable ({type(exc).__name__})"
    return None


# --- one fake portal with its task, results and connection ------------------------------------


@dataclass
class Target:
    """A fake portal with one task of `count` results by Anna, and the app's rows for it."""

    fake_portal: Any
    account: Any
    task: int
    results: list[int]
    rate: float

    @property
    def member_id(self) -> str:
        return self.fake_portal.member_id


def _target(fake: Any, count: int, rate: float = RATE) -> Target:
    fake_portal = fake.add_portal(rate_limit=(BURST, rate))
    require_loopback(fake_portal.url)
    anna = fake_portal.add_user(name="Anna", last_name="Smirnova", admin=True)
    task = fake_portal.add_task(title="Throughput")
    results = [fake_portal.add_result(task, author_id=anna, text="Draft") for _ in range(count)]
    _, account = install_directly(fake, fake_portal, anna)
    return Target(fake_portal, account, task, results, rate)


def _text(target: Target, result_id: int) -> str:
    return f"Checked {target.member_id[:6]} #{result_id}"


# --- what the fake portal saw --------------------------------------------------------------------


@dataclass
class Run:
    """One row: the writes one portal received during a run and whether each edit landed once."""

    label: str
    senders: str
    count: int
    writes: list[dict]
    query_limit_hits: int
    applied_once: int
    started: float
    """Unix time the window opens: the run's first write to any of its portals."""
    bucket_rate: float
    gave_up: int = 0
    """Writes the sender gave up on (its retries used up)."""
    workers: int = 0
    slept_s: float = float("nan")
    """Seconds our workers slept in the limiter for this portal (from their log)."""
    requeued: int | None = None
    """Times a change of this portal was re-queued for its turn (from our workers' log)."""

    @property
    def slept_share(self) -> float:
        """The share of the workers' time in the window spent asleep in this portal's limiter."""
        return 100 * self.slept_s / (self.workers * self.duration) if self.workers else math.nan

    @property
    def accepted(self) -> list[dict]:
        return [w for w in self.writes if w["status"] == 200 and not w["replayed"]]

    @property
    def duration(self) -> float:
        accepted = self.accepted
        return max(w["time"] for w in accepted) - self.started if accepted else float("nan")

    @property
    def rate(self) -> float:
        return len(self.accepted) / self.duration

    @property
    def allowed(self) -> float:
        """Writes the bucket lets through in the window, starting empty: burst + rate x time."""
        return BURST + self.bucket_rate * self.duration

    @property
    def share(self) -> float:
        return 100 * len(self.accepted) / self.allowed

    def row(self) -> list[object]:
        duration = self.duration
        return [
            self.label,
            self.senders,
            self.count,
            fmt(duration, 2),
            fmt(self.rate),
            fmt(self.allowed / duration),
            fmt(self.share),
            self.query_limit_hits,
            f"{self.applied_once} of {self.count}",
            fmt(self.slept_share),
            "-" if self.requeued is None else self.requeued,
        ]


class Watch:
    """The writes and bucket refusals of some fake portals from now on."""

    def __init__(self, targets: list[Target]) -> None:
        self._marks = {
            t.member_id: (len(t.fake_portal.requests), t.fake_portal.limit_hits) for t in targets
        }

    def writes(self, target: Target) -> list[dict]:
        start = self._marks[target.member_id][0]
        return [r for r in target.fake_portal.requests[start:] if r["method_name"] == UPDATE]

    def query_limit_hits(self, target: Target) -> int:
        return target.fake_portal.limit_hits - self._marks[target.member_id][1]


def _applied_once(target: Target, writes: list[dict], by_key: dict[int, str] | None) -> int:
    """Results whose text is the edit's and which took exactly one applied write (per
    idempotency key when the sender has keys, else per result)."""
    texts = {item["id"]: item["text"] for item in target.fake_portal.results(target.task)}
    applied = Counter(
        w["idempotency_key"] if by_key is not None else w["body"].get("id")
        for w in writes
        if w["status"] == 200 and not w["replayed"]
    )
    once = 0
    for result_id in target.results:
        slot = result_id if by_key is None else by_key.get(result_id)
        if texts.get(result_id) == _text(target, result_id) and applied.get(slot) == 1:
            once += 1
    return once


def _runs(label, senders, targets, watch, keys=None, **extra) -> list[Run]:
    """A row per portal; `extra` (values per portal member id) sets the other `Run` fields."""
    writes = {t.member_id: watch.writes(t) for t in targets}
    started = min((w["time"] for ws in writes.values() for w in ws), default=float("nan"))
    return [
        Run(
            label=label if len(targets) == 1 else f"{label}: portal {name}",
            senders=senders,
            count=len(target.results),
            writes=writes[target.member_id],
            query_limit_hits=watch.query_limit_hits(target),
            applied_once=_applied_once(
                target, writes[target.member_id], None if keys is None else keys[target.member_id]
            ),
            started=started,
            bucket_rate=target.rate,
            **{field: values[target.member_id] for field, values in extra.items()},
        )
        for name, target in zip("AB", targets, strict=False)
    ]


# --- ours: queued changes, real Celery workers ---------------------------------------------------


def _queue_changes(targets: list[Target]) -> dict[str, dict[int, str]]:
    """Edit every result through the service layer while the portals are unreachable, so each
    change ends up queued, as when Bitrix24 is busy. Portals' edits are interleaved in
    proportion, as if their people were working at the same time. Returns the idempotency key
    of each result's change, per portal."""
    from django.db import connection

    from b24app.portals.models import Portal
    from b24app.portals.services import rate_limiter
    from results.models import ResultChange
    from results.services import result_change_submit

    order = sorted(
        (index / len(t.results), n, r)
        for n, t in enumerate(targets)
        for index, r in enumerate(t.results)
    )
    members = [t.member_id for t in targets]

    def submit(share: list[tuple[float, int, int]]) -> None:
        try:
            for _, n, result_id in share:
                change = result_change_submit(
                    account=targets[n].account,
                    task_id=targets[n].task,
                    action=ResultChange.Action.UPDATE,
                    result_id=result_id,
                    text=_text(targets[n], result_id),
                    text_before="Draft",
                )
                if change.state != ResultChange.State.QUEUED:
                    raise RuntimeError(f"change {change.pk} is {change.state}, not queued")
        finally:
            connection.close()

    # The one inline attempt of each change must not use up the limiter's schedule.
    Portal.objects.filter(member_id__in=members).update(rate_limit=UNLIMITED)
    for target in targets:
        target.fake_portal.go_down()
    try:
        with ThreadPoolExecutor(SUBMITTERS) as pool:
            for done in [pool.submit(submit, order[k::SUBMITTERS]) for k in range(SUBMITTERS)]:
                done.result()
    finally:
        for target in targets:
            target.fake_portal.come_back()
    for target in targets:
        Portal.objects.filter(member_id=target.member_id).update(
            rate_limit=f"{BURST}/{target.rate:g}"
        )
        rate_limiter().reset(target.member_id)
        target.fake_portal.bucket.reset()
    changes = ResultChange.objects.filter(portal__member_id__in=members)
    due = max(changes.values_list("next_attempt_at", flat=True))
    keys: dict[str, dict[int, str]] = {member: {} for member in members}
    for member, result_id, key in changes.values_list(
        "portal__member_id", "result_id", "idempotency_key"
    ):
        keys[member][result_id] = key
    time.sleep(max(0.0, due.timestamp() - time.time()) + 0.1)  # every change is due
    return keys


def _ours(
    fake: Any, label: str, concurrency: int, counts: list[int], folder: Path, rate: float = RATE
) -> list[Run]:
    from django.conf import settings

    from results.models import ResultChange
    from tests.celery_worker import start_worker, stop_worker

    targets = [_target(fake, count, rate) for count in counts]
    keys = _queue_changes(targets)
    watch = Watch(targets)
    expected_s = sum(counts) / rate
    log = folder / f"{label}-{concurrency}.log"
    worker = start_worker(fake, settings, log, f"throughput{concurrency}", concurrency, WORKER_ENV)
    try:
        pending = ResultChange.objects.filter(
            portal__member_id__in=[t.member_id for t in targets], state=ResultChange.State.QUEUED
        )
        deadline = time.monotonic() + expected_s + SLACK_S
        while pending.exists() and time.monotonic() < deadline:
            time.sleep(POLL_S)
    finally:
        stop_worker(worker)
    text = log.read_text()
    slept_ms: Counter[str] = Counter()
    for host, wait_ms in CALL_LINE.findall(text):
        slept_ms[host] += int(wait_ms)
    requeued_ids = [int(pk) for pk in REQUEUED_LINE.findall(text)]
    portal_of = dict(
        ResultChange.objects.filter(pk__in=requeued_ids).values_list("pk", "portal__member_id")
    )
    requeued = Counter(portal_of[pk] for pk in requeued_ids)
    senders = f"{concurrency} worker process{'es' if concurrency > 1 else ''}"
    members = [t.member_id for t in targets]
    return _runs(
        label,
        senders,
        targets,
        watch,
        keys,
        workers=dict.fromkeys(members, concurrency),
        slept_s={t.member_id: slept_ms[t.fake_portal.domain] / 1000 for t in targets},
        requeued={member: requeued[member] for member in members},
    )


# --- the peers -----------------------------------------------------------------------------------


def _fast_bitrix24(fake: Any) -> list[Run]:
    """fast-bitrix24 with its own throttling set to the bucket (pool = burst, rate), a token
    function instead of a webhook, and REST 3.0 through its raw call (its batching `call`
    needs the classic `batch` method, which REST 3.0 does not have): all writes at once, as its
    documentation shows for lists of items, with its own retries."""
    from fast_bitrix24 import BitrixAsync

    target = _target(fake, CHANGES)
    access_token = target.fake_portal.issue_tokens(target.account.user_id)["access_token"]

    async def token() -> str:
        return access_token

    async def deliver() -> list:
        bitrix = BitrixAsync(
            target.fake_portal.url + "/rest/api/",
            token_func=token,
            verbose=False,
            request_pool_size=BURST,
            requests_per_second=RATE,
            ssl=False,
        )
        return await asyncio.gather(
            *(
                bitrix.call(UPDATE, {"id": rid, "fields": {"text": _text(target, rid)}}, raw=True)
                for rid in target.results
            ),
            return_exceptions=True,  # a write it gave up on counts as not applied
        )

    logging.getLogger("fast_bitrix24").setLevel(logging.WARNING)  # a DEBUG line per call
    watch = Watch([target])
    # aiohttp resets connections the fake's listener then reports, a traceback each, on stderr.
    with contextlib.redirect_stderr(io.StringIO()):
        outcomes = asyncio.run(deliver())
    gave_up = sum(isinstance(outcome, Exception) for outcome in outcomes)
    return _runs(
        "fast-bitrix24",
        "1 process (asyncio)",
        [target],
        watch,
        gave_up={target.member_id: gave_up},
    )


def _b24pysdk(fake: Any) -> list[Run]:
    """b24pysdk's REST 3.0 client from 4 threads (it has no client-side throttling; it retries a
    503 itself, 3 attempts 1 s and 2 s apart). The SDK builds `https://{domain}`; the fake
    speaks plain HTTP, so only that scheme is changed, for this run."""
    from b24pysdk import BitrixApp, BitrixToken, Client

    target = _target(fake, CHANGES)
    tokens = target.fake_portal.issue_tokens(target.account.user_id)
    app = BitrixApp(
        client_id=os.environ["B24_CLIENT_ID"], client_secret=os.environ["B24_CLIENT_SECRET"]
    )
    pending = list(target.results)
    failures: list[str] = []
    lock = threading.Lock()

    def sender() -> None:
        token = BitrixToken(
            domain=target.fake_portal.domain,
            auth_token=tokens["access_token"],
            refresh_token=tokens["refresh_token"],
            expires_in=int(tokens["expires_in"]),
            bitrix_app=app,
        )
        client = Client(token, prefer_version=3)
        while True:
            with lock:
                if not pending:
                    return
                result_id = pending.pop(0)
            request = client.tasks.task.result.update(
                bitrix_id=result_id, fields={"text": _text(target, result_id)}
            )
            try:
                request.response  # noqa: B018 - the SDK sends the request when it is read
            except Exception as exc:  # noqa: BLE001 - a write it gave up on is not applied
                failures.append(type(exc).__name__)

    watch = Watch([target])
    with b24pysdk_over_http():
        threads = [threading.Thread(target=sender) for _ in range(PEER_THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return _runs(
        "b24pysdk",
        f"{PEER_THREADS} threads",
        [target],
        watch,
        gave_up={target.member_id: len(failures)},
    )


# --- the whole run -------------------------------------------------------------------------------


def _run(fake: Any) -> int:
    from b24app.portals.models import Portal

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as folder:
        logs = Path(folder)
        try:
            rows = [
                *_ours(fake, "ours", 1, [CHANGES], logs),
                *_ours(fake, "ours", 4, [CHANGES], logs),
                *_fast_bitrix24(fake),
                *_b24pysdk(fake),
                *_ours(fake, "B alone", 4, [SIDE], logs, SHARED_RATE),
                *_ours(fake, "A and B", 4, [SATURATED, SIDE], logs, SHARED_RATE),
            ]
        finally:  # the bench's portals, their accounts and changes
            Portal.objects.filter(member_id__in=[p.member_id for p in fake.portals]).delete()
    _print(rows, time.monotonic() - started)
    return 0


def _print(rows: list[Run], elapsed: float) -> None:
    header = [
        "variant",
        "senders",
        "N",
        "duration s",
        "achieved/s",
        "allowed/s",
        "share %",
        "QLE",
        "applied once",
        "in limiter %",
        "re-queued",
    ]
    notes = [
        f"fake portal bucket: burst {BURST}, {RATE:g}/s ({SHARED_RATE:g}/s for B alone, A and "
        f"B); every write is {UPDATE} (REST 3.0)",
        "window: from the run's first write to this portal's last accepted write; allowed = "
        "burst + rate x window",
        "QLE: 503 QUERY_LIMIT_EXCEEDED answers of the bucket; applied once: the result holds the "
        "edit and exactly one write applied it",
        "in limiter %: share of our workers' time in the window spent asleep in the portal's "
        "limiter (the wait_ms of their log lines); re-queued: times one of its changes was "
        "re-queued for its turn instead of waiting",
        *(
            f"{row.label}: gave up on {row.gave_up} write(s) after its own retries"
            for row in rows
            if row.gave_up
        ),
        f"{elapsed:.1f} s in all; python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
        f"load {os.getloadavg()[0]:.1f}",
    ]
    print_table(TITLE, header, [row.row() for row in rows], notes)
    for row in rows[:4]:
        record(
            "throughput",
            f"{row.label} ({row.senders}): share of allowed rate, QLE",
            f"{row.share:.1f} %, {row.query_limit_hits} QLE",
            ">= 95 %, 0 QLE" if row.senders.startswith("4 worker") else "",
        )
    alone, beside = rows[4], rows[6]
    record(
        "throughput",
        "portal B beside saturated A: rate vs alone",
        f"{beside.rate:.1f}/s vs {alone.rate:.1f}/s",
    )
