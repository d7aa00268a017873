"""Sandbox: a fake Bitrix24 portal + OAuth server to try the app by hand.

    python -m tests.fakeportal --app-url http://localhost:8000 --port 8100 \\
        --client-id X --client-secret Y [--oauth-port 8101]

Starts the OAuth server and one portal with users Anna Smirnova (1, admin) and
Boris Petrov (2), task 1 with two results and task 2 with none; the app is
installed with TASK_VIEW_TAB bound to ``{app_url}/b24/app/``. Once the app
answers ``/healthz`` it gets ONAPPINSTALL for user 1. Runs until Ctrl-C/SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request

from .fake import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, FakeBitrix

log = logging.getLogger("fakeportal.sandbox")


def build_sandbox(fake: FakeBitrix, port: int, status: str):
    portal = fake.add_portal(port=port, status=status)
    anna = portal.add_user(name="Anna", last_name="Smirnova", admin=True)
    boris = portal.add_user(name="Boris", last_name="Petrov")
    task = portal.add_task(
        title="Prepare the quarterly report",
        description="Collect the figures and send the report to the board.",
        created_by=anna,
        responsible_id=boris,
    )
    portal.add_result(task, author_id=anna, text="Draft figures are in the shared folder.")
    portal.add_result(task, author_id=boris, text="Report sent to the board.")
    portal.add_task(title="Update the onboarding checklist", created_by=anna, responsible_id=anna)
    portal.mark_installed()
    portal.bind_placement("TASK_VIEW_TAB", fake.app_url + "/b24/app/", title="Results")
    return portal


def wait_for_app(app_url: str, timeout_s: float, stop: threading.Event) -> int | None:
    """Poll ``{app_url}/healthz``; the last HTTP status seen (None: never answered)."""
    deadline = time.monotonic() + timeout_s
    seen = None
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(app_url + "/healthz", timeout=2) as resp:
                return resp.status
        except urllib.error.HTTPError as err:
            # The app answers, but not 200 (503: broker/redis not up; 404: no
            # /healthz yet). Give it a few more seconds, then go ahead anyway.
            if seen is None:
                deadline = min(deadline, time.monotonic() + 5.0)
            seen = err.code
        except (urllib.error.URLError, OSError):
            pass
        stop.wait(1.0)
    return seen


def send_install_event(portal, app_url: str, timeout_s: float, stop: threading.Event) -> None:
    try:
        health = wait_for_app(app_url, timeout_s, stop)
        if stop.is_set():
            return
        if health is None:
            log.warning(
                "app did not answer %s/healthz within %.0f s; ONAPPINSTALL not sent",
                app_url,
                timeout_s,
            )
            return
        status, _ = portal.send_event("ONAPPINSTALL", url=app_url + "/b24/events/", user_id=1)
        log.info("ONAPPINSTALL for user 1 -> %s/b24/events/: HTTP %s", app_url, status)
    except Exception:  # never crash the sandbox
        log.exception("sending ONAPPINSTALL failed")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fakeportal", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--app-url", default=os.environ.get("B24_APP_URL", "http://localhost:8000"))
    parser.add_argument("--port", type=int, default=8100, help="portal port (0: any free port)")
    parser.add_argument(
        "--oauth-port", type=int, default=8101, help="OAuth server port (0: any free port)"
    )
    parser.add_argument("--client-id", default=os.environ.get("B24_CLIENT_ID", DEFAULT_CLIENT_ID))
    parser.add_argument(
        "--client-secret", default=os.environ.get("B24_CLIENT_SECRET", DEFAULT_CLIENT_SECRET)
    )
    parser.add_argument(
        "--wait", type=float, default=60.0, help="seconds to wait for the app's /healthz"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s fakeportal %(levelname)s %(message)s"
    )

    app_url = args.app_url.rstrip("/")
    fake = FakeBitrix(client_id=args.client_id, client_secret=args.client_secret, app_url=app_url)
    fake.start(port=args.oauth_port)
    status = "L" if args.client_id.startswith("local.") else "F"
    portal = build_sandbox(fake, args.port, status)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(
        target=send_install_event,
        args=(portal, app_url, args.wait, stop),
        name="fakeportal-oninstall",
        daemon=True,
    ).start()

    print(f"OAuth server: {fake.oauth_url} (server_endpoint {fake.server_endpoint})")
    print(f"Portal: {portal.url} (member_id {portal.member_id}, client_id {fake.client_id})")
    print(f"Sandbox task page: {portal.url}/company/personal/user/1/tasks/task/view/1/")
    print(f"Sandbox app page: {portal.url}/marketplace/app/")
    sys.stdout.flush()
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    stop.set()
    fake.stop()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
