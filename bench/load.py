"""The screen under load: gunicorn (gthread) serving the embedded screen to locust users.

The app runs as the Procfile's ``web`` process does (gunicorn, ``gthread`` workers, production
settings but for the loopback allowances of ``bench.common``), on PostgreSQL with the shared Redis
rate limiter and background work inline (no broker). The fake Bitrix24 runs in this process on
127.0.0.1, its rate limit and the Portal row's raised to 10^6/10^6. The portal is installed
through the install wizard over HTTP; each simulated person is a Bitrix24 user of its own, with
its own tokens, and owns one of the 20 results of the task it opens.

Locust (headless, in a process of its own: its gevent monkeypatching stays out of this one) runs
``bench/_load_locust.py`` at 20 and then 100 concurrent users: every user opens the placement
(``POST /b24/app/``) and then edits its own result three times (``POST
/b24/app/results/<id>/edit/``, JSON), with a think time after every request, and checks every
answer. Per run and request kind the bench reports requests, failures, requests/s and the
client's p50/p95/p99, and splits each request's time into gunicorn's own request time (access
log ``%(D)s``), the fake's handling of the REST calls made meanwhile (its listeners wrapped, the
calls told apart by the person's token) and the app's share, gunicorn minus fake. It also
samples the CPU time of gunicorn, the fake, locust and the whole machine, to show which one ran
out first. At the end every edit answered 2xx must be applied at the fake with its text.

Needs PostgreSQL (``BENCH_LOAD_DATABASE_URL``, default database ``b24bench_load``, created when
missing and migrated) and Redis (``BENCH_LOAD_REDIS_URL``, default DB 7); without them it prints
why it skipped. ``DATABASE_URL``, ``REDIS_URL`` and ``CELERY_BROKER_URL`` are not used.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from bisect import bisect_left, bisect_right
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from bench.common import (
    ROOT,
    HandlerTimer,
    baseline_revision,
    baseline_tree,
    ensure_database,
    fake_and_database,
    fmt,
    print_table,
    record,
    require_loopback,
    run_in_tree,
    skipped,
    summary,
)
from tests.appserver import PROCFILE_ACCESS_FORMAT, AppServer

BENCH_ORDER = 35
TITLE = "the screen under load (gunicorn + locust)"

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/b24bench_load"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/7"
USERS = tuple(int(count) for count in os.environ.get("BENCH_LOAD_USERS", "20,100").split(","))
SECONDS = max(5, min(int(os.environ.get("BENCH_LOAD_SECONDS", "25")), 600))
"""Measured seconds of each run, after every user has started and SETTLE_S have passed."""
THINK_S = float(os.environ.get("BENCH_LOAD_THINK_S", "1"))
"""Mean think time after each request (uniform from half to one and a half times); 0: none."""
SETTLE_S = 3
"""Seconds after the last user started that are not measured (first opens, new accounts)."""
STOP_TIMEOUT_S = 60
"""Users finish the request in flight when the run ends (the think time is cut short), so
every edit sent gets its answer and the final texts at the fake can be checked exactly."""
EDITS_PER_OPEN = 3
RESULTS_PER_TASK = 20
WORKERS = int(os.environ.get("BENCH_LOAD_WORKERS", "2"))
THREADS = int(os.environ.get("BENCH_LOAD_THREADS", "8"))
"""gunicorn: one worker per CPU of this 2-CPU machine (a Python process runs Python code on one
CPU at a time), and the Procfile's 8 threads each, which overlap the waits on PostgreSQL, Redis
and Bitrix24 in which a request spends much of its time."""
NO_LIMIT = (10**6, 10**6)
READY_TIMEOUT_S = 30.0
CPU_EVERY_S = 0.5
ACCESS_FORMAT = PROCFILE_ACCESS_FORMAT + " %(D)sus %({x-bench-request}i)s"
"""The Procfile's access log line, plus the request time in microseconds and the request id."""
ACCESS_TAIL = re.compile(r" (\d+)us (\S+)$")
LOCUSTFILE = ROOT / "bench" / "_load_locust.py"
JSON_PREFIX = "BENCH_LOAD_JSON "
PORTALS = max(1, int(os.environ.get("BENCH_LOAD_PORTALS", "1")))
"""Portals the users are spread over (round robin): one portal's users share its in-flight cap
(``B24_PORTAL_MAX_INFLIGHT``), and a web request finding it full answers 503 at once."""
COMPARE_USERS = os.environ.get("BENCH_LOAD_COMPARE_USERS", "100")
COMPARE_THINK_S = os.environ.get("BENCH_LOAD_COMPARE_THINK_S", "0.25")
COMPARE_PORTALS = os.environ.get("BENCH_LOAD_COMPARE_PORTALS", "10")
"""Side by side with a baseline (the default), each tree runs these users over these portals
with this mean think time: 100 people asking every quarter of a second want about 400
requests/s, more than either side serves here, so each side's requests/s is what it can serve;
ten to a portal, as a vendor's screens are spread over many portals, so no portal's in-flight
cap turns the surplus into 503s."""
KINDS = ("open", "edit")


@dataclass
class Sample:
    """One request of a simulated person, as locust saw it, with the server's parts (ms)."""

    kind: str
    user: int
    request: str
    text: str | None
    start: float
    ms: float
    status: int
    failure: str | None
    gunicorn_ms: float | None = None
    portal_ms: float = 0.0
    rest_calls: int = 0


@dataclass
class Run:
    """One locust run: its samples, the measured window, where the CPU went."""

    users: int
    samples: list[Sample]
    window: tuple[float, float]
    cpu: dict[str, float]
    """Share of one CPU per part over the window, in %."""
    paths: Counter
    """REST paths the fake handled for the measured requests, per kind: ``(kind, path)``."""
    stray_calls: int
    """Fake calls that fell in no request of a person (OAuth, unknown tokens, clock trouble)."""
    edits_ok: int
    edits_applied: int
    people: int
    final_texts_ok: int
    locust_warnings: list[str]
    call_errors: Counter
    """The app's failed Bitrix24 calls during the whole run, by error code (its log lines)."""
    wall_s: float
    """The whole locust run: its start, the users' run, their last requests, its exit."""

    @property
    def measured(self) -> list[Sample]:
        start, end = self.window
        return [sample for sample in self.samples if start <= sample.start < end]

    def rate(self, samples: list[Sample]) -> float:
        """Requests per second of measured ``samples`` over the window."""
        return len(samples) / (self.window[1] - self.window[0])


def main(argv: list[str]) -> int:
    revision = None if "--json" in argv else baseline_revision()
    if revision is None:
        return _measure(as_json="--json" in argv)
    return _compare(revision)


def _compare(revision: str) -> int:
    """The baseline's tree and this one under the same load, one after the other, each in a
    process of its own with a database of its own; a table of their requests/s side by side."""
    base_url = os.environ.get("BENCH_LOAD_DATABASE_URL") or DEFAULT_DATABASE_URL
    env = {
        "BENCH_LOAD_USERS": COMPARE_USERS,
        "BENCH_LOAD_THINK_S": COMPARE_THINK_S,
        "BENCH_LOAD_PORTALS": COMPARE_PORTALS,
    }
    runs = {}
    with baseline_tree(revision, ["common.py", "load.py", "_load_locust.py"]) as tree:
        for side, where in (("baseline", tree), ("now", ROOT)):
            print(f"== {TITLE}: {side} ({where})", flush=True)
            side_env = {**env, "BENCH_LOAD_DATABASE_URL": f"{base_url}_{side}"}
            runs[side] = run_in_tree(where, "bench.load", JSON_PREFIX, env=side_env)
            if runs[side].get("skipped"):
                return skipped(TITLE, runs[side]["skipped"])
    rows = []
    for then, now in zip(runs["baseline"]["runs"], runs["now"]["runs"], strict=True):
        ratio = now["rate"] / then["rate"] if then["rate"] else 0.0
        rows.append(
            [
                now["users"],
                fmt(then["rate"]),
                fmt(now["rate"]),
                f"{ratio:.2f}",
                f"{then['failures']} / {now['failures']}",
                f"{fmt(then['open_p50'], 0)} / {fmt(now['open_p50'], 0)}",
                f"{fmt(then['edit_p50'], 0)} / {fmt(now['edit_p50'], 0)}",
            ]
        )
        record(
            "load",
            f"{now['users']} users, think {COMPARE_THINK_S} s: req/s, baseline {revision} -> now",
            f"{then['rate']:.1f} -> {now['rate']:.1f} ({ratio:.2f}x), "
            f"errors {then['failures']} -> {now['failures']}",
        )
    print_table(
        f"{TITLE}: baseline {revision} vs now",
        ["users", "baseline req/s", "now req/s", "ratio", "errors", "open p50 ms", "edit p50 ms"],
        rows,
        [
            f"each side: {COMPARE_USERS} users over {COMPARE_PORTALS} portals, think time "
            f"{COMPARE_THINK_S} s (mean), so that the users",
            "ask for more than either side serves and req/s is what the app can serve;",
            "errors: failed requests in the whole run (ramp-up included); the same machine,",
            "one side after the other, each with a database of its own; this bench's files",
            "copied into the baseline's temporary worktree;",
            f"baseline b24app: {runs['baseline']['b24app']}",
        ],
    )
    return 0 if runs["baseline"]["ok"] and runs["now"]["ok"] else 1


def _measure(as_json: bool) -> int:
    database_url = os.environ.get("BENCH_LOAD_DATABASE_URL") or DEFAULT_DATABASE_URL
    redis_url = os.environ.get("BENCH_LOAD_REDIS_URL") or DEFAULT_REDIS_URL
    problem = ensure_database(database_url) or _redis_problem(redis_url)
    if problem:
        if as_json:
            import b24app

            print(JSON_PREFIX + json.dumps({"b24app": b24app.__file__, "skipped": problem}))
        return skipped(TITLE, problem)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        folder = Path(tmp)
        server = _server(folder)
        _environment(redis_url, folder, server.url)
        with fake_and_database(database_url) as fake:
            from django.core.management import call_command
            from django.db import connections

            # The admin's hundreds of files would take most of the budget to compress; the
            # screen's pages name only the apps' own files, which locust does not fetch.
            call_command("collectstatic", interactive=False, verbosity=0, ignore_patterns=["admin"])
            connections.close_all()
            runs = _run(fake, folder, server)
    _print(runs, database_url, redis_url, time.monotonic() - started)
    _record(runs)
    lost = any(
        run.edits_applied != run.edits_ok or run.final_texts_ok != run.people for run in runs
    )
    if as_json:
        print(JSON_PREFIX + json.dumps(_figures(runs)), flush=True)
    return 1 if lost else 0


def _figures(runs: list[Run]) -> dict[str, Any]:
    """What a comparison needs of this tree's runs (``--json``)."""
    import b24app

    figures = []
    for run in runs:
        measured = run.measured
        figures.append(
            {
                "users": run.users,
                "rate": run.rate(measured),
                "failures": sum(s.failure is not None for s in run.samples),
                **{
                    f"{kind}_p50": summary([s.ms for s in measured if s.kind == kind])["median"]
                    for kind in KINDS
                },
            }
        )
    return {"b24app": b24app.__file__, "runs": figures}


def _environment(redis_url: str, folder: Path, app_url: str) -> None:
    """This bench's Redis, no broker, its static folder, the app's public URL; inherited by
    gunicorn, as is the database (``fake_and_database``). The rest comes from ``bench.common``'s
    defaults."""
    os.environ["REDIS_URL"] = redis_url
    os.environ["CELERY_BROKER_URL"] = ""
    os.environ["DJANGO_STATIC_ROOT"] = str(folder / "static")
    os.environ["B24_APP_URL"] = app_url


def _redis_problem(url: str) -> str | None:
    """The reason to skip when the limiter's Redis does not answer, or ``None``."""
    import redis

    parts = urlsplit(url)
    client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
    try:
        client.ping()
    except redis.RedisError as exc:
        return f"needs Redis, but {parts.hostname}:{parts.port or 6379} is not usable ({exc})"
    finally:
        client.close()
    return None


# --- the run -----------------------------------------------------------------------------------


def _run(fake: Any, folder: Path, server: AppServer) -> list[Run]:
    from b24app.portals.models import Portal

    app_url = server.url
    fake.app_url = app_url
    portals = []
    for _ in range(PORTALS):
        portal = fake.add_portal(rate_limit=NO_LIMIT)
        portal.set_rate_limit(*NO_LIMIT)
        require_loopback(portal.url)
        portals.append((portal, portal.add_user(name="Anna", last_name="Smirnova", admin=True)))
    server.start()
    try:
        server.wait_ready(READY_TIMEOUT_S)
        for portal, installer in portals:
            _install(portal, installer)
        Portal.objects.filter(member_id__in=[portal.member_id for portal, _ in portals]).update(
            rate_limit=f"{NO_LIMIT[0]}/{NO_LIMIT[1]}"
        )
        # The installs' calls were paced at the default rate; their schedule (in the shared
        # Redis) would hold the first opens back at the new one for longer than a web request
        # waits, and they would be answered 503 (as bench/screen.py does).
        from b24app.portals import services

        for portal, _ in portals:
            services.rate_limiter().reset(portal.member_id)
        listeners = [listener for portal, _ in portals for listener in portal._listeners]
        timer = HandlerTimer(*listeners, fake._listener)  # private, as bench/screen.py
        runs = []
        for users in USERS:
            people, tokens = [], {}
            for index, (portal, installer) in enumerate(portals):
                share = users // PORTALS + (index < users % PORTALS)
                more, more_tokens = _people(portal, index, installer, share, app_url, len(people))
                people.extend(more)
                tokens.update(more_tokens)
            fake_portals = [portal for portal, _ in portals]
            runs.append(
                _run_once(folder, app_url, people, tokens, timer, fake_portals, server.process)
            )
        return runs
    finally:
        server.stop()
        Portal.objects.filter(member_id__in=[portal.member_id for portal, _ in portals]).delete()


def _server(folder: Path) -> AppServer:
    """The Procfile's ``web`` command on loopback, with ``%(D)s`` and the request id added to
    its access log line, which goes to a file in ``folder``, as does the app's output (its log
    lines on stdout, gunicorn's on stderr); a short graceful timeout for the bench's stop."""
    return AppServer(
        folder / "gunicorn.out",
        workers=WORKERS,
        threads=THREADS,
        access_log=folder / "access.log",
        access_format=ACCESS_FORMAT,
        graceful_timeout_s=5,
    )


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no output)"


def _install(portal: Any, installer: int) -> None:
    """The install wizard over HTTP, as Bitrix24 posts it; then ``installFinish``."""
    import requests

    url, fields = portal.install_post(installer)
    response = requests.post(require_loopback(url), data=fields, timeout=30)
    if response.status_code != 200:
        raise RuntimeError(f"install answered {response.status_code}: {response.text[:500]}")
    portal.mark_installed()


def _people(
    portal: Any, index: int, installer: int, count: int, app_url: str, numbered_from: int
) -> tuple[list[dict], dict]:
    """``count`` new Bitrix24 users of ``portal`` (the ``index``-th), 20 to a task of 20
    results with one result each (the installer's the rest), and each one's frame POST; and
    their access tokens -> person. A person's ``user`` is their number among all portals'
    people (from ``numbered_from``); ``bitrix_user`` their id on their portal."""
    people, tokens = [], {}
    for first in range(0, count, RESULTS_PER_TASK):
        group = [
            portal.add_user(name=f"User {number + 1}", last_name="Load")
            for number in range(first, min(first + RESULTS_PER_TASK, count))
        ]
        task = portal.add_task(
            title=f"Load task {first // RESULTS_PER_TASK + 1}",
            created_by=installer,
            responsible_id=installer,
        )
        authors = group + [installer] * (RESULTS_PER_TASK - len(group))
        for number, author in enumerate(authors, start=1):
            text = f"Result {number}: figures checked, report sent"
            result = portal.add_result(task, author_id=author, text=text)
            if author == installer:
                continue
            url, fields = portal.frame_post(author, options={"taskId": str(task)})
            if not url.startswith(f"{app_url}/"):
                raise RuntimeError(f"the frame POST goes to {url}, not to the app")
            parts = urlsplit(url)
            person = numbered_from + len(people) + 1
            people.append(
                {
                    "user": person,
                    "portal": index,
                    "bitrix_user": author,
                    "task": task,
                    "result": result,
                    "text": text,
                    "open_path": f"{parts.path}?{parts.query}",
                    "open_body": urlencode(fields),
                }
            )
            tokens[fields["AUTH_ID"]] = person
    return people, tokens


def _run_once(
    folder: Path,
    app_url: str,
    people: list[dict],
    tokens: dict[str, int],
    timer: HandlerTimer,
    portals: list[Any],
    gunicorn: subprocess.Popen,
) -> Run:
    """One locust run with one user per person; its samples read, attributed and checked."""
    users = len(people)
    samples_path = folder / f"samples-{users}.jsonl"
    plan_path = folder / f"plan-{users}.json"
    plan = {
        "think_s": THINK_S,
        "edits_per_open": EDITS_PER_OPEN,
        "results_per_task": RESULTS_PER_TASK,
        "samples": str(samples_path),
        "people": people,
    }
    plan_path.write_text(json.dumps(plan), encoding="utf-8")
    run_s = 1 + SETTLE_S + SECONDS  # every user starts within the first second
    log_path = folder / f"locust-{users}.log"
    command = [
        *(sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless"),
        *("--host", app_url, "--users", str(users), "--spawn-rate", str(users)),
        *("--run-time", f"{run_s}s", "--stop-timeout", str(STOP_TIMEOUT_S)),
        *("--only-summary", "--exit-code-on-error", "0", "--loglevel", "WARNING"),
    ]
    timer.handled.clear()
    timer.recording = True
    log_offset = _size(folder / "gunicorn.out")
    meter = CpuMeter(gunicorn.pid)
    started = time.monotonic()
    try:
        with open(log_path, "w", encoding="utf-8") as log:
            locust = subprocess.Popen(
                command,
                cwd=ROOT,
                env={**os.environ, "BENCH_LOAD_PLAN": str(plan_path)},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            meter.watch(locust.pid)
            try:
                code = locust.wait(timeout=run_s + STOP_TIMEOUT_S + 60)
            except subprocess.TimeoutExpired:
                locust.kill()
                raise
    finally:
        timer.recording = False
        meter.stop()
    wall_s = time.monotonic() - started
    if code != 0:
        raise RuntimeError(f"locust exited with {code}:\n{_tail(log_path)}")
    samples, window = _read_samples(samples_path)
    _gunicorn_times(samples, folder / "access.log")
    paths, stray = _portal_times(samples, timer, tokens, window)
    edits_ok, applied, final_ok = _check_edits(samples, people, portals)
    start, end = window
    return Run(
        users=users,
        samples=samples,
        window=window,
        cpu=meter.shares(start, end),
        paths=paths,
        stray_calls=stray,
        edits_ok=edits_ok,
        edits_applied=applied,
        people=len(people),
        final_texts_ok=final_ok,
        call_errors=_call_errors(folder / "gunicorn.out", since=log_offset),
        locust_warnings=[
            line
            for line in log_path.read_text(encoding="utf-8").splitlines()
            if "CPU usage" in line
        ],
        wall_s=wall_s,
    )


# --- reading the run ---------------------------------------------------------------------------

CALL_ERROR = re.compile(r"(?:bitrix24 call method=(\S+) .*|(placement) refused) error=(\S+)")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _call_errors(app_output: Path, since: int) -> Counter:
    """``(method, code)`` of the app's failed Bitrix24 calls logged after byte ``since``, and
    ``("placement", code)`` of the opens it refused (a call refused before it was sent, by the
    rate limiter or the in-flight cap, shows only there)."""
    errors: Counter = Counter()
    with open(app_output, "rb") as output:
        output.seek(since)
        for line in output.read().decode("utf-8", errors="replace").splitlines():
            match = CALL_ERROR.search(line)
            if match and match.group(3) != "-":
                errors[match.group(1) or match.group(2), match.group(3)] += 1
    return errors


def _read_samples(path: Path) -> tuple[list[Sample], tuple[float, float]]:
    """The locust samples and the measured window: from SETTLE_S after every user had started
    to the moment the run began to stop."""
    samples, events = [], {}
    for line in path.read_text(encoding="utf-8").splitlines():
        item = json.loads(line)
        if "event" in item:
            events[item["event"]] = item["time"]
        else:
            samples.append(Sample(**item))
    if "spawned" not in events or "stopping" not in events:
        raise RuntimeError(f"locust did not report its start and stop: {sorted(events)}")
    return samples, (events["spawned"] + SETTLE_S, events["stopping"])


def _gunicorn_times(samples: list[Sample], access_log: Path) -> None:
    """gunicorn's own request time (``%(D)s``) of each sample, matched by its request id."""
    times = {}
    for line in access_log.read_text(encoding="utf-8").splitlines():
        match = ACCESS_TAIL.search(line)
        if match and match.group(2) != "-":
            times[match.group(2)] = int(match.group(1)) / 1000
    for sample in samples:
        sample.gunicorn_ms = times.get(sample.request)


def _portal_times(
    samples: list[Sample], timer: HandlerTimer, tokens: dict, window: tuple[float, float]
) -> tuple[Counter, int]:
    """The fake's handling of each sample's REST calls: a person has one request in flight at a
    time, so a call with their token that began inside their request belongs to it. Also the
    paths called for the requests in ``window``, and the calls that belong to no request."""
    calls = defaultdict(list)
    stray = 0
    for handled in timer.handled:
        body = handled.request.parsed_body()
        user = tokens.get(body.get("auth")) if isinstance(body, dict) else None
        if user is None:
            stray += 1
        else:
            calls[user].append(handled)
    by_user = defaultdict(list)
    for sample in samples:
        by_user[sample.user].append(sample)
    paths: Counter = Counter()
    start, end = window
    for user, handled in calls.items():
        handled.sort(key=lambda call: call.started)
        starts = [call.started for call in handled]
        claimed = 0
        for sample in by_user.get(user, []):
            first = bisect_left(starts, sample.start)
            last = bisect_right(starts, sample.start + sample.ms / 1000)
            for call in handled[first:last]:
                sample.portal_ms += call.elapsed_us / 1000
                sample.rest_calls += 1
                if start <= sample.start < end:
                    paths[(sample.kind, call.request.path)] += 1
            claimed += last - first
        stray += len(handled) - claimed
    return paths, stray


def _check_edits(
    samples: list[Sample], people: list[dict], portals: list[Any]
) -> tuple[int, int, int]:
    """Edits answered 2xx, how many of them the fake applied with their text, and the people
    whose result at the fake carries the text of their last edit answered 2xx."""
    applied = defaultdict(set)  # (portal index, result id) -> texts applied
    for index, portal in enumerate(portals):
        for call in portal.calls(method="tasks.task.result.update", api="v3"):
            body = call["body"] if isinstance(call["body"], dict) else {}
            fields = body.get("fields") if isinstance(body.get("fields"), dict) else {}
            if call["status"] == 200 and not call["replayed"]:
                applied[index, body.get("id")].add(fields.get("text"))
    result_of = {person["user"]: (person["portal"], person["result"]) for person in people}
    ok = sorted(
        (sample for sample in samples if sample.kind == "edit" and sample.failure is None),
        key=lambda sample: sample.start,
    )
    last_text = {sample.user: sample.text for sample in ok}
    found = sum(sample.text in applied[result_of[sample.user]] for sample in ok)
    final_ok = 0
    for person in people:
        expected = last_text.get(person["user"], person["text"])
        portal = portals[person["portal"]]
        items = {int(item["id"]): item for item in portal.results(person["task"])}
        final_ok += items[person["result"]]["text"] == expected
    return len(ok), found, final_ok


class CpuMeter:
    """CPU time of gunicorn (master and workers), of this process (the fake, in effect), of
    locust and of the whole machine, sampled every ``CPU_EVERY_S`` with the wall clock."""

    def __init__(self, gunicorn_pid: int) -> None:
        import psutil

        self._gunicorn = psutil.Process(gunicorn_pid)
        self._fake = psutil.Process()
        self._locust = None
        self._snapshots: list[tuple[float, dict[str, float]]] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="cpu-meter", daemon=True)
        self._thread.start()

    def watch(self, locust_pid: int) -> None:
        import psutil

        self._locust = psutil.Process(locust_pid)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._done.wait(CPU_EVERY_S):
            self._snapshots.append((time.time(), self._snapshot()))

    def _snapshot(self) -> dict[str, float]:
        import psutil

        machine = psutil.cpu_times()
        busy = sum(
            getattr(machine, name, 0.0)
            for name in ("user", "nice", "system", "irq", "softirq", "steal")
        )
        gunicorn = [self._gunicorn]
        try:
            gunicorn += self._gunicorn.children(recursive=True)
        except psutil.Error:
            pass
        return {
            "gunicorn": _cpu_seconds(gunicorn),
            "fake": _cpu_seconds([self._fake]),
            "locust": _cpu_seconds([self._locust] if self._locust else []),
            "machine": busy,
        }

    def shares(self, start: float, end: float) -> dict[str, float]:
        """Per part, the CPU it used between the snapshots nearest inside ``start``..``end``, in
        % of one CPU; ``other`` is the machine's rest (PostgreSQL, Redis, anything else)."""
        inside = [snapshot for snapshot in self._snapshots if start <= snapshot[0] <= end]
        if len(inside) < 2:
            return {}
        (first_at, first), (last_at, last) = inside[0], inside[-1]
        span = last_at - first_at
        shares = {name: 100 * (last[name] - first[name]) / span for name in first}
        shares["other"] = shares["machine"] - shares["gunicorn"] - shares["fake"] - shares["locust"]
        return shares


def _cpu_seconds(processes: list[Any]) -> float:
    import psutil

    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


# --- output ------------------------------------------------------------------------------------


def _print(runs: list[Run], database_url: str, redis_url: str, elapsed: float) -> None:
    rows, parts_rows, notes = [], [], []
    for run in runs:
        measured = run.measured
        for kind in (*KINDS, "all"):
            chosen = [s for s in measured if kind == "all" or s.kind == kind]
            figures = summary([s.ms for s in chosen])
            failures = sum(s.failure is not None for s in chosen)
            rows.append(
                [run.users, kind, len(chosen), failures, fmt(run.rate(chosen)), *_ms(figures)]
            )
        for kind in KINDS:
            chosen = [s for s in measured if s.kind == kind and s.failure is None and s.gunicorn_ms]
            parts = [
                ("client (locust)", [s.ms for s in chosen]),
                ("gunicorn %(D)s", [s.gunicorn_ms for s in chosen]),
                ("portal (fake's handling)", [s.portal_ms for s in chosen]),
                ("app = gunicorn - portal", [s.gunicorn_ms - s.portal_ms for s in chosen]),
                ("wait = client - gunicorn", [s.ms - s.gunicorn_ms for s in chosen]),
            ]
            for part, values in parts:
                figures = summary(values)
                parts_rows.append([run.users, kind, part, figures["n"], *_ms(figures)])
        notes.extend(_run_notes(run))
    print_table(
        TITLE,
        ["users", "request", "requests", "failures", "req/s", "p50 ms", "p95 ms", "p99 ms"],
        rows,
        [
            *notes,
            f"gunicorn {WORKERS} gthread workers x {THREADS} threads (one worker per CPU, the",
            "Procfile's threads); production settings with loopback allowances, DEBUG off,",
            "static files collected, whitenoise; background work inline (no broker); the",
            f"rate limiter in Redis {_where(redis_url)}; database {_where(database_url)}",
            f"people spread over {PORTALS} portal(s); each user: open, then {EDITS_PER_OPEN} "
            "edits of its own result, "
            + (
                f"think time {THINK_S / 2:g}-{THINK_S * 3 / 2:g} s after every request"
                if THINK_S
                else "no think time"
            ),
            f"measured: {SECONDS} s per run, from {SETTLE_S} s after every user had started "
            "to the stop;",
            "req/s: requests started in that window per second; percentiles: nearest rank",
            f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average "
            f"{os.getloadavg()[0]:.2f} (1 min) at the end; {elapsed:.0f} s in all: locust runs "
            f"{' + '.join(f'{run.wall_s:.0f}' for run in runs)} s, the rest setup and checks",
        ],
    )
    print_table(
        f"{TITLE}: where the time goes",
        ["users", "request", "part", "n", "p50 ms", "p95 ms", "p99 ms"],
        parts_rows,
        [
            "successful measured requests; each part is per request, then ranked",
            "gunicorn %(D)s: from gunicorn reading the request to the end of the answer",
            "portal: the fake's handlers (routing, REST logic, its request log; no socket I/O)",
            "for the REST calls made with the person's token while their request was open",
            "wait: time before a gunicorn thread took the request, plus loopback and locust",
        ],
    )


def _run_notes(run: Run) -> list[str]:
    everything = run.samples
    failures = Counter(s.failure for s in everything if s.failure is not None)
    per_request = {
        kind: summary([s.rest_calls for s in run.measured if s.kind == kind and not s.failure])
        for kind in KINDS
    }
    per_kind = defaultdict(list)
    for (kind, path), count in sorted(run.paths.items()):
        per_kind[kind].append(f"{path} x{count}")
    cpu = ", ".join(f"{name} {share:.0f} %" for name, share in run.cpu.items())
    rate = run.rate(run.measured)
    cpu_per_request = ", ".join(
        f"{name} {run.cpu[name] * 10 / rate:.1f} ms"
        for name in ("gunicorn", "fake")
        if run.cpu and rate
    )
    share = {
        kind: _share(
            [s for s in run.measured if s.kind == kind and s.failure is None and s.gunicorn_ms]
        )
        for kind in KINDS
    }
    notes = [
        f"{run.users} users: {len(everything)} requests in the whole run (ramp-up and settling "
        f"included), {sum(failures.values())} failed"
        + (": " + "; ".join(f"{text} x{count}" for text, count in failures.most_common(4)))
        * bool(failures),
        f"  edits answered 2xx and applied at the fake with their text: "
        f"{run.edits_applied}/{run.edits_ok}; people whose result ends with their last "
        f"edit: {run.final_texts_ok}/{run.people}",
        f"  REST calls per request (median): open {fmt(per_request['open']['median'], 0)}, "
        f"edit {fmt(per_request['edit']['median'], 0)}; calls outside any request: "
        f"{run.stray_calls}",
        *(f"  {kind}: {', '.join(items)}" for kind, items in per_kind.items()),
        f"  the fake's share of gunicorn's time: open {share['open']}, edit {share['edit']}",
        f"  CPU in % of one CPU over the window: {cpu or 'not sampled'}",
        f"  CPU per measured request: {cpu_per_request or '-'}",
        "  the app's failed Bitrix24 calls and refused opens: "
        + (
            ", ".join(f"{m} {code} x{n}" for (m, code), n in run.call_errors.most_common(6))
            or "none"
        ),
        *(f"  locust: {warning.strip()}" for warning in run.locust_warnings),
    ]
    return notes


def _share(samples: list[Sample]) -> str:
    total = sum(s.gunicorn_ms for s in samples)
    return f"{100 * sum(s.portal_ms for s in samples) / total:.0f} %" if total else "-"


def _ms(figures: dict[str, float]) -> list[str]:
    return [fmt(figures["median"]), fmt(figures["p95"]), fmt(figures["p99"])]


def _where(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or '-'}{parts.path}"


def _record(runs: list[Run]) -> None:
    for run in runs:
        measured = run.measured
        for kind, label in (("open", "screen open"), ("edit", "edit")):
            figures = summary([s.ms for s in measured if s.kind == kind])
            record(
                "load",
                f"{run.users} users: {label} p50 / p99",
                f"{figures['median']:.0f} / {figures['p99']:.0f} ms",
            )
        record("load", f"{run.users} users: requests/s", f"{run.rate(measured):.1f}")
        failures = sum(s.failure is not None for s in run.samples)
        record("load", f"{run.users} users: errors (whole run)", str(failures), target="0")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
