"""A process of the multi-round refresh storm (``bench/refresh.py`` starts two of these).

``python -m bench.storm_rounds THREADS ACCOUNT_ID``: sets Django up once, then reads commands on
stdin, one a line:

* ``GO START_AT ROUND`` -- THREADS callers each load the account and call ``profile`` through
  ``account_client`` (as ``tests/portals/storm.py`` does), all starting at the wall-clock time
  START_AT (the barrier shared with the other process); when all are done it prints one line
  ``@@round {"round": ROUND, "outcomes": [{"user"|"error", "ms"}, ...]}``.
* ``STOP`` or the end of stdin -- exit.

Lines starting with ``@@`` are the protocol; anything else on stdout (the app's log) is noise to
the parent. A round waits for at most ``ROUND_LIMIT_S`` per caller thread, so it always ends.
"""

from __future__ import annotations

import json
import sys
import threading
import time

from tests.portals.storm import DB_SLOTS

MARK = "@@"
ROUND_LIMIT_S = 120.0


def _say(kind: str, payload: object) -> None:
    sys.stdout.write(f"{MARK}{kind} {json.dumps(payload)}\n")
    sys.stdout.flush()


def _first_line(exc: Exception) -> str:
    """The first line of a non-Bitrix24 error (database errors carry no tokens), shortened."""
    return (str(exc).strip().splitlines() or [""])[0][:160]


def main(argv: list[str]) -> int:
    threads, account_id = int(argv[0]), int(argv[1])
    from bench.common import setup_django

    setup_django()
    from django.db import connection

    from b24app.portals.bitrix import BitrixError
    from b24app.portals.models import Account
    from b24app.portals.ratelimit import BACKGROUND_LIMITER_WAIT_S
    from b24app.portals.services import account_client

    db_slots = threading.BoundedSemaphore(DB_SLOTS)

    def caller(start_at: float, outcomes: list[dict], lock: threading.Lock) -> None:
        time.sleep(max(0.0, start_at - time.time()))
        started = time.perf_counter()
        with db_slots:
            try:
                account = Account.objects.select_related("portal").get(pk=account_id)
                client = account_client(account, limiter_max_wait=BACKGROUND_LIMITER_WAIT_S)
                profile = client.call("profile")
                outcome: dict = {"user": int(profile["ID"])}
            except BitrixError as exc:
                outcome = {"error": exc.code}
            except Exception as exc:  # reported, so a crash is a failed caller, not a lost one
                outcome = {"error": type(exc).__name__, "detail": _first_line(exc)}
            finally:
                connection.close()
        outcome["ms"] = (time.perf_counter() - started) * 1000
        with lock:
            outcomes.append(outcome)

    _say("ready", {"threads": threads})
    for line in sys.stdin:
        command = line.split()
        if not command or command[0] == "STOP":
            break
        if command[0] != "GO":
            continue
        start_at, round_number = float(command[1]), int(command[2])
        outcomes: list[dict] = []
        lock = threading.Lock()
        workers = [
            threading.Thread(target=caller, args=(start_at, outcomes, lock), daemon=True)
            for _ in range(threads)
        ]
        for worker in workers:
            worker.start()
        deadline = time.monotonic() + ROUND_LIMIT_S
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        with lock:
            lost = threads - len(outcomes)
            finished = list(outcomes)
        finished.extend({"error": "NOT_FINISHED", "ms": ROUND_LIMIT_S * 1000} for _ in range(lost))
        _say("round", {"round": round_number, "outcomes": finished})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
