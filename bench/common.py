"""Shared helpers of the benches: environment, Django, the fake portal, figures and tables.

Nothing here imports Django at module level, so a bench can set the environment first.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"

# Defaults for a bench run, in place before Django reads its settings; the real environment wins.
# The secret key and the Fernet key exist for benches only; the client id and secret are the fake
# portal's (the fake is started with whatever B24_CLIENT_ID/B24_CLIENT_SECRET end up being).
BENCH_ENV = {
    "DJANGO_DEBUG": "false",
    "DJANGO_SECRET_KEY": "bench-only-secret-key-not-for-production-0123456789abcdef",
    "B24_TOKEN_KEYS": "NeQe4XlbOMdGyxxEVHSf_-eYnzSRSc0HMDa-3z1hdaY=",
    "DJANGO_SECURE_SSL_REDIRECT": "false",
    "DJANGO_ALLOWED_HOSTS": "localhost,127.0.0.1",
    "B24_CLIENT_ID": "app.fake0000000001.00000001",
    "B24_CLIENT_SECRET": "fake-client-secret-for-benches-0123456789",
    "B24_ALLOW_PRIVATE_PORTALS": "true",
    # Benches without CELERY_BROKER_URL run background work inline, as `make run` does.
    "B24_INLINE_TASKS": "true",
}


def env_defaults(oauth_url: str | None = None) -> None:
    """Put the bench defaults (and ``B24_OAUTH_SERVERS`` = the fake's) into ``os.environ``."""
    for name, value in BENCH_ENV.items():
        os.environ.setdefault(name, value)
    if oauth_url is not None:
        os.environ.setdefault("B24_OAUTH_SERVERS", oauth_url)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "b24app.settings")


def setup_django(oauth_url: str | None = None) -> None:
    """Environment defaults, then ``django.setup()`` (settings are read once per process)."""
    env_defaults(oauth_url)
    import django

    django.setup()


def in_process_environment(database_url: str) -> None:
    """For benches that drive the app in-process with Django's test client: ``database_url``,
    inline background work (no broker, no Redis) and ``testserver`` among the allowed hosts; the
    rest from :data:`BENCH_ENV` (the real environment wins there)."""
    os.environ["DATABASE_URL"] = database_url
    os.environ["CELERY_BROKER_URL"] = ""
    os.environ["REDIS_URL"] = ""
    hosts = [h for h in os.environ.get("DJANGO_ALLOWED_HOSTS", "").split(",") if h.strip()]
    hosts = hosts or ["localhost", "127.0.0.1"]
    if "testserver" not in hosts and "*" not in hosts:
        hosts.append("testserver")
    os.environ["DJANGO_ALLOWED_HOSTS"] = ",".join(hosts)


def require_loopback(url: str) -> str:
    """Benches talk to the fake portal on 127.0.0.1 only; refuse anything else."""
    if urlsplit(url).hostname != LOOPBACK:
        raise RuntimeError(f"benches only talk to {LOOPBACK}, not to {url}")
    return url


def start_fake():
    """A started ``FakeBitrix`` on 127.0.0.1 whose app credentials match the environment's."""
    env_defaults()
    from tests.fakeportal import FakeBitrix

    fake = FakeBitrix(
        client_id=os.environ["B24_CLIENT_ID"],
        client_secret=os.environ["B24_CLIENT_SECRET"],
        app_url="http://127.0.0.1:9",  # nothing listens there; benches send no events
        host=LOOPBACK,
    )
    fake.start()
    require_loopback(fake.oauth_url)
    return fake


@contextlib.contextmanager
def b24pysdk_over_http() -> Iterator[None]:
    """Let ``b24pysdk`` reach the fake portal over plain HTTP on loopback.

    The SDK hard-codes ``https://{domain}/rest`` as the base of every REST URL (no public
    setting chooses the scheme), and the fake portal speaks HTTP. Only that property
    (``_MethodCaller._base_url``) is replaced, and only inside the ``with``; the SDK's call path
    is otherwise the one it ships.
    """
    from b24pysdk.api.callers.call_method import _MethodCaller

    shipped = _MethodCaller._base_url
    _MethodCaller._base_url = property(lambda caller: f"http://{caller._domain}/rest")
    try:
        yield
    finally:
        _MethodCaller._base_url = shipped


@dataclass(frozen=True)
class HandledRequest:
    """One request a fake listener handled while a ``HandlerTimer`` was recording."""

    started: float
    """Wall clock (``time.time()``) when the handler began: comparable with times taken in
    other processes on the machine, so the fake's work can be laid beside their requests."""
    elapsed_us: float
    request: Any
    """The fake's ``Request`` (path, headers, body), to tell what was called and by whom."""

    @property
    def api(self) -> str:
        return "v3" if self.request.path.startswith("/rest/api/") else "classic"


class HandlerTimer:
    """Times the fake's own handling of requests by wrapping its listeners' ``app(request)``.

    That is the fake's routing, REST logic and request log, without ``http.server``'s parsing
    and socket I/O. Listeners are private attributes of ``tests.fakeportal`` (a portal's
    ``_listeners``, the fake's OAuth ``_listener``). Requests handled while ``recording`` is on
    are kept in ``handled``, from any thread.
    """

    def __init__(self, *listeners: Any) -> None:
        self.recording = False
        self.handled: list[HandledRequest] = []
        for listener in listeners:
            listener.app = self._timed(listener.app)

    def _timed(self, inner: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def timed(request: Any) -> Any:
            started, begun = time.time(), time.perf_counter_ns()
            try:
                return inner(request)
            finally:
                if self.recording:
                    elapsed_us = (time.perf_counter_ns() - begun) / 1000
                    self.handled.append(HandledRequest(started, elapsed_us, request))

        return timed

    def samples(self, api: str) -> list[float]:
        """Handler times (us) of the recorded requests of one API, ``classic`` or ``v3``."""
        return [handled.elapsed_us for handled in self.handled if handled.api == api]


def ensure_database(url: str) -> str | None:
    """Create a bench's PostgreSQL database when missing; the reason to skip, or ``None``."""
    import psycopg
    from psycopg import sql

    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    where = f"{parts.hostname or 'localhost'}:{parts.port or 5432}"
    if parts.scheme not in ("postgres", "postgresql") or not name:
        return f"the bench database must be postgres://…/NAME (got scheme {parts.scheme!r})"
    try:
        with psycopg.connect(
            parts._replace(path="/postgres").geturl(), connect_timeout=3, autocommit=True
        ) as connection:
            exists = connection.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
            ).fetchone()
            if not exists:
                connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.Error as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"needs PostgreSQL, but {where} is not usable ({first_line})"
    return None


@contextlib.contextmanager
def fake_and_database(database_url: str) -> Iterator[Any]:
    """A started fake portal, and Django set up on ``database_url`` (made ``DATABASE_URL``, for
    this process and the ones it starts) and migrated; the fake is stopped at the end.

    The fake comes first: its OAuth server is the default ``B24_OAUTH_SERVERS`` of the settings.
    The database must exist (``ensure_database``).
    """
    os.environ["DATABASE_URL"] = database_url
    fake = start_fake()
    try:
        setup_django(fake.oauth_url)
        from django.core.management import call_command

        call_command("migrate", interactive=False, verbosity=0)
        yield fake
    finally:
        fake.stop()


# --- side by side with a baseline revision ----------------------------------------------------

DEFAULT_BASELINE = "5c45280"
"""The main of the day issue 12 was filed: the speed figures it asks for are ratios to it."""


def baseline_revision() -> str | None:
    """``BENCH_BASELINE`` (a git revision of this repository; :data:`DEFAULT_BASELINE` unless
    set), resolved to its short hash; ``None`` when set to ``none`` (no comparison)."""
    wanted = os.environ.get("BENCH_BASELINE", DEFAULT_BASELINE).strip()
    if wanted.lower() in ("", "none", "0"):
        return None
    return subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", f"{wanted}^{{commit}}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


@contextlib.contextmanager
def baseline_tree(revision: str, bench_files: Sequence[str]) -> Iterator[Path]:
    """``revision`` checked out into a temporary ``git worktree``, with this tree's
    ``bench_files`` (paths under ``bench/``) copied over the baseline's, so that both sides are
    measured by the same bench; removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="bench-baseline-") as folder:
        tree = Path(folder) / "tree"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(tree), revision],
            check=True,
        )
        try:
            for name in bench_files:
                shutil.copyfile(ROOT / "bench" / name, tree / "bench" / name)
            yield tree
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False
            )


def run_in_tree(
    tree: Path, module: str, prefix: str, *, env: dict[str, str] | None = None, show: bool = True
) -> dict[str, Any]:
    """``python -m <module> --json`` with ``tree``'s code first on ``sys.path`` (this venv's
    python, no further comparison), its output shown when ``show``; the figures of its last
    line starting with ``prefix``, with ``ok`` (its exit status was 0)."""
    done = subprocess.run(
        [sys.executable, "-m", module, "--json"],
        cwd=tree,
        env={**os.environ, **(env or {}), "PYTHONPATH": str(tree), "BENCH_BASELINE": "none"},
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith(prefix)]
    if show:
        print("\n".join(line for line in done.stdout.splitlines() if not line.startswith(prefix)))
    if not lines:
        raise RuntimeError(f"{module} in {tree} printed no figures:\n{done.stdout}{done.stderr}")
    figures = json.loads(lines[-1][len(prefix) :])
    if Path(figures["b24app"]).resolve().parent.parent != tree.resolve():
        raise RuntimeError(f"{module} in {tree} imported {figures['b24app']}")
    figures["ok"] = done.returncode == 0
    return figures


def skipped(title: str, reason: str) -> int:
    """Say why a bench did not run; its exit status (0: a missing service is no failure)."""
    print(f"== {title}\nskipped: {reason}\n", flush=True)
    return 0


# --- figures -----------------------------------------------------------------------------------


def percentile(sorted_samples: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of already sorted samples (p in 0..100)."""
    if not sorted_samples:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(sorted_samples)))
    return sorted_samples[min(rank, len(sorted_samples)) - 1]


def summary(samples: Sequence[float]) -> dict[str, float]:
    """``n``, ``median``, ``p95``, ``p99``, ``min``, ``max`` of the samples."""
    ordered = sorted(samples)
    if not ordered:
        return dict.fromkeys(("n", "median", "p95", "p99", "min", "max"), math.nan)
    return {
        "n": len(ordered),
        "median": statistics.median(ordered),
        "p95": percentile(ordered, 95),
        "p99": percentile(ordered, 99),
        "min": ordered[0],
        "max": ordered[-1],
    }


def fmt(value: float, digits: int = 1) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def print_table(
    title: str, header: Sequence[str], rows: Sequence[Sequence[object]], notes: Sequence[str] = ()
) -> None:
    """One plain-text table: title, aligned columns (text left, numbers right), notes."""
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [
        max(len(str(header[column])), *(len(row[column]) for row in cells))
        for column in range(len(header))
    ]
    numeric = [
        all(_looks_numeric(row[column]) for row in cells) and bool(cells)
        for column in range(len(header))
    ]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            value.rjust(width) if is_number else value.ljust(width)
            for value, width, is_number in zip(values, widths, numeric, strict=True)
        ).rstrip()

    rule = "-" * len(line(["-" * width for width in widths]))
    print(f"== {title}")
    print(line([str(name) for name in header]))
    print(rule)
    for row in cells:
        print(line(row))
    for note in notes:
        print(f"   {note}")
    print(flush=True)


def _looks_numeric(text: str) -> bool:
    stripped = text.rstrip("x%").replace(",", "")
    if stripped in ("-", ""):
        return True
    try:
        float(stripped)
    except ValueError:
        return False
    return True


# --- the summary table -------------------------------------------------------------------------

RESULTS_ENV = "BENCH_RESULTS"
"""Names a file that ``record`` appends to; ``python -m bench`` sets it for the benches it runs."""


def record(bench: str, figure: str, value: object, target: str = "") -> None:
    """One headline figure for the summary table of ``python -m bench`` and docs/PERFORMANCE.md.

    ``value`` is printed as given (format numbers first); ``target`` says what "good" is, where
    the issue or the docs set a target (e.g. ">= 95 %", "1"). Without ``BENCH_RESULTS`` (a bench
    run on its own) this does nothing: the bench's own table is the output.
    """
    path = os.environ.get(RESULTS_ENV)
    if not path:
        return
    line = json.dumps({"bench": bench, "figure": figure, "value": str(value), "target": target})
    with open(path, "a", encoding="utf-8") as stream:
        stream.write(line + "\n")


def read_records(path: str | Path) -> list[dict[str, str]]:
    """What ``record`` wrote to ``path``, in order; a missing file is no records."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def install_directly(fake, fake_portal, user_id: int):
    """The Portal row and its installer's Account (``user_id``, an admin, with tokens the fake
    issued), written through the services as a verified install would; for benches whose subject
    is not the install itself. Needs Django set up."""
    from b24app.portals import services
    from b24app.portals.bitrix import TokenSet

    verified = services.VerifiedAuth(
        oauth_server=fake.oauth_url,
        member_id=fake_portal.member_id,
        domain=fake_portal.domain,
        client_endpoint=fake_portal.client_endpoint,
        user_id=user_id,
        status=fake_portal.status,
        scope=fake_portal.scopes,
        installed=True,
    )
    portal = services.portal_upsert(
        verified=verified, application_token=fake_portal.application_token
    )
    account = services.account_tokens_store(
        portal=portal,
        user_id=user_id,
        tokens=TokenSet.from_response(fake_portal.issue_tokens(user_id)),
        is_installer=True,
        is_admin=True,
    )
    return portal, account
