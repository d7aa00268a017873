"""Refresh storm: many callers of one account meet an expired access token at once.

Each round expires the account's access token at the fake portal, then 50 callers in 2 OS
processes (25 threads each, ``bench/storm_rounds.py``) call ``profile`` through
``account_client`` at the same instant, on PostgreSQL. The locked, lazy refresh should spend the
single-use refresh token exactly once per round: one token-endpoint call, no ``invalid_grant``,
no failed caller. The worker processes live for the whole run (starting two Django processes per
round would cost more than the storm itself); a wall-clock start time sent on their stdin is the
barrier of each round.

Needs PostgreSQL: ``BENCH_DATABASE_URL`` (default ``postgres://postgres@127.0.0.1:5432/b24bench``,
created when missing and migrated). The bench never uses ``DATABASE_URL``, so it cannot write
into a development or production database. Without PostgreSQL it prints why it skipped.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from typing import Any

from bench.common import (
    ROOT,
    ensure_database,
    fake_and_database,
    fmt,
    install_directly,
    print_table,
    record,
    require_loopback,
    skipped,
    summary,
)

BENCH_ORDER = 20
TITLE = "refresh storm"

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/b24bench"
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "100"))
PROCESSES = 2
THREADS = 25
"""Callers per process: 50 callers in all."""
LEAD_S = 0.3
"""How far ahead of "now" a round's start time is set, so both processes are waiting for it."""
READY_TIMEOUT_S = 60.0
ROUND_TIMEOUT_S = 150.0
NO_LIMIT = (10**6, 10**6)


def main(argv: list[str]) -> int:
    rounds = max(1, min(ROUNDS, 10_000))
    database_url = os.environ.get("BENCH_DATABASE_URL", DEFAULT_DATABASE_URL)
    problem = ensure_database(database_url)
    if problem:
        return skipped(TITLE, problem)
    with fake_and_database(database_url) as fake:
        return _run(fake, database_url, rounds)


class Worker:
    """One ``bench.storm_rounds`` process: commands go to its stdin, a thread reads its answers."""

    def __init__(self, env: dict[str, str], account_id: int) -> None:
        self.errors = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.storm_rounds", str(THREADS), str(account_id)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.errors,
            text=True,
            bufsize=1,
        )
        self.messages: queue.Queue[tuple[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            if line.startswith("@@"):
                kind, _, payload = line[2:].partition(" ")
                self.messages.put((kind, json.loads(payload)))
        self.messages.put(("eof", None))

    def send(self, line: str) -> None:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def expect(self, kind: str, timeout: float) -> Any:
        try:
            got, payload = self.messages.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"storm worker sent no {kind!r} within {timeout:.0f} s") from None
        if got != kind:
            raise RuntimeError(f"storm worker ended before {kind!r}:\n{self.stderr_tail()}")
        return payload

    def stderr_tail(self) -> str:
        self.errors.seek(0)
        return self.errors.read()[-2000:]

    def stop(self) -> None:
        try:
            self.send("STOP")
            self.process.stdin.close()
        except OSError:
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.errors.close()


def _install(fake: Any) -> tuple[Any, Any, int]:
    """A fake portal with one admin user, and its Portal and Account rows (the installer's)."""
    from b24app.portals.models import Portal

    portal = fake.add_portal(rate_limit=NO_LIMIT)
    portal.set_rate_limit(*NO_LIMIT)
    require_loopback(portal.url)
    user = portal.add_user(name="Anna", last_name="Smirnova", admin=True)
    stored, account = install_directly(fake, portal, user)
    Portal.objects.filter(pk=stored.pk).update(rate_limit=f"{NO_LIMIT[0]}/{NO_LIMIT[1]}")
    return portal, account, user


def _reconnect_if_blocked(portal: Any, account: Any, user: int) -> bool:
    """After an ``invalid_grant`` round the account is blocked; give it fresh tokens."""
    from b24app.portals import services
    from b24app.portals.bitrix import TokenSet
    from b24app.portals.models import Account, Portal

    if Account.objects.get(pk=account.pk).state != Account.State.BLOCKED:
        return False
    services.account_tokens_store(
        portal=account.portal,
        user_id=user,
        tokens=TokenSet.from_response(portal.issue_tokens(user)),
    )
    Portal.objects.filter(pk=account.portal_id).update(state=Portal.State.ACTIVE)
    return True


def _run(fake: Any, database_url: str, rounds: int) -> int:
    from b24app.portals.models import Portal

    portal, account, user = _install(fake)
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "B24_OAUTH_SERVERS": fake.oauth_url,
        "B24_ALLOW_PRIVATE_PORTALS": "true",
        "DJANGO_CONN_MAX_AGE": "0",
    }
    workers: list[Worker] = []
    started = time.monotonic()
    try:
        for _ in range(PROCESSES):
            workers.append(Worker(env, account.pk))
        for worker in workers:
            worker.expect("ready", READY_TIMEOUT_S)
        _storm_round(fake, portal, workers, 0)  # warm-up: imports, first connections
        _reconnect_if_blocked(portal, account, user)
        results = []
        reconnects = 0
        for number in range(1, rounds + 1):
            results.append(_storm_round(fake, portal, workers, number))
            reconnects += _reconnect_if_blocked(portal, account, user)
    finally:
        for worker in workers:
            worker.stop()
        Portal.objects.filter(pk=account.portal_id).delete()
    _print(results, user, reconnects, time.monotonic() - started)
    return 0


def _storm_round(fake: Any, portal: Any, workers: list[Worker], number: int) -> dict:
    with fake.lock:
        first_call = len(fake.token_calls)
    portal.expire_access_tokens()
    start_at = time.time() + LEAD_S
    for worker in workers:
        worker.send(f"GO {start_at!r} {number}")
    outcomes: list[dict] = []
    for worker in workers:
        outcomes.extend(worker.expect("round", ROUND_TIMEOUT_S)["outcomes"])
    wall_s = time.time() - start_at
    with fake.lock:
        calls = fake.token_calls[first_call:]
    return {
        "outcomes": outcomes,
        "refreshes": sum(1 for call in calls if call["grant_type"] == "refresh_token"),
        "invalid_grant": sum(1 for call in calls if call.get("error") == "invalid_grant"),
        "wall_s": wall_s,
    }


def _print(results: list[dict], user: int, reconnects: int, elapsed: float) -> None:
    refreshes = [result["refreshes"] for result in results]
    refresh_figures = summary(refreshes)
    outcomes = [outcome for result in results for outcome in result["outcomes"]]
    failed = [outcome for outcome in outcomes if outcome.get("user") != user]
    errors = Counter(outcome.get("error", f"user {outcome.get('user')}") for outcome in failed)
    latency = summary([outcome["ms"] for outcome in outcomes])
    wall = summary([result["wall_s"] * 1000 for result in results])
    rows = [
        ["rounds", len(results)],
        ["callers per round", PROCESSES * THREADS],
        ["processes (threads each)", f"{PROCESSES} ({THREADS})"],
        ["token calls per round: min", refresh_figures["min"]],
        ["token calls per round: median", f"{refresh_figures['median']:g}"],
        ["token calls per round: max", refresh_figures["max"]],
        ["token calls: total", sum(refreshes)],
        ["rounds with more than 1 token call", sum(1 for count in refreshes if count > 1)],
        ["invalid_grant answers: total", sum(result["invalid_grant"] for result in results)],
        ["failed callers: total", len(failed)],
        ["caller latency p50 (ms)", fmt(latency["median"])],
        ["caller latency p95 (ms)", fmt(latency["p95"])],
        ["caller latency p99 (ms)", fmt(latency["p99"])],
        ["caller latency max (ms)", fmt(latency["max"])],
        ["round wall time p50 (ms)", fmt(wall["median"])],
    ]
    notes = [
        "token calls: refresh_token grants the fake OAuth server received in the round",
        "caller latency: from the round's shared start time to the caller's answer (load the",
        "account, account_client, profile -> 401 expired_token, locked refresh or re-read, repeat)",
        "one unmeasured warm-up round first; fake portal and Portal.rate_limit at 10^6/10^6;",
        f"PostgreSQL; {elapsed:.1f} s in all; python {sys.version.split()[0]}, "
        f"{os.cpu_count()} CPUs",
    ]
    if errors:
        notes.append("failed callers by error: " + ", ".join(f"{k} {v}" for k, v in errors.items()))
        details = Counter(outcome["detail"] for outcome in failed if outcome.get("detail"))
        notes.extend(f"  {count}x {detail}" for detail, count in details.most_common(3))
    if reconnects:
        notes.append(f"the account was blocked by invalid_grant and given new tokens {reconnects}x")
    print_table(TITLE, ["figure", "value"], rows, notes)
    shape = f"{len(results)} rounds x {PROCESSES * THREADS} callers in {PROCESSES} processes"
    record(
        "refresh",
        f"token calls per round, min / median / max ({shape})",
        f"{refresh_figures['min']} / {refresh_figures['median']:g} / {refresh_figures['max']}",
        "1 / 1 / 1",
    )
    invalid_grants = sum(result["invalid_grant"] for result in results)
    record("refresh", "invalid_grant answers", invalid_grants, "0")
    record("refresh", "failed callers", len(failed), "0")
    record(
        "refresh", "caller latency p50 / p99", f"{latency['median']:.0f} / {latency['p99']:.0f} ms"
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
