"""Screen open and edit round trip: the server time of the embedded screen's two main requests.

The app is driven in this process through ``django.test.Client`` (Django's WSGI handler, the
middleware, the views and the templates; no socket on the app's side), against the fake portal
on 127.0.0.1 with its rate limit raised to 10^6/10^6 (the fake's and the Portal row's):

* ``POST /b24/app/``, the placement open of a task with 50 results: the frame POST verified by
  ``APPLICATION_TOKEN``, ``profile`` with the posted token, the user's tokens stored, the task's
  ``tasks.task.result.list``, the screen rendered;
* ``POST /b24/app/results/<id>/edit/`` with ``Accept: application/json``: the frame token read,
  the ``ResultChange`` written and delivered inline (``tasks.task.result.update``), the change's
  state answered as JSON for the screen to lay over its list. Every edit is checked at the fake
  afterwards.

Beside the whole request's wall time, the fake's own handling of the REST calls made during the
request is measured around the fake's HTTP request handler (http.server's parsing of the request,
the fake's handling and the answer written), and the app's HTTP calls by wrapping the app's shared
``requests`` session. Queries per request are
counted with ``CaptureQueriesContext`` on extra, untimed requests (on SQLite the capture itself
runs a query per statement to quote its parameters, so it would distort the timings).

The database is a fresh SQLite file in a temporary directory, migrated, unless
``BENCH_SCREEN_DATABASE_URL`` names another one (an existing database; it is migrated and the
portal this bench creates is deleted at the end; side by side, each side uses that name with
``_baseline`` or ``_now`` appended, created when missing). ``DATABASE_URL`` is ignored.
Background work
runs inline (no Celery broker) and the rate limiter is the in-process one (no Redis).

Side by side with a baseline: ``python -m bench.screen`` checks out ``BENCH_BASELINE`` (a git
revision of this repository, ``5c45280`` unless set; ``none`` skips the comparison) into a
temporary ``git worktree``, and runs this module there and here in turn (baseline, now, baseline,
now; ``BENCH_SCREEN_ROUNDS`` pairs), each run in a process of its own with this venv's python and
its tree's code first on ``sys.path`` (this very bench file is copied into the baseline's tree, so
both are measured alike). Each run prints one ``BENCH_SCREEN_JSON {...}`` line (``--json`` asks
for it); the table compares the app's time (total minus the fake's own handling) over the pooled
samples of each side.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

from bench.common import (
    ROOT,
    baseline_revision,
    baseline_tree,
    ensure_database,
    fmt,
    in_process_environment,
    print_table,
    record,
    require_loopback,
    run_in_tree,
    setup_django,
    skipped,
    start_fake,
    summary,
)

BENCH_ORDER = 30
TITLE = "screen open and edit round trip"

REQUESTS = int(os.environ.get("BENCH_SCREEN_REQUESTS", "200"))
PROFILE = os.environ.get("BENCH_SCREEN_PROFILE", "").strip()
"""``open``, ``reopen`` or ``edit``: that kind's timed requests run under cProfile, and the
functions that took the most time are printed after the table (the figures then include the
profiler's own overhead)."""
WARMUP = 20
QUERY_SAMPLES = 5
"""Extra, untimed requests of each kind whose database queries are counted."""
RESULTS = 50
NO_LIMIT = (10**6, 10**6)
LANG = "en"
FRAME_TOKEN = re.compile(r'data-frame-token="([^"]+)"')
RESULT_ITEM = '<li class="result'
JSON_PREFIX = "BENCH_SCREEN_JSON "


@dataclass
class Series:
    """The timed requests of one kind: per request, wall time and its parts (ms)."""

    name: str
    total: list[float] = field(default_factory=list)
    portal: list[float] = field(default_factory=list)
    http: list[float] = field(default_factory=list)
    calls: Counter = field(default_factory=Counter)
    """REST paths the fake handled during the timed requests."""
    calls_per_request: list[int] = field(default_factory=list)
    queries: list[int] = field(default_factory=list)
    query_kinds: Counter = field(default_factory=Counter)


class Stopwatch:
    """Accumulates the time spent in wrapped callables (any thread) since the last ``take``."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._ns = 0
        self._paths: list[str] = []
        self._running = 0
        """Timed calls begun (``begin``) and not yet added: ``take`` waits for them."""

    def wrap(self, inner: Callable[..., Any], label: Callable[..., str] | None = None):
        def timed(*args, **kwargs):
            started = time.perf_counter_ns()
            try:
                return inner(*args, **kwargs)
            finally:
                elapsed = time.perf_counter_ns() - started
                with self._lock:
                    self._ns += elapsed
                    if label is not None:
                        self._paths.append(label(*args))

        return timed

    def begin(self) -> None:
        with self._lock:
            self._running += 1

    def add(self, elapsed_ns: int, label: str) -> None:
        """The end of a call ``begin`` announced."""
        with self._lock:
            self._ns += elapsed_ns
            self._paths.append(label)
            self._running -= 1
            self._lock.notify_all()

    def take(self) -> tuple[float, list[str]]:
        """Milliseconds and labels recorded since the last call; starts again from zero. Calls
        still running are waited for (up to a second): the fake's thread may have written its
        answer and not yet been given the interpreter back to record it."""
        with self._lock:
            self._lock.wait_for(lambda: self._running <= 0, timeout=1.0)
            ms, paths = self._ns / 1e6, self._paths
            self._ns, self._paths = 0, []
        return ms, paths


def main(argv: list[str]) -> int:
    revision = None if "--json" in argv else baseline_revision()
    if revision is None:
        return _measure(as_json="--json" in argv)
    return _compare(revision, max(1, int(os.environ.get("BENCH_SCREEN_ROUNDS", "2"))))


def _compare(revision: str, rounds: int) -> int:
    """Runs of the baseline's tree and of this one in turn; a table of both side by side."""
    runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "now": []}
    database_url = os.environ.get("BENCH_SCREEN_DATABASE_URL", "")
    envs: dict[str, dict[str, str]] = {side: {} for side in runs}
    if database_url:  # each side's schema in a database of its own
        for side, env in envs.items():
            env["BENCH_SCREEN_DATABASE_URL"] = f"{database_url}_{side}"
            problem = ensure_database(env["BENCH_SCREEN_DATABASE_URL"])
            if problem:
                return skipped(TITLE, problem)
    with baseline_tree(revision, ["common.py", "screen.py"]) as tree:
        for _ in range(rounds):
            for side, where in (("baseline", tree), ("now", ROOT)):
                runs[side].append(
                    run_in_tree(
                        where, "bench.screen", JSON_PREFIX, env=envs[side], show=side == "now"
                    )
                )
    _print_comparison(revision, runs)
    return 0 if all(run["ok"] for side in runs.values() for run in side) else 1


def _print_comparison(revision: str, runs: dict[str, list[dict[str, Any]]]) -> None:
    rows = []
    medians = {}
    for kind in ("open", "reopen", "edit"):  # reopen: the same AUTH_ID again
        pooled = {
            side: [sample for run in side_runs for sample in run[kind]["app"]]
            for side, side_runs in runs.items()
        }
        per_run = {
            side: " ".join(fmt(summary(run[kind]["app"])["median"], 2) for run in side_runs)
            for side, side_runs in runs.items()
        }
        then, now = summary(pooled["baseline"])["median"], summary(pooled["now"])["median"]
        medians[kind] = (then, now)
        rows.append(
            [
                kind,
                fmt(then, 2),
                fmt(now, 2),
                f"{now / then:.2f}" if then else "-",
                f"{runs['baseline'][-1][kind]['queries']} -> {runs['now'][-1][kind]['queries']}",
                f"{runs['baseline'][-1][kind]['rest']} -> {runs['now'][-1][kind]['rest']}",
                f"{per_run['baseline']} / {per_run['now']}",
            ]
        )
        record(
            "screen",
            f"{kind}: app median, baseline {revision} -> now (ratio)",
            f"{then:.1f} -> {now:.1f} ms ({now / then:.2f}x)" if then else "-",
        )
    print_table(
        f"screen: baseline {revision} vs now",
        [
            "request",
            "baseline app ms",
            "now app ms",
            "ratio",
            "queries",
            "REST calls",
            "per-run medians baseline / now",
        ],
        rows,
        [
            "app = total - the fake's own handling, per request; medians of the pooled samples",
            f"runs interleaved: {' '.join(['baseline now'] * len(runs['now']))}, each a process of",
            "its own, this venv's python, its tree's code (this bench's files copied into the",
            f"baseline's temporary worktree); database: {runs['now'][-1]['database']};",
            f"baseline b24app: {runs['baseline'][0]['b24app']}",
        ],
    )


def _measure(as_json: bool) -> int:
    count = max(1, min(REQUESTS, 10_000))
    with tempfile.TemporaryDirectory(prefix="bench-screen-") as tmp:
        database_url = os.environ.get("BENCH_SCREEN_DATABASE_URL") or (
            f"sqlite:///{tmp}/bench.sqlite3"
        )
        in_process_environment(database_url)
        fake = start_fake()
        try:
            setup_django(fake.oauth_url)
            from django.core.management import call_command
            from django.db import connections
            from django.test.utils import override_settings

            call_command("migrate", interactive=False, verbosity=0)
            # Static files collected once, as a deployment does: the manifest storage resolves
            # {% static %} the way it does in production (DEBUG is off).
            with override_settings(STATIC_ROOT=os.path.join(tmp, "static")):
                call_command("collectstatic", interactive=False, verbosity=0)
                try:
                    return _run(fake, count, as_json)
                finally:
                    connections.close_all()
        finally:
            fake.stop()


@contextlib.contextmanager
def _quiet_logs() -> Iterator[None]:
    """The app's stream handlers (stdout) write to /dev/null meanwhile: the log lines are still
    formatted (part of the app's time), but they do not flood the table."""
    handlers = {
        id(handler): handler
        for logger in (logging.getLogger(), *map(logging.getLogger, ("django", "celery")))
        for handler in logger.handlers
        if type(handler) is logging.StreamHandler
    }
    with open(os.devnull, "w") as devnull:
        saved = [(handler, handler.setStream(devnull)) for handler in handlers.values()]
        try:
            yield
        finally:
            for handler, stream in saved:
                if stream is not None:
                    handler.setStream(stream)


def _run(fake: Any, count: int, as_json: bool = False) -> int:
    from django.db import connection
    from django.test import Client

    from b24app.portals import services
    from b24app.portals.models import Portal
    from tests.support.portals import install

    portal = fake.add_portal(rate_limit=NO_LIMIT)
    portal.set_rate_limit(*NO_LIMIT)
    require_loopback(portal.url)
    anna = portal.add_user(name="Anna", last_name="Smirnova", admin=True)
    boris = portal.add_user(name="Boris", last_name="Petrov")
    task = portal.add_task(title="Benchmark task", created_by=anna, responsible_id=anna)
    started_at = time.time() - 86_400
    for number in range(RESULTS):
        portal.add_result(
            task,
            author_id=(anna, boris)[number % 2],
            text=f"Result {number + 1}: figures checked, report sent\nsecond line",
            created_at=started_at + number * 60,
        )
    client = Client()
    stopwatch, http = Stopwatch(), Stopwatch()
    started = time.monotonic()
    with _quiet_logs():
        response = install(client, portal, anna)
        if response.status_code != 200:
            raise RuntimeError(f"install answered {response.status_code}")
        Portal.objects.filter(member_id=portal.member_id).update(
            rate_limit=f"{NO_LIMIT[0]}/{NO_LIMIT[1]}"
        )
        # The install's calls were paced at the default rate; their schedule would hold the
        # first screens back at the new one for longer than a web request waits.
        services.rate_limiter().reset(portal.member_id)
        session = services.http_session()
        session.send = http.wrap(session.send)
        try:
            _time_fake_requests(stopwatch)
            with _profiled("open"):
                screen, token = _screens(client, fake, portal, task, anna, stopwatch, http, count)
            with _profiled("reopen"):
                reopen, _ = _screens(
                    client, fake, portal, task, anna, stopwatch, http, count, again=True
                )
            with _profiled("edit"):
                edit, applied = _edits(
                    client, fake, portal, task, anna, token, stopwatch, http, count
                )
        finally:
            del session.send
            _time_fake_requests(None)
            if os.environ.get("BENCH_SCREEN_DATABASE_URL"):
                Portal.objects.filter(member_id=portal.member_id).delete()
    elapsed = time.monotonic() - started
    _print([screen, reopen, edit], applied, count, connection, elapsed)
    if as_json:
        import b24app

        database = connection.settings_dict
        figures = {"b24app": b24app.__file__, "database": f"{connection.vendor} {database['NAME']}"}
        for kind, series in (("open", screen), ("reopen", reopen), ("edit", edit)):
            figures[kind] = {
                "app": _minus(series.total, series.portal),
                "total": series.total,
                "queries": _span(series.queries),
                "rest": _span(series.calls_per_request),
            }
        print(JSON_PREFIX + json.dumps(figures), flush=True)
    return 0 if applied == count else 1


@contextlib.contextmanager
def _profiled(kind: str) -> Iterator[None]:
    """cProfile over one kind's requests when ``BENCH_SCREEN_PROFILE`` names it (see PROFILE)."""
    if PROFILE != kind:
        yield
        return
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        yield
    finally:
        profiler.disable()
        stats = pstats.Stats(profiler, stream=sys.stderr)
        for order in ("tottime", "cumulative"):
            print(f"\n== profile of {kind!r} requests, by {order}", file=sys.stderr)
            stats.sort_stats(order).print_stats(45)


def _time_fake_requests(stopwatch: Stopwatch | None) -> None:
    """The fake's whole handling of each request goes to ``stopwatch`` (``None`` stops it): from
    parsing the request line's headers to the last byte of its answer written, http.server's
    parsing and the socket writes included, so none of the fake's own work counts as the app's.
    Only the wait for the request's first line (the app still preparing it, or an idle
    keep-alive connection) is left out."""
    from tests.fakeportal import server

    handler = server._Handler  # private, as bench/client.py wraps the listeners
    saved = handler.__dict__.get("_bench_saved")
    if saved is not None:
        for name, original in saved.items():
            setattr(handler, name, original)
        del handler._bench_saved
    if stopwatch is None:
        return
    originals = {"parse_request": handler.parse_request}
    methods = [name for name in dir(handler) if name.startswith("do_")]
    originals.update({name: getattr(handler, name) for name in methods})
    handler._bench_saved = originals

    def parse_request(self) -> bool:
        self._bench_started = time.perf_counter_ns()
        stopwatch.begin()
        try:
            parsed = originals["parse_request"](self)
        except BaseException:
            stopwatch.add(time.perf_counter_ns() - self._bench_started, "-")
            raise
        if not parsed:  # http.server answered the error itself; no do_* method follows
            stopwatch.add(time.perf_counter_ns() - self._bench_started, "-")
        return parsed

    def answering(name: str) -> Callable[[Any], None]:
        def answer(self) -> None:
            try:
                originals[name](self)
            finally:
                path = self.path.split("?", 1)[0]
                stopwatch.add(time.perf_counter_ns() - self._bench_started, path)

        return answer

    handler.parse_request = parse_request
    for name in methods:
        setattr(handler, name, answering(name))


def _timed(request: Callable[[], Any], series: Series, stopwatch: Stopwatch, http: Stopwatch):
    stopwatch.take()
    http.take()
    before = time.perf_counter_ns()
    response = request()
    total = (time.perf_counter_ns() - before) / 1e6
    portal_ms, paths = stopwatch.take()
    http_ms, _ = http.take()
    series.total.append(total)
    series.portal.append(portal_ms)
    series.http.append(http_ms)
    series.calls.update(paths)
    series.calls_per_request.append(len(paths))
    return response


def _counted(request: Callable[[], Any], series: Series):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as captured:
        response = request()
    series.queries.append(len(captured.captured_queries))
    series.query_kinds.update(
        query["sql"].split(None, 1)[0].upper() for query in captured.captured_queries
    )
    return response


def _clear_records(fake: Any, portal: Any) -> None:
    with fake.lock:  # the fake records every request and every token; keep the heap flat
        portal.requests.clear()
        fake.requests.clear()


def _screens(
    client, fake, portal, task, user, stopwatch, http, count, *, again: bool = False
) -> tuple[Series, str]:
    """Placement opens, each with a fresh AUTH_ID, or (`again`) all with the same one, as
    Bitrix24 posts the person's access token again while it lives."""
    series = Series("open, same AUTH_ID" if again else "screen open")
    options = {"taskId": str(task)}
    token = ""
    same = portal.frame_post(user, options=options, lang=LANG)

    def one(measure: Callable[..., Any] | None) -> None:
        nonlocal token
        url, fields = same if again else portal.frame_post(user, options=options, lang=LANG)

        def request():
            return _post_form(client, url, fields)

        response = measure(request) if measure else request()
        html = response.content.decode()
        if response.status_code != 200 or html.count(RESULT_ITEM) != RESULTS:
            raise RuntimeError(
                f"the screen answered {response.status_code} with {html.count(RESULT_ITEM)} "
                f"results instead of {RESULTS}:\n{html[:1500]}"
            )
        token = FRAME_TOKEN.search(html).group(1)

    for _ in range(WARMUP):
        one(None)
    gc.collect()
    for number in range(count):
        one(lambda request: _timed(request, series, stopwatch, http))
        if number % 50 == 49:
            _clear_records(fake, portal)
    for _ in range(QUERY_SAMPLES):
        one(lambda request: _counted(request, series))
    _clear_records(fake, portal)
    return series, token


def _post_form(client, url: str, fields: dict, **headers):
    """A form-encoded POST, as Bitrix24 posts the placement into the frame and as the screen's
    script sends a change (encoded here, not by the tree's test helpers, so that the baseline and
    this tree get the same bytes)."""
    parts = urlsplit(url)
    return client.post(
        f"{parts.path}?{parts.query}" if parts.query else parts.path,
        data=urlencode(fields, doseq=True),
        content_type="application/x-www-form-urlencoded",
        **headers,
    )


def _edits(client, fake, portal, task, user, token, stopwatch, http, count) -> tuple[Series, int]:
    series = Series("edit round trip")
    own = [item for item in portal.results(task) if int(item["authorId"]) == user]
    result_id = int(own[0]["id"])
    url = f"/b24/app/results/{result_id}/edit/"
    state = {"text": str(own[0]["text"]), "number": 0}
    applied = 0

    def one(measure: Callable[..., Any] | None) -> bool:
        state["number"] += 1
        before, text = state["text"], f"Edited {state['number']}: figures checked again"
        fields = {"task": str(task), "text": text, "text_before": before}

        def request():
            return _post_form(
                client, url, fields, HTTP_X_FRAME_TOKEN=token, HTTP_ACCEPT="application/json"
            )

        response = measure(request) if measure else request()
        payload = response.json() if response.status_code == 200 else {}
        change = payload.get("change") or {}
        if payload.get("error") or change.get("state") != "saved" or payload.get("text") != text:
            raise RuntimeError(f"the edit answered {response.status_code}: {payload!r:.1500}")
        state["text"] = text
        at_portal = next(item for item in portal.results(task) if int(item["id"]) == result_id)
        return at_portal["text"] == text

    for _ in range(WARMUP):
        one(None)
    gc.collect()
    for number in range(count):
        applied += one(lambda request: _timed(request, series, stopwatch, http))
        if number % 50 == 49:
            _clear_records(fake, portal)
    for _ in range(QUERY_SAMPLES):
        one(lambda request: _counted(request, series))
    _clear_records(fake, portal)
    return series, applied


def _print(all_series: list[Series], applied: int, count: int, connection, elapsed) -> None:
    rows = []
    for series in all_series:
        total = summary(series.total)
        record(
            "screen",
            f"{series.name}: median / p99, queries (sequential, in-process)",
            f"{total['median']:.1f} / {total['p99']:.1f} ms, {_span(series.queries)} queries",
        )
        parts = [
            ("total", series.total),
            ("portal (fake's handling)", series.portal),
            ("app = total - portal", _minus(series.total, series.portal)),
            ("app's REST calls (wall)", series.http),
            ("app without REST calls", _minus(series.total, series.http)),
        ]
        for part, samples in parts:
            figures = summary(samples)
            extra = ["-", "-"]
            if part == "total":
                extra = [_span(series.queries), _span(series.calls_per_request)]
            rows.append(
                [series.name, part, figures["n"], *_figures(figures), *extra],
            )
    database = connection.settings_dict
    where = database["NAME"]
    if connection.vendor != "sqlite":
        where = f"{database.get('HOST') or 'localhost'}:{database.get('PORT') or '-'}/{where}"
    screen, reopen, edit = all_series
    quarter = max(1, count // 4)
    notes = [
        f"applied: {applied}/{count} (the fake's result text equals the last text sent)",
        f"database: {connection.vendor} {where}",
        f"{count} timed requests of each kind after {WARMUP} warm-up ones, sequential,",
        f"one django.test.Client; {elapsed:.1f} s in all",
        "wall-clock milliseconds per request (nearest rank; the median is the middle value);",
        "app = total - portal and 'without REST calls' are per request, then ranked",
        "portal: the fake's handling of each request (portal and OAuth server): http.server's",
        "parsing, the handler, the answer written; app's REST calls: wall time inside the app's",
        "requests session (loopback HTTP, requests, http.server and the fake's handling)",
        f"queries: per request, counted on {QUERY_SAMPLES} extra untimed requests of each kind;",
        f"screen: {_kinds(screen)}; same AUTH_ID: {_kinds(reopen)}; edit: {_kinds(edit)}",
        f"REST: the fake's requests per timed request; screen: {_paths(screen)};",
        f"same AUTH_ID: {_paths(reopen)}; edit: {_paths(edit)}",
        "screen open: a fresh AUTH_ID each time; open, same AUTH_ID: one frame POST sent again",
        "(Bitrix24 posts the person's access token again while it lives)",
        f"edit total median, first {quarter} / last {quarter} edits: "
        f"{fmt(summary(edit.total[:quarter])['median'])} / "
        f"{fmt(summary(edit.total[-quarter:])['median'])} ms; every list reads back the",
        f"user's changes saved in the last 2 minutes: about {len(edit.total) + WARMUP} by the end",
        f"task with {RESULTS} results (half the opener's); fake on 127.0.0.1 in this process,",
        "its rate limit and the Portal row's at 10^6/10^6; background work inline (no broker),",
        "in-process rate limiter, the app's log lines formatted to /dev/null",
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.2f} (1 min) at the end",
    ]
    print_table(
        TITLE,
        ["request", "part", "n", "median ms", "p95 ms", "p99 ms", "queries", "REST calls"],
        rows,
        notes,
    )


def _minus(left: list[float], right: list[float]) -> list[float]:
    return [a - b for a, b in zip(left, right, strict=True)]


def _figures(figures: dict[str, float]) -> list[str]:
    return [fmt(figures["median"], 2), fmt(figures["p95"], 2), fmt(figures["p99"], 2)]


def _span(values: list[int]) -> str:
    if not values:
        return "-"
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}-{high}"


def _kinds(series: Series) -> str:
    per = max(1, len(series.queries))
    return " ".join(f"{kind} {count / per:g}" for kind, count in sorted(series.query_kinds.items()))


def _paths(series: Series) -> str:
    per = max(1, len(series.calls_per_request))
    return ", ".join(f"{path} x{count / per:g}" for path, count in sorted(series.calls.items()))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
