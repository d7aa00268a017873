"""A process of the refresh storm: N threads, each calling `profile` as one account at once.

Run by tests and `bench/` as `python -m tests.portals.storm START_AT THREADS ACCOUNT_ID...`;
threads are spread over the accounts round-robin and all start at the wall-clock time START_AT.
With STORM_CALLS=n in the environment each thread makes n calls in a row (default 1).
Prints one JSON object: per caller, the account it acted as and the Bitrix24 user id it got back
(or the error code). At most DB_SLOTS callers of a process hold a database connection at once
(PostgreSQL's default limit is 100 connections for everything on the machine).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

DB_SLOTS = 20


def main(argv: list[str]) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "b24app.settings")
    import django

    django.setup()
    from django.db import connection

    from b24app.portals.bitrix import BitrixError
    from b24app.portals.models import Account
    from b24app.portals.ratelimit import BACKGROUND_LIMITER_WAIT_S
    from b24app.portals.services import account_client

    start_at, threads = float(argv[0]), int(argv[1])
    calls = int(os.environ.get("STORM_CALLS", "1"))
    account_ids = [int(value) for value in argv[2:]]
    outcomes: list[dict] = []
    lock = threading.Lock()
    db_slots = threading.BoundedSemaphore(DB_SLOTS)

    def caller(index: int) -> None:
        account_id = account_ids[index % len(account_ids)]
        time.sleep(max(0.0, start_at - time.time()))
        with db_slots:
            try:
                account = Account.objects.select_related("portal").get(pk=account_id)
                client = account_client(account, limiter_max_wait=BACKGROUND_LIMITER_WAIT_S)
                for _ in range(calls):
                    profile = client.call("profile")
                outcome = {"account": account_id, "user": int(profile["ID"])}
            except BitrixError as exc:
                outcome = {"account": account_id, "error": exc.code}
            except Exception as exc:  # reported, so a crash is a failed caller, not a lost one
                outcome = {"account": account_id, "error": type(exc).__name__}
            finally:
                connection.close()
        with lock:
            outcomes.append(outcome)

    workers = [threading.Thread(target=caller, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    print(json.dumps(outcomes))


if __name__ == "__main__":
    main(sys.argv[1:])
